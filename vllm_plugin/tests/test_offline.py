"""The plugin under vLLM's offline ``LLM.generate``: one engine for the whole file (its start costs minutes on a
2-core CPU); methods and budgets vary per request."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

import tokensieve as ts
from conftest import PROMPT, picture
from tokensieve_vllm import ARCHITECTURE, QWEN2_5_VL_ARCHITECTURE, QWEN2_VL_ARCHITECTURE, QWEN3_VL_ARCHITECTURE
from tokensieve_vllm.llava import image_shape
from tokensieve_vllm.methods import UnservableMethod, checked_count

N_TOKENS = 576
NEW_TOKENS = 5
#: one request per method; each differs from the others in how it chooses (scores, diversity, grids, merges)
SERVED = ["divprune:64", "pool:32", "fastervlm:144", "visionzip:64", "uniform:0.25", "random:50", "downsample:64",
          "vispruner:64", "dart_pre:64,text_pivots=0", "divprune:1.0", "none"]


@pytest.fixture(scope="module")
def llm(model_dir):
    from vllm import LLM

    return LLM(model=model_dir, hf_overrides={"architectures": [ARCHITECTURE]}, dtype="float32", max_model_len=2048,
               limit_mm_per_prompt={"image": 1}, enforce_eager=True, seed=0)


@pytest.fixture(scope="module")
def answers(llm):
    """Every SERVED spelling on its own image, in one batch: (prompt token count, generated token ids) per spelling."""
    from vllm import SamplingParams

    requests = [{"prompt": PROMPT, "multi_modal_data": {"image": picture(seed)},
                 "mm_processor_kwargs": {"tokensieve_method": spelling}} for seed, spelling in enumerate(SERVED)]
    outputs = llm.generate(requests, SamplingParams(temperature=0, max_tokens=NEW_TOKENS))
    return {spelling: (len(out.prompt_token_ids), list(out.outputs[0].token_ids)) for spelling, out in zip(SERVED, outputs)}


@pytest.fixture(scope="module")
def reference(model_dir):
    """The transformers model and processor of the same checkpoint, for ts.apply."""
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(model_dir)


def _shape(model_dir):
    from transformers import AutoConfig

    return image_shape(AutoConfig.from_pretrained(model_dir))


def test_prompt_tokens_fall_by_exactly_what_was_pruned(answers, model_dir):
    stock_length = answers["none"][0]
    for spelling, (length, _) in answers.items():
        kept = checked_count(spelling, _shape(model_dir))
        assert length == stock_length - N_TOKENS + kept, spelling
    assert answers["pool:32"][0] == stock_length - N_TOKENS + 30  # the largest whole grid within 32: 5x6


def test_tokens_equal_ts_apply_with_repacked_positions(answers, reference):
    """vLLM numbers the kept tokens without gaps: its tokens are ts.apply(..., positions="repack")'s, token for token."""
    model, processor = reference
    assert len({tuple(tokens) for _, tokens in answers.values()}) > 1  # the methods' answers differ: a real comparison
    for seed, spelling in enumerate(SERVED):
        inputs = processor(images=picture(seed), text=PROMPT, return_tensors="pt")
        with torch.no_grad():
            if spelling == "none":
                out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
            else:
                with ts.apply(model, ts.build(spelling), positions="repack"):
                    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert out[0, inputs["input_ids"].shape[1]:].tolist() == answers[spelling][1], spelling


def test_keep_all_gives_the_tokens_of_the_plugin_switched_off(answers, llm):
    from vllm import SamplingParams

    image = picture(99)
    requests = [{"prompt": PROMPT, "multi_modal_data": {"image": image}, "mm_processor_kwargs": {"tokensieve_method": spelling}}
                for spelling in ("none", "divprune:1.0", "uniform:576")]
    outputs = llm.generate(requests, SamplingParams(temperature=0, max_tokens=NEW_TOKENS))
    tokens = [list(out.outputs[0].token_ids) for out in outputs]
    assert tokens[0] == tokens[1] == tokens[2]
    assert len({len(out.prompt_token_ids) for out in outputs}) == 1


@pytest.mark.parametrize(("spelling", "message"), [
    ("fastv:0.5", "prunes inside the LLM"),
    ("cdpruner:64", "never sees the prompt"),
    ("uniform:1000", "more than the 576 tokens"),
    ("pool:32+fastv", "is a chain"),
    ("tome_vit", "inside the vision tower"),
    ("divprune:keep=0", "keep"),
])
def test_bad_input_is_refused_before_the_request_runs(llm, spelling, message):
    from vllm import SamplingParams

    request = {"prompt": PROMPT, "multi_modal_data": {"image": picture(7)}, "mm_processor_kwargs": {"tokensieve_method": spelling}}
    with pytest.raises(Exception, match=message) as refused:
        llm.generate(request, SamplingParams(temperature=0, max_tokens=1))
    assert isinstance(refused.value, UnservableMethod) or UnservableMethod.__name__ in repr(refused.value), refused.value
    after = llm.generate({**request, "mm_processor_kwargs": {"tokensieve_method": "uniform:16"}},
                         SamplingParams(temperature=0, max_tokens=1))  # the engine survived
    assert len(after[0].outputs[0].token_ids) == 1


def test_a_model_the_plugin_does_not_cover_is_refused():
    from transformers import LlavaNextConfig, Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig, SiglipVisionConfig, LlavaConfig

    for qwen, architecture in [(Qwen2VLConfig, QWEN2_VL_ARCHITECTURE), (Qwen2_5_VLConfig, QWEN2_5_VL_ARCHITECTURE),
                               (Qwen3VLConfig, QWEN3_VL_ARCHITECTURE)]:  # the Qwen architecture that serves it
        with pytest.raises(UnservableMethod, match=f"serves LLaVA-1.5 checkpoints.*: use {architecture}$"):
            image_shape(qwen())
    with pytest.raises(UnservableMethod, match="serves LLaVA-1.5 checkpoints.*: drop the architecture override"):
        image_shape(LlavaNextConfig())
    siglip = image_shape(LlavaConfig(vision_config=SiglipVisionConfig(image_size=224, patch_size=14).to_dict()))
    assert siglip.grid == (16, 16) and not siglip.has_cls
    with pytest.raises(UnservableMethod, match="no \\[CLS\\] token"):
        checked_count("fastervlm:64", siglip)
