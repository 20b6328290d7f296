"""The vLLM plugin's tests run in the vLLM environment (bash scripts/test_vllm.sh), against the tiny LLaVA-1.5 that
vllm_plugin/tests/build_tiny_llava.py builds in the main environment ($TOKENSIEVE_VLLM_TEST_MODEL), and the tiny Qwen2-VL
and Qwen2.5-VL that build_tiny_qwen2_vl.py builds in the vLLM environment ($TOKENSIEVE_VLLM_TEST_QWEN)."""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
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
    """The tiny Qwen2-VL (qwen2-vl/) and Qwen2.5-VL (qwen2.5-vl/) that build_tiny_qwen2_vl.py builds, and the tiny
    Qwen3-VL (qwen3-vl/) that build_tiny_qwen3_vl.py builds."""
    path = os.environ.get("TOKENSIEVE_VLLM_TEST_QWEN")
    if not path or not all((Path(path) / name / "config.json").is_file() for name in ("qwen2-vl", "qwen3-vl")):
        raise RuntimeError("run the vLLM tests with bash scripts/test_vllm.sh, which builds the tiny Qwen2-VL and "
                           "Qwen3-VL models (TOKENSIEVE_VLLM_TEST_QWEN) in the vLLM environment")
    return Path(path)


#: a 2-core CPU shared with other jobs: a LLaVA server's engine start took 8 minutes here
START_SECONDS = 1500


@contextmanager
def vllm_server(model: str, overrides: dict, log: Path):
    """`vllm serve MODEL` on a free localhost port (through tokensieve_vllm.serve, which works around vllm-cpu's CLI)
    with the plugin's ``--hf-overrides``, and an openai client of it once it answers; the server stops on exit."""
    from openai import OpenAI

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "tokensieve_vllm.serve", model, "--port", str(port), "--host", "127.0.0.1",
               "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager", "--limit-mm-per-prompt", '{"image": 1}',
               "--hf-overrides", json.dumps(overrides), "--chat-template-content-format", "string", "--seed", "0",
               "--trust-request-mm-kwargs"]  # the server refuses per-request mm_processor_kwargs without it
    with open(log, "w") as output:
        server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=os.environ.copy())
    api = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=600)
    try:
        deadline = time.time() + START_SECONDS
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"vllm serve exited ({server.returncode}):\n{log.read_text()[-4000:]}")
            try:
                api.models.list()
                break
            except Exception:
                if time.time() > deadline:
                    raise RuntimeError(f"vllm serve did not answer in {START_SECONDS} s:\n{log.read_text()[-4000:]}")
                time.sleep(5)
        yield api
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()


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


def ask(client, image, method: str | None = None, max_tokens: int = 4):
    """One chat completion about ``image`` (sent as a PNG data URL), greedy, with the request's method if given."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    extra = {"mm_processor_kwargs": {"tokensieve_method": method}} if method is not None else {}
    return client.chat.completions.create(
        model=client.models.list().data[0].id, temperature=0, max_tokens=max_tokens, extra_body=extra,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": "What is in the picture?"}]}])
