"""What a sweep runs on: the model, and samples from the built-in QA suite or a standard benchmark.

Every source gives the same `SuiteSample`: a filename-safe id, the prompt text, the reference
answer(s), a category, the image (rendered or decoded on demand) and the source's own per-sample
score of a prediction (0..1). `model_inputs` puts a sample to the model the same way for every
source and model: one user turn, the image, then the question, through the processor's chat template.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from ..qa import examples, is_correct
from .datasets import BENCHMARKS, benchmark

BUILTIN = "builtin"
BUILTIN_SPLIT = "test"  # never seen in training (tokensieve/qa/dataset.py)
BUILTIN_IMAGE_SIZE = 224  # rendered at the size sieve-mini was trained at; other models' processors resize
BUILTIN_DEFAULT_LIMIT = 700  # the suite is procedural and endless: 100 examples per skill unless --limit says


@dataclass
class SuiteSample:
    id: str  # unique within the suite and safe as a file name
    question: str  # the full prompt text
    target: str | list[str]  # the reference answer, or all of them (TextVQA's ten)
    category: str  # the QA skill, or the benchmark's category
    image: Callable[[], Image.Image]
    score: Callable[[str], float]  # the suite's per-sample score of a prediction: 1.0 is full marks


def safe_id(text: str) -> str:
    """`text` with every character outside [A-Za-z0-9._-] replaced by '_' (MME's ids hold '#')."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def load_suite(suite: str, limit: int | None = None, data: Path | str | None = None,
               split: str | None = None) -> tuple[list[SuiteSample], str]:
    """The first `limit` samples of `suite` and the split they come from."""
    if suite == BUILTIN:
        if split not in (None, BUILTIN_SPLIT):
            raise ValueError(f"the builtin suite is scored on its {BUILTIN_SPLIT!r} split only, not {split!r}")
        return _builtin(limit or BUILTIN_DEFAULT_LIMIT), BUILTIN_SPLIT
    if suite not in BENCHMARKS:
        raise ValueError(f"unknown suite {suite!r}: choose {BUILTIN!r} or a benchmark ({', '.join(BENCHMARKS)})")
    module, _ = benchmark(suite)
    split = split or inspect.signature(module.load).parameters["split"].default
    samples = [_from_benchmark(module, sample, suite) for sample in module.load(data, split=split, limit=limit)]
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{suite} {split}: two samples share an id once made filename-safe")
    return samples, split


def _builtin(limit: int) -> list[SuiteSample]:
    samples = []
    for example in examples(BUILTIN_SPLIT, limit):
        qa = example.qas[0]  # the example's own skill; skills cycle, so any 7 in a row are balanced
        samples.append(SuiteSample(
            id=f"{BUILTIN_SPLIT}-{example.index:05d}", question=qa.question, target=qa.answer, category=qa.skill,
            image=partial(example.image, BUILTIN_IMAGE_SIZE),
            score=lambda prediction, answer=qa.answer: float(is_correct(prediction, answer))))
    return samples


def _from_benchmark(module, sample, suite: str) -> SuiteSample:
    def score(prediction: str) -> float:
        return float(module.score([sample], [prediction])["per_sample"][0])

    target = sample.answers[0] if len(sample.answers) == 1 else list(sample.answers)
    return SuiteSample(id=safe_id(f"{suite}-{sample.id}"), question=sample.question, target=target,
                       category=sample.category, image=lambda: sample.image, score=score)


SIEVE_MINI = "sieve-mini"
DTYPES = ("float32", "bfloat16", "float16")


def check_model(model: str, dtype: str) -> None:
    """Refuse a model or dtype that cannot load, before any process starts."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if model != SIEVE_MINI and not Path(model).is_dir():
        raise ValueError(f"model {model!r} is neither {SIEVE_MINI!r} nor a local checkpoint folder")


@lru_cache(maxsize=1)  # the last model stays loaded: a second sweep in one process (the tests) reuses it
def load_model(model: str, device: str, dtype: str):
    """sieve-mini (224 px, 256 visual tokens) or a local Hugging Face checkpoint, with its processor."""
    check_model(model, dtype)
    if model == SIEVE_MINI:
        from ..mini.build import load_sieve_mini

        loaded, processor = load_sieve_mini(dtype=getattr(torch, dtype))
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        # the stock torch layers, as tokensieve's hooks expect (5.25 turns Hub kernels on by default; 5.23 and 5.24
        # take the same keyword, default False: tokensieve/engine/compat.py)
        loaded = AutoModelForImageTextToText.from_pretrained(model, dtype=getattr(torch, dtype), use_kernels=False).eval()
        processor = AutoProcessor.from_pretrained(model)
    return loaded.to(device), processor


def model_inputs(model, processor, sample: SuiteSample) -> dict:
    """The processor's inputs for one sample: a user turn with the image, then the question."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=sample.image(), text=prompt, return_tensors="pt")
    return inputs.to(model.device, dtype=model.dtype)  # the dtype applies to floating tensors only


def model_view(processor, inputs: dict, sample: SuiteSample) -> Image.Image:
    """The image as the model saw it (resized, cropped), undoing the processor's normalisation; the
    source image where the pixels are not one plain (images, 3, H, W) batch (anyres crops, patches)."""
    pixels = inputs["pixel_values"]
    image_processor = getattr(processor, "image_processor", None)
    if pixels.ndim != 4 or not hasattr(image_processor, "image_mean"):
        return sample.image()
    mean = torch.tensor(image_processor.image_mean).view(-1, 1, 1)
    std = torch.tensor(image_processor.image_std).view(-1, 1, 1)
    rgb = (pixels[0].float().cpu() * std + mean).clamp(0, 1)
    return Image.fromarray((rgb * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
