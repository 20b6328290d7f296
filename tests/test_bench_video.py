"""`tokensieve bench --suite video`: the built-in video suite's loader, a real sweep on a tiny Qwen2-VL that takes
videos (the baseline, a video method, the frames stage and an in-LLM method), the per-skill and visual-token tables
from hand-made records, and the report's frame strip."""

import base64
import importlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tokensieve.bench import sweep
from tokensieve.bench.outputs import write_outputs
from tokensieve.bench.suites import frame_size, load_model, load_suite, model_inputs, safe_id, video_frames
from tokensieve.bench.summary import CHANCE_ROW, per_skill, read_runs, summarise
from tokensieve.bench.sweep import SweepSpecError
from tokensieve.cli import app
from tokensieve.draw import DROPPED_GREY
from tokensieve.mini import VIDEO_FRAME_SIZE, video_inputs
from tokensieve.qa import VIDEO_CHANCE, VIDEO_SKILLS, is_correct

from tiny_qwen2_vl import TOKENS_PER_FRAME, tiny_qwen2_vl
from tiny_video_processor import tiny_qwen2_vl_processor

SWEEP_MODULE = importlib.import_module("tokensieve.bench.sweep")
FRAMES = 8  # input frames per clip: the tiny Qwen2-VL pairs them, so its video grid is (4, 4, 4), 64 tokens


# ---- the suite ----

def test_the_video_suite_is_the_test_split_balanced_with_unique_safe_ids_and_deterministic():
    samples, split = load_suite("video", 10, frames=FRAMES)
    assert split == "test" and len(samples) == 10
    assert pd.Series([s.category for s in samples]).value_counts().to_dict() == {skill: 2 for skill in VIDEO_SKILLS}
    ids = [s.id for s in samples]
    assert len(set(ids)) == 10 and all(safe_id(i) == i for i in ids)
    again = load_suite("video", 10, frames=FRAMES)[0]
    assert [(s.id, s.question, s.target) for s in again] == [(s.id, s.question, s.target) for s in samples]
    frames, frames_again = samples[3].frames(), again[3].frames()  # rendered on demand, the same pixels each time
    assert len(frames) == FRAMES and samples[3].image is None
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(frames, frames_again))
    assert samples[0].score(samples[0].target) == 1.0 and samples[0].score("nothing") == 0.0
    assert len(load_suite("video", 5)[0][0].frames()) == 16  # the default clip length


@pytest.mark.parametrize("call, message", [
    (dict(suite="video", frames=7), "8 to 32 frames"),
    (dict(suite="builtin", frames=8), "has no clips"),
    (dict(suite="video", split="train"), "'test' split only"),
])
def test_what_the_video_suite_cannot_load_is_refused(call, message):
    with pytest.raises(ValueError, match=message):
        load_suite(limit=5, **call)


def test_a_sweep_refuses_frames_for_an_image_suite_and_ray_for_the_video_suite(tmp_path):
    with pytest.raises(SweepSpecError, match="has no clips"):
        sweep(suite="builtin", frames=8, methods="random", keeps="4", limit=1, out=tmp_path / "a", progress=False)
    with pytest.raises(SweepSpecError, match="does not run on Ray yet"):
        sweep(suite="video", ray="local", methods="random", keeps="4", limit=1, out=tmp_path / "b", progress=False)


# ---- a real sweep on a tiny Qwen2-VL that takes videos ----

@pytest.fixture(scope="module")
def tiny_video_model():
    return tiny_qwen2_vl(), tiny_qwen2_vl_processor()


@pytest.fixture(scope="module")
def video_sweep(tmp_path_factory, tiny_video_model) -> Path:
    """Five clips (one per skill) of 8 frames: the baseline, EVS, uniform_frames and FastV at a quarter of the
    video's tokens, with the report. The bench loads the tiny model in place of a checkpoint folder: the stock
    Qwen2-VL video processor needs torchvision, which is not installed here (tests/tiny_video_processor.py)."""
    checkpoint = tmp_path_factory.mktemp("tiny-qwen2-vl")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SWEEP_MODULE, "load_model", lambda model, device, dtype: tiny_video_model)
        out = sweep(model=str(checkpoint), suite="video", frames=FRAMES, methods="evs,uniform_frames,fastv",
                    keeps="0.25", limit=5, out=tmp_path_factory.mktemp("video-sweep"), max_new_tokens=2, show=1,
                    progress=False, device="cpu")
    write_outputs(out)
    return out


def records(out: Path, config: str) -> list[dict]:
    return [json.loads(line) for line in (out / "runs" / f"{config}.jsonl").read_text().splitlines()]


def test_a_clip_goes_to_a_video_family_as_one_video(tiny_video_model):
    model, processor = tiny_video_model
    sample = load_suite("video", 1, frames=FRAMES)[0][0]
    inputs = model_inputs(model, processor, sample)
    assert "pixel_values" not in inputs and inputs["video_grid_thw"].tolist() == [[FRAMES // 2, 8, 8]]
    assert (inputs["mm_token_type_ids"] == 2).sum() == 64  # the video's tokens, placed by the processor


def test_every_configuration_records_the_videos_frames_and_tokens(video_sweep):
    runs = {path.stem for path in (video_sweep / "runs").glob("*.jsonl")}
    assert runs == {"baseline", "evs-k0.25", "uniform_frames-k0.25", "fastv-k0.25"}
    baseline = {r["sample"]: r for r in records(video_sweep, "baseline")}
    assert sorted(r["category"] for r in baseline.values()) == sorted(VIDEO_SKILLS)
    for config in runs:
        for record in records(video_sweep, config):
            assert record["frames"] == [4, 4, 4] and record["tokens_before"] == 64 and record["grid"] == [1, 64]
            counts = [sum(i // TOKENS_PER_FRAME == f for i in record["kept"]) for f in range(4)]
            assert record["frame_counts"] == counts and sum(counts) == record["tokens_after"]
            assert record["kept_frames"] == [f for f, count in enumerate(counts) if count]
            assert record["correct"] == is_correct(record["prediction"], record["target"])
    for record in records(video_sweep, "baseline"):
        assert record["kept"] == list(range(64)) and record["kept_frames"] == [0, 1, 2, 3]
    for record in records(video_sweep, "evs-k0.25"):  # the first frame whole, then the most changed tokens
        assert record["tokens_after"] == record["tokens_llm_input"] == 16 and record["frame_counts"][0] == 16
    for record in records(video_sweep, "uniform_frames-k0.25"):  # one frame of four: the tower sees only it
        assert record["kept_frames"] == [0] and record["tokens_llm_input"] == 16
        assert record["vision_flops"] < baseline[record["sample"]]["vision_flops"]
    for record in records(video_sweep, "fastv-k0.25"):  # every token enters the LLM; the later layers see 16
        assert record["tokens_llm_input"] == 64 and record["tokens_after"] == 16
        assert 16 < record["tokens_per_layer"] < 64
    first = records(video_sweep, "baseline")[0]["sample"]
    assert sorted(p.name for p in (video_sweep / "images" / first).iterdir()) == [f"{i:02d}.png" for i in range(8)]


def test_the_sweeps_tables_hold_accuracy_per_skill_against_chance(video_sweep):
    skills = pd.read_csv(video_sweep / "per_skill.csv").set_index("config")
    for config in ["baseline", "evs-k0.25", "uniform_frames-k0.25", "fastv-k0.25"]:
        for record in records(video_sweep, config):  # one clip per skill: its accuracy is that clip's
            assert skills.loc[config, record["category"]] == float(record["correct"])
    assert skills.loc[CHANCE_ROW, list(VIDEO_SKILLS)].tolist() == pytest.approx(list(VIDEO_CHANCE.values()))
    summary_md = (video_sweep / "summary.md").read_text()
    assert "## Video: accuracy against visual tokens" in summary_md and "## Accuracy per skill" in summary_md
    html = (video_sweep / "report.html").read_text()
    assert 'id="per-skill"' in html and 'id="video-tokens"' in html
    assert "on the video suite (test split, 5 samples, 8 frames per clip)" in html


def test_a_resume_with_another_clip_length_is_refused(video_sweep, tiny_video_model):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SWEEP_MODULE, "load_model", lambda model, device, dtype: tiny_video_model)
        described = json.loads((video_sweep / "sweep.json").read_text())
        assert described["frames"] == FRAMES and described["suite"] == "video"
        with pytest.raises(SweepSpecError, match="frames: 8 -> 16"):
            sweep(model=described["model"], suite="video", frames=16, methods="evs", keeps="0.25", limit=5,
                  out=video_sweep, max_new_tokens=2, progress=False, device="cpu")


# ---- tables and strip from hand-made records ----

# sample -> (skill, target); v5 is a second order clip
CLIPS = {"v0": ("order", "square"), "v1": ("motion", "up"), "v2": ("flashes", "2"), "v3": ("needle", "red"),
         "v4": ("change", "star"), "v5": ("order", "circle")}
T, H, W = 4, 2, 2  # the video's grid: 4 frames of 2x2 tokens
# config -> (method, keep, kept indices over the video, tokens per layer, samples answered right)
CONFIGS = {
    "baseline": (None, None, list(range(T * H * W)), 16.0, {"v0", "v1", "v2", "v5"}),
    "evs-k0.25": ("evs", 0.25, [0, 1, 2, 3], 4.0, {"v1"}),  # the first frame whole, the other three dropped
    "random-k0.5": ("random", 0.5, [0, 3, 4, 9, 10, 12, 13, 15], 8.0, {"v0", "v3"}),  # frame 1 keeps only token 4
    "fastv-k0.25": ("fastv", 0.25, [1, 5, 9, 13], 10.0, {"v1", "v2", "v3", "v5"}),  # in the LLM: 16 enter it
}


def video_record(config: str, sample: str) -> dict:
    method, keep, kept, per_layer, right = CONFIGS[config]
    skill, target = CLIPS[sample]
    counts = [sum(i // (H * W) == f for i in kept) for f in range(T)]
    return {
        "config": config, "method": method, "keep": keep, "sample": sample, "category": skill,
        "question": f"a {skill} question", "target": target, "prediction": target if sample in right else "none",
        "correct": sample in right, "score": float(sample in right), "tokens_before": T * H * W,
        "tokens_after": len(kept), "tokens_llm_input": T * H * W if method == "fastv" else len(kept),
        "tokens_per_layer": per_layer, "kept": kept, "grid": [1, T * H * W], "groups": None,
        "frames": [T, H, W], "frame_counts": counts, "kept_frames": [f for f, c in enumerate(counts) if c],
        "prefill_flops": 10**9, "prefill_flops_unreduced": 2 * 10**9, "vision_flops": 10**9, "prefill_seconds": 0.01,
        "decode_seconds_per_token": 0.001, "new_tokens": 2, "peak_memory_added_bytes": 2**20,
        "kv_cache_bytes": 1024, "selection_seconds": None if method is None else 0.001, "warmup": False,
    }


# eight input frames of flat colours: the grid's frame f stands for input frames 2f and 2f+1 (shown: 2f)
FRAME_COLOURS = [(220, 30, 30), (0, 0, 0), (30, 200, 30), (0, 0, 0), (30, 30, 220), (0, 0, 0), (230, 200, 20),
                 (0, 0, 0)]


@pytest.fixture
def made_sweep(tmp_path) -> Path:
    out = tmp_path / "made"
    (out / "runs").mkdir(parents=True)
    for config in CONFIGS:
        lines = [json.dumps(video_record(config, sample)) for sample in CLIPS]
        (out / "runs" / f"{config}.jsonl").write_text("\n".join(lines) + "\n")
    (out / "images" / "v0").mkdir(parents=True)
    for index, colour in enumerate(FRAME_COLOURS):
        Image.new("RGB", (64, 64), colour).save(out / "images" / "v0" / f"{index:02d}.png")
    (out / "sweep.json").write_text(json.dumps({"model": "tiny", "suite": "video", "split": "test", "samples": 6,
                                                "frames": 8, "skipped": {}}))
    return out


def test_accuracy_per_skill_and_per_method_are_exact(made_sweep):
    runs = read_runs(made_sweep)
    summary = summarise(runs)
    skills = per_skill(runs, summary).set_index("config")
    expected = {  # order (2 clips), motion, flashes, needle, change, overall (of 6)
        "baseline": [1.0, 1.0, 1.0, 0.0, 0.0, 4 / 6],
        "evs-k0.25": [0.0, 1.0, 0.0, 0.0, 0.0, 1 / 6],
        "random-k0.5": [0.5, 0.0, 0.0, 1.0, 0.0, 2 / 6],
        "fastv-k0.25": [0.5, 1.0, 1.0, 1.0, 0.0, 4 / 6],
    }
    columns = [*VIDEO_SKILLS, "overall"]
    for config, accuracies in expected.items():
        assert skills.loc[config, columns].tolist() == pytest.approx(accuracies)
    chance = list(VIDEO_CHANCE.values())
    overall_chance = (2 * VIDEO_CHANCE["order"] + sum(chance) - VIDEO_CHANCE["order"]) / 6
    assert skills.loc[CHANCE_ROW, columns].tolist() == pytest.approx([*chance, overall_chance])
    rows = summary.set_index("config")
    assert rows["accuracy"].to_dict() == pytest.approx({c: a[-1] for c, a in expected.items()})
    assert rows["tokens_llm_input"].to_dict() == {"baseline": 16, "evs-k0.25": 4, "fastv-k0.25": 16, "random-k0.5": 8}
    assert rows["tokens_per_layer"].to_dict() == {"baseline": 16, "evs-k0.25": 4, "fastv-k0.25": 10, "random-k0.5": 8}
    assert rows["frames_kept"].to_dict() == {"baseline": 4, "evs-k0.25": 1, "fastv-k0.25": 4, "random-k0.5": 4}


def test_summary_md_has_the_video_tables(made_sweep):
    write_outputs(made_sweep)
    text = (made_sweep / "summary.md").read_text()
    tokens = text.split("## Video: accuracy against visual tokens")[1].split("## Accuracy per skill")[0]
    assert "| evs | 0.25 | 16.0 | 4.0 | 4.0 | 1.0 | 4 | 0.167 |" in tokens
    assert "| fastv | 0.25 | 16.0 | 16.0 | 10.0 | 4.0 | 4 | 0.667 |" in tokens
    skills = text.split("## Accuracy per skill")[1].split("## Accuracy by budget")[0]
    assert "| random | 0.5 | 8.0 | 8.0 | 0.500 | 0.000 | 0.000 | 1.000 | 0.000 | 0.333 |" in skills
    assert "| chance | - | - | - | 0.333 | 0.250 | 0.250 | 0.250 | 0.333 | 0.292 |" in skills


def decoded(html: str, alt: str) -> np.ndarray:
    uri = re.search(rf'alt="{re.escape(alt)}" src="data:image/jpeg;base64,([^"]+)"', html).group(1)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri))).convert("RGB"), dtype=float)


def test_the_report_shows_a_strip_of_frames_with_kept_patches_and_dropped_frames_marked(made_sweep):
    write_outputs(made_sweep)
    html = (made_sweep / "report.html").read_text()
    sample = html.split("<h3>v0 ")[1].split('<div class="sample">')[0]
    for config in CONFIGS:
        assert len(re.findall(rf'alt="{re.escape(config)} frame \d"', sample)) == T  # one thumbnail per frame
    dropped = re.findall(r'<span class="frame dropped"[^>]*><img alt="([^"]+)"', sample)
    assert dropped == ["evs-k0.25 frame 1", "evs-k0.25 frame 2", "evs-k0.25 frame 3"]
    assert sample.count("<b>dropped</b>") == 3
    # each grid frame shows its first input frame; the baseline's are untouched
    for frame in range(T):
        assert np.abs(decoded(sample, f"baseline frame {frame}") - FRAME_COLOURS[2 * frame]).max() < 12
    # random keeps only token 4 of frame 1 (its top-left patch): that quarter keeps its colour, the rest is greyed
    shown = decoded(sample, "random-k0.5 frame 1")
    half = shown.shape[0] // 2
    assert np.abs(shown[: half - 4, : half - 4] - FRAME_COLOURS[2]).max() < 12
    greyed = 0.75 * np.array(DROPPED_GREY) + 0.25 * np.array(FRAME_COLOURS[2])
    assert np.abs(shown[half + 4:, half + 4:] - greyed).max() < 12
    assert np.abs(shown[: half - 4, half + 4:] - greyed).max() < 12


def test_a_clip_goes_to_an_image_family_as_one_image_per_frame():
    """sieve-mini takes no video: each frame is an image placeholder, then the question, and the run is told the
    frame count (`ts.apply(..., video_frames=8)`, which reads the 8 images as one video)."""
    model, processor = load_model("sieve-mini", "cpu", "float32")
    sample = load_suite("video", 1, frames=FRAMES)[0][0]
    inputs = model_inputs(model, processor, sample)
    assert inputs["pixel_values"].shape[0] == FRAMES and "pixel_values_videos" not in inputs
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == FRAMES * 256
    # the bench gives sieve-mini its clips at the size they were trained at: the inputs its own helper builds
    assert frame_size("sieve-mini") == VIDEO_FRAME_SIZE and frame_size("/some/checkpoint") is None
    at_trained_size = model_inputs(model, processor, sample, frame_size("sieve-mini"))
    expected = video_inputs(processor, sample.frames(), sample.question)
    assert at_trained_size.keys() == expected.keys()
    for key in expected:
        assert torch.equal(at_trained_size[key], expected[key]), key
    assert (expected["input_ids"] == model.config.image_token_id).sum() == FRAMES * (VIDEO_FRAME_SIZE // 14) ** 2
    text = processor.decode(inputs["input_ids"][0])
    assert text.index(sample.question) > text.rindex(processor.image_token)  # the question after the frames
    assert video_frames(processor, sample) == FRAMES
    assert video_frames(tiny_qwen2_vl_processor(), sample) is None  # a family that takes the video as one
    assert video_frames(processor, load_suite("builtin", 1)[0][0]) is None  # a still image


def test_cli_takes_frames_for_the_video_suite_only():
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "--suite", "builtin", "--frames", "8", "--out", "unused"])
    assert result.exit_code == 2 and "has no clips" in result.output
    result = runner.invoke(app, ["bench", "--suite", "video", "--frames", "40", "--out", "unused"])
    assert result.exit_code == 2 and "8 to 32 frames" in result.output
