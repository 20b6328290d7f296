"""LoRA adapters trained here fold into plain weights: the merged model computes what the adapted one did."""

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from tokensieve.mini.assemble import merge_lora
from tokensieve.mini.lora import add_lora, dequantised, lora_state, quantised
from tokensieve.mini.train import lr_at


def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval()


def _trained_adapters(model, targets):
    wrapped = add_lora(model.model, targets, rank=4, alpha=8)
    for layer in wrapped.values():  # as if trained: B is no longer zero
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    return wrapped


def _merged_logits(state, tmp_path, ids):
    """Logits of a fresh tiny model with `state` saved, then folded in as assemble does."""
    path = tmp_path / "lora.safetensors"
    save_file(state, str(path), metadata={"scale": str(8 / 4)})
    merged = _tiny_llama()
    merge_lora(merged, path)
    with torch.no_grad():
        return merged(ids).logits


def test_merged_weights_reproduce_the_adapted_model(tmp_path):
    adapted = _tiny_llama()
    wrapped = _trained_adapters(adapted, ("q_proj", "v_proj"))
    assert len(wrapped) == 4  # two layers x (q, v)
    ids = torch.randint(0, 64, (2, 9))
    merged = _merged_logits(lora_state(wrapped), tmp_path, ids)
    with torch.no_grad():
        assert torch.allclose(adapted(ids).logits, merged, atol=1e-5)
        assert not torch.allclose(_tiny_llama()(ids).logits, merged, atol=1e-3)


def test_fresh_adapters_change_nothing():
    base, adapted = _tiny_llama(), _tiny_llama()
    add_lora(adapted.model, ("q_proj", "v_proj"), rank=4, alpha=8)
    ids = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        assert torch.equal(base(ids).logits, adapted(ids).logits)


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    assert lr_at(0, 1000, 1.0) == 0.01
    assert lr_at(99, 1000, 1.0) == 1.0
    assert abs(lr_at(1000, 1000, 1.0) - 0.1) < 1e-9
    assert lr_at(500, 1000, 1.0) < lr_at(200, 1000, 1.0)


def test_int8_export_merges_close_to_the_float_adapters(tmp_path):
    adapted = _tiny_llama()
    state = lora_state(_trained_adapters(adapted, ("q_proj", "v_proj", "down_proj")))
    restored = dequantised(quantised(state))
    assert restored.keys() == state.keys()
    for name, tensor in state.items():  # int8 steps of 1/127 of the row's max, the scale itself in fp16
        step = tensor.abs().amax(dim=1, keepdim=True) / 127
        assert ((restored[name] - tensor).abs() <= 0.6 * step).all()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.allclose(adapted(ids).logits, _merged_logits(quantised(state), tmp_path, ids), atol=1e-2)
