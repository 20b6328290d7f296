"""`tokensieve bench` outputs: aggregation against hand-computed numbers, the oracle rule, the files written.

The fake sweep: four QA samples (s0, s1 colour; s2, s3 counting) on a 4x4 grid (16 tokens).
baseline answers s0 red (right), s1 blue (wrong), s2 3 (right), s3 2 (right): accuracy 3/4.
fastervlm keeps 4 and 8 tokens on every sample; pool keeps 4 (ratio 0.25) and 8 (0.5) on only
some samples and answered s9, which the baseline never saw: a partial sweep.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image, ImageDraw
from rich.console import Console

from matplotlib.collections import PathCollection
from matplotlib.text import Text
from matplotlib.transforms import Bbox
from scipy.stats import binomtest

from tokensieve.bench.oracle import NEVER, distribution, oracle
from tokensieve.bench.outputs import write_outputs
from tokensieve.bench import plots
from tokensieve.bench.plots import pareto_front
from tokensieve.bench.summary import by_budget, chance_level, headline, per_category, read_runs, summarise, wilson_interval
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
        "peak_memory_added_bytes": {"s2": 200 * MIB, "s3": None}.get(sample, (100 + kept) * MIB),
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
        "model": "sieve-mini", "suite": "qa", "split": "test", "samples": 4, "device": "cpu", "dtype": "float32",
        "versions": {"tokensieve": "0.1.0"}, "command": "tokensieve bench --methods fastervlm,pool",
        "data": None, "skipped": {}}))  # as the runner writes them for the builtin suite, nothing refused
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


def test_wilson_interval_by_hand():
    """z = 1.959964, z^2 = 3.841459; centre (p + z^2/2n) / (1 + z^2/n), half-width z / (1 + z^2/n) * root,
    root = sqrt(p(1-p)/n + z^2/4n^2). 14 of 20: z^2/n = 0.192073, centre 0.796037 / 1.192073 = 0.667775,
    half-width 1.644164 * sqrt(0.0105 + 0.002401) = 1.644164 * 0.113582 = 0.186748. 16 of 20: centre
    0.896037 / 1.192073 = 0.751662, half-width 1.644164 * 0.101985 = 0.167680. 0 of 2: z^2/n = 1.920729,
    centre 0.960365 / 2.920729 = 0.328810 = the half-width 0.671053 * 0.489991, so [0, 0.657620].
    n = 20 cannot tell 0.7 from 0.8: each lies inside the other's interval."""
    assert wilson_interval(0.7, 20) == pytest.approx((0.481027, 0.854523), abs=2e-6)
    assert wilson_interval(0.8, 20) == pytest.approx((0.583983, 0.919342), abs=2e-6)
    assert wilson_interval(0.0, 2) == pytest.approx((0.0, 0.657620), abs=2e-6)
    assert all(math.isnan(bound) for bound in wilson_interval(0.5, 0))
    for correct, n in [(14, 20), (0, 2), (3, 4), (1, 3), (70, 70), (63, 70)]:  # whole counts: scipy agrees
        expected = binomtest(correct, n).proportion_ci(0.95, method="wilson")
        assert wilson_interval(correct / n, n) == pytest.approx((expected.low, expected.high), abs=1e-12)


def test_accuracy_intervals_come_from_each_rows_sample_count(sweep, summary):
    k4, quarter = summary.loc["fastervlm-k4"], summary.loc["pool-k0.25"]
    assert (k4["accuracy_low"], k4["accuracy_high"]) == pytest.approx((0.300642, 0.954413), abs=2e-6)  # 3 of 4
    assert (quarter["accuracy_low"], quarter["accuracy_high"]) == pytest.approx((0.061492, 0.792340), abs=2e-6)
    counting = per_category(read_runs(sweep)).set_index(["config", "category"]).loc[("pool-k0.25", "counting")]
    assert (counting["n"], counting["accuracy_low"]) == (1, 0.0)  # 0 of 1: the high end is z^2 / (1 + z^2)
    assert counting["accuracy_high"] == pytest.approx(3.841459 / 4.841459, abs=2e-6)


def headline_input(rows: list[tuple]) -> pd.DataFrame:
    """A summary with what the headline reads: (config, method, keep, tokens kept, accuracy, prefill ms)."""
    return pd.DataFrame(rows, columns=["config", "method", "keep", "tokens_kept", "accuracy", "prefill_ms"])


def test_headline_names_the_most_accurate_configuration_per_budget():
    table = headline(headline_input([
        ("baseline", "baseline", "", 16.0, 0.9, 100.0),
        ("a-k8", "a", "8", 8.0, 0.7, 30.0),
        ("b-k8", "b", "8", 8.0, 0.8, 40.0),
        ("c-k8", "c", "8", 8.0, 0.8, 35.0),  # as accurate as b and faster: it leads, b is named
        ("c-k4", "c", "4", 4.0, 0.5, 20.0),
        ("a-k4", "a", "4", 4.0, 0.45, 15.0),  # faster but less accurate: accuracy decides
        ("a-k0.5+b", "a:0.5+b", "", 8.0, 0.75, 50.0),  # a chain, at the 8 tokens it kept
        ("a-k0.1", "a", "0.1", 1.6, 0.3, 10.0),  # the only configuration at its budget
    ]))
    assert list(table["budget"]) == ["all", "8", "4", "0.1"]
    assert list(table["leader"]) == ["baseline", "c (= b)", "c", "a (alone at this budget)"]
    assert list(table["config"]) == ["baseline", "c-k8", "c-k4", "a-k0.1"]
    assert list(table["speedup"]) == [1.0, 100 / 35, 5.0, 10.0]


def test_by_budget_puts_every_method_at_every_budget_in_one_table():
    rows = pd.DataFrame([
        # config, method, keep, tokens kept, tokens per layer, accuracy, retention
        ("baseline", "baseline", "", 16.0, 16.0, 0.8, 1.0),
        ("a-k8", "a", "8", 8.0, 8.0, 0.6, 0.75),
        ("a-k4", "a", "4", 4.0, 4.0, 0.4, 0.5),
        ("b-k8", "b", "8", 8.0, 12.4, 0.7, 0.875),  # an in-LLM method: its layers saw 12.4 tokens on average
        ("b-kadaptive(mass=0.9)", "b", "adaptive(mass=0.9)", 5.25, 5.25, 0.5, 0.625),
    ], columns=["config", "method", "keep", "tokens_kept", "tokens_per_layer", "accuracy", "retention"])
    table = by_budget(rows)
    assert list(table.columns) == ["method", "8", "adaptive(mass=0.9)", "4"]  # the most tokens first
    assert table.values.tolist() == [
        ["baseline (16 tokens)", "0.800", "0.800", "0.800"],
        ["b", "0.700 (88%, 12 per layer)", "0.500 (62%, 5.2 tokens)", ""],  # mean retention 0.75 > a's 0.625
        ["a", "0.600 (75%)", "", "0.400 (50%)"],
    ]


def test_flops_memory_and_kv_cache(summary):
    k4 = summary.loc["fastervlm-k4"]
    assert k4["prefill_gflops"] == 14.0 and k4["prefill_flops_ratio"] == 14 / 26 and k4["vision_gflops"] == 5.0
    assert summary.loc["baseline", "prefill_flops_ratio"] == 1.0
    assert k4["peak_memory_added_mib"] == 200.0  # the largest over samples; s3 has none (a null)
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
    # records without tokens_llm_input and tokens_per_layer (written before they were): tokens kept stands for both
    assert "| pool | 0.25 | 4.0 | 4.0 | 4.0 | 0.333 | 0.061–0.792 | 50.0% | 33.3% |" in (sweep / "summary.md").read_text()
    assert len(pd.read_csv(sweep / "per_category.csv")) == 9  # two categories each; pool-k0.5 has colour only
    assert len(pd.read_csv(sweep / "oracle.csv")) == 6
    for name in ["accuracy_vs_tokens", "accuracy_vs_latency", "retention_heatmap", "oracle_cdf"]:
        assert Image.open(sweep / "plots" / f"{name}.png").size[0] > 100
        assert (sweep / "plots" / f"{name}.svg").read_text().lstrip().startswith("<?xml")


def test_rewriting_the_outputs_gives_the_same_plot_files(sweep):
    """Re-rendering a sweep (docs/results) changes no plot file that its records did not change."""
    write_outputs(sweep, Console(file=io.StringIO()))
    first = {path.name: path.read_bytes() for path in (sweep / "plots").iterdir()}
    write_outputs(sweep, Console(file=io.StringIO()))
    assert {path.name: path.read_bytes() for path in (sweep / "plots").iterdir()} == first


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


def plot_summary(rows: list[tuple]) -> pd.DataFrame:
    """A summary with what the accuracy plots read: (config, method, tokens kept, accuracy, prefill ms), n = 20."""
    table = pd.DataFrame(rows, columns=["config", "method", "tokens_kept", "accuracy", "prefill_ms"])
    bounds = [wilson_interval(accuracy, 20) for accuracy in table["accuracy"]]
    return table.assign(accuracy_low=[low for low, _ in bounds], accuracy_high=[high for _, high in bounds])


@pytest.fixture
def drawn(monkeypatch) -> list:
    """The figures the plot functions save, drawn, so that their artists have their final positions."""
    figures = []
    real_save = plots.save

    def save_and_keep(figure, *args):
        name = real_save(figure, *args)
        FigureCanvasAgg(figure).draw()
        figures.append(figure)
        return name

    monkeypatch.setattr(plots, "save", save_and_keep)
    return figures


def test_methods_with_equal_values_both_stay_visible(tmp_path, drawn):
    twins = [("baseline", "baseline", 16.0, 0.9, 100.0)] + [
        (f"{method}-k{tokens}", method, float(tokens), accuracy, 10.0 + tokens)
        for method in ("divprune", "fastervlm") for tokens, accuracy in [(4, 0.6), (8, 0.75)]]
    summary = plot_summary(twins)
    plots.accuracy_vs_tokens(summary, tmp_path, None, plots.method_styles(summary))
    series = {container.get_label(): container.lines[0] for container in drawn[0].axes[0].containers}
    divprune, fastervlm = series["divprune"], series["fastervlm"]
    assert list(divprune.get_ydata()) == list(fastervlm.get_ydata()) == [0.6, 0.75]
    assert all(a != b for a, b in zip(divprune.get_xdata(), fastervlm.get_xdata()))  # drawn side by side
    assert all(abs(math.log2(x / tokens)) <= 0.2 for x, tokens in zip(divprune.get_xdata(), [4, 8]))  # near their count
    assert divprune.get_marker() != fastervlm.get_marker() and divprune.get_linestyle() != fastervlm.get_linestyle()


def marker_boxes(ax) -> list[Bbox]:
    """Every scatter marker's square in display pixels: a marker of size s (points^2) is sqrt(s) points wide."""
    boxes = []
    for collection in (c for c in ax.collections if isinstance(c, PathCollection)):
        sizes = collection.get_sizes()
        for index, (x, y) in enumerate(ax.transData.transform(collection.get_offsets())):
            half = math.sqrt(sizes[index % len(sizes)]) / 2 * ax.figure.dpi / 72
            boxes.append(Bbox.from_extents(x - half, y - half, x + half, y + half))
    return boxes


def assert_labels_clear(ax, expected: set[str]) -> None:
    labels = {text.get_text(): Text.get_window_extent(text) for text in ax.texts}  # the text, not its leader line
    assert set(labels) == expected
    markers, inside = marker_boxes(ax), ax.get_window_extent()
    for name, box in labels.items():
        assert not any(box.overlaps(marker) for marker in markers), name
        assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1, name
    for (name, box), (other, other_box) in itertools.combinations(labels.items(), 2):
        assert not box.overlaps(other_box), (name, other)


def test_pareto_labels_stand_clear_of_every_marker_and_of_each_other(tmp_path, drawn):
    # A staircase of six front configurations 4-8 ms apart, each crowded by two dominated neighbours.
    crowd = [("baseline", "baseline", 64.0, 0.90, 150.0)]
    for step, (ms, accuracy) in enumerate([(40, 0.40), (46, 0.52), (52, 0.61), (58, 0.70), (62, 0.78), (70, 0.84)]):
        crowd += [(f"a-k{step}", "a", 4.0 * (step + 1), accuracy, float(ms)),
                  (f"b-k{step}", "b", 4.0 * (step + 1), accuracy - 0.03, ms + 2.0),
                  (f"c-k{step}", "c", 4.0 * (step + 1), accuracy - 0.06, ms + 1.0)]
    summary = plot_summary(crowd)
    plots.accuracy_vs_latency(summary, tmp_path, 0.25, plots.method_styles(summary))
    assert_labels_clear(drawn[0].axes[0], {"baseline"} | {f"a-k{step}" for step in range(6)})


def test_the_sweeps_pareto_label_stands_clear(sweep, drawn):
    write_outputs(sweep, Console(file=io.StringIO()))
    latency_plot = next(figure for figure in drawn if figure.axes[0].get_title() == "Accuracy vs prefill latency")
    assert_labels_clear(latency_plot.axes[0], {"fastervlm-k4"})  # 20 ms at 0.75: as accurate as the baseline, faster


def break_colour_for_the_baseline(sweep: Path) -> None:
    """The baseline now answers s0 wrongly too: 0 of 2 colour questions, so colour has no retention."""
    baseline = sweep / "runs" / "baseline.jsonl"
    baseline.write_text(baseline.read_text().replace('"prediction": "red", "correct": true',
                                                     '"prediction": "pink", "correct": false'))


def test_undefined_retention_is_explained_and_shows_the_accuracy(sweep, drawn):
    break_colour_for_the_baseline(sweep)
    write_outputs(sweep, Console(file=io.StringIO()))
    categories = pd.read_csv(sweep / "per_category.csv").set_index(["config", "category"])
    assert categories.loc[("baseline", "colour"), "baseline_correct"] == 0
    assert categories.xs("colour", level="category")["retention"].isna().all()
    heatmap = next(figure for figure in drawn if figure.axes[0].get_title().startswith("Retention per category"))
    cells = [text.get_text() for text in heatmap.axes[0].texts]
    # rows fastervlm-k4, -k8, pool-k0.25, -k0.5; columns colour, counting (pool-k0.5 answered no counting)
    assert cells == ["(100%)", "50%", "(50%)", "50%", "(50%)", "0%", "(0%)", ""]
    page = (sweep / "report.html").read_text()
    assert "Retention is undefined" in page and "colour (the baseline: 0 of 2 right)" in page


def test_report_opens_with_the_headline_and_keeps_only_meaningful_settings(sweep):
    write_outputs(sweep, Console(file=io.StringIO()))
    page = (sweep / "report.html").read_text()
    assert page.index('id="headline"') < page.index('id="summary"') < page.index('id="sweep"')
    assert "sieve-mini on the qa suite (test split, 4 samples), cpu, float32." in page
    settings = page[page.index("<details><summary>sweep.json"):]
    assert ">model<" in settings and ">command<" in settings and ">tokensieve: 0.1.0<" in settings
    assert ">data<" not in settings and ">skipped<" not in settings and "Not run" not in page


def test_refused_configurations_are_named_under_the_headline(sweep):
    described = json.loads((sweep / "sweep.json").read_text())
    (sweep / "sweep.json").write_text(json.dumps({**described, "skipped": {"visionzip-k4": "needs keys"}}))
    write_outputs(sweep, Console(file=io.StringIO()))
    page = (sweep / "report.html").read_text()
    assert page.index("Not run (refused by the model): visionzip-k4: needs keys") < page.index('id="summary"')


def test_records_without_a_peak_memory_leave_the_column_empty(sweep):
    """Records from before the meter measured the added peak (docs/results) carry none."""
    for path in (sweep / "runs").glob("*.jsonl"):
        path.write_text(re.sub(r'"peak_memory_added_bytes": [^,]+, ', "", path.read_text()))
    write_outputs(sweep, Console(file=io.StringIO()))
    assert pd.read_csv(sweep / "summary.csv")["peak_memory_added_mib"].isna().all()
    assert "| baseline | - | 16.0 | 16.0 | 16.0 | 0.750 | 0.301–0.954 | 100.0% | 100.0% | 26.00 | 100.0% | 5.00 | 50.0 | 1.00 | - |" in (
        sweep / "summary.md").read_text()


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
