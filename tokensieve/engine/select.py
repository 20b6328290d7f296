"""Run a stage: hand a sieve one image's tokens and signals, and record what it kept.

Before the LLM (:class:`BeforeLLM`) each image's tokens are what an ``in_vision`` stage left of them (one per
merged group) and the ``pre_llm`` sieve selects among those; inside the LLM, tokensieve/engine/layer_stages.py
runs each stage's sieve on the image tokens' hidden states. Either way a stage adds one
:class:`~tokensieve.stats.StageRecord` to the image's record (:func:`stage_record`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters import ImageSlot
from ..adapters.base import ENGINE_SIGNALS
from ..sieve import Selection, Sieve, VisualTokens, timed_select_all
from ..signals import Signal
from ..stats import ImageRecord, RunStats, StageRecord
from .find_tokens import check_finite
from .frames_stage import FrameDropping, frame_tokens
from .llm_signals import instruction
from .pack import Selections
from .video_frames import slot_signals
from .vision_stage import MergedImage, VisionMerging


def stage_record(method: str, stage: str, layer: int | None, kept: torch.Tensor, seconds: float,
                 selection: Selection | None = None) -> StageRecord:
    """What one stage left of one image: ``kept`` raster indices (on the host) and, for a merging selection, its
    group sizes and merge map."""
    sizes = selection.sizes() if selection is not None else None
    assignment = selection.assignment if selection is not None else None
    weights = selection.weights if selection is not None and assignment is not None else None
    return StageRecord(method, stage, layer, len(kept), kept, seconds, sizes.cpu() if sizes is not None else None,
                       assignment.cpu() if assignment is not None else None, weights.cpu() if weights is not None else None)


@dataclass
class _Selected:
    """What the stages before the LLM kept of one image: indices into its tokens, the pre-LLM sieve's
    selection (indices into what it saw) and time, the features that replace the kept tokens' own (merging
    sieves), and what an in_vision stage merged."""

    kept: torch.Tensor
    seconds: float = 0.0
    selection: Selection | None = None
    features: torch.Tensor | None = None
    merged: MergedImage | None = None
    framed: torch.Tensor | None = None  # a video under a frames stage: the tokens of the frames the tower ran on

    @property
    def group_means(self):
        """The pre-LLM sieve's merge map over the image's tokens, for other per-token tensors (None: none)."""
        selection = self.selection
        if selection is None or selection.assignment is None:
            return None
        if self.merged is None:
            return selection.group_means
        groups = self.merged.kept  # the sieve saw one token per group an in_vision stage left
        return lambda values: selection.group_means(values[groups.to(values.device)])


class BeforeLLM:
    """The stages before the LLM, on the image tokens at the decoder's input: a video keeps the tokens of the frames a
    ``frames`` stage let the tower encode (``dropping``), the groups an ``in_vision`` stage merged (``merging``) keep
    one token each, then the ``pre`` sieve selects; with none of them, every token stays."""

    def __init__(self, vision: Sieve | None, pre: Sieve | None, requests: tuple[Signal, ...], adapter, capture,
                 merging: VisionMerging | None, stats: RunStats, dropping: FrameDropping | None = None):
        self.vision, self.pre, self.requests = vision, pre, requests
        self.adapter, self.capture, self.merging, self.stats = adapter, capture, merging, stats
        self.dropping = dropping

    @property
    def wants_text(self) -> bool:
        return any(request.name == "text_embeddings" for request in self.requests)

    def select(self, slots: list[ImageSlot], embeds: torch.Tensor, own_mask: torch.Tensor,
               prompt_ends: torch.Tensor | None) -> tuple[Selections, list[ImageRecord]]:
        """Every image's selection, marked on the (batch, length) decoder input, and each slot's record (one per
        image: a repeated row's copies share it). ``own_mask`` and ``prompt_ends`` (each row's prompt's last
        position) place ``text_embeddings``."""
        selections = Selections(torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device))
        check_finite(embeds, slots)
        firsts = list({slot.image: slot for slot in reversed(slots)}.values())[::-1]  # each image's first slot, in order
        selected = self._select_images(firsts, slots, embeds, own_mask, prompt_ends)
        for slot in slots:
            chosen = selected[slot.image]
            if self.pre is not None or self.vision is not None or self.dropping is not None:
                selections.mark(slot.row, slot.positions, chosen.kept, chosen.features, chosen.group_means)
        if not slots:
            return selections, []
        records = self._record(firsts, selected)
        return selections, [records[slot.image] for slot in slots]

    def _select_images(self, firsts: list[ImageSlot], slots: list[ImageSlot], embeds: torch.Tensor, own_mask: torch.Tensor,
                       prompt_ends: torch.Tensor | None) -> dict[int, _Selected]:
        """Each image's selection: the tokens an in_vision stage left (one per merged group), then the pre-LLM sieve
        among them, given every image of the forward at once (``timed_select_all``: equal images may share work)."""
        selected: dict[int, _Selected] = {}
        given: dict[int, tuple] = {}  # image -> (its tokens for the sieve, the groups they stand for, what merged them)
        for slot in firsts:
            features = embeds[slot.row, slot.positions]
            merged = self.merging.images[slot.image] if self.merging is not None else None
            if self.dropping is not None:
                framed = self._framed(slot, features.device)
                if self.pre is None:
                    selected[slot.image] = _Selected(framed, framed=framed)
                else:
                    t, h, w = slot.frames
                    kept_frames = slot.kept_frames if slot.kept_frames is not None else torch.arange(t)
                    grid = (len(kept_frames), h, w)
                    blocks = tuple(torch.arange(len(framed)).view(grid))
                    timestamps = slot.timestamps[kept_frames] if slot.timestamps is not None else None
                    signals = {}
                    if self.wants_text:
                        signals[Signal("text_embeddings")] = instruction(slot, slots, embeds, own_mask, prompt_ends)
                    tokens = VisualTokens(features[framed], (1, len(framed)), signals, blocks, prompt=slot.row,
                                          frames=grid, timestamps=timestamps)
                    given[slot.image] = (tokens, framed, None)
            elif merged is not None:
                groups = merged.kept.to(features.device)
                if self.pre is None:
                    selected[slot.image] = _Selected(groups, merged=merged)
                else:
                    given[slot.image] = (VisualTokens(features[groups], (1, len(groups)), prompt=slot.row), groups, merged)
            elif self.pre is None:
                selected[slot.image] = _Selected(torch.arange(len(features), device=features.device))
            elif self.pre.needs_video and slot.frames is None:
                raise ValueError(f"{self.pre.name} acts on videos (frames over time), and this call carries an image "
                                 f"(image {slot.image}, row {slot.row}): apply an image method to prompts with images "
                                 f"(see `tokensieve methods`)")
            else:
                signals = slot_signals(self.adapter, tuple(r for r in self.requests if r.name not in ENGINE_SIGNALS),
                                       self.capture, slot)
                if self.wants_text:
                    signals[Signal("text_embeddings")] = instruction(slot, slots, embeds, own_mask, prompt_ends)
                given[slot.image] = (VisualTokens(features, slot.grid, signals, slot.blocks, prompt=slot.row,
                                                  frames=slot.frames, timestamps=slot.timestamps), None, None)
        if given:
            _check_total_covers_frames(self.pre, [tokens for tokens, _, _ in given.values()])
            results = timed_select_all(self.pre, [tokens for tokens, _, _ in given.values()])
            for (image, (tokens, groups, merged)), (selection, seconds) in zip(given.items(), results):
                kept = groups[selection.kept] if groups is not None else selection.kept
                framed = groups if self.dropping is not None else None
                selected[image] = _Selected(kept, seconds, selection, selection.merged(tokens.features), merged, framed)
        return {slot.image: selected[slot.image] for slot in firsts}

    def _framed(self, slot: ImageSlot, device: torch.device) -> torch.Tensor:
        """A video's tokens in the frames the ``frames`` stage kept (every token if it kept all); an image is refused."""
        if slot.frames is None:
            raise ValueError(f"{self.dropping.sieve.name} acts on videos (frames over time), and this call carries an "
                             f"image (image {slot.image}, row {slot.row}): apply an image method to prompts with images "
                             f"(see `tokensieve methods`)")
        kept_frames = slot.kept_frames if slot.kept_frames is not None else torch.arange(slot.frames[0])
        return frame_tokens(slot.frames, kept_frames).to(device)

    def _record(self, firsts: list[ImageSlot], selected: dict[int, _Selected]) -> dict[int, ImageRecord]:
        """One record per image, with one stage record per stage that ran before the LLM."""
        call_index = self.stats.calls
        first_slots = {slot.image: slot for slot in firsts}
        # one read back to the host for every image of the call
        on_host = torch.cat([chosen.kept for chosen in selected.values()]).cpu().split([len(c.kept) for c in selected.values()])
        records = {}
        for (image, chosen), kept in zip(selected.items(), on_host):
            slot, merged = first_slots[image], chosen.merged
            seconds = chosen.seconds + (merged.seconds if merged is not None else 0.0)
            if chosen.framed is not None:
                seconds += self.dropping.seconds
            record = records[image] = ImageRecord(call_index, slot.row, len(slot.positions), len(kept), kept, slot.grid, seconds,
                                                  frames=slot.frames, timestamps=slot.timestamps)
            if chosen.framed is not None:
                framed = chosen.framed.cpu()
                record.stages.append(StageRecord(self.dropping.sieve.name, "frames", None, len(framed), framed,
                                                 self.dropping.seconds))
            if merged is not None:
                record.stages.append(StageRecord(self.vision.name, "in_vision", None, len(merged.kept), merged.kept,
                                                 merged.seconds, merged.sizes, merged.assignment))
            if self.pre is not None:
                record.stages.append(stage_record(self.pre.name, "pre_llm", None, kept, chosen.seconds, chosen.selection))
        self.stats.images.extend(records.values())
        self.stats.calls += 1
        return records


def _check_total_covers_frames(sieve: Sieve, images: list[VisualTokens]) -> None:
    """A total budget per prompt (``Budget(total=...)``) must leave every frame of the prompt's videos a token (and
    each image one): below that a frame would be dropped without a method having chosen to drop it."""
    total = sieve.budget.total
    if total is None:
        return
    needed: dict[int | None, list[int]] = {}
    for tokens in images:
        frames = tokens.frames[0] if tokens.frames is not None else 0
        counts = needed.setdefault(tokens.prompt, [0, 0])
        counts[0] += frames
        counts[1] += frames or 1
    for prompt, (frames, floor) in needed.items():
        if frames and total < floor:
            raise ValueError(
                f"{sieve.name}'s total budget of {total} tokens per prompt is below one token per frame: prompt {prompt} "
                f"has videos of {frames} frames in all (and {floor - frames} images): pass total={floor} or more, or drop "
                f"frames first (uniform_frames), or give a per-frame budget (ts.Budget(k, per_crop=True))"
            )
