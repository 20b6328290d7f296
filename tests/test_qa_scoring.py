"""Exact-match scoring after normalisation, and the per-skill table."""

import pytest

from tokensieve.qa import CHANCE, accuracy_by_skill, format_table, is_correct, normalise


@pytest.mark.parametrize("prediction, answer", [
    ("Red.", "red"), ("  RED ", "red"), ("three", "3"), ("The 3", "3"), ("a circle", "circle"),
    ("Yes!", "yes"), ("gray", "grey"),
])
def test_equivalent_spellings_match(prediction, answer):
    assert is_correct(prediction, answer)


@pytest.mark.parametrize("prediction, answer", [
    ("red circle", "red"), ("reddish", "red"), ("4", "3"), ("no", "yes"), ("", "cat"), ("cats", "cat"),
])
def test_anything_else_does_not(prediction, answer):
    assert not is_correct(prediction, answer)


def test_normalise_keeps_words_in_order():
    assert normalise("Left, of the CUP.") == "left of cup"


def test_table_per_skill_and_overall():
    records = [("colour", True), ("colour", False), ("existence", True), ("existence", True)]
    table = accuracy_by_skill(records)
    assert table["colour"] == {"n": 2, "accuracy": 0.5, "chance": CHANCE["colour"]}
    assert table["existence"]["accuracy"] == 1.0
    assert table["overall"]["n"] == 4 and table["overall"]["accuracy"] == 0.75
    assert table["overall"]["chance"] == pytest.approx((2 * CHANCE["colour"] + 2 * CHANCE["existence"]) / 4)
    text = format_table(table)
    assert text.splitlines()[0] == "| skill | n | accuracy | chance |"
    assert "| colour | 2 | 0.500 | 0.167 |" in text


def test_empty_records_are_refused():
    with pytest.raises(ValueError, match="no records"):
        accuracy_by_skill([])
