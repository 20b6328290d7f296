"""Prefill under vLLM with the tokensieve plugin: prompt tokens and prefill time, stock against each budget, measured
side by side in one engine (docs/vllm.md). Run in the vLLM environment:

    bash scripts/vllm_env.sh && python vllm_plugin/tests/build_tiny_llava.py ~/.cache/tokensieve/vllm-test-llava
    .venv-vllm/bin/python benchmarks/vllm_prefill.py ~/.cache/tokensieve/vllm-test-llava --out results/vllm_prefill.json
    .venv-vllm/bin/python vllm_plugin/tests/build_tiny_qwen2_vl.py ~/.cache/tokensieve/vllm-test-qwen2-vl
    .venv-vllm/bin/python benchmarks/vllm_prefill.py ~/.cache/tokensieve/vllm-test-qwen2-vl/qwen2-vl --family qwen2-vl

Each request asks for one new token (its time is the prefill: HF preprocessing, the whole vision tower, the method,
the LLM over the prompt), on a fresh image (vLLM caches a processed image by its content and options); the
configurations are interleaved over the repetitions, so load from other jobs falls on all of them alike. Wall time is
the request's; CPU time is the engine processes' (EngineCore and Worker) during it. Medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

sys.path.insert(0, str(Path(__file__).parents[1] / "vllm_plugin" / "tests"))

#: per family: the plugin's architecture, and the configurations measured (stock first)
FAMILIES = {
    "llava": ("TokensieveLlavaForConditionalGeneration",
              ["none", "divprune:288", "divprune:144", "divprune:64", "divprune:32", "fastervlm:64", "pool:64"]),
    "qwen2-vl": ("TokensieveQwen2VLForConditionalGeneration", ["none", "divprune:0.5", "divprune:0.25", "uniform:0.25", "pool:0.25"]),
    "qwen2.5-vl": ("TokensieveQwen2_5_VLForConditionalGeneration", ["none", "divprune:0.5", "divprune:0.25", "uniform:0.25"]),
}
#: Qwen images: 448 x 448 pixels, the test model's cap, so 16 x 16 = 256 image tokens
QWEN_SIDE = 448


def _engine_cpu_seconds() -> float:
    import psutil

    return sum(sum(child.cpu_times()[:2]) for child in psutil.Process().children(recursive=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a checkpoint of the family (the test models: vllm_plugin/tests/build_tiny_llava.py, "
                                      "build_tiny_qwen2_vl.py)")
    parser.add_argument("--family", choices=FAMILIES, default="llava")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    from conftest import PROMPT, QWEN_PROMPT, picture

    architecture, configurations = FAMILIES[args.family]
    prompt = PROMPT if args.family == "llava" else QWEN_PROMPT

    def image(seed: int):
        return picture(seed) if args.family == "llava" else picture(seed).resize((QWEN_SIDE, QWEN_SIDE))

    started = time.perf_counter()
    llm = LLM(model=args.model, hf_overrides={"architectures": [architecture]}, dtype="float32", max_model_len=2048,
              limit_mm_per_prompt={"image": 1}, enforce_eager=True, seed=0)
    startup = time.perf_counter() - started
    one_token = SamplingParams(temperature=0, max_tokens=1)
    llm.generate({"prompt": prompt, "multi_modal_data": {"image": image(10_000)}}, one_token)  # warm-up
    runs = {spelling: [] for spelling in configurations}
    seed = 0
    for _ in range(args.repeats):
        for spelling in configurations:
            seed += 1
            request = {"prompt": prompt, "multi_modal_data": {"image": image(seed)},
                       "mm_processor_kwargs": {"tokensieve_method": spelling}}
            cpu, wall = _engine_cpu_seconds(), time.perf_counter()
            (output,) = llm.generate(request, one_token, use_tqdm=False)
            runs[spelling].append((len(output.prompt_token_ids), time.perf_counter() - wall, _engine_cpu_seconds() - cpu))
    rows = [{"method": spelling, "prompt_tokens": runs[spelling][0][0],
             "wall_s": statistics.median(r[1] for r in runs[spelling]),
             "cpu_s": statistics.median(r[2] for r in runs[spelling])} for spelling in configurations]
    stock = rows[0]
    print(f"{args.family}: engine start {startup:.0f} s; medians of {args.repeats} (vLLM {__import__('vllm').__version__}, "
          f"{os.cpu_count()} CPUs)")
    print("| method | prompt tokens | prefill wall s | x stock | engine CPU s | x stock |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['prompt_tokens']} | {row['wall_s']:.2f} | {row['wall_s'] / stock['wall_s']:.2f} | "
              f"{row['cpu_s']:.2f} | {row['cpu_s'] / stock['cpu_s']:.2f} |")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"family": args.family, "model": args.model, "startup_s": startup, "repeats": args.repeats, "rows": rows,
                                        "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
