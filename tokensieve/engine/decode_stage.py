"""Decode stages: what the tokens after a prompt attend to of its image tokens, for a method that acts there too
(``Sieve.decode_rule``; one such method a run).

A decode token is every token after a prompt's query (its last token, ``llm_signals.PromptQueries``): one a decode
step, several in a later turn on the cache, and, in a forward that re-reads a prompt this run has scored together
with what followed it (a generate loop without a cache, a fresh prefill of a longer conversation), the tokens after
that prompt. The rule acts on all of them alike, so that the cached run, a loop without a cache and a fresh prefill
give the same tokens:

- ``"last_stage"`` (MustDrop's decoding stage): after a prefill with a cache, the layers from the method's first
  stage's ``layer - 1`` up to its last stage's keep in their KV cache only what its last stage kept (evicted:
  ``run.stats.kv_bytes`` counts what stays); their masks at later forwards map onto it (``mapped_mask``, as any
  stage's). Without a cache, the decode tokens' rows of those layers' masks block the image tokens the prompt's last
  stage dropped (remembered per prompt: the no-cache forward reaches those layers before its last stage selects).
- ``"per_step"`` (DyCoke's): in layer ``layer - 1`` the head-mean attention row of each decode token is recomputed
  from the layer's own q projection and keys (the cache's, or the forward's), so SDPA stays on; the method picks
  the image tokens that token attends to (``Sieve.decode_step``), and its rows of the masks of layers ``layer`` on
  block the others. The cache keeps every token, so a token left out at one step may be picked at the next.

Both block by mask rows, which need a 4D mask: SDPA or eager attention (FlashAttention is refused).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from ..sieve import DecodeRule, Sieve
from .compat import CACHE_ARGUMENT
from .layer_stages import LayerPruning, LayerState, PendingImage
from .llm_signals import PromptQueries, attention_module, attention_rows, rotary_function
from .masks import full_causal_mask, mapped_mask

#: the rules a method's ``decode_rule`` may name
RULES = ("last_stage", "per_step")


@dataclass
class _Held:
    """What the decode stage follows of one cache across forwards."""

    images: list[list[torch.Tensor]] = field(default_factory=list)  # per row, each image's layer-0 columns (per_step)
    totals: list[list[int]] = field(default_factory=list)  # per row, each image's token count before any stage
    before: list[dict] = field(default_factory=list)  # per row: the last forward's decode tokens' rows by layer-0 column
    first: LayerState | None = None  # last_stage: what the first evicted layer holds after an eviction


class DecodeStage:
    """Hooks of one method's decode rule on one decoder; fed by the engine at every decoder forward."""

    MEMORY = 1024  # prompts whose last stage's selection is remembered (oldest forgotten first)

    def __init__(self, method: Sieve, rule: DecodeRule, decoder: nn.Module, layers: LayerPruning | None,
                 prompts: PromptQueries):
        n_layers = len(decoder.layers)
        self.method, self.rule, self.config, self._layers, self._prompts = method, rule, decoder.config, layers, prompts
        _refuse(method, rule, decoder, layers, n_layers)
        self._held: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> _Held
        self._memory: OrderedDict = OrderedDict()  # (features' key, prompt ids) -> each image's last kept raster
        self._forward: _Forward | None = None
        blocks = partial_hook(self._block)
        if rule.kind == "last_stage":
            own = [index for index, stage in enumerate(layers.stages) if stage.method is method]
            self._last_index = own[-1]
            # layer 0 keeps every token: the engine reads the sequence's length from it (on the code's 32 layers the
            # first evicted is layer 2)
            self._first, self._last = max(layers.stages[0].layer - 1, 1), layers.stages[own[-1]].layer
            before_stages = self._first < layers.stages[0].layer  # it needs its own plan at later forwards
            self.handles = [decoder.layers[self._first].register_forward_pre_hook(self._first_layer, with_kwargs=True)] \
                if before_stages else []
            self.handles += [decoder.layers[j].register_forward_pre_hook(blocks(j), with_kwargs=True)
                             for j in range(self._first + before_stages, self._last)]
            self.handles.append(decoder.layers[self._last].register_forward_pre_hook(self._evict, with_kwargs=True))
        else:
            scored = attention_module(decoder.layers[rule.layer - 1])
            self._rotary = rotary_function(scored)
            self.handles = [scored.register_forward_hook(self._score, with_kwargs=True)]
            self.handles += [decoder.layers[j].register_forward_pre_hook(blocks(j), with_kwargs=True)
                             for j in range(rule.layer, n_layers)]

    def begin(self, images: list[PendingImage], queries: torch.Tensor | None, own_mask: torch.Tensor, cache) -> None:
        """Called at the decoder input of every forward: its images (at decoder-input positions), each row's query
        position, the 2D mask of its tokens, and the cache."""
        batch, length = own_mask.shape
        _check_cache(cache, self.method)
        past = cache.get_seq_length() if cache is not None else 0
        held = self._held.get(cache) if cache is not None else None
        real = own_mask.bool()
        if images:
            after = torch.arange(length, device=real.device)[None, :] > queries.to(real.device)[:, None]
            decode = real & after
            held = self._new_images(held, images, batch, past)
            if cache is not None:
                self._held[cache] = held
        elif held is not None:
            decode = real
        else:
            self._forward = None
            return
        self._forward = _Forward(images, decode, past, length, held, list(self._prompts.last) if images else [])
        if self.rule.kind == "last_stage" and images and bool(decode.any()):
            self._forward.blocked = self._remembered_blocks(images, decode, past)

    def check_cache(self, cache) -> None:
        """Refuse, before the model runs, a cache the rule cannot act on (a static one)."""
        _check_cache(cache, self.method)

    def clear(self) -> None:
        self._forward = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.clear()

    # per_step

    def _score(self, module, args, kwargs, output) -> None:
        """Layer ``rule.layer - 1``'s attention of each decode token to the image tokens; the method picks what the
        token attends to from the next layer on."""
        forward = self._forward
        if forward is None or not bool(forward.decode.any()):
            return
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        embeddings = kwargs["position_embeddings"]
        cache = kwargs.get(CACHE_ARGUMENT)
        self._follow(cache)
        keys = cache.layers[self.rule.layer - 1].keys if cache is not None else None
        batch, length = forward.decode.shape
        rows = [forward.decode[b].nonzero().squeeze(1) for b in range(batch)]
        queries = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=-1)
        attention = attention_rows(module, self._rotary, hidden, embeddings, queries, kwargs.get("attention_mask"), keys)
        blocked = torch.zeros(batch, length, forward.past + length, dtype=torch.bool, device=hidden.device)
        held = forward.held
        for b, positions in enumerate(rows):
            # each decode token's rows by its layer-0 column: the token before one is the previous column, which
            # assisted decoding's crops may have taken off with its rejected drafts (then: a prompt token, none)
            rows_of = dict(held.before[b])
            for number, position in enumerate(positions.tolist()):
                column = forward.past + position
                before = rows_of.get(column - 1, [None] * len(held.images[b]))
                now = [attention[b, number, columns.to(attention.device)] for columns in held.images[b]]
                for image, columns in enumerate(held.images[b]):
                    kept = self.method.decode_step(now[image], before[image], held.totals[b][image])
                    if kept is not None:
                        dropped = torch.ones(len(columns), dtype=torch.bool, device=blocked.device)
                        dropped[kept.to(blocked.device)] = False
                        blocked[b, position, columns.to(blocked.device)[dropped]] = True
                rows_of[column] = now
            held.before[b] = {column: now for column, now in rows_of.items() if column >= forward.past}
        forward.blocked = blocked

    # last_stage

    def _first_layer(self, module, args, kwargs):
        """The first evicted layer: after an eviction it holds what the last stage kept, and its mask maps onto that;
        then the decode tokens' rows are blocked as any evicted layer's."""
        forward = self._forward
        if forward is None:
            return None
        columns = self._first_columns(kwargs)
        kwargs = dict(kwargs)
        if columns is not None:
            mask = kwargs.get("attention_mask")
            keys = forward.past + forward.length
            if mask is None:
                mask = full_causal_mask(self.config, columns.shape[0], forward.length, keys, columns.device,
                                        kwargs["position_embeddings"][0].dtype)
            kwargs["attention_mask"] = mapped_mask(mask, None, columns, keys)
        forward.first = columns
        return self._block(self._first, module, args, kwargs, columns)

    def _first_columns(self, kwargs) -> torch.Tensor | None:
        """The layer-0 columns the first evicted layer holds with this forward's tokens (None: every one)."""
        forward, cache = self._forward, kwargs.get(CACHE_ARGUMENT)
        held = forward.held
        if held is None or held.first is None:
            return None
        stored = cache.get_seq_length(self._first)  # assisted decoding crops the last tokens of every layer
        state = held.first
        if stored < state.columns.shape[1]:
            state = held.first = LayerState(state.columns[:, :stored], state.dropped)
        batch = state.columns.shape[0]
        own = torch.arange(forward.length, device=state.columns.device).expand(batch, -1) + forward.past
        columns = torch.cat([state.columns, own], dim=1)
        held.first = LayerState(columns, state.dropped)
        return columns

    def _evict(self, module, args, kwargs) -> None:
        """At the layer after the method's last stage: remember what it kept of each prompt's images, and cut the
        earlier layers' caches to it."""
        forward = self._forward
        if forward is None or not forward.images:
            return
        for row, prompt in enumerate(forward.prompts):
            kept = [image.record.kept.clone() for image in forward.images if image.row == row]
            self._memory[prompt] = kept
            self._memory.move_to_end(prompt)
        while len(self._memory) > self.MEMORY:
            self._memory.popitem(last=False)
        cache = kwargs.get(CACHE_ARGUMENT)
        self._follow(cache)
        states = self._layers.cache_states(cache)
        final = states[self._last_index] if states is not None else None
        if final is None:  # nothing was dropped
            return
        for layer in range(self._first, self._last):
            held = self._layer_columns(layer, states, final.columns.shape[0])
            # each final column's slot in the layer (columns ascend along a row, padding's -1 first); a padding slot
            # of the final state takes any slot, which its mask blocks
            slots = torch.searchsorted(held.contiguous(), final.columns.contiguous()).clamp(max=held.shape[1] - 1)
            stored = cache.layers[layer]
            at = slots[:, None, :, None].expand(-1, stored.keys.shape[1], -1, stored.keys.shape[-1])
            stored.keys, stored.values = stored.keys.gather(2, at), stored.values.gather(2, at)
        for index in range(self._last_index):
            states[index] = LayerState(final.columns, final.dropped)
        forward.held.first = LayerState(final.columns, final.dropped)

    def _layer_columns(self, layer: int, states: list, batch: int) -> torch.Tensor:
        """The layer-0 columns ``layer`` holds after this forward (before the eviction)."""
        forward = self._forward
        everything = torch.arange(forward.past + forward.length).expand(batch, -1)
        if layer < self._layers.stages[0].layer:
            return forward.first if forward.first is not None else everything.to(states[self._last_index].columns.device)
        stage = max(index for index, stage in enumerate(self._layers.stages) if stage.layer <= layer)
        state = next((states[index] for index in range(stage, -1, -1) if states[index] is not None), None)
        return state.columns if state is not None else everything.to(states[self._last_index].columns.device)

    def _remembered_blocks(self, images: list[PendingImage], decode: torch.Tensor, past: int) -> torch.Tensor:
        """A forward that re-reads a scored prompt with tokens after it: those tokens' rows block, in the evicted
        layers, the image tokens the prompt's last stage dropped (the forward's own last stage comes later)."""
        batch, length = decode.shape
        blocked = torch.zeros(batch, length, past + length, dtype=torch.bool, device=decode.device)
        for row, prompt in enumerate(self._forward.prompts):
            own = [image for image in images if image.row == row]
            if not own or not bool(decode[row].any()):
                continue
            kept = self._memory.get(prompt)
            if kept is None or len(kept) != len(own):  # a prompt not scored before: assisted decoding's drafts follow it
                raise ValueError(
                    f"{self.method.name} (decode=True) evicts the KV cache to what its last stage keeps, but this forward "
                    f"has tokens after a prompt it has not scored (assisted decoding's draft tokens, verified in the "
                    f"prefill), which would attend the image tokens before that stage selects: generate without "
                    f"assistant_model or prompt_lookup_num_tokens, or pass decode=False")
            for image, final in zip(own, kept):
                dropped = ~torch.isin(image.raster.to(final.device), final)
                columns = image.positions[dropped.to(image.positions.device)] + past
                blocked[row, decode[row].nonzero().squeeze(1)[:, None], columns.to(decode.device)[None, :]] = True
        return blocked

    # both

    def _follow(self, cache) -> None:
        """A cache the decoder made itself (a forward called without one) is followed from its first layer on."""
        if cache is not None and self._forward.held is not None:
            self._held.setdefault(cache, self._forward.held)

    def _new_images(self, held: _Held | None, images: list[PendingImage], batch: int, past: int) -> _Held:
        """A prefill's images join what the cache's rows hold (per_step: their layer-0 columns)."""
        held = held if held is not None else _Held()
        if len(held.images) != batch:
            held.images, held.totals = [[] for _ in range(batch)], [[] for _ in range(batch)]
        for image in images:
            held.images[image.row].append(image.positions + past)
            held.totals[image.row].append(image.record.before)
        held.before = [{} for _ in held.images]
        return held

    def _block(self, layer: int, module, args, kwargs, columns: torch.Tensor | None = None):
        """The decode tokens' rows of this layer's mask block what the rule left out for them."""
        forward = self._forward
        if forward is None or forward.blocked is None:
            return (args, kwargs) if columns is not None else None
        plan = self._layers.current_plan() if self._layers is not None and layer >= self._layers.stages[0].layer else None
        index = plan.index if plan is not None else None
        if plan is not None:
            columns = plan.columns
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        batch, width = hidden.shape[:2]
        keys = forward.past + forward.length
        if columns is None:
            columns = torch.arange(keys, device=hidden.device).expand(batch, -1)
        blocked = forward.blocked
        if index is not None:
            blocked = blocked.gather(1, index[:, :, None].expand(-1, -1, blocked.shape[2]))
        blocked = blocked.gather(2, columns.clamp(min=0)[:, None, :].expand(-1, width, -1)) & (columns >= 0)[:, None, :]
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = full_causal_mask(self.config, batch, width, columns.shape[1], hidden.device,
                                    kwargs["position_embeddings"][0].dtype)
        blocked_value = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
        mask = mask.expand(batch, -1, -1, -1).masked_fill(blocked[:, None], blocked_value)
        return args, {**kwargs, "attention_mask": mask}


@dataclass
class _Forward:
    """One forward as the decode stage sees it."""

    images: list[PendingImage]
    decode: torch.Tensor  # (batch, length) the decode tokens among this forward's decoder-input positions
    past: int  # layer-0 columns the cache held before it
    length: int
    held: _Held | None
    prompts: list  # each row's prompt key (PromptQueries.last), for a forward with images
    blocked: torch.Tensor | None = None  # (batch, length, past + length) what each token may not attend to
    first: torch.Tensor | None = None  # last_stage: the first evicted layer's columns this forward


def partial_hook(function):
    """A pre-hook maker binding its layer number."""
    return lambda layer: (lambda module, args, kwargs: function(layer, module, args, kwargs))


def decode_rules(sieves, n_layers: int) -> list[tuple[Sieve, DecodeRule]]:
    """The methods of a chain that act at decode steps, with their rules."""
    return [(sieve, rule) for sieve in sieves if sieve is not None and (rule := sieve.decode_rule(n_layers)) is not None]


def _refuse(method: Sieve, rule: DecodeRule, decoder: nn.Module, layers: LayerPruning | None, n_layers: int) -> None:
    """Everything that can refuse a decode rule, before its first hook."""
    if rule.kind not in RULES:
        raise ValueError(f"{method.name}'s decode rule {rule.kind!r} is none of {', '.join(RULES)}")
    implementation = decoder.config._attn_implementation
    if implementation not in ("sdpa", "eager"):
        raise ValueError(f"{method.name} masks what each decode token attends to, which needs the decoder's attention in "
                         f"sdpa or eager, not {implementation!r}: load the model with attn_implementation='sdpa'")
    if rule.kind == "last_stage":
        stages = layers.stages if layers is not None else []
        if not stages or stages[0].method is not method:
            raise ValueError(f"{method.name} evicts from its first stage's layers on after the prefill: chain it before "
                             f"other in-LLM methods")
        if any(stage.sieve.freezes or stage.sieve.restores for stage in stages):
            raise ValueError(f"{method.name} evicts from the KV cache after the prefill: chain it without methods that "
                             f"freeze or restore tokens")
        return
    if layers is not None:
        names = "+".join(stage.method.name for stage in layers.stages)
        raise ValueError(f"{method.name} picks each decode token's image tokens from the decoder's whole cache, so it "
                         f"cannot follow {names}, which prunes inside the LLM: chain it with methods before the LLM")
    if not 1 <= rule.layer < n_layers:
        raise ValueError(f"{method.name} prunes the KV cache from layer {rule.layer} on, but this language model has "
                         f"{n_layers} layers: pass a layer from 1 to {n_layers - 1}")


def _check_cache(cache, method: Sieve) -> None:
    layers = getattr(cache, "layers", None) if cache is not None else []
    others = [layer for layer in layers or () if type(layer) is not DynamicLayer]
    if not others:
        return
    # A sliding-window layer comes from the model's own config (no generate() option removes it); a static one
    # from the caller's cache_implementation or cache.
    remedy = ("a model with sliding-window attention layers cannot serve it; apply a method that acts before "
              "or inside the prefill only" if all(type(layer) is DynamicSlidingWindowLayer for layer in others) else
              "generate without cache_implementation inside the apply() block")
    kinds = ", ".join(sorted({type(layer).__name__ for layer in others}))
    raise ValueError(f"{method.name} acts on the KV cache at decode steps, and needs the default dynamic cache of "
                     f"full-attention layers, not a {type(cache).__name__} with {kinds} layers: {remedy}")
