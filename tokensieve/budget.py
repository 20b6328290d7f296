"""How many visual tokens a sieve keeps: a count (``keep=64``) or a ratio (``keep=0.25``)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass


def parse_keep(text: str | int | float) -> int | float:
    """A budget as written on a command line, read as Python reads the same literal: "64" -> 64 tokens,
    "0.25" and "1.0" -> ratios (a quarter, all of them), "1e2" -> the ratio 100.0, which is refused.

    So "0" and "-1" fail as counts (with the count's message) and "1.5" as a ratio, as ``keep=1.5`` does.
    """
    if not isinstance(text, str):
        return text
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"a budget must be a token count (64) or a ratio (0.25), not {text!r}") from None


def plain_number(value):
    """``value`` as a Python int or float when it is a numpy scalar or a 0-d tensor (``numpy.int64(64)``,
    ``torch.tensor(0.25)``); anything else unchanged."""
    if not isinstance(value, (bool, int, float)) and getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return value.item()
    return value


class BudgetClampedWarning(UserWarning):
    """A count budget asked for more tokens than an image has; every token was kept."""


@dataclass(frozen=True)
class Budget:
    """A validated token budget.

    An ``int`` is a count of tokens per image; a ``float`` in (0, 1] is a fraction of each image's
    tokens (rounded, at least 1). A count above an image's token count is clamped to it with a
    :class:`BudgetClampedWarning`, because images of one batch or one benchmark can differ in size
    (anyres crops, dynamic resolution); every other bad value raises at construction, before any
    model is touched.
    """

    value: int | float

    def __post_init__(self) -> None:
        value = plain_number(self.value)
        object.__setattr__(self, "value", value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(
                f"keep must be an int (a token count, e.g. keep=64) or a float ratio in (0, 1] "
                f"(e.g. keep=0.25), not {type(value).__name__} {value!r}"
            )
        if isinstance(value, int) and value < 1:
            raise ValueError(f"keep={value} keeps no token: pass a count of at least 1, e.g. keep=64")
        if isinstance(value, float) and not 0.0 < value <= 1.0:
            raise ValueError(
                f"keep={value} is not a ratio in (0, 1]: pass e.g. keep=0.25 for a quarter of the "
                f"tokens, or an int for a count"
            )

    def resolve(self, n_tokens: int) -> int:
        """The number of tokens to keep out of ``n_tokens``."""
        if isinstance(self.value, float):
            return max(1, min(n_tokens, round(self.value * n_tokens)))
        if self.value > n_tokens:
            warnings.warn(
                f"keep={self.value} is more than the {n_tokens} visual tokens of this image: keeping "
                f"all {n_tokens}. Pass a smaller count or a ratio (e.g. keep=0.25) to reduce it.",
                BudgetClampedWarning,
                stacklevel=3,
            )
            return n_tokens
        return self.value

    def __str__(self) -> str:
        return str(self.value)
