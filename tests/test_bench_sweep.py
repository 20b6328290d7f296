"""`tokensieve bench`: a real sweep on sieve-mini writes one record per (configuration, sample),
resumes without redoing work, gives the same records with parallel workers, and refuses what it
cannot run. Accuracy is not asserted: sieve-mini's weights are still being trained."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, SiglipVisionConfig
from typer.testing import CliRunner

from tokensieve.bench import sweep
from tokensieve.bench.sweep import SweepSpecError, read_done
from tokensieve.cli import app
from tokensieve.mini.build import model_dir
from tokensieve.selection import grid_subsample

FIXTURES = Path(__file__).parent / "fixtures" / "bench"
FIELDS = {"config", "method", "keep", "sample", "category", "question", "target", "prediction", "correct", "score",
          "tokens_before", "tokens_after", "tokens_llm_input", "tokens_per_layer", "kept", "grid", "groups", "prefill_flops", "prefill_flops_unreduced", "vision_flops",
          "prefill_seconds", "decode_seconds_per_token", "new_tokens", "peak_memory_added_bytes", "kv_cache_bytes",
          "selection_seconds", "warmup"}
SMALL = dict(methods="random,fastervlm", keeps="64,16", max_new_tokens=3, progress=False)


def records(out: Path, config: str) -> list[dict]:
    return [json.loads(line) for line in (out / "runs" / f"{config}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory) -> Path:
    """Two samples of the builtin suite: the baseline and random/fastervlm at 64 and 16 tokens."""
    return sweep(limit=2, out=tmp_path_factory.mktemp("sweep"), **SMALL)


def test_every_configuration_records_every_sample_with_sane_measurements(small_sweep):
    runs = {path.stem for path in (small_sweep / "runs").glob("*.jsonl")}
    assert runs == {"baseline", "random-k64", "random-k16", "fastervlm-k64", "fastervlm-k16"}
    baseline = {r["sample"]: r for r in records(small_sweep, "baseline")}
    assert list(baseline) == ["test-00000", "test-00001"]
    for config in runs:
        for record in records(small_sweep, config):
            assert set(record) == FIELDS
            base = baseline[record["sample"]]
            assert record["tokens_before"] == 256 and record["grid"] == [16, 16]
            assert record["category"] == base["category"] and record["target"] == base["target"]
            assert record["prefill_flops_unreduced"] == base["prefill_flops"] == base["prefill_flops_unreduced"]
            assert record["vision_flops"] == base["vision_flops"]  # the tower runs on every token either way
            assert record["prefill_seconds"] > 0 and 1 <= record["new_tokens"] <= 3
            assert record["peak_memory_added_bytes"] > 0 and record["warmup"] is False
            assert record["correct"] == (record["score"] == 1.0)
            if config == "baseline":
                assert record["method"] is record["keep"] is record["selection_seconds"] is None
                assert record["tokens_after"] == 256 and record["kept"] == list(range(256))
            else:
                assert record["tokens_after"] == record["keep"] == len(record["kept"])
                assert record["kept"] == sorted(set(record["kept"])) and 0 <= min(record["kept"])
                assert record["prefill_flops"] < record["prefill_flops_unreduced"]
                assert record["kv_cache_bytes"] < base["kv_cache_bytes"]
                assert record["selection_seconds"] > 0
    assert sorted(p.name for p in (small_sweep / "images").iterdir()) == ["test-00000.png", "test-00001.png"]
    described = json.loads((small_sweep / "sweep.json").read_text())
    assert described["model"] == "sieve-mini" and described["split"] == "test" and described["finished"]


def test_kv_cache_and_vision_flops_match_the_model_shapes(small_sweep):
    text = LlavaConfig.from_pretrained(model_dir()).text_config
    per_token = text.num_hidden_layers * 2 * text.num_key_value_heads * text.head_dim * 4  # keys + values, float32
    for base, pruned in zip(records(small_sweep, "baseline"), records(small_sweep, "fastervlm-k16")):
        assert base["kv_cache_bytes"] % per_token == 0 and pruned["kv_cache_bytes"] % per_token == 0
        assert (base["kv_cache_bytes"] - pruned["kv_cache_bytes"]) // per_token == 256 - 16
    base = records(small_sweep, "baseline")[0]
    # DINOv2-S at 224 px (257 tokens, 12 layers, width 384) and the 384 -> 576 -> 576 projector
    n, d = 257, 384
    tower = 12 * (24 * n * d * d + 4 * n * n * d) + 2 * 256 * 3 * 14 * 14 * d
    projector = 2 * 256 * (d * 576 + 576 * 576)
    assert base["vision_flops"] == pytest.approx(tower + projector, rel=1e-5)


def test_a_rerun_resumes_without_redoing_finished_samples(small_sweep, tmp_path):
    out = tmp_path / "sweep"
    shutil.copytree(small_sweep, out)
    finished = (out / "runs" / "baseline.jsonl").read_bytes()
    torn = (out / "runs" / "random-k16.jsonl")
    whole = torn.read_bytes()
    torn.write_bytes(whole[: whole.rfind(b"\n", 0, len(whole) - 1) + 40])  # a kill while writing sample 2
    untouched = (out / "runs" / "fastervlm-k64.jsonl").read_bytes()

    sweep(limit=3, out=out, **{**SMALL, "methods": "random", "keeps": "16"})

    baseline = (out / "runs" / "baseline.jsonl").read_bytes()
    assert baseline.startswith(finished)  # the finished records, byte for byte, then only the new sample
    assert [r["sample"] for r in records(out, "baseline")] == ["test-00000", "test-00001", "test-00002"]
    resumed = records(out, "random-k16")
    assert [r["sample"] for r in resumed] == ["test-00000", "test-00001", "test-00002"]
    assert resumed[1]["prediction"] == json.loads(whole.splitlines()[1])["prediction"]
    assert (out / "runs" / "fastervlm-k64.jsonl").read_bytes() == untouched  # not asked for this time


def test_a_torn_last_line_is_cut_off(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_text('{"sample": "a"}\n{"sample": "b"}\n{"sample": "c", "predi')
    assert read_done(path) == {"a", "b"}
    assert path.read_text() == '{"sample": "a"}\n{"sample": "b"}\n'


def test_two_workers_give_the_same_records_as_one(small_sweep, tmp_path):
    out = sweep(limit=1, out=tmp_path / "parallel", workers=2, **{**SMALL, "methods": "random", "keeps": "16"})
    for config in ("baseline", "random-k16"):  # one each, in two processes
        parallel, serial = records(out, config), records(small_sweep, config)[:1]
        assert [(r["sample"], r["prediction"], r["kept"], r["kv_cache_bytes"]) for r in parallel] == \
               [(r["sample"], r["prediction"], r["kept"], r["kv_cache_bytes"]) for r in serial]


def test_an_in_llm_method_and_a_chain_run_with_the_budgets_they_are_given(tmp_path):
    out = sweep(limit=1, out=tmp_path, methods="fastv,uniform:64+fastv:16", keeps="32", max_new_tokens=2,
                progress=False)
    (alone,), (chained,), (baseline,) = (records(out, c) for c in ("fastv-k32", "uniform-k64+fastv-k16", "baseline"))
    assert (alone["tokens_after"], chained["tokens_after"], chained["keep"]) == (32, 16, None)
    assert set(chained["kept"]) <= set(grid_subsample((16, 16), 64).tolist())  # what uniform:64 kept
    # layers 0-1 of 30 see every token, so FastV saves less than pruning the same count before the LLM
    assert chained["prefill_flops"] < alone["prefill_flops"] < baseline["prefill_flops"]


@pytest.mark.parametrize("methods, message", [
    ("fastv:0.5+fastervlm:128", "at most one pre_llm method; then in_llm methods at increasing layers"),
    ("nope", "unknown method 'nope'"),
    ("random:0", "keeps no token"),
])
def test_what_cannot_run_fails_at_once(tmp_path, methods, message):
    with pytest.raises(SweepSpecError, match=message):
        sweep(methods=methods, out=tmp_path, progress=False)
    assert not (tmp_path / "runs").exists()


def test_a_resume_with_other_settings_is_refused(small_sweep):
    with pytest.raises(SweepSpecError, match="max_new_tokens: 3 -> 4"):
        sweep(limit=2, out=small_sweep, **{**SMALL, "max_new_tokens": 4})


def test_a_benchmark_suite_records_its_own_ids_and_scores(tmp_path):
    out = sweep(suite="pope", data=FIXTURES / "pope", methods=[], limit=2, out=tmp_path, max_new_tokens=3,
                progress=False)
    baseline = records(out, "baseline")
    assert [r["sample"].startswith("pope-") for r in baseline] == [True, True]
    assert {r["target"] for r in baseline} <= {"yes", "no"} and all(r["tokens_after"] == 256 for r in baseline)
    image = out / "images" / f"{baseline[0]['sample']}.png"
    from PIL import Image

    assert Image.open(image).size == (224, 224)  # as the model saw it, not the 8x8 source


def test_cli_runs_a_sweep_and_explains_errors(tmp_path):
    runner = CliRunner()
    args = ["bench", "--methods", "uniform", "--keep", "0.25", "--limit", "1", "--max-new-tokens", "2",
            "--out", str(tmp_path), "--no-report"]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert [r["tokens_after"] for r in records(tmp_path, "uniform-k0.25")] == [64]
    assert str(tmp_path / "runs") in result.output
    result = runner.invoke(app, ["bench", "--methods", "a:1+fastv:2", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "unknown method 'a'" in result.output


def tiny_siglip_llava(folder: Path) -> Path:
    """A random LLaVA with a SigLIP tower (no [CLS] token) and sieve-mini's processor, saved to `folder`."""
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=224, patch_size=14)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=49153, eos_token_id=2, pad_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=49152,
                         vision_feature_select_strategy="full", vision_feature_layer=-1)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor = LlavaProcessor.from_pretrained(model_dir())
    processor.num_additional_image_tokens, processor.vision_feature_select_strategy = 0, "full"
    processor.save_pretrained(folder)
    return folder


def test_a_local_checkpoint_runs_and_a_method_it_refuses_is_skipped(tmp_path):
    checkpoint = tiny_siglip_llava(tmp_path / "tiny")
    out = sweep(model=str(checkpoint), methods="random,fastervlm", keeps="16", limit=1, out=tmp_path / "out",
                max_new_tokens=2, progress=False)
    assert sorted(p.stem for p in (out / "runs").glob("*.jsonl")) == ["baseline", "random-k16"]
    assert records(out, "random-k16")[0]["tokens_after"] == 16
    skipped = json.loads((out / "sweep.json").read_text())["skipped"]
    assert list(skipped) == ["fastervlm-k16"] and "no [CLS] token" in skipped["fastervlm-k16"]
    # a later run into the same OUT (other methods) keeps the earlier refusal
    sweep(model=str(checkpoint), methods="uniform", keeps="16", limit=1, out=out, max_new_tokens=2, progress=False)
    assert json.loads((out / "sweep.json").read_text())["skipped"] == skipped
