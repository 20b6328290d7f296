"""Minimal LoRA for training: a frozen linear layer plus a trainable low-rank update B @ A.

After training the update is folded into the weights (assemble.merge_lora), so sieve-mini stays a
stock LLaVA model with no adapter code at inference.
"""

from __future__ import annotations

import torch
from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features) / base.in_features**0.5)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))  # starts as the identity update

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * (x @ self.lora_A.T.to(x.dtype)) @ self.lora_B.T.to(x.dtype)


def add_lora(model: nn.Module, targets: tuple[str, ...], rank: int, alpha: float) -> dict[str, LoRALinear]:
    """Wrap every linear layer whose name ends with one of `targets`; returns them by module name."""
    wrapped = {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                layer = LoRALinear(child, rank, alpha)
                setattr(module, child_name, layer)
                wrapped[f"{name}.{child_name}" if name else child_name] = layer
    return wrapped


def lora_state(wrapped: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    state = {}
    for name, layer in wrapped.items():
        state[f"{name}.lora_A"] = layer.lora_A.detach().float().contiguous()
        state[f"{name}.lora_B"] = layer.lora_B.detach().float().contiguous()
    return state


def quantised(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """int8 copies with one fp16 scale per row (`<name>.scale`): a quarter of fp32's size for the committed file."""
    out = {}
    for name, tensor in state.items():
        scale = tensor.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        out[name] = (tensor / scale).round().to(torch.int8)
        out[f"{name}.scale"] = scale.half()
    return out


def dequantised(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `quantised` (float32); tensors without a `.scale` pass through as float32."""
    return {name: tensor.float() * state[f"{name}.scale"].float() if f"{name}.scale" in state else tensor.float()
            for name, tensor in state.items() if not name.endswith(".scale")}
