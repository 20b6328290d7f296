"""The vLLM plugin's tests run in the vLLM environment (bash scripts/test_vllm.sh), against the tiny LLaVA-1.5 that
vllm_plugin/tests/build_tiny_llava.py builds in the main environment ($TOKENSIEVE_VLLM_TEST_MODEL), and the tiny Qwen2-VL
and Qwen2.5-VL that build_tiny_qwen2_vl.py builds in the vLLM environment ($TOKENSIEVE_VLLM_TEST_QWEN)."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: the tiny model needs little
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # vLLM reserves one core by default


@pytest.fixture(scope="session")
def model_dir() -> str:
    path = os.environ.get("TOKENSIEVE_VLLM_TEST_MODEL")
    if not path or not (Path(path) / "config.json").is_file():
        raise RuntimeError("run the vLLM tests with bash scripts/test_vllm.sh, which builds the test model "
                           "(TOKENSIEVE_VLLM_TEST_MODEL) in the main environment")
    return path


@pytest.fixture(scope="session")
def qwen_dir() -> Path:
    """The tiny Qwen2-VL (qwen2-vl/) and Qwen2.5-VL (qwen2.5-vl/) that build_tiny_qwen2_vl.py builds."""
    path = os.environ.get("TOKENSIEVE_VLLM_TEST_QWEN")
    if not path or not (Path(path) / "qwen2-vl" / "config.json").is_file():
        raise RuntimeError("run the vLLM tests with bash scripts/test_vllm.sh, which builds the tiny Qwen2-VL models "
                           "(TOKENSIEVE_VLLM_TEST_QWEN) in the vLLM environment")
    return Path(path)


def picture(seed: int):
    """A deterministic picture: coloured rectangles on noise (the random tower needs only distinct pixels)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y = int(rng.integers(0, 300)), int(rng.integers(0, 200))
        draw.rectangle([x, y, x + 90, y + 70], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return image


def portrait(seed: int):
    """:func:`picture` turned upright (300 x 400): Qwen2-VL cuts it into 14 x 11 tokens, taller than wide, where the
    text after the image continues from the grid's height (vLLM's EVS positions assume its width)."""
    return picture(seed).rotate(90, expand=True)


PROMPT = "<|im_start|>user\n<image>\nWhat is in the picture?<|im_end|>\n<|im_start|>assistant\n"
QWEN_PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is in the picture?<|im_end|>\n"
               "<|im_start|>assistant\n")
