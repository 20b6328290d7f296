"""``apply`` / ``attach``: hook a stock model so a sieve prunes its image tokens before the LLM
(and, for an in-LLM sieve or a chain, hand the tokens to ``layer_pruning.LayerPruning``).

One set of hooks serves every family (the adapter says where things are):

- a pre-hook on the vision tower opens a capture of the signals the sieve asked for;
- a pre-hook on the model reads how many trailing tokens the call asks logits for (assisted
  decoding's drafts follow the prompt);
- a pre-hook on the inner model reads ``input_ids`` or ``inputs_embeds`` (to find the image tokens)
  and, when a pruned cache is continued, drops the prompt tokens the cache already holds (after
  following any crop of the cache, as assisted decoding makes after rejected drafts);
- a pre-hook on the text decoder runs the sieve on each image's tokens, then gathers the kept
  tokens' embeddings, original positions and mask (rows of a batch may keep different counts:
  shorter rows are left-padded and masked), and at later steps maps the caller's mask, which
  still has the unpruned length, onto what the cache holds;
- a post-hook on the inner model refuses a forward that carried images the sieve never saw.

Kept tokens keep their original positions, so decode positions stay those of the unpruned
sequence. The model's weights, modules and attention implementation are never changed.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from .adapters import ImageSlot, PlaceholderMismatch, VisionCapture, adapter_for
from .chain import Chain
from .compat import CACHE_ARGUMENT
from .flops import decoder_prefill_flops
from .layer_pruning import LayerPruning, PendingImage, PromptQueries
from .selection import left_packed
from .sieve import Sieve, VisualTokens, timed_select
from .stats import ImageRecord, RunStats

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
    cropped = state.mask.shape[1] - cache.get_seq_length()
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


class Run:
    """Hooks of one sieve on one model; ``stats`` records what they did. Use as a context manager
    (``with ts.apply(model, sieve) as run``) or call :meth:`remove` (``ts.attach``)."""

    def __init__(self, model: nn.Module, method: Sieve | Chain):
        chain = method if isinstance(method, Chain) else Chain(method)
        adapter = adapter_for(model)
        self.pre, self.inside = chain.pre, chain.inside
        missing = adapter.missing_signals(self.pre.signals) if self.pre is not None else {}
        if missing:
            reasons = "; ".join(f"{name}: {why}" for name, why in missing.items())
            raise ValueError(
                f"{self.pre.name} needs signals {type(model).__name__} cannot give ({reasons}). Use a method "
                f"that needs none of them, such as divprune, uniform or pool (see `tokensieve methods`)"
            )
        if model in _HOOKED_MODELS:
            raise RuntimeError(
                f"{type(model).__name__} already has a tokensieve method applied: exit that apply() block "
                f"(or call .remove() on its handle) before applying another"
            )
        self.model, self.sieve, self.adapter = model, method, adapter
        self.removed = False
        self.stats = RunStats()
        self._text_config = model.config.get_text_config()
        self._capture = VisionCapture()
        self._call: _Call | None = None
        self._candidates = 0
        self._prompts = PromptQueries()
        self._layers: LayerPruning | None = None
        self._handles = [
            adapter.vision_tower.register_forward_pre_hook(self._open_capture, with_kwargs=True),
            adapter.vision_tower.register_forward_hook(self._check_placeholders),
            adapter.inner.register_forward_pre_hook(self._before_inner, with_kwargs=True),
            # always_call: a forward that raised (a refused input) still ends its call, so the next one starts clean
            adapter.inner.register_forward_hook(self._after_inner, with_kwargs=True, always_call=True),
            adapter.decoder.register_forward_pre_hook(self._before_decoder, with_kwargs=True),
            model.register_forward_pre_hook(self._before_model, with_kwargs=True),
        ]
        try:
            self._handles += adapter.install_signal_hooks(self.pre.signals if self.pre is not None else (), self._capture)
            if self.inside is not None:
                self._layers = LayerPruning(self.inside, adapter.decoder, self.stats)
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

    def __enter__(self) -> Run:
        if self.removed:  # its hooks are gone: a second `with` would run the stock model, silently
            raise RuntimeError(
                f"this {self.sieve.name} handle was removed (its with-block exited, or .remove() was called), "
                f"so {type(self.model).__name__} is unpruned again: apply the method anew, "
                f"`with ts.apply(model, sieve) as run:`, once per block"
            )
        return self

    def __exit__(self, *exc) -> None:
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
        self._refuse_labels_with_images(kwargs)
        # the prompt ends where the caller starts reading predictions: assisted decoding's prefill asks for the
        # logits of its draft tokens too (logits_to_keep = drafts + 1), and plain generate() for the last token's
        wanted = kwargs.get("logits_to_keep")
        self._candidates = wanted - 1 if isinstance(wanted, int) and wanted > 1 else 0

    def _refuse_labels_with_images(self, kwargs: dict) -> None:
        if kwargs.get("labels") is not None and _has_images(kwargs):
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
        self._call = None
        if args:  # some wrappers pass input_ids by position (LLaVA-NeXT): name every input
            kwargs = {**inspect.signature(module.forward).bind_partial(*args).arguments, **kwargs}
            args = ()
        self.adapter.complete_aligned_inputs(kwargs)
        self.adapter.check_inputs(kwargs)
        has_images = _has_images(kwargs)
        if has_images and kwargs.get("input_ids") is None and self._layers is not None:
            raise ValueError(
                f"{self.inside.name} scores images with the attention of the prompt's last token and recognises a "
                f"prompt by its token ids: pass input_ids (not inputs_embeds) together with the images, or use a "
                f"pre-LLM method, which finds image tokens in inputs_embeds as the model does"
            )
        if has_images and getattr(kwargs.get(CACHE_ARGUMENT), "is_compileable", False):
            # its layers have one preallocated length, written where the unpruned sequence would be
            raise ValueError(
                f"{self.sieve.name} needs the default dynamic cache: a static cache (cache_implementation='static', "
                f"or a compiled generation's) holds the unpruned length at fixed positions, while a pruned prefill "
                f"writes fewer tokens. Generate without cache_implementation inside the apply() block"
            )
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
            raise RuntimeError(
                f"a forward carried images but {self.inside.name} never ran: its hook on decoder layer "
                f"{self.inside.layer} did not fire, so this transformers version changed how the decoder calls its layers"
            )

    def _drop_cached_prefix(self, kwargs: dict, state: CacheState) -> None:
        """generate() continuing a pruned cache slices the prompt by the cache's (shorter) physical
        length, so the new input starts with tokens the cache already holds: drop them."""
        n_new = kwargs["input_ids"].shape[1]
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.ndim == 2:
            overlap = state.logical_length + n_new - mask.shape[1]
        elif kwargs.get("position_ids") is not None:
            positions = kwargs["position_ids"]
            text_positions = self.adapter.text_positions(positions)
            overlap = state.logical_length - int(text_positions[0, 0])
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
            self._hand_over([], [], own_mask, None, None, None)
            return None
        if not flat:
            raise ValueError(
                "tokensieve needs the 2D attention mask the processor returns; this call carries a prebuilt "
                "4D mask (a static or compiled cache?): use the default dynamic cache"
            )
        if state is None and cache is not None and cache.get_seq_length() > 0:
            past = cache.get_seq_length()
            past_mask = mask[:, :past] if mask is not None else embeds.new_ones(batch, past, dtype=torch.long)
            state = CacheState(past, past_mask, torch.zeros(batch, dtype=torch.long))
        past_logical = state.logical_length if state is not None else 0
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = (torch.arange(length, device=embeds.device) + past_logical).unsqueeze(0)
        keep, replacements, records = self._select(slots, embeds)
        queries = self._prompts.query_positions(call.inputs, embeds, slots, own_mask, call.candidates) if slots and self._layers else None
        pruned_before = state.pruned if state is not None else torch.zeros(batch, dtype=torch.long)
        if keep.all() and not replacements and state is None:
            if slots:
                self._count_flops(own_mask.sum(1), own_mask.sum(1), state, pruned_before)
            past = cache.get_seq_length() if cache is not None else 0
            past_mask = mask[:, :past] if mask is not None else own_mask.new_ones(batch, past)
            self._hand_over(slots, records, own_mask, None, queries, past_mask)
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
        self._hand_over(slots, records, kept_mask, (keep, index), queries, state.mask if state is not None else None)
        kwargs.update(inputs_embeds=embeds, position_ids=positions, attention_mask=full_mask, **{CACHE_ARGUMENT: cache})
        return args, kwargs

    def _hand_over(self, slots, records, own_mask, packing, queries, past_mask) -> None:
        """Tell the in-LLM stage (if any) where this forward's images and query tokens sit at the decoder
        input: their original positions, or where the pre-LLM gather (``packing``: keep mask, index) put
        them; ``own_mask`` and ``past_mask`` are the decoder's 2D masks of this forward and of its cache."""
        if self._layers is None:
            return
        if packing is None:
            pending = [PendingImage(r, s.row, s.positions[r.kept], r.kept) for r, s in zip(records, slots)]
            self._layers.begin(pending, queries, own_mask, past_mask)
            return
        keep, index = packing
        # each kept token's slot in the left-padded packing (left_packed), -1 where a token was dropped
        first_slot = index.shape[1] - keep.sum(1, keepdim=True)
        moved = torch.where(keep, first_slot + keep.cumsum(1) - 1, -1)
        pending = [PendingImage(r, s.row, moved[s.row, s.positions[r.kept]], r.kept) for r, s in zip(records, slots)]
        queries = moved.gather(1, queries.unsqueeze(1)).squeeze(1) if queries is not None else None
        self._layers.begin(pending, queries, own_mask, past_mask)

    def _select(self, slots, embeds: torch.Tensor) -> tuple[torch.Tensor, list, list[ImageRecord]]:
        """Run the pre-LLM sieve on every image (none: keep them all); return the (batch, length) keep
        mask, merged features and each slot's record (one per image: a repeated row's copies share it)."""
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
        selected = {}  # image -> (kept, seconds, merged features): the copies of a repeated row reuse its selection
        for slot in slots:
            if slot.image not in selected:
                selected[slot.image] = self._select_image(slot, embeds[slot.row, slot.positions])
            kept, _, merged = selected[slot.image]
            if self.pre is not None:
                keep[slot.row, slot.positions] = False
                keep[slot.row, slot.positions[kept]] = True
                if merged is not None:
                    replacements.append((slot.row, slot.positions[kept], merged))
        if not slots:
            return keep, replacements, []
        first_slots = {slot.image: slot for slot in reversed(slots)}
        on_host = torch.cat([kept for kept, _, _ in selected.values()]).cpu().split([len(k) for k, _, _ in selected.values()])
        records = {}
        for (image, (_, seconds, _)), kept in zip(selected.items(), on_host):
            slot = first_slots[image]
            records[image] = ImageRecord(call_index, slot.row, len(slot.positions), len(kept), kept, slot.grid, seconds)
        self.stats.images.extend(records.values())
        self.stats.calls += 1
        return keep, replacements, [records[slot.image] for slot in slots]

    def _select_image(self, slot: ImageSlot, features: torch.Tensor) -> tuple[torch.Tensor, float, torch.Tensor | None]:
        """The pre-LLM sieve on one image's tokens (none: keep them all): kept indices, seconds, merged features."""
        if self.pre is None:
            return torch.arange(len(features), device=features.device), 0.0, None
        signals = self.adapter.image_signals(self.pre.signals, self._capture, slot.image)
        selection, seconds = timed_select(self.pre, VisualTokens(features, slot.grid, signals, slot.blocks))
        return selection.kept, seconds, selection.features

    def _count_flops(self, real_before, real_after, state, pruned_before) -> None:
        past_after = state.mask.sum(1).tolist() if state is not None else [0] * len(real_after)
        past_before = [p + d for p, d in zip(past_after, pruned_before.tolist())]
        config = self._text_config
        self.stats.prefill_flops += decoder_prefill_flops(config, real_after.tolist(), past_after)
        self.stats.prefill_flops_unreduced += decoder_prefill_flops(config, real_before.tolist(), past_before)


def attach(model: nn.Module, method: Sieve | Chain) -> Run:
    """Apply ``method`` (a sieve or a chain) to ``model`` until ``.remove()`` is called on the returned handle."""
    return Run(model, method)


def apply(model: nn.Module, method: Sieve | Chain) -> Run:
    """Apply ``method`` (a sieve or a chain) to ``model`` for the duration of a ``with`` block::

        with ts.apply(model, ts.load("fastervlm", keep=64)) as run:
            out = model.generate(**inputs)
        print(run.stats)
    """
    return Run(model, method)
