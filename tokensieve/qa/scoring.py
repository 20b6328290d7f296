"""Exact-match scoring after normalisation, and per-skill accuracy tables."""

from __future__ import annotations

import re
from collections import defaultdict

from .questions import CHANCE

_NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_SPELLINGS = {"color": "colour", "gray": "grey"}
_ARTICLES = {"a", "an", "the"}


def normalise(text: str) -> str:
    """Lower case, no punctuation or articles, number words as digits: "The Three." -> "3"."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    words = [_NUMBER_WORDS.get(w, _SPELLINGS.get(w, w)) for w in words if w not in _ARTICLES]
    return " ".join(words)


def is_correct(prediction: str, answer: str) -> bool:
    return normalise(prediction) == normalise(answer)


def accuracy_by_skill(records: list[tuple[str, bool]],
                      chance: dict[str, float] = CHANCE) -> dict[str, dict[str, float]]:
    """{skill: {"n", "accuracy", "chance"}} plus an "overall" row, from (skill, correct) pairs.

    `chance` gives each skill's chance level and order: the image suite's CHANCE, or the video suite's VIDEO_CHANCE.
    """
    if not records:
        raise ValueError("no records to score")
    by_skill: dict[str, list[bool]] = defaultdict(list)
    for skill, correct in records:
        by_skill[skill].append(correct)
    unknown = set(by_skill) - set(chance)
    if unknown:
        raise ValueError(f"no chance level for skills {sorted(unknown)}; pass the suite's chance table")
    table = {skill: {"n": len(v), "accuracy": sum(v) / len(v), "chance": chance[skill]}
             for skill, v in sorted(by_skill.items(), key=lambda kv: list(chance).index(kv[0]))}
    # Overall chance: the mean over questions, since skills may be unequally represented.
    table["overall"] = {"n": len(records), "accuracy": sum(c for _, c in records) / len(records),
                        "chance": sum(chance[s] for s, _ in records) / len(records)}
    return table


def format_table(table: dict[str, dict[str, float]]) -> str:
    """The table as Markdown."""
    lines = ["| skill | n | accuracy | chance |", "|---|---|---|---|"]
    for skill, row in table.items():
        lines.append(f"| {skill} | {row['n']} | {row['accuracy']:.3f} | {row['chance']:.3f} |")
    return "\n".join(lines)
