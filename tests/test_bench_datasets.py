"""Standard-benchmark loaders read fixtures in each benchmark's real parquet layout; the official
scorers give hand-computed numbers (fixtures: tests/fixtures/bench/make_fixtures.py)."""

from pathlib import Path

import pytest
from PIL import Image

from tokensieve.bench.datasets import BENCHMARKS, benchmark, gqa, mmbench, mme, pope, scienceqa, textvqa
from tokensieve.bench.datasets.common import BenchmarkDataMissing
from tokensieve.bench.datasets.options import option_letter
from tokensieve.bench.datasets.vqa_normalise import normalise_vqa_answer

FIXTURES = Path(__file__).parent / "fixtures" / "bench"


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(BenchmarkDataMissing, match="`hf download lmms-lab/POPE --repo-type dataset --local-dir DIR`"):
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


@pytest.mark.parametrize("raw, normalised", [
    ("The Two Dogs.", "2 dogs"),        # case, article, number word, final period
    ("Coca-Cola", "coca cola"),         # a hyphen inside a word becomes a space
    ("coca - cola", "coca cola"),       # punctuation next to a space is deleted
    ("1,000", "1000"),                  # commas are dropped first
    ("3.5", "3.5"),                     # a period before a digit stays
    ("dont", "don't"),                  # contractions restored
    ("man's hat", "man 's hat"),        # 's split off as the EvalAI tokeniser does
    ("none", "0"),
])
def test_vqa_normalisation(raw, normalised):
    assert normalise_vqa_answer(raw) == normalised


def test_textvqa_loads_and_scores_vqa_accuracy():
    samples = textvqa.load(FIXTURES / "textvqa")
    assert [len(s.answers) for s in samples] == [10, 10, 10]
    assert samples[0].question.endswith("soda?\nAnswer the question using a single word or phrase.")
    with_ocr = textvqa.load(FIXTURES / "textvqa", with_ocr=True)[0].question
    assert "\nReference OCR token: coca, cola\n" in with_ocr
    # 4 humans said "coca cola" once normalised -> 1; "two" and "2" are one answer said by 2 -> 0.6
    result = textvqa.score(samples, ["COCA-COLA", "Two.", "stops"])
    assert result["per_sample"] == pytest.approx([1.0, 0.6, 0.0])
    assert result["accuracy"] == pytest.approx(1.6 / 3)


@pytest.mark.parametrize("humans_agreeing, accuracy", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0)])
def test_vqa_accuracy_leaves_one_human_out(humans_agreeing, accuracy):
    humans = ["red"] * humans_agreeing + ["blue"] * (10 - humans_agreeing)
    assert textvqa.vqa_accuracy("Red", humans) == pytest.approx(accuracy)


def test_gqa_joins_images_and_scores_exact_match():
    samples = gqa.load(FIXTURES / "gqa")
    assert [s.meta["image_id"] for s in samples] == ["n161313", "n161313", "n235859"]
    assert samples[0].image.getpixel((0, 0)) == (0, 0, 0)
    assert samples[2].image.getpixel((0, 0)) == (0, 0, 90)
    assert samples[1].category == "query"
    # case and punctuation are ignored, articles are not
    result = gqa.score(samples, ["No.", "The girl", "LEFT"])
    assert result["per_sample"] == [1.0, 0.0, 1.0]
    assert result["by_category"] == {"choose": 1.0, "query": 0.0, "verify": 1.0}


def test_gqa_needs_both_configurations(tmp_path):
    (tmp_path / "testdev_balanced_instructions").mkdir()
    with pytest.raises(BenchmarkDataMissing, match="lmms-lab/GQA"):
        gqa.load(tmp_path)


@pytest.mark.parametrize("reply, reading", [
    ("Yes.", "yes"), ("n", "no"), ("Nope", "no"), ("Not sure", "no"),  # "no" in the first 4 chars
    ("The answer is yes", "other"),                                    # only the first 4 chars count
])
def test_mme_reads_replies_as_its_calculation_script_does(reply, reading):
    assert mme.yes_no_other(reply) == reading


def test_mme_scores_acc_plus_per_image():
    samples = mme.load(FIXTURES / "mme")
    assert samples[0].question == ("Is there a train in this image?\n"
                                   "Answer the question using a single word or phrase.")
    assert samples[0].answers == ["yes"] and samples[0].meta["image_key"] == "existence/000000006040.jpg"
    replies = ["Yes.", "no",                          # existence image 1: both right
               "Yes", "Yes, there is a cat.",         # existence image 2: one right
               "Yes, it is", "I think not"]           # code_reasoning: one right ("other" is wrong)
    result = mme.score(samples, replies)
    existence, code = result["by_category"]["existence"], result["by_category"]["code_reasoning"]
    assert (existence["acc"], existence["acc_plus"]) == (0.75, 0.5)
    assert existence["score"] == pytest.approx(125.0)
    assert (code["acc"], code["acc_plus"], code["score"]) == (0.5, 0.0, 50.0)
    assert (result["perception"], result["cognition"], result["total"]) == pytest.approx((125, 50, 175))
    assert result["per_sample"] == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("reply, letter", [
    ("B", "B"), ("B.", "B"), ("(C) bird", "C"), ("The answer is A.", "A"), ("Answer: c", "C"),
    ("I pick C", "C"),        # "I" is not an option letter of a 3-option question
    ("It is a cat", "B"),     # no letter: the one option text named
    ("dog or cat", None),     # two option texts: nothing read
    ("D", None),              # not an option of this question
])
def test_option_letter(reply, letter):
    assert option_letter(reply, ["dog", "cat", "bird"]) == letter


def test_scienceqa_img_keeps_image_questions_and_scores_letters():
    samples = scienceqa.load(FIXTURES / "scienceqa")
    assert len(samples) == 3  # the text-only question is not part of ScienceQA-IMG
    assert samples[0].question == ("Context: Otters live near water.\n"
                                   "Which animal's feet are also adapted for swimming?\nA. otter\nB. gecko\n"
                                   "Answer with the option's letter from the given choices directly.")
    assert samples[1].question.startswith("Which of these states")  # no hint, no "Context:"
    assert [s.answers for s in samples] == [["A"], ["B"], ["B"]]
    result = scienceqa.score(samples, ["A", "The answer is C.", "(B) yellow"])
    assert result["per_sample"] == [1.0, 0.0, 1.0]
    assert result["by_category"] == {"natural science": 1.0, "social science": 0.0}
    assert len(scienceqa.load(FIXTURES / "scienceqa", limit=1)) == 1


def test_scienceqa_reads_only_the_img_folder_of_lmms_lab_layout(tmp_path):
    fixture = (FIXTURES / "scienceqa" / "data" / "test-00000-of-00001.parquet").read_bytes()
    for folder in ("ScienceQA-IMG", "ScienceQA-FULL"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "test-00000-of-00001.parquet").write_bytes(fixture)
    assert len(scienceqa.load(tmp_path)) == 3  # not 6


def test_mmbench_circular_evaluation():
    samples = mmbench.load(FIXTURES / "mmbench")
    assert [s.meta["circular_group"] for s in samples] == [241, 241, 7, 7]
    assert samples[2].question == ("The image shows a street.\nIs it outdoors?\nA. yes\nB. no\n"
                                   "Answer with the option's letter from the given choices directly.")
    assert samples[2].meta["options"] == ["yes", "no"]  # empty options C and D are left out
    assert samples[0].meta["l2_category"] == "attribute_reasoning"
    # question 241 right in both orders; question 7 right once ("no" names option A of the rotated copy)
    result = mmbench.score(samples, ["C", "B. blue", "A", "no"])
    assert result["accuracy"] == 0.75
    assert (result["questions"], result["circular_accuracy"]) == (2, 0.5)
    assert result["by_category"] == {"color_attribute": 1.0, "image_scene": 0.0}


FIXTURE_FOLDERS = {"pope": "pope", "gqa": "gqa", "textvqa": "textvqa", "mme": "mme",
                   "scienceqa_img": "scienceqa", "mmbench": "mmbench"}


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_every_benchmark_scores_its_own_answers_perfectly(name):
    module, headline = benchmark(name)
    samples = module.load(FIXTURES / FIXTURE_FOLDERS[name])
    # the most common reference answer (TextVQA's first human answer may be a minority one)
    result = module.score(samples, [max(s.answers, key=s.answers.count) for s in samples])
    assert result["per_sample"] == [1.0] * len(samples)
    perfect = {"total": 200.0 * len({s.category for s in samples})}.get(headline, 1.0)
    assert result[headline] == pytest.approx(perfect)
    with pytest.raises(ValueError, match="predictions"):
        module.score(samples, [])


def test_unknown_benchmark_is_refused():
    with pytest.raises(ValueError, match="known: pope"):
        benchmark("vqav2")
