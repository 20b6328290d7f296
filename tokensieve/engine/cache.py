"""What a pruned KV cache holds, so that later forwards on it (decode steps, a second turn) line up with it.

A cache filled by a pruned prefill holds fewer tokens than the sequence it stands for; generate() and the
caller still count the unpruned sequence (its mask, the slice of the prompt a second turn sends). The engine
keeps, per cache, the logical length it stands for and the 2D mask over what it physically holds. In-LLM
stages keep their own per-stage states (``layer_stages.LayerState``), as their layers hold fewer tokens still.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from .compat import cache_length

#: cache -> CacheState, for every cache a run has pruned
_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class CacheState:
    logical_length: int  # tokens of the unpruned sequence the cache stands for
    mask: torch.Tensor  # (batch, cached) 2D mask over what the cache physically holds
    pruned: torch.Tensor  # (batch,) real tokens removed so far, per row


def pruned_state(cache) -> CacheState | None:
    """What a pruned cache holds now (None: not pruned by tokensieve). Assisted and prompt-lookup decoding crop
    the cache after rejected candidates (``cache.crop(-n)`` takes the last n tokens off every layer, which are
    never pruned ones): the state follows by dropping as many of its last tokens."""
    state = _STATES.get(cache) if cache is not None else None
    if state is None:
        return None
    held = cache_length(cache)
    if held == 0:  # emptied (a StaticCache's reset() before it is passed in again): it stands for nothing now
        del _STATES[cache]
        return None
    cropped = state.mask.shape[1] - held
    if cropped > 0:
        state = CacheState(state.logical_length - cropped, state.mask[:, :-cropped], state.pruned)
        _STATES[cache] = state
    return state


def unpruned_state(cache, mask: torch.Tensor | None, batch: int, device) -> CacheState | None:
    """The state of a cache nothing was pruned from (a first turn run stock): every token it holds, under the
    first columns of the caller's 2D ``mask`` (None: all real)."""
    past = cache_length(cache)
    if past == 0:
        return None
    past_mask = mask[:, :past] if mask is not None else torch.ones(batch, past, dtype=torch.long, device=device)
    return CacheState(past, past_mask, torch.zeros(batch, dtype=torch.long))


def remember(cache, state: CacheState) -> None:
    _STATES[cache] = state


def cache_bytes(cache) -> int:
    """Bytes of every layer's key and value tensors in ``cache`` (each layer at the length it holds), and of the
    fixed-size states of linear-attention layers (Qwen3.5's), which hold no keys or values."""
    layers = getattr(cache, "layers", None) or ()
    return sum(t.numel() * t.element_size() for layer in layers for t in _cached_tensors(layer))


def _cached_tensors(layer):
    for name in ("keys", "values"):
        tensor = getattr(layer, name, None)
        if isinstance(tensor, torch.Tensor):
            yield tensor
    for name in ("conv_states", "recurrent_states"):
        states = getattr(layer, name, None)
        for tensor in (states.values() if isinstance(states, dict) else states or ()):
            if isinstance(tensor, torch.Tensor):
                yield tensor
