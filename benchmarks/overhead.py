"""Selection overhead: prefill time of each method against feeding the same number of tokens with
no selection at all.

The ideal of a pre-LLM method at budget k runs the same vision tower and projector, then the stock
model on a prompt with only k image placeholders and the first k projected features (no hooks, no
scoring). The ideal of an in-LLM method (FastV, PyramidDrop, a chain) is staged: the same tower,
projector and embeddings, then the decoder's own layers called one by one, each fed the tokens the
method kept for it (fixed gathers read from a run of the method, no scoring), so every layer runs at
its own length. Each method runs through tokensieve on the full 576-placeholder prompt. Runs alternate
(ideal, method, ideal, method, ...) and each pair gives one ratio, so drift on a shared machine
cancels within the pair; the figure is the median paired ratio with a distribution-free 95%
interval for it (a method is within 3% of its ideal when the interval's upper end is). The
selection's own time comes from ``run.stats``.

    python benchmarks/overhead.py                    # LLaVA-shaped, hidden 512, 8 layers, CPU
    python benchmarks/overhead.py --device cuda --dtype bfloat16 --model llava-1.5-7b
"""

from __future__ import annotations

import statistics

import torch
import typer
from rich.console import Console
from rich.table import Table
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPooling

import tokensieve as ts
from shapes import describe, model_and_inputs, paired_ratios, timed
from tokensieve.engine.compat import CACHE_ARGUMENT
from tokensieve.demo_model import IMAGE_TOKEN

console = Console()
#: the demo model's tower has 6 layers: methods whose defaults name deeper vision layers get the same depth
#: fraction there (HiPrune's object layer 9 of 24 -> 3 of 6; VTC-CLS from -8 -> -4 of 6)
DEMO_ARGUMENTS = {"object_layer": 3, "first_layer": -4}


def _ideal_inputs(inputs: dict, k: int) -> dict:
    """The same prompt with k image placeholders instead of 576."""
    ids = inputs["input_ids"]
    image = ids[0] == IMAGE_TOKEN
    first = int(image.nonzero()[0])
    kept = torch.cat([ids[:, :first], ids[:, first : first + k], ids[:, first + int(image.sum()) :]], dim=1)
    return {"input_ids": kept, "attention_mask": torch.ones_like(kept)}


def staged_ideal(model, inputs: dict, record):
    """The stock layers each fed what ``record``'s stages kept for them (batch of identical rows); the run returns
    its cache."""
    inner = model.model
    decoder = inner.language_model
    ids = inputs["input_ids"]
    image = ids[0] == IMAGE_TOKEN
    first, length = int(image.nonzero()[0]), ids.shape[1]
    text = (~image).nonzero().squeeze(1)
    # each stage's decoder-input positions, and where they sit in the previous stage's (None: a restoring stage
    # brings back tokens the previous one lacks, from the states they had when dropped)
    gathers, seen = {}, torch.arange(length, device=ids.device)
    for stage in record.stages:
        kept = torch.cat([text, first + stage.kept.to(ids.device)]).sort().values
        gathers[stage.layer or 0] = (kept, torch.searchsorted(seen, kept) if bool(torch.isin(kept, seen).all()) else None)
        seen = kept
    restores = any(index is None for _, index in gathers.values())

    def run():
        features = inner.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        embeds = inner.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter((ids == IMAGE_TOKEN).unsqueeze(-1), torch.cat(list(features)).to(embeds.dtype))
        positions = torch.arange(length, device=ids.device).unsqueeze(0)
        all_embeddings = decoder.rotary_emb(embeds, positions)
        embeddings, hidden, stash = all_embeddings, embeds, embeds.clone() if restores else None
        cache = DynamicCache(config=decoder.config)
        for j, layer in enumerate(decoder.layers):
            if j in gathers:
                kept, index = gathers[j]
                if stash is not None:
                    stash[:, positions[0]] = hidden
                hidden = hidden[:, index] if index is not None else stash[:, kept]
                positions = kept.unsqueeze(0)
                embeddings = tuple(t[:, kept] for t in all_embeddings)
            hidden = layer(hidden, attention_mask=None, position_embeddings=embeddings, position_ids=positions,
                           use_cache=True, **{CACHE_ARGUMENT: cache})
        model.lm_head(decoder.norm(hidden))
        return cache

    return run


def _build(spec: str, k: int, model_name: str):
    """The method at budget ``k``; on the demo model, a bare name gets :data:`DEMO_ARGUMENTS` it takes."""
    if model_name != "demo" or ":" in spec or "+" in spec:
        return ts.build(spec, keep=k)
    [info] = [info for info in ts.list_methods() if info.name == spec]
    return ts.build(spec, keep=k, **{name: value for name, value in DEMO_ARGUMENTS.items() if name in info.defaults})


def main(
    methods: str = typer.Option(None, help="comma-separated specs; default: every pre-LLM and in-LLM method in the registry"),
    keeps: str = typer.Option("64,192"),
    repeats: int = typer.Option(9, help="timed (ideal, method) pairs per configuration"),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32"),
    model_name: str = typer.Option("demo", "--model", help="demo | llava-1.5-7b (the ideal is built for LLaVA prompts)"),
    batch: int = typer.Option(1, help="prompts per forward, each with its image"),
) -> None:
    if model_name not in ("demo", "llava-1.5-7b"):
        raise typer.BadParameter(f"--model {model_name}: the ideal prompt is built for LLaVA; use demo or llava-1.5-7b "
                                 "(benchmarks/in_llm.py times other models against the stock one)")
    # in_vision methods shorten the tower itself, which both ideals run in full: benchmarks/vision_merge.py times them
    methods = methods or ",".join(info.name for info in ts.list_methods() if info.stage != "in_vision")
    model, inputs = model_and_inputs(model_name, device, dtype, batch)
    console.print(describe(model, inputs, device, dtype))

    def ideal(k: int):
        small = _ideal_inputs(inputs, k)

        def run():
            features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
            encoded = BaseModelOutputWithPooling(pooler_output=[f[:k] for f in features])
            model(**small, mm_encoder_outputs={"image": encoded})

        return run

    stock_seconds = statistics.median(timed(lambda: model(**inputs), device) for _ in range(repeats))
    table = Table(title=f"prefill vs the ideal (stock, all 576 tokens: {stock_seconds * 1e3:.0f} ms)")
    for column in ("method", "keep", "ideal ms", "method ms", "vs ideal (95% interval)", "selection ms", "vs stock"):
        table.add_column(column, justify="right")
    for k in map(int, keeps.split(",")):
        for name in ts.split_specs(methods):
            sieve = _build(name, k, model_name)
            try:
                with ts.apply(model, sieve) as warm_up:
                    model(**inputs)
            except ValueError as refusal:  # a method this model cannot serve: say why, time the others
                table.add_row(name, str(k), "-", "-", f"refused: {str(refusal).split(' (')[0]}", "-", "-")
                continue
            staged = isinstance(sieve, ts.Chain) or sieve.stage == "in_llm"
            ideal_run = staged_ideal(model, inputs, warm_up.stats.images[0]) if staged else ideal(k)
            ideal_run()  # warm-up
            ideal_times, method_times, selection_times = [], [], []
            for _ in range(repeats):
                ideal_times.append(timed(ideal_run, device))
                with ts.apply(model, sieve) as handle:  # hooks go on and off outside the timed call
                    method_times.append(timed(lambda: model(**inputs), device))
                selection_times.append(handle.stats.selection_seconds)
            ideal_ms = statistics.median(ideal_times) * 1e3
            method_ms = statistics.median(method_times) * 1e3
            selection_ms = statistics.median(selection_times) * 1e3
            ratio, low, high = paired_ratios(method_times, ideal_times)
            table.add_row(
                name, str(k), f"{ideal_ms:.1f}", f"{method_ms:.1f}", f"{ratio - 1:+.1%} ({low - 1:+.1%} to {high - 1:+.1%})",
                f"{selection_ms:.2f}", f"{stock_seconds * 1e3 / method_ms:.2f}x",
            )
    console.print(table)


if __name__ == "__main__":
    typer.run(main)
