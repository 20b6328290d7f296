"""In-LLM pruning (FastV) against pruning before the LLM: prefill, decode and KV cache, side by side.

At one budget k, FastV keeps every image token in layers 0..K-1 and k of them from layer K on, so
its prefill lies between the stock model's and that of pruning to k before the LLM. ``fastv all``
scores (one recomputed attention row at layer K-1) and keeps everything: its ratio to the stock
model is the cost of the scoring alone. Runs alternate between configurations so drift on a shared
machine hits all alike; figures are medians, ratios are against the stock model of the same run.

    python benchmarks/in_llm.py                  # LLaVA-shaped, hidden 512, 8 layers, CPU
    python benchmarks/in_llm.py --device cuda --dtype bfloat16 --model llava-1.5-7b
    python benchmarks/in_llm.py --device cuda --dtype bfloat16 --model qwen2.5-vl-7b --keep 144
"""

from __future__ import annotations

import statistics

import typer
from rich.console import Console
from rich.table import Table

import tokensieve as ts
from tokensieve.engine.compat import output_cache
from shapes import MODEL_HELP, describe, model_and_inputs, timed

console = Console()


def _cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def main(
    keep: int = typer.Option(64, help="image tokens kept per image (of 576; of 1,296 for qwen2.5-vl-7b)"),
    layer: int = typer.Option(2, help="FastV's K"),
    new_tokens: int = typer.Option(16, help="decoded tokens for the per-token decode time"),
    repeats: int = typer.Option(7, help="timed runs per configuration (median)"),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32"),
    model_name: str = typer.Option("demo", "--model", help=MODEL_HELP),
    batch: int = typer.Option(1, help="prompts per forward, each with its image"),
    attention: str = typer.Option("sdpa", help="sdpa | eager | flash_attention_2 (where installed)"),
) -> None:
    model, inputs = model_and_inputs(model_name, device, dtype, batch, attention)
    console.print(describe(model, inputs, device, dtype))
    configs = {
        "stock": None,
        f"fastv all (K={layer})": ts.FastV(keep=1.0, layer=layer),
        f"fastv {keep} (K={layer})": ts.FastV(keep=keep, layer=layer),
        f"uniform {keep} (pre-LLM)": ts.Uniform(keep=keep),
        f"uniform {2 * keep} + fastv {keep}": ts.Chain(ts.Uniform(keep=2 * keep), ts.FastV(keep=keep, layer=layer)),
    }

    def generate(method, n: int):
        def run():
            settings = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, return_dict_in_generate=True)
            if method is None:
                return model.generate(**inputs, **settings)
            with ts.apply(model, method):
                return model.generate(**inputs, **settings)
        return run

    times = {name: {"prefill": [], "long": []} for name in configs}
    cache = {}
    for name, method in configs.items():  # warm-up, and the cache each leaves
        generate(method, 1)()
        cache[name] = _cache_bytes(output_cache(generate(method, new_tokens)()))
    for _ in range(repeats):
        for name, method in configs.items():
            times[name]["prefill"].append(timed(generate(method, 1), device))
            times[name]["long"].append(timed(generate(method, 1 + new_tokens), device))

    def medians(name):
        prefill = statistics.median(times[name]["prefill"])
        decode = (statistics.median(times[name]["long"]) - prefill) / new_tokens
        return prefill, decode

    stock_prefill, stock_decode = medians("stock")
    table = Table(title=f"prefill (generate 1 token) and decode per token; {repeats} runs each, interleaved")
    for column in ("config", "prefill ms", "vs stock", "decode ms/token", "vs stock", "KV cache MiB"):
        table.add_column(column, justify="right")
    for name in configs:
        prefill, decode = medians(name)
        table.add_row(name, f"{prefill * 1e3:.1f}", f"{stock_prefill / prefill:.2f}x", f"{decode * 1e3:.2f}",
                      f"{stock_decode / decode:.2f}x", f"{cache[name] / 2**20:.1f}")
    console.print(table)


if __name__ == "__main__":
    typer.run(main)
