"""What a sweep runs on: the model, and samples from the built-in QA suites or a standard benchmark (image or video).

Every source gives the same `SuiteSample`: a filename-safe id, the prompt text, the reference
answer(s), a category, the image or a video's frames (rendered or decoded on demand) and the source's own
per-sample score of a prediction (0..1). `model_inputs` puts a sample to the model the same way for every
source and model: one user turn, the image (or the video), then the question, through the processor's chat
template. A video goes to a processor that takes videos as one video; to any other, as its frames, one image
each, which the run reads as one video (`video_frames`).
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

from ..qa import examples, is_correct, video_examples
from ..qa.video import DEFAULT_FRAMES, MAX_FRAMES, MIN_FRAMES
from .datasets import BENCHMARKS, VIDEO_BENCHMARKS, benchmark

BUILTIN = "builtin"
BUILTIN_SPLIT = "test"  # never seen in training (tokensieve/qa/dataset.py)
BUILTIN_IMAGE_SIZE = 224  # rendered at the size sieve-mini was trained at; other models' processors resize
BUILTIN_DEFAULT_LIMIT = 700  # the suite is procedural and endless: 100 examples per skill unless --limit says
VIDEO = "video"  # the built-in video suite (tokensieve/qa/video.py): its test split, like the builtin suite's
VIDEO_DEFAULT_LIMIT = 500  # 100 clips per skill, as the builtin suite
# MVBench's one task whose videos (NTU RGB+D, under their own licence) are not in its download: the bench leaves it
# out when its video folder is absent (tokensieve/bench/datasets/mvbench.py)
MVBENCH_UNSHIPPED_TASK = "Fine-grained Pose"


@dataclass
class SuiteSample:
    id: str  # unique within the suite and safe as a file name
    question: str  # the full prompt text
    target: str | list[str]  # the reference answer, or all of them (TextVQA's ten)
    category: str  # the QA skill, or the benchmark's category
    image: Callable[[], Image.Image] | None  # None for a video
    score: Callable[[str], float]  # the suite's per-sample score of a prediction: 1.0 is full marks
    frames: Callable[[], list[Image.Image]] | None = None  # a video's frames, in order; None for an image


def safe_id(text: str) -> str:
    """`text` with every character outside [A-Za-z0-9._-] replaced by '_' (MME's ids hold '#')."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def takes_frames(suite: str) -> bool:
    """Whether the suite's samples are videos, sampled to `frames` frames: the video suite and the video benchmarks."""
    return suite == VIDEO or suite in VIDEO_BENCHMARKS


def load_suite(suite: str, limit: int | None = None, data: Path | str | None = None,
               split: str | None = None, frames: int | None = None) -> tuple[list[SuiteSample], str]:
    """The first `limit` samples of `suite` and the split they come from; `frames`: per video (the video suite's
    clip length, or the frames sampled uniformly from a video benchmark's video), video suites only."""
    if frames is not None and not takes_frames(suite):
        raise ValueError(f"frames={frames} is the frames per video of a video suite: the {suite!r} suite has "
                         f"no clips")
    if suite in (BUILTIN, VIDEO):
        if split not in (None, BUILTIN_SPLIT):
            raise ValueError(f"the {suite} suite is scored on its {BUILTIN_SPLIT!r} split only, not {split!r}")
        if suite == VIDEO:
            return _video(limit or VIDEO_DEFAULT_LIMIT, frames or DEFAULT_FRAMES), BUILTIN_SPLIT
        return _builtin(limit or BUILTIN_DEFAULT_LIMIT), BUILTIN_SPLIT
    if suite in VIDEO_BENCHMARKS:
        module, _ = VIDEO_BENCHMARKS[suite]
        split = split or inspect.signature(module.load).parameters["split"].default
        frames = DEFAULT_FRAMES if frames is None else frames
        if frames < 1:
            raise ValueError(f"frames={frames}: sample at least one frame per video")
        samples = [_from_video_benchmark(module, sample, suite, frames)
                   for sample in _load_video_benchmark(module, suite, data, split, limit)]
    elif suite in BENCHMARKS:
        module, _ = benchmark(suite)
        split = split or inspect.signature(module.load).parameters["split"].default
        samples = [_from_benchmark(module, sample, suite) for sample in module.load(data, split=split, limit=limit)]
    else:
        raise ValueError(f"unknown suite {suite!r}: choose {BUILTIN!r}, {VIDEO!r}, a benchmark "
                         f"({', '.join(BENCHMARKS)}) or a video benchmark ({', '.join(VIDEO_BENCHMARKS)})")
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


def _video(limit: int, frames: int) -> list[SuiteSample]:
    """Clips 0..limit-1 of the video suite's test split; skills cycle, so any 5 in a row are balanced."""
    if not MIN_FRAMES <= frames <= MAX_FRAMES:
        raise ValueError(f"a clip of the video suite has {MIN_FRAMES} to {MAX_FRAMES} frames, not frames={frames}")
    samples = []
    for example in video_examples(BUILTIN_SPLIT, limit, frames=frames):
        answer = example.qa.answer
        samples.append(SuiteSample(
            id=f"video-{BUILTIN_SPLIT}-{example.index:05d}", question=example.qa.question, target=answer,
            category=example.skill, image=None, frames=partial(example.frames, BUILTIN_IMAGE_SIZE),
            score=lambda prediction, answer=answer: float(is_correct(prediction, answer))))
    return samples


def _from_benchmark(module, sample, suite: str) -> SuiteSample:
    def score(prediction: str) -> float:
        return float(module.score([sample], [prediction])["per_sample"][0])

    target = sample.answers[0] if len(sample.answers) == 1 else list(sample.answers)
    return SuiteSample(id=safe_id(f"{suite}-{sample.id}"), question=sample.question, target=target,
                       category=sample.category, image=lambda: sample.image, score=score)


def _load_video_benchmark(module, suite: str, data, split: str, limit: int | None) -> list:
    """The video benchmark's questions; MVBench's without the task whose videos its download lacks, when they are
    absent (under <data>/video, where its loader looks)."""
    if suite != "mvbench" or data is None:
        return module.load(data, split=split, limit=limit)
    folder = module.TASKS[MVBENCH_UNSHIPPED_TASK][1]
    shipped = (Path(data) / "video" / folder).is_dir()
    tasks = None if shipped else [task for task in module.TASKS if task != MVBENCH_UNSHIPPED_TASK]
    return module.load(data, split=split, limit=limit, tasks=tasks)


def _from_video_benchmark(module, sample, suite: str, frames: int) -> SuiteSample:
    """A video benchmark's question as the bench's sample: `frames` frames sampled uniformly from its video (within
    the span asked about, if any), decoded when asked for; scored by the benchmark's official rule."""
    def score(prediction: str) -> float:
        return float(module.score([sample], [prediction])["per_sample"][0])

    return SuiteSample(id=safe_id(f"{suite}-{sample.id}"), question=sample.question, target=sample.answers[0],
                       category=sample.category, image=None, score=score,
                       frames=lambda: sample.frames(num_frames=frames).frames)


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


def takes_videos(processor) -> bool:
    """Whether the processor puts a video to its model as one (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, LLaVA-OneVision)."""
    return getattr(processor, "video_processor", None) is not None


def video_frames(processor, sample: SuiteSample) -> int | None:
    """For a video given to a processor without videos: its frame count, which the run needs to read the
    frames (one image each) as one video (`ts.apply(..., video_frames=n)`); None otherwise."""
    return None if sample.frames is None or takes_videos(processor) else len(sample.frames())


def frame_size(model: str) -> int | None:
    """The side, in pixels, at which a video's frames go as images to a model without videos: sieve-mini's, at which
    its clips were trained (64 tokens a frame); None for any other model (its processor's size for images)."""
    if model != SIEVE_MINI:
        return None
    from ..mini.video import VIDEO_FRAME_SIZE

    return VIDEO_FRAME_SIZE


def model_inputs(model, processor, sample: SuiteSample, frame_size: int | None = None) -> dict:
    """The processor's inputs for one sample: a user turn with the image (or the video), then the question.
    A video goes as one where the processor takes videos, else as its frames, one image placeholder each, resized to
    ``frame_size`` square where given (:func:`frame_size`)."""
    question = {"type": "text", "text": sample.question}
    if sample.frames is None:
        visual, media = [{"type": "image"}], {"images": sample.image()}
    elif takes_videos(processor):
        visual, media = [{"type": "video"}], {"videos": [sample.frames()]}
    else:
        frames = sample.frames()
        visual, media = [{"type": "image"}] * len(frames), {"images": frames}
        if frame_size is not None:
            media["size"] = {"height": frame_size, "width": frame_size}
    messages = [{"role": "user", "content": [*visual, question]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(**media, text=prompt, return_tensors="pt")
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
