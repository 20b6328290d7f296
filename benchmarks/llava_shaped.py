"""What the benchmark scripts share: the LLaVA-shaped random model with its 576-token prompt, and a timer."""

from __future__ import annotations

import time

import torch

from tokensieve.demo_model import demo_inputs, demo_llava

REAL_SIZE_HELP = "LLaVA-1.5-7B shapes: CLIP-L/336 (24 layers, 1024) + a 4096x32 decoder"


def model_and_inputs(real_size: bool, device: str, dtype: str) -> tuple[torch.nn.Module, dict]:
    """The demo LLaVA (hidden 512, 8 layers; or LLaVA-1.5-7B's shapes) and its prompt, on ``device`` in ``dtype``,
    gradients off."""
    torch.set_grad_enabled(False)
    if real_size:
        model = demo_llava(vision_layers=24, llm_hidden=4096, llm_layers=32, vision_hidden=1024, llm_heads=32)
    else:
        model = demo_llava()
    model = model.to(device=device, dtype=getattr(torch, dtype))
    inputs = {k: v.to(device) for k, v in demo_inputs().items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(getattr(torch, dtype))
    return model, inputs


def describe(model: torch.nn.Module, inputs: dict, device: str, dtype: str) -> str:
    """One line saying what is measured: tower and LLM sizes, tokens, device, dtype and attention kernel."""
    vision, text = model.config.vision_config, model.config.text_config
    return (f"model: vision {vision.num_hidden_layers}x{vision.hidden_size}, LLM {text.num_hidden_layers}x{text.hidden_size}, "
            f"576 image + {inputs['input_ids'].shape[1] - 576} text tokens, {device} {dtype}, "
            f"attention {model.config._attn_implementation}")


def timed(fn, device: str) -> float:
    """Seconds ``fn()`` takes, the GPU synchronised before and after."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start
