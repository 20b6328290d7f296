"""Prefill of a video: the pre-LLM video methods at a quarter of its tokens against their ideal, and the ``frames``
stage's vision tower time as frames are dropped (issue 23, "Speed").

Model (``--model``): by default a Qwen2-VL-shaped tiny-but-wide model (benchmarks/shapes.py, ``qwen2_vl_7b(wide=True)``):
Qwen2-VL-7B's video token layout, an 8x512 decoder and a 2x128 tower, random weights, batch 1, CPU float32, SDPA. The
prompt holds a 360p video of ``--frames`` frames as the processor lays it out: 644x364 pixels, pairs of frames (the
temporal patch) of 26x46 patches, 13x23 = 299 tokens each; 16 frames are 8 pairs, 2,392 tokens. ``qwen2.5-vl-7b`` and
``qwen2-vl-7b`` are the real sizes (random weights from the real configs, built on ``--device`` in ``--dtype``).

Methods: each pre-LLM method at ``--keep`` against its ideal, the stock model whose decoder is fed only the tokens the
method kept (a pre-hook on the language model gathers the input embeddings, the mask and all mrope position rows at
the kept positions, read from a run of the method: ``shapes.decoder_fed_only``). Tower, projector and embeddings run in
full in both, as the method needs them. Once per method the ideal's last logits are checked against the method's
(with the method's own decoder inputs for a method that merges or pools, whose kept tokens are new features): the ideal is the same
computation. Runs alternate (ideal, method, ...) and each pair gives one ratio; the figure is the median paired ratio
with a distribution-free 95% interval, and "vs stock" the speed-up over the stock model given every token.

Frames: ``uniform_frames`` keeping t, t/2 and t/4 of the video's t frame pairs before the tower, against the stock
model given a video of only those frames (its ideal: the tower and the decoder both run on fewer; on Qwen2.5-VL its
pairs are spaced as the kept ones, so the video's tokens sit at the same temporal positions). The vision tower's own
time is read by hooks around its forward, in both and in a stock pass of the tower over the whole video in each repeat:
"tower vs stock", the median paired ratio of the method's tower time to that, should be close to the share of frames
kept. Once per frame count the method's last logits are checked against the stock model on the whole video whose
decoder is fed only the kept frames' tokens (each frame pair is encoded on its own, so dropping frames before the tower
or after it gives the same tokens).

Prefill computes the last position's logits only, as ``generate()`` does; on a GPU its time is the time to first
token (the processor aside).

    python benchmarks/video_prefill.py
    python benchmarks/video_prefill.py --methods evs,vidcom2 --parts methods --repeats 15
    python benchmarks/video_prefill.py --device cuda --dtype bfloat16 --model qwen2.5-vl-7b --frames 32
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import torch
import typer
from rich.console import Console
from rich.table import Table

import tokensieve as ts
from shapes import (
    QWEN_VIDEO_SECONDS_PER_PAIR,
    built_on,
    decoder_fed_only,
    describe,
    kept_positions,
    paired_ratios,
    qwen2_5_vl_7b,
    qwen2_vl_7b,
    qwen_video_inputs,
    timed,
)

console = Console()
#: name -> (the model, Qwen2.5-VL's seconds per frame pair or None)
MODELS = {
    "qwen2-vl-wide": (lambda: qwen2_vl_7b(wide=True), None),
    "qwen2.5-vl-wide": (lambda: qwen2_5_vl_7b(wide=True), QWEN_VIDEO_SECONDS_PER_PAIR),
    "qwen2-vl-7b": (qwen2_vl_7b, None),
    "qwen2.5-vl-7b": (qwen2_5_vl_7b, QWEN_VIDEO_SECONDS_PER_PAIR),
}
PARTS = ("methods", "frames")
#: ``uniform`` (per video: every k-th token of the raster) and every pre-LLM video method
METHODS = ("uniform", "evs", "vidcom2", "temporal_merge", "fastvid", "dycoke", "progressive_pool", "bvllm", "quota", "f2c",
           "goldfish", "holitom", "prunevid")
#: how far the ideal's last logits may stray from the method's: float32 kernels agree to rounding; in half precision
#: the same decoder on the same inputs may still take another kernel path (a mask given or not)
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}


@contextmanager
def pre_hooks(module: torch.nn.Module, *hooks):
    """``hooks`` on ``module``'s forward (with keyword arguments) for the duration of the block."""
    handles = [module.register_forward_pre_hook(hook, with_kwargs=True) for hook in hooks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class TowerClock:
    """The seconds the vision tower's latest forward took. Registered after the engine's hooks, its pre-hook runs last
    (the tower already handed only the kept frames) and its post-hook first (before the output is padded back to the
    whole video's length), so it times the tower alone."""

    def __init__(self, tower: torch.nn.Module, device: str):
        self.tower, self.device = tower, device
        self.seconds, self._start = 0.0, 0.0

    def _now(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def __enter__(self) -> "TowerClock":
        self.handles = [self.tower.register_forward_pre_hook(lambda *_: setattr(self, "_start", self._now())),
                        self.tower.register_forward_hook(lambda *_: setattr(self, "seconds", self._now() - self._start),
                                                         prepend=True)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def check_same(ideal: torch.Tensor, method: torch.Tensor, dtype: str, what: str) -> str:
    """Asserts the two last-position logits agree within the dtype's tolerance; says by how much."""
    gap = float((ideal.float() - method.float()).abs().max())
    scale = float(method.float().abs().max())
    if gap > TOLERANCE[dtype] * max(scale, 1.0):
        raise AssertionError(f"{what}: the ideal's last logits differ from the method's by {gap:.3g} (largest logit "
                             f"{scale:.3g}): the ideal is not the method's computation")
    return "equal" if gap == 0 else f"{gap:.1e}"


def video_of(inputs: dict, frames: torch.Tensor, kept: torch.Tensor, video_token: int) -> dict:
    """The same prompt with a video of only ``frames`` (whose tokens are ``kept``); on Qwen2.5-VL the pairs are spaced
    as the kept ones were (evenly kept frames then sit at the same temporal positions)."""
    t, grid_h, grid_w = inputs["video_grid_thw"][0].tolist()
    index = kept_positions(inputs["input_ids"][0], video_token, kept)
    ids = inputs["input_ids"][:, index]
    short = dict(inputs, input_ids=ids, attention_mask=inputs["attention_mask"][:, index],
                 mm_token_type_ids=inputs["mm_token_type_ids"][:, index],
                 pixel_values_videos=inputs["pixel_values_videos"].view(t, grid_h * grid_w, -1)[frames].flatten(0, 1),
                 video_grid_thw=torch.tensor([[len(frames), grid_h, grid_w]], device=ids.device))
    if "second_per_grid_ts" in inputs:
        short["second_per_grid_ts"] = inputs["second_per_grid_ts"] * t / len(frames)
    return short


def methods_table(model, inputs: dict, names: list[str], keep: float, repeats: int, device: str, dtype: str,
                  stock_ms: float) -> Table:
    """Each method against the stock decoder fed only what it kept (see the module's docstring)."""
    prefill = dict(inputs, logits_to_keep=1)
    decoder, video_token = model.model.language_model, model.config.video_token_id
    table = Table(title=f"prefill at {keep:.0%} of the video's tokens vs the ideal (stock: {stock_ms:.0f} ms)")
    for column in ("method", "kept", "ideal ms", "method ms", "vs ideal (95% interval)", "selection ms", "vs stock",
                   "logits vs ideal"):
        table.add_column(column, justify="right")
    for name in names:
        sieve = ts.load(name, keep=keep)
        fed = {}
        try:
            with ts.apply(model, sieve) as warm_up, pre_hooks(decoder, lambda m, a, kw: fed.update(kw)):
                method_logits = model(**prefill).logits[:, -1]
        except ValueError as refusal:  # a method this model cannot serve: say why, time the others
            table.add_row(name, "-", "-", "-", f"refused: {str(refusal)[:60]}", "-", "-", "-")
            continue
        record = warm_up.stats.images[0]
        ideal = decoder_fed_only(model, inputs, record.kept, video_token)
        # a merging or pooling method's kept tokens are new features (its groups' means): the check feeds the ideal the
        # method's decoder input, the timing gathers
        replaced = []

        def substitute(module, args, kwargs):
            replaced.append(not torch.equal(kwargs["inputs_embeds"], fed["inputs_embeds"]))
            return args, dict(kwargs, inputs_embeds=fed["inputs_embeds"])

        with pre_hooks(decoder, ideal, substitute):
            agreement = check_same(model(**prefill).logits[:, -1], method_logits, dtype, name)
        merged = replaced[0]
        ideal_times, method_times, selection_times = [], [], []
        for _ in range(repeats):
            with pre_hooks(decoder, ideal):
                ideal_times.append(timed(lambda: model(**prefill), device))
            with ts.apply(model, sieve) as run:  # hooks go on and off outside the timed call
                method_times.append(timed(lambda: model(**prefill), device))
            selection_times.append(run.stats.selection_seconds)
        ratio, low, high = paired_ratios(method_times, ideal_times)
        method_ms = statistics.median(method_times) * 1e3
        table.add_row(name, f"{record.after}/{record.before}", f"{statistics.median(ideal_times) * 1e3:.0f}",
                      f"{method_ms:.0f}", f"{ratio - 1:+.1%} ({low - 1:+.1%} to {high - 1:+.1%})",
                      f"{statistics.median(selection_times) * 1e3:.1f}", f"{stock_ms / method_ms:.2f}x",
                      agreement + (" (merged)" if merged else ""))
    return table


def frames_table(model, inputs: dict, repeats: int, device: str, dtype: str, stock_ms: float) -> Table:
    """``uniform_frames`` at t, t/2 and t/4 frame pairs against the stock model given only those frames (see the
    module's docstring)."""
    prefill = dict(inputs, logits_to_keep=1)
    decoder, tower, video_token = model.model.language_model, model.model.visual, model.config.video_token_id
    t = int(inputs["video_grid_thw"][0, 0])

    def stock_tower() -> float:  # the tower alone on the whole video, paired with each method run
        with TowerClock(tower, device) as clock:
            model.model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"],
                                           video_grid_thw=inputs["video_grid_thw"])
        return clock.seconds

    table = Table(title=f"frames stage: uniform_frames vs the stock model given only those frames (stock: {stock_ms:.0f} ms)")
    for column in ("frame pairs", "tokens", "stock tower ms", "tower ms ideal", "tower ms method",
                   "tower vs stock (95% interval)", "ideal ms", "method ms", "vs ideal (95% interval)", "vs stock", "logits"):
        table.add_column(column, justify="right")
    for n in sorted({t, max(t // 2, 1), max(t // 4, 1)}, reverse=True):
        sieve = ts.load("uniform_frames", frames=n)
        with ts.apply(model, sieve) as warm_up:
            method_logits = model(**prefill).logits[:, -1]
        record = warm_up.stats.images[0]
        with pre_hooks(decoder, decoder_fed_only(model, inputs, record.kept, video_token)):
            agreement = check_same(model(**prefill).logits[:, -1], method_logits, dtype, f"uniform_frames:frames={n}")
        short = dict(video_of(inputs, record.kept_frames, record.kept, video_token), logits_to_keep=1)
        times = {key: [] for key in ("ideal", "method", "stock tower", "ideal tower", "method tower")}
        for _ in range(repeats):
            times["stock tower"].append(stock_tower())
            with TowerClock(tower, device) as clock:
                times["ideal"].append(timed(lambda: model(**short), device))
            times["ideal tower"].append(clock.seconds)
            with ts.apply(model, sieve), TowerClock(tower, device) as clock:
                times["method"].append(timed(lambda: model(**prefill), device))
            times["method tower"].append(clock.seconds)
        ms = {key: statistics.median(values) * 1e3 for key, values in times.items()}
        ratio, low, high = paired_ratios(times["method"], times["ideal"])
        share, share_low, share_high = paired_ratios(times["method tower"], times["stock tower"])
        table.add_row(f"{n}/{t}", f"{record.after}/{record.before}", f"{ms['stock tower']:.0f}", f"{ms['ideal tower']:.0f}",
                      f"{ms['method tower']:.0f}", f"{share:.2f} ({share_low:.2f} to {share_high:.2f})", f"{ms['ideal']:.0f}",
                      f"{ms['method']:.0f}", f"{ratio - 1:+.1%} ({low - 1:+.1%} to {high - 1:+.1%})",
                      f"{stock_ms / ms['method']:.2f}x", agreement)
    return table


def main(
    methods: str = typer.Option(",".join(METHODS), help="comma-separated pre-LLM methods"),
    keep: float = typer.Option(0.25, help="share of the video's tokens the methods keep"),
    frames: int = typer.Option(16, help="input frames of the video (even: the processor pairs them)"),
    parts: str = typer.Option(",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}"),
    repeats: int = typer.Option(9, help="timed (ideal, method) pairs per configuration"),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32", help=" | ".join(TOLERANCE)),
    model_name: str = typer.Option("qwen2-vl-wide", "--model", help=" | ".join(MODELS)),
) -> None:
    # every argument checked before a model is built: a real-size one takes minutes
    if model_name not in MODELS:
        raise typer.BadParameter(f"--model {model_name}: choose one of {', '.join(MODELS)}")
    if dtype not in TOLERANCE:
        raise typer.BadParameter(f"--dtype {dtype}: choose one of {', '.join(TOLERANCE)}")
    if frames < 2 or frames % 2:
        raise typer.BadParameter(f"--frames {frames}: pass an even count of at least 2 (the processor pairs frames)")
    if repeats < 1:
        raise typer.BadParameter(f"--repeats {repeats}: pass at least 1")
    if device == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("--device cuda: no GPU is visible here; use --device cpu")
    chosen = parts.split(",")
    if unknown := [part for part in chosen if part not in PARTS]:
        raise typer.BadParameter(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    names = methods.split(",") if "methods" in chosen else []
    stages = {info.name: info.stage for info in ts.list_methods()}
    for name in names:
        if name not in stages:
            raise typer.BadParameter(f"--methods: unknown method {name!r}; `tokensieve methods` lists them")
        if stages[name] != "pre_llm":
            raise typer.BadParameter(f"--methods: {name} acts at stage {stages[name]!r}; this part times pre-LLM "
                                     "methods (the frames part times uniform_frames)")

    torch.set_grad_enabled(False)
    build, seconds_per_pair = MODELS[model_name]
    model = built_on(device, dtype, build)
    model.set_attn_implementation("sdpa")
    inputs = {name: value.to(device) for name, value in qwen_video_inputs(frames, seconds_per_pair=seconds_per_pair).items()}
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(getattr(torch, dtype))
    console.print(describe(model, inputs, device, dtype))

    prefill = dict(inputs, logits_to_keep=1)
    model(**prefill)  # warm-up
    stock_ms = statistics.median(timed(lambda: model(**prefill), device) for _ in range(repeats)) * 1e3
    if names:
        console.print(methods_table(model, inputs, names, keep, repeats, device, dtype, stock_ms))
    if "frames" in chosen:
        console.print(frames_table(model, inputs, repeats, device, dtype, stock_ms))


if __name__ == "__main__":
    typer.run(main)
