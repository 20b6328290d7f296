"""sieve-mini as a library: answer a question about an image, optionally with a tokensieve method applied.

    from tokensieve.mini import SAMPLE_IMAGE, answer_question, load_sieve_mini
    model, processor = load_sieve_mini()
    reply = answer_question(model, processor, Image.open(SAMPLE_IMAGE), "What colour is the triangle?",
                            ts.FasterVLM(keep=64))
    reply.text, reply.after, reply.kept    # "green", 64, the kept raster indices
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

import tokensieve as ts


@dataclass
class Answer:
    """sieve-mini's reply and what it saw: the image's visual tokens before and after pruning, the kept
    ones (raster indices over `grid`), and the seconds `generate` took."""

    text: str
    before: int
    after: int
    kept: Sequence[int]
    grid: tuple[int, int]
    seconds: float


def answer_question(model, processor, picture: Image.Image, question: str, sieve=None,
                    max_new_tokens: int = 16) -> Answer:
    """sieve-mini's greedy answer to `question` about `picture`, pruned by `sieve` (a method or chain) unless None."""
    if not question.strip():
        raise ValueError("the question is empty: ask something about the image")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=picture.convert("RGB"), text=prompt, return_tensors="pt")
    patch = model.config.vision_config.patch_size
    grid = (inputs["pixel_values"].shape[-2] // patch, inputs["pixel_values"].shape[-1] // patch)
    start = time.perf_counter()
    with torch.inference_mode():
        if sieve is None:
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            before = after = grid[0] * grid[1]
            kept = range(before)
        else:
            with ts.apply(model, sieve) as run:
                output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            record = run.stats.images[0]
            before, after, kept, grid = record.before, record.after, record.kept.tolist(), tuple(record.grid)
    seconds = time.perf_counter() - start
    text = processor.decode(output[0, inputs.input_ids.shape[1]:], skip_special_tokens=True).strip()
    return Answer(text, before, after, kept, grid, seconds)
