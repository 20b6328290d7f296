"""``apply`` / ``attach`` / ``observe``: hook a stock model so a method's stages reduce its image tokens: inside
the vision tower (an ``in_vision`` sieve, ``vision_stage.VisionMerging``), before the LLM (a ``pre_llm``
sieve, here), and between decoder layers (``in_llm`` stages, ``layer_pruning.LayerPruning``).

One set of hooks serves every family (the adapter says where things are):

- a pre-hook on the vision tower opens a capture of the signals the sieve asked for;
- a pre-hook on the model reads how many trailing tokens the call asks logits for (assisted
  decoding's drafts follow the prompt);
- a pre-hook on the inner model reads ``input_ids`` or ``inputs_embeds`` (to find the image tokens)
  and, when a pruned cache is continued, drops the prompt tokens the cache already holds (after
  following any crop of the cache, as assisted decoding makes after rejected drafts);
- a pre-hook on the text decoder keeps one token per group an in_vision stage merged and runs the
  pre-LLM sieve on each image's tokens, then gathers the kept
  tokens' embeddings, original positions and mask (rows of a batch may keep different counts:
  shorter rows are left-padded and masked), and at later steps maps the caller's mask, which
  still has the unpruned length, onto what the cache holds;
- a post-hook on the inner model refuses a forward that carried images the sieve never saw.

Kept tokens keep their original positions, so decode positions stay those of the unpruned
sequence. The model's weights, modules and attention implementation are never changed. A static cache
(pre-LLM stages only) and compiled forwards (refused): tokensieve/static_cache.py.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from .adapters import ImageSlot, PlaceholderMismatch, VisionCapture, adapter_for
from .adapters.base import ENGINE_SIGNALS
from .chain import Chain
from .compat import CACHE_ARGUMENT, cache_length, output_cache
from .flops import decoder_prefill_flops
from .layer_pruning import LayerPruning, PendingImage, PromptQueries
from .registry import servable_methods
from .selection import left_packed
from .sieve import Sieve, VisualTokens, timed_select
from .signals import Signal, instruction_positions, requests_of
from .static_cache import flat_mask_for_static_cache, refuse_compiled_model, refuse_static_cache_with_in_llm, refuse_tracing
from .stats import ImageRecord, RunStats, StageRecord
from .vision_stage import MergedImage, VisionMerging
from .vision_flops import VisionPasses, vision_modules

_HOOKED_MODELS: weakref.WeakSet = weakref.WeakSet()
#: what each pruned cache holds, so later forwards (decode steps, a second turn) line up with it
_CACHE_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class CacheState:
    logical_length: int  # tokens of the unpruned sequence the cache stands for
    mask: torch.Tensor  # (batch, cached) 2D mask over what the cache physically holds
    pruned: torch.Tensor  # (batch,) real tokens removed so far, per row


def _cache_state(cache) -> CacheState | None:
    """What a pruned cache holds now. Assisted and prompt-lookup decoding crop the cache after rejected
    candidates (``cache.crop(-n)`` takes the last n tokens off every layer, which are never pruned ones):
    the state follows by dropping as many of its last tokens."""
    state = _CACHE_STATES.get(cache) if cache is not None else None
    if state is None:
        return None
    held = cache_length(cache)
    if held == 0:  # emptied (a StaticCache's reset() before it is passed in again): it stands for nothing now
        del _CACHE_STATES[cache]
        return None
    cropped = state.mask.shape[1] - held
    if cropped > 0:
        state = CacheState(state.logical_length - cropped, state.mask[:, :-cropped], state.pruned)
        _CACHE_STATES[cache] = state
    return state


@dataclass
class _Call:
    inputs: dict  # the inner model's keyword inputs
    images_pending: bool
    candidates: int = 0  # tokens at the end of each row that follow the prompt (assisted decoding's drafts)


def _has_images(kwargs: dict) -> bool:
    encoded = kwargs.get("mm_encoder_outputs") or {}
    return kwargs.get("pixel_values") is not None or encoded.get("image") is not None


def _copy_counts(kwargs: dict, placeholders: torch.Tensor) -> list[int]:
    """How many times generate() may have repeated each prompt's row (beams, return sequences): every
    e > 1 that splits the batch into groups of e rows with the same image ``placeholders`` (batch, length),
    largest first. Only when the image features were encoded before the call, since generate() repeats them
    after encoding. (Copies differ in the tokens each has generated, so only the placeholders are compared.)"""
    if not (kwargs.get("mm_encoder_outputs") or {}).get("image"):
        return []
    batch = placeholders.shape[0]
    return [e for e in range(batch, 1, -1)
            if batch % e == 0 and bool((placeholders.view(batch // e, e, -1) == placeholders[::e].unsqueeze(1)).all())]


def _cache_bytes(cache) -> int:
    """Bytes of every layer's key and value tensors in ``cache`` (each layer at the length it holds)."""
    layers = getattr(cache, "layers", None) or ()
    return sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values)
               if isinstance(t, torch.Tensor))


@dataclass
class _Selected:
    """What the stages before the LLM kept of one image: indices into its tokens, the pre-LLM sieve's time,
    the features that replace kept tokens' own (merging sieves), and what an in_vision stage merged."""

    kept: torch.Tensor
    seconds: float
    features: torch.Tensor | None = None
    merged: MergedImage | None = None
    assignment: torch.Tensor | None = None  # the pre-LLM sieve's merge map, if any


class _Observer:
    """What a run without a method applies (``ts.observe``): nothing. The stock forward runs untouched and
    ``run.stats`` records it: every image kept, FLOPs with and without "the reduction" equal."""

    name = "observe"

    def __repr__(self) -> str:
        return "observe"


OBSERVER = _Observer()


class Run:
    """Hooks of one sieve on one model; ``stats`` records what they did. Use as a context manager
    (``with ts.apply(model, sieve) as run``) or call :meth:`remove` (``ts.attach``). Without a method
    (``ts.observe(model)``) the hooks change nothing and only record.

    ``vision_flops=True`` also counts the vision tower's and projector's FLOPs (``stats.vision_flops``,
    replayed on their inputs when the run is removed: tokensieve/vision_flops.py)."""

    def __init__(self, model: nn.Module, method: Sieve | Chain | None = None, *, vision_flops: bool = False):
        chain = method if isinstance(method, Chain) or method is None else Chain(method)
        adapter = adapter_for(model)
        self.vision, self.pre, self.in_llm = (chain.vision, chain.pre, chain.in_llm) if chain is not None else (None, None, ())
        self._observing = chain is None  # nothing to remove: every hook only records
        self._requests = requests_of(self.pre) if self.pre is not None else ()
        for sieve in (self.vision, self.pre):
            missing = adapter.missing_signals(requests_of(sieve)) if sieve is not None else {}
            if missing:
                reasons = "; ".join(f"{name}: {why}" for name, why in missing.items())
                raise ValueError(
                    f"{sieve.name} needs signals {type(model).__name__} cannot give ({reasons}). Use a method "
                    f"that needs none of them, such as {', '.join(servable_methods(adapter))} (see `tokensieve methods`)"
                )
        if self.vision is not None and self._requests:
            raise ValueError(
                f"after {self.vision.name} merges inside the vision tower, {self.pre.name} would read signals "
                f"({', '.join(map(str, self._requests))}) of the unmerged tower: chain {self.vision.name} with a "
                f"pre-LLM method that needs no signals (divprune, uniform, tome, random) or with in-LLM methods"
            )
        refuse_compiled_model(model, {"inner": adapter.inner, "decoder": adapter.decoder, "vision_tower": adapter.vision_tower},
                              (method if method is not None else OBSERVER).name)
        if model in _HOOKED_MODELS:
            raise RuntimeError(
                f"{type(model).__name__} already has a tokensieve method applied: exit that apply() block "
                f"(or call .remove() on its handle) before applying another"
            )
        self.model, self.sieve, self.adapter = model, method if method is not None else OBSERVER, adapter
        self.removed = False
        self.stats = RunStats()
        self._text_config = model.config.get_text_config()
        self._capture = VisionCapture()
        self._call: _Call | None = None
        self._candidates = 0
        self._prompts = PromptQueries()
        self._layers: LayerPruning | None = None
        self._merging: VisionMerging | None = None
        self._vision: VisionPasses | None = None
        self._kv_before: int | None = None  # the cache's bytes before a prefill's decoder call
        self._handles = [
            adapter.vision_tower.register_forward_pre_hook(self._open_capture, with_kwargs=True),
            adapter.vision_tower.register_forward_hook(self._check_placeholders),
            adapter.inner.register_forward_pre_hook(self._before_inner, with_kwargs=True),
            # always_call: a forward that raised (a refused input) still ends its call, so the next one starts clean
            adapter.inner.register_forward_hook(self._after_inner, with_kwargs=True, always_call=True),
            adapter.decoder.register_forward_pre_hook(self._before_decoder, with_kwargs=True),
            model.register_forward_pre_hook(self._before_model, with_kwargs=True),
            # prepend: it reads the cache and whether the call has images before _before_decoder acts on them
            adapter.decoder.register_forward_pre_hook(self._cache_before, with_kwargs=True, prepend=True),
            adapter.decoder.register_forward_hook(self._cache_after, with_kwargs=True),
        ]
        try:
            if vision_flops:
                self._vision = VisionPasses(vision_modules(adapter), repr(self.vision) if self.vision is not None else None)
            self._handles += adapter.install_signal_hooks(self._requests, self._capture)
            if self.vision is not None:
                self._merging = VisionMerging(self.vision, adapter.vision_tower, *adapter.merge_layout())
            if self.in_llm:
                self._layers = LayerPruning(self.in_llm, adapter.decoder, self.stats)
        except Exception:
            self.remove()
            raise
        _HOOKED_MODELS.add(model)

    def remove(self) -> None:
        """Take every hook off; the model is as it was before. Safe to call twice."""
        for handle in self._handles:
            handle.remove()
        if self._layers is not None:
            self._layers.remove()
        self._handles, self._layers = [], None
        self._call = None
        self._capture.reset()
        _HOOKED_MODELS.discard(self.model)
        self.removed = True
        if self._vision is not None:  # replayed now that no hook of the run can fire (or count)
            vision, self._vision = self._vision, None
            vision.remove()
            self.stats.vision_flops = vision.count()  # an in_vision stage's merges still act: they are counted
        if self._merging is not None:
            self._merging.remove()
            self._merging = None

    def __enter__(self) -> Run:
        if self.removed:  # its hooks are gone: a second `with` would run the stock model, silently
            raise RuntimeError(
                f"this {self.sieve.name} handle was removed (its with-block exited, or .remove() was called), "
                f"so {type(self.model).__name__} is unpruned again: apply the method anew, "
                f"`with ts.apply(model, sieve) as run:`, once per block"
            )
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None and self._vision is not None:  # the block failed: count nothing, replay nothing
            self._vision.remove()
            self._vision = None
        self.remove()

    def __deepcopy__(self, memo):
        # reached through the hooks when a hooked model is deep-copied: the copy would stay pruned after
        # the block, escape the one-method-per-model check, and keep its hooks after .remove()
        raise RuntimeError(
            f"copy.deepcopy of a {type(self.model).__name__} while a tokensieve method is applied would copy its "
            f"hooks: copy the model before ts.apply() or after the with-block (or .remove())"
        )

    def __repr__(self) -> str:
        state = "removed" if self.removed else "active"
        return f"<Run {self.sieve!r} on {type(self.model).__name__}, {state}: {self.stats.summary()}>"

    # hooks

    def _before_model(self, module, args, kwargs) -> None:
        refuse_tracing(self.sieve.name)  # torch.compile(model), generate()'s compiled decode steps
        self._refuse_labels_with_images(kwargs)
        # the prompt ends where the caller starts reading predictions: assisted decoding's prefill asks for the
        # logits of its draft tokens too (logits_to_keep = drafts + 1), and plain generate() for the last token's
        wanted = kwargs.get("logits_to_keep")
        self._candidates = wanted - 1 if isinstance(wanted, int) and wanted > 1 else 0

    def _refuse_labels_with_images(self, kwargs: dict) -> None:
        if kwargs.get("labels") is not None and _has_images(kwargs) and not self._observing:
            raise ValueError(
                f"labels with images inside apply(): {self.sieve.name} drops visual tokens, so the logits no longer "
                f"line up with the labels. Compute the loss outside the with-block, or without labels here"
            )

    def _open_capture(self, module, args, kwargs) -> None:
        self.adapter.open_capture(self._capture, args, kwargs)

    def _check_placeholders(self, *hook_args) -> None:
        """Once both the image inputs and the placeholder tokens are known, check that they agree, so
        a mismatch gets tokensieve's message (what to change) rather than a failure deep inside."""
        if self._call is not None and self._call.images_pending:
            self._slots(self._call.inputs)

    def _slots(self, inputs: dict) -> list[ImageSlot]:
        """Every image of the call. generate() with beams or several return sequences encodes each image
        once and then repeats each prompt's row and features: the images are then found on each prompt's
        first row and their slots repeated onto its copies, so that every copy keeps the same tokens."""
        try:
            return self.adapter.slots(inputs, self._capture)
        except PlaceholderMismatch:
            for copies in _copy_counts(inputs, self.adapter.placeholder_mask(inputs)):
                first_rows = {name: inputs[name][::copies] for name in ("input_ids", "inputs_embeds") if inputs.get(name) is not None}
                try:
                    firsts = self.adapter.slots({**inputs, **first_rows}, self._capture)
                except PlaceholderMismatch:
                    continue
                return [ImageSlot(slot.row * copies + copy, slot.positions, slot.grid, slot.image, slot.blocks)
                        for slot in firsts for copy in range(copies)]
            raise

    def _before_inner(self, module, args, kwargs):
        refuse_tracing(self.sieve.name)  # torch.compile(model.forward)
        self._call = None
        if args:  # some wrappers pass input_ids by position (LLaVA-NeXT): name every input
            kwargs = {**inspect.signature(module.forward).bind_partial(*args).arguments, **kwargs}
            args = ()
        self.adapter.complete_aligned_inputs(kwargs)
        self.adapter.check_inputs(kwargs)
        has_images = _has_images(kwargs)
        if has_images and kwargs.get("input_ids") is None and self._layers is not None:
            raise ValueError(
                f"{'+'.join(s.name for s in self.in_llm)} scores images with the attention of the prompt's last token and recognises a "
                f"prompt by its token ids: pass input_ids (not inputs_embeds) together with the images, or use a "
                f"pre-LLM method, which finds image tokens in inputs_embeds as the model does"
            )
        # a static cache serves pre-LLM methods and observing (tokensieve/static_cache.py), not in-LLM stages
        refuse_static_cache_with_in_llm(kwargs.get(CACHE_ARGUMENT), self._layers.stages if self._layers is not None else (), has_images)
        state = _cache_state(kwargs.get(CACHE_ARGUMENT))
        if state is not None and kwargs.get("input_ids") is not None:
            self._drop_cached_prefix(kwargs, state)
        if state is not None and kwargs.get("position_ids") is None:
            positions = self.adapter.continued_positions(kwargs, state.logical_length)
            if positions is not None:
                kwargs["position_ids"] = positions
        self._call = _Call(kwargs, has_images, self._candidates)
        self._candidates = 0  # read once: a direct call of the inner model has no logits_to_keep
        if has_images and kwargs.get("pixel_values") is None:  # features were encoded before this call
            self._check_placeholders()
        return args, kwargs

    def _after_inner(self, module, args, kwargs, output) -> None:
        call, self._call = self._call, None
        if output is None:  # the forward raised: forget its half-done state, and let its error through
            self._capture.reset()
            if self._layers is not None:
                self._layers.clear()
            return
        if call is not None and call.images_pending:
            raise RuntimeError(
                f"a forward carried images but {self.sieve.name} never ran: the {self.adapter.family} adapter's "
                f"decoder hook did not fire, so this transformers version changed how image tokens reach the LLM"
            )
        if self._layers is not None and self._layers.pending:
            missed = self._layers.stages[self._layers.stages_run]
            raise RuntimeError(
                f"a forward carried images but {missed.method.name} never ran: its hook on decoder layer "
                f"{missed.layer} did not fire, so this transformers version changed how the decoder calls its layers"
            )

    def _drop_cached_prefix(self, kwargs: dict, state: CacheState) -> None:
        """generate() continuing a pruned cache slices the prompt by the cache's (shorter) physical
        length, so the new input starts with tokens the cache already holds: drop them."""
        n_new = kwargs["input_ids"].shape[1]
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 2:
            overlap = state.logical_length + n_new - mask.shape[1]
        elif kwargs.get("position_ids") is not None:  # no 2D mask: none, or generate()'s prebuilt static-cache masks
            positions = kwargs["position_ids"]
            text_positions = self.adapter.text_positions(positions)
            # the row without left padding counts every column (a padded row's positions start lower)
            overlap = state.logical_length - int(text_positions[:, 0].max())
        else:
            overlap = 0
        if overlap <= 0:
            return
        for name in ("input_ids", "position_ids", *self.adapter.aligned_inputs):
            if kwargs.get(name) is not None:
                kwargs[name] = kwargs[name][..., overlap:]

    def _before_decoder(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return None
        cache = kwargs.get(CACHE_ARGUMENT)
        state = _cache_state(cache)
        call = self._call
        slots = []
        if call is not None and call.images_pending:
            call.images_pending = False
            slots = self._slots(call.inputs)
        batch, length = embeds.shape[:2]
        mask = kwargs.get("attention_mask")
        flat = mask is None or (isinstance(mask, torch.Tensor) and mask.ndim == 2)
        own_mask = mask[:, -length:] if mask is not None and flat else torch.ones(batch, length, dtype=torch.long, device=embeds.device)
        if not slots and state is None:
            self._hand_over([], [], own_mask, None, None, None, cache)
            return None
        if not flat:  # generate() built the masks ahead for a static cache: read the 2D mask back from them
            mask = flat_mask_for_static_cache(mask, cache, state is not None, batch, length, embeds.device)
            own_mask = mask[:, -length:]
        if state is None and cache is not None and cache_length(cache) > 0:
            past = cache_length(cache)
            past_mask = mask[:, :past] if mask is not None else embeds.new_ones(batch, past, dtype=torch.long)
            state = CacheState(past, past_mask, torch.zeros(batch, dtype=torch.long))
        past_logical = state.logical_length if state is not None else 0
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = (torch.arange(length, device=embeds.device) + past_logical).unsqueeze(0)
        queries = self._prompt_ends(call, embeds, slots, own_mask) if slots and (self._layers or self._wants_text) else None
        keep, replacements, records = self._select(slots, embeds, own_mask, queries)
        pruned_before = state.pruned if state is not None else torch.zeros(batch, dtype=torch.long)
        # the observer never prunes, so a cache it sees holds every token: the stock input as it is
        if keep.all() and not replacements and (state is None or self._observing):
            if slots:
                self._count_flops(own_mask.sum(1), own_mask.sum(1), state, pruned_before)
            past = cache_length(cache)
            past_mask = mask[:, :past] if mask is not None else own_mask.new_ones(batch, past)
            self._hand_over(slots, records, own_mask, None, queries, past_mask, cache)
            return None  # nothing removed before the LLM: the stock decoder input, bit for bit
        if replacements:
            embeds = embeds.clone()
            for row, where, features in replacements:
                embeds[row, where] = features.to(embeds.dtype)
        index, kept_mask = left_packed(keep, own_mask)
        embeds = embeds.gather(1, index.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
        if positions.ndim == 2:
            positions = positions.expand(batch, -1).gather(1, index)
        else:  # multi-row rotary positions (mrope): (rows, batch, length)
            positions = positions.expand(-1, batch, -1).gather(2, index.unsqueeze(0).expand(positions.shape[0], -1, -1))
        full_mask = torch.cat([state.mask, kept_mask], dim=1) if state is not None else kept_mask
        removed = own_mask.sum(1) - kept_mask.sum(1)
        if slots:
            self._count_flops(own_mask.sum(1), kept_mask.sum(1), state, pruned_before)
        use_cache = kwargs.get("use_cache")
        if cache is None and (use_cache if use_cache is not None else module.config.use_cache):
            cache = DynamicCache(config=module.config)
        if cache is not None:
            _CACHE_STATES[cache] = CacheState(past_logical + length, full_mask, pruned_before + removed.cpu())
        self._hand_over(slots, records, kept_mask, (keep, index), queries, state.mask if state is not None else None, cache)
        kwargs.update(inputs_embeds=embeds, position_ids=positions, attention_mask=full_mask, **{CACHE_ARGUMENT: cache})
        return args, kwargs

    def _hand_over(self, slots, records, own_mask, packing, queries, past_mask, cache) -> None:
        """Tell the in-LLM stages (if any) where this forward's images and query tokens sit at the decoder
        input: their original positions, or where the pre-LLM gather (``packing``: keep mask, index) put
        them; ``own_mask`` and ``past_mask`` are the decoder's 2D masks of this forward and of its cache."""
        if self._layers is None:
            return
        if packing is None:
            pending = [PendingImage(r, s.row, s.positions[r.kept], r.kept) for r, s in zip(records, slots)]
            self._layers.begin(pending, queries, own_mask, past_mask, cache)
            return
        keep, index = packing
        # each kept token's slot in the left-padded packing (left_packed), -1 where a token was dropped
        first_slot = index.shape[1] - keep.sum(1, keepdim=True)
        moved = torch.where(keep, first_slot + keep.cumsum(1) - 1, -1)
        pending = [PendingImage(r, s.row, moved[s.row, s.positions[r.kept]], r.kept) for r, s in zip(records, slots)]
        queries = moved.gather(1, queries.unsqueeze(1)).squeeze(1) if queries is not None else None
        self._layers.begin(pending, queries, own_mask, past_mask, cache)

    @property
    def _wants_text(self) -> bool:
        return any(request.name == "text_embeddings" for request in self._requests)

    def _prompt_ends(self, call: _Call, embeds: torch.Tensor, slots, own_mask: torch.Tensor) -> torch.Tensor:
        """(batch,) position of each row's prompt's last token: the query of in-LLM methods and the end of the
        instruction of ``text_embeddings``. A row that continues a prompt already scored with the same image
        features keeps that prompt's end (``PromptQueries``), so a no-cache loop or a fresh prefill of a longer
        conversation selects as the cached run did. Without input_ids: each row's last real token."""
        if call.inputs.get("input_ids") is not None:
            return self._prompts.query_positions(call.inputs, embeds, slots, own_mask, call.candidates)
        real = own_mask.bool()
        last = real.shape[1] - 1 - real.flip(1).long().argmax(1)
        return (last - call.candidates).clamp(min=0)

    def _select(self, slots, embeds: torch.Tensor, own_mask: torch.Tensor | None = None,
                prompt_ends: torch.Tensor | None = None) -> tuple[torch.Tensor, list, list[ImageRecord]]:
        """Run the pre-LLM sieve on every image (none: keep them all); return the (batch, length) keep
        mask, merged features and each slot's record (one per image: a repeated row's copies share it).
        ``own_mask`` and ``prompt_ends`` (each row's prompt's last position) place ``text_embeddings``."""
        keep = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        replacements = []
        call_index = self.stats.calls
        if slots:  # one read back to the host for every image of the call
            finite = torch.stack([torch.isfinite(embeds[slot.row, slot.positions]).all() for slot in slots]).tolist()
            for slot, ok in zip(slots, finite):
                if not ok:
                    raise ValueError(
                        f"image {slot.image} has non-finite visual features (NaN or inf): check its pixel_values "
                        f"and the model's dtype"
                    )
        selected: dict[int, _Selected] = {}  # image -> its selection: the copies of a repeated row reuse it
        for slot in slots:
            if slot.image not in selected:
                text = self._instruction(slot, slots, embeds, own_mask, prompt_ends) if self._wants_text else None
                selected[slot.image] = self._select_image(slot, embeds[slot.row, slot.positions], text)
            chosen = selected[slot.image]
            if self.pre is not None or self.vision is not None:
                keep[slot.row, slot.positions] = False
                keep[slot.row, slot.positions[chosen.kept]] = True
                if chosen.features is not None:
                    replacements.append((slot.row, slot.positions[chosen.kept], chosen.features))
        if not slots:
            return keep, replacements, []
        first_slots = {slot.image: slot for slot in reversed(slots)}
        on_host = torch.cat([chosen.kept for chosen in selected.values()]).cpu().split([len(c.kept) for c in selected.values()])
        records = {}
        for (image, chosen), kept in zip(selected.items(), on_host):
            slot, merged = first_slots[image], chosen.merged
            seconds = chosen.seconds + (merged.seconds if merged is not None else 0.0)
            record = records[image] = ImageRecord(call_index, slot.row, len(slot.positions), len(kept), kept, slot.grid, seconds)
            if merged is not None:
                record.stages.append(StageRecord(self.vision.name, "in_vision", None, len(merged.kept), merged.kept,
                                                 merged.seconds, merged.sizes, merged.assignment))
            if self.pre is not None:
                assignment = chosen.assignment.cpu() if chosen.assignment is not None else None
                sizes = torch.bincount(assignment[assignment >= 0], minlength=len(kept)) if assignment is not None else None
                record.stages.append(StageRecord(self.pre.name, "pre_llm", None, len(kept), kept, chosen.seconds, sizes, assignment))
        self.stats.images.extend(records.values())
        self.stats.calls += 1
        return keep, replacements, [records[slot.image] for slot in slots]

    def _instruction(self, slot: ImageSlot, slots, embeds: torch.Tensor, own_mask: torch.Tensor,
                     prompt_ends: torch.Tensor) -> torch.Tensor:
        """``text_embeddings`` of one image: the decoder-input rows (the LLM's own input embeddings) of its
        instruction tokens, by the rule of ``signals.instruction_positions``."""
        placeholders = torch.zeros(embeds.shape[1], dtype=torch.bool, device=embeds.device)
        for other in slots:
            if other.row == slot.row:
                placeholders[other.positions] = True
        bounds = torch.stack([slot.positions[-1], prompt_ends[slot.row].to(slot.positions.device)]).tolist()
        positions = instruction_positions(own_mask[slot.row], placeholders, *bounds)
        return embeds[slot.row, positions]

    def _select_image(self, slot: ImageSlot, features: torch.Tensor, text: torch.Tensor | None = None) -> _Selected:
        """One image's selection: the tokens an in_vision stage left (one per merged group), then the pre-LLM
        sieve among them (none: keep them all)."""
        merged = self._merging.images[slot.image] if self._merging is not None else None
        if merged is not None:
            groups = merged.kept.to(features.device)
            if self.pre is None:
                return _Selected(groups, 0.0, None, merged)
            selection, seconds = timed_select(self.pre, VisualTokens(features[groups], (1, len(groups))))
            return _Selected(groups[selection.kept], seconds, selection.merged(features[groups]), merged, selection.assignment)
        if self.pre is None:
            return _Selected(torch.arange(len(features), device=features.device), 0.0, None)
        signals = self.adapter.image_signals(
            tuple(r for r in self._requests if r.name not in ENGINE_SIGNALS), self._capture, slot.image
        )
        if text is not None:
            signals[Signal("text_embeddings")] = text
        selection, seconds = timed_select(self.pre, VisualTokens(features, slot.grid, signals, slot.blocks))
        return _Selected(selection.kept, seconds, selection.merged(features), assignment=selection.assignment)

    def _cache_before(self, module, args, kwargs) -> None:
        """Before the decoder hook consumes the call's images: a prefill (a call with images) notes the bytes
        its cache holds, so that ``_cache_after`` records what it added."""
        images = self._call is not None and self._call.images_pending
        self._kv_before = _cache_bytes(kwargs.get(CACHE_ARGUMENT)) if images else None

    def _cache_after(self, module, args, kwargs, output) -> None:
        before, self._kv_before = self._kv_before, None
        if before is not None:
            self.stats.kv_bytes += _cache_bytes(output_cache(output)) - before

    def _count_flops(self, real_before, real_after, state, pruned_before) -> None:
        past_after = state.mask.sum(1).tolist() if state is not None else [0] * len(real_after)
        past_before = [p + d for p, d in zip(past_after, pruned_before.tolist())]
        config = self._text_config
        self.stats.prefill_flops += decoder_prefill_flops(config, real_after.tolist(), past_after)
        self.stats.prefill_flops_unreduced += decoder_prefill_flops(config, real_before.tolist(), past_before)


def attach(model: nn.Module, method: Sieve | Chain | None = None, *, vision_flops: bool = False) -> Run:
    """Apply ``method`` (a sieve or a chain; none: observe) to ``model`` until ``.remove()`` is called on the
    returned handle."""
    return Run(model, method, vision_flops=vision_flops)


def apply(model: nn.Module, method: Sieve | Chain | None = None, *, vision_flops: bool = False) -> Run:
    """Apply ``method`` (a sieve or a chain) to ``model`` for the duration of a ``with`` block::

        with ts.apply(model, ts.load("fastervlm", keep=64)) as run:
            out = model.generate(**inputs)
        print(run.stats)

    Without a method it observes (``ts.observe``). ``vision_flops=True``: count the vision side's FLOPs too.
    """
    return Run(model, method, vision_flops=vision_flops)


def observe(model: nn.Module, *, vision_flops: bool = False) -> Run:
    """Record what the stock model does, changing nothing: its forwards and ``generate()`` give the
    unhooked model's outputs bit for bit, and ``run.stats`` has what a method's run has (per image the grid
    and token count, kept = every token; the LLM prefill FLOPs, reduced = unreduced; the KV cache's bytes;
    with ``vision_flops=True`` the vision tower's and projector's FLOPs), so a baseline is measured the
    way a method is::

        with ts.observe(model) as run:
            out = model.generate(**inputs)
        print(run.stats.prefill_flops, run.stats.kv_bytes)
    """
    return Run(model, None, vision_flops=vision_flops)
