"""The plugin's Qwen2-VL behind vLLM's OpenAI-compatible server (`vllm serve` on localhost), hit by the openai client
with an image: the server's method comes from --hf-overrides, a request's from mm_processor_kwargs. One server for the
whole file (the tiny Qwen2-VL's engine starts in about a minute)."""

from __future__ import annotations

import pytest

from conftest import ask, picture, vllm_server
from tokensieve_vllm import QWEN2_VL_ARCHITECTURE

SERVER_METHOD = "divprune:0.25"
#: the picture's tokens: 300 x 400 pixels, resized to 308 x 392, 28 pixels a token: 11 x 14
N_TOKENS = 11 * 14


@pytest.fixture(scope="module")
def client(qwen_dir, tmp_path_factory):
    overrides = {"architectures": [QWEN2_VL_ARCHITECTURE], "tokensieve_method": SERVER_METHOD}
    with vllm_server(str(qwen_dir / "qwen2-vl"), overrides, tmp_path_factory.mktemp("serve") / "server.log") as api:
        yield api


def test_prompt_tokens_fall_by_what_the_servers_and_each_requests_method_pruned(client):
    stock = ask(client, picture(1), "none").usage.prompt_tokens
    assert ask(client, picture(1)).usage.prompt_tokens == stock - N_TOKENS + 38  # the server's divprune:0.25
    assert ask(client, picture(1), "pool:16").usage.prompt_tokens == stock - N_TOKENS + 15  # 3 x 5 cells of 11 x 14


def test_keep_all_answers_as_the_plugin_switched_off(client):
    off, kept_all = ask(client, picture(2), "none", max_tokens=6), ask(client, picture(2), "uniform:1.0", max_tokens=6)
    assert off.choices[0].message.content == kept_all.choices[0].message.content
    assert off.usage == kept_all.usage


def test_a_method_the_plugin_cannot_serve_is_a_clear_400(client):
    import openai

    for method, message in [("fastervlm:30", "no \\[CLS\\] token"), ("uniform:1000", f"more than the {N_TOKENS} tokens")]:
        with pytest.raises(openai.BadRequestError, match=message):
            ask(client, picture(3), method)
    assert ask(client, picture(3), "uniform:16").usage.completion_tokens == 4  # the server still answers
