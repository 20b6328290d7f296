"""Standard-benchmark loaders read fixtures in each benchmark's real parquet layout; the official
scorers give hand-computed numbers (fixtures: tests/fixtures/bench/make_fixtures.py)."""

from pathlib import Path

import pytest
from PIL import Image

from tokensieve.bench.datasets import pope
from tokensieve.bench.datasets.common import BenchmarkDataMissing

FIXTURES = Path(__file__).parent / "fixtures" / "bench"


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(BenchmarkDataMissing, match="huggingface-cli download lmms-lab/POPE --repo-type dataset"):
        pope.load(tmp_path)
    with pytest.raises(BenchmarkDataMissing, match="--data"):
        pope.load(None)


def test_pope_loads_the_hf_layout():
    samples = pope.load(FIXTURES / "pope")
    assert len(samples) == 5
    first = samples[0]
    assert isinstance(first.image, Image.Image) and first.image.size == (8, 8)
    assert first.question == ("Is there a dog in the image?\n"
                              "Answer the question using a single word or phrase.")
    assert (first.id, first.answers, first.category) == ("1", ["yes"], "adversarial")
    assert len(pope.load(FIXTURES / "pope" / "data" / "test-00000-of-00001.parquet", limit=2)) == 2


def test_pope_reads_replies_as_the_pope_repo_does():
    assert pope.yes_or_no("Yes, there is a dog.") == "yes"
    assert pope.yes_or_no("No.") == "no"
    assert pope.yes_or_no("There is not a car. No doubt.") == "no"
    assert pope.yes_or_no("Yes. No other animals.") == "yes"  # only the first sentence counts


def test_pope_scores_precision_recall_f1():
    samples = pope.load(FIXTURES / "pope")
    # truths: yes, no, yes, no, no -> TP, TN, FN, FP, FP
    result = pope.score(samples, ["Yes, there is a dog.", "No", "There is not a car.", "Yes", "yes"])
    assert result["accuracy"] == pytest.approx(2 / 5)
    assert result["precision"] == pytest.approx(1 / 3)
    assert result["recall"] == pytest.approx(1 / 2)
    assert result["f1"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))  # 0.4
    assert result["yes_ratio"] == pytest.approx(3 / 5)
    assert result["per_sample"] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert result["by_category"]["adversarial"]["f1"] == 1.0
    assert result["by_category"]["popular"]["precision"] == 0.0  # no true positives: 0, not NaN
