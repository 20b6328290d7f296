"""Measure one greedy `generate()` of one sample: what it answered, and what it cost.

- Time to first token (`prefill_seconds`): from calling `generate()` to the moment the first new
  token reaches the streamer, so it covers the vision tower, the selection and the LLM prefill.
  `BaseStreamer.put` receives the prompt first and then each new token; on CUDA the clock
  synchronises the device before reading the time.
- Decode time per token: the median gap between consecutive later tokens (None with one token).
- Peak memory added: the most memory the call holds above what was held when it started
  (activations, the KV cache, scratch buffers; not the weights). CUDA: `max_memory_allocated`
  over the call minus `memory_allocated` at its start. CPU (Linux, glibc): the peak resident set
  size (`VmHWM`, reset to the current size through `/proc/self/clear_refs`) minus the resident
  size at the start, after `malloc_trim(0)` has returned the heap's free pages to the system:
  without it the call reuses pages earlier samples freed and almost every call adds 0. The trim
  takes 1-4 ms before the clock starts; faulting fresh pages in moved sieve-mini's median time to
  first token by 1.6 ms in 900 (2-core CPU). None where either is unavailable.
- KV-cache bytes: the bytes of the key and value tensors the decoder's first call (the prefill)
  leaves in the cache, read from the real tensors: only kept tokens are in a pruned cache.
- Vision FLOPs: the vision tower's and the projector's first call are replayed afterwards on the
  same inputs under `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions, attention),
  once per distinct input shape. LLM prefill FLOPs come from `run.stats` (tokensieve/flops.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import inspect
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from transformers.generation.streamers import BaseStreamer

from .. import engine
from ..adapters import VisionCapture, adapter_for
from ..adapters.base import ImageSlot
from ..compat import output_cache
from ..sieve import Sieve
from ..stats import RunStats



def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's counter knows the CUDA attention kernels but not the CPU one that SDPA dispatches to
_CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops}
_PROJECTOR_NAMES = ("multi_modal_projector", "connector")  # LLaVA family, Idefics3; Qwen2-VL's is in its tower


class HostReads(TorchDispatchMode):
    """Counts the ops that read a tensor's value back to the host while active: ``.item()``, ``int()``
    or ``bool()`` on a tensor, and ``nonzero`` (its output size). On a GPU each one waits for the
    queue to drain. ``.tolist()`` and ``.cpu()`` do not pass through the dispatcher and are not counted."""

    OPS = ("_local_scalar_dense", "nonzero")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.__name__.split(".")[0] in self.OPS
        return func(*args, **(kwargs or {}))


@dataclass
class Measurement:
    new_tokens: torch.Tensor  # the generated token ids
    prefill_seconds: float
    decode_seconds_per_token: float | None
    peak_memory_added_bytes: int | None  # the most the call held above what was held before it
    kv_cache_bytes: int
    vision_flops: int
    images: list[ImageSlot]  # where each image's tokens sat in the unpruned prompt, with its grid
    stats: RunStats | None  # what the sieve did; None without one


class TokenClock(BaseStreamer):
    """Records the time each new token reaches the streamer (the first `put` is the prompt)."""

    def __init__(self, device: torch.device):
        self.device, self.prompt_seen, self.times = device, False, []

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        _synchronize(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class Meter:
    """Runs and measures `generate()` on one model, optionally under a sieve."""

    def __init__(self, model):
        self.model, self.adapter = model, adapter_for(model)
        inner = self.adapter.inner
        projector = next((getattr(inner, name) for name in _PROJECTOR_NAMES if hasattr(inner, name)), None)
        self._vision_modules = [m for m in (self.adapter.vision_tower, projector) if m is not None]
        self._flops_by_inputs: dict[tuple, int] = {}

    def refusal(self, sieve: Sieve) -> str | None:
        """Why this model cannot run `sieve` (e.g. a signal its vision tower cannot give), or None."""
        try:
            engine.attach(self.model, sieve).remove()
        except ValueError as err:
            return str(err)
        return None

    @torch.inference_mode()
    def generate(self, inputs: dict, max_new_tokens: int, sieve: Sieve | None = None) -> Measurement:
        device = self.model.device
        clock = TokenClock(device)
        probe = _Probe(self.adapter, self._vision_modules)
        run = engine.apply(self.model, sieve) if sieve is not None else contextlib.nullcontext()
        with probe, run:
            held_before = _memory_held(device)
            _synchronize(device)
            start = time.perf_counter()
            output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=clock)
            peak_added = _peak_memory(device) - held_before if held_before is not None else None
        gaps = [b - a for a, b in zip(clock.times, clock.times[1:])]
        return Measurement(
            new_tokens=output[0, inputs["input_ids"].shape[1]:],
            prefill_seconds=clock.times[0] - start,
            decode_seconds_per_token=statistics.median(gaps) if gaps else None,
            peak_memory_added_bytes=peak_added, kv_cache_bytes=probe.kv_cache_bytes,
            vision_flops=sum(self._flops(module, *probe.first_inputs[module]) for module in probe.first_inputs),
            images=probe.image_slots(), stats=run.stats if sieve is not None else None)

    def _flops(self, module, args: tuple, kwargs: dict) -> int:
        """FLOPs of `module` on these inputs, counted on a replay (cached by the inputs' shapes)."""
        key = (id(module), _shape_key(args), _shape_key(kwargs))
        if key not in self._flops_by_inputs:
            with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as counter:
                module(*args, **kwargs)
            self._flops_by_inputs[key] = counter.get_total_flops()
        return self._flops_by_inputs[key]


class _Probe:
    """Hooks that watch one `generate()`: the first inputs of the vision modules and of the inner
    model (where the images sit), and the KV cache the decoder's first call (the prefill) leaves."""

    def __init__(self, adapter, vision_modules: list):
        self.adapter = adapter
        self.first_inputs: dict = {}  # module -> (args, kwargs) of its first call
        self.inner_inputs: dict | None = None
        self.kv_cache_bytes = 0
        self._handles = [m.register_forward_pre_hook(self._keep_inputs, with_kwargs=True) for m in vision_modules]
        self._handles += [adapter.inner.register_forward_pre_hook(self._keep_inner_inputs, with_kwargs=True),
                          adapter.decoder.register_forward_hook(self._measure_cache, with_kwargs=True)]

    def __enter__(self) -> _Probe:
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def _keep_inputs(self, module, args, kwargs) -> None:
        self.first_inputs.setdefault(module, (args, kwargs))

    def _keep_inner_inputs(self, module, args, kwargs) -> None:
        if self.inner_inputs is None:
            self.inner_inputs = {**inspect.signature(module.forward).bind_partial(*args).arguments, **kwargs}

    def _measure_cache(self, module, args, kwargs, output) -> None:
        cache = output_cache(output)
        if self.kv_cache_bytes == 0 and cache is not None:
            self.kv_cache_bytes = sum(t.numel() * t.element_size() for layer in cache.layers
                                      for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor))

    def image_slots(self) -> list[ImageSlot]:
        """Each image's place in the prompt and its grid, as the adapter reads them for the engine."""
        capture = VisionCapture()
        args, kwargs = self.first_inputs[self.adapter.vision_tower]
        self.adapter.open_capture(capture, args, kwargs)
        return self.adapter.slots(self.inner_inputs, capture)


def _shape_key(value):
    """The parts of a module's inputs that decide its FLOPs: tensor shapes, small integer tensors'
    values (e.g. Qwen2-VL's grid_thw), and plain arguments."""
    if isinstance(value, torch.Tensor):
        small_ints = not value.is_floating_point() and value.numel() <= 64
        return (tuple(value.shape), str(value.dtype), tuple(value.flatten().tolist()) if small_ints else None)
    if isinstance(value, (tuple, list)):
        return tuple(_shape_key(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _shape_key(v)) for k, v in value.items()))
    return repr(value)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory_held(device: torch.device) -> int | None:
    """Bytes held now, with the peak counter reset to them; None where they cannot be measured."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc's; other C libraries lack it
    if malloc_trim is None:
        return None
    malloc_trim(0)  # return freed heap pages, so that reusing them shows in the resident size again
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
    except OSError:
        return None
    return _proc_status_bytes("VmRSS")


def _peak_memory(device: torch.device) -> int:
    """The peak since `_memory_held` reset it."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status_bytes("VmHWM")


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise ValueError(f"no {field} in /proc/self/status")
