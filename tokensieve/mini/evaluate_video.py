"""Per-skill accuracy of the assembled sieve-mini on the video suite: the fast path on cached features, or
the stock path (video_inputs, then model.generate) that it must agree with.

    python -m tokensieve.mini.evaluate_video --split validation --clips 50
    python -m tokensieve.mini.evaluate_video --split validation --clips 10 --generate
"""

from __future__ import annotations

import time

import torch
import typer
from transformers import LlamaForCausalLM

from ..qa import VIDEO_CHANCE, SPLIT_SEEDS, VideoExample, accuracy_by_skill, format_table, is_correct, video_examples
from .build import load_sieve_mini
from .fasteval import evaluate_clips
from .sequences import Encoder
from .video import VIDEO_FRAME_SIZE, VideoFeatureCache, video_inputs


def language_model_of(model) -> LlamaForCausalLM:
    """The assembled model's language model and head as one causal LM (the same tensors), for fasteval."""
    with torch.device("meta"):
        lm = LlamaForCausalLM(model.config.text_config)
    lm.model, lm.lm_head = model.model.language_model, model.lm_head
    return lm.eval()


@torch.inference_mode()
def generate_answers(model, processor, clips: list[VideoExample]) -> list[str]:
    """Each clip's answer through the stock path: video_inputs, then model.generate (greedy, 5 tokens)."""
    answers = []
    for ex in clips:
        inputs = video_inputs(processor, ex.frames(VIDEO_FRAME_SIZE), ex.qa.question)
        output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        answers.append(processor.decode(output[0, inputs.input_ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def main(split: str = typer.Option("validation"), clips: int = typer.Option(50, min=1),
         frames: int = typer.Option(16, min=8, max=32),
         generate: bool = typer.Option(False, help="through model.generate on the frames (slow) instead of the "
                                       "fast path on cached features")):
    """Per-skill accuracy of the assembled sieve-mini on the video suite's clips, with chance."""
    if split not in SPLIT_SEEDS:
        raise typer.BadParameter(f"unknown split {split!r}; choose one of {sorted(SPLIT_SEEDS)}", param_hint="--split")
    model, processor = load_sieve_mini()
    exs = video_examples(split, clips, frames=frames)
    clock = time.time()
    if generate:
        answers = generate_answers(model, processor, exs)
        table = accuracy_by_skill([(ex.skill, is_correct(a, ex.qa.answer)) for ex, a in zip(exs, answers)],
                                  VIDEO_CHANCE)
    else:
        cache = VideoFeatureCache(model.config.vision_feature_layer, frames)
        table = evaluate_clips(language_model_of(model), model.model.multi_modal_projector,
                               Encoder(processor.tokenizer, cache.frame_tokens), exs, cache.first(split, clips))
    path = "model.generate" if generate else "fast path, cached features"
    print(f"\n{split}, {clips} clips of {frames} frames at {VIDEO_FRAME_SIZE} px ({path}, "
          f"{time.time() - clock:.0f} s):\n{format_table(table)}")


if __name__ == "__main__":
    typer.run(main)
