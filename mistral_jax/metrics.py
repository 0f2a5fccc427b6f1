"""Training metrics: a line on stdout, metrics.jsonl, TensorBoard events and a loss-curve PNG."""

from __future__ import annotations

import json
import os
import sys


class MetricsWriter:
    """Writes each record to stdout (one line), out_dir/metrics.jsonl and out_dir/tensorboard.

    Only process 0 writes: on a multi-host run every process computes the same metrics.
    """

    def __init__(self, out_dir: str, enabled: bool = True):
        self.enabled = enabled
        self.records: list[dict] = []
        self._jsonl = self._tensorboard = None
        if enabled:
            os.makedirs(out_dir, exist_ok=True)
            self.out_dir = out_dir
            self._jsonl = open(os.path.join(out_dir, "metrics.jsonl"), "a")
            try:
                from tensorboardX import SummaryWriter

                self._tensorboard = SummaryWriter(os.path.join(out_dir, "tensorboard"))
            except ImportError:
                print("tensorboardX not installed: no TensorBoard events", file=sys.stderr)

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
