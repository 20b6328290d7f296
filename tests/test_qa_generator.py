"""The procedural QA suite: deterministic, split-separated, balanced, and its answers are true of the scene."""

from collections import Counter

import numpy as np
import pytest

from tokensieve.qa import CHANCE, SKILLS, SPLIT_SEEDS, example, examples
from tokensieve.qa.scenes import COLOURS, SHAPES, WORDS


def test_same_index_gives_the_same_image_and_questions():
    a, b = example("train", 17, questions=4), example("train", 17, questions=4)
    assert a.qas == b.qas
    assert np.array_equal(np.asarray(a.image()), np.asarray(b.image()))


def test_splits_draw_different_scenes():
    images = {split: np.asarray(example(split, 3).image()) for split in SPLIT_SEEDS}
    assert not np.array_equal(images["train"], images["test"])
    assert not np.array_equal(images["validation"], images["test"])
    assert len(set(SPLIT_SEEDS.values())) == 3


def test_each_example_leads_with_its_own_skill_in_rotation():
    exs = examples("validation", 21, questions=3)
    assert [ex.skill for ex in exs] == list(SKILLS) * 3
    assert all(1 <= len(ex.qas) <= 3 for ex in exs)
    assert all(len({qa.skill for qa in ex.qas}) == len(ex.qas) for ex in exs)


def test_image_renders_at_224_and_448_with_the_same_layout():
    ex = example("test", 5)
    small, large = ex.image(224), ex.image(448)
    assert small.size == (224, 224) and large.size == (448, 448)
    # Downsampling the 448 px render gives (nearly) the 224 px one: same background crop, same shapes.
    diff = np.abs(np.asarray(large.resize((224, 224))).astype(int) - np.asarray(small).astype(int))
    assert diff.mean() < 20


def test_answers_are_true_of_the_scene():
    for ex in examples("train", 140, questions=7):
        scene = ex.scene
        for qa in ex.qas:
            assert len(qa.answer.split()) == 1
            if qa.skill == "colour":
                shape = qa.question.removeprefix("What colour is the ").removesuffix("?")
                (match,) = [s for s in scene.shapes if s.shape == shape]
                assert qa.answer == match.colour
            elif qa.skill == "shape":
                colour = qa.question.split()[4]
                (match,) = [s for s in scene.shapes if s.colour == colour]
                assert qa.answer == match.shape and qa.answer in SHAPES
            elif qa.skill == "counting":
                assert not scene.small and qa.answer == str(len(scene.shapes)) and 1 <= int(qa.answer) <= 6
            elif qa.skill == "existence":
                colour, shape = qa.question.removeprefix("Is there a ").removesuffix("?").split()
                present = any(s.colour == colour and s.shape == shape for s in scene.shapes)
                assert qa.answer == ("yes" if present else "no")
            elif qa.skill == "small":
                (small,) = scene.small
                assert qa.answer == small.colour and small.r < min(s.r for s in scene.large)
            elif qa.skill == "reading":
                assert qa.answer == scene.word.text and qa.answer in WORDS
            elif qa.skill == "position":
                names = {s.name: s for s in scene.large}
                a, b = _two_shapes(qa.question, names)
                if qa.answer in ("left", "right"):
                    assert (a.x < b.x) == (qa.answer == "left")
                else:
                    assert (a.y < b.y) == (qa.answer == "above")


def _two_shapes(question, names):
    found = sorted((question.index(name), shape) for name, shape in names.items() if f"the {name}" in question)
    assert len(found) == 2, question
    return found[0][1], found[1][1]


def test_existence_is_half_no_and_answer_sets_match_chance_levels():
    exs = examples("train", 7 * 60)
    by_skill = {skill: Counter(ex.qas[0].answer for ex in exs if ex.skill == skill) for skill in SKILLS}
    no_share = by_skill["existence"]["no"] / sum(by_skill["existence"].values())
    assert 0.35 <= no_share <= 0.65
    assert set(by_skill["colour"]) <= set(COLOURS) and set(by_skill["small"]) <= set(COLOURS)
    assert set(by_skill["counting"]) <= {str(n) for n in range(1, 7)}
    assert set(by_skill["position"]) <= {"left", "right", "above", "below"}
    assert CHANCE["colour"] == 1 / len(COLOURS) and CHANCE["reading"] == 1 / len(WORDS)
    assert set(CHANCE) == set(SKILLS)


def test_bad_split_or_index_is_refused():
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        example("dev", 0)
    with pytest.raises(ValueError, match=">= 0"):
        example("train", -1)
