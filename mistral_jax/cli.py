"""What the command-line scripts share: one-line errors, a progress bar, quiet logs."""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
from collections.abc import Callable


def run(main: Callable[[], int | None]) -> None:
    """Runs a script's main(): any error is one line on stderr and exit status 1, never a
    traceback (set MISTRAL_JAX_DEBUG=1 to see it); Ctrl-C exits with 130."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if not os.environ.get("MISTRAL_JAX_DEBUG"):
        _quiet_library_threads()
    try:
        status = main() or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        status = 130
    except Exception as e:  # noqa: BLE001 - the one place that turns errors into a message
        if os.environ.get("MISTRAL_JAX_DEBUG"):
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, OSError) and e.filename and e.filename not in message:
            message = f"{message}: {e.filename}"
        print(f"error: {message}", file=sys.stderr)
        status = 1
    sys.exit(status)


def reexec_with_huge_pages() -> None:
    """Restarts this process (same pid, command line and environment) with glibc's malloc
    putting its large blocks on transparent huge pages (huge_page_tunables). Call it first,
    from a script's __main__.

    XLA:CPU allocates each large buffer fresh (logits, activations), and glibc maps every
    block over 32 MB fresh from the kernel, so each call faulted its outputs in 4 KB at a
    time: 129k faults for a [4096, 32000] float32 array, whose product ran at 107 GFLOP/s
    instead of 158 with 2 MB pages (1k faults)."""
    tunables = huge_page_tunables()
    if tunables is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, {**os.environ, "GLIBC_TUNABLES": tunables})


def huge_page_tunables() -> str | None:
    """GLIBC_TUNABLES with glibc.malloc.hugetlb=1 added; None where GLIBC_TUNABLES already
    says either way (glibc.malloc.hugetlb=0 keeps 4 KB pages) or the C library is not glibc."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables or platform.libc_ver()[0] != "glibc":
        return None
    return ":".join(filter(None, [tunables, "glibc.malloc.hugetlb=1"]))


def _quiet_library_threads() -> None:
    """Orbax's and tensorstore's worker threads log and print tracebacks of their own when a
    write fails; the main thread then raises the same error, which is what we report."""
    import threading

    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.FATAL)
    except ImportError:
        pass
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    threading.excepthook = lambda args: None
    sys.unraisablehook = lambda args: None


class Progress:
    """A progress bar on stderr: redrawn in place on a terminal, a line per 10% otherwise."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.done = total, label, 0
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self._last_decile = -1

    def update(self, item: str = "") -> None:
        self.done += 1
        fraction = self.done / max(self.total, 1)
        bar = "#" * int(30 * fraction)
        line = f"{self.label} [{bar:<30}] {self.done}/{self.total} {item}"
        if self.tty:
            print(f"\r\033[K{line}", end="" if self.done < self.total else "\n", file=sys.stderr, flush=True)
        elif int(10 * fraction) > self._last_decile:
            self._last_decile = int(10 * fraction)
            print(line, file=sys.stderr, flush=True)


class CompileClock:
    """Seconds JAX has spent tracing, lowering and compiling since this clock was made."""

    def __init__(self):
        import jax.monitoring

        self.seconds = 0.0

        def listen(event: str, seconds: float, **_):
            if event.startswith("/jax/core/compile/"):
                self.seconds += seconds

        jax.monitoring.register_event_duration_secs_listener(listen)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def human_count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def directory_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def rewrite_section(path: str, name: str, body: str) -> None:
    """Replaces what lies between `<!-- {name}:start -->` and `<!-- {name}:end -->` in the text
    file path with body, atomically (a temp file renamed over it): how the benchmark and
    ahead-of-time scripts keep their tables in BENCHMARKS.md and docs/SCALING.md current."""
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
