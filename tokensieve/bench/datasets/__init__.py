"""Loaders and official scorers of standard VLM benchmarks, one module each.

Each module has `load(data, split, limit) -> list[Sample]` reading the benchmark's Hugging Face
parquet files from a local path (raising BenchmarkDataMissing, which says how to download them,
when they are absent), and `score(samples, predictions) -> dict` implementing the benchmark's
official scoring rule: its headline numbers, "by_category" (all but TextVQA) and "per_sample".
The video benchmarks (VIDEO_BENCHMARKS) load the same way but give VideoSamples (video_files.py): a
video file resolved under a `videos` folder instead of an image; the bench runs them as suites of
sampled frames (tokensieve/bench/suites.py, `--suite videomme|mvbench`).
"""

from __future__ import annotations

from types import ModuleType

from . import gqa, mmbench, mme, mvbench, pope, scienceqa, textvqa, videomme
from .common import BenchmarkDataMissing, Sample

# name -> (module, the key of score()'s result that a summary table reports)
BENCHMARKS: dict[str, tuple[ModuleType, str]] = {
    "pope": (pope, "f1"),
    "gqa": (gqa, "accuracy"),
    "textvqa": (textvqa, "accuracy"),
    "mme": (mme, "total"),
    "scienceqa_img": (scienceqa, "accuracy"),
    "mmbench": (mmbench, "circular_accuracy"),
}

VIDEO_BENCHMARKS: dict[str, tuple[ModuleType, str]] = {
    "videomme": (videomme, "accuracy"),
    "mvbench": (mvbench, "accuracy"),
}


def benchmark(name: str) -> tuple[ModuleType, str]:
    """The module and headline metric of a benchmark, by name."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


__all__ = ["BENCHMARKS", "VIDEO_BENCHMARKS", "BenchmarkDataMissing", "Sample", "benchmark"]
