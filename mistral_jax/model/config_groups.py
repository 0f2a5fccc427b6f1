"""The parts of MistralConfig that only some models have, each a small frozen dataclass that
checks itself: a mixture of experts (`MoE`). And what every part of the config raises on a bad
value, `ConfigError`, with the checks they share.

A model without such a part has None in its place (`config.moe is None`: a dense feed-forward),
so a reader of the model code sees at once which kind of model a branch is for.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any


class ConfigError(ValueError):
    """A config file or value that cannot describe a Mistral model."""


def check_int(owner: Any, *names: str, low: int = 1) -> None:
    """Raises ConfigError for the first of these fields of owner that is not an int >= low."""
    for name in names:
        value = getattr(owner, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            kind = "a positive integer" if low == 1 else f"an integer >= {low}"
            raise ConfigError(f"{name} must be {kind}, got {value!r}")


def check_number(owner: Any, name: str, positive: bool = False) -> None:
    """Raises ConfigError unless the field is a finite number >= 0 (> 0 if positive)."""
    value = getattr(owner, name)
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
            or value < 0 or (positive and value == 0)):
        raise ConfigError(f"{name} must be a finite {'positive' if positive else 'non-negative'} number, "
                          f"got {value!r}")


def to_float(name: str, value: Any) -> float:
    """A number read from a file, as a float; ConfigError naming the field otherwise."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None


@dataclasses.dataclass(frozen=True)
class MoE:
    """A mixture of experts in place of every dense feed-forward (Mixtral): n_experts SwiGLU
    experts of the config's hidden_dim, each token routed to n_experts_per_tok of them
    (model/moe.py). params.json's "moe" block; HF's num_local_experts / num_experts_per_tok."""

    n_experts: int
    n_experts_per_tok: int
    router_aux_loss_coef: float = 0.0  # weight of the load-balancing loss in training (HF's name)

    def __post_init__(self):
        check_int(self, "n_experts")
        if (not isinstance(self.n_experts_per_tok, int) or isinstance(self.n_experts_per_tok, bool)
                or not 1 <= self.n_experts_per_tok <= self.n_experts):
            raise ConfigError(f"n_experts_per_tok must be between 1 and n_experts ({self.n_experts}), "
                              f"got {self.n_experts_per_tok!r}")
        check_number(self, "router_aux_loss_coef")
