"""Training metrics: the FLOP count and peak behind MFU, the progress line on stdout,
metrics.jsonl, TensorBoard events and a loss-curve PNG."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from mistral_jax.model.config import MistralConfig


def flops_per_token(config: MistralConfig, seq_len: int, training: bool = True, lora_params: int | None = None
                    ) -> float:
    """Model FLOPs per token: 2 per matmul weight it is multiplied by (the embedding is a
    lookup, unless tied to the output; with experts, only its k experts' and the router's) plus attention
    as computed under the causal mask and the window (QK^T and PV over the keys each query
    sees, averaged over positions); x3 for forward + backward. Training LoRA adapters of
    lora_params parameters, the frozen weights get no gradient of their own (x2: forward and
    the inputs' gradient), the adapters x3."""
    lookup = 0 if config.tied_embeddings else config.vocab_size * config.dim  # tied: the output's matmul too
    matmul_params = config.active_params - lookup - (2 * config.n_layers + 1) * config.dim
    def mean_keys(window):
        return sum(min(i + 1, window or seq_len) for i in range(seq_len)) / seq_len
    keys = sum(mean_keys(w) * config.windows.count(w) for w in config.window_kinds)  # over the layers
    attention = 2 * 2 * config.n_heads * config.head_dim * keys
    if not training:
        return 2 * matmul_params + attention
    if lora_params is None:
        return 3 * (2 * matmul_params + attention)
    return 2 * 2 * matmul_params + 3 * (attention + 2 * lora_params)


def measure_peak_flops(shapes=((1024, 1024, 1024), (2048, 2048, 2048)), timer=None) -> float:
    """Sustained float32 matmul FLOP/s of one device: the best over (m, k, n) GEMM shapes,
    each timed by timer(fn) -> seconds (default: the fastest of 5 runs after a warm-up).
    train.py's MFU denominator, and the benchmarks' (which pass more shapes and a timer
    that discards disturbed runs)."""
    def fastest_of_5(fn):
        fn()
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best

    timer = timer or fastest_of_5
    best = 0.0
    for m, k, n in shapes:
        a, b = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
        best = max(best, 2 * m * k * n / timer(lambda: _matmul(a, b).block_until_ready()))
    return best


_matmul = jax.jit(jnp.matmul)  # one program for every measurement: a re-measure compiles nothing

# Published dense bf16 peak FLOP/s of a device, by a substring of jax's device_kind; the first
# match counts ("H100 PCIe" before "H100", "TPU v5 lite" (v5e) before "TPU v5" (v5p)).
PUBLISHED_PEAKS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12),
                   ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v6 lite", 918e12))


@dataclasses.dataclass
class Peak:
    """The job's peak FLOP/s, MFU's denominator: flops of each of `units` (devices, or on CPU
    processes). A measured peak is only a lower bound (a start-up measurement on a busy machine
    is deflated), so unless fixed it only rises: to re-measurements (measure) taken as training
    goes, costing about `budget` of the training time (by clock), and to any step's achieved
    FLOP/s, which proves it low. Then MFU never reads above 100%."""

    flops: float
    units: int = 1
    measure: Callable[[], float] | None = None
    fixed: bool = False
    budget: float = 0.03
    spent: float = 0.0  # seconds re-measuring
    trained: float = 0.0  # seconds of training seen by mfu
    clock: Callable[[], float] = time.perf_counter

    def mfu(self, achieved: float, seconds: float) -> float:
        """achieved FLOP/s (the job's) over `seconds` of training, as a fraction of the peak."""
        if not self.fixed:
            self.trained += seconds
            if self.measure is not None and self.spent < self.budget * self.trained:
                start = self.clock()
                self.flops = max(self.flops, self.measure())
                self.spent += self.clock() - start
            self.flops = max(self.flops, achieved / self.units)
        return achieved / (self.flops * self.units)


def device_peak(given: float | None = None) -> Peak:
    """The job's peak: `given` (--peak-flops, of one device) as is; else the published peak of
    the accelerator's kind; else (CPU, an unknown kind) measured now and again as training goes.
    A process's CPU devices share its cores, which one device's matmul already uses all of:
    there a unit is a process, not a device."""
    cpu = jax.default_backend() == "cpu"
    units = jax.process_count() if cpu else jax.device_count()
    if given:
        return Peak(given, units, fixed=True)
    kind = jax.devices()[0].device_kind
    published = next((flops for name, flops in PUBLISHED_PEAKS if name in kind), None)
    if published and not cpu:
        return Peak(published, units)
    return Peak(measure_peak_flops(), units, measure=measure_peak_flops)


def _read_records(path: str) -> list[dict]:
    """metrics.jsonl's records; a line a killed process left half-written is not one."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
    return records


def format_line(record: dict, total_steps: int, eta_seconds: float) -> str:
    """The progress line of a metrics record: step, loss, DPO's reward margin and accuracy,
    tokens/s, MFU, eval loss, ETA."""
    line = f"step {record['step']:>{len(str(total_steps))}}/{total_steps} | loss {record['loss']:.3f}"
    if "reward_margin" in record:
        line += f" | margin {record['reward_margin']:.3f} ({100 * record['reward_accuracy']:.0f}% right)"
    line += f" | {record['tokens_per_s']:,.0f} tok/s"
    if "mfu" in record:
        line += f" | MFU {100 * record['mfu']:.0f}%"
    if record.get("skipped_steps"):
        line += f" | {record['skipped_steps']} non-finite steps skipped"
    if "eval_loss" in record:
        line += f" | eval {record['eval_loss']:.3f}" + (f" (ppl {record['eval_ppl']:.1f})" if "eval_ppl" in record else
                                                         f" ({100 * record['eval_reward_accuracy']:.0f}% right)")
    return line + f" | ETA {int(eta_seconds // 60)}m{int(eta_seconds % 60):02d}s"


class MetricsWriter:
    """Writes each record to stdout (one line), out_dir/metrics.jsonl and out_dir/tensorboard.

    A run starting at start_step (a resume, or 0) keeps the records of the steps up to it and
    drops the later ones, which a killed run wrote past its last checkpoint and this run will
    write again (TensorBoard's purge_step hides them there). Only process 0 writes: on a
    multi-host run every process computes the same metrics.
    """

    def __init__(self, out_dir: str, enabled: bool = True, start_step: int = 0):
        self.enabled = enabled
        self.records: list[dict] = []
        self._jsonl = self._tensorboard = None
        if enabled:
            os.makedirs(out_dir, exist_ok=True)
            self.out_dir = out_dir
            path = os.path.join(out_dir, "metrics.jsonl")
            self.records = [r for r in _read_records(path) if r["step"] <= start_step]
            with open(path + ".partial", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.records)
            os.replace(path + ".partial", path)
            self._jsonl = open(path, "a")
            try:
                from tensorboardX import SummaryWriter

                self._tensorboard = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                print("tensorboardX not installed: no TensorBoard events", file=sys.stderr)

    def last(self, key: str, default=None):
        """key's value in the latest record that has it (those kept from before start_step included)."""
        return next((r[key] for r in reversed(self.records) if key in r), default)

    def write(self, record: dict, line: str) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        print(line, flush=True)
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        self.plot()

    def plot(self) -> None:
        """loss.png: training and evaluation loss against step."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        train = [(r["step"], r["loss"]) for r in self.records if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in self.records if "eval_loss" in r]
        if not train:
            return
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(*zip(*train), label="train loss")
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(self.out_dir, "loss.png"), dpi=100)
        plt.close(fig)
