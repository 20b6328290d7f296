"""The vLLM plugin's tests run in the vLLM environment (bash scripts/test_vllm.sh), against the tiny LLaVA-1.5 that
vllm_plugin/tests/build_tiny_llava.py builds in the main environment ($TOKENSIEVE_VLLM_TEST_MODEL)."""

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


PROMPT = "<|im_start|>user\n<image>\nWhat is in the picture?<|im_end|>\n<|im_start|>assistant\n"
