"""One adapter per model family; ``adapter_for(model)`` picks the one that serves a model."""

from __future__ import annotations

from torch import nn

from .base import Adapter, ImageSlot, PlaceholderMismatch, VisionCapture
from .gemma3 import Gemma3Adapter
from .gemma4 import Gemma4Adapter
from .idefics3 import Idefics3Adapter
from .internvl import InternVLAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_vl import Qwen2VLAdapter
from .qwen3_vl import Qwen3_5Adapter, Qwen3VLAdapter

ADAPTERS: list[type[Adapter]] = [LlavaAdapter, LlavaNextAdapter, LlavaOnevisionAdapter, Idefics3Adapter, InternVLAdapter,
                               Qwen2VLAdapter, Qwen3VLAdapter, Qwen3_5Adapter, Gemma3Adapter,
                               Gemma4Adapter]


def adapter_for(model: nn.Module) -> Adapter:
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter(model)
    supported = ", ".join(name for adapter in ADAPTERS for name in adapter.model_classes)
    raise TypeError(f"tokensieve does not support {type(model).__name__}: pass one of {supported}")


__all__ = ["ADAPTERS", "Adapter", "ImageSlot", "PlaceholderMismatch", "VisionCapture", "adapter_for"]
