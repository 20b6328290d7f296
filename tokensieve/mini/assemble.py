"""Put the converted parts and the trained weights together as a stock `LlavaForConditionalGeneration`."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import (AutoTokenizer, BitImageProcessorPil, Dinov2Config, Dinov2Model, LlamaConfig,
                          LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor)

from ..engine.compat import from_pretrained
from .chat import CHAT_TEMPLATE, IMAGE_TOKEN
from .lora import dequantised

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PATCH_SIZE = 14


def llava_config(vision: Path, language: Path, image_token_id: int, vocab_size: int,
                 vision_feature_layer: int) -> LlavaConfig:
    text_config = LlamaConfig.from_pretrained(language)
    text_config.vocab_size = vocab_size
    return LlavaConfig(
        vision_config=Dinov2Config.from_pretrained(vision),
        text_config=text_config,
        image_token_id=image_token_id,
        vision_feature_layer=vision_feature_layer,
        # "default" drops [CLS] before the projector; the tower still computes it, so [CLS]-attention
        # pruning methods read it exactly as on CLIP-based LLaVA.
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=text_config.tie_word_embeddings,
    )


def merge_lora(language: LlamaForCausalLM, lora_path: Path) -> None:
    """Fold trained low-rank adapters into the language model's weights: W += scale * B @ A."""
    with safe_open(str(lora_path), "pt") as f:
        scale = float(f.metadata()["scale"])
    lora = dequantised(load_file(str(lora_path)))
    modules = dict(language.model.named_modules())
    for key in sorted(k for k in lora if k.endswith(".lora_A")):
        name = key.removesuffix(".lora_A")
        if name not in modules:
            raise KeyError(f"LoRA file {lora_path} names {name!r}, which the language model does not have")
        weight = modules[name].weight
        weight.data += scale * (lora[name + ".lora_B"].float() @ lora[key].float()).to(weight.dtype)


def assemble(vision: Path, language: Path, projector_path: Path, lora_path: Path | None,
             vision_feature_layer: int | None = None) -> LlavaForConditionalGeneration:
    """sieve-mini: every tensor comes from a converted part or the trained files, loaded strictly."""
    with safe_open(str(projector_path), "pt") as f:
        layer = vision_feature_layer or int(f.metadata()["vision_feature_layer"])
    tokenizer = AutoTokenizer.from_pretrained(language)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = llava_config(vision, language, image_token_id, len(tokenizer), layer)
    model = LlavaForConditionalGeneration(config).eval()

    model.model.vision_tower.load_state_dict(from_pretrained(Dinov2Model, vision).state_dict(), strict=True)
    lm = from_pretrained(LlamaForCausalLM, language, dtype=torch.float32)
    if lora_path is not None:
        merge_lora(lm, lora_path)
    # New token rows (<image>) get the mean embedding: never used as input (features replace them),
    # and as an output logit it stays as unlikely as an average token.
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    embed = lm.get_input_embeddings().weight
    embed.data[image_token_id] = embed.data[:image_token_id].mean(0)
    model.model.language_model.load_state_dict(lm.model.state_dict(), strict=True)
    model.lm_head.weight.data.copy_(lm.lm_head.weight.data)
    model.model.multi_modal_projector.load_state_dict(load_file(str(projector_path)), strict=True)
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def make_processor(language: Path, image_size: int = 224) -> LlavaProcessor:
    """Offline processor: SmolLM2's tokenizer, DINOv2's ImageNet normalisation, a square resize."""
    image_processor = BitImageProcessorPil(
        size={"height": image_size, "width": image_size}, do_center_crop=False,
        image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, do_convert_rgb=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(language)
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN, num_additional_image_tokens=1,
    )
