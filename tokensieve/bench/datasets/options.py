"""Multiple-choice prompts and option-letter extraction, shared by ScienceQA and MMBench.

The prompt is LLaVA's (and lmms-eval's default): the question, one "A. text" line per option, then
"Answer with the option's letter from the given choices directly."

Extraction follows the rule-based matcher that MMBench's evaluator (VLMEvalKit) runs before it
falls back to asking GPT, and that also covers LLaVA's ScienceQA parsing ("A", "A.", "(A) ..."):
1. the reply starts with an option letter followed by ".", ")", ":" or nothing ("B", "(B) cat");
2. else the reply says "answer is X" / "answer: X";
3. else exactly one option letter stands alone as a capital letter in the reply;
4. else exactly one option's text appears in the reply.
Otherwise no option is read and the reply counts as wrong (no GPT fallback here).
"""

from __future__ import annotations

import re

from .common import LETTER_ANSWER_PROMPT

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LEADING_LETTER = re.compile(r"^\(?([A-Z])(?:[.):]|\s*$)")
_ANSWER_IS = re.compile(r"answer(?: is|:)\s*\(?([A-Z])\b", re.IGNORECASE)


def multiple_choice_prompt(question: str, options: list[str]) -> str:
    """The question, its options as "A. text" lines, and the answer-with-a-letter instruction."""
    lines = [f"{LETTERS[i]}. {text}" for i, text in enumerate(options)]
    return "\n".join([question, *lines, LETTER_ANSWER_PROMPT])


def option_letter(reply: str, options: list[str]) -> str | None:
    """The option letter a reply chooses, or None when it names none or several."""
    valid = LETTERS[:len(options)]
    reply = reply.strip()
    for pattern in (_LEADING_LETTER, _ANSWER_IS):
        found = pattern.search(reply) if pattern is _ANSWER_IS else pattern.match(reply)
        if found and found.group(1).upper() in valid:
            return found.group(1).upper()
    standalone = {token for token in re.split(r"[^A-Za-z]+", reply) if len(token) == 1 and token in valid}
    if len(standalone) == 1:
        return standalone.pop()
    named = {LETTERS[i] for i, text in enumerate(options)
             if text.strip() and text.strip().lower() in reply.lower()}
    return named.pop() if len(named) == 1 else None
