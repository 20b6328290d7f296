"""A processor for the tiny Qwen2-VL (tests/tiny_qwen2_vl.py) that takes videos, for the bench's video suite.

It is transformers' own `Qwen2VLProcessor` (chat template, video placeholder expansion, `mm_token_type_ids`) over a
word-level tokenizer of the tiny vocabulary and a video processor that lays frames out as `Qwen2VLVideoProcessor`
does (resized to 32x32, normalised, temporal patch pairs flattened in merge-block order: `flattened_video`). The
stock video processor needs torchvision, which this environment does not install.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
from transformers import BatchFeature, PreTrainedTokenizerFast, Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from tokensieve.qa import video_examples

from tiny_models import IMAGE_TOKEN, PAD, VOCAB
from tiny_qwen2_vl import (
    FRAME_SIZE,
    MERGE,
    PATCH,
    TEMPORAL_PATCH,
    VIDEO_TOKEN,
    VISION_END,
    VISION_START,
    flattened_video,
)

SPECIAL = {"<pad>": PAD, "<s>": 1, "</s>": 2, "<|video_pad|>": VIDEO_TOKEN, "<|vision_start|>": VISION_START,
           "<|vision_end|>": VISION_END, "<|image_pad|>": IMAGE_TOKEN}
UNKNOWN = "<unk>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}:{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}")


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Every lower-case word the suite asks in (and its answers) to an id of its own, anything else to <unk>."""
    questions = [example.qa.question.lower() for example in video_examples("test", 20, frames=8)]
    words = sorted({word for question in questions for word in re.findall(r"\w+", question)}
                   | {"assistant", "user", ":", "?", "left", "right", "up", "down", "1", "2", "3", "4"})
    free = [i for i in range(VOCAB) if i not in SPECIAL.values()]
    vocab = {**SPECIAL, UNKNOWN: free[0], **dict(zip(words, free[1:]))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNKNOWN))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"<\|?[a-z_/]+\|?>|\w+|[^\w\s]"), "isolated")])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token=UNKNOWN, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", extra_special_tokens=[t for t in SPECIAL if t.startswith("<|")])


class TinyVideoProcessor:
    """Frames (PIL) to `pixel_values_videos` and `video_grid_thw` as Qwen2VLVideoProcessor makes them."""

    merge_size, patch_size, temporal_patch_size = MERGE, PATCH, TEMPORAL_PATCH
    mean = std = (0.5, 0.5, 0.5)

    def __call__(self, videos, **kwargs) -> BatchFeature:
        pixels, grids = [], []
        for frames in videos:
            video = torch.stack([torch.from_numpy(np.asarray(f.convert("RGB").resize((FRAME_SIZE, FRAME_SIZE)),
                                                             dtype=np.float32) / 255).permute(2, 0, 1) for f in frames])
            video = (video - torch.tensor(self.mean).view(3, 1, 1)) / torch.tensor(self.std).view(3, 1, 1)
            pixels.append(flattened_video(video))
            grids.append([len(frames) // TEMPORAL_PATCH, FRAME_SIZE // PATCH, FRAME_SIZE // PATCH])
        return BatchFeature({"pixel_values_videos": torch.cat(pixels), "video_grid_thw": torch.tensor(grids)})


class _Processor(Qwen2VLProcessor):
    def check_argument_for_proper_class(self, name, argument):
        """The stock check looks the video processor's class up among torchvision's; this one is not there."""


def tiny_qwen2_vl_processor() -> Qwen2VLProcessor:
    image_processor = Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL_PATCH)
    return _Processor(image_processor=image_processor, tokenizer=word_tokenizer(),
                      video_processor=TinyVideoProcessor(), chat_template=CHAT_TEMPLATE)
