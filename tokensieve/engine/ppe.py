"""Positional Preservation Embedding (PPE): a merged token stands at the positions of several tokens it merged.

Paper: "Positional Preservation Embedding for Multimodal Large Language Models" (Huang et al., ICLR 2026,
arXiv 2510.22936); code MouxiaoHuang/PPE at 7b6aa7d (``select_pos_topk`` and ``merge_tokens`` in
src/models/chatunivi.py, the mrope rewrite in src/training/monkey_patch_forward.py). Rotary embedding turns each
frequency pair of a query or key by its own angle, so one token can carry several positions at once: the
frequencies of each position section (all of them for 1D rotary models; the temporal, height and width
sections of mrope, ``mrope_section``) are split into ``k`` contiguous chunks, and chunk ``j`` is turned by the
position of the group's ``j``-th member. The code's default is ``ppe_k=8`` (scripts/configs/ppe.json).

``ts.apply(model, method, ppe=8)`` applies it to every group a method merged before the LLM (a merge map, or
``tome_vit``'s groups inside the tower), at the prefill: the engine hooks the decoder's rotary embedding and
splices the cos/sin of each merged token's members into its own. Unmerged tokens and text keep their own
position in every chunk, so a method that merges nothing runs exactly as without PPE. Differences from the
code: the members are taken evenly spaced in raster order (``floor((j + 1/2)·m/k)`` of the group's ``m``,
repeating when ``m < k``), where the code takes the ``k`` largest token weights (all equal in its image path,
so its pick among them follows a non-stable sort); chunks are as even as the section's size allows (larger
chunks first); in-LLM stages with ``positions="repack"`` recompute the rotation without the members.
"""

from __future__ import annotations

import torch
from torch import nn


def frequency_chunks(sections: list[int], k: int) -> torch.Tensor:
    """(sum(sections),) for every rotary frequency, the member (0..k-1) whose position turns it: each section split
    into ``min(k, size)`` contiguous chunks, as even as its size allows."""
    chunks = []
    for size in sections:
        parts = min(k, size)
        shares = [size // parts + (j < size % parts) for j in range(parts)]
        chunks += [torch.full((share,), j, dtype=torch.long) for j, share in enumerate(shares)]
    return torch.cat(chunks)


def group_members(groups: torch.Tensor, kept: torch.Tensor, k: int) -> torch.Tensor:
    """(len(kept), k) raster indices of the ``k`` members each kept token stands for: of the tokens whose
    ``groups`` entry (``ImageRecord.groups()``) is that kept token, in raster order, the ``floor((j + 1/2)·m/k)``-th."""
    tokens = torch.arange(len(groups))[groups >= 0]
    owners = groups[groups >= 0]
    order = torch.argsort(owners, stable=True)
    tokens, owners = tokens[order], owners[order]
    heads, counts = torch.unique_consecutive(owners, return_counts=True)
    if not torch.equal(heads, kept):
        raise RuntimeError("PPE: every kept token must stand for its own group")
    starts = counts.cumsum(0) - counts
    steps = 2 * torch.arange(k) + 1
    return tokens[starts[:, None] + steps[None, :] * counts[:, None] // (2 * k)]


class PositionPreservation:
    """Splices, at the next call of the decoder's rotary embedding, each token's cos/sin from its members' positions."""

    def __init__(self, decoder: nn.Module, k: int):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"ppe={k!r}: the positions a merged token carries, an int >= 1 (the PPE code uses 8)")
        rotary = getattr(decoder, "rotary_emb", None)
        if rotary is None or not hasattr(rotary, "inv_freq"):
            raise TypeError(f"{type(decoder).__name__} has no rotary_emb with inv_freq: PPE needs rotary positions")
        half = rotary.inv_freq.shape[-1]
        sections = list(getattr(rotary, "mrope_section", None) or [half])
        if sum(sections) != half:
            raise ValueError(f"PPE: the rotary sections {sections} do not cover the {half} frequencies")
        chunks = frequency_chunks(sections, k)
        self.k, self.dims = k, torch.cat([chunks, chunks])  # cos/sin repeat the frequencies: (freqs, freqs)
        self._members: torch.Tensor | None = None
        self.handle = rotary.register_forward_hook(self._spliced, with_kwargs=True)

    def prepare(self, member_positions: torch.Tensor) -> None:
        """The next rotary call's positions, once per member: (k, *position_ids.shape)."""
        self._members = member_positions

    def clear(self) -> None:
        self._members = None

    def remove(self) -> None:
        self.handle.remove()
        self.clear()

    def _spliced(self, module, args, kwargs, output):
        members, self._members = self._members, None
        if members is None:
            return None
        x = args[0] if args else kwargs["x"]
        turned = [module(x, members[j]) for j in range(self.k)]  # this hook is idle for these calls
        dims = self.dims.to(output[0].device)
        return tuple(torch.stack([t[part] for t in turned]).gather(0, dims.expand_as(turned[0][part])[None]).squeeze(0)
                     for part in (0, 1))
