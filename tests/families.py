"""Every model family the contract tests run on: one tiny model each (see tiny_*.py)."""

from tiny_models import LLAVA

FAMILIES = [
    LLAVA,
]
