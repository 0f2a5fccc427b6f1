"""Runs the benchmarks side by side with the PyTorch baseline and prints one table.

  python -m bench [--only train decode scaling] [--configs tiny small default] [--reps 3] [--write]
  python -m bench --only experts --configs small-moe [--write]
  python -m bench --only lora --configs small [--write]
  python -m bench --only latent --configs small-latent [--write]
  python -m bench --only vision --configs small-vision [--write]
  python -m bench --only finetune --configs small [--write]
  python -m bench --only quantized --configs tiny small default [--write]

Each suite runs once per config and side, each in its own process, so that each side runs
as it does by default: ours with glibc's malloc on huge pages, as train.py and sample.py
restart themselves (platforms.restart_with_huge_pages); the baseline (PyTorch, or for the
quantized suite llama.cpp) in the environment given (huge pages slowed PyTorch down:
BENCHMARKS.md). The machine's limits are measured once, here.

--write replaces, for each suite run, its generated section of BENCHMARKS.md with this run's
table (the command, machine and measured limits included).
"""

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time

from bench import common, decode, experts, finetune, latent, lora, quantized, report, scaling, train, vision
from mistral_jax.runtime.platforms import huge_page_tunables, restart_with_huge_pages

SUITES = {"train": train.run, "decode": decode.run, "scaling": scaling.run, "experts": experts.run, "lora": lora.run,
          "latent": latent.run, "vision": vision.run, "finetune": finetune.run, "quantized": quantized.run}
# The baseline of a suite other than PyTorch (HF): (its column's label, the package measured)
BASELINES = {"quantized": ("llama.cpp", "llama-cpp-python")}
ONCE_PER_RUN = {"quantized"}  # suites with rows measured once per run (their run's `first`)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=list(SUITES), default=["train", "decode", "scaling"])
    p.add_argument("--configs", nargs="+", choices=sorted(common.CONFIGS), default=["tiny", "small"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--write", action="store_true", help="rewrite the results section of BENCHMARKS.md")
    # A side's process (internal): one suite, its rows written as JSON to --rows-to.
    p.add_argument("--side", choices=["ours", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--limits", nargs=2, type=float, help=argparse.SUPPRESS)  # peak FLOP/s, bandwidth B/s
    p.add_argument("--rows-to", help=argparse.SUPPRESS)
    p.add_argument("--first-config", action="store_true", help=argparse.SUPPRESS)  # the run's first config
    return p.parse_args()


def measure_side(side: str, suite: str, config: str, reps: int, peak: float, bandwidth: float,
                 first: bool = False) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = os.path.join(tmp, "rows.json")
        subprocess.run([sys.executable, "-m", "bench", "--side", side, "--only", suite, "--configs", config,
                        "--reps", str(reps), "--limits", str(peak), str(bandwidth), "--rows-to", rows_file]
                       + ["--first-config"] * first, cwd=common.REPO, check=True)
        with open(rows_file) as f:
            return json.load(f)


def merge(ours: list[dict], torch: list[dict]) -> list[dict]:
    """One row per workload (in our order): both sides' numbers, the notes joined."""
    theirs = {row["workload"]: row for row in torch}
    merged = []
    for row in ours:
        other = theirs.get(row["workload"], {})
        notes = [n for n in (other.get("note"), row.get("note")) if n]
        merged.append({**row, "torch": other.get("torch"), "note": "; ".join(notes)})
    return merged


def main():
    args = parse_args()
    if args.side == "ours":
        restart_with_huge_pages()  # as train.py and sample.py run
    if args.side:
        (suite,) = args.only
        peak, bandwidth = args.limits
        once = {"first": args.first_config} if suite in ONCE_PER_RUN else {}
        rows = SUITES[suite](bandwidth, peak, names=args.configs, reps=args.reps, side=args.side, **once)
        with open(args.rows_to, "w") as f:
            json.dump(rows, f)
        return

    command = "python -m bench " + " ".join(sys.argv[1:])
    peak, bandwidth = common.matmul_peak_flops(), common.memory_bandwidth()
    for suite in args.only:
        lines = header(suite, command, peak, bandwidth)
        print("\n".join(lines), flush=True)
        rows = []
        for config in args.configs:  # the two sides of a row minutes apart at most: this machine drifts
            ours, torch = (measure_side(side, suite, config, args.reps, peak, bandwidth, config == args.configs[0])
                           for side in ("ours", "torch"))
            rows += merge(ours, torch)
        for row in rows:
            torch, limit = row["torch"], row.get("limit")
            line = (f"| {row['workload']} | {row['ours']:.1f} {row['unit']} | "
                    + (f"{torch:.1f} {row['unit']} | {row['ours'] / torch:.2f}x | " if torch else "— | — | ")
                    + (f"{100 * limit:.0f}% | " if limit else "— | ") + f"{row['note']} |")
            print(line, flush=True)
            lines.append(line)
        if args.write:
            report.rewrite_section(os.path.join(common.REPO, "BENCHMARKS.md"), f"bench:{suite}", "\n".join(lines))


def header(suite: str, command: str, peak: float, bandwidth: float) -> list[str]:
    """The lines above a suite's table: the command, the machine, its measured limits, the columns."""
    label, package = BASELINES.get(suite, ("PyTorch (HF)", None))
    name = label.split(" ")[0]  # "PyTorch", "llama.cpp"
    versions = report.versions() + (f", {package} {importlib.metadata.version(package)}" if package else "")
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return [
        f"Command: `{command.strip()}` ({time.strftime('%Y-%m-%d')})",
        f"Machine: {report.machine_description()}; {versions}; "
        f"{'torch' if package is None else name} threads = XLA threads = {os.cpu_count()}; GLIBC_TUNABLES: ours "
        f"`{huge_page_tunables() or tunables}`, {name} `{tunables}`",
        f"Measured limits: float32 matmul peak {peak / 1e9:.0f} GFLOP/s; memory bandwidth {bandwidth / 1e9:.1f} GB/s",
        "",
        f"| workload | mistral_jax | {label} | ratio | of machine limit | notes |",
        "|---|---|---|---|---|---|",
    ]


if __name__ == "__main__":
    main()
