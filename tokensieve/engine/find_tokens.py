"""Find the visual tokens: which images a forward carries and where their tokens sit in each row.

The adapter knows a family's placeholders and grids (``adapter.slots``); the engine adds what generate()
does to a batch: with beams or several return sequences it encodes each image once and repeats each prompt's
row, so the images are found on each prompt's first row and their slots repeated onto its copies.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..adapters import ImageSlot, PlaceholderMismatch


def has_images(kwargs: dict) -> bool:
    """Whether a call of the model (or its inner model) brings images or videos: pixels, or features encoded before."""
    encoded = kwargs.get("mm_encoder_outputs") or {}
    return kwargs.get("pixel_values") is not None or encoded.get("image") is not None or has_video(kwargs)


def has_video(kwargs: dict) -> bool:
    """Whether a call brings videos: ``pixel_values_videos``, or video features encoded before (generate() does)."""
    encoded = kwargs.get("mm_encoder_outputs") or {}
    return kwargs.get("pixel_values_videos") is not None or encoded.get("video") is not None


def encoded_before(kwargs: dict) -> bool:
    """Whether a call's visual features were encoded before it (no pixels of either kind): no vision pass follows."""
    return kwargs.get("pixel_values") is None and kwargs.get("pixel_values_videos") is None


def find_images(adapter, inputs: dict, capture, video_frames=None) -> list[ImageSlot]:
    """Every image of the call, one slot per image and row (the copies of a repeated row each get one, with the
    image's index, so that every copy keeps the same tokens); with ``video_frames`` (video_frames.py) each video's
    frames one slot."""
    slots = _slots(adapter, inputs, capture)
    return video_frames.group(slots, capture.inputs.get("kept_frames")) if video_frames is not None else slots


def _slots(adapter, inputs: dict, capture) -> list[ImageSlot]:
    try:
        return adapter.slots(inputs, capture)
    except PlaceholderMismatch:
        for copies in _copy_counts(inputs, adapter.visual_placeholder_mask(inputs)):
            first_rows = {name: inputs[name][::copies] for name in ("input_ids", "inputs_embeds") if inputs.get(name) is not None}
            try:
                firsts = adapter.slots({**inputs, **first_rows}, capture)
            except PlaceholderMismatch:
                continue
            return [replace(slot, row=slot.row * copies + copy) for slot in firsts for copy in range(copies)]
        raise


def check_finite(embeds: torch.Tensor, slots: list[ImageSlot]) -> None:
    """Refuse images whose features hold NaN or inf (one read back to the host for every image of the call)."""
    if not slots:
        return
    finite = torch.stack([torch.isfinite(embeds[slot.row, slot.positions]).all() for slot in slots]).tolist()
    for slot, ok in zip(slots, finite):
        if not ok:
            raise ValueError(
                f"image {slot.image} has non-finite visual features (NaN or inf): check its pixel_values "
                f"and the model's dtype"
            )


def _copy_counts(kwargs: dict, placeholders: torch.Tensor) -> list[int]:
    """How many times generate() may have repeated each prompt's row (beams, return sequences): every
    e > 1 that splits the batch into groups of e rows with the same image ``placeholders`` (batch, length),
    largest first. Only when the image features were encoded before the call, since generate() repeats them
    after encoding. (Copies differ in the tokens each has generated, so only the placeholders are compared.)"""
    encoded = kwargs.get("mm_encoder_outputs") or {}
    if not (encoded.get("image") or encoded.get("video")):
        return []
    batch = placeholders.shape[0]
    return [e for e in range(batch, 1, -1)
            if batch % e == 0 and bool((placeholders.view(batch // e, e, -1) == placeholders[::e].unsqueeze(1)).all())]
