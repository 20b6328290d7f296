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
- Everything else comes from `run.stats` through the public API: each `generate()` runs inside
  `ts.apply(model, method, vision_flops=True)`, or `ts.observe(model, vision_flops=True)` for the
  baseline, which leaves the stock forward untouched and records it the same way: per image the
  grid, tokens before/after and kept indices; the LLM prefill FLOPs with and without the method;
  `kv_bytes`, the bytes of the key and value tensors the prefill leaves in the cache (read from the
  real tensors: only kept tokens are in a pruned cache); `vision_flops`, the vision tower's and the
  projector's, replayed on their inputs under `FlopCounterMode` once the run's hooks are off; the
  selection's own time. See docs/usage.md.
"""

from __future__ import annotations

import ctypes
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.generation.streamers import BaseStreamer

import tokensieve as ts


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
    stats: ts.RunStats  # what the run recorded: images, tokens, FLOPs, KV bytes (the baseline's: observed)


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
    """Runs and measures `generate()` on one model, under a method or (none) observed."""

    def __init__(self, model):
        self.model = model

    def refusal(self, sieve, video_frames: int | None = None) -> str | None:
        """Why this model cannot run `sieve` (e.g. a signal its vision tower cannot give), or None."""
        try:
            _run(self.model, sieve, video_frames).remove()
        except ValueError as err:
            return str(err)
        return None

    @torch.inference_mode()
    def generate(self, inputs: dict, max_new_tokens: int, sieve=None, video_frames: int | None = None) -> Measurement:
        """`video_frames`: the prompt's images are a video's frames, every `video_frames` in a row one video."""
        device = self.model.device
        clock = TokenClock(device)
        with _run(self.model, sieve, video_frames) as run:
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
            peak_memory_added_bytes=peak_added, stats=run.stats)


def _run(model, sieve, video_frames: int | None) -> ts.Run:
    """The run that records a generate: `sieve` applied, or (none) the stock model observed. A video given as
    frames (a family without videos) is read as one video of `video_frames` frames."""
    video = {} if video_frames is None else {"video_frames": video_frames}
    if sieve is None:
        return ts.observe(model, vision_flops=True, **video)
    return ts.apply(model, sieve, vision_flops=True, **video)


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
