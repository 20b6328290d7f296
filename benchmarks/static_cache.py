"""Time to first token and decode time per token with a dynamic and a static cache, stock and under a method.

Batch-1 GPU decoding is launch-bound, and a static cache (with the decode steps compiled, which generate() does
on an accelerator) is how users take that overhead out. Under tokensieve, compiled forwards are refused
(tokensieve/engine/static_cache.py), so a method runs its static cache with ``disable_compile=True``; a
``StaticCache`` sized for the kept tokens also saves the cache memory. Configurations alternate within each
round so drift hits all alike; figures are medians.

    python benchmarks/static_cache.py                     # LLaVA-shaped, hidden 512, 8 layers, CPU
    python benchmarks/static_cache.py --device cuda --dtype bfloat16 --model llava-1.5-7b
"""

from __future__ import annotations

import statistics

import typer
from rich.console import Console
from rich.table import Table
from transformers import StaticCache

import tokensieve as ts
from tokensieve.engine.compat import CACHE_ARGUMENT
from shapes import MODEL_HELP, describe, image_token_count, model_and_inputs, timed

console = Console(width=160)


def main(
    method: str = typer.Option("fastervlm:64", help="the method (pre-LLM: a static cache serves pre-LLM methods)"),
    new_tokens: int = typer.Option(16, help="decoded tokens for the per-token decode time"),
    repeats: int = typer.Option(7, help="rounds, each running every configuration once"),
    device: str = typer.Option("cpu"),
    dtype: str = typer.Option("float32"),
    model_name: str = typer.Option("demo", "--model", help=MODEL_HELP),
    batch: int = typer.Option(1, help="prompts per forward, each with its image"),
) -> None:
    model, inputs = model_and_inputs(model_name, device, dtype, batch)
    console.print(describe(model, inputs, device, dtype))
    sieve = ts.build(method)
    prompt = inputs["input_ids"].shape[1]
    kept_prompt = prompt - image_token_count(model, inputs) + (sieve.keep if isinstance(sieve.keep, int) else 0)

    def generate(applied: bool, cache: str, n: int):
        settings = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)
        if cache == "static":
            settings["cache_implementation"] = "static"
        if cache == "static, sized for the kept tokens":
            settings[CACHE_ARGUMENT] = StaticCache(config=model.config.get_text_config(), max_cache_len=kept_prompt + n)
        if applied and cache != "dynamic":
            settings["disable_compile"] = True  # a compiled forward skips tokensieve's hooks: refused

        def run():
            if not applied:
                return model.generate(**inputs, **settings)
            with ts.apply(model, sieve):
                return model.generate(**inputs, **settings)
        return run

    configs = [(False, "dynamic"), (False, "static"), (True, "dynamic"), (True, "static")]
    if isinstance(sieve.keep, int):
        configs.append((True, "static, sized for the kept tokens"))
    times = {config: {"first": [], "long": []} for config in configs}
    for config in configs:  # warm-up (and, on an accelerator, the stock static cache's compilation)
        generate(*config, 1)()
        generate(*config, 1 + new_tokens)()
    for _ in range(repeats):
        for config in configs:
            times[config]["first"].append(timed(generate(*config, 1), device))
            times[config]["long"].append(timed(generate(*config, 1 + new_tokens), device))
    table = Table(title=f"time to first token and decode per token; {repeats} interleaved rounds, medians")
    for column in ("model", "cache", "TTFT ms", "vs stock dynamic", "decode ms/token", "vs stock dynamic"):
        table.add_column(column, justify="right")
    base_first = statistics.median(times[(False, "dynamic")]["first"])
    base_decode = (statistics.median(times[(False, "dynamic")]["long"]) - base_first) / new_tokens
    for applied, cache in configs:
        first = statistics.median(times[(applied, cache)]["first"])
        decode = (statistics.median(times[(applied, cache)]["long"]) - first) / new_tokens
        table.add_row(repr(sieve) if applied else "stock", cache, f"{first * 1e3:.1f}", f"{base_first / first:.2f}x",
                      f"{decode * 1e3:.2f}", f"{base_decode / decode:.2f}x")
    console.print(table)


if __name__ == "__main__":
    typer.run(main)
