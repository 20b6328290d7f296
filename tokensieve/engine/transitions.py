"""``llm_transition``: how much each token's sublayers change it, summed over decoder layers (TransPrune's
token transition variation, TTV).

For a sublayer (a layer's attention or its MLP) with normalised input ``x`` and output ``y`` (before the
residual add), a token's transition is ``|y| / |x|`` times the softmax over its row's tokens of
``1 - cos(x, y)`` (the row's prompt: not the drafts assisted decoding appends); a layer adds its attention's and its MLP's. Forward hooks on those sublayers add each
layer's transitions to one (batch, width) buffer over the tokens the layers see; when a stage packs the
sequence the buffer is packed the same way, so at a later stage it holds, for every token still there, the
sum over the layers since ``start``. Computed in the prefill of a forward with images only: the hooks do
nothing on decode steps.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def transition(x: torch.Tensor, y: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(batch, width) transitions of one sublayer: ``x`` its normalised input, ``y`` its output (batch, width, d),
    ``real`` (batch, width) False at padding, which takes no share of a row's softmax."""
    x, y = x.float(), y.float()
    ratio = y.norm(dim=-1) / x.norm(dim=-1)
    change = (1 - F.cosine_similarity(x, y, dim=-1)).masked_fill(~real, float("-inf"))
    return (ratio * change.softmax(dim=-1)).masked_fill(~real, 0.0)


class Transitions:
    """Hooks on the attention and MLP of decoder layers ``start..end-1`` that sum their transitions per token."""

    def __init__(self, layers: nn.ModuleList, start: int, end: int, attention_of):
        self.start, self.end = start, end
        self.sums: torch.Tensor | None = None  # (batch, width) over the tokens the current layers see
        self._real: torch.Tensor | None = None
        self.handles = []
        for layer in layers[start:end]:
            mlp = getattr(layer, "mlp", None)
            if not isinstance(mlp, nn.Module):
                raise TypeError(f"{type(layer).__name__} has no .mlp: llm_transition reads each layer's attention and MLP")
            self.handles += [attention_of(layer).register_forward_hook(self._attention_output, with_kwargs=True),
                             mlp.register_forward_hook(self._mlp_output, with_kwargs=True)]

    def begin(self, own_mask: torch.Tensor, query: torch.Tensor) -> None:
        """A prefill with images starts: nothing summed yet, over the decoder input's tokens. Each row's softmax runs
        over its prompt, up to its ``query`` slot: draft tokens that assisted decoding appends take no share."""
        slots = torch.arange(own_mask.shape[1], device=own_mask.device)
        self._real = own_mask.bool() & (slots <= query.to(own_mask.device)[:, None])
        self.sums = torch.zeros(own_mask.shape, dtype=torch.float32, device=own_mask.device)

    def packed(self, gather, own_mask: torch.Tensor) -> None:
        """A stage packed the sequence (``gather`` maps a (batch, width) tensor to its slots; ``own_mask`` is theirs)."""
        if self.sums is not None:
            self.sums = gather(self.sums)
            self._real = gather(self._real) & own_mask.bool()

    def at(self, row: int, positions: torch.Tensor) -> torch.Tensor:
        return self.sums[row, positions]

    def clear(self) -> None:
        self.sums = self._real = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.clear()

    def _add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.sums is not None and x.shape[:2] == self.sums.shape:
            self.sums += transition(x, y, self._real.to(x.device))

    def _attention_output(self, module, args, kwargs, output) -> None:
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self._add(x, output[0] if isinstance(output, tuple) else output)

    def _mlp_output(self, module, args, kwargs, output) -> None:
        self._add(args[0] if args else next(iter(kwargs.values())), output)
