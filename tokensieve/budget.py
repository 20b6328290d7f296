"""How many visual tokens a sieve keeps: a count (``keep=64``) or a ratio (``keep=0.25``)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass


def parse_keep(text: str | int | float) -> int | float:
    """A budget as written on a command line: "64" -> 64 tokens, "0.25" -> a quarter of them.

    Whole numbers become counts, so "0" and "-1" fail as counts (with the count's message), not as ratios.
    """
    if isinstance(text, (int, float)):
        return text
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"a budget must be a token count (64) or a ratio (0.25), not {text!r}") from None
    return int(value) if value.is_integer() else value


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
        value = self.value
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
