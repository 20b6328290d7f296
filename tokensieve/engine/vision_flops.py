"""FLOPs of a VLM's vision side: the vision tower and the projector (LLaVA's ``multi_modal_projector``,
Idefics3's ``connector``; Qwen2-VL's merger is inside its tower), counted apart from the LLM.

``ts.apply(model, method, vision_flops=True)`` keeps a reference to the inputs of every call of those modules
during the run and, when the run is removed, replays each call whose input shapes were not counted before on
those inputs under ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention; a
formula is added for the CPU attention kernel, which torch's counter does not know). Counts are cached per
module and input shape, so a sweep replays a tower once per image shape. The replay runs after the run's
hooks are off, so what the hooks compute for a method's signals is not counted.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

#: the projector's attribute on the inner model, by family (LLaVA family, Idefics3)
PROJECTOR_NAMES = ("multi_modal_projector", "connector")
#: module -> {input shape key: FLOPs}, kept for as long as the module lives
_COUNTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's counter knows the CUDA attention kernels but not the CPU one that SDPA dispatches to
_CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops}


def vision_modules(adapter) -> list[nn.Module]:
    """The modules whose FLOPs make up the vision side: the tower, then the projector where it is apart."""
    inner = adapter.inner
    projector = next((getattr(inner, name) for name in PROJECTOR_NAMES if hasattr(inner, name)), None)
    return [module for module in (adapter.vision_tower, projector) if module is not None]


def shape_key(value):
    """The parts of a module's inputs that decide its FLOPs: tensor shapes, small integer tensors'
    values (e.g. Qwen2-VL's grid_thw), and plain arguments."""
    if isinstance(value, torch.Tensor):
        small_ints = not value.is_floating_point() and value.numel() <= 64
        return (tuple(value.shape), str(value.dtype), tuple(value.flatten().tolist()) if small_ints else None)
    if isinstance(value, (tuple, list)):
        return tuple(shape_key(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, shape_key(v)) for k, v in value.items()))
    return repr(value)


class VisionPasses:
    """Pre-hooks on the vision modules that keep the inputs of every call (references, until :meth:`count`
    or :meth:`forget`: meant for runs of a few ``generate()`` calls, as the bench makes); :meth:`count`
    returns the FLOPs of every call, replaying each input shape not counted before once."""

    def __init__(self, modules: list[nn.Module], variant: str | None = None):
        # what else decides the count besides the inputs' shapes: the run's in-vision stage, whose hooks act
        # during the replay (None: the stock tower). Counts are cached under it, apart from other runs'.
        self.variant = variant
        self._calls: list[tuple[nn.Module, tuple, dict]] = []
        self._handles = [m.register_forward_pre_hook(self._keep, with_kwargs=True) for m in modules]

    def _keep(self, module, args, kwargs) -> None:
        self._calls.append((module, args, dict(kwargs)))  # shapes are read later: reading grid_thw would sync a GPU

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def forget(self) -> None:
        """Drop the kept inputs (a run that ended with an error counts nothing)."""
        self._calls = []

    def count(self) -> int:
        """FLOPs of every call kept; the module's hooks (a run's) should be off, or what they compute counts."""
        total = 0
        with torch.no_grad():
            for module, args, kwargs in self._calls:
                counted = _COUNTED.setdefault(module, {})
                key = (self.variant, shape_key(args), shape_key(kwargs))
                if key not in counted:
                    with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as counter:
                        module(*args, **kwargs)
                    counted[key] = counter.get_total_flops()
                total += counted[key]
        self._calls = []
        return total
