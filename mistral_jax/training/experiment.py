"""What train.py sets up around the training loop: the processes and mesh, the model config,
the tokenizer (trained on first use), the tokenized data, initial weights; and what it does
after: the final model and a few samples."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax.checkpoints.store import load_checkpoint, remove, save_checkpoint, saved_steps
from mistral_jax.inference.sampling import generate
from mistral_jax.model import quantize
from mistral_jax.model.config import DTYPES, REMAT_POLICIES, MistralConfig
from mistral_jax.model.transformer import param_shardings
from mistral_jax.runtime import distributed, locks
from mistral_jax.runtime.options import OptionError, option, require_positive
from mistral_jax.runtime.sharding import make_mesh
from mistral_jax.text.tokenizer import TOKENIZER_NAMES, Tokenizer, checkpoint_name, find_tokenizer
from mistral_jax.training import data, examples, lora
from mistral_jax.training.metrics import Peak, device_peak
from mistral_jax.training.trainer import Hyperparameters

CACHE_DIR = os.environ.get("MISTRAL_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mistral_jax"))
DEFAULT_CONFIG = "mistral-15m"  # what train.py trains without --config or --init-from
LOCK_FILE = ".lock"  # in --out, held by the run's process 0 while it runs
LORA_FILE = "lora.json"  # in --out: the LoRA adapters a run trains, so a resume trains the same ones
SAMPLE_PROMPTS = ("The", "A function", "In Python,", "When the", "This module")


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Where a training run reads and writes, which model it trains, on which devices."""

    data: tuple[str, ...] = option(
        (data.BUILTIN,), 'text files, globs, directories or .jsonl: "text" lines, conversations ("messages", '
                         'trained on the assistant\'s tokens, packed) or with --objective dpo preference pairs '
                         '("prompt", "chosen", "rejected"); "builtin": Python\'s documentation and its standard '
                         "library's docstrings")
    bad_lines: str = option("stop", "a .jsonl line that is no conversation or pair: stop, naming it, or skip it "
                                    "(counted)", choices=examples.BAD_LINES)
    long_examples: str = option("truncate", "a conversation or pair longer than --seq-len + 1 tokens: cut at the end, "
                                            "or drop it", choices=examples.LONG)
    out: str = option("runs/default", "the run's directory")
    config: str | None = option(None, "a preset name or a config.json/params.json file (default: mistral-15m, "
                                       "or the --init-from checkpoint's)")
    init_from: str | None = option(None, "a mistral_jax checkpoint to fine-tune (its config and tokenizer)")
    tokenizer: str | None = option(None, "a tokenizer file: sentencepiece or tekken.json (default: the --init-from "
                                         "checkpoint's, or trained on the data at first run)")
    vocab_size: int | None = option(None, "pieces of the tokenizer trained on the data (default: the config's); "
                                          "fewer where the data cannot fill them, and the model's vocabulary follows")
    resume: bool = option(False, "continue from the newest intact checkpoint in --out (from step 0 if it has "
                                 "none)")
    resume_from: int | None = option(None, "continue from this step's checkpoint in --out, discarding the later ones")
    overwrite: bool = option(False, "start afresh in an --out that holds a run")
    dtype: str = option("float32", "compute dtype; parameters and optimizer state stay float32",
                         choices=DTYPES[:2])
    base_dtype: str | None = option(None, "LoRA: storage dtype of the frozen --init-from weights (default: "
                                          "bfloat16); int8 or int4: its layers' projections quantized (QLoRA), "
                                          "the rest bfloat16", choices=DTYPES[:2] + quantize.MODES)
    quant_group: int | None = option(None, "inputs per scale of an int8 or int4 --base-dtype (default: int8 a "
                                           "whole channel, int4 128)")
    remat: str = option("none", "what each block saves for the backward pass", choices=tuple(REMAT_POLICIES))
    mesh: str = option("", 'e.g. "data=2,fsdp=2,tensor=2"; -1 = the rest (default: all on fsdp)')
    peak_flops: float | None = option(None, "peak FLOP/s of a device, for MFU (on CPU: of a process, whose "
                                             "devices share its cores; default: the device's published "
                                             "peak, or on CPU measured, and again as training goes)")
    samples: int = option(3, "samples printed at the end")
    sample_tokens: int = option(48, "tokens per sample")
    distributed: bool = option(False, "a multi-process run: jax.distributed.initialize(), which detects TPU pods "
                                       "and SLURM; elsewhere give --coordinator, --num-processes and --process-id")
    coordinator: str | None = option(None, "host:port of process 0 (implies --distributed)")
    num_processes: int | None = option(None, "processes in the run")
    process_id: int | None = option(None, "this process's index")

    def __post_init__(self):
        if self.samples < 0:
            raise OptionError("samples", f"must be >= 0, got {self.samples}")
        require_positive(self, "sample_tokens")
        if self.resume_from is not None and self.resume_from < 1:
            raise OptionError("resume_from", f"must be a checkpoint's step (a positive integer), got {self.resume_from}")
        if self.overwrite and (self.resume or self.resume_from is not None):
            raise OptionError("overwrite", "starts afresh: give it without --resume or --resume-from")
        if self.vocab_size is not None and (self.tokenizer or self.init_from):
            raise OptionError("vocab_size", "applies to a tokenizer trained on the data, not to --tokenizer's or "
                                            "--init-from's")


@dataclasses.dataclass
class Run:
    config: MistralConfig
    mesh: jax.sharding.Mesh
    tokenizer: Tokenizer
    batches: data.TokenBatches | examples.Batches  # what trainer.fit reads
    data_summary: str  # what the data is, said at the start
    params: dict | None  # initial weights of --init-from; with LoRA, the frozen base
    peak_flops: Peak | None
    lora: lora.LoRA | None = None  # the adapters trained (hp.lora_spec)
    base_dir: str | None = None  # --init-from


RUN_FILES = ("checkpoints", "damaged_checkpoints", "model", "adapter", LORA_FILE, "metrics.jsonl", "tensorboard",
             "loss.png")


@contextlib.contextmanager
def training_run(options: RunOptions, hp: Hyperparameters) -> Iterator[Run]:
    """The run, prepared (prepare_run), with --out locked for the block: a second run on the
    same --out, a --resume or an --overwrite of a live run is refused at once."""
    if options.distributed or options.coordinator:
        distributed.initialize(options.coordinator, options.num_processes, options.process_id)
    with contextlib.ExitStack() as held:
        if distributed.is_primary():
            os.makedirs(options.out, exist_ok=True)
            held.enter_context(locks.exclusive(os.path.join(options.out, LOCK_FILE), options.out))
        yield prepare_run(options, hp)


def prepare_run(options: RunOptions, hp: Hyperparameters) -> Run:
    """Checks the options against the devices and --out, and gets the config, tokenizer,
    data and initial weights ready. A run is in --out once it has a complete checkpoint; the
    leftovers of one that failed earlier (metrics, an empty checkpoints/) are cleared."""
    mesh = make_mesh(options.mesh)
    shards = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
    if hp.batch_size % (hp.grad_accum * shards) or hp.batch_size % jax.process_count():
        raise OptionError("batch_size", f"{hp.batch_size} must divide into grad_accum {hp.grad_accum} micro-batches, "
                                        f"each split over data x fsdp x expert = {shards} devices")
    primary = distributed.is_primary()
    spec = hp.lora_spec
    if hp.objective == "dpo" and not options.init_from:
        raise OptionError("objective", "dpo needs --init-from: the model it starts from is its reference")
    if spec is not None and not options.init_from:
        raise OptionError("lora_rank", "needs --init-from: adapters are trained on a model's weights")
    if options.base_dtype is not None and spec is None:
        raise OptionError("base_dtype", "is the frozen base's dtype of LoRA: give it with --lora-rank")
    if options.quant_group is not None:
        require_positive(options, "quant_group")
        if options.base_dtype not in quantize.MODES:
            raise OptionError("quant_group", "is the scales' group of an int8 or int4 --base-dtype")
    if spec is not None and os.path.isdir(options.init_from):  # the default targets: the base's attention's
        spec = dataclasses.replace(spec, targets=spec.targets_of(MistralConfig.from_dir(options.init_from)))
    checkpoints = os.path.join(options.out, "checkpoints")
    if os.path.exists(checkpoints) and not os.path.isdir(checkpoints):
        raise ValueError(f"{checkpoints} is not a directory: the run keeps its checkpoints there")
    has_run = bool(saved_steps(checkpoints))
    distributed.barrier("checked for a previous run")  # before any process writes into --out
    resuming = options.resume or options.resume_from is not None
    if has_run and not (resuming or options.overwrite):
        raise ValueError(f"{options.out} holds a run: pass --resume to continue it or --overwrite to start afresh")
    if has_run and resuming:
        _check_same_training(options.out, spec)
    if resuming and not has_run and primary:
        print(f"{options.out} has no checkpoint to resume from: starting at step 0", flush=True)
    if options.resume_from is not None and not has_run:
        raise OptionError("resume_from", f"{options.resume_from}: {options.out} has no checkpoint")
    if (options.overwrite or not has_run) and primary:  # afresh; with --overwrite the tokenizer too
        names = RUN_FILES + (TOKENIZER_NAMES if options.overwrite else ())
        leftovers = [name for name in names if os.path.lexists(os.path.join(options.out, name))]
        if leftovers and not options.overwrite:
            print(f"removing what an earlier run in {options.out} left without a complete checkpoint: "
                  f"{', '.join(leftovers)}", flush=True)
        for name in leftovers:
            remove(os.path.join(options.out, name))

    params = None
    if options.init_from:
        if not os.path.isdir(options.init_from):
            raise FileNotFoundError(f"checkpoint {options.init_from} not found")
        base = MistralConfig.from_dir(options.init_from)
        if options.config and _shape(MistralConfig.resolve(options.config)) != _shape(base):
            raise ValueError(f"--init-from {options.init_from} has a different shape than --config {options.config}")
        if spec is not None:
            spec.check(base)
        # Read straight onto the mesh: no device (or host) ever holds the whole model.
        quantized = options.base_dtype in quantize.MODES
        dtype = "float32" if spec is None else "bfloat16" if quantized else options.base_dtype or "bfloat16"
        config, params = load_checkpoint(options.init_from, dtype, shardings=param_shardings(base, mesh),
                                         quantize=options.base_dtype if quantized else None, group=options.quant_group)
        if spec is None and quantize.mode_of(params):
            raise ValueError(f"{options.init_from} is stored quantized ({quantize.mode_of(params)}): train LoRA "
                             "adapters on it (--lora-rank), or convert the float weights again to train them all")
        source = options.tokenizer or find_tokenizer(options.init_from)
        if source is None:
            raise ValueError(f"{options.init_from} has no tokenizer file; pass --tokenizer")
    else:
        config = MistralConfig.resolve(options.config or DEFAULT_CONFIG)
        source = options.tokenizer
    tokenizer_path = _run_tokenizer(options, source, options.vocab_size or config.vocab_size)
    distributed.barrier("tokenizer ready")
    if hp.seq_len > config.max_seq_len:
        raise OptionError("seq_len", f"{hp.seq_len} is longer than the model's max_seq_len {config.max_seq_len}")
    tokenizer = Tokenizer(tokenizer_path)
    if params is None:  # a model trained from scratch has its tokenizer's vocabulary
        config = config.replace(vocab_size=tokenizer.vocab_size)
    elif tokenizer.vocab_size != config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces, the model's vocabulary is {config.vocab_size}")
    config = config.replace(dtype=options.dtype, param_dtype="float32", remat=options.remat)
    longest_prompt = max(len(tokenizer.encode(p)) for p in SAMPLE_PROMPTS[:options.samples] or [""])
    if options.samples and longest_prompt + options.sample_tokens > config.max_seq_len:  # said now, not after training
        raise OptionError("sample_tokens", f"{options.sample_tokens} after a {longest_prompt}-token prompt is more "
                                           f"than the model's max_seq_len {config.max_seq_len}")
    batches, summary = read_data(options, hp, tokenizer)
    if primary:
        config.save_hf(options.out)
        if spec is not None:
            with open(os.path.join(options.out, LORA_FILE), "w") as f:
                json.dump(_lora_record(spec), f)
    return Run(config, mesh, tokenizer, batches, summary, params, device_peak(options.peak_flops), spec,
               options.init_from)


def read_data(options: RunOptions, hp: Hyperparameters, tokenizer: Tokenizer
              ) -> tuple[data.TokenBatches | examples.Batches, str]:
    """(the run's batches, a line saying what they hold): a text corpus as token windows;
    conversations (with text lines) as packed examples; with --objective dpo preference pairs."""
    files = [] if list(options.data) == [data.BUILTIN] else data.find_files(list(options.data))
    pairs = hp.objective == "dpo"
    if not (pairs or examples.has_conversations(files)):
        if options.bad_lines != "stop" or options.long_examples != "truncate":
            raise OptionError("bad_lines" if options.bad_lines != "stop" else "long_examples",
                              "applies to conversations and preference pairs; the data is text")
        tokens = data.tokenize(list(options.data), tokenizer, os.path.join(CACHE_DIR, "tokens"))
        return data.TokenBatches(tokens, hp.seq_len, hp.batch_size, seed=hp.seed), f"{len(tokens):,} tokens of data"
    what = "preference pairs (--objective dpo)" if pairs else "conversations and text lines"
    if tokenizer.chat_version is None:
        raise ValueError(f"{what} need an instruct tokenizer (a chat format): {tokenizer.path} has none; "
                         "--init-from an instruct checkpoint or pass its --tokenizer")
    if any(not f.endswith(".jsonl") for f in files) or not files:
        raise ValueError(f"{what} are read from .jsonl files: {', '.join(options.data)} holds others")
    left_out = {"longer than --seq-len dropped": 0, "with nothing to train": 0}

    def encode(line):  # an item, or None for one left out (counted)
        if pairs:
            item = tuple(examples.fit(e, hp.seq_len + 1, options.long_examples)
                         for e in examples.preference_example(tokenizer, line))
            if None in item:
                item = None
        else:
            item = examples.fit(examples.conversation_example(tokenizer, line), hp.seq_len + 1, options.long_examples)
        if item is None:
            left_out["longer than --seq-len dropped"] += 1
        elif not pairs and not item.trained[1:].any():
            left_out["with nothing to train"] += 1
            item = None
        return item

    encoded, skipped = examples.read_lines(files, encode, options.bad_lines)
    items = [item for item in encoded if item is not None]
    batches = examples.Batches(items, hp.seq_len, hp.batch_size, seed=hp.seed, pairs=pairs)
    notes = [f"{skipped} bad line(s) skipped"] * bool(skipped) + [f"{n} {why}" for why, n in left_out.items() if n]
    summary = (f"{len(items):,} {what} ({len(batches.train):,} for training, padding "
               f"{batches.padding:.0%} of its rows)" + "".join(f", {note}" for note in notes))
    return batches, summary


def _lora_record(spec: lora.LoRA | None) -> dict | None:
    return None if spec is None else {"rank": spec.rank, "alpha": spec.rank if spec.alpha is None else spec.alpha,
                                      "targets": list(spec.targets)}


def _describe(record: dict | None) -> str:
    if record is None:
        return "every weight"
    return (f"LoRA adapters (--lora-rank {record['rank']} --lora-alpha {record['alpha']:g} "
            f"--lora-targets {','.join(record['targets'])})")


def _check_same_training(out: str, spec: lora.LoRA | None) -> None:
    """Refuses to resume a run with other trained params than it has: its checkpoints hold
    those (their Adam state too)."""
    file = os.path.join(out, LORA_FILE)
    recorded = None
    if os.path.isfile(file):
        with open(file, encoding="utf-8") as f:
            recorded = json.load(f)
    if recorded != _lora_record(spec):
        raise ValueError(f"the run in {out} trains {_describe(recorded)}, these flags {_describe(_lora_record(spec))}: "
                         "resume it with its own")


def _run_tokenizer(options: RunOptions, source: str | None, vocab_size: int) -> str:
    """The run's tokenizer file in --out: a copy of source, or one trained on the data at first."""
    if source is not None:
        if not os.path.isfile(source):
            raise FileNotFoundError(f"tokenizer {source} not found")
        path = os.path.join(options.out, checkpoint_name(source))
        if distributed.is_primary():
            Tokenizer(source)  # a file that is no tokenizer is refused before it is copied
            _copy_if_other(source, path)
        return path
    path = os.path.join(options.out, "tokenizer.model")
    if distributed.is_primary() and not os.path.isfile(path):
        print(f"training a {vocab_size}-piece tokenizer on the data", flush=True)
        trained = data.train_tokenizer(list(options.data), path, vocab_size).vocab_size
        if trained < vocab_size:
            print(f"the data supports at most {trained} pieces: trained a {trained}-piece tokenizer (set "
                  f"--vocab-size {trained} to say so)", flush=True)
    return path


def _shape(c: MistralConfig) -> tuple:
    return (c.dim, c.n_layers, c.head_dim, c.hidden_dim, c.n_heads, c.n_kv_heads, c.vocab_size)


def _copy_if_other(source: str, destination: str) -> None:
    if os.path.abspath(source) != os.path.abspath(destination):
        shutil.copyfile(source, destination)


def save_final_model(out_dir: str, run: Run, trained) -> dict:
    """out_dir/model: what sample.py and convert_weights.py --to-hf read: the trained params,
    or with LoRA the base with the adapters merged in; and with LoRA out_dir/adapter, the
    adapters as HF PEFT saves them. Returns the model's params."""
    params = trained
    if run.lora is not None:
        base = run.params
        if any(x.dtype != np.float32 for x in jax.tree_util.tree_leaves(base)):
            # Trained on a base rounded to --base-dtype: merged into that, model/ would not be
            # the user's base plus the adapters, as PEFT computes them. Read it again onto the
            # same shards, in float32 (which holds any stored value exactly), as model/ is.
            _, base = load_checkpoint(run.base_dir, "float32",
                                      shardings=jax.tree_util.tree_map(lambda x: x.sharding, base))
            base = quantize.dequantize_params(base, jnp.float32)  # a base stored quantized: its values
        params = lora.merge(base, trained, run.lora, "float32")
    path = os.path.join(out_dir, "model")
    save_checkpoint(path, run.config.replace(dtype="float32"), params, overwrite=True,
                    extra_files={os.path.basename(run.tokenizer.path): run.tokenizer.path})
    if distributed.is_primary():
        print(f"saved {path}", flush=True)
    if run.lora is not None:
        adapter = os.path.join(out_dir, "adapter")
        lora.save_peft(adapter, run.config, trained, run.lora, base_model=os.path.abspath(run.base_dir),
                       overwrite=True)
        if distributed.is_primary():
            print(f"saved {adapter} (HF PEFT: PeftModel.from_pretrained on the base exported with --to-hf)", flush=True)
    return params


def print_samples(run: Run, params, n: int, max_new_tokens: int, seed: int) -> None:
    """Samples from the params where they lie, sharded over run.mesh, and prints on process 0
    (every process must call this: generating runs on all of their devices)."""
    tokenizer = run.tokenizer
    prompts = [tokenizer.encode(SAMPLE_PROMPTS[i % len(SAMPLE_PROMPTS)]) for i in range(n)]
    outputs = generate(run.config, params, prompts, max_new_tokens, temperature=0.8, top_p=0.95, seed=seed,
                       eos_id=tokenizer.eos_id, mesh=run.mesh)
    if not distributed.is_primary():
        return
    for prompt, tokens in zip(prompts, outputs):
        print(f"--- {tokenizer.decode(prompt + tokens)}")  # decoded whole, so the joining space survives
