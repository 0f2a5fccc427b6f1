"""The kill campaign of docs/RELIABILITY.md, rerunnable (a few minutes; not part of the suite):

  python tests/kill_campaign.py [--kills 10] [--seed 0]

Trains a tiny model for 60 steps saving every step, SIGKILLs train.py at random moments and
resumes it until it finishes; then the run's metrics must hold each step once, with every loss
equal to an uninterrupted run's.
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mistral_jax.model.config import MistralConfig  # noqa: E402

STEPS = 60


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="kill_campaign_")
    MistralConfig(dim=32, n_layers=2, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2, vocab_size=512,
                  sliding_window=16, max_seq_len=64).save_hf(root)
    flags = ["--config", os.path.join(root, "config.json"), "--steps", str(STEPS), "--batch-size", "8",
             "--seq-len", "32", "--save-every", "1", "--log-every", "1", "--samples", "0", "--eval-every", "1000"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "MISTRAL_JAX_CACHE": os.path.join(root, "cache")}

    def train(out, *extra, kill_after=None):
        process = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), "--out", out, *flags, *extra],
                                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            _, stderr = process.communicate(timeout=kill_after)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            _, stderr = process.communicate()
        return process.returncode, stderr

    def losses(out):
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return [(r["step"], r["loss"]) for r in map(json.loads, f)]

    status, stderr = train(os.path.join(root, "uninterrupted"))
    assert status == 0, stderr
    expected = losses(os.path.join(root, "uninterrupted"))
    rng = random.Random(args.seed)
    out, kills, status = os.path.join(root, "killed"), 0, None
    while status != 0:
        resume = ("--resume",) if kills else ()
        status, stderr = train(out, *resume, kill_after=rng.uniform(8, 14) if kills < args.kills else None)
        if status == -signal.SIGKILL:
            kills += 1
        elif status != 0:
            raise SystemExit(f"train.py failed after {kills} kills: {stderr.strip().splitlines()[-1]}")
    got = losses(out)
    assert [s for s, _ in got] == list(range(1, STEPS + 1)), "a step logged twice or missing"
    differing = [s for (s, a), (_, b) in zip(got, expected) if a != b]
    print(f"{kills} kills; steps whose loss differs from the uninterrupted run's: {differing or 'none'}")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
