"""The lmms-eval bridge: lmms-eval's own evaluator runs a task with a tokensieve method applied.

The task is lmms-eval's MME (its prompt, scorer and aggregation) on six local questions
(tests/fixtures/lmms_eval); the model is sieve-mini loaded by lmms-eval's own `llava_hf` class.
"""

from pathlib import Path

import pytest
from lmms_eval.evaluator import simple_evaluate
from lmms_eval.models import get_model
from lmms_eval.tasks import TaskManager
from PIL import Image
from transformers import AutoProcessor

from tokensieve.bench.lmms_eval import Tokensieve, TokensieveChat
from tokensieve.mini import SAMPLE_IMAGE, SAMPLE_QUESTION
from tokensieve.mini.build import model_dir

FIXTURES = Path(__file__).parent / "fixtures" / "lmms_eval"
TASK = "mme_fixture"
QUESTIONS = 6
SIEVE_MINI_TOKENS = 256  # 16x16 patches at 224 px
ON_CPU = "device=cpu,device_map=cpu"  # lmms-eval's llava_hf defaults to cuda


def evaluate(model_name: str, model_args: str, force_simple: bool = False):
    """Build the model as lmms-eval's evaluator does (registry, then the arg string), run the task."""
    lm = get_model(model_name, force_simple).create_from_arg_string(model_args, {"batch_size": 1})
    task_manager = TaskManager("WARNING", include_path=str(FIXTURES), model_name=model_name)
    results = simple_evaluate(model=lm, tasks=[TASK], task_manager=task_manager, batch_size=1, log_samples=True)
    answers = [sample["filtered_resps"][0] for sample in sorted(results["samples"][TASK], key=lambda s: s["doc_id"])]
    return lm, results, answers


@pytest.fixture(scope="module")
def sieve_mini_path() -> str:
    return str(model_dir())


def test_task_runs_with_the_method_applied_to_every_image():
    lm, results, answers = evaluate("tokensieve", f"pretrained=sieve-mini,method=fastervlm,keep=16,{ON_CPU}")

    assert type(lm) is TokensieveChat and not lm.is_simple  # the entry point, llava_hf's chat class
    score = results["results"][TASK]["mme_perception_score,none"]
    assert 0 <= score <= 3 * 200  # MME's acc + acc+ summed over the fixture's three categories
    assert len(answers) == QUESTIONS and all(isinstance(a, str) for a in answers)
    [stats] = lm.run_stats  # one generate_until batch
    assert [(image.before, image.after) for image in stats.images] == [(SIEVE_MINI_TOKENS, 16)] * QUESTIONS
    assert stats.prefill_flops < stats.prefill_flops_unreduced


def test_keeping_every_token_answers_as_the_stock_model(sieve_mini_path):
    # --force_simple: the simple classes, so both request kinds of lmms-eval go through the bridge
    lm, _, kept_all = evaluate(
        "tokensieve", f"model=llava_hf,pretrained=sieve-mini,method=divprune,keep=1.0,{ON_CPU}", force_simple=True
    )
    _, _, stock = evaluate("llava_hf", f"pretrained={sieve_mini_path},{ON_CPU}", force_simple=True)

    assert type(lm) is Tokensieve and lm.is_simple
    assert [(image.before, image.after) for image in lm.run_stats[0].images] == [(SIEVE_MINI_TOKENS,) * 2] * QUESTIONS
    assert kept_all == stock and any(answer.strip() for answer in stock)


def test_method_none_observes_the_stock_model_and_records_it(sieve_mini_path):
    # the baseline of a task through the bridge: ts.observe, so run_stats has what a method's run has
    lm, _, observed = evaluate("tokensieve", f"pretrained=sieve-mini,method=none,{ON_CPU}", force_simple=True)
    _, _, stock = evaluate("llava_hf", f"pretrained={sieve_mini_path},{ON_CPU}", force_simple=True)

    assert lm.sieve is None and observed == stock
    [stats] = lm.run_stats
    assert [(image.before, image.after) for image in stats.images] == [(SIEVE_MINI_TOKENS,) * 2] * QUESTIONS
    assert stats.prefill_flops == stats.prefill_flops_unreduced > 0 and stats.kv_bytes > 0
    # nothing is dropped, so loglikelihood requests (scored against labels that cover every token) go to the
    # wrapped model too. (llava_hf's own loglikelihood cannot tokenize sieve-mini's context without its image,
    # so a stand-in scores the way it does: one forward with labels.) A new model: the evaluator let go of the first.
    lm = get_model("tokensieve").create_from_arg_string(f"pretrained={sieve_mini_path},method=none,{ON_CPU}")
    processor = AutoProcessor.from_pretrained(sieve_mini_path)
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": SAMPLE_QUESTION}]}],
                                           add_generation_prompt=True) + "green"
    inputs = processor(images=Image.open(SAMPLE_IMAGE), text=prompt, return_tensors="pt")

    def score(requests):
        return [float(lm.hf_model(**inputs, labels=inputs["input_ids"]).loss) for _ in requests]

    lm.inner.loglikelihood = score
    assert lm.loglikelihood(["a request"]) == score(["a request"])
    [stats] = lm.run_stats
    assert stats.calls == 1 and stats.tokens_before == stats.tokens_after == SIEVE_MINI_TOKENS
    with pytest.raises(ValueError, match="applies no method, so it takes no keep="):
        get_model("tokensieve").create_from_arg_string(f"pretrained=sieve-mini,method=none,keep=16,{ON_CPU}")


def test_method_options_reach_the_method_and_loglikelihood_is_refused(sieve_mini_path):
    lm = get_model("tokensieve").create_from_arg_string(
        f"pretrained={sieve_mini_path},method=random,keep=0.25,method_seed=7,{ON_CPU}"
    )
    assert (lm.sieve.name, lm.sieve.seed) == ("random", 7) and lm.ppe is None
    assert get_model("tokensieve").create_from_arg_string(f"pretrained={sieve_mini_path},method=tome,ppe=4,{ON_CPU}").ppe == 4
    with pytest.raises(NotImplementedError, match="generate_until tasks"):
        lm.loglikelihood([])


def test_an_unknown_method_fails_before_the_model_loads():
    with pytest.raises(ValueError, match="unknown method"):
        get_model("tokensieve").create_from_arg_string(f"pretrained=sieve-mini,method=nope,{ON_CPU}")
