"""Apply a stage's selections and pack the sequence: the one packing step every stage shares.

Before the LLM (on the decoder's input) and at each in-LLM stage (on a decoder layer's input) the same thing
happens to a batch of sequences: each image's tokens are marked kept or dropped and merged tokens get their
group's features (:class:`Selections`), then each row's kept tokens are packed to the right of a shorter
width (:class:`Packing`): rows of a batch may keep different counts, so the shorter ones are left-padded
and masked, as a tokenizer pads for generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


class Selections:
    """Which tokens of a (batch, length) sequence stay, filled image by image, and the features merged tokens take."""

    def __init__(self, keep: torch.Tensor):
        self.keep = keep  # (batch, length) bool
        self._merged: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self._maps: list[tuple[int, torch.Tensor, torch.Tensor, Callable]] = []

    def mark(self, row: int, positions: torch.Tensor, kept: torch.Tensor, features: torch.Tensor | None = None,
             group_means: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """One image of ``row`` at ``positions`` keeps ``kept`` (indices into positions), with ``features`` (one row
        per kept token) in place of its own if given. ``group_means`` (the selection's merge map, from (N, d) values
        of the image's tokens to (len(kept), d)) is what :meth:`carried` applies to other per-token tensors."""
        self.keep[row, positions] = False
        self.keep[row, positions[kept]] = True
        if features is not None:
            self._merged.append((row, positions[kept], features))
        if group_means is not None:
            self._maps.append((row, positions, positions[kept], group_means))

    @property
    def changes_nothing(self) -> bool:
        return bool(self.keep.all()) and not self._merged

    def written(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` (batch, length, d) with the merged tokens' features in place (a copy, if any are)."""
        if not self._merged:
            return values
        values = values.clone()
        for row, where, features in self._merged:
            values[row, where] = features.to(values.dtype)
        return values

    def carried(self, values: torch.Tensor) -> torch.Tensor:
        """Another per-token tensor (batch, length, ...) than the features, with each merge map's group means in place
        (a copy, if any are). The kept tokens of a selection without a merge map keep their own rows: a method that
        wrote its own features says nothing about other tensors."""
        if not self._maps:
            return values
        values = values.clone()
        for row, positions, where, group_means in self._maps:
            own = values[row, positions]
            values[row, where] = group_means(own.reshape(len(own), -1)).view(-1, *own.shape[1:]).to(values.dtype)
        return values

    def packed(self, own_mask: torch.Tensor) -> Packing:
        return Packing.of(self.keep, own_mask)


@dataclass
class Packing:
    """Each row's kept tokens packed to the right of ``width`` slots (the longest row's count)."""

    keep: torch.Tensor  # (batch, length) which tokens stay
    index: torch.Tensor  # (batch, width) the position each slot takes its token from (0 at padding)
    mask: torch.Tensor  # (batch, width) the 2D attention mask of the slots (0 at padding, and where own_mask was 0)

    @classmethod
    def of(cls, keep: torch.Tensor, own_mask: torch.Tensor) -> Packing:
        return cls(keep, *left_packed(keep, own_mask))

    @property
    def width(self) -> int:
        return self.index.shape[1]

    def filled(self) -> torch.Tensor:
        """(batch, width) True at the slots that hold a token, False at the padding packing added."""
        return torch.arange(self.width, device=self.index.device) >= (self.width - self.keep.sum(1))[:, None]

    def slots(self) -> torch.Tensor:
        """(batch, length) the slot each kept token went to, -1 for a dropped one."""
        return torch.where(self.keep, (self.width - self.keep.sum(1, keepdim=True)) + self.keep.cumsum(1) - 1, -1)

    def gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """``tensor`` packed along its sequence axis ``dim`` (see :func:`gather_sequence`)."""
        return gather_sequence(tensor, self.index, dim)


def left_packed(keep: torch.Tensor, own_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the indices of kept tokens, left-padded to the longest row, and their 2D mask."""
    counts = keep.sum(1)
    width = int(counts.max())
    rows, columns = keep.nonzero(as_tuple=True)  # row-major: each row's kept tokens in order
    # a kept token's slot: past its row's left padding, then its rank among the row's kept tokens
    rank = torch.arange(len(rows), device=keep.device) - (counts.cumsum(0) - counts)[rows]
    slot = width - counts[rows] + rank
    index = torch.zeros(keep.shape[0], width, dtype=torch.long, device=keep.device)
    mask = torch.zeros(keep.shape[0], width, dtype=own_mask.dtype, device=keep.device)
    index[rows, slot] = columns
    mask[rows, slot] = own_mask[rows, columns]
    return index, mask


def gather_sequence(tensor: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``tensor`` at the (batch, width) ``index`` along sequence axis ``dim``, whose batch axis (size 1 or
    batch) comes just before it: embeddings (batch, length, d) at dim 1, position ids (1 or batch, length) and
    mrope's (rows, batch, length) at -1, rotary cos/sin at -2."""
    dim %= tensor.ndim
    shape = list(tensor.shape)
    shape[dim - 1] = index.shape[0]
    tensor = tensor.expand(shape)
    view = [1] * tensor.ndim
    view[dim - 1], view[dim] = index.shape
    shape[dim] = index.shape[1]
    return tensor.gather(dim, index.view(view).expand(shape))
