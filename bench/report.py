"""Writing results into the Markdown files that keep them (BENCHMARKS.md, docs/SCALING.md):
generated sections, and the machine and versions each table was measured with."""

from __future__ import annotations

import os
import platform


def rewrite_section(path: str, name: str, body: str) -> None:
    """Replaces what lies between `<!-- {name}:start -->` and `<!-- {name}:end -->` in the text
    file path with body, atomically (a temp file renamed over it)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    with open(path) as f:
        text = f.read()
    if start not in text or end not in text:
        raise ValueError(f"{path} has no {start} ... {end} section to rewrite")
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    with open(path + ".tmp", "w") as f:
        f.write(f"{before}{start}\n{body}\n{end}{after}")
    os.replace(path + ".tmp", path)


def machine_description() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}"


def versions() -> str:
    import jax
    import torch
    import transformers

    return f"jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}"
