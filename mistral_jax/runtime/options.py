"""Options dataclasses (hyperparameters, run and sampling options): their fields, and the error
a bad value raises, which the scripts report under the flag's name (cli.run)."""

from __future__ import annotations

import dataclasses


class OptionError(ValueError):
    """A bad value of one option: a field of an options dataclass."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


def option(default=dataclasses.MISSING, help: str = " ", **metadata):
    """A dataclass field with its help text (and e.g. choices=..., repeat=True), from which
    cli.add_options makes a flag; without a default, a required one."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def require_positive(options, *names: str) -> None:
    """Raises OptionError for the first of these int fields of options that is not positive."""
    for name in names:
        value = getattr(options, name)
        if not isinstance(value, int) or value < 1:
            raise OptionError(name, f"must be a positive integer, got {value!r}")


QUANTIZATIONS = ("int8", "int4")  # model/quantize.py's modes, named here for the flags of scripts JAX has not loaded


@dataclasses.dataclass(frozen=True, kw_only=True)  # keyword-only: options with required fields can derive from it
class Quantization:
    """The flags of a script that can quantize the model it loads (sample.py, serve.py): a base
    of their options, whose __post_init__ calls this one's."""

    quantize: str | None = option(None, "the layers' projections quantized as the checkpoint is read: int8 per "
                                        "output channel, int4 in groups of --quant-group inputs",
                                  choices=QUANTIZATIONS)
    quant_group: int | None = option(None, "inputs per quantization scale (default: int8 a whole channel, int4 128)")

    def __post_init__(self):
        if self.quant_group is not None:
            require_positive(self, "quant_group")
            if self.quantize is None:
                raise OptionError("quant_group", "needs --quantize")

