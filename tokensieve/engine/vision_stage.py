"""The ``in_vision`` stage: tokens merged between vision-tower layers, so the later layers run on fewer.

A sieve at stage ``in_vision`` (ToMe inside the ViT) says, per layer, how many tokens to merge
(``merges(layer, tokens)``); this module does the rest with hooks on the tower, whose attention kernel
stays as loaded:

- a forward hook on each merging layer's ``k_proj`` keeps its keys (head mean), ToMe's similarity;
- a pre-hook on every layer from the first merging one merges at its input (the block boundary):
  bipartite soft matching by the previous layer's keys, size-weighted means (``selection.bipartite_round``),
  a [CLS] token never merged; and passes the log of each token's size as an additive attention bias
  (ToMe's proportional attention) through the layer's ``attention_mask``;
- a post-hook on the tower gives every hidden state it returns back its full length, each patch carrying
  its group's features, so the projector and the model's own placeholder check run as they do unmerged.

Each image's record says which patch stands for each group (``kept``: the B token that absorbed the
others, in raster order), the group sizes and every patch's group; the engine then keeps only those
tokens at the decoder input, as it keeps a pre-LLM selection.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..selection import bipartite_round, merge_into


@dataclass
class MergedImage:
    """What the tower left of one image: the patches (raster indices, [CLS] excluded) that stand for the
    groups, the originals each group holds, and for every patch the group (an index into ``kept``) it joined."""

    kept: torch.Tensor
    sizes: torch.Tensor
    assignment: torch.Tensor
    seconds: float


class VisionMerging:
    """Hooks of one ``in_vision`` sieve on a vision tower's ``layers``; ``feature_layer`` is the index of the
    layer whose output the model reads (merging stops at its input), ``has_cls`` whether token 0 is [CLS]."""

    def __init__(self, sieve, tower: nn.Module, layers: nn.ModuleList, feature_layer: int, has_cls: bool, heads: int):
        first = sieve.start_layer
        if not 1 <= first <= feature_layer:
            raise ValueError(
                f"{sieve.name} merges from vision layer start_layer={first}, but the model reads the output of layer "
                f"{feature_layer}: pass a start_layer from 1 to {feature_layer}"
            )
        self.sieve, self.has_cls, self._heads = sieve, has_cls, heads
        self.merging = range(first, feature_layer + 1)
        self.images: list[MergedImage] = []
        self.groups: dict[int, torch.Tensor] = {}  # vision layer -> (images, patches) token of each original after its merges
        self._reset()
        keys = [_attention(layers[index - 1]).k_proj for index in self.merging]  # may refuse: before any hook
        self.handles = [tower.register_forward_pre_hook(lambda *_: self._reset()),
                        tower.register_forward_hook(self._restore_lengths)]
        self.handles += [projection.register_forward_hook(self._keep_keys) for projection in keys]
        for index in range(first, len(layers)):
            self.handles.append(layers[index].register_forward_pre_hook(self._layer_input(index), with_kwargs=True))

    def _reset(self) -> None:
        self._owner = self._positions = self._sizes = self._keys = None
        self._by_length: dict[int, torch.Tensor] = {}
        self._patches, self._seconds = 0, 0.0
        self.images, self.groups = [], {}

    def _keep_keys(self, module, args, output) -> None:
        self._keys = output.detach()

    def _layer_input(self, index: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            start = time.perf_counter()
            if self._owner is None:
                self._begin(hidden)
            if index in self.merging:
                hidden = self._merge(hidden, index)
            mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
            if not bool((self._sizes == 1).all()):  # proportional attention: log(size) added to every key's logits
                bias = self._sizes.log()[:, None, None, :].to(hidden.dtype)
                mask = bias if mask is None else mask + bias
            self._seconds += time.perf_counter() - start
            if len(args) > 1:
                return (hidden, mask, *args[2:]), kwargs
            kwargs = {**kwargs, "attention_mask": mask}
            return ((hidden,), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

        return hook

    def _begin(self, hidden: torch.Tensor) -> None:
        batch, length = hidden.shape[:2]
        self._patches = length - self.has_cls
        self._owner = torch.arange(length, device=hidden.device).expand(batch, -1)
        self._positions = self._owner
        self._sizes = torch.ones(batch, length, device=hidden.device)
        self._by_length = {length: self._owner}

    def _merge(self, hidden: torch.Tensor, index: int) -> torch.Tensor:
        """This layer's merges: as many bipartite rounds (each at most half the tokens) as its count needs."""
        count = self.sieve.merges(index - self.merging.start, len(self.merging), self._patches, hidden.shape[1] - self.has_cls)
        keys = self._metric(hidden.shape[0])
        while count > 0:
            length = hidden.shape[1]
            r = min(count, (length - self.has_cls) // 2)
            if r <= 0:
                break
            target, survivors = bipartite_round(keys, r, protect_first=self.has_cls)
            hidden = merge_into(hidden, self._sizes, target, survivors)
            keys = merge_into(keys, self._sizes, target, survivors)
            batch = hidden.shape[0]
            self._sizes = torch.zeros_like(self._sizes).scatter_add(1, target, self._sizes)[survivors].view(batch, -1)
            renumber = survivors.long().cumsum(1) - 1
            self._owner = renumber.gather(1, target.gather(1, self._owner))
            self._positions = self._positions[survivors].view(batch, -1)
            self._by_length[hidden.shape[1]] = self._owner
            self.groups[index] = self._owner
            count -= r
        return hidden

    def _metric(self, batch: int) -> torch.Tensor:
        """ToMe's similarity: the previous layer's keys, averaged over heads."""
        keys = self._keys
        return keys.view(batch, keys.shape[1], self._heads, -1).mean(2)

    def _restore_lengths(self, module, args, output):
        """Every hidden state back at full length, each patch carrying its group's features; and the records."""
        if self._owner is None or len(self._by_length) == 1:
            self._record()
            return None
        for name in ("last_hidden_state", "hidden_states"):
            value = getattr(output, name, None)
            if isinstance(value, torch.Tensor):
                output[name] = self._full(value)
            elif isinstance(value, tuple):
                output[name] = tuple(self._full(h) for h in value)
        self._record()
        return output

    def _full(self, hidden: torch.Tensor) -> torch.Tensor:
        owner = self._by_length.get(hidden.shape[1]) if isinstance(hidden, torch.Tensor) and hidden.ndim == 3 else None
        if owner is None or hidden.shape[1] == owner.shape[1]:
            return hidden
        return hidden.gather(1, owner.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))

    def _record(self) -> None:
        if self._owner is None:
            return
        offset = int(self.has_cls)
        kept = (self._positions[:, offset:] - offset).cpu()
        sizes = self._sizes[:, offset:].cpu()
        assignment = (self._owner[:, offset:] - offset).cpu()
        seconds = self._seconds / len(kept)
        self.images = [MergedImage(k, s, a, seconds) for k, s, a in zip(kept, sizes, assignment)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self._reset()


def _attention(layer: nn.Module) -> nn.Module:
    for module in layer.modules():
        if isinstance(getattr(module, "k_proj", None), nn.Linear):
            return module
    raise TypeError(f"{type(layer).__name__} has no k_proj: this transformers version renamed it")
