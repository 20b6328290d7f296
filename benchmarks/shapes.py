"""What the benchmark scripts share: the models they time (random weights, at the demo size or at the
shapes of real checkpoints), a prompt with one image, and a timer.

- ``demo``: the LLaVA-1.5 token layout (576 image tokens) with a 6x256 tower and an 8x512 decoder.
- ``llava-1.5-7b``: LLaVA-1.5-7B's shapes: CLIP ViT-L/336 (24x1024) and a 32x4096 Llama decoder.
- ``qwen2.5-vl-7b``: Qwen2.5-VL-7B-Instruct's shapes (its config.json): a 32x1280 windowed tower and
  a 28x3584 decoder with 4 key-value heads; a 1008-px square image gives 36x36 = 1,296 tokens.
- ``qwen2-vl-7b`` (benchmarks/video_prefill.py): Qwen2-VL-7B-Instruct's shapes (its config.json): a 32x1280 tower
  with full attention within each frame and the same decoder; a 360p video (644x364 after the processor's resize)
  gives 23x13 = 299 tokens per pair of frames.
- ``internvl3-8b``: InternVL3-8B's shapes (``OpenGVLab/InternVL3-8B-hf``): a 24x1024 InternViT-300M tower
  with a [CLS] token on 448-px tiles, pixel shuffle to 256 tokens per tile, and a 28x3584 Qwen2.5 decoder
  with 4 key-value heads; an 896-px square image is 2x2 crops and a thumbnail, 5 tiles, 1,280 tokens.
- ``gemma3-12b``: Gemma3-12B-it's shapes (its config.json): a 27x1152 SigLIP tower on 896-px images (64x64
  patches, average-pooled 4x4 into 256 tokens) and a 48x3840 decoder with 8 key-value heads, five sliding-window
  layers (1,024 tokens) to one full-attention layer.
- ``qwen3-vl-8b``: Qwen3-VL-8B-Instruct's shapes: a 27x1152 tower with DeepStack sets from blocks 8, 16 and 24,
  a 36x4096 decoder with 8 key-value heads; a 1024-px square image (patch 16) gives 32x32 = 1,024 tokens.

Real-size models are built directly on the target device in the target dtype: a 7B model in float32
on a CPU would need 28 GiB before the first cast.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    InternVLConfig,
    InternVLForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from tokensieve.demo_model import demo_inputs, demo_llava

MODELS = ("demo", "llava-1.5-7b", "qwen2.5-vl-7b", "qwen3-vl-8b", "internvl3-8b", "gemma3-12b")
MODEL_HELP = ("demo (CPU-sized LLaVA) | llava-1.5-7b | qwen2.5-vl-7b | qwen3-vl-8b | internvl3-8b | gemma3-12b (random weights "
              "at the real shapes)")

QWEN_IMAGE_SIDE, QWEN_PATCH, QWEN_MERGE, QWEN_TEMPORAL = 1008, 14, 2, 2
QWEN3_IMAGE_SIDE, QWEN3_PATCH = 1024, 16
QWEN_TOKENS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
               "vision_end_token_id": 151653}


def qwen2_5_vl_7b(wide: bool = False) -> Qwen2_5_VLForConditionalGeneration:
    text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                  patch_size=QWEN_PATCH, spatial_merge_size=QWEN_MERGE, temporal_patch_size=QWEN_TEMPORAL,
                  window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
    if wide:  # the shrunk tower's second block attends in full; the rotary sections halved with head_dim
        _tiny_but_wide(text, vision, fullatt_block_indexes=[1], rope_parameters=_halved_mrope(text))
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **QWEN_TOKENS)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def qwen2_vl_7b(wide: bool = False) -> Qwen2VLForConditionalGeneration:
    """Qwen2-VL-7B-Instruct: its tower is ``embed_dim`` wide and its ``hidden_size`` is the decoder's (the merger's
    output)."""
    text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
    vision = dict(depth=32, embed_dim=1280, hidden_size=3584, mlp_ratio=4, num_heads=16, patch_size=QWEN_PATCH,
                  spatial_merge_size=QWEN_MERGE, temporal_patch_size=QWEN_TEMPORAL)
    if wide:
        _tiny_but_wide(text, vision, rope_parameters=_halved_mrope(text))
    config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **QWEN_TOKENS)
    return Qwen2VLForConditionalGeneration(config).eval()


def _halved_mrope(text: dict) -> dict:
    """Qwen2(.5)-VL's rope parameters with the t, h, w sections halved, for :func:`_tiny_but_wide`'s head_dim of 64
    (half of 128)."""
    return {**text["rope_parameters"], "mrope_section": [section // 2 for section in text["rope_parameters"]["mrope_section"]]}


def _qwen3_vl_8b_configs(wide: bool) -> tuple[dict, dict]:
    """Qwen3-VL-8B-Instruct's text and vision configs (shrunk by :func:`_tiny_but_wide` where ``wide``)."""
    text = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                                    "mrope_section": [24, 20, 20], "mrope_interleaved": True})
    vision = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                  patch_size=QWEN3_PATCH, spatial_merge_size=QWEN_MERGE, temporal_patch_size=QWEN_TEMPORAL,
                  num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24])
    if wide:  # DeepStack from both blocks of the shrunk tower; the rotary sections halved with head_dim
        _tiny_but_wide(text, vision, deepstack_visual_indexes=[0, 1],
                       rope_parameters={**text["rope_parameters"], "mrope_section": [12, 10, 10]})
    return text, vision


def qwen3_vl_8b(wide: bool = False) -> Qwen3VLForConditionalGeneration:
    text, vision = _qwen3_vl_8b_configs(wide)
    config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **QWEN_TOKENS)
    return Qwen3VLForConditionalGeneration(config).eval()


def qwen3_5_wide() -> Qwen3_5ForConditionalGeneration:
    """Qwen3-VL-8B's tower (without DeepStack) and token layout shrunk as ``qwen3_vl_8b(wide=True)``, with a Qwen3.5
    decoder of 8 layers: three linear-attention layers to one full-attention layer, twice (Qwen3.5's own sizes are
    not in this file)."""
    text, vision = _qwen3_vl_8b_configs(wide=True)
    del vision["deepstack_visual_indexes"]
    text.update(layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 2, linear_conv_kernel_dim=4,
                linear_key_head_dim=64, linear_value_head_dim=64, linear_num_key_heads=4, linear_num_value_heads=8)
    text["rope_parameters"]["partial_rotary_factor"] = 1.0
    config = Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=False, **QWEN_TOKENS)
    return Qwen3_5ForConditionalGeneration(config).eval()


def _tiny_but_wide(text: dict, vision: dict, **overrides) -> None:
    """Shrinks a real config in place to a CPU-sized model with the real token layout: an 8x512 decoder (8 heads of
    64, 2 key-value heads) and a 2x128 tower (kept small: at the real image sizes, thousands of patches, a wider
    tower's attention would outweigh the decoder whose prefill is measured); ``overrides`` set keys of either dict
    that the family needs besides."""
    text.update(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2)
    if "head_dim" in text:
        text["head_dim"] = 64
    vision.update({"depth" if "depth" in vision else "num_hidden_layers": 2,
                   "num_heads" if "num_heads" in vision else "num_attention_heads": 2})
    if "embed_dim" in vision:  # Qwen2-VL: the tower's width is embed_dim (mlp_ratio 4: 512), hidden_size its output
        vision.update(embed_dim=128, hidden_size=512)
    else:
        vision.update(hidden_size=128, intermediate_size=512)
    if "out_hidden_size" in vision:
        vision["out_hidden_size"] = 512
    for key, value in overrides.items():
        (vision if key in vision else text)[key] = value


def qwen_inputs(batch: int, prompt_tokens: int = 40, seed: int = 0, side: int = QWEN_IMAGE_SIDE,
                patch: int = QWEN_PATCH) -> dict:
    """``vision_start, (side/patch/2)^2 x image_pad, vision_end`` after 5 text tokens, as the processor lays them
    out (1,296 tokens for Qwen2.5-VL's 1008 px and patch 14); the pixel values are random patches already flattened
    (grid_h * grid_w, 3 * 2 * patch * patch)."""
    generator = torch.Generator().manual_seed(seed)
    grid = side // patch
    tokens = (grid // QWEN_MERGE) ** 2
    text = torch.randint(3, 150000, (batch, prompt_tokens), generator=generator)
    image = torch.tensor([QWEN_TOKENS["vision_start_token_id"]] + [QWEN_TOKENS["image_token_id"]] * tokens
                         + [QWEN_TOKENS["vision_end_token_id"]]).expand(batch, -1)
    input_ids = torch.cat([text[:, :5], image, text[:, 5:]], dim=1)
    return {
        "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == QWEN_TOKENS["image_token_id"]).int(),
        "pixel_values": torch.randn(batch * grid * grid, 3 * QWEN_TEMPORAL * patch**2, generator=generator),
        "image_grid_thw": torch.tensor([[1, grid, grid]] * batch),
    }


#: a 640x360 video as the Qwen2-VL processor resizes it (sides to multiples of 28): 26x46 patches, 13x23 = 299 tokens
#: per pair of frames; sampled at 2 fps, a pair spans one second (Qwen2.5-VL's ``second_per_grid_ts``)
QWEN_VIDEO_HEIGHT, QWEN_VIDEO_WIDTH, QWEN_VIDEO_SECONDS_PER_PAIR = 364, 644, 1.0


def qwen_video_inputs(frames: int, prompt_tokens: int = 40, seed: int = 0, seconds_per_pair: float | None = None) -> dict:
    """``vision_start, t*h*w x video_pad, vision_end`` after 5 text tokens, as the processor lays out a 360p video of
    ``frames`` frames (t = frames / 2 pairs; 2,392 tokens for 16 frames), ``mm_token_type_ids`` 2 at the video tokens;
    batch 1. The pixels are a random first pair of frames that drifts a little from pair to pair (so the pairs are
    alike, as a video's are), already flattened (t * grid_h * grid_w, 3 * 2 * patch * patch), each patch at the same
    row of every pair. ``seconds_per_pair``: Qwen2.5-VL's ``second_per_grid_ts`` (Qwen2-VL has none)."""
    generator = torch.Generator().manual_seed(seed)
    t, grid_h, grid_w = frames // QWEN_TEMPORAL, QWEN_VIDEO_HEIGHT // QWEN_PATCH, QWEN_VIDEO_WIDTH // QWEN_PATCH
    tokens = t * (grid_h // QWEN_MERGE) * (grid_w // QWEN_MERGE)
    text = torch.randint(3, 150000, (1, prompt_tokens), generator=generator)
    video = torch.tensor([[QWEN_TOKENS["vision_start_token_id"]] + [QWEN_TOKENS["video_token_id"]] * tokens
                          + [QWEN_TOKENS["vision_end_token_id"]]])
    input_ids = torch.cat([text[:, :5], video, text[:, 5:]], dim=1)
    first = torch.randn(grid_h * grid_w, 3 * QWEN_TEMPORAL * QWEN_PATCH**2, generator=generator)
    steps = 0.3 * torch.randn(t, *first.shape, generator=generator)
    steps[0] = 0
    inputs = {
        "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == QWEN_TOKENS["video_token_id"]).int() * 2,
        "pixel_values_videos": (first + steps.cumsum(0)).flatten(0, 1),
        "video_grid_thw": torch.tensor([[t, grid_h, grid_w]]),
    }
    if seconds_per_pair is not None:
        inputs["second_per_grid_ts"] = torch.tensor([seconds_per_pair])
    return inputs


INTERNVL_TILE, INTERNVL_TILES, INTERNVL_TOKENS_PER_TILE = 448, 5, 256
INTERNVL_TOKENS = {"image_token_id": 151667, "start_image_token_id": 151665, "end_image_token_id": 151666}


def internvl3_8b(wide: bool = False) -> InternVLForConditionalGeneration:
    text = dict(model_type="qwen2", vocab_size=151674, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  attention_bias=True, image_size=INTERNVL_TILE, patch_size=14, layer_norm_eps=1e-6, use_qk_norm=False,
                  use_mean_pooling=True, layer_scale_init_value=0.1)
    if wide:
        _tiny_but_wide(text, vision)
    config = InternVLConfig(text_config=text, vision_config=vision, image_token_id=INTERNVL_TOKENS["image_token_id"],
                            image_seq_length=INTERNVL_TOKENS_PER_TILE, downsample_ratio=0.5, vision_feature_layer=-1,
                            vision_feature_select_strategy="default", tie_word_embeddings=False)
    return InternVLForConditionalGeneration(config).eval()


def internvl_inputs(batch: int, prompt_tokens: int = 40, seed: int = 0) -> dict:
    """``<img>, 1,280 x <IMG_CONTEXT>, </img>`` after 5 text tokens, as the processor lays out a 896-px image
    (2x2 crops and the thumbnail, tile after tile); the pixel values are random tiles."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(3, 150000, (batch, prompt_tokens), generator=generator)
    image = torch.tensor([INTERNVL_TOKENS["start_image_token_id"]]
                         + [INTERNVL_TOKENS["image_token_id"]] * INTERNVL_TOKENS_PER_TILE * INTERNVL_TILES
                         + [INTERNVL_TOKENS["end_image_token_id"]]).expand(batch, -1)
    input_ids = torch.cat([text[:, :5], image, text[:, 5:]], dim=1)
    return {
        "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(batch * INTERNVL_TILES, 3, INTERNVL_TILE, INTERNVL_TILE, generator=generator),
    }


GEMMA3_IMAGE_SIDE = 896
GEMMA3_TOKENS = {"boi_token_index": 255999, "eoi_token_index": 256000, "image_token_index": 262144}


def gemma3_12b(wide: bool = False) -> Gemma3ForConditionalGeneration:
    text = dict(vocab_size=262208, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
                num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256, max_position_embeddings=131072,
                rms_norm_eps=1e-6, sliding_window=1024, sliding_window_pattern=6, rope_theta=1000000.0,
                rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 8.0})
    vision = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                  num_attention_heads=16, image_size=GEMMA3_IMAGE_SIDE, patch_size=14, layer_norm_eps=1e-6,
                  vision_use_head=False)
    if wide:
        _tiny_but_wide(text, vision, query_pre_attn_scalar=64)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=256, **GEMMA3_TOKENS)
    return Gemma3ForConditionalGeneration(config).eval()


def gemma3_inputs(batch: int, prompt_tokens: int = 40, seed: int = 0) -> dict:
    """``BOI, 256 x image token, EOI`` after 5 text tokens, as the processor lays them out, with the
    ``token_type_ids`` it returns (1 at the image tokens)."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(3, 250000, (batch, prompt_tokens), generator=generator)
    image = torch.tensor([GEMMA3_TOKENS["boi_token_index"]] + [GEMMA3_TOKENS["image_token_index"]] * 256
                         + [GEMMA3_TOKENS["eoi_token_index"]]).expand(batch, -1)
    input_ids = torch.cat([text[:, :5], image, text[:, 5:]], dim=1)
    return {
        "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
        "token_type_ids": (input_ids == GEMMA3_TOKENS["image_token_index"]).long(),
        "pixel_values": torch.randn(batch, 3, GEMMA3_IMAGE_SIDE, GEMMA3_IMAGE_SIDE, generator=generator),
    }


def built_on(device: str, dtype: str, build) -> torch.nn.Module:
    """``build()``'s model made directly on ``device`` in ``dtype``, not first in float32 on the CPU."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            return build()
    finally:
        torch.set_default_dtype(default)


def model_and_inputs(name: str, device: str, dtype: str, batch: int = 1,
                     attention: str = "sdpa") -> tuple[torch.nn.Module, dict]:
    """Model ``name`` (one of MODELS) on ``device`` in ``dtype`` with its prompt, gradients off."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    torch.set_grad_enabled(False)
    torch_dtype = getattr(torch, dtype)
    if name == "demo":
        model = demo_llava().to(device=device, dtype=torch_dtype)
    else:
        model = built_on(device, dtype, {
            "llava-1.5-7b": lambda: demo_llava(vision_layers=24, llm_hidden=4096, llm_layers=32, vision_hidden=1024,
                                               llm_heads=32),
            "internvl3-8b": internvl3_8b, "gemma3-12b": gemma3_12b, "qwen3-vl-8b": qwen3_vl_8b,
            "qwen2.5-vl-7b": qwen2_5_vl_7b}[name])
    model.set_attn_implementation(attention)
    if name == "qwen3-vl-8b":
        inputs = qwen_inputs(batch, side=QWEN3_IMAGE_SIDE, patch=QWEN3_PATCH)
    else:
        inputs = {"qwen2.5-vl-7b": qwen_inputs, "internvl3-8b": internvl_inputs, "gemma3-12b": gemma3_inputs}.get(name, demo_inputs)(batch)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(torch_dtype)
    return model, inputs


def image_token_count(model: torch.nn.Module, inputs: dict) -> int:
    """Image placeholders in the first row."""
    return int((inputs["input_ids"][0] == model.config.image_token_id).sum())


def describe(model: torch.nn.Module, inputs: dict, device: str, dtype: str) -> str:
    """One line saying what is measured: tower and LLM sizes, tokens, batch, device, dtype and attention kernel."""
    vision, text = model.config.vision_config, model.config.text_config
    depth = getattr(vision, "num_hidden_layers", None) or vision.depth
    width = getattr(vision, "embed_dim", None) or vision.hidden_size  # Qwen2-VL's hidden_size is its output's
    batch, length = inputs["input_ids"].shape
    visual = image_token_count(model, inputs)
    tokens = f"{visual} image"
    if "video_grid_thw" in inputs:
        video = int((inputs["input_ids"][0] == model.config.video_token_id).sum())
        t, h, w = inputs["video_grid_thw"][0].tolist()
        tokens, visual = f"{video} video ({t} frame pairs of {h}x{w} patches)", visual + video
    name = device if device == "cpu" else torch.cuda.get_device_name()
    return (f"model: vision {depth}x{width}, LLM {text.num_hidden_layers}x{text.hidden_size}, "
            f"{tokens} + {length - visual} text tokens, batch {batch}, {name} {dtype}, "
            f"attention {model.config._attn_implementation}, torch {torch.__version__}")


def kept_positions(ids: torch.Tensor, token_id: int, kept: torch.Tensor) -> torch.Tensor:
    """The positions in the prompt ``ids`` of its text and of the placeholders of ``token_id`` at ``kept`` (indices
    among those placeholders), ascending."""
    visual = (ids == token_id).nonzero().squeeze(1)
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[visual] = False
    keep[visual[kept]] = True
    return keep.nonzero().squeeze(1)


def decoder_fed_only(model, inputs: dict, kept: torch.Tensor, token_id: int | None = None):
    """A pre-hook for the language model that keeps the text and the visual tokens at ``kept`` (indices among the
    placeholders of ``token_id``, the image's by default) of every per-token input: the decoder then runs as if the
    prompt held only those."""
    index = kept_positions(inputs["input_ids"][0], model.config.image_token_id if token_id is None else token_id, kept)

    def gather(module, args, kwargs):
        kwargs = dict(kwargs, inputs_embeds=kwargs["inputs_embeds"][:, index])
        mask = kwargs.get("attention_mask")
        if isinstance(mask, dict):  # Gemma3: full and sliding masks, (batch, 1, query, key)
            kwargs["attention_mask"] = {name: m[:, :, index][..., index] if m is not None else None for name, m in mask.items()}
        elif mask is not None:
            kwargs["attention_mask"] = mask[:, index]
        positions = kwargs.get("position_ids")
        kwargs["position_ids"] = positions[..., index] if positions is not None else index.unsqueeze(0)
        if kwargs.get("visual_pos_masks") is not None:  # Qwen3-VL's DeepStack rows: one per image token, in order
            kwargs["visual_pos_masks"] = kwargs["visual_pos_masks"][:, index]
            kwargs["deepstack_visual_embeds"] = [level[kept] for level in kwargs["deepstack_visual_embeds"]]
        return args, kwargs

    return gather


def timed(fn, device: str) -> float:
    """Seconds ``fn()`` takes, the GPU synchronised before and after."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """The median of ``values`` and a distribution-free interval for it: the order statistics x(j) and
    x(n+1-j) with the largest j whose binomial coverage still reaches ``confidence`` (n=9: x(2)..x(8),
    96%). With too few values for any such j, the interval is the whole range."""
    ordered, n = sorted(values), len(values)
    j = 0
    while j + 1 <= n // 2 and 1 - 2 * sum(math.comb(n, i) for i in range(j + 1)) / 2**n >= confidence:
        j += 1
    return statistics.median(ordered), ordered[max(j - 1, 0)], ordered[n - max(j, 1)]


def paired_ratios(numerators: list[float], denominators: list[float]) -> tuple[float, float, float]:
    """Median and 95% interval of the per-pair ratios of interleaved runs (run i of each timed back to
    back), so drift on a shared machine cancels within a pair instead of widening both medians."""
    return median_interval([a / b for a, b in zip(numerators, denominators)])
