"""The VQA answer normalisation (the VQA v2 evaluation script, as the EvalAI / TextVQA challenge
evaluator applies it to predictions and to the human answers alike).

In order: lower case; drop "," and "?"; split "'s" off as " 's"; newlines and tabs to spaces;
punctuation; number words to digits; articles dropped; apostrophe-less contractions restored.
The quirks of the official script are kept on purpose, since scores must match it:
- punctuation next to a space (or any punctuation in a text holding a digit-comma-digit) is
  deleted, other punctuation becomes a space; apostrophes, colons and periods are not in its list;
- a period is deleted unless a digit follows it ("3.5" stays, "end." loses it);
- only "none" and "zero".."ten" are number words; "I'd"-style contractions are never restored,
  because the official table writes them with a capital I and the text is lower case by then.
The official table's variant keys with misplaced apostrophes ("couldn'tve") are left out.
"""

from __future__ import annotations

import re

_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!"]
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# Each written form is restored from the same letters without apostrophes ("dont" -> "don't").
_CONTRACTED_FORMS = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he's how'd how'll how's ma'am mightn't mightn't've might've must've mustn't
needn't not've o'clock oughtn't shan't she'd she'd've she's should've shouldn't shouldn't've
somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's
something'd something'd've something'll that's there'd there'd've there're there's they'd
they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's
what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's
won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()
_CONTRACTIONS = {form.replace("'", ""): form for form in _CONTRACTED_FORMS}
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def _strip_punctuation(text: str) -> str:
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        next_to_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if next_to_space or delete_all else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _digits_articles_contractions(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalise_vqa_answer(text: str) -> str:
    """An answer as the VQA / TextVQA evaluator compares it: "The Two Dogs." -> "2 dogs"."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles_contractions(_strip_punctuation(text))
