"""Videos for sieve-mini: a clip is its frames, each an image of its own, at VIDEO_FRAME_SIZE pixels.

The processor's chat template writes one `<image>` per frame, and LlavaProcessor expands each to the
tokens its pixel size gives (112 px: 8x8 = 64, so 16 frames are 1,024 visual tokens, the cost of four
224 px images). DINOv2 interpolates its position embeddings to the smaller grid. Training and the fast
evaluation read the frames' layer-8 patch tokens from a cache, as features.py does for images.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import typer
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import Dinov2Model, LlamaForCausalLM

from ..engine.compat import from_pretrained
from ..qa import VIDEO_CHANCE, VIDEO_DATA_VERSION, VideoExample, accuracy_by_skill, format_table, is_correct, video_examples
from .assemble import PATCH_SIZE, make_processor
from .build import language_dir, load_sieve_mini, mini_dir, vision_dir

VIDEO_FRAME_SIZE = 112
FRAME_TOKENS = (VIDEO_FRAME_SIZE // PATCH_SIZE) ** 2
VIDEO_SHARD_SIZE = 100  # clips per cached shard (16 frames at 112 px: 75 MB of fp16 features)


def video_messages(question: str, n_frames: int) -> list[dict]:
    """The chat for one clip: one image item per frame, then the question."""
    return [{"role": "user", "content": [{"type": "image"}] * n_frames + [{"type": "text", "text": question}]}]


def video_inputs(processor, frames: list[Image.Image], question: str) -> dict:
    """sieve-mini's model inputs for one clip: its frames as images at VIDEO_FRAME_SIZE, then the question.

    The processor resizes each frame (whatever its size) to VIDEO_FRAME_SIZE square and expands each frame's
    `<image>` to FRAME_TOKENS placeholders; pass the result to `model(**inputs)` or `model.generate(**inputs)`.
    """
    if not frames:
        raise ValueError("a clip needs at least one frame; got an empty list of frames")
    text = processor.apply_chat_template(video_messages(question, len(frames)), add_generation_prompt=True)
    return processor(images=frames, text=text, return_tensors="pt",
                     size={"height": VIDEO_FRAME_SIZE, "width": VIDEO_FRAME_SIZE})


class VideoFeatureCache:
    """Layer-`layer` patch tokens of the video suite's clips, all frames of a clip in one row, cached as fp16.

    A shard holds clips [shard * VIDEO_SHARD_SIZE, (shard + 1) * VIDEO_SHARD_SIZE) of a split:
    (clips, frames * FRAME_TOKENS, 384), frame after frame, each frame's patches in raster order.
    """

    def __init__(self, layer: int, frames: int = 16, frame_size: int = VIDEO_FRAME_SIZE, device: str = "cpu"):
        self.layer, self.frames, self.frame_size, self.device = layer, frames, frame_size, device
        self.frame_tokens = (frame_size // PATCH_SIZE) ** 2
        self.root = mini_dir() / "features" / f"{VIDEO_DATA_VERSION}-{frames}f-{frame_size}px-layer{layer}"
        self._tower: Dinov2Model | None = None
        self._processor = None
        self._loaded: dict[tuple[str, int], torch.Tensor] = {}

    def path(self, split: str, shard: int) -> Path:
        return self.root / f"{split}-{shard:04d}.safetensors"

    def examples(self, split: str, shard: int) -> list[VideoExample]:
        return video_examples(split, VIDEO_SHARD_SIZE, shard * VIDEO_SHARD_SIZE, self.frames)

    def shard(self, split: str, shard: int) -> torch.Tensor:
        if (split, shard) in self._loaded:
            return self._loaded[split, shard]
        path = self.path(split, shard)
        if not path.is_file():
            features = self._compute(self.examples(split, shard))
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".partial")
            save_file({"features": features}, str(partial), metadata={
                "data_version": VIDEO_DATA_VERSION, "frames": str(self.frames),
                "frame_size": str(self.frame_size), "layer": str(self.layer)})
            partial.replace(path)
        self._loaded[split, shard] = load_file(str(path))["features"]
        return self._loaded[split, shard]

    def first(self, split: str, count: int) -> torch.Tensor:
        """Features of clips [0, count) of a split."""
        shards = [self.shard(split, s) for s in range(-(-count // VIDEO_SHARD_SIZE))]
        return torch.cat(shards)[:count]

    @torch.inference_mode()
    def _compute(self, clips: list[VideoExample], batch: int = 4) -> torch.Tensor:
        if self._tower is None:
            self._tower = from_pretrained(Dinov2Model, vision_dir()).eval().to(self.device)
            self._processor = make_processor(language_dir(), self.frame_size).image_processor
        out = []
        for first in range(0, len(clips), batch):
            frames = [frame for ex in clips[first:first + batch] for frame in ex.frames(self.frame_size)]
            pixels = self._processor(frames, return_tensors="pt").pixel_values.to(self.device)
            hidden = self._tower(pixels, output_hidden_states=True).hidden_states[self.layer][:, 1:]  # drop [CLS]
            out.append(hidden.reshape(-1, self.frames * self.frame_tokens, hidden.shape[-1]).to("cpu", torch.float16))
        return torch.cat(out)


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
    """Per-skill accuracy of the assembled sieve-mini on the video suite, with chance.

        python -m tokensieve.mini.video --split validation --clips 50            # cached features
        python -m tokensieve.mini.video --split validation --clips 10 --generate # the stock generate path
    """
    from .fasteval import evaluate_clips
    from .sequences import Encoder

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


__all__ = ["FRAME_TOKENS", "VIDEO_FRAME_SIZE", "VIDEO_SHARD_SIZE", "VideoFeatureCache", "video_inputs",
           "video_messages"]
