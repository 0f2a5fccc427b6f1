"""Low-bit weights (model/quantize.py) measured side by side, config by config:

- decode: greedy decode of prompt 32 + NEW tokens at batch 1 and 8 with the params (and compute)
  in float32 or bfloat16, or float32 with the layers' projections int8 (per channel) or int4
  (groups of 128 inputs); tokens/s from the compiled decode loop's step (decode_step_seconds).
  The roofline is the bytes a step reads (the arrays' nbytes of every param but the embedding
  table, int4 a byte each, held as int8 on XLA:CPU, plus the live KV cache) at the measured bandwidth.
  At batch 1, against llama.cpp (llama-cpp-python) greedy-decoding the same weights from GGUF
  files (bench/gguf_files.py): our bfloat16 against F16, int8 against Q8_0, int4 against Q4_0,
  its step timed as ours (NEW steps less 8, over the extra steps).
- quality: the logits error of int8 and int4 against float32 on strong random weights; for
  *default*, the held-out perplexity of the model `python train.py` trains, float32 / int8 / int4.
- QLoRA: the memory XLA plans for a LoRA train step over a frozen base in bf16, int8 or int4.
- forms (once per run): the CPU product of one [4096, 14336] weight in each form tried.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.common import CONFIGS, REPO, random_hf_model, timed
from bench.decode import NEW, PROMPT, decode_step_seconds

KINDS = ("float32", "bfloat16", "int8", "int4")
GGUF_KIND = {"bfloat16": "F16", "int8": "Q8_0", "int4": "Q4_0"}  # llama.cpp's file paired with our row
GROUPS = (128, 64, 32)  # int4's inputs per scale: the first that tiles every projection's inputs
RANK, LORA_ROWS, LORA_SEQ = 16, 4, 256
EVAL_BATCHES = 16  # held-out batches of train.py's shape (8 x 256) for the perplexity
FORM_SHAPE = (4096, 14336)  # inputs x outputs: Mistral 7B's w1
FORM_CALLS = 10  # products per timed repetition


def run(bandwidth: float, peak_flops: float, names=("tiny",), reps: int = 3, side: str = "ours",
        first: bool = True) -> list[dict]:
    """One side's rows (ours, or llama.cpp's as the "torch" side); first: this process measures
    the run's first config, which adds the forms."""
    del peak_flops
    rows = []
    for name in names:
        hf, (config, params) = random_hf_model(CONFIGS[name])
        if side == "ours":
            rows += decode_rows(name, config, params, bandwidth, reps)
            rows += logit_error_rows(name, config, params)
            if name == "default":
                rows += perplexity_rows()
            rows += qlora_rows(name, config, params)
        else:
            rows += llama_cpp_rows(name, config, hf, reps)
    if side == "ours" and first:
        rows += form_rows(bandwidth, reps)
    return rows


def int4_group(config, params, _found: dict = {}) -> int:  # noqa: B006 (the cache: one answer per config)
    """The first of GROUPS that tiles every projection's inputs (quantize.block_sizes refuses the others)."""
    import jax

    from mistral_jax.model import quantize

    if config not in _found:
        shapes = [(name, x.shape) for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
                  if (name := quantize.quantizable(config, tuple(getattr(k, "key", None) for k in path)))]
        for group in GROUPS:
            try:
                for name, shape in shapes:
                    quantize.block_sizes(shape, name, "int4", group)
            except ValueError:
                continue
            _found[config] = group
            break
        else:
            raise ValueError(f"no int4 group of {GROUPS} tiles the projections' inputs")
    return _found[config]


def variant(config, params, kind: str):
    """(config, params) of a row: float32/bfloat16 params and compute, or the projections int8/int4."""
    import jax

    from mistral_jax.model import quantize

    if kind in quantize.MODES:
        group = int4_group(config, params) if kind == "int4" else None
        return config, quantize.held_for(quantize.quantize_params(config, params, kind, group), jax.default_backend())
    return config.replace(dtype=kind, param_dtype=kind), jax.tree_util.tree_map(lambda x: x.astype(kind), params)


def bytes_per_step(config, params, batch: int) -> float:
    """The arrays' bytes of every param but the embedding table, plus the mean live KV cache."""
    import jax
    import jax.numpy as jnp

    weights = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    if not config.tied_embeddings:
        weights -= params["tok_embeddings"].nbytes
    cache_len = min(config.sliding_window or PROMPT + NEW, PROMPT + NEW)
    live = np.mean([min(PROMPT + step + 1, cache_len) for step in range(NEW)])
    per_token = config.n_layers * 2 * config.n_kv_heads * config.head_dim * jnp.dtype(config.dtype).itemsize
    return weights + batch * live * per_token


def how_quantized(config, params, kind: str) -> str:
    return {"int8": ", int8 per channel", "int4": f", int4 groups of {int4_group(config, params)} (held as int8 "
                                                  "on XLA:CPU)"}.get(kind, "")


def decode_rows(name: str, config, params, bandwidth: float, reps: int) -> list[dict]:
    rows = []
    for kind in KINDS:
        c, p = variant(config, params, kind)
        for batch in (1, 8):
            prompts = np.random.default_rng(0).integers(3, config.vocab_size, (batch, PROMPT)).astype(np.int32)
            step = decode_step_seconds(c, p, prompts, NEW, reps)
            read = bytes_per_step(c, p, batch)
            rows.append(dict(workload=f"decode {name} b{batch} {kind}", unit="tok/s", ours=batch / step,
                             limit=read / bandwidth / step,
                             note=f"our step {1e3 * step:.2f} ms, roofline {1e3 * read / bandwidth:.2f} ms, "
                                  f"{read / 1e6:.1f} MB read per step{how_quantized(config, params, kind)}"))
        del p
    return rows


def strengthen(params, seed: int = 0):
    """params redrawn strong, each layer passing its input's scale on: norm weights U[0.5, 1.5],
    the embedding N(0, 1), every matrix N(0, 1 / its inputs) (the default init's 0.02 shrinks a
    wide model's signal; the tests' N(0, 0.2), at these widths, makes it chaotic)."""
    import jax

    from mistral_jax.model import quantize

    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))

    def redraw(path, x, key):
        name = str(getattr(path[-1], "key", ""))
        if "norm" in "".join(str(getattr(k, "key", "")) for k in path):
            return jax.random.uniform(key, x.shape, x.dtype, 0.5, 1.5)
        if name in quantize.PROJECTIONS:  # [layers, inputs..., outputs...]
            fan_in = math.prod(x.shape[1:1 + quantize.PROJECTIONS[name][0]])
        else:
            fan_in = x.shape[0] if name == "output" else 1
        return jax.random.normal(key, x.shape, x.dtype) / math.sqrt(fan_in)
    return jax.tree_util.tree_unflatten(treedef, [redraw(p, x, k) for (p, x), k in zip(leaves, keys)])


def logit_error_rows(name: str, config, params) -> list[dict]:
    import jax

    from mistral_jax.model import quantize
    from mistral_jax.model.transformer import Mistral

    strong = strengthen(params)
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, (2, 128)).astype(np.int32)
    forward = jax.jit(lambda p: Mistral(config).apply({"params": p}, tokens))
    reference = np.asarray(forward(strong))
    rows = []
    for mode in quantize.MODES:
        _, quantized = variant(config, strong, mode)
        logits = np.asarray(forward(quantized))
        error = np.abs(logits - reference).max()
        same = np.mean(logits.argmax(-1) == reference.argmax(-1))
        rows.append(dict(workload=f"logits error {name} {mode} vs float32", unit="%",
                         ours=float(100 * error / np.abs(reference).max()),
                         note=f"max |Δlogit| {error:.3g} of max |logit| {np.abs(reference).max():.3g} over 2 x 128 "
                              f"tokens, strong (unit-gain) random weights; the same top token at "
                              f"{100 * same:.0f}% of them{how_quantized(config, strong, mode)}"))
    return rows


def perplexity_rows(train_args: tuple[str, ...] = ()) -> list[dict]:
    """Held-out perplexity of the model `python train.py` (plus train_args) trains, float32 /
    int8 / int4: its validation split (the corpus's last 5%), EVAL_BATCHES batches of 8 x 256."""
    import jax
    import jax.numpy as jnp

    from mistral_jax.checkpoints.store import load_checkpoint
    from mistral_jax.model import quantize
    from mistral_jax.text.tokenizer import Tokenizer, find_tokenizer
    from mistral_jax.training import data, trainer
    from mistral_jax.training.experiment import CACHE_DIR

    hp = trainer.Hyperparameters()
    command = " ".join(("python train.py",) + train_args)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "train.py", "--out", out, "--samples", "0", *train_args], cwd=REPO,
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{command} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        minutes = (time.perf_counter() - start) / 60
        print(f"  ({command} trained its model in {minutes:.1f} min)", file=sys.stderr)
        config, params = load_checkpoint(os.path.join(out, "model"))
        tokens = data.tokenize([data.BUILTIN], Tokenizer(find_tokenizer(os.path.join(out, "model"))),
                               os.path.join(CACHE_DIR, "tokens"))
    batches = [jnp.asarray(b) for b in data.TokenBatches(tokens, hp.seq_len, hp.batch_size, seed=hp.seed)
               .validation(EVAL_BATCHES)]
    loss = jax.jit(lambda p, b: trainer.loss_fn(p, config, b, 0.0)[1]["ce"])
    rows, base = [], None
    for kind in ("float32",) + quantize.MODES:
        _, p = variant(config, params, kind)
        perplexity = float(np.exp(np.mean([float(loss(p, b)) for b in batches])))
        if base is None:
            base = perplexity
            note = (f"the model `{command}` trains ({minutes:.1f} min here), over {len(batches) * hp.batch_size} x "
                    f"{hp.seq_len} held-out tokens (its validation split)")
        else:
            goal = {"int8": 1, "int4": 5}[kind]
            note = (f"{100 * (perplexity / base - 1):+.2f}% against float32 (goal: within {goal}%)"
                    f"{how_quantized(config, params, kind)}")
        rows.append(dict(workload=f"held-out perplexity default {kind}", unit="ppl", ours=perplexity, note=note))
    return rows


def qlora_rows(name: str, config, params) -> list[dict]:
    """XLA's plan for the LoRA step (rank 16 on all seven projections, LORA_ROWS x LORA_SEQ, bf16
    compute) over the frozen base in bf16 or its projections int8 / int4, compiled as trainer.fit does."""
    import jax
    import jax.numpy as jnp

    from mistral_jax.model import quantize
    from mistral_jax.model.transformer import param_shardings
    from mistral_jax.runtime.sharding import make_mesh
    from mistral_jax.training import lora, trainer

    mesh = make_mesh("", jax.devices()[:1])
    hp = trainer.Hyperparameters(steps=1000, batch_size=LORA_ROWS, seq_len=LORA_SEQ, warmup=10, lora_rank=RANK,
                                 lora_targets=",".join(lora.model_targets(config)))
    compute = config.replace(dtype="bfloat16")
    tx = trainer.make_optimizer(hp)
    state = trainer.init_state(compute, tx, mesh, spec=hp.lora_spec)
    batch = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (LORA_ROWS, LORA_SEQ + 1)), jnp.int32)
    bf16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    rows = []
    for kind in ("bfloat16",) + quantize.MODES:
        base = bf16 if kind == "bfloat16" else variant(config, bf16, kind)[1]
        shardings = param_shardings(compute, mesh, base)
        base = jax.device_put(base, shardings)
        compiled = trainer.make_train_step(compute, tx, hp, mesh, trainer.state_shardings(state), shardings).lower(
            state, batch, base).compile()
        m = compiled.memory_analysis()
        base_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(base))
        rows.append(dict(
            workload=f"QLoRA step {name} {LORA_ROWS}x{LORA_SEQ}, r{RANK} on all 7, base {kind}", unit="MiB",
            ours=(m.argument_size_in_bytes + m.temp_size_in_bytes) / 2**20,
            note=f"XLA's plan (memory_analysis), arguments {m.argument_size_in_bytes / 2**20:.1f} MiB (the base "
                 f"{base_bytes / 2**20:.1f}, the adapters and their AdamW moments, the batch) + temporaries "
                 f"{m.temp_size_in_bytes / 2**20:.1f} MiB; bf16 compute"
                 + ("; int4 held as int8 (XLA:CPU)" if kind == "int4" else "")))
    return rows


def form_rows(bandwidth: float, reps: int) -> list[dict]:
    """ms per product of x [B, I] with one [I, O] weight, in each form tried on CPU."""
    import jax
    import jax.numpy as jnp

    from mistral_jax.model import quantize

    I, O = FORM_SHAPE
    w = 0.02 * jax.random.normal(jax.random.key(0), (I, O), jnp.float32)
    quantized = jax.jit(quantize.quantize, static_argnums=(1, 2))
    q8, q4 = quantized(w, (I, 1), "int8"), quantized(w, (128, 1), "int4")
    q8t = jnp.asarray(q8["q"].T)  # output-major [O, I]

    def output_major(x, qt, scale):  # per row of x: a 1-D x (a [1, O, I] broadcast ran 100x slower)
        return jnp.stack([jnp.sum(qt.astype(jnp.float32) * x[r], -1) * scale[0] for r in range(x.shape[0])])

    def int8_activations(x, q, scale):  # x quantized per row, an int8 x int8 dot into int32
        sx = jnp.max(jnp.abs(x), -1, keepdims=True) / 127
        xq = jnp.round(x / sx).astype(jnp.int8)
        return jax.lax.dot(xq, q, preferred_element_type=jnp.int32).astype(jnp.float32) * sx * scale

    def rows_of(x, q, scale):
        return quantize.product("bi,io->bo", x, quantize.Quantized(q, scale), "row_blocks")

    forms = [("float32", "dot", jnp.dot, (w,)),
             ("bfloat16", "dot", lambda x, w: jnp.dot(x.astype(jnp.bfloat16), w), (w.astype(jnp.bfloat16),)),
             ("int8", "dequantized whole, then dot", lambda x, q, s: jnp.dot(x, quantize.dequantize(q, s)),
              (q8["q"], q8["scale"])),
             ("int8", "row_blocks", rows_of, (q8["q"], q8["scale"])),
             ("int8", "output-major multiply-reduce", output_major, (q8t, q8["scale"])),
             ("int8", "int8 x int8 (activations quantized)", int8_activations, (q8["q"], q8["scale"])),
             ("int4", "row_blocks, int4 dtype", rows_of, (q4["q"], q4["scale"])),
             ("int4", "row_blocks, held as int8", rows_of,
              (q4["q"].astype(jnp.int8), q4["scale"]))]
    rows = []
    for batch in (1, 8):
        x = jax.random.normal(jax.random.key(batch), (batch, I), jnp.float32)
        exact = np.asarray(jnp.dot(x, quantize.dequantize(q8["q"], q8["scale"])))
        for kind, form, fn, weights in forms:
            product = jax.jit(fn)

            def calls(product=product, weights=weights):
                jax.block_until_ready([product(x, *weights) for _ in range(FORM_CALLS)])
            seconds = timed(calls, reps=reps) / FORM_CALLS
            read = sum(a.nbytes for a in weights)
            note = f"{read / 1e6:.0f} MB of weight, {read / seconds / 1e9:.1f} GB/s"
            if "activations" in form:
                error = np.abs(np.asarray(product(x, *weights)) - exact).max() / np.abs(exact).max()
                note += f"; not exact: {100 * error:.2f}% of max |y| off the int8 weight's exact product"
            if form.startswith("output-major") and batch > 1:
                note += f"; {batch} passes over the weight, one per row"
            rows.append(dict(workload=f"{kind} product {form} {I}x{O} b{batch}", unit="ms", ours=1e3 * seconds,
                             limit=read / bandwidth / seconds, note=note))
    return rows


# ---- the baseline: llama.cpp ---------------------------------------------------------------------

def has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_int8" in f.read()
    except OSError:
        return False


@contextlib.contextmanager
def no_repack():
    """llama.cpp as `--no-repack` runs it (its model param use_extra_bufts off: no AMX or
    repacked weight buffers): its AMX kernels fault (SIGSEGV) on these VMs, whose CPUs report AMX."""
    import llama_cpp.llama_cpp as C

    default = C.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p
    C.llama_model_default_params = params
    try:
        yield
    finally:
        C.llama_model_default_params = default


def llama_cpp_rows(name: str, config, hf, reps: int) -> list[dict]:
    """Batch-1 greedy decode of llama.cpp on the HF model's weights as GGUF F16, Q8_0 and Q4_0."""
    import torch

    from bench import gguf_files

    prompt = np.random.default_rng(0).integers(3, config.vocab_size, (1, PROMPT)).astype(np.int32)
    with torch.no_grad():
        reference = hf(torch.from_numpy(prompt).long()).logits[0, -1].float().numpy()
    tensors = gguf_files.gguf_tensors(hf.state_dict(), config)
    amx = has_amx()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, no_repack() if amx else contextlib.nullcontext():
        for kind, file_type in GGUF_KIND.items():
            path = os.path.join(tmp, f"{name}-{file_type}.gguf")
            read = gguf_files.write(path, config, tensors, file_type)
            step, prompt_s, logits = llama_cpp_decode(path, prompt[0].tolist(), config.vocab_size, reps)
            error = np.abs(logits - reference).max() / np.abs(reference).max()
            if file_type == "F16" and error > 1e-2:  # the weights' names or permutation wrong
                raise AssertionError(f"llama.cpp's F16 logits are {error:.1e} off HF's")
            rows.append(dict(workload=f"decode {name} b1 {kind}", unit="tok/s", torch=1 / step,
                             note=f"llama.cpp {file_type}{' --no-repack (AMX faults here)' if amx else ''}: step "
                                  f"{1e3 * step:.2f} ms, {read / 1e6:.1f} MB of tensors per step, F16 KV cache, "
                                  f"prompt {1e3 * prompt_s:.1f} ms; last logits {100 * error:.2g}% of max off HF's"))
    return rows


def llama_cpp_decode(path: str, prompt: list[int], vocab_size: int, reps: int) -> tuple[float, float, np.ndarray]:
    """(seconds per decode step, seconds of the prompt's eval, the logits after the prompt) of
    llama_cpp.Llama greedy-decoding after prompt, every core; the step timed as decode_step_seconds
    times ours: NEW steps less 8, over the extra steps."""
    import llama_cpp

    threads = os.cpu_count()
    llm = llama_cpp.Llama(path, n_ctx=PROMPT + NEW, n_threads=threads, n_threads_batch=threads, logits_all=False,
                          verbose=False)
    try:
        def decode(steps):
            llm.reset()
            llm.eval(prompt)
            for _ in range(steps):
                llm.eval([llm.sample(temp=0.0)])  # greedy

        decode(0)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab_size,)).copy()
        step = (timed(lambda: decode(NEW), reps=reps) - timed(lambda: decode(8), reps=reps)) / (NEW - 8)
        return step, timed(lambda: decode(0), reps=reps), logits
    finally:
        llm.close()
