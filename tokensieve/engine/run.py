"""``apply`` / ``attach`` / ``observe``: the run that hooks a stock model so that a method's stages reduce its
image tokens: inside the vision tower (an ``in_vision`` sieve, vision_stage.py), before the LLM (a ``pre_llm``
sieve, select.py) and between decoder layers (``in_llm`` stages, layer_stages.py).

One set of hooks serves every family (the adapter says where things are):

- a pre-hook on the vision tower opens a capture of the signals the sieves asked for;
- a pre-hook on the model reads how many trailing tokens the call asks logits for (assisted
  decoding's drafts follow the prompt);
- a pre-hook on the inner model reads ``input_ids`` or ``inputs_embeds`` (to find the image tokens,
  find_tokens.py) and, when a pruned cache is continued, drops the prompt tokens the cache already holds
  (after following any crop of the cache, as assisted decoding makes after rejected drafts: cache.py);
- a pre-hook on the text decoder runs the stages before the LLM on each image's tokens (select.py), packs
  the kept tokens' embeddings, original positions and mask (pack.py: rows of a batch may keep different
  counts, so shorter rows are left-padded and masked), and at later steps maps the caller's mask, which
  still has the unpruned length, onto what the cache holds;
- a post-hook on the inner model refuses a forward that carried images the sieves never saw.

Kept tokens keep their original positions, so decode positions stay those of the unpruned
sequence; ``positions="repack"`` renumbers them without gaps instead (as vLLM does: vllm_plugin/). The model's weights, modules and attention implementation are never changed. A static cache
(pre-LLM stages only) and compiled forwards (refused): static_cache.py.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from transformers import DynamicCache

from ..adapters import ImageSlot, VisionCapture, adapter_for
from ..adapters.base import ENGINE_SIGNALS
from ..chain import Chain
from ..registry import servable_methods
from ..sieve import Sieve
from ..signals import requests_of
from ..stats import ImageRecord, RunStats
from .cache import CacheState, cache_bytes, pruned_state, remember, unpruned_state
from .decode_stage import DecodeStage, decode_rules
from .compat import CACHE_ARGUMENT, cache_length, output_cache
from .find_tokens import encoded_before, find_images, has_images, has_video
from .flops import count_prefill
from .frames_stage import FrameDropping
from .layer_stages import LayerPruning, PendingImage
from .schedule import check_repackable
from .llm_signals import PromptQueries, prompt_ends
from .pack import Packing, gather_sequence
from .ppe import PositionPreservation, group_members
from .select import BeforeLLM
from .static_cache import flat_mask_for_static_cache, refuse_compiled_model, refuse_static_cache_with_in_llm, refuse_tracing
from .video_frames import ImageFrames, VideoFrames, slot_signals
from .vision_flops import VisionPasses, vision_modules
from .vision_stage import VisionMerging

_HOOKED_MODELS: weakref.WeakSet = weakref.WeakSet()

#: how a family that takes images only is given a video (video_frames.py)
_FRAMES_HINT = (" (or give a video as its frames, one image each, and say which images are frames of one video: "
                "ts.apply(model, method, video_frames=16), docs/video.md)")

#: what ``positions=`` takes: kept tokens keep their positions, or are renumbered without gaps
POSITIONS = ("original", "repack")


@dataclass
class _Call:
    inputs: dict  # the inner model's keyword inputs
    images_pending: bool
    candidates: int = 0  # tokens at the end of each row that follow the prompt (assisted decoding's drafts)


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
    replayed on their inputs when the run is removed: tokensieve/engine/vision_flops.py).
    ``positions="repack"``, ``video_frames=``: see :func:`apply`."""

    def __init__(self, model: nn.Module, method: Sieve | Chain | None = None, *, vision_flops: bool = False,
                 ppe: int | None = None, positions: str = "original", video_frames: int | tuple[int, ...] | None = None):
        chain = method if isinstance(method, Chain) or method is None else Chain(method)
        adapter = adapter_for(model)
        self.vision, self.pre, self.in_llm = (chain.vision, chain.pre, chain.in_llm) if chain is not None else (None, None, ())
        self.frames = chain.frames if chain is not None else None
        self._observing = chain is None  # nothing to remove: every hook only records
        self._requests = requests_of(self.pre, adapter) if self.pre is not None else ()
        self._video_frames = VideoFrames.of(video_frames, adapter, model)
        _refuse_before_hooking(model, adapter, method, self.vision, self.pre, self._requests, self.in_llm, self.frames,
                               self._video_frames)
        _refuse_positions(positions, adapter, method, self.in_llm, ppe)
        self._repack = positions == "repack"
        self.model, self.sieve, self.adapter = model, method if method is not None else OBSERVER, adapter
        self.removed = False
        self.stats = RunStats(decoder_layers=len(getattr(adapter.decoder, "layers", ())))
        self._text_config = model.config.get_text_config()
        self._capture = VisionCapture()
        self._call: _Call | None = None
        self._candidates = 0
        self._prompts = PromptQueries()
        self._layers: LayerPruning | None = None
        self._decode: DecodeStage | None = None
        self._merging: VisionMerging | None = None
        self._dropping: FrameDropping | None = None
        self._ppe: PositionPreservation | None = None
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
            # after the capture's pre-hook (the capture keeps the pass's full grid), before the vision FLOPs' (which
            # count the pass the tower runs)
            if self.frames is not None:
                frames_of = ImageFrames(adapter, self._video_frames) if self._video_frames is not None else adapter
                self._dropping = FrameDropping(self.frames, frames_of, self._capture)
            if vision_flops:
                self._vision = VisionPasses(vision_modules(adapter), repr(self.vision) if self.vision is not None else None)
            if self.in_llm:
                self._layers = LayerPruning(self.in_llm, adapter.decoder, self.stats, adapter)
                _refuse_vision_signals_in_llm(model, adapter, self.vision, self.in_llm, self._layers.vision_requests,
                                              self.frames)
            self._decode = _decode_stage(chain, adapter.decoder, self._layers, self._prompts)
            self._handles += adapter.install_signal_hooks(self._requests + self._vision_requests, self._capture)
            if self.vision is not None:
                self._merging = VisionMerging(self.vision, adapter.vision_tower, *adapter.merge_layout())

            if ppe is not None:
                self._ppe = PositionPreservation(adapter.decoder, ppe)
            self._before_llm = BeforeLLM(self.vision, self.pre, self._requests, adapter, self._capture, self._merging, self.stats,
                                         self._dropping)
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
        if self._decode is not None:
            self._decode.remove()
        self._handles, self._layers, self._decode = [], None, None
        self._call = None
        self._capture.reset()
        _HOOKED_MODELS.discard(self.model)
        self.removed = True
        if self._dropping is not None:  # the replay below is of the kept frames' pass: not to be dropped again
            self._dropping.remove()
            self._dropping = None
        if self._vision is not None:  # replayed now that no hook of the run can fire (or count)
            vision, self._vision = self._vision, None
            vision.remove()
            self.stats.vision_flops = vision.count()  # an in_vision stage's merges still act: they are counted
        if self._merging is not None:
            self._merging.remove()
            self._merging = None
        if self._ppe is not None:
            self._ppe.remove()
            self._ppe = None

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
        if kwargs.get("labels") is not None and has_images(kwargs) and not self._observing:
            raise ValueError(
                f"labels with images inside apply(): {self.sieve.name} drops visual tokens, so the logits no longer "
                f"line up with the labels. Compute the loss outside the with-block, or without labels here"
            )

    def _open_capture(self, module, args, kwargs) -> None:
        self.adapter.open_capture(self._capture, args, kwargs)

    def _check_placeholders(self, *hook_args) -> None:
        """Once both the image inputs and the placeholder tokens are known, check that they agree, so
        a mismatch gets tokensieve's message (what to change) rather than a failure deep inside."""
        call = self._call
        if call is not None and call.images_pending and not self.adapter.passes_pending(call.inputs, self._capture):
            find_images(self.adapter, call.inputs, self._capture, self._video_frames)

    def _before_inner(self, module, args, kwargs):
        refuse_tracing(self.sieve.name)  # torch.compile(model.forward)
        self._call = None
        if args:  # some wrappers pass input_ids by position (LLaVA-NeXT): name every input
            kwargs = {**inspect.signature(module.forward).bind_partial(*args).arguments, **kwargs}
            args = ()
        self.adapter.complete_aligned_inputs(kwargs)
        if has_video(kwargs) and not self.adapter.takes_video:
            raise ValueError(
                f"this {type(self.model).__name__} call carries a video (pixel_values_videos), and tokensieve serves videos "
                f"only on Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5 and LLaVA-OneVision (docs/video.md): run the {self.adapter.family} video outside the "
                f"apply() block, or pass its frames as images"
                f"{' (ts.apply(model, method, video_frames=16), docs/video.md)' if self.adapter.frames_as_images else ''}"
            )
        self.adapter.check_inputs(kwargs)
        with_images = has_images(kwargs)
        if with_images and kwargs.get("input_ids") is None and self._layers is not None:
            raise ValueError(
                f"{'+'.join(s.name for s in self.in_llm)} works inside the LLM, where the engine follows each image's tokens and "
                f"recognises a prompt by its token ids: pass input_ids (not inputs_embeds) together with the images, or use "
                f"a pre-LLM method, which finds image tokens in inputs_embeds as the model does"
            )
        # a static cache serves pre-LLM methods and observing (tokensieve/engine/static_cache.py), not in-LLM stages
        refuse_static_cache_with_in_llm(kwargs.get(CACHE_ARGUMENT), self._layers.stages if self._layers is not None else (), with_images)
        if self._decode is not None:
            self._decode.check_cache(kwargs.get(CACHE_ARGUMENT))
        state = pruned_state(kwargs.get(CACHE_ARGUMENT))
        if state is not None and kwargs.get("input_ids") is not None:
            self._drop_cached_prefix(kwargs, state)
        if state is not None and kwargs.get("position_ids") is None:
            positions = self.adapter.continued_positions(kwargs, state.logical_length)
            if positions is not None:
                kwargs["position_ids"] = positions
        self._call = _Call(kwargs, with_images, self._candidates)
        self._candidates = 0  # read once: a direct call of the inner model has no logits_to_keep
        if with_images and encoded_before(kwargs):  # features were encoded before this call
            self._check_placeholders()
        return args, kwargs

    def _after_inner(self, module, args, kwargs, output) -> None:
        call, self._call = self._call, None
        if output is None:  # the forward raised: forget its half-done state, and let its error through
            self._capture.reset()
            if self._layers is not None:
                self._layers.clear()
            if self._decode is not None:
                self._decode.clear()
            if self._ppe is not None:
                self._ppe.clear()
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
        """At the decoder's input: run the stages before the LLM on this forward's images, pack what they kept
        (embeddings, original positions, mask), and hand the decoder the mask over what its cache holds."""
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return None
        cache = kwargs.get(CACHE_ARGUMENT)
        state = pruned_state(cache)
        slots = self._take_images()
        batch, length = embeds.shape[:2]
        inner_inputs = self._call.inputs if self._call is not None else {}
        mask = self.adapter.flat_mask(kwargs.get("attention_mask"), inner_inputs)
        flat = mask is None or (isinstance(mask, torch.Tensor) and mask.ndim == 2)
        own_mask = mask[:, -length:] if mask is not None and flat else torch.ones(batch, length, dtype=torch.long, device=embeds.device)
        if not slots and state is None:
            self._hand_over([], [], own_mask, None, None, None, cache)
            return None
        if not flat:  # generate() built the masks ahead for a static cache: read the 2D mask back from them
            mask = flat_mask_for_static_cache(mask, cache, state is not None, batch, length, embeds.device)
            own_mask = mask[:, -length:]
        if state is None and cache is not None:
            state = unpruned_state(cache, mask, batch, embeds.device)
        past_logical = state.logical_length if state is not None else 0
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = (torch.arange(length, device=embeds.device) + past_logical).unsqueeze(0)
        queries = self._prompt_ends(embeds, slots, own_mask)
        selections, records = self._before_llm.select(slots, embeds, own_mask, queries)
        pruned_before = state.pruned if state is not None else torch.zeros(batch, dtype=torch.long)
        # the observer never prunes, so a cache it sees holds every token: the stock input as it is
        if selections.changes_nothing and (state is None or self._observing):
            if slots:
                self._count_flops(own_mask.sum(1), own_mask.sum(1), state, pruned_before)
            past = cache_length(cache)
            past_mask = mask[:, :past] if mask is not None else own_mask.new_ones(batch, past)
            self._hand_over(slots, records, own_mask, None, queries, past_mask, cache, embeds)
            return None  # nothing removed before the LLM: the stock decoder input, bit for bit
        packing = selections.packed(own_mask)
        embeds = packing.gather(selections.written(embeds), dim=1)
        if self._ppe is not None:
            self._preserve_positions(slots, records, positions, packing)
        positions = packing.gather(positions, dim=-1)
        if self._repack:
            positions = positions - _dropped_before(packing, own_mask, pruned_before)
        full_mask = torch.cat([state.mask, packing.mask], dim=1) if state is not None else packing.mask
        if slots:
            self._count_flops(own_mask.sum(1), packing.mask.sum(1), state, pruned_before)
        use_cache = kwargs.get("use_cache")
        if cache is None and (use_cache if use_cache is not None else module.config.use_cache):
            cache = DynamicCache(config=module.config)
        if cache is not None:
            removed = own_mask.sum(1) - packing.mask.sum(1)
            remember(cache, CacheState(past_logical + length, full_mask, pruned_before + removed.cpu()))
        self._hand_over(slots, records, packing.mask, packing, queries, state.mask if state is not None else None, cache, embeds)
        kwargs.update(self.adapter.pack_token_inputs(kwargs, partial(_packed_rows, selections, packing)))
        kwargs.update(inputs_embeds=embeds, position_ids=positions, **{CACHE_ARGUMENT: cache})
        kwargs["attention_mask"] = self.adapter.decoder_mask(full_mask, kwargs, inner_inputs, packing)
        return args, kwargs

    def _preserve_positions(self, slots: list[ImageSlot], records: list[ImageRecord], positions: torch.Tensor,
                            packing: Packing) -> None:
        """PPE (ppe.py): the positions of the members each merged token stands for, packed as the decoder input is,
        for the decoder's rotary embedding; every other token keeps its own in each chunk."""
        k = self._ppe.k
        batch, length = packing.keep.shape
        source = torch.arange(length, device=positions.device).expand(k, batch, length).clone()
        merged = False
        for slot, record in zip(slots, records):
            groups = record.groups()
            if int((groups >= 0).sum()) == len(record.kept):  # every token left stands for itself
                continue
            members = group_members(groups, record.kept, k).to(slot.positions.device)
            source[:, slot.row, slot.positions[record.kept.to(slot.positions.device)]] = slot.positions[members].T
            merged = True
        if merged:
            self._ppe.prepare(torch.stack([packing.gather(gather_sequence(positions, source[j], dim=-1), dim=-1)
                                           for j in range(k)]))

    @property
    def _vision_requests(self) -> tuple:
        """The vision-tower signals in-LLM stages asked for (``schedule.VISION_SIGNALS``)."""
        return tuple(r for r in (self._layers.vision_requests if self._layers is not None else ()) if r not in self._requests)

    def _vision_signals(self, slot: ImageSlot) -> dict:
        """One image's values of the vision-tower signals in-LLM stages asked for, over all its tokens."""
        if self._layers is None or not self._layers.vision_requests:
            return {}
        return slot_signals(self.adapter, self._layers.vision_requests, self._capture, slot)

    def _take_images(self) -> list[ImageSlot]:
        """The images of the current call, once: the first decoder forward of a call consumes them."""
        call = self._call
        if call is None or not call.images_pending:
            return []
        call.images_pending = False
        return find_images(self.adapter, call.inputs, self._capture, self._video_frames)

    def _prompt_ends(self, embeds: torch.Tensor, slots: list[ImageSlot], own_mask: torch.Tensor) -> torch.Tensor | None:
        """Each row's prompt's last position, where a stage needs it: the query of in-LLM stages, the end of
        ``text_embeddings``' instruction."""
        if not slots or not (self._layers or self._decode or self._before_llm.wants_text):
            return None
        return prompt_ends(self._prompts, self._call.inputs, embeds, slots, own_mask, self._call.candidates)

    def _hand_over(self, slots: list[ImageSlot], records: list[ImageRecord], own_mask: torch.Tensor,
                   packing: Packing | None, queries, past_mask, cache, embeds: torch.Tensor | None = None) -> None:
        """Tell the in-LLM stages (if any) where this forward's images and query tokens sit at the decoder
        input: their original positions, or where the pre-LLM ``packing`` put them; ``own_mask`` and
        ``past_mask`` are the decoder's 2D masks of this forward and of its cache; ``embeds`` the decoder input."""
        if self._layers is None and self._decode is None:
            return
        vision = [self._vision_signals(s) for s in slots]
        if packing is None:
            pending = [PendingImage(r, s.row, s.positions[r.kept], r.kept, vision=v) for r, s, v in zip(records, slots, vision)]
        else:
            moved = packing.slots()
            pending = [PendingImage(r, s.row, moved[s.row, s.positions[r.kept]], r.kept, vision=v)
                       for r, s, v in zip(records, slots, vision)]
            queries = moved.gather(1, queries.unsqueeze(1)).squeeze(1) if queries is not None else None
        if self._decode is not None:
            self._decode.begin(pending, queries, own_mask, cache)
        if self._layers is not None:
            self._layers.begin(pending, queries, own_mask, past_mask, cache, embeds)

    def _cache_before(self, module, args, kwargs) -> None:
        """Before the decoder hook consumes the call's images: a prefill (a call with images) notes the bytes
        its cache holds, so that ``_cache_after`` records what it added."""
        images = self._call is not None and self._call.images_pending
        self._kv_before = cache_bytes(kwargs.get(CACHE_ARGUMENT)) if images else None

    def _cache_after(self, module, args, kwargs, output) -> None:
        before, self._kv_before = self._kv_before, None
        if before is not None:
            self.stats.kv_bytes += cache_bytes(output_cache(output)) - before

    def _count_flops(self, real_before, real_after, state, pruned_before) -> None:
        past_after = state.mask.sum(1).tolist() if state is not None else [0] * len(real_after)
        past_before = [p + d for p, d in zip(past_after, pruned_before.tolist())]
        count_prefill(self.stats, self._text_config, real_before.tolist(), real_after.tolist(), past_before, past_after)


def _dropped_before(packing: Packing, own_mask: torch.Tensor, pruned_before: torch.Tensor) -> torch.Tensor:
    """(batch, width) real tokens dropped before each packed slot of its row: by this forward's stages before the LLM,
    and by earlier forwards whose tokens the cache holds pruned (``positions="repack"``)."""
    dropped = (~packing.keep & own_mask.bool()).long()
    before = packing.gather(dropped.cumsum(1) - dropped, dim=-1)
    return before + pruned_before.to(before.device)[:, None]


def _decode_stage(chain: Chain | None, decoder: nn.Module, layers: LayerPruning | None, prompts: PromptQueries):
    """The decode stage of the one method of ``chain`` that acts at decode steps (``Sieve.decode_rule``), if any."""
    sieves = (chain.frames, chain.vision, chain.pre, *chain.in_llm) if chain is not None else ()
    rules = decode_rules(sieves, len(decoder.layers))
    if len(rules) > 1:
        raise ValueError(f"{' and '.join(sieve.name for sieve, _ in rules)} both act at decode steps: chain one of them")
    return DecodeStage(*rules[0], decoder, layers, prompts) if rules else None


def _refuse_positions(positions: str, adapter, method, in_llm, ppe: int | None) -> None:
    """``positions=`` is one of :data:`POSITIONS`; "repack" renumbers 1D rotary positions at the decoder input only."""
    if positions not in POSITIONS:
        raise ValueError(f"positions={positions!r}: choose 'original' (kept tokens keep their positions) or 'repack' "
                         f"(renumbered without gaps, as vLLM numbers them)")
    if positions == "original" or method is None:
        return
    if in_llm:
        names = "+".join(sieve.name for sieve in in_llm)
        raise ValueError(f"positions='repack' renumbers the decoder input after the stages before the LLM, but {names} "
                         f"prunes inside the LLM with its own policy: drop positions='repack' here and pass it to the "
                         f"method where it has one (ts.PyramidDrop(positions='repack'))")
    if ppe is not None:
        raise ValueError("ppe gives merged tokens the positions of what they merged, while positions='repack' renumbers "
                         "every kept token: pass one of them")
    check_repackable(adapter.decoder)


def _packed_rows(selections, packing: Packing, values: torch.Tensor) -> torch.Tensor:
    """A (batch, length, ...) per-token tensor of the decoder input as the packed sequence needs it: merge maps'
    group means in place, the kept tokens' rows packed, zero (False) at the padding slots."""
    packed = packing.gather(selections.carried(values), dim=1)
    filled = packing.filled().view(*packing.index.shape, *[1] * (packed.ndim - 2))
    return torch.where(filled.to(packed.device), packed, torch.zeros((), dtype=packed.dtype, device=packed.device))


def _refuse_vision_signals_in_llm(model: nn.Module, adapter, vision: Sieve | None, in_llm, requests,
                                  frames: Sieve | None = None) -> None:
    """In-LLM stages that ask for vision-tower signals: the model must give them, and of the unmerged tower over every
    frame."""
    if not requests:
        return
    names = "+".join(sieve.name for sieve in in_llm)
    missing = adapter.missing_signals(requests)
    if missing:
        reasons = "; ".join(f"{name}: {why}" for name, why in missing.items())
        raise ValueError(f"{names} needs signals {type(model).__name__} cannot give ({reasons})")
    if vision is not None:
        raise ValueError(f"after {vision.name} merges inside the vision tower, {names} would read signals "
                         f"({', '.join(map(str, requests))}) of the unmerged tower: chain {vision.name} with in-LLM "
                         f"methods that need none")
    if frames is not None:
        raise ValueError(f"after {frames.name} drops frames before the vision tower, {names} would read signals "
                         f"({', '.join(map(str, requests))}) of a pass that no longer covers the video: chain "
                         f"{frames.name} with in-LLM methods that need none")


def _refuse_before_hooking(model: nn.Module, adapter, method, vision: Sieve | None, pre: Sieve | None, requests,
                           in_llm=(), frames: Sieve | None = None, video_frames: VideoFrames | None = None) -> None:
    """Everything that can refuse a method on a model, checked before the first hook, so a refusal leaves the
    model untouched (in-LLM schedules are checked by LayerPruning, before its own first hook)."""
    for sieve in (frames, vision, pre, *in_llm):
        if sieve is not None and sieve.needs_video and not adapter.takes_video and video_frames is None:
            raise ValueError(
                f"{sieve.name} acts on videos, and tokensieve takes videos only on Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5 and LLaVA-OneVision, not on "
                f"{type(model).__name__}{_FRAMES_HINT if adapter.frames_as_images else ''}: use an image method, such as "
                f"{', '.join(servable_methods(adapter))} (see `tokensieve methods`)"
            )
    videos = adapter.takes_video or video_frames is not None
    if vision is not None and video_frames is not None:
        raise ValueError(
            f"{vision.name} merges inside the vision tower, which encodes each frame of a video given as images on its own "
            f"(its budget would be per frame, the video unseen): with {video_frames}, use a pre-LLM method, such as "
            f"{', '.join(servable_methods(adapter, videos=True))} (per frame: ts.Budget(k, per_crop=True))"
        )
    for sieve in (vision, pre):
        missing = adapter.missing_signals(requests_of(sieve, adapter)) if sieve is not None else {}
        if missing:
            reasons = "; ".join(f"{name}: {why}" for name, why in missing.items())
            raise ValueError(
                f"{sieve.name} needs signals {type(model).__name__} cannot give ({reasons}). Use a method "
                f"that needs none of them, such as {', '.join(servable_methods(adapter, videos=videos))} (see `tokensieve methods`)"
            )
    # a method that acts at decode steps (dycoke's kv_keep) works inside the LLM too
    inside = [*in_llm, *(s for s in (frames, vision, pre) if s is not None and s.decode_rule(len(adapter.decoder.layers)))]
    if inside and (why := adapter.in_llm_problem()) is not None:
        raise ValueError(
            f"{'+'.join(sieve.name for sieve in inside)} prunes inside the LLM, which {type(model).__name__} cannot "
            f"serve: {why}. Use a method that acts before the LLM, such as {', '.join(servable_methods(adapter, videos=videos))} "
            f"(see `tokensieve methods`)"
        )
    tower_requests = [r for r in requests if r.name not in ENGINE_SIGNALS]
    if frames is not None and tower_requests:
        raise ValueError(
            f"after {frames.name} drops frames before the vision tower, {pre.name} would read vision-tower signals "
            f"({', '.join(map(str, tower_requests))}) of a pass that no longer covers the video: chain {frames.name} "
            f"with a pre-LLM method that reads only the tokens (evs, vidcom2, divprune, uniform, random)"
        )
    if vision is not None and requests:
        raise ValueError(
            f"after {vision.name} merges inside the vision tower, {pre.name} would read signals "
            f"({', '.join(map(str, requests))}) of the unmerged tower: chain {vision.name} with a "
            f"pre-LLM method that needs no signals (divprune, uniform, tome, random) or with in-LLM methods"
        )
    refuse_compiled_model(model, {"inner": adapter.inner, "decoder": adapter.decoder, "vision_tower": adapter.vision_tower},
                          (method if method is not None else OBSERVER).name)
    if model in _HOOKED_MODELS:
        raise RuntimeError(
            f"{type(model).__name__} already has a tokensieve method applied: exit that apply() block "
            f"(or call .remove() on its handle) before applying another"
        )


def attach(model: nn.Module, method: Sieve | Chain | None = None, *, vision_flops: bool = False,
           ppe: int | None = None, positions: str = "original", video_frames: int | tuple[int, ...] | None = None) -> Run:
    """Apply ``method`` (a sieve or a chain; none: observe) to ``model`` until ``.remove()`` is called on the
    returned handle. Keywords: see :func:`apply`."""
    return Run(model, method, vision_flops=vision_flops, ppe=ppe, positions=positions, video_frames=video_frames)


def apply(model: nn.Module, method: Sieve | Chain | None = None, *, vision_flops: bool = False,
          ppe: int | None = None, positions: str = "original", video_frames: int | tuple[int, ...] | None = None) -> Run:
    """Apply ``method`` (a sieve or a chain) to ``model`` for the duration of a ``with`` block::

        with ts.apply(model, ts.load("fastervlm", keep=64)) as run:
            out = model.generate(**inputs)
        print(run.stats)

    Without a method it observes (``ts.observe``). ``vision_flops=True``: count the vision side's FLOPs too.
    ``ppe=8``: each token a method merged before the LLM carries the positions of 8 of the tokens it merged
    (Positional Preservation Embedding, tokensieve/engine/ppe.py).
    ``positions="repack"``: the tokens kept before the LLM are renumbered without gaps, each one's position less the
    tokens dropped before it in its row (decode steps too), as vLLM numbers them (docs/vllm.md); 1D rotary models and
    stages up to the LLM input (an in-LLM method sets its own, ``ts.PyramidDrop(positions="repack")``). The default,
    ``"original"``, keeps each token's position.
    ``video_frames=16``, on a family that takes images only (LLaVA, sieve-mini, Gemma3): each run of 16 consecutive images of a
    prompt is one video of 16 frames; ``video_frames=(1, 16)``: each prompt's images are a still image, then a video of
    16 frames (docs/video.md, tokensieve/engine/video_frames.py). None (the default): every image is an image.
    """
    return Run(model, method, vision_flops=vision_flops, ppe=ppe, positions=positions, video_frames=video_frames)


def observe(model: nn.Module, *, vision_flops: bool = False, video_frames: int | tuple[int, ...] | None = None) -> Run:
    """Record what the stock model does, changing nothing: its forwards and ``generate()`` give the
    unhooked model's outputs bit for bit, and ``run.stats`` has what a method's run has (per image the grid
    and token count, kept = every token; the LLM prefill FLOPs, reduced = unreduced; the KV cache's bytes;
    with ``vision_flops=True`` the vision tower's and projector's FLOPs), so a baseline is measured the
    way a method is::

        with ts.observe(model) as run:
            out = model.generate(**inputs)
        print(run.stats.prefill_flops, run.stats.kv_bytes)

    ``video_frames=``: records videos given as their frames, as :func:`apply`.
    """
    return Run(model, None, vision_flops=vision_flops, video_frames=video_frames)
