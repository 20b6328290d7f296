"""Vision attention rows recomputed from hooked q/k projections, so the tower keeps its attention kernel.

Towers whose attention modules have separate ``q_proj``/``k_proj`` linears (CLIP, SigLIP, DINOv2, the
Idefics3 tower; InternViT's, after its optional q/k norms) get forward hooks on both, plus a pre-hook on
the attention module that records the mask it is given (None for unpadded images under SDPA).
``block_attention`` then gives one image's [CLS] row or its attention received (the mean over every query
row), as eager attention would compute them.
"""

from __future__ import annotations

import torch
from torch import nn

from ..signals import attention_received, attention_row
from .base import VisionCapture


def projections(attention: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The modules whose outputs are an attention module's queries and keys, as its kernel gets them."""
    return attention.q_proj, attention.k_proj


def tap_blocks(attentions: dict[int, nn.Module], full_queries: set[int], capture: VisionCapture,
               query_key=projections) -> list:
    """Hooks recording, for each block index -> attention module, its keys, its queries (every row for the
    blocks in ``full_queries``, else the first row only) and its attention mask, into ``capture.tensors``.
    ``query_key(attention)`` names the two modules whose outputs are the queries and keys (default: the
    ``q_proj``/``k_proj`` linears; a tower that normalises them after the projection names its norms)."""
    handles = []
    for block, attention in attentions.items():
        query_module, key_module = query_key(attention)

        def keep_queries(module, args, output, block=block):
            capture.tensors[f"q{block}"] = (output if block in full_queries else output[:, :1]).detach()

        def keep_keys(module, args, output, block=block):
            capture.tensors[f"k{block}"] = output.detach()

        def keep_mask(module, args, kwargs, block=block):
            mask = kwargs.get("attention_mask")
            capture.tensors[f"mask{block}"] = mask.detach() if isinstance(mask, torch.Tensor) else None

        handles.append(query_module.register_forward_hook(keep_queries))
        handles.append(key_module.register_forward_hook(keep_keys))
        handles.append(attention.register_forward_pre_hook(keep_mask, with_kwargs=True))
    return handles


def block_keys(capture: VisionCapture, block: int, image: int, heads: int) -> torch.Tensor:
    """(heads, S, d_head) keys of one tower image at a tapped block, in float32."""
    keys = capture.tensors[f"k{block}"][image].float()
    return keys.view(keys.shape[0], heads, -1).transpose(0, 1)


def block_attention(capture: VisionCapture, block: int, image: int, heads: int, queries: str) -> torch.Tensor:
    """(heads, S) attention of one tower image at a tapped block over its whole sequence: the first token's
    row (``queries="cls"``) or the mean over every query row (``"mean"``)."""
    keys = block_keys(capture, block, image, heads)
    query = capture.tensors[f"q{block}"][image].float()
    query = query.view(query.shape[0], heads, -1).transpose(0, 1)
    mask = capture.tensors.get(f"mask{block}")
    mask = mask[image] if mask is not None else None  # (1 or heads, S, S)
    scale = keys.shape[-1] ** -0.5
    if queries == "cls":
        return attention_row(query[:, :1], keys, scale, mask)
    return attention_received(query, keys, scale, mask)
