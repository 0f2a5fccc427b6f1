"""What the command-line scripts share: flags made from options dataclasses, one-line errors,
human-readable sizes, the compile clock."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import threading
import warnings
import types
import typing
from collections.abc import Callable

from mistral_jax.runtime.options import OptionError


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """The script's docstring as written, and each flag's default after its help (unless the
    help already says it, or there is none to say)."""

    def _get_help_string(self, action):
        default = action.default
        if "default" in (action.help or "") or default is None or default is False or default in ("", ()):
            return action.help
        shown = " ".join(default) if isinstance(default, tuple) else default
        return f"{action.help} (default: {shown})"


def parser(description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=description, formatter_class=_Formatter)


def add_options(p: argparse.ArgumentParser, options_class: type) -> None:
    """A flag per field of a dataclass (--batch-size for batch_size): its default, type and
    help from the field (metadata "help" and "choices"; "repeat" makes a tuple field a flag
    given once per item rather than once with every item). A field without a default is a
    required flag."""
    group = p.add_argument_group(options_class.__name__, (options_class.__doc__ or "").split("\n")[0])
    hints = typing.get_type_hints(options_class)
    for field in dataclasses.fields(options_class):
        kind = hints[field.name]
        if isinstance(kind, types.UnionType):  # X | None: an optional flag of type X
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        flag = "--" + field.name.replace("_", "-")
        common = dict(dest=field.name, help=field.metadata.get("help", " "))
        if field.default is dataclasses.MISSING:
            common["required"] = True
        else:
            common["default"] = field.default
        if kind is bool:
            group.add_argument(flag, action="store_true", **common)
        elif typing.get_origin(kind) is tuple and field.metadata.get("repeat"):
            group.add_argument(flag, action="append", type=typing.get_args(kind)[0], **{**common, "default": None})
        elif typing.get_origin(kind) is tuple:
            group.add_argument(flag, nargs="+", type=typing.get_args(kind)[0], **common)
        else:
            group.add_argument(flag, type=kind, choices=field.metadata.get("choices"), **common)


def options(options_class: type, args: argparse.Namespace):
    """The dataclass of add_options' flags (a bad value raises OptionError, which run()
    reports under the flag's name)."""
    values = {}
    for field in dataclasses.fields(options_class):
        value = getattr(args, field.name)
        if value is None and field.metadata.get("repeat"):
            value = field.default
        values[field.name] = tuple(value) if isinstance(value, list) else value
    return options_class(**values)


def run(main: Callable[[], int | None]) -> None:
    """Runs a script's main(): any error is one line on stderr and exit status 1, never a
    traceback (set MISTRAL_JAX_DEBUG=1 to see it), a bad option named by its flag; Ctrl-C
    exits with 130."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if not os.environ.get("MISTRAL_JAX_DEBUG"):
        _quiet_library_threads()
    threads_before = set(threading.enumerate())
    try:
        status = main() or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        status = 130
    except Exception as e:  # noqa: BLE001 - the one place that turns errors into a message
        if os.environ.get("MISTRAL_JAX_DEBUG"):
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, OptionError):
            message = f"--{e.field.replace('_', '-')} {e.problem}"
        if isinstance(e, OSError) and e.filename and e.filename not in message:
            message = f"{message}: {e.filename}"
        print(f"error: {message}", file=sys.stderr)
        status = 1
        # A failed orbax write abandons its coroutines; Python warns of each as the process
        # ends, after the error line, which must stay the last (seen under load, issue 15).
        warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
        lingering = [t for t in threading.enumerate() if t not in threads_before and t.is_alive() and not t.daemon]
        if lingering:
            # A failed write leaves orbax's save threads waiting for a signal that never
            # comes, and the interpreter would wait for them forever: a job that never ends
            # and never frees its slice. The error is said; end the process.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    sys.exit(status)


def _quiet_library_threads() -> None:
    """Orbax's and tensorstore's worker threads log and print tracebacks of their own when a
    write fails; the main thread then raises the same error, which is what we report."""
    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.FATAL)
    except ImportError:
        pass
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    threading.excepthook = lambda args: None
    sys.unraisablehook = lambda args: None


class CompileClock:
    """Seconds JAX has spent tracing, lowering and compiling since this clock was made."""

    def __init__(self):
        import jax.monitoring  # here, not at the top: scripts import this module before JAX loads

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
