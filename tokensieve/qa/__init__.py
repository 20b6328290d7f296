"""tokensieve's built-in procedural visual QA suite: seeded scenes on real photos, seven skills."""

from .dataset import DATA_VERSION, SPLIT_SEEDS, Example, example, examples
from .questions import CHANCE, QA, SKILLS
from .scoring import accuracy_by_skill, format_table, is_correct, normalise

__all__ = ["DATA_VERSION", "SPLIT_SEEDS", "Example", "example", "examples", "CHANCE", "QA", "SKILLS",
           "accuracy_by_skill", "format_table", "is_correct", "normalise"]
