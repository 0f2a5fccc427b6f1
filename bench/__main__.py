"""Runs the benchmarks side by side with the PyTorch baseline and prints one table.

  python -m bench [--only train decode scaling] [--configs tiny small default] [--reps 3] [--write]

--write replaces, for each suite run, its generated section of BENCHMARKS.md with this run's
table (the command, machine and measured limits included).
"""

import argparse
import os
import sys
import time

from bench import common, decode, scaling, train
from mistral_jax.cli import reexec_with_huge_pages, rewrite_section

SUITES = {"train": train.run, "decode": decode.run, "scaling": scaling.run}


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
        f"torch threads = XLA threads = {os.cpu_count()}; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')}",
        f"Measured limits: float32 matmul peak {peak / 1e9:.0f} GFLOP/s; memory bandwidth {bandwidth / 1e9:.1f} GB/s",
        "",
        "| workload | mistral_jax | PyTorch (HF) | ratio | of machine limit | notes |",
        "|---|---|---|---|---|---|",
    ]
    print("\n".join(header), flush=True)
    for suite in args.only:
        lines = list(header)
        for row in SUITES[suite](bandwidth, peak, names=args.configs, reps=args.reps):
            torch, limit = row["torch"], row["limit"]
            line = (f"| {row['workload']} | {row['ours']:.1f} {row['unit']} | "
                    + (f"{torch:.1f} {row['unit']} | {row['ours'] / torch:.2f}x | " if torch else "— | — | ")
                    + (f"{100 * limit:.0f}% | " if limit else "— | ") + f"{row['note']} |")
            print(line, flush=True)
            lines.append(line)
        if args.write:
            rewrite_section(os.path.join(common.REPO, "BENCHMARKS.md"), f"bench:{suite}", "\n".join(lines))


if __name__ == "__main__":
    reexec_with_huge_pages()  # for both sides: PyTorch's CPU allocator is glibc's malloc too
    main()
