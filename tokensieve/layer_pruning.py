"""In-LLM pruning: a sieve at stage ``in_llm`` drops image tokens between decoder layers K-1 and K.

The hooks sit on the adapter's decoder layers; attention kernels (SDPA, FlashAttention) stay on:

- a pre-hook on layer K-1's attention recomputes, for sieves that ask for ``llm_attention``, the
  attention row of each row's query token (the prompt's last token) over the forward's tokens from
  that layer's own q/k projections and rotary embedding (one query, ~10% of one layer);
- a pre-hook on layer K runs the sieve on each image's tokens and gathers the kept hidden states;
  pre-hooks on layers K.. gather the rotary cos/sin, position ids and the attention mask that the
  decoder built for the whole sequence, so those layers see only the kept tokens.

Layers before K keep every token and layers K.. cache only the kept ones (a DynamicCache holds a
length per layer). At later forwards on that cache (decode steps, a second turn) the decoder builds
its mask over the full sequence of layer 0; its columns are mapped onto what layers K.. hold. Rows
of a batch may keep different counts: shorter rows are left-padded, and a padding slot attends to
itself only, so no attention row is empty.
"""

from __future__ import annotations

import sys
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function

from .compat import CACHE_ARGUMENT
from .flops import decoder_prefill_flops
from .selection import left_packed
from .sieve import Sieve, VisualTokens, timed_select
from .stats import ImageRecord, RunStats


@dataclass
class PendingImage:
    """One image's tokens at the decoder input, as the in-LLM sieve will see them."""

    record: ImageRecord  # updated with the final count and kept raster indices
    row: int
    positions: torch.Tensor  # sequence positions at the decoder input
    raster: torch.Tensor  # the raster index (over record.grid) of each of those tokens


@dataclass
class LayerState:
    """What layers K.. of a cache hold: per slot, the decoder-input position it stands for (-1: padding)."""

    columns: torch.Tensor  # (batch, slots)


@dataclass
class _Plan:
    """The gathers every layer from K on applies within one forward."""

    index: torch.Tensor | None  # (batch, width) kept positions of this forward, None: all kept
    position_embeddings: tuple | None
    position_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None


class PromptQueries:
    """Which token of each row is the query that scores its images: the row's last real token or, when the
    row continues a prompt this run has already scored with the same image features, that prompt's last
    token. So a prompt's selection holds for every later step: a generate loop without a cache re-runs the
    whole sequence, and a fresh prefill of a longer conversation, prune exactly as the cached run did."""

    LIMIT = 1024  # prompts remembered per run (oldest forgotten first)

    def __init__(self):
        self._seen: OrderedDict[int, list[tuple[int, ...]]] = OrderedDict()

    def query_positions(self, inputs: dict, embeds: torch.Tensor, slots: list, own_mask: torch.Tensor,
                        candidates: int = 0) -> torch.Tensor:
        """Each row's query position; the last ``candidates`` tokens of every row follow its prompt (drafts that
        assisted decoding verifies in the prefill) and are no part of it."""
        ids, real_rows = inputs["input_ids"].tolist(), own_mask.bool().tolist()  # two reads back to the host in all
        sums = [embeds[slot.row, slot.positions].detach().float().sum(-1) for slot in slots]
        sums = torch.cat(sums).cpu().split([len(slot.positions) for slot in slots]) if slots else []
        queries = []
        for row, (row_ids, row_real) in enumerate(zip(ids, real_rows)):
            real = [i for i, is_real in enumerate(row_real) if is_real]
            real = real[: max(len(real) - candidates, 1)]
            tokens = tuple(row_ids[i] for i in real)
            features = [summed for slot, summed in zip(slots, sums) if slot.row == row]
            key = hash(torch.cat(features).numpy().tobytes()) if features else 0
            prompts = self._seen.setdefault(key, [])
            prompt = next((p for p in prompts if tokens[: len(p)] == p), None)
            if prompt is None:
                prompts.append(prompt := tokens)
            queries.append(real[len(prompt) - 1])
        while len(self._seen) > self.LIMIT:
            self._seen.popitem(last=False)
        return torch.tensor(queries, device=own_mask.device)


class LayerPruning:
    """Hooks of one ``in_llm`` sieve on one decoder; fed by the engine at every decoder forward."""

    def __init__(self, sieve: Sieve, decoder: nn.Module, stats: RunStats):
        layers = getattr(decoder, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise TypeError(f"{type(decoder).__name__} has no .layers list: this transformers version changed its layout")
        if not 1 <= sieve.layer < len(layers):
            raise ValueError(
                f"{sieve.name} prunes after layer={sieve.layer}, but this language model has {len(layers)} layers: "
                f"pass a layer from 1 to {len(layers) - 1}"
            )
        self.sieve, self.stats, self.config = sieve, stats, decoder.config
        self.layer, self.n_layers = sieve.layer, len(layers)
        self._states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._images: list[PendingImage] = []
        self._plan: _Plan | None = None
        self._forward: dict = {}
        self._attention: torch.Tensor | None = None
        self.handles = [layers[self.layer].register_forward_pre_hook(self._select, with_kwargs=True)]
        self.handles += [layer.register_forward_pre_hook(self._apply_plan, with_kwargs=True) for layer in layers[self.layer:]]
        if "llm_attention" in sieve.signals:
            attention = _attention_module(layers[self.layer - 1])
            self._rotary = _rotary_function(attention)
            self.handles.append(attention.register_forward_pre_hook(self._score, with_kwargs=True))

    @property
    def pending(self) -> bool:
        return bool(self._images)

    def begin(self, images: list[PendingImage], query: torch.Tensor, own_mask: torch.Tensor, past_mask: torch.Tensor | None) -> None:
        """Called at the decoder input of every forward: this forward's images (at decoder positions), each row's
        query position, and the 2D masks of this forward's tokens and of what layer 0's cache already holds."""
        self._images, self._plan, self._attention = images, None, None
        self._forward = {"query": query, "own_mask": own_mask, "past_mask": past_mask}

    # hooks

    def _score(self, module, args, kwargs) -> None:
        if not self._images:
            return
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self._attention = _query_attention(module, self._rotary, hidden, kwargs["position_embeddings"],
                                           self._forward["query"], self._forward["own_mask"])

    def _select(self, module, args, kwargs):
        self._plan = None
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = kwargs.get(CACHE_ARGUMENT)
        state = self._cache_state(cache)
        batch, length = hidden.shape[:2]
        keep = torch.ones(batch, length, dtype=torch.bool, device=hidden.device)
        images, self._images = self._images, []
        for image in images:
            kept, features = self._run_sieve(image, hidden)
            keep[image.row, image.positions] = False
            keep[image.row, image.positions[kept]] = True
            if features is not None:
                hidden = hidden.clone()
                hidden[image.row, image.positions[kept]] = features.to(hidden.dtype)
        if keep.all() and state is None:
            return None  # nothing removed, now or before: the stock forward, bit for bit
        own_mask = self._forward["own_mask"]
        index, packed_mask = left_packed(keep, own_mask)
        width = index.shape[1]
        filled = torch.arange(width, device=index.device) >= (width - keep.sum(1))[:, None]
        past = cache.get_seq_length() - length if cache is not None else 0  # layer 0 already holds this forward
        columns = torch.where(filled, index + past, -1)
        if state is not None:
            columns = torch.cat([state.columns.to(columns.device), columns], dim=1)
        elif past:
            columns = torch.cat([torch.arange(past, device=columns.device).expand(batch, -1), columns], dim=1)
        if images:
            self._count_flops(own_mask, packed_mask, state)
        if cache is not None:
            self._states[cache] = LayerState(columns)
        index = None if keep.all() else index
        self._plan = self._gathered(kwargs, index, columns, length, past + length)
        if index is None:
            return args, kwargs
        hidden = hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def _apply_plan(self, module, args, kwargs):
        plan = self._plan
        if plan is None:
            return None
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = plan.attention_mask
        if plan.index is not None:
            kwargs["position_embeddings"] = plan.position_embeddings
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = plan.position_ids
        return args, kwargs

    # helpers

    def _cache_state(self, cache) -> LayerState | None:
        """What layers K.. of ``cache`` hold before this forward. Assisted and prompt-lookup decoding crop the
        cache after rejected candidates (the last n tokens of every layer, never pruned ones): drop as many slots."""
        state = self._states.get(cache) if cache is not None else None
        if state is None:
            return None
        held = cache.get_seq_length(self.layer)  # layer K, not yet updated by this forward
        if held < state.columns.shape[1]:
            state = LayerState(state.columns[:, :held])
            self._states[cache] = state
        return state

    def _run_sieve(self, image: PendingImage, hidden: torch.Tensor):
        features = hidden[image.row, image.positions]
        signals = {}
        if "llm_attention" in self.sieve.signals:
            signals["llm_attention"] = self._attention[image.row][:, image.positions]
        grid = image.record.grid if len(image.positions) == image.record.grid[0] * image.record.grid[1] else (1, len(features))
        selection, seconds = timed_select(self.sieve, VisualTokens(features, grid, signals))
        image.record.after = len(selection.kept)
        image.record.kept = image.raster[selection.kept.cpu()]
        image.record.seconds += seconds
        return selection.kept, selection.features

    def _gathered(self, kwargs: dict, index, columns: torch.Tensor, length: int, keys: int) -> _Plan:
        """What layers K.. get: cos/sin and position ids of the kept tokens, and the decoder's mask (over this
        forward's ``length`` queries and layer 0's ``keys``) mapped onto the slots they cache."""
        embeddings, positions = kwargs.get("position_embeddings"), kwargs.get("position_ids")
        if index is not None:
            embeddings = tuple(_gather_sequence(t, index, dim=-2) for t in embeddings)
            positions = _gather_sequence(positions, index, dim=-1) if positions is not None else None
        mask = kwargs.get("attention_mask")
        if mask is None and bool((columns >= 0).all()):
            return _Plan(index, embeddings, positions, None)  # causal over the kept tokens, which stay in order
        if mask is None:
            mask = _full_causal_mask(self.config, columns.shape[0], length, keys, columns.device, embeddings[0].dtype)
        return _Plan(index, embeddings, positions, _mapped_mask(mask, index, columns, keys))

    def _count_flops(self, own_mask: torch.Tensor, packed_mask: torch.Tensor, state: LayerState | None) -> None:
        """Layers K.. see the kept tokens: replace their share of the engine's count."""
        past_mask = self._forward["past_mask"]
        layers = self.n_layers - self.layer
        full_past = past_mask.sum(1).tolist() if past_mask is not None else [0] * own_mask.shape[0]
        kept_past = full_past
        if state is not None and past_mask is not None:
            real = (state.columns >= 0) & past_mask.to(state.columns.device).gather(1, state.columns.clamp(min=0)).bool()
            kept_past = real.sum(1).tolist()
        full = decoder_prefill_flops(self.config, own_mask.sum(1).tolist(), full_past, layers=layers)
        kept = decoder_prefill_flops(self.config, packed_mask.sum(1).tolist(), kept_past, layers=layers)
        self.stats.prefill_flops += kept - full

    def clear(self) -> None:
        """Forget the current forward's images and plan (it ended, or raised)."""
        self._images, self._plan, self._forward, self._attention = [], None, {}, None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.clear()


def _attention_module(layer: nn.Module) -> nn.Module:
    for module in layer.modules():
        if all(isinstance(getattr(module, name, None), nn.Linear) for name in ("q_proj", "k_proj")):
            return module
    raise TypeError(f"{type(layer).__name__} has no q_proj/k_proj: this transformers version renamed them")


def _rotary_function(attention: nn.Module):
    """The rotary function the attention's own modeling file applies (``apply_rotary_pos_emb``)."""
    rotary = getattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb", None)
    if rotary is None:
        raise TypeError(f"{type(attention).__module__} has no apply_rotary_pos_emb: this transformers version changed it")
    return rotary


def _query_attention(attention: nn.Module, rotary, hidden: torch.Tensor, position_embeddings, query: torch.Tensor,
                     own_mask: torch.Tensor) -> torch.Tensor:
    """(batch, heads, length) softmax attention of each row's ``query`` token to the forward's tokens, as the
    layer computes it (eager and SDPA agree on it), from one query projection and the keys."""
    batch, length = hidden.shape[:2]
    rows = torch.arange(batch, device=hidden.device)
    head_dim = attention.head_dim
    q = attention.q_proj(hidden[rows, query]).view(batch, 1, -1, head_dim)
    k = attention.k_proj(hidden).view(batch, length, -1, head_dim)
    if hasattr(attention, "q_norm"):  # Qwen3-style per-head norms come before the rotation
        q, k = attention.q_norm(q), attention.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = (t.expand(batch, -1, -1) for t in position_embeddings)
    q = rotary(q, q, cos[rows, query].unsqueeze(1), sin[rows, query].unsqueeze(1))[0]
    k = rotary(k, k, cos, sin)[1]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q.float() @ k.float().transpose(-1, -2)).squeeze(2) * attention.scaling
    visible = (torch.arange(length, device=hidden.device) <= query[:, None]) & own_mask.bool()
    return logits.masked_fill(~visible[:, None], float("-inf")).softmax(dim=-1)


def _gather_sequence(tensor: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``tensor`` at the (batch, width) ``index`` along sequence axis ``dim``, whose batch axis (size 1 or
    batch) comes just before it."""
    dim %= tensor.ndim
    shape = list(tensor.shape)
    shape[dim - 1] = index.shape[0]
    tensor = tensor.expand(shape)
    view = [1] * tensor.ndim
    view[dim - 1], view[dim] = index.shape
    shape[dim] = index.shape[1]
    return tensor.gather(dim, index.view(view).expand(shape))


def _full_causal_mask(config, batch: int, queries: int, keys: int, device, dtype) -> torch.Tensor:
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


def _mapped_mask(mask: torch.Tensor, index: torch.Tensor | None, columns: torch.Tensor, keys: int) -> torch.Tensor:
    """The decoder's mask (over layer 0's ``keys``) with rows at the kept queries (``index``) and columns at
    the slots layers K.. cache (``columns``, -1 for a padding slot, which nothing attends to)."""
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
