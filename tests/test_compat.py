"""The transformers internals tokensieve's hooks rely on, named one by one (tokensieve/engine/compat.py).

A release that moves one of them fails here with what moved, who uses it, and what to do, before the contract
tests fail with a shape error somewhere inside a hook. Also: tokensieve's own model loading does not depend on
hub kernels (transformers 5.25 turns them on by default and fails without the ``kernels`` package).
"""

from __future__ import annotations

import importlib
import inspect
import re
from importlib.metadata import requires, version

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel, Qwen2Config, Qwen2Model

from tokensieve.engine import compat
from tokensieve.engine.llm_signals import attention_module, rotary_function
from tokensieve.engine.masks import full_causal_mask

TESTED = next(re.sub(r"^transformers\s*", "", r).split(";")[0].strip() for r in requires("tokensieve")
              if re.match(r"transformers\b", r))


def moved(what: str, used_by: str) -> str:
    return (f"transformers {version('transformers')} has no {what} (used by {used_by}). tokensieve is tested with "
            f"transformers{TESTED}: pip install 'transformers{TESTED}', or teach tokensieve/engine/compat.py "
            "and the user named above the new layout.")


# (modeling module, function, who calls it)
MODULE_FUNCTIONS = [
    ("transformers.models.llama.modeling_llama", "apply_rotary_pos_emb", "llm_signals.rotary_function"),
    ("transformers.models.qwen2.modeling_qwen2", "apply_rotary_pos_emb", "llm_signals.rotary_function"),
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "apply_rotary_pos_emb", "llm_signals.rotary_function"),
    ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "apply_rotary_pos_emb", "llm_signals.rotary_function"),
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "apply_rotary_pos_emb_vision", "adapters/qwen2_vl.py"),
    ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "apply_rotary_pos_emb_vision", "adapters/qwen2_vl.py"),
    ("transformers.models.llava_next.modeling_llava_next", "image_size_to_num_patches", "adapters/llava_next.py"),
    ("transformers.vision_utils", "get_vision_window_index", "adapters/qwen2_vl.py"),
    ("transformers.models.internvl.modeling_internvl", "InternVLModel.pixel_shuffle", "adapters/internvl.py"),
    ("transformers.models.gemma3.modeling_gemma3", "get_block_sequence_ids_for_mask", "adapters/gemma3.py"),
    ("transformers.models.gemma3.modeling_gemma3", "create_masks_for_vision_model", "adapters/gemma3.py"),
    ("transformers.masking_utils", "create_masks_for_generate", "adapters/gemma3.py"),
    ("transformers.models.gemma4.modeling_gemma4", "get_block_sequence_ids_for_mask", "adapters/gemma4.py"),
    ("transformers.models.gemma4.modeling_gemma4", "create_masks_for_vision_model", "adapters/gemma4.py"),
    ("transformers.models.gemma4.modeling_gemma4", "apply_multidimensional_rope", "adapters/gemma4.py"),
    ("transformers.masking_utils", "ALL_MASK_ATTENTION_FUNCTIONS", "engine/masks.py"),
    ("transformers.masking_utils", "causal_mask_function", "engine/masks.py"),
    ("transformers.generation.utils", "GenerationMixin._prepare_multimodal_encoder_kwargs_for_generation",
     "the adapters' mm_encoder_outputs"),
]


@pytest.mark.parametrize("module, name, used_by", MODULE_FUNCTIONS, ids=[f"{m.rsplit('.', 1)[1]}.{n}"
                                                                       for m, n, _ in MODULE_FUNCTIONS])
def test_the_module_level_names_hooks_import_are_there(module, name, used_by):
    try:
        found = importlib.import_module(module)
    except ImportError:
        pytest.fail(moved(f"module {module}", used_by))
    for part in name.split("."):
        found = getattr(found, part, None)
        assert found is not None, moved(f"{module}.{name}", used_by)
    assert callable(found) or hasattr(found, "__getitem__"), moved(f"{module}.{name} as a function or mapping", used_by)


@pytest.mark.parametrize("model_class", [LlamaModel, Qwen2Model], ids=["llama", "qwen2"])
def test_the_cache_argument_the_forwards_take(model_class):
    parameters = inspect.signature(model_class.forward).parameters
    assert compat.CACHE_ARGUMENT in parameters, moved(
        f"{model_class.__name__}.forward({compat.CACHE_ARGUMENT}=...) (its parameters: {list(parameters)})",
        "compat.CACHE_ARGUMENT, every hook that reads the KV cache")
    assert compat.CACHE_ARGUMENT == ("cache" if "cache" in parameters else "past_key_values")


def _tiny(config_class, model_class):
    torch.manual_seed(0)
    config = config_class(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return model_class(config).eval()


@pytest.mark.parametrize("config_class, model_class", [(LlamaConfig, LlamaModel), (Qwen2Config, Qwen2Model)],
                         ids=["llama", "qwen2"])
def test_the_decoder_layout_the_llm_hooks_read(config_class, model_class):
    decoder = _tiny(config_class, model_class)
    assert isinstance(getattr(getattr(decoder, "rotary_emb", None), "inv_freq", None), torch.Tensor), moved(
        f"{model_class.__name__}.rotary_emb.inv_freq", "engine/ppe.py and engine/layer_stages.py (positions)")
    assert hasattr(decoder, "layers") and len(decoder.layers) == 2, moved(f"{model_class.__name__}.layers",
                                                                          "every in-LLM stage")
    attention = attention_module(decoder.layers[0])  # raises TypeError naming the layer when q_proj/k_proj moved
    rotary = rotary_function(attention)  # raises TypeError naming the module when apply_rotary_pos_emb moved
    # the function rotates as the layer does: q and k through the decoder's own cos/sin
    positions = torch.arange(5)[None]
    cos, sin = decoder.rotary_emb(torch.zeros(1, 5, 32), position_ids=positions)
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    rotated_q, rotated_k = rotary(q, k, cos, sin)
    assert rotated_q.shape == q.shape and rotated_k.shape == k.shape
    torch.testing.assert_close(rotated_q[..., 0, :], q[..., 0, :])  # position 0 is not rotated
    torch.testing.assert_close(rotated_q.norm(dim=-1), q.norm(dim=-1))  # a rotation keeps lengths


def compat_mask_functions():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return ALL_MASK_ATTENTION_FUNCTIONS


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_the_causal_mask_builders_masks_use(implementation):
    assert implementation in compat_mask_functions(), moved(
        f"masking_utils.ALL_MASK_ATTENTION_FUNCTIONS[{implementation!r}]", "engine/masks.py")
    config = LlamaConfig()
    config._attn_implementation = implementation
    mask = full_causal_mask(config, batch=2, queries=3, keys=5, device="cpu", dtype=torch.float32)
    assert mask.shape == (2, 1, 3, 5), moved(f"the {implementation} mask's (batch, 1, queries, keys) shape",
                                             "engine/masks.py")
    allowed = mask if mask.dtype == torch.bool else mask == 0
    # query i (the last 3 of 5 positions) sees keys 0 .. i + 2
    expected = torch.tensor([[True, True, True, False, False], [True, True, True, True, False], [True] * 5])
    assert torch.equal(allowed[0, 0], expected) and torch.equal(allowed[1, 0], expected)


def test_own_model_loading_does_not_need_hub_kernels(tmp_path, monkeypatch):
    """5.25 loads with hub kernels unless told otherwise and raises without the ``kernels`` package; tokensieve's
    loader passes ``use_kernels=False``, which 5.23 and 5.24 accept too. The package is made to look missing."""
    import transformers.modeling_utils as modeling_utils

    _tiny(LlamaConfig, LlamaForCausalLM).save_pretrained(tmp_path)
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    monkeypatch.setattr(modeling_utils, "is_kernels_available", lambda: False)
    model = compat.from_pretrained(LlamaForCausalLM, tmp_path)
    assert not getattr(model, "use_kernels", False)
    reference = _tiny(LlamaConfig, LlamaForCausalLM)
    tokens = torch.tensor([[1, 5, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, reference(tokens).logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["gemma3", "gemma4"])
def test_the_gemma_mask_builders_take_their_arguments_in_the_order_the_adapter_passes_them(family):
    from transformers.masking_utils import create_masks_for_generate

    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    expected = ["config", "inputs_embeds", "attention_mask", compat.CACHE_ARGUMENT, "position_ids"]
    for builder, extra in ((modeling.create_masks_for_vision_model, ["block_sequence_ids"]),
                           (create_masks_for_generate, [])):
        names = list(inspect.signature(builder).parameters)[: len(expected) + len(extra)]
        assert names == expected + extra, moved(f"{builder.__name__}({', '.join(expected + extra)}) (it takes {names})",
                                                f"adapters/{family}.py, which passes them by position")


def test_the_gemma4_vision_rotary_takes_the_arguments_the_adapter_passes():
    from transformers.models.gemma4 import modeling_gemma4

    names = list(inspect.signature(modeling_gemma4.apply_multidimensional_rope).parameters)[:4]
    assert names == ["x", "cos", "sin", "position_ids"], moved(
        f"apply_multidimensional_rope(x, cos, sin, position_ids) (it takes {names})",
        "adapters/gemma4.py, which recomputes the tower's queries and keys for vision_attention")
