"""Remap the decoder's attention mask onto what a stage's layers see and cache.

The decoder builds one mask, over layer 0's keys, in its attention kernel's format (a 4D float or boolean
mask for SDPA and eager, a 2D padding mask for FlashAttention, or None for plain causal). From an in-LLM
stage's layer on, the layers see fewer queries and cache fewer keys: their mask is the decoder's, with rows
at the kept queries and columns at the decoder-input positions their cached slots stand for.
"""

from __future__ import annotations

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function


def full_causal_mask(config, batch: int, queries: int, keys: int, device, dtype) -> torch.Tensor:
    """The mask the decoder left out (None: plain causal), in its attention kernel's own format."""
    implementation = config._attn_implementation
    if implementation.startswith("flash"):  # flash kernels take a 2D padding mask
        return torch.ones(batch, keys, dtype=torch.long, device=device)
    if implementation not in ("sdpa", "eager"):
        raise ValueError(f"in-LLM pruning of rows of unequal length needs sdpa, eager or flash attention, not {implementation!r}")
    return ALL_MASK_ATTENTION_FUNCTIONS[implementation](
        batch_size=batch, q_length=queries, kv_length=keys, q_offset=keys - queries, mask_function=causal_mask_function,
        allow_is_causal_skip=False, dtype=dtype, device=device,
    )


def mapped_mask(mask: torch.Tensor, index: torch.Tensor | None, columns: torch.Tensor, keys: int) -> torch.Tensor:
    """The decoder's mask (over layer 0's ``keys``) with rows at the kept queries (``index``) and columns at
    the slots the stage's layers cache (``columns``, -1 for a padding slot, which nothing attends to)."""
    if mask.shape[-1] != keys:
        raise RuntimeError(
            f"the decoder's attention mask covers {mask.shape[-1]} keys but layer 0 holds {keys}: this transformers "
            f"version builds masks differently"
        )
    batch, slots = columns.shape
    valid = columns >= 0
    if mask.ndim == 2:  # flash attention's padding mask
        return mask.expand(batch, -1).gather(1, columns.clamp(min=0)) * valid
    mask = mask.expand(batch, -1, -1, -1)
    if index is not None:
        mask = mask.gather(2, index[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3]))
    mask = mask.gather(3, columns.clamp(min=0)[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1))
    allowed, blocked = (True, False) if mask.dtype == torch.bool else (0.0, torch.finfo(mask.dtype).min)
    mask = mask.masked_fill(~valid[:, None, None, :], blocked)
    queries = mask.shape[2]
    padding_rows = ~valid[:, slots - queries :]
    if padding_rows.any():  # a padding slot attends to itself only, so no softmax row is empty
        own = torch.zeros(queries, slots, dtype=torch.bool, device=mask.device)
        own[torch.arange(queries), slots - queries + torch.arange(queries)] = True
        self_only = torch.full_like(own, blocked, dtype=mask.dtype).masked_fill(own, allowed)
        mask = torch.where(padding_rows[:, None, :, None], self_only, mask)
    return mask
