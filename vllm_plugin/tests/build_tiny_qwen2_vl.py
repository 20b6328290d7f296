"""Build the tiny Qwen2-VL and Qwen2.5-VL of the vLLM plugin's tests (run in the vLLM environment: the configs and
processors are saved by the transformers that vLLM loads them with, < 5.20).

Random weights at shapes vLLM's CPU kernels serve: a 2-block vision tower (patch 14, 2x2 merger, so an image of
H x W pixels is (H/28) x (W/28) LLM tokens; Qwen2.5-VL with 112-pixel windows and its second block full attention), a
4-layer Qwen2 decoder (hidden 256, head_dim 64, mrope sections 8/12/12), and SmolLM2's tokenizer from sieve-mini's cache
with Qwen's vision tokens added. The image processor caps an image at 448 x 448 pixels (16 x 16 tokens), so vLLM's
profiling image stays small.

With ``--bench`` it also builds OUT_DIR/qwen2-vl-smollm2 for benchmarks/vllm_prefill.py: a 6-block tower (hidden 384)
and SmolLM2-135M's real decoder (a Qwen2 decoder with zero q/k/v biases and equal mrope sections on text is SmolLM2),
the scale of the LLaVA test model.

Usage: python vllm_plugin/tests/build_tiny_qwen2_vl.py OUT_DIR [--bench]   (OUT_DIR/qwen2-vl and OUT_DIR/qwen2.5-vl;
skips finished ones)
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import (AutoConfig, AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                          Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor,
                          Qwen2VLVideoProcessor)

from tokensieve.mini.build import language_dir

SEED = 0
PATCH, MERGE, TEMPORAL_PATCH = 14, 2, 2
MIN_PIXELS, MAX_PIXELS = 56 * 56, 448 * 448
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
#: sieve-mini's template with Qwen's image block, for `vllm serve`'s chat messages
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tokenizer():
    tok = AutoTokenizer.from_pretrained(language_dir())
    tok.add_special_tokens({"additional_special_tokens": list(VISION_TOKENS)})
    return tok


def configs(tok) -> dict[str, object]:
    ids = dict(zip(("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"),
                   tok.convert_tokens_to_ids(list(VISION_TOKENS))))
    text = dict(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]})
    qwen2 = Qwen2VLConfig(text_config=text, vision_config=dict(
        depth=2, embed_dim=128, hidden_size=256, num_heads=4, mlp_ratio=2, patch_size=PATCH, spatial_merge_size=MERGE,
        temporal_patch_size=TEMPORAL_PATCH), tie_word_embeddings=False, **ids)
    qwen2_5 = Qwen2_5_VLConfig(text_config=text, vision_config=dict(
        depth=2, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=256, patch_size=PATCH,
        spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL_PATCH, window_size=112, fullatt_block_indexes=[1]),
        tie_word_embeddings=False, **ids)
    return {"qwen2-vl": (qwen2, Qwen2VLForConditionalGeneration), "qwen2.5-vl": (qwen2_5, Qwen2_5_VLForConditionalGeneration)}


def smollm2_config(tok) -> Qwen2VLConfig:
    ids = dict(zip(("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"),
                   tok.convert_tokens_to_ids(list(VISION_TOKENS))))
    smollm2 = AutoConfig.from_pretrained(language_dir())
    text = dict(vocab_size=len(tok), hidden_size=smollm2.hidden_size, intermediate_size=smollm2.intermediate_size,
                num_hidden_layers=smollm2.num_hidden_layers, num_attention_heads=smollm2.num_attention_heads,
                num_key_value_heads=smollm2.num_key_value_heads, max_position_embeddings=4096, rms_norm_eps=smollm2.rms_norm_eps,
                tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12],
                                                               "rope_theta": smollm2.rope_parameters["rope_theta"]})
    return Qwen2VLConfig(text_config=text, vision_config=dict(
        depth=6, embed_dim=384, hidden_size=smollm2.hidden_size, num_heads=6, mlp_ratio=4, patch_size=PATCH,
        spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL_PATCH), tie_word_embeddings=True, **ids)


def load_smollm2_decoder(model: Qwen2VLForConditionalGeneration) -> None:
    decoder = load_file(language_dir() / "model.safetensors")
    table = decoder["model.embed_tokens.weight"]  # the vision tokens' rows: zeros (image pads are always replaced)
    rows = model.config.text_config.vocab_size - len(table)
    decoder["model.embed_tokens.weight"] = torch.cat([table, table.new_zeros(rows, table.shape[1])])
    language = model.model.language_model
    missing, unexpected = language.load_state_dict(
        {k.removeprefix("model."): v for k, v in decoder.items() if k.startswith("model.")}, strict=False)
    if unexpected or any(not key.endswith("_proj.bias") for key in missing):
        raise RuntimeError(f"SmolLM2's weights do not fit the decoder: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for key in missing:  # Qwen2's q/k/v biases, which SmolLM2 has not
            language.get_parameter(key).zero_()
    model.tie_weights()


def build(out: Path, bench: bool = False) -> None:
    tok = tokenizer()
    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL_PATCH),
        video_processor=Qwen2VLVideoProcessor(size=size, patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL_PATCH),
        tokenizer=tok, chat_template=CHAT_TEMPLATE)
    models = configs(tok)
    if bench:
        models["qwen2-vl-smollm2"] = (smollm2_config(tok), Qwen2VLForConditionalGeneration)
    for name, (config, model_class) in models.items():
        target = out / name
        if (target / "model.safetensors").is_file():
            print(f"tiny {name}: {target} exists")
            continue
        torch.manual_seed(SEED)
        model = model_class(config).eval()
        if name == "qwen2-vl-smollm2":
            load_smollm2_decoder(model)
        scratch = target.with_name(target.name + ".partial")
        shutil.rmtree(scratch, ignore_errors=True)
        model.save_pretrained(scratch)
        processor.save_pretrained(scratch)
        shutil.rmtree(target, ignore_errors=True)
        scratch.rename(target)
        print(f"tiny {name}: built {target}")


if __name__ == "__main__":
    build(Path(sys.argv[1]), bench="--bench" in sys.argv[2:])
