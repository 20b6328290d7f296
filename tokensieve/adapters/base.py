"""What every model-family adapter provides to the engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..signals import Signal, as_signal

#: signals the engine computes itself, for every family (from the decoder's input)
ENGINE_SIGNALS = frozenset({"text_embeddings"})


def carries(inputs: dict, kind: str) -> bool:
    """Whether a call brings ``kind`` ("image" or "video"): its pixels, or its features encoded before (generate())."""
    pixels = inputs.get("pixel_values" if kind == "image" else "pixel_values_videos")
    return pixels is not None or (inputs.get("mm_encoder_outputs") or {}).get(kind) is not None


def spread_rows(output, rows: torch.Tensor, total: int):
    """A vision tower's ``output`` (every tensor in it, tuples of hidden states too) computed on some rows of a
    pass, given back all ``total`` rows: its rows at ``rows``, zeros elsewhere (``Adapter.full_frames``)."""

    def spread(values):
        if not isinstance(values, torch.Tensor):
            return values
        full = values.new_zeros(total, *values.shape[1:])
        full[rows.to(values.device)] = values
        return full

    for name, value in list(output.items()):
        output[name] = tuple(map(spread, value)) if isinstance(value, tuple) else spread(value)
    return output


class PlaceholderMismatch(ValueError):
    """The image placeholder tokens of the input do not match the images of the vision pass."""


@dataclass
class ImageSlot:
    """Where one image's visual tokens sit in the LLM input: batch row, sequence positions
    (raster order over ``grid``), and the index of the image in the vision pass. An image made of
    several 2D pieces has ``grid == (1, N)`` and lists them in ``blocks`` (see ``VisualTokens``)."""

    row: int
    positions: torch.Tensor
    grid: tuple[int, int]
    image: int
    blocks: tuple[torch.Tensor, ...] = ()
    #: a video: its (t, h, w) grid of LLM tokens (t frames, or temporal patches), ``blocks`` one (h, w) map per frame
    frames: tuple[int, int, int] | None = None
    #: a video: the time in seconds where each of its t frames starts, where the model has them (None: it has not)
    timestamps: torch.Tensor | None = None
    #: a video under a ``frames`` stage: the frames the vision tower ran on, ascending (None: every frame)
    kept_frames: torch.Tensor | None = None
    #: a video given as images (``video_frames=``): its t frames are the vision pass's images from ``image`` on
    of_images: bool = False


@dataclass
class VisionCapture:
    """What hooks on the vision side recorded during the latest vision pass: the pass's inputs
    the adapter needs (``inputs``, e.g. the pixel shape or ``grid_thw``) and signal tensors."""

    inputs: dict = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    #: the pass before this one, kept by families that encode a call's images and its videos in two passes (Qwen2-VL)
    earlier: VisionCapture | None = None

    def reset(self, keep_earlier: bool = False, **inputs) -> None:
        self.earlier = VisionCapture(self.inputs, self.tensors) if keep_earlier and self.seen else None
        self.inputs = inputs
        self.tensors = {}

    @property
    def seen(self) -> bool:
        return bool(self.inputs)


class Adapter:
    """Model-family knowledge: which modules to hook, where image tokens sit, how to read signals.

    Subclasses name the model classes they serve (``model_classes``, matched by class name in the
    model's MRO, so no model class is imported to match) and the signals they can compute.
    """

    family: ClassVar[str]
    model_classes: ClassVar[tuple[str, ...]]
    signals: ClassVar[frozenset[str]] = frozenset()
    #: keyword inputs of the inner model aligned with ``input_ids`` on the sequence axis
    aligned_inputs: ClassVar[tuple[str, ...]] = ()
    #: whether the engine serves this family's video inputs (``pixel_values_videos``); others are refused clearly
    takes_video: ClassVar[bool] = False
    #: whether the engine serves videos given as their frames, one image each (``video_frames=``,
    #: engine/video_frames.py): every image one tower image of one 2D grid (``image_grid``), its own slot
    frames_as_images: ClassVar[bool] = False

    def __init__(self, model: nn.Module):
        self.model = model
        # a ...ForConditionalGeneration wraps the model that sees the image inputs (and has the lm_head)
        self.inner = model.model if hasattr(model, "lm_head") else model
        self.config = model.config

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return any(klass.__name__ in cls.model_classes for klass in type(model).__mro__)

    # modules the engine hooks
    inner: nn.Module  # sees input_ids and the image inputs
    decoder: nn.Module  # the text decoder; sees inputs_embeds with image features scattered in
    vision_tower: nn.Module  # one call per vision pass

    def image_token_id(self) -> int:
        raise NotImplementedError

    def missing_signals(self, wanted) -> dict[str, str]:
        """Requested signals (names or :class:`~tokensieve.signals.Signal`) this model cannot give, each as
        written (``"cls_attention"``, ``"vision_attention(layer=30, queries='mean')"``) with the reason; empty
        if all are available. Checked before the model is touched."""
        missing = {}
        for request in map(as_signal, wanted):
            if request.name in ENGINE_SIGNALS:
                continue
            if request.name not in self.signals:
                missing[str(request)] = f"the {self.family} adapter does not compute it"
            elif (why := self.why_not(request)) is not None:
                missing[str(request)] = why
        return missing

    def why_not(self, request: Signal) -> str | None:
        """Why this model cannot give ``request``, a signal in ``signals`` (None: it can)."""
        return None

    def why_not_without_cls(self, request: Signal, no_cls: str, no_tower_merge: str) -> str | None:
        """``why_not`` of a tower with no [CLS] token (``no_cls`` says so) whose output the model folds or pools
        on a fixed grid (``no_tower_merge``: why merging inside it is not served): the attention each patch
        receives, at any block, is all it gives."""
        if request.name == "vision_tower":
            return no_tower_merge
        if request.name in ("cls_attention", "vision_keys") or (request.name == "vision_attention" and request.queries == "cls"):
            return no_cls
        if request.name == "vision_attention":
            return self.layer_problem(request.layer)
        return None

    def merge_layout(self) -> tuple[nn.ModuleList, int, bool, int]:
        """For an ``in_vision`` stage (the ``vision_tower`` signal): the tower's blocks, the index of the block
        whose output the model projects, whether token 0 is a [CLS] token, and the attention heads."""
        raise NotImplementedError

    def vision_layer_count(self) -> int:
        """Transformer blocks in the vision tower."""
        raise NotImplementedError

    def feature_block(self) -> int | None:
        """0-based index of the block whose output the model projects (None: not a single block)."""
        return self.vision_layer_count() - 1

    def block_index(self, layer: int | None) -> int:
        """0-based block index of a vision ``layer`` as signals number it (see tokensieve/signals.py)."""
        if layer is None:
            return self.feature_block()
        return layer - 1 if layer > 0 else self.vision_layer_count() + layer

    def layer_problem(self, layer: int | None) -> str | None:
        """Why ``layer`` names no block of this tower (None: it does)."""
        n = self.vision_layer_count()
        if layer is None:
            return None if self.feature_block() is not None else "the model's feature layer is not a single block: pass layer="
        if not -n <= layer <= n:
            return f"the vision tower has {n} layers: pass a layer from 1 to {n} (or -1 to -{n} from the last)"
        return None

    def complete_aligned_inputs(self, kwargs: dict) -> None:
        """Extend ``aligned_inputs`` shorter than the input sequence with zeros (text), in place, when the call
        brings position ids. Assisted and prompt-lookup decoding append their candidate tokens to ``input_ids``
        alone, with positions; the stock model, given positions, never reads what is missing, and the
        candidates are text. Without positions the stock model reads both together, and fails: so does the check."""
        tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if kwargs.get("position_ids") is None:
            return
        for name in self.aligned_inputs:
            aligned = kwargs.get(name)
            if tokens is None or aligned is None or aligned.shape[-1] >= tokens.shape[1]:
                continue
            missing = aligned.new_zeros(*aligned.shape[:-1], tokens.shape[1] - aligned.shape[-1])
            kwargs[name] = torch.cat([aligned, missing], dim=-1)

    def check_inputs(self, kwargs: dict) -> None:
        """Raise a clear error for inputs a pre-LLM image method cannot handle."""

    def video_grid(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """For a ``frames`` stage, at a vision-tower call: the (videos, 3) grids of (t, h, w) LLM tokens of a pass of
        videos, None for a pass of images."""
        return None

    def image_grid(self, pixel_shape: tuple[int, ...]) -> tuple[int, int]:
        """For ``video_frames=``: the (h, w) grid of LLM tokens of each image of a vision pass whose pixels have this
        shape (``frames_as_images`` families)."""
        raise NotImplementedError

    def frame_pass(self, args: tuple, kwargs: dict, kept: list[torch.Tensor]) -> tuple[tuple, dict]:
        """The vision-tower call's ``(args, kwargs)`` for only the ``kept`` frames of each video of the pass."""
        raise NotImplementedError

    def full_frames(self, output, grid: torch.Tensor, kept: list[torch.Tensor]):
        """The tower's ``output`` for the ``kept`` frames given back the length of the full ``grid`` (as
        ``video_grid`` gives it): zeros at the
        dropped frames' tokens, so the model scatters it into every placeholder as it does unpruned."""
        raise NotImplementedError

    def passes_pending(self, inputs: dict, capture: VisionCapture) -> bool:
        """Whether the call's visual inputs need a vision pass still to come (Qwen2-VL encodes a call's images, then
        its videos), so that its placeholders cannot be checked yet."""
        return False

    def in_llm_problem(self) -> str | None:
        """Why in-LLM stages cannot run on this model (None: they can). Checked before the model is touched."""
        return None

    def flat_mask(self, mask, inner_inputs: dict):
        """The decoder's ``attention_mask`` as the engine reads it: the 2D padding mask (None: every token real),
        or generate()'s masks prebuilt for a static cache. ``inner_inputs`` are the inner model's keyword inputs of
        this call. Families whose inner model turns the 2D mask into masks of their own before the decoder
        (Gemma3's dict per layer type) return the 2D mask the inner model was given."""
        return mask

    def decoder_mask(self, mask: torch.Tensor, decoder_inputs: dict, inner_inputs: dict, packing) -> object:
        """The ``attention_mask`` to hand the decoder once the engine has packed its input: ``mask`` is the 2D mask
        over what the cache holds and the packed tokens, ``decoder_inputs`` the packed ``inputs_embeds``,
        ``position_ids`` and the cache, ``packing`` (engine/pack.py) where each packed token came from. The decoder
        builds its masks from the 2D one (the default); families whose inner model builds them instead rebuild
        them here for the packed sequence."""
        return mask

    def pack_token_inputs(self, kwargs: dict, pack) -> dict:
        """The decoder's keyword inputs, besides ``inputs_embeds``, positions and mask, that hold values per input
        token (Qwen3-VL's DeepStack features and the mask of where they go), as the decoder must get them once the
        engine has packed the sequence; ``kwargs`` are the decoder's. ``pack`` maps a (batch, length, ...) tensor
        aligned with ``inputs_embeds`` to its packed (batch, width, ...) form: dropped tokens gone, merge maps'
        group means in place, zero (False) at padding. Default: none."""
        return {}

    def stage_layer_problem(self, layer: int) -> str | None:
        """Why an in-LLM stage cannot prune before decoder ``layer`` of this model (None: it can)."""
        return None

    def continued_positions(self, kwargs: dict, logical_past: int) -> torch.Tensor | None:
        """Position ids for a forward that continues a pruned cache without bringing its own (a
        hand-written decode loop); ``logical_past`` is the unpruned length the cache stands for.
        None (the default) lets the decoder hook count on from it. Models that build positions
        before the decoder from the cache's length, which pruning shortened, override this."""
        return None

    def text_positions(self, position_ids: torch.Tensor) -> torch.Tensor:
        """The (batch, length) 1D positions in the ``position_ids`` the inner model receives: the
        tensor itself when 2D, else its first row (mrope models put a 1D text row first)."""
        return position_ids if position_ids.ndim == 2 else position_ids[0]

    def open_capture(self, capture: VisionCapture, args: tuple, kwargs: dict) -> None:
        """Called before every vision-tower pass: reset ``capture`` with what ``slots`` will need."""
        pixels = args[0] if args else kwargs.get("pixel_values")
        capture.reset(pixel_shape=tuple(pixels.shape))

    def install_signal_hooks(self, wanted: tuple[Signal, ...], capture: VisionCapture) -> list:
        """Register hooks that fill ``capture`` with what the ``wanted`` requests need; return their handles."""
        return []

    def slots(self, inputs: dict, capture: VisionCapture) -> list[ImageSlot]:
        """Every image in the call, in the order the model consumes their features. ``inputs`` are the
        keyword inputs of the inner model's forward (``input_ids``, ``image_sizes``, ...)."""
        raise NotImplementedError

    def placeholder_mask(self, inputs: dict, token_id: int | None = None) -> torch.Tensor:
        """(batch, length) True at the image placeholder tokens (or those of ``token_id``), found as the model finds
        them: by their id in ``input_ids`` or, for a call with ``inputs_embeds`` only, as the rows equal to the
        token's embedding."""
        token_id = self.image_token_id() if token_id is None else token_id
        if inputs.get("input_ids") is not None:
            return inputs["input_ids"] == token_id
        embeds = inputs["inputs_embeds"]
        token = torch.tensor(token_id, device=embeds.device)
        return (embeds == self.model.get_input_embeddings()(token).to(embeds.dtype)).all(-1)

    def visual_placeholder_mask(self, inputs: dict) -> torch.Tensor:
        """(batch, length) True at every visual placeholder token: the image ones, and a video family's video ones."""
        return self.placeholder_mask(inputs)

    def placeholder_blocks(self, inputs: dict, counts: list[int], images: str, hint: str = "",
                           token_id: int | None = None) -> list[tuple[int, torch.Tensor]]:
        """(row, positions) of each image's placeholder tokens (of ``token_id``, default the image token) in the inner
        model's ``inputs``: image i takes the next ``counts[i]`` of them in batch-row order. ``images`` describes the
        images for the error message."""
        placed = self.placeholder_mask(inputs, token_id).nonzero()
        if len(placed) != sum(counts):
            kind = "image" if token_id is None else "video"
            found = "input_ids has" if inputs.get("input_ids") is not None else f"inputs_embeds has rows equal to the {kind} token's embedding at"
            raise PlaceholderMismatch(
                f"{images} need {sum(counts)} {kind} placeholder tokens, but {found} {len(placed)}: build the "
                f"inputs with the model's processor{hint}"
            )
        rows = placed[:, 0].tolist()  # one read back to the host, not two per image
        blocks, start = [], 0
        for image, count in enumerate(counts):
            if count == 0:
                raise ValueError(f"{images}: item {image} has no tokens (an empty grid): pass at least one frame of pixels")
            if rows[start] != rows[start + count - 1]:
                raise ValueError(f"image {image}'s placeholder tokens span two batch rows: one image per row block")
            blocks.append((rows[start], placed[start : start + count, 1]))
            start += count
        return blocks

    def image_signals(self, wanted: tuple[Signal, ...], capture: VisionCapture, image: int) -> dict:
        """The per-image values of the ``wanted`` requests, keyed by request (engine signals excluded)."""
        return {}
