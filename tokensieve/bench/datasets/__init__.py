"""Loaders and official scorers of standard VLM benchmarks, one module each.

Each module has `load(data, split, limit) -> list[Sample]` reading the benchmark's Hugging Face
parquet files from a local path, and `score(samples, predictions) -> dict` implementing the
benchmark's official scoring rule (the headline numbers, "by_category", and "per_sample").
"""
