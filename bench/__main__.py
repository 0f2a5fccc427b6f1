"""Runs the benchmarks side by side with the PyTorch baseline and prints one table.

  python -m bench [--only train decode] [--configs tiny small default] [--reps 3] [--write]

--write replaces the generated section of BENCHMARKS.md with this run's table.
"""

import argparse
import os
import re
import sys
import time

from bench import common, decode, train

SUITES = {"train": train.run, "decode": decode.run}
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=list(SUITES), default=list(SUITES))
    p.add_argument("--configs", nargs="+", choices=sorted(common.CONFIGS), default=["tiny", "small"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--write", action="store_true", help="rewrite the results section of BENCHMARKS.md")
    args = p.parse_args()

    command = "python -m bench " + " ".join(sys.argv[1:])
    peak, bandwidth = common.matmul_peak_flops(), common.memory_bandwidth()
    header = [
        f"Command: `{command.strip()}` ({time.strftime('%Y-%m-%d')})",
        f"Machine: {common.machine_description()}; {common.versions()}; "
        f"torch threads = XLA threads = {os.cpu_count()}",
        f"Measured limits: float32 matmul peak {peak / 1e9:.0f} GFLOP/s; memory bandwidth {bandwidth / 1e9:.1f} GB/s",
        "",
        "| workload | mistral_jax | PyTorch (HF) | ratio | of machine limit | notes |",
        "|---|---|---|---|---|---|",
    ]
    lines = list(header)
    print("\n".join(header), flush=True)
    for suite in args.only:
        for row in SUITES[suite](bandwidth, peak, names=args.configs, reps=args.reps):
            line = (f"| {row['workload']} | {row['ours']:.1f} {row['unit']} | {row['torch']:.1f} {row['unit']} | "
                    f"{row['ours'] / row['torch']:.2f}x | {100 * row['limit']:.0f}% | {row['note']} |")
            print(line, flush=True)
            lines.append(line)
    if args.write:
        path = os.path.join(common.REPO, "BENCHMARKS.md")
        text = open(path).read()
        section = f"{START}\n" + "\n".join(lines) + f"\n{END}"
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: section, text, flags=re.S)
        with open(path, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
