"""`tokensieve calibrate`: VFlowOpt's Bayesian search (tokensieve/bench/calibrate.py) on the tiny LLaVA, and the
command line end to end on sieve-mini with one prompt and two calls."""

import json
import math
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import tokensieve as ts
from tiny_models import llava_inputs, tiny_llava
from tokensieve.bench import calibrate as cal
from tokensieve.cli import app, build_sieve

runner = CliRunner()


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


@pytest.fixture(scope="module")
def samples():
    return [llava_inputs([[5, 6, 7, 8 + i]], seed=i) for i in range(2)]


def search(model, samples, **options):
    return cal.calibrate(model, samples=samples, **{"target": 0.25, "calls": 4, "initial": 2, "seed": 0, **options})


# --- the budget: the code's equation, at any depth -------------------------------------------------------------

def test_the_layer_average_of_the_shipped_configs_is_their_target_on_llava_onevisions_28_layers():
    stages = tuple(stage.layer for stage in ts.build("vflowopt_llm").schedule(28))
    assert stages == (9, 18)
    assert cal.segments(28, stages) == [9, 9, 10]
    # 10%: r_v 0.1166, illava_llm_r [1.0, 0.6011]; 25%: r_v 0.2651, [0.9833, 0.8772] (keep = r_1 r_2 = 0.8627)
    assert cal.layer_average(28, stages, 0.1166, 1.0, 0.6011) == pytest.approx(0.1, abs=1e-4)
    assert cal.layer_average(28, stages, 0.2651, 0.9833, 0.8627) == pytest.approx(0.25, abs=1e-3)
    by_hand = (9 * 0.2651 + 9 * 0.2651 * 0.9833 + 10 * 0.2651 * 0.8627) / 28
    assert cal.layer_average(28, stages, 0.2651, 0.9833, 0.8627) == pytest.approx(by_hand, rel=1e-12)


@pytest.mark.parametrize("target, keep, ratio", [(0.25, 0.25, 0.5333), (0.25, 0.3125, 0.8), (0.25, 0.375, 1.0),
                                                 (0.1, 0.1166, 1.0), (0.5, 0.7233, 0.7487)])
def test_the_last_stage_is_solved_from_the_target_as_the_codes_ratio_list_3(target, keep, ratio):
    # llava_ov_opt_all.py: r_2 = min(1, ((28 T - 9 r_v - 9 r_v r_1) / 10) / (r_v r_1)); vflowopt_llm's keep is r_1 r_2
    code_r2 = min(1.0, ((28 * target - keep * 9 - keep * ratio * 9) / 10) / (keep * ratio))
    final = cal.final_keep(target, 28, (9, 18), keep, ratio)
    assert final == pytest.approx(ratio * code_r2, abs=1e-4) and final <= ratio * code_r2 + 1e-12
    assert cal.layer_average(28, (9, 18), keep, ratio, final) <= target + 1e-12
    if code_r2 < 1:  # not clipped: the budget is met to the 4th decimal of the last stage
        assert cal.layer_average(28, (9, 18), keep, ratio, final) == pytest.approx(target, abs=1e-4)
    # the shipped 10% config: its 0.6011 is this equation's answer at r_v 0.1166, r_1 1.0
    assert cal.final_keep(0.1, 28, (9, 18), 0.1166, 1.0) == pytest.approx(0.6011, abs=3e-4)


# --- the objective ------------------------------------------------------------------------------------------

def final_norm_last_token(model, inputs) -> torch.Tensor:
    """By hand: the output of the decoder's final norm at the last prompt position, caught by a hook."""
    caught = []
    handle = model.model.language_model.norm.register_forward_hook(lambda m, a, out: caught.append(out[:, -1]))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return caught[0].float()


def test_the_objective_is_the_cosine_of_the_last_tokens_final_state_with_and_without_pruning(model, samples):
    sample = samples[0]
    spec = "vflowopt:0.3,m=3.0+vflowopt_llm:0.5,ratios=(0.8,)"
    stock = final_norm_last_token(model, sample)
    with ts.apply(model, ts.build(spec)):
        pruned = final_norm_last_token(model, sample)
    by_hand = float(F.cosine_similarity(stock, pruned, dim=-1))
    assert 0 < by_hand < 0.999  # pruning changed the state
    score, measured = cal.similarity(model, ts.build(spec), [sample], [cal.last_states(model, sample)])
    assert score == pytest.approx(by_hand, abs=1e-5)
    # measured from run.stats: 64 tokens -> 19 before layer 0 (round(0.3·64)), 15 from layer 1
    # (19 - round(19·0.2)), 10 from layer 2 (round(0.5·19)): layers 0..3 hold 19, 15, 10, 10
    assert measured == pytest.approx((19 + 15 + 10 + 10) / 4 / 64)
    # and the search scores each call so: its record's spec, rerun by hand, gives its score
    result = search(model, [sample], calls=1, initial=1)
    [trial] = result.trials
    with ts.apply(model, ts.build(trial.spec)):
        pruned = final_norm_last_token(model, sample)
    assert trial.score == pytest.approx(float(F.cosine_similarity(stock, pruned, dim=-1)), abs=1e-5)
    assert result.spec == trial.spec and result.score == trial.score


# --- the search ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", [0.25, 16])
def test_every_call_keeps_within_the_layer_averaged_budget_and_the_codes_bounds(model, samples, target):
    result = search(model, samples, target=target)
    share = 0.25  # 16 of the 64 tokens
    assert result.target == share and result.tokens == [64, 64] and result.stage_layers == (1, 2)
    assert len(result.trials) == 4
    for trial in result.trials:
        p = trial.params
        assert share <= p["keep"] <= 1.5 * share and 3 <= p["m"] <= 24 and 0.2 / 0.375 - 1e-4 <= p["ratios"][0] <= 1
        assert 0 < p["final"] <= p["ratios"][0]
        assert trial.layer_average <= share + 1e-12
        if p["final"] < p["ratios"][0]:  # not clipped at r_2 = 1: on the budget to the last stage's 4th decimal
            assert trial.layer_average == pytest.approx(share, abs=1e-4)
        # whole tokens per image: within a token per stage of the nominal share
        assert abs(trial.measured - trial.layer_average) <= 2 / 64
        assert trial.spec == cal.format_spec(p["keep"], p["m"], {}, p["ratios"][0], p["final"])
    assert result.score == max(t.score for t in result.trials)


def test_the_search_is_deterministic_with_a_seed(model, samples):
    first, again, other = search(model, samples), search(model, samples), search(model, samples, seed=1)
    assert [(t.spec, t.score) for t in first.trials] == [(t.spec, t.score) for t in again.trials]
    assert [t.spec for t in first.trials] != [t.spec for t in other.trials]


def test_the_vision_stage_alone_searches_m_at_keep_equal_to_the_target(model, samples):
    result = search(model, samples, method="vflowopt", calls=3, initial=2)
    for trial in result.trials:
        assert set(trial.params) == {"keep", "m"} and trial.params["keep"] == 0.25
        assert trial.layer_average == 0.25 and trial.measured == 0.25  # round(0.25·64) = 16 at every layer
        assert trial.spec.startswith("vflowopt:0.25,m=") and "+" not in trial.spec


def test_fixed_arguments_of_the_method_stay_in_every_spec(model, samples):
    result = search(model, samples, method="vflowopt+vflowopt_llm:merge='tail'", calls=2, initial=2)
    assert all(t.spec.endswith(",merge='tail'") for t in result.trials)
    assert ts.build(result.spec).sieves[1].merge == "tail"


def test_the_record_is_json_and_ts_build_and_the_cli_read_its_spec_back(model, samples, tmp_path):
    result = search(model, samples, calls=2, initial=2)
    path = result.write(tmp_path / "calibration.json")
    record = json.loads(path.read_text())
    assert record["spec"] == result.spec and len(record["trials"]) == 2 and record["seed"] == 0
    assert repr(ts.build(str(path))) == repr(ts.build(result.spec))
    assert repr(build_sieve(str(path), None)) == repr(ts.build(result.spec))
    with pytest.raises(ValueError, match="no such calibration file"):
        ts.build(str(tmp_path / "missing.json"))
    (tmp_path / "other.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match='is not a calibration record: it has no "spec"'):
        ts.build(str(tmp_path / "other.json"))


# --- bad input ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"target": 64}, "target=64 is not below the 64 visual tokens of the samples' images"),
    ({"target": 100}, "target=100 is not below the 64 visual tokens"),
    ({"target": 1.0}, "target=1.0 is not a share in (0, 1): 1.0 keeps every token"),
    ({"target": 0}, "target must be a layer-averaged budget"),
    ({"target": -0.1}, "target must be a layer-averaged budget"),
    ({"target": True}, "target must be a layer-averaged budget"),
    ({"method": "fastv"}, "method must be 'vflowopt+vflowopt_llm' or 'vflowopt'"),
    ({"method": "vflowopt_llm+vflowopt"}, "method must be 'vflowopt+vflowopt_llm' or 'vflowopt'"),
    ({"method": "vflowopt:m=4+vflowopt_llm"}, "remove vflowopt's m: the search sets keep and m of vflowopt"),
    ({"method": "vflowopt+vflowopt_llm:ratios=(0.5,)"}, "remove vflowopt_llm's ratios"),
    ({"method": "vflowopt:alpha_v=0.5"}, "alpha_v=0.5: the entropy term needs each patch's pixels"),
    ({"calls": 2, "initial": 3}, "calls=2 is fewer than initial=3"),
    ({"calls": 0, "initial": 0}, "calls must be a whole number >= 1, not 0"),
    ({"samples": 0}, "samples must be at least 1 prompt"),
    ({"samples": 3}, "pass processor= to build them"),
    ({"samples": []}, "samples must be a count or a non-empty list"),
])
def test_bad_input_is_refused_clearly(model, samples, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        cal.calibrate(model, **{"samples": samples, "calls": 2, "initial": 1, **options})


def test_a_count_target_needs_images_of_one_size(model):
    with pytest.raises(cal.TargetError, match="the samples' images have 64 to 256 visual tokens"):
        cal.check_target(32, [64, 256])
    assert cal.check_target(32, [64, 64]) == 0.5


# --- the command line ---------------------------------------------------------------------------------------

CLI_MISTAKES = {
    "target share": (["--target", "1.5"], "--target", "target=1.5 is not a share in (0, 1)"),
    "target word": (["--target", "lots"], "--target", "'lots' is not a number"),
    "calls < initial": (["--calls", "2", "--initial", "3"], "--calls", "calls=2 is fewer than initial=3"),
    "unknown method": (["--method", "fastv"], "--method", "method must be 'vflowopt+vflowopt_llm' or 'vflowopt'"),
    "out suffix": (["--out", "{tmp}/calibration.txt"], "--out", "name a .json file"),
    "out folder": (["--out", "{tmp}/missing/c.json"], "--out", "there is no folder {tmp}/missing"),
    "samples": (["--samples", "0"], "--samples", "calibrate needs at least 1 prompt"),
    "suite": (["--suite", "nope"], "--suite", "unknown suite 'nope'"),
}


@pytest.fixture
def models_refuse_to_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr("tokensieve.bench.suites.load_model", refuse)


@pytest.mark.parametrize("args, option, message", CLI_MISTAKES.values(), ids=CLI_MISTAKES.keys())
def test_a_cli_mistake_is_one_line_and_exit_2_before_the_model_loads(args, option, message, tmp_path,
                                                                      models_refuse_to_load):
    result = runner.invoke(app, ["calibrate", *(a.format(tmp=tmp_path) for a in args)], env={"COLUMNS": "250"})
    assert result.exit_code == 2, result.output
    [line] = [line for line in result.output.splitlines() if "Invalid value" in line]
    assert f"Invalid value for {option}: " in line and message.format(tmp=tmp_path) in line, line
    assert "Traceback" not in result.output


def test_without_the_extra_the_cli_names_the_pip_command_in_one_line(monkeypatch, models_refuse_to_load):
    monkeypatch.setitem(sys.modules, "optuna", None)  # as if optuna were not installed
    result = runner.invoke(app, ["calibrate"], env={"COLUMNS": "250"})
    assert result.exit_code == 1
    assert result.output.strip() == ("Error: tokensieve calibrate's Bayesian search (optuna's GPSampler) needs optuna: "
                                     "pip install 'tokensieve[calibrate]' (from a checkout: pip install -e "
                                     "'.[calibrate]')")


def test_the_cli_calibrates_sieve_mini_end_to_end_and_writes_a_record_the_cli_runs(tmp_path):
    out = tmp_path / "calibration.json"
    result = runner.invoke(app, ["calibrate", "--samples", "1", "--calls", "2", "--initial", "1", "--target", "64",
                                 "--out", str(out)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["target"] == 0.25 and record["tokens"] == [256] and record["layers"] == 30
    assert record["stage_layers"] == [9, 19] and len(record["trials"]) == 2
    assert "call   2/2" in result.output and f"best: {record['spec']}" in result.output
    assert all(t["layer_average"] <= 0.25 + 1e-12 and math.isfinite(t["score"]) for t in record["trials"])
    assert repr(build_sieve(str(out), None)) == repr(ts.build(record["spec"]))
