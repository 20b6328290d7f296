"""In-LLM pruning: a schedule of stages, each dropping image tokens before one decoder layer.

A method at stage ``in_llm`` runs one stage (FastV: before layer K) or several (PyramidDrop: before
layers 8, 16 and 24 of 32); a chain may hold several such methods. Stages sit at strictly increasing
layers, and each sees the tokens the stages before it kept. The hooks sit on the decoder's layers;
attention kernels (SDPA, FlashAttention) stay on:

- a pre-hook on every layer from the first stage's on applies the current stage's plan: the rotary
  cos/sin, position ids and attention mask that the decoder built for the whole sequence, gathered
  to the tokens that stage's layers see;
- at a stage's layer the same hook first runs the stage's sieve on each image's tokens and gathers
  the kept hidden states;
- for sieves that ask for ``llm_attention``, the attention row of each row's query token (the prompt's
  last token) is recomputed from one layer's own q/k projections and rotary embedding: the attention
  inside layer K-1 (FastV, ``llm_attention_at = "previous"``) or the one layer K computes on its input
  (PyramidDrop, ``"input"``), one query row in either case (llm_signals.py).

Each stage's view of a forward is a packing of the decoder input (pack.py): per batch row, the decoder-input
positions its layers see, left-padded to the longest row (a padding slot attends to itself only, so
no attention row is empty; masks.py). What each stage's layers cache is recorded as the decoder-input (layer 0)
column of every slot, so at later forwards on that cache (decode steps, a second turn) the decoder's
mask over layer 0's keys is mapped onto what each stage holds. Kept tokens keep their original
positions, or (``positions = "repack"``, 1D rotary models) are renumbered without gaps.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from transformers import DynamicCache

from ..sieve import Sieve, VisualTokens, timed_select_all
from ..signals import instruction_positions, requests_of
from ..stats import ImageRecord, RunStats
from .compat import CACHE_ARGUMENT
from .flops import count_stage
from .llm_signals import attention_module, input_norm, keys_and_values, query_attention, rotary_function
from .masks import full_causal_mask, mapped_mask
from .pack import Packing, Selections, gather_sequence
from .select import stage_record
from .schedule import (
    LLM_SIGNALS, VISION_SIGNALS, Stage, check_freezing, check_repackable, check_restoring, positions_of, schedule, scored_at,
    transition_tracker,
)


@dataclass
class PendingImage:
    """One image's tokens as the next stage will see them."""

    record: ImageRecord  # updated with each stage's count and kept raster indices
    row: int
    positions: torch.Tensor  # slots in the stage's view of the sequence
    raster: torch.Tensor  # the raster index (over record.grid) of each of those tokens
    entered: int = 0  # tokens the image had when the current method's first stage began
    vision: dict = field(default_factory=dict)  # vision-tower signals the stages asked for, over every raster index
    returns: _Returns | None = None  # for a method with a restoring stage: the tokens it may bring back
    at_input: torch.Tensor | None = None  # the decoder-input positions of every token the image had there


@dataclass
class _Returns:
    """What a restoring stage (``Sieve.restores``) may bring back of one image: every token the image had when its
    method's first stage began, and the hidden state each had at the input of the last of the method's stages
    that saw it (where it was dropped, for a dropped one)."""

    origin: torch.Tensor  # (entered,) their decoder-input positions, in sequence order
    raster: torch.Tensor  # (entered,) their raster indices
    states: torch.Tensor | None = None  # (entered, d), filled at the first stage


@dataclass
class LayerState:
    """What one stage's layers hold of a cache: per slot, the decoder-input column it stands for (-1:
    padding), and per row the real tokens dropped before it so far (for re-packed positions)."""

    columns: torch.Tensor  # (batch, slots)
    dropped: torch.Tensor  # (batch,)


@dataclass
class _Plan:
    """The gathers every layer of one stage applies within one forward."""

    index: torch.Tensor | None  # (batch, width) decoder-input positions the stage's layers see, None: all
    position_embeddings: tuple | None
    position_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    columns: torch.Tensor | None = None  # (batch, keys) the decoder-input column of each key slot (-1: padding)


@dataclass
class _View:
    """This forward's tokens as the layers of one stage see them."""

    index: torch.Tensor | None  # (batch, width) decoder-input position of each slot, None: the decoder input itself
    filled: torch.Tensor | None  # (batch, width) False at the padding slots packing added, None: none
    own_mask: torch.Tensor  # (batch, width) the 2D mask of the slots (0: padding)
    query: torch.Tensor | None  # (batch,) the slot of each row's query token
    images: list[PendingImage] = field(default_factory=list)
    plan: _Plan | None = None
    dropped: torch.Tensor | None = None  # (batch,) real tokens of this forward dropped before these layers


@dataclass
class _Frozen:
    """The tokens a freezing stage (``Sieve.freezes``) took out of the hidden-state stream this forward: every
    later layer still has them as keys and values, computed from these hidden states."""

    hidden: torch.Tensor  # (batch, F, d) at the stage's input, left-padded per row
    embeddings: tuple  # rotary cos/sin at their positions
    cache: object  # what the layers write their keys to: the forward's cache, or one for this forward alone


class LayerPruning:
    """Hooks of the in-LLM stages on one decoder; fed by the engine at every decoder forward."""

    def __init__(self, methods: tuple[Sieve, ...], decoder: nn.Module, stats: RunStats, adapter=None):
        layers = getattr(decoder, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise TypeError(f"{type(decoder).__name__} has no .layers list: this transformers version changed its layout")
        self.stages = schedule(methods, len(layers))
        for stage in self.stages:
            problem = adapter.stage_layer_problem(stage.layer) if adapter is not None else None
            if problem is not None:
                raise ValueError(f"{stage.method.name} prunes before decoder layer {stage.layer}, but {problem}")
        self.stats, self.config, self.decoder, self.n_layers = stats, decoder.config, decoder, len(layers)
        self._layers = layers
        self._states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> [LayerState | None] per stage
        self._view: _View | None = None
        self._frozen: _Frozen | None = None
        self._held: list[LayerState | None] = []
        self._past, self._length, self._past_mask, self._input_mask = 0, 0, None, None
        self.stages_run, self._expected = 0, 0
        self._attention: dict[int, list[dict]] = {}  # stage -> per image of the view, its llm_attention signals
        self._inputs: torch.Tensor | None = None  # (batch, length, d) the decoder input, kept when a stage asks for llm_input
        # everything that can refuse comes before the first hook, so a refusal leaves the model untouched
        asked = [requests_of(stage.sieve, adapter) for stage in self.stages]
        for stage, requests in zip(self.stages, asked):
            others = sorted({r.name for r in requests} - {*LLM_SIGNALS, *VISION_SIGNALS})
            if others:
                raise ValueError(f"{stage.method.name} asks for {', '.join(others)} inside the LLM, where a stage gets "
                                 f"{' and '.join(LLM_SIGNALS)} and the vision tower's {' and '.join(VISION_SIGNALS)}")
        self._asks = [tuple(r for r in requests if r.name == "llm_attention") for requests in asked]
        self._transition_asks = [tuple(r for r in requests if r.name == "llm_transition") for requests in asked]
        self._input_asks = [tuple(r for r in requests if r.name == "llm_input") for requests in asked]
        check_restoring(self.stages, asked)
        self.transition_tracker = transition_tracker(self.stages, self._transition_asks, layers)
        self._vision_asks = [set(r for r in requests if r.name in VISION_SIGNALS) for requests in asked]
        # a stage stashes its tokens' hidden states when it or a later stage of its method restores
        self._stashes = [any(later.sieve.restores for later in self.stages[index:] if later.method is stage.method)
                         for index, stage in enumerate(self.stages)]
        self.vision_requests = tuple(dict.fromkeys(r for asks in self._vision_asks for r in asks))
        self._rotary = rotary_function(attention_module(layers[0]))
        scored = {index: attention_module(layers[stage.layer - 1]) for index, stage in enumerate(self.stages)
                  if self._asks[index] and scored_at(stage.sieve) == "previous"}
        if any(positions_of(stage.method) == "repack" for stage in self.stages):
            check_repackable(decoder)
        check_freezing(self.stages, decoder)
        at_layer = {stage.layer: index for index, stage in enumerate(self.stages)}
        self.handles = [
            layers[j].register_forward_pre_hook(partial(self._layer_input, at_layer.get(j), j), with_kwargs=True)
            for j in range(self.stages[0].layer, len(layers))
        ]
        self.handles += [attention.register_forward_pre_hook(partial(self._score, index), with_kwargs=True)
                         for index, attention in scored.items()]
        if self.transition_tracker is not None:
            self.handles += self.transition_tracker.handles

    @property
    def pending(self) -> bool:
        """Whether a forward's images have not yet passed every stage (a hook did not fire)."""
        return self.stages_run < self._expected

    def begin(self, images: list[PendingImage], query: torch.Tensor, own_mask: torch.Tensor,
              past_mask: torch.Tensor | None, cache, embeds: torch.Tensor | None = None) -> None:
        """Called at the decoder input of every forward: this forward's images (at decoder positions), each row's
        query position, the 2D masks of this forward's tokens and of what layer 0's cache already holds, the cache,
        and the decoder input ``embeds`` (kept for ``llm_input`` only)."""
        self._view = _View(None, None, own_mask, query, images)
        self._inputs = embeds if images and any(self._input_asks) else None
        for image in images:
            image.at_input = image.positions
        self._attention, self._frozen = {}, None
        self.stages_run, self._expected = 0, len(self.stages) if images else 0
        self._past = cache.get_seq_length() if cache is not None else 0
        self._length, self._past_mask, self._input_mask = own_mask.shape[1], past_mask, own_mask
        self._held = self._cache_states(cache)
        if self.transition_tracker is not None and images:
            self.transition_tracker.begin(own_mask, query)
        elif self.transition_tracker is not None:
            self.transition_tracker.clear()

    # hooks

    def _layer_input(self, stage: int | None, layer: int, module, args, kwargs):
        if self._view is None:
            return None
        if stage is not None:
            args, kwargs = self._run_stage(stage, args, kwargs)
        plan = self._view.plan
        if plan is None:
            return args, kwargs
        kwargs = dict(kwargs)
        if self._frozen is not None:  # the frozen tokens' keys and values at this layer go first in its cache
            frozen = self._frozen
            key, value = keys_and_values(module, self._rotary, frozen.hidden, frozen.embeddings)
            frozen.cache.update(key, value, layer)
            kwargs[CACHE_ARGUMENT] = frozen.cache
        kwargs["attention_mask"] = plan.attention_mask
        if plan.position_embeddings is not None:
            kwargs["position_embeddings"] = plan.position_embeddings
        if kwargs.get("position_ids") is not None and plan.position_ids is not None:
            kwargs["position_ids"] = plan.position_ids
        return args, kwargs

    def _score(self, stage: int, module, args, kwargs) -> None:
        view = self._view
        if view is None or not view.images:
            return
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self._attention[stage] = self._image_attention(stage, module, hidden, kwargs["position_embeddings"])

    def _image_attention(self, index: int, attention: nn.Module, hidden: torch.Tensor, embeddings) -> list[dict]:
        """Each view image's ``llm_attention`` requests of stage ``index``, as ``attention`` computes them on its input
        ``hidden``: the rows of the prompt's last token (``queries="last"``), of the image's instruction tokens
        (``"instruction"``, the ``text_embeddings`` rule) or of the image's own tokens (``"image"``), averaged (each
        row apart with ``per_query=True``; divided by the rotation's bias with ``debiased=True``), at the image's tokens."""
        view, asks = self._view, self._asks[index]
        last = {debiased: query_attention(attention, self._rotary, hidden, embeddings, view.query, view.own_mask,
                                          debiased=debiased)
                for debiased in {request.debiased for request in asks if request.queries == "last"}}
        per_image = []
        for image in view.images:
            given = {}
            for request in asks:
                if request.queries == "last":
                    rows = last[request.debiased][image.row]
                else:
                    queries = image.positions if request.queries == "image" else self._instruction(image)
                    row = slice(image.row, image.row + 1)
                    one = tuple(t[row] if t.shape[0] > 1 else t for t in embeddings)
                    rows = query_attention(attention, self._rotary, hidden[row], one, queries[None], view.own_mask[row],
                                           average=not request.per_query, debiased=request.debiased)[0]
                given[request] = rows[..., image.positions]
            per_image.append(given)
        return per_image

    def _instruction(self, image: PendingImage) -> torch.Tensor:
        """The view slots of ``image``'s instruction (``signals.instruction_positions``: the row's real text after the
        image up to its query token; if none, the row's text up to it)."""
        view = self._view
        placeholders = torch.zeros(view.own_mask.shape[1], dtype=torch.bool, device=view.own_mask.device)
        for other in view.images:
            if other.row == image.row:
                placeholders[other.positions] = True
        bounds = torch.stack([image.positions.max(), view.query[image.row].to(image.positions.device)]).tolist()
        return instruction_positions(view.own_mask[image.row], placeholders, *bounds)

    def _llm_input(self, request, image: PendingImage) -> torch.Tensor:
        """``llm_input``: the decoder-input rows of ``image``'s tokens in the current view (``tokens="image"``), of every
        token it had at the decoder input (``"whole_image"``), or of its instruction (``"instruction"``, the slots of
        ``_instruction``): each view slot's decoder-input position is ``_View.index``, so nothing is packed."""
        if request.tokens == "whole_image":
            return self._inputs[image.row, image.at_input.to(self._inputs.device)]
        view = self._view
        slots = image.positions if request.tokens == "image" else self._instruction(image)
        positions = view.index[image.row, slots] if view.index is not None else slots
        return self._inputs[image.row, positions.to(self._inputs.device)]

    # one stage

    def _run_stage(self, index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Select among the current view's image tokens, pack the kept ones, and make the stage's plan."""
        stage, view = self.stages[index], self._view
        hidden = args[0] if args else kwargs["hidden_states"]
        batch, width = hidden.shape[:2]
        selections = Selections(view.filled.clone() if view.filled is not None
                                else torch.ones(batch, width, dtype=torch.bool, device=hidden.device))
        # an image a stage kept no token of (ToDRE's second stage) has nothing left to select
        images = [image for image in self._starting(index, view.images) if len(image.positions)]
        if self._stashes[index]:
            self._stash(images, hidden)
        if stage.sieve.restores and view.index is not None and images:  # else nothing was dropped: nothing comes back
            return self._restore(index, images, hidden, args, kwargs)
        if images and scored_at(stage.sieve) == "input" and self._asks[index]:
            layer = self._layers[stage.layer]
            embeddings = view.plan.position_embeddings if view.plan is not None else kwargs["position_embeddings"]
            self._attention[index] = self._image_attention(index, attention_module(layer), input_norm(layer, hidden), embeddings)
        kept_per_image = []
        for image, (kept, features) in zip(images, self._run_sieve(index, images, hidden) if images else []):
            kept_per_image.append(kept)
            selections.mark(image.row, image.positions, kept, features)
        self.stages_run += 1
        hidden = selections.written(hidden)
        keep = selections.keep
        frozen_columns = self._freeze(stage, kwargs, hidden, keep, view) if stage.sieve.freezes else None
        if keep.all() and self._held[index] is None and view.index is None:
            view.images = images
            return _with_hidden(args, kwargs, hidden)  # nothing removed, now or before: the stock forward, bit for bit
        packing = selections.packed(view.own_mask)
        filled = packing.filled()
        index_now = view.index if keep.all() else (packing.index if view.index is None else view.index.gather(1, packing.index))
        dropped = self._dropped(view, keep)
        columns, state = self._columns(index, index_now, filled, dropped, frozen_columns)
        past_dropped = state.dropped - dropped
        if images:
            self._count_flops(index, view.own_mask, packing.mask, frozen_columns)
        cache = kwargs.get(CACHE_ARGUMENT)
        if cache is not None:
            self._states.setdefault(cache, [None] * len(self.stages))[index] = state
        plan = self._plan(stage, kwargs, index_now, columns, packing.mask, filled, past_dropped, frozen_columns is not None)
        query, images = self._moved(packing, view.query, images, kept_per_image) if index + 1 < len(self.stages) else (None, [])
        self._view = _View(index_now, None if keep.all() else filled, packing.mask, query, images, plan, dropped)
        if keep.all():
            return _with_hidden(args, kwargs, hidden)
        if self.transition_tracker is not None:
            self.transition_tracker.packed(partial(packing.gather, dim=1), packing.mask)
        return _with_hidden(args, kwargs, packing.gather(hidden, dim=1))

    def _freeze(self, stage: Stage, kwargs: dict, hidden: torch.Tensor, keep: torch.Tensor, view: _View) -> torch.Tensor | None:
        """The tokens this stage drops stay keys and values of every later layer (``Sieve.freezes``): keep their
        hidden states and rotary cos/sin for the layers' hooks; return their (batch, F) decoder-input columns as
        the cache holds them (-1: padding), or None when nothing was dropped."""
        dropped = ~keep & view.own_mask.bool()
        if not bool(dropped.any()):
            return None
        frozen = Packing.of(dropped, view.own_mask)
        embeddings = view.plan.position_embeddings if view.plan is not None else kwargs["position_embeddings"]
        cache = kwargs.get(CACHE_ARGUMENT)
        self._frozen = _Frozen(frozen.gather(hidden, dim=1), tuple(gather_sequence(t, frozen.index, dim=-2) for t in embeddings),
                               cache if cache is not None else DynamicCache(config=self.config))
        columns = view.index.gather(1, frozen.index) if view.index is not None else frozen.index
        return torch.where(frozen.mask.bool(), columns + self._past, -1)

    def _moved(self, packing: Packing, query, images: list[PendingImage], kept_per_image: list) -> tuple:
        """Where the query and each image's kept tokens sit in the packing, for the next stage."""
        slots = packing.slots()
        query = slots.gather(1, query.unsqueeze(1)).squeeze(1) if query is not None else None
        images = [PendingImage(image.record, image.row, slots[image.row, image.positions[kept]], image.record.kept, image.entered,
                               image.vision, image.returns, image.at_input)
                  for image, kept in zip(images, kept_per_image)]  # record.kept: this stage's raster indices
        return query, images

    def _starting(self, index: int, images: list[PendingImage]) -> list[PendingImage]:
        """The view's images; at the first stage of a method, each records how many tokens it has then (and, for a
        method with a restoring stage, which: ``PendingImage.returns``)."""
        if index > 0 and self.stages[index - 1].method is self.stages[index].method:
            return images
        for image in images:
            image.entered = len(image.positions)
            image.returns = _Returns(self._input_positions(image), image.raster) if self._stashes[index] else None
        return images

    def _input_positions(self, image: PendingImage) -> torch.Tensor:
        """The decoder-input positions of ``image``'s tokens in the current view."""
        index = self._view.index
        return index[image.row, image.positions] if index is not None else image.positions

    def _stash(self, images: list[PendingImage], hidden: torch.Tensor) -> None:
        """Each image's present tokens store their hidden states at this stage's input (``_Returns.states``)."""
        for image in images:
            returns = image.returns
            if returns.states is None:
                returns.states = hidden.new_zeros(len(returns.origin), hidden.shape[-1])
            present = torch.searchsorted(returns.origin, self._input_positions(image))
            returns.states = returns.states.index_copy(0, present, hidden[image.row, image.positions])

    def _restore(self, index: int, images: list[PendingImage], hidden: torch.Tensor, args: tuple, kwargs: dict):
        """A restoring stage (``Sieve.restores``): its sieve sees every token each image entered its method with, a
        dropped one with its stashed hidden state; what it keeps is packed anew from the decoder input, each token
        at its own position (so brought-back tokens sit where they were, in sequence order)."""
        stage, view = self.stages[index], self._view
        batch, d = hidden.shape[0], hidden.shape[-1]
        filled = view.filled if view.filled is not None else torch.ones(view.index.shape, dtype=torch.bool, device=hidden.device)
        rows, slots = filled.nonzero(as_tuple=True)
        columns_now = view.index[rows, slots]
        full = hidden.new_zeros(batch, self._length, d)  # the hidden states over the decoder input's positions
        full[rows, columns_now] = hidden[rows, slots]
        keep = torch.zeros(batch, self._length, dtype=torch.bool, device=hidden.device)
        keep[rows, columns_now] = True
        entered = [PendingImage(image.record, image.row, image.returns.origin, image.returns.raster, image.entered,
                                image.vision, image.returns, image.at_input) for image in images]
        for image in entered:
            full[image.row, image.positions] = image.returns.states.to(full.dtype)
        selections = Selections(keep)
        kept_per_image = []
        for image, (kept, features) in zip(entered, self._run_sieve(index, entered, full)):
            kept_per_image.append(kept)
            selections.mark(image.row, image.positions, kept, features)
        self.stages_run += 1
        full = selections.written(full)
        input_mask = self._input_mask.to(hidden.device)
        packing = selections.packed(input_mask)
        index_now, filled_now = packing.index, packing.filled()
        dropped = ((~selections.keep) & input_mask.bool()).sum(1)  # of the decoder input: earlier stages included
        columns, state = self._columns(index, index_now, filled_now, dropped)
        self._count_flops(index, view.own_mask, packing.mask, None)
        cache = kwargs.get(CACHE_ARGUMENT)
        if cache is not None:
            self._states.setdefault(cache, [None] * len(self.stages))[index] = state
        plan = self._plan(stage, kwargs, index_now, columns, packing.mask, filled_now, state.dropped - dropped)
        query = view.index.gather(1, view.query[:, None]).squeeze(1)  # at the decoder input, as the packing counts
        query, moved = self._moved(packing, query, entered, kept_per_image) if index + 1 < len(self.stages) else (None, [])
        self._view = _View(index_now, filled_now, packing.mask, query, moved, plan, dropped)
        return _with_hidden(args, kwargs, packing.gather(full, dim=1))

    def _run_sieve(self, index: int, images: list[PendingImage], hidden: torch.Tensor) -> list[tuple]:
        """The stage's sieve on every image at once (``timed_select_all``); each image's record gets the stage.
        Returns, per image, the kept indices (into its positions) and the features merged tokens take."""
        stage = self.stages[index]
        given = []
        for number, image in enumerate(images):
            features = hidden[image.row, image.positions]
            signals = dict(self._attention[index][number]) if self._asks[index] else {}
            signals.update((request, self.transition_tracker.at(image.row, image.positions)) for request in self._transition_asks[index])
            signals.update((request, self._llm_input(request, image)) for request in self._input_asks[index])
            raster = image.raster.to(features.device)
            signals.update((request, value[..., raster]) for request, value in image.vision.items()
                           if request in self._vision_asks[index])
            grid = image.record.grid if len(image.positions) == image.record.grid[0] * image.record.grid[1] else (1, len(features))
            given.append(VisualTokens(features, grid, signals, entered=image.entered))
        results = timed_select_all(stage.sieve, given)
        # one read back to the host for every image's kept indices
        on_host = torch.cat([selection.kept for selection, _ in results]).cpu().split([len(s.kept) for s, _ in results])
        chosen = []
        for image, tokens, (selection, seconds), kept in zip(images, given, results, on_host):
            record = image.record
            record.kept = image.raster[kept]
            record.after = len(record.kept)
            record.seconds += seconds
            record.stages.append(stage_record(stage.method.name, "in_llm", stage.layer, record.kept, seconds, selection))
            chosen.append((selection.kept, selection.merged(tokens.features)))
        return chosen

    def _dropped(self, view: _View, keep: torch.Tensor) -> torch.Tensor:
        """(batch,) real tokens of this forward dropped before this stage's layers (earlier stages included)."""
        before = view.dropped if view.dropped is not None else torch.zeros(keep.shape[0], dtype=torch.long, device=keep.device)
        return before + ((~keep) & view.own_mask.bool()).sum(1)

    def _columns(self, index: int, index_now, filled: torch.Tensor, dropped: torch.Tensor,
                 frozen: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerState]:
        """The decoder-input columns this stage's layers hold after this forward (the ``frozen`` tokens' first), and
        its new cache state."""
        batch = filled.shape[0]
        if index_now is None:
            index_now = torch.arange(filled.shape[1], device=filled.device).expand(batch, -1)
        columns = torch.where(filled, index_now + self._past, -1)
        if frozen is not None:
            columns = torch.cat([frozen, columns], dim=1)
        held = self._held_columns(index)
        if held is not None:
            columns = torch.cat([held.columns.to(columns.device), columns], dim=1)
            dropped = dropped + held.dropped.to(dropped.device)
        elif self._past:
            columns = torch.cat([torch.arange(self._past, device=columns.device).expand(batch, -1), columns], dim=1)
        return columns, LayerState(columns, dropped)

    def _held_columns(self, index: int) -> LayerState | None:
        """What stage ``index``'s layers held before this forward: its own state or, if it has never pruned, the
        state of the nearest stage before it that has (None: every earlier token, in order)."""
        return next((state for state in reversed(self._held[: index + 1]) if state is not None), None)

    def _plan(self, stage: Stage, kwargs: dict, index, columns: torch.Tensor, packed_mask: torch.Tensor, filled: torch.Tensor,
              past_dropped: torch.Tensor, out_of_order: bool = False) -> _Plan:
        """What layers of this stage get: cos/sin and position ids of the kept tokens, and the decoder's mask (over
        this forward's tokens and layer 0's keys) mapped onto the slots they cache."""
        embeddings, positions = kwargs.get("position_embeddings"), kwargs.get("position_ids")
        if positions_of(stage.method) == "repack":
            positions, embeddings = self._repacked(kwargs, index, packed_mask, filled, past_dropped)
        elif index is not None:
            embeddings = tuple(gather_sequence(t, index, dim=-2) for t in embeddings)
            positions = gather_sequence(positions, index, dim=-1) if positions is not None else None
        mask = kwargs.get("attention_mask")
        keys = self._past + self._length
        if mask is None and not out_of_order and bool((columns >= 0).all()):
            return _Plan(index, embeddings, positions, None, columns)  # causal over the kept tokens, which stay in order
        if mask is None:
            mask = full_causal_mask(self.config, columns.shape[0], self._length, keys, columns.device, embeddings[0].dtype)
        return _Plan(index, embeddings, positions, mapped_mask(mask, index, columns, keys), columns)

    def _repacked(self, kwargs: dict, index, packed_mask: torch.Tensor, filled: torch.Tensor, past_dropped: torch.Tensor):
        """Positions without gaps (PyramidDrop's policy): each kept token's original position less the real tokens
        dropped before it in its row (in earlier forwards too), and the rotary cos/sin of those positions."""
        positions = kwargs.get("position_ids")
        if positions is None or positions.ndim != 2:
            raise ValueError("positions='repack' needs 1D position ids; this model's are multi-row (mrope): use positions='original'")
        if index is None:
            index = torch.arange(filled.shape[1], device=filled.device).expand(filled.shape[0], -1)
        real_input = self._input_mask.to(index.device).long()
        real_before = (real_input.cumsum(1) - real_input).gather(1, index)  # real decoder-input tokens before each slot
        kept = (packed_mask.bool() & filled).long()
        kept_before = kept.cumsum(1) - kept
        shifted = gather_sequence(positions, index, dim=-1) - (real_before - kept_before) - past_dropped.to(index.device)[:, None]
        dtype = kwargs["position_embeddings"][0].dtype
        return shifted, self.decoder.rotary_emb(torch.zeros(1, device=shifted.device, dtype=dtype), position_ids=shifted)

    def _count_flops(self, index: int, before_mask: torch.Tensor, after_mask: torch.Tensor, frozen: torch.Tensor | None) -> None:
        """Layers from this stage's on see the kept tokens: replace their share of the count so far. Frozen tokens
        count as keys every kept token sees (an upper bound: text before an image does not see it), and their
        key and value projections."""
        layers = self.n_layers - self.stages[index].layer
        before_past = self._real_held(self._held_columns(index - 1) if index > 0 else None, before_mask.shape[0])
        after_past = self._real_held(self._held_columns(index), before_mask.shape[0])
        if frozen is not None:
            frozen_counts = (frozen >= 0).sum(1).tolist()
            after_past = [past + count for past, count in zip(after_past, frozen_counts)]
            self.stats.prefill_flops += layers * frozen_key_flops(self.config, sum(frozen_counts))
        count_stage(self.stats, self.config, layers, before_mask.sum(1).tolist(), after_mask.sum(1).tolist(), before_past, after_past)

    def _real_held(self, state: LayerState | None, batch: int) -> list[int]:
        """Real (unpadded) past tokens a stage's layers hold, per row."""
        past_mask = self._past_mask
        if past_mask is None:
            return [0] * batch
        if state is None:
            return past_mask.sum(1).tolist()
        columns = state.columns
        real = (columns >= 0) & past_mask.to(columns.device).gather(1, columns.clamp(min=0)).bool()
        return real.sum(1).tolist()

    def _cache_states(self, cache) -> list[LayerState | None]:
        """What each stage's layers hold of ``cache`` before this forward. Assisted and prompt-lookup decoding crop
        the cache after rejected candidates (the last n tokens of every layer, never pruned ones): drop as many slots."""
        states = self._states.get(cache) if cache is not None else None
        if states is None:
            return [None] * len(self.stages)
        for index, state in enumerate(states):
            held = cache.get_seq_length(self.stages[index].layer)
            if state is not None and held < state.columns.shape[1]:
                states[index] = LayerState(state.columns[:, :held], state.dropped)
        return list(states)

    def current_plan(self) -> _Plan | None:
        """The plan the current stage's layers apply (None: they see the decoder's own sequence and keys)."""
        return self._view.plan if self._view is not None else None

    def cache_states(self, cache) -> list[LayerState | None] | None:
        """What each stage's layers hold of ``cache`` (decode_stage.py evicts from them); None: no stage pruned it."""
        return self._states.get(cache) if cache is not None else None

    def clear(self) -> None:
        """Forget the current forward's images and plans (it ended, or raised)."""
        self._view, self._attention, self._held, self._inputs = None, {}, [None] * len(self.stages), None
        self._frozen = None
        self.stages_run = self._expected = 0
        if self.transition_tracker is not None:
            self.transition_tracker.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.clear()


def frozen_key_flops(text_config, tokens: int) -> int:
    """The key and value projections of ``tokens`` frozen tokens in one layer."""
    d = text_config.hidden_size
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or d // heads
    return 2 * tokens * d * head_dim * 2 * kv_heads


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}
