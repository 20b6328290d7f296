"""In-LLM methods under SDPA against the way their reference code runs them: prefill, KV cache, selection.

Every in-LLM method, at its paper's defaults and at a common budget, is timed four ways on the same
prompt, interleaved so that drift on a shared machine hits all alike:

- (a) tokensieve: the method applied to the stock model, SDPA on (the one attention row a method reads is
  recomputed from the layer's own projections);
- (b) the reference way: the same method and selection with the language model in eager attention and
  ``output_attentions=True``, as the official repositories run it to read their attention maps (every
  layer materialises its heads x L x L weights);
- (c) the ideal: the stock decoder layers called one by one, each fed the tokens the method kept for it
  (overhead.staged_ideal: no hooks, no scoring), whose KV cache holds exactly the kept lengths;
- (d) stock: the unmodified model on every token.

Figures are medians; (a)/(c) and (b)/(a) are median paired ratios with a distribution-free 95% interval.
The KV column compares the bytes the method's prefill added to its cache (``run.stats.kv_bytes``) with the
ideal's cache. ``select ms`` is the methods' own selection (``run.stats.selection_seconds``), shown
against a stock decoder layer's share of the prefill.

    python benchmarks/in_llm_reference.py                 # LLaVA-shaped, hidden 512, 8 layers, CPU
    python benchmarks/in_llm_reference.py --device cuda --dtype bfloat16 --model llava-1.5-7b
"""

from __future__ import annotations

import statistics

import torch
import typer
from rich.console import Console
from rich.table import Table

import tokensieve as ts
from overhead import staged_ideal
from shapes import describe, model_and_inputs, paired_ratios, timed
from tokensieve.engine.cache import cache_bytes

console = Console(width=220)


def configurations(methods: str | None, keep: int) -> list[str]:
    """Each in-LLM method at its defaults and at ``keep`` tokens (or the specs asked for). Freezing methods
    (skip_visual) are left out: their frozen tokens stay keys of every later layer, which no staged ideal of kept
    tokens reproduces, and their reference code needs no attention weights."""
    if methods:
        return ts.split_specs(methods)
    names = [info.name for info in ts.list_methods(stage="in_llm") if not ts.load(info.name).freezes]
    return [spec for name in names for spec in (name, f"{name}:{keep}")]


def main(
    methods: str = typer.Option(None, help="comma-separated specs; default: every in-LLM method, at its defaults and at --keep"),
    keep: int = typer.Option(64, help="the common budget (image tokens of 576)"),
    repeats: int = typer.Option(7, help="timed rounds, each running (a), (b), (c), (d) once"),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32"),
    model_name: str = typer.Option("demo", "--model", help="demo | llava-1.5-7b (the ideal is built for LLaVA prompts)"),
) -> None:
    torch.set_grad_enabled(False)
    model, inputs = model_and_inputs(model_name, device, dtype, 1)
    console.print(describe(model, inputs, device, dtype))
    layers = model.config.get_text_config().num_hidden_layers

    def stock():
        model(**inputs)

    def applied(sieve, reference: bool):
        def run():
            with ts.apply(model, sieve) as handle:
                model(**inputs, output_attentions=reference)
            return handle
        return run

    def reference_way(sieve):
        run = applied(sieve, reference=True)

        def timed_run():
            model.set_attn_implementation({"text_config": "eager"})
            try:
                return timed(run, device)
            finally:
                model.set_attn_implementation({"text_config": "sdpa"})
        return timed_run

    stock()
    stock_ms = statistics.median(timed(stock, device) for _ in range(repeats)) * 1e3
    table = Table(title=f"in-LLM methods: (a) tokensieve SDPA, (b) eager + output_attentions, (c) ideal, (d) stock "
                        f"{stock_ms:.0f} ms; {repeats} interleaved rounds")
    for column in ("method", "tokens/layer", "(a) ms", "(a)/(c) (95%)", "(b) ms", "(b)/(a) (95%)", "(c) ms", "(d)/(a)",
                   "KV = ideal", "select ms", "of a layer"):
        table.add_column(column, justify="right")
    for spec in configurations(methods, keep):
        sieve = ts.build(spec)
        handle = applied(sieve, reference=False)()
        record = handle.stats.images[0]
        ideal = staged_ideal(model, inputs, record)
        ideal_bytes = cache_bytes(ideal())
        reference = reference_way(sieve)
        reference()
        times = {"a": [], "b": [], "c": [], "d": []}
        selection = []
        for _ in range(repeats):
            times["d"].append(timed(stock, device))
            times["a"].append(timed(applied(sieve, reference=False), device))
            times["b"].append(reference())
            times["c"].append(timed(ideal, device))
            selection.append(applied(sieve, reference=False)().stats.selection_seconds)
        ms = {key: statistics.median(values) * 1e3 for key, values in times.items()}
        a_c, a_c_low, a_c_high = paired_ratios(times["a"], times["c"])
        b_a, b_a_low, b_a_high = paired_ratios(times["b"], times["a"])
        select_ms = statistics.median(selection) * 1e3
        per_layer = [record.before] * layers  # image tokens each decoder layer sees
        for stage in record.stages:
            per_layer[stage.layer:] = [stage.after] * (layers - stage.layer)
        table.add_row(
            spec, f"{sum(per_layer) / layers:.0f}", f"{ms['a']:.1f}", f"{a_c - 1:+.1%} ({a_c_low - 1:+.1%} to {a_c_high - 1:+.1%})",
            f"{ms['b']:.1f}", f"{b_a:.2f}x ({b_a_low:.2f} to {b_a_high:.2f})", f"{ms['c']:.1f}", f"{ms['d'] / ms['a']:.2f}x",
            "exact" if handle.stats.kv_bytes == ideal_bytes else f"{handle.stats.kv_bytes} vs {ideal_bytes}",
            f"{select_ms:.2f}", f"{select_ms / (stock_ms / layers):.1%}",
        )
    console.print(table)


if __name__ == "__main__":
    typer.run(main)
