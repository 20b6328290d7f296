"""`tokensieve bench` outputs: aggregation against hand-computed numbers, the oracle rule, the files written.

The fake sweep: four QA samples (s0, s1 colour; s2, s3 counting) on a 4x4 grid (16 tokens).
baseline answers s0 red (right), s1 blue (wrong), s2 3 (right), s3 2 (right): accuracy 3/4.
fastervlm keeps 4 and 8 tokens on every sample; pool keeps 4 (ratio 0.25) and 8 (0.5) on only
some samples and answered s9, which the baseline never saw: a partial sweep.
"""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path

import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image, ImageDraw
from rich.console import Console

from tokensieve.bench.oracle import NEVER, distribution, oracle
from tokensieve.bench.outputs import write_outputs
from tokensieve.bench import plots
from tokensieve.bench.plots import pareto_front
from tokensieve.bench.summary import chance_level, per_category, read_runs, summarise
from tokensieve.qa import CHANCE

MIB = 2**20
TARGETS = {"s0": ("colour", "What colour is the square?", "red"), "s1": ("colour", "What colour is the circle?", "green"),
           "s2": ("counting", "How many shapes are there?", "3"), "s3": ("counting", "How many shapes are there?", "2"),
           "s9": ("counting", "How many shapes are there?", "1")}
# config -> (method, keep, tokens kept, {sample: prediction}); s0 comes first and is each config's warm-up.
CONFIGS = {
    "baseline": (None, None, 16, {"s0": "red", "s1": "blue", "s2": "3", "s3": "2"}),
    "fastervlm-k4": ("fastervlm", 4, 4, {"s0": "Red.", "s1": "green", "s2": "4", "s3": "two"}),
    "fastervlm-k8": ("fastervlm", 8, 8, {"s0": "red", "s1": "blue", "s2": "3", "s3": "3"}),
    "pool-k0.25": ("pool", 0.25, 4, {"s0": "red", "s1": "yellow", "s2": "5", "s9": "1"}),
    "pool-k0.5": ("pool", 0.5, 8, {"s0": "blue", "s1": "blue"}),
}
# fastervlm-k4's timings: the warm-up's would move every median if it counted.
TIMINGS = {"s0": (9.0, 1.0, 0.5), "s1": (0.010, 0.002, 0.001), "s2": (0.030, None, 0.003), "s3": (0.020, 0.004, 0.002)}


def record(config: str, sample: str, prediction: str) -> dict:
    method, keep, kept, _ = CONFIGS[config]
    category, question, target = TARGETS[sample]
    prefill, decode, selection = TIMINGS[sample] if config == "fastervlm-k4" else (0.05, 0.001, 0.0)
    return {
        "config": config, "method": method, "keep": keep, "sample": sample, "category": category,
        "question": question, "target": target, "prediction": prediction,
        "correct": prediction.strip(".").lower().replace("two", "2") == target,
        "tokens_before": 16, "tokens_after": kept, "kept": list(range(kept)), "grid": [4, 4],
        "prefill_flops": (kept + 10) * 10**9, "prefill_flops_unreduced": 26 * 10**9, "vision_flops": 5 * 10**9,
        "prefill_seconds": prefill, "decode_seconds_per_token": decode, "new_tokens": 2,
        "peak_memory_bytes": {"s2": 200 * MIB, "s3": None}.get(sample, (100 + kept) * MIB),
        "kv_cache_bytes": (kept + 10) * 1024, "selection_seconds": selection, "warmup": sample == "s0",
    }


def draw_image(seed: int) -> Image.Image:
    image = Image.new("RGB", (64, 64), (255, 0, 0))
    ImageDraw.Draw(image).ellipse((8 + seed, 8, 40 + seed, 40), fill=(0, 0, 255))
    return image


def write_fake_sweep(out: Path) -> Path:
    """The sweep above as the runner writes it, plus a duplicate from a resume and a torn last line."""
    (out / "runs").mkdir(parents=True)
    (out / "images").mkdir()
    for config, (_, _, _, predictions) in CONFIGS.items():
        lines = [json.dumps(record(config, sample, prediction)) for sample, prediction in predictions.items()]
        if config == "pool-k0.5":  # resumed: s1 was first written with another answer; the later record wins
            lines.insert(0, json.dumps(record(config, "s1", "green")))
            lines.append('{"config": "pool-k0.5", "sample": "s3", "pred')  # killed mid-write
        (out / "runs" / f"{config}.jsonl").write_text("\n".join(lines) + "\n")
    for seed, sample in enumerate(["s0", "s1", "s2"]):
        draw_image(seed).save(out / "images" / f"{sample}.png")
    (out / "sweep.json").write_text(json.dumps({
        "model": "sieve-mini", "suite": "qa", "device": "cpu", "dtype": "float32",
        "versions": {"tokensieve": "0.1.0"}, "command": "tokensieve bench --methods fastervlm,pool"}))
    return out


@pytest.fixture
def sweep(tmp_path) -> Path:
    return write_fake_sweep(tmp_path / "sweep")


@pytest.fixture
def summary(sweep) -> pd.DataFrame:
    return summarise(read_runs(sweep)).set_index("config")


def test_accuracy_retention_agreement(summary):
    assert list(summary.index) == ["baseline", "fastervlm-k4", "fastervlm-k8", "pool-k0.25", "pool-k0.5"]
    k4, k8 = summary.loc["fastervlm-k4"], summary.loc["fastervlm-k8"]
    assert (summary.loc["baseline", "accuracy"], summary.loc["baseline", "retention"]) == (0.75, 1.0)
    assert summary.loc["baseline", "agreement"] == 1.0
    # k4 right on s0, s1, s3; agrees on s0 ("Red." is "red") and s3 ("two" is "2").
    assert (k4["accuracy"], k4["retention"], k4["agreement"]) == (0.75, 1.0, 0.5)
    assert (k8["accuracy"], k8["retention"], k8["agreement"]) == (0.5, 0.5 / 0.75, 0.75)
    assert (k4["method"], k4["keep"], k4["tokens_kept"], k4["n"]) == ("fastervlm", "4", 4.0, 4)


def test_flops_memory_and_kv_cache(summary):
    k4 = summary.loc["fastervlm-k4"]
    assert k4["prefill_gflops"] == 14.0 and k4["prefill_flops_ratio"] == 14 / 26 and k4["vision_gflops"] == 5.0
    assert summary.loc["baseline", "prefill_flops_ratio"] == 1.0
    assert k4["peak_memory_mib"] == 200.0  # the largest over samples; s3 has none (a CPU-style null)
    assert k4["kv_cache_mib"] == 14 * 1024 / MIB


def test_timings_are_medians_without_warmup(summary):
    k4 = summary.loc["fastervlm-k4"]
    assert math.isclose(k4["prefill_ms"], 20.0)  # median of 10, 30, 20 ms; the 9 s warm-up is ignored
    assert math.isclose(k4["decode_ms_per_token"], 3.0)  # median of 2 and 4 ms; s2 has none
    assert math.isclose(k4["selection_ms"], 2.0)
    assert k4["n_timed"] == 3


def test_partial_sweep_counts_only_samples_the_baseline_answered(summary):
    quarter, half = summary.loc["pool-k0.25"], summary.loc["pool-k0.5"]
    # pool-k0.25: s0, s1, s2 (s9 is not in the baseline); right on s0 only; baseline right on s0, s2.
    assert quarter["n"] == 3 and quarter["accuracy"] == 1 / 3 and quarter["baseline_accuracy"] == 2 / 3
    assert quarter["retention"] == 0.5 and quarter["agreement"] == 1 / 3
    # pool-k0.5: s0, s1 (s1's later record "blue"; the torn s3 line dropped); baseline right on s0 only.
    assert half["n"] == 2 and (half["accuracy"], half["retention"], half["agreement"]) == (0.0, 0.0, 0.5)
    assert quarter["keep"] == "0.25"


def test_partial_credit_counts_where_a_benchmark_gives_it(sweep):
    """TextVQA-style records carry a `score` (VQA accuracy); accuracy is its mean, `correct` elsewhere."""
    baseline = sweep / "runs" / "baseline.jsonl"
    records = [json.loads(line) for line in baseline.read_text().splitlines()]
    records[1]["score"] = 0.6  # s1: wrong as an exact match, 60% by the benchmark's own measure
    baseline.write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = summarise(read_runs(sweep)).set_index("config")
    assert math.isclose(summary.loc["baseline", "accuracy"], (1 + 0.6 + 1 + 1) / 4)
    assert math.isclose(summary.loc["fastervlm-k4", "retention"], 0.75 / ((1 + 0.6 + 1 + 1) / 4))


def test_per_category(sweep):
    table = per_category(read_runs(sweep)).set_index(["config", "category"])
    colour, counting = table.loc[("fastervlm-k4", "colour")], table.loc[("fastervlm-k4", "counting")]
    assert (colour["accuracy"], colour["baseline_accuracy"], colour["retention"]) == (1.0, 0.5, 2.0)
    assert (counting["accuracy"], counting["baseline_accuracy"], counting["retention"]) == (0.5, 1.0, 0.5)
    assert colour["chance"] == CHANCE["colour"]
    assert list(table.loc["baseline"].index) == ["colour", "counting"]  # skill order of the QA suite


def test_chance_only_for_the_qa_suite(sweep):
    """A benchmark whose categories merely include a skill's name (MME's "existence") gets no chance level."""
    assert chance_level(read_runs(sweep)) == (CHANCE["colour"] + CHANCE["counting"]) / 2
    for path in (sweep / "runs").glob("*.jsonl"):
        path.write_text(path.read_text().replace('"category": "counting"', '"category": "celebrity"'))
    runs = read_runs(sweep)
    assert chance_level(runs) is None and per_category(runs)["chance"].isna().all()


def test_oracle_needs_agreement_at_every_larger_budget(sweep):
    runs = read_runs(sweep)
    table = oracle(runs).set_index(["method", "sample"])
    needed = table["oracle_config"].to_dict()
    assert needed == {
        ("fastervlm", "s0"): "fastervlm-k4",  # agrees at 4 and 8
        ("fastervlm", "s1"): "fastervlm-k8",  # disagrees at 4
        ("fastervlm", "s2"): "fastervlm-k8",
        ("fastervlm", "s3"): NEVER,  # agrees at 4 but not at 8: a lucky guess is not a sufficient budget
        ("pool", "s0"): NEVER,  # only s0 and s1 have both pool budgets
        ("pool", "s1"): "pool-k0.5",
    }
    assert table.loc[("fastervlm", "s0"), "oracle_tokens"] == 4 and table.loc[("pool", "s1"), "oracle_keep"] == "0.5"
    shares = distribution(oracle(runs), summarise(runs)).set_index(["method", "config"])
    assert list(shares.loc["fastervlm", "samples"]) == [1, 2, 1]  # k4, k8, never
    assert list(shares.loc["fastervlm", "cumulative_fraction"]) == [0.25, 0.75, 1.0]


def test_pareto_front():
    #            fast+bad  slow+good  dominated  no timing  ties the first on latency but better
    latency = [10.0, 30.0, 35.0, float("nan"), 10.0]
    accuracy = [0.5, 0.9, 0.8, 1.0, 0.6]
    assert pareto_front(latency, accuracy) == [1, 4]


def test_runs_without_a_baseline_or_with_a_broken_line_are_refused(sweep):
    (sweep / "runs" / "baseline.jsonl").unlink()
    with pytest.raises(ValueError, match="baseline"):
        read_runs(sweep)
    (sweep / "runs" / "pool-k0.5.jsonl").write_text('{"broken\n' + json.dumps(record("pool-k0.5", "s0", "red")) + "\n")
    with pytest.raises(ValueError, match="pool-k0.5.jsonl:1"):
        read_runs(sweep)


def test_write_outputs_writes_every_file(sweep):
    terminal = io.StringIO()
    write_outputs(sweep, Console(file=terminal, width=250))
    assert "fastervlm" in terminal.getvalue() and "75.0%" in terminal.getvalue()  # the k8 agreement
    summary = pd.read_csv(sweep / "summary.csv")
    assert list(summary["config"]) == ["baseline", "fastervlm-k4", "fastervlm-k8", "pool-k0.25", "pool-k0.5"]
    assert "| pool | 0.25 | 4.0 | 0.333 | 50.0% | 33.3% |" in (sweep / "summary.md").read_text()
    assert len(pd.read_csv(sweep / "per_category.csv")) == 9  # two categories each; pool-k0.5 has colour only
    assert len(pd.read_csv(sweep / "oracle.csv")) == 6
    for name in ["accuracy_vs_tokens", "accuracy_vs_latency", "retention_heatmap", "oracle_cdf"]:
        assert Image.open(sweep / "plots" / f"{name}.png").size[0] > 100
        assert (sweep / "plots" / f"{name}.svg").read_text().lstrip().startswith("<?xml")


def test_legends_stand_beside_the_plotted_lines(sweep, monkeypatch):
    figures = []
    real_save = plots.save
    monkeypatch.setattr(plots, "save", lambda figure, *args: figures.append(figure) or real_save(figure, *args))
    write_outputs(sweep, Console(file=io.StringIO()))
    with_legend = [figure.axes[0] for figure in figures if figure.axes[0].get_legend() is not None]
    assert len(with_legend) == 3  # accuracy vs tokens, accuracy vs latency, oracle CDF
    for ax in with_legend:
        FigureCanvasAgg(ax.figure).draw()
        assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1


def test_a_sweep_stopped_after_the_baseline_still_reports(sweep):
    for path in (sweep / "runs").glob("*-k*.jsonl"):
        path.unlink()
    write_outputs(sweep, Console(file=io.StringIO()))
    assert list(pd.read_csv(sweep / "summary.csv")["config"]) == ["baseline"]
    assert "No reduced configuration" in (sweep / "report.html").read_text()


def test_report_is_self_contained(sweep):
    write_outputs(sweep, Console(file=io.StringIO()))
    page = (sweep / "report.html").read_text()
    assert "<script" not in page and "http://" not in page and "https://" not in page and "<link" not in page
    sources = [source.split('"')[0] for source in page.split(' src="')[1:]]
    assert len(sources) == 4 + 5 + 5 + 4  # plots; per sample the baseline and each configuration that answered it
    for source in sources:  # Chromium shows a truncated PNG without complaint; PIL decodes each one in full
        header, data = source.split(",", 1)
        assert header in ("data:image/png;base64", "data:image/jpeg;base64")
        Image.open(io.BytesIO(base64.b64decode(data))).load()
    assert "tokensieve bench --methods fastervlm,pool" in page and "What colour is the circle?" in page


def test_gallery_greys_the_dropped_patches(sweep):
    write_outputs(sweep, Console(file=io.StringIO()))
    page = (sweep / "report.html").read_text()
    # s0's fastervlm-k4 cell: kept patches 0-3 (the top row), so the bottom-left corner is greyed red.
    uri = page.split('alt="fastervlm-k4" src="data:image/jpeg;base64,')[1].split('"')[0]
    cell = Image.open(io.BytesIO(base64.b64decode(uri))).convert("RGB")
    kept_pixel, dropped_pixel = cell.getpixel((2, 2)), cell.getpixel((2, cell.height - 3))
    assert all(abs(a - b) <= 12 for a, b in zip(kept_pixel, (255, 0, 0)))
    greyed = tuple(round((255 * 64 + 128 * 191) / 255) if c else round(128 * 191 / 255) for c in (1, 0, 0))
    assert all(abs(a - b) <= 12 for a, b in zip(dropped_pixel, greyed))
    assert page.count('<div class="sample">') == 3  # only s0, s1, s2 have saved images
