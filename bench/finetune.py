"""Instruct fine-tuning: a packed SFT step and a DPO step, both training rank-16 LoRA adapters on
all seven projections of *small* (8 x 256 positions), against HF transformers + PEFT on the same
rows; and the padding that packing leaves on a realistic mix of conversation lengths.

SFT: 8 rows, each several examples packed (examples.pack / row_arrays: positions restart per
example, one segment each, the loss on the answers' targets). HF gets the same inputs and
position ids and a 4-D boolean mask [B, 1, T, T], causal and within the segment (sdpa), checked
here to give each example the logits it has alone; its loss the cross-entropy over the same
targets (labels -100 where the mask is 0). DPO: 4 pairs (8 rows) of a prompt and an answer, the
loss on the answers; HF computes the policy with the adapters and the reference without them
(`disable_adapter()`, no grad), as TRL does. Both sides clip at 1.0 and take an AdamW step over
the adapters, in float32.
"""

from __future__ import annotations

import os

import numpy as np

from bench.common import CONFIGS, hf_optimizer_step, random_hf_model, timed

RANK, ROWS, SEQ, PAIRS, BETA = 16, 8, 256, 4, 0.1


def run(bandwidth: float, peak_flops: float, names=("small",), reps: int = 3, side: str = "ours") -> list[dict]:
    del bandwidth
    import torch

    from mistral_jax.training import metrics

    torch.set_num_threads(os.cpu_count())
    rows = []
    for name in names:
        hf, (config, params) = random_hf_model(CONFIGS[name])
        sft, dpo = sft_batch(config.vocab_size), dpo_batch(config.vocab_size)
        if side == "ours":
            times, checks, n_adapter = _ours(config, params, sft, dpo, reps)
        else:
            times, checks, n_adapter = _hf(config, hf, sft, dpo, reps)
        who = "ours" if side == "ours" else "HF + PEFT"
        tokens = ROWS * SEQ
        trained = int(sft["mask"].sum())
        filled = int((sft["segments"] >= 0).sum())
        flops = {"sft": metrics.flops_per_token(config, SEQ, lora_params=n_adapter) * tokens,
                 "dpo": (metrics.flops_per_token(config, SEQ, lora_params=n_adapter)
                         + metrics.flops_per_token(config, SEQ, training=False)) * tokens}
        workloads = {"sft": f"packed SFT step {name} {ROWS}x{SEQ}, LoRA r{RANK} on all 7",
                     "dpo": f"DPO step {name} {PAIRS} pairs ({ROWS}x{SEQ}), LoRA r{RANK} on all 7"}
        for kind in ("sft", "dpo"):
            row = dict(workload=workloads[kind], unit="tok/s")
            row["ours" if side == "ours" else "torch"] = tokens / times[kind]
            if side == "ours":
                row["limit"] = flops[kind] / times[kind] / peak_flops
            row["note"] = f"{who}: step {times[kind]:.2f} s"
            if kind == "sft":
                row["note"] += f", first loss {checks['sft']:.4f}"
                if side == "torch":
                    row["note"] += f", packed logits within {checks['masking']:.0e} of each example's alone"
                if side == "ours":
                    n_examples = int(sum(len(np.unique(s[s >= 0])) for s in sft["segments"]))
                    row["note"] += (f"; {n_examples} examples in {ROWS} rows, {100 * filled / tokens:.0f}% of "
                                    f"positions filled, {100 * trained / tokens:.0f}% trained targets")
            rows.append(row)
        if side == "ours":
            rows += padding_rows()
    return rows


def _example(rng, n: int, prompt: int, vocab: int):
    from mistral_jax.training import examples

    return examples.Example(rng.integers(0, vocab, n).astype(np.int32), np.arange(n) >= prompt)


def sft_batch(vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """ROWS packed rows of random conversations of 24-160 tokens, the last 40-80% trained."""
    from mistral_jax.training import examples

    rng = np.random.default_rng(seed)
    items = []
    while len(examples.pack(items, SEQ)) <= ROWS:  # one more row started: the first ROWS are closed
        n = int(rng.integers(24, 161))
        items.append(_example(rng, n, int(n * rng.uniform(0.2, 0.6)), vocab))
    return examples.stack([examples.row_arrays(row, SEQ) for row in examples.pack(items, SEQ)[:ROWS]])


def dpo_batch(vocab: int, seed: int = 1) -> dict[str, np.ndarray]:
    """PAIRS preference pairs [PAIRS, 2, SEQ]: a prompt of 40-120 tokens, answers of 30-130."""
    from mistral_jax.training import examples

    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(PAIRS):
        prompt = rng.integers(0, vocab, int(rng.integers(40, 121))).astype(np.int32)
        pair = []
        for _ in range(2):
            answer = rng.integers(0, vocab, int(rng.integers(30, 131))).astype(np.int32)
            ids = np.concatenate([prompt, answer])
            pair.append(examples.Example(ids, np.arange(len(ids)) >= len(prompt)))
        pairs.append(examples.pair_arrays(tuple(pair), SEQ))
    return examples.stack(pairs)


def padding_rows(n: int = 2000, median: int = 300, sigma: float = 1.0, seed: int = 0) -> list[dict]:
    """The share of positions left to padding by n conversations of lognormal lengths (each at
    least 16 tokens, cut to seq_len + 1 as train.py's --long-examples truncate does), packed,
    one to a row of seq_len, and one to a row padded to the longest of each batch of 8."""
    from mistral_jax.training import examples

    lengths = np.maximum(16, np.round(np.random.default_rng(seed).lognormal(np.log(median), sigma, n))).astype(int)
    rows = []
    for seq_len in (2048, 4096):
        items = [examples.fit(examples.Example(np.zeros(k, np.int32), np.ones(k, bool)), seq_len + 1, "truncate")
                 for k in lengths]
        filled = np.array([len(e) - 1 for e in items])
        packed = len(examples.pack(items, seq_len)) * seq_len
        longest = sum(len(b) * b.max() for b in np.split(filled, range(8, n, 8)))
        cut = int((lengths > seq_len + 1).sum())
        for how, positions in (("packed", packed), ("one per row, padded to seq_len", n * seq_len),
                               ("one per row, padded to the longest of its batch of 8", longest)):
            rows.append(dict(workload=f"padding at seq_len {seq_len}, {how}", unit="% padding",
                             ours=100 * (1 - filled.sum() / positions),
                             note=f"{positions / packed:.2f}x the positions of packing" if how != "packed" else
                             f"{packed // seq_len} rows for {n} conversations (lognormal, median {median}, σ "
                             f"{sigma}), {cut} cut to {seq_len + 1} tokens"))
    return rows


def _ours(config, params, sft, dpo, reps: int):
    import jax
    import jax.numpy as jnp

    from mistral_jax.runtime.sharding import make_mesh
    from mistral_jax.training import lora, trainer

    mesh = make_mesh("", jax.devices()[:1])
    base = (params,)
    times, checks = {}, {}
    for kind, batch in (("sft", sft), ("dpo", dpo)):
        hp = trainer.Hyperparameters(steps=1000, batch_size=ROWS if kind == "sft" else PAIRS, seq_len=SEQ, warmup=10,
                                     lora_rank=RANK, lora_targets=",".join(lora.model_targets(config)),
                                     objective=kind, dpo_beta=BETA)
        tx = trainer.make_optimizer(hp)
        state = [trainer.init_state(config, tx, mesh, spec=hp.lora_spec)]
        n_adapter = sum(x.size for x in jax.tree_util.tree_leaves(state[0].params))
        batch = {key: jnp.asarray(value) for key, value in batch.items()}
        step = trainer.make_train_step(config, tx, hp, mesh, trainer.state_shardings(state[0]),
                                       trainer.state_shardings(base[0])).lower(state[0], batch, *base).compile()

        def our_step(step=step, state=state, batch=batch, kind=kind):
            state[0], metrics = step(state[0], batch, *base)
            jax.block_until_ready(metrics["loss"])
            if kind not in checks:
                checks[kind] = float(metrics["loss"])
        times[kind] = timed(our_step, reps=reps)
    return times, checks, n_adapter


def document_mask(segments):
    """bool [B, 1, T, T]: causal and within the segment (padding, -1, attends to padding)."""
    import torch

    T = segments.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return (causal & (segments[:, :, None] == segments[:, None, :]))[:, None]


def check_document_masking(model, sft, inputs, positions, mask) -> float:
    """The largest difference of HF's logits on the packed rows from those of each example alone
    (asserted below 1e-4: the baseline really masks the documents)."""
    import torch

    worst = 0.0
    with torch.no_grad():
        packed = model(input_ids=inputs, position_ids=positions, attention_mask=mask, use_cache=False).logits
        for r, segments in enumerate(sft["segments"]):
            for s in np.unique(segments[segments >= 0]):
                span = np.flatnonzero(segments == s)
                alone = model(input_ids=inputs[r:r + 1, span], use_cache=False).logits[0]
                worst = max(worst, float((packed[r, span] - alone).abs().max()))
    assert worst < 1e-4, f"HF's packed logits differ from the examples' alone by {worst}"
    return worst


def _step(trained, loss_of, checks: dict, kind: str):
    """hf_optimizer_step of loss_of(), the first step's loss kept in checks[kind]."""
    step = hf_optimizer_step(trained, loss_of)

    def step_and_check():
        loss = step()
        checks.setdefault(kind, loss.item())
    return step_and_check


def _hf(config, model, sft, dpo, reps: int):
    import peft
    import torch
    import torch.nn.functional as F

    from mistral_jax.training import lora

    model.config._attn_implementation = "sdpa"
    inputs, positions, targets = (torch.from_numpy(sft[k]).long() for k in ("inputs", "positions", "targets"))
    mask = document_mask(torch.from_numpy(sft["segments"]))
    checks = {"masking": check_document_masking(model, sft, inputs, positions, mask)}
    labels = torch.where(torch.from_numpy(sft["mask"]).bool(), targets, -100)
    modules = [lora.PEFT_NAMES[target].split(".")[-1] for target in lora.model_targets(config)]
    adapted = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0,
                                                         target_modules=modules)).train()
    trained = [p for p in adapted.parameters() if p.requires_grad]
    times = {}

    def sft_loss():
        logits = adapted(input_ids=inputs, position_ids=positions, attention_mask=mask, use_cache=False).logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)

    times["sft"] = timed(_step(trained, sft_loss, checks, "sft"), reps=reps)

    rows = {k: torch.from_numpy(dpo[k].reshape(2 * PAIRS, SEQ)) for k in ("inputs", "targets", "mask")}
    ids, answer = rows["inputs"].long(), rows["mask"].float()

    def logprobs():  # summed over each row's answer, as TRL's selective_log_softmax
        logits = adapted(input_ids=ids, use_cache=False).logits
        chosen = logits.gather(-1, rows["targets"].long()[..., None])[..., 0] - torch.logsumexp(logits, -1)
        return (chosen * answer).sum(-1).reshape(PAIRS, 2)

    def dpo_loss():
        policy = logprobs()
        with adapted.disable_adapter(), torch.no_grad():
            reference = logprobs()
        margin = BETA * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1]))
        return -F.logsigmoid(margin).mean()

    times["dpo"] = timed(_step(trained, dpo_loss, checks, "dpo"), reps=reps)
    return times, checks, sum(p.numel() for p in trained)
