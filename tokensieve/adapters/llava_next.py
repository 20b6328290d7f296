"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): anyres crops through a CLIP tower, packed with
row-end newline tokens.

The processor cuts each image into a base view (the whole image resized to one crop) and the crops of
the best-fitting ``image_grid_pinpoints`` resolution; the tower encodes every crop with its own [CLS].
``pack_image_features`` then lays one image out as consecutive placeholder tokens:

1. the base view: g×g patches in raster order (g = image_size / patch_size);
2. the high-res crops stitched into one grid and unpadded to the image's aspect, R×C patches, each
   row followed by one ``image_newline`` token: R×(C+1) tokens.

The budget covers the whole image: the sieve sees all g² + R×(C+1) tokens as one list, with
``grid = (1, N)`` and three 2D ``blocks`` (base g×g, high-res R×C, newline column R×1), so grid
methods (uniform, pool) work piece by piece. Newline tokens are candidates like any other token: they
are placeholders of the image, and the budget counts every placeholder. Kept tokens keep their
positions, so the LLM still sees where each one sits when newlines are dropped.

The layout comes from the model's own ``pack_image_features`` run on crop×patch indices instead of
features, so it follows the model's unpadding exactly. That needs ``image_sizes``, which
``generate()`` passes to ``get_image_features`` only, never to the forward: while applied, the
adapter wraps that method on the model instance (no module hook sees its arguments) and unwraps it
with the hooks.

The pieces also name the crops they were cut from (``blocks.crops``, a :class:`Pieces`): one index map
per crop the tower encoded that kept a patch after unpadding (the base view first, then the high-res
crops in the tower's raster order), each in its own raster order; newline tokens are in none. A method
that works crop by crop (visionzip, as its LLaVA-NeXT code does) reads them; the others see the three
pieces only.

Signals: ``cls_attention`` and ``vision_attention`` are computed per crop (each crop's own [CLS] row, or
the attention each patch receives within its crop) and packed by the model's own ``pack_image_features``,
as the features are; newline tokens get 0 (they are not patches), so attention methods drop them first.
The budget stays per image: one top-k over the per-crop scores together (the FasterVLM and HiPrune
references budget each crop on its own). ``vision_keys`` and ``vision_features`` are each crop's, packed
the same way, with zero rows for the newline tokens, which have neither: they are given only to a request
that says it takes such rows (``missing="zeros"``: visionzip, which keeps and merges patches of crops
only) and refused otherwise, so a method that would project or merge a newline token's vision feature
is refused rather than given a wrong one.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from .base import ImageSlot, VisionCapture
from .llava import LlavaAdapter

#: what the newline token packs to when the adapter packs indices instead of features
_NEWLINE = -1.0


@dataclass
class PackedImage:
    """One image of a vision pass, laid out as the model packs it."""

    first_crop: int  # index of its base view among the crops the tower encoded
    n_crops: int
    #: per token, the crop×patch index (within this image's crops) it was packed from; -1 for newlines.
    #: Exact when packing only moves features (NeXT); OneVision's anyres_max may interpolate them.
    sources: torch.Tensor
    blocks: tuple[torch.Tensor, ...]
    size: object = None  # its image_sizes entry
    arguments: dict | None = None  # the packing options of its get_image_features call


class Pieces(tuple):
    """An image's 2D pieces (``VisualTokens.blocks``: base view, high-res grid, newline column) that also
    carries ``crops``: one index map per crop the pieces were cut from (see the module's docstring)."""

    crops: tuple = ()

    def __new__(cls, pieces, crops=()):
        made = super().__new__(cls, pieces)
        made.crops = tuple(crops)
        return made


def crop_maps(sources: torch.Tensor, newline: torch.Tensor, n_crops: int, side: int) -> tuple[torch.Tensor, ...]:
    """Per crop that kept a patch, the indices of its tokens (ascending: its raster order), as a rows×cols map
    where they form a rectangle of the crop's patch grid (always, unless OneVision's anyres_max interpolated
    them), else one row."""
    crop = torch.where(newline, -1, sources // (side * side))
    maps = []
    for index in range(n_crops):  # a handful of crops per image
        tokens = (crop == index).nonzero().squeeze(1)
        if not len(tokens):
            continue
        patch = sources[tokens] % (side * side)
        rows = len(torch.unique(patch // side))
        maps.append(tokens.view(rows, -1) if len(tokens) == rows * len(torch.unique(patch % side)) else tokens.view(1, -1))
    return tuple(maps)


class _BeforeCall:
    """A handle that wraps ``module.<name>`` on that one instance, so ``before(arguments)`` runs before
    each call; ``remove()`` puts back what was there."""

    def __init__(self, module: nn.Module, name: str, before):
        self.module, self.name = module, name
        self.previous = module.__dict__.get(name)
        original = getattr(module, name)
        signature = inspect.signature(original)

        @functools.wraps(original)  # generate() reads the signature to choose the arguments it passes
        def wrapped(*args, **kwargs):
            before(signature.bind(*args, **kwargs).arguments)
            return original(*args, **kwargs)

        module.__dict__[name] = wrapped

    def remove(self) -> None:
        if self.previous is None:
            self.module.__dict__.pop(self.name, None)
        else:
            self.module.__dict__[self.name] = self.previous


class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    frames_as_images = False  # an image is several crops (or tiles): video_frames= is not served
    model_classes = ("LlavaNextForConditionalGeneration", "LlavaNextModel")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self._next_images: list[PackedImage] | None = None  # laid out by get_image_features, for its tower pass

    def why_not(self, request) -> str | None:
        if request.name == "vision_tower":
            return ("its anyres images reach the LLM as crops cut, unpadded and joined by newline tokens after the "
                    "tower; merging inside the tower is served for single-view LLaVA models only")
        if request.name in ("vision_keys", "vision_features") and dict(request.params).get("missing") != "zeros":
            return ("its image_newline tokens (one per row) have no vision-tower key or feature (a method that never "
                    "keeps or merges them by these values asks with missing='zeros')")
        return super().why_not(request)

    def install_signal_hooks(self, wanted: tuple[str, ...], capture: VisionCapture) -> list:
        handles = super().install_signal_hooks(wanted, capture)

        def lay_out(arguments: dict) -> None:
            self._next_images = self._packed_images(arguments)

        return handles + [_BeforeCall(self.inner, "get_image_features", lay_out)]

    def open_capture(self, capture: VisionCapture, args: tuple, kwargs: dict) -> None:
        super().open_capture(capture, args, kwargs)
        images, self._next_images = self._next_images, None
        if images is not None:
            capture.inputs["images"] = images

    def _crop_counts(self, arguments: dict) -> list[int]:
        """Crops per image (base view included) of one ``get_image_features`` call."""
        pinpoints, crop_size = self.config.image_grid_pinpoints, self.vision_config.image_size
        return [image_size_to_num_patches(size, pinpoints, crop_size) for size in arguments["image_sizes"]]

    def _pack(self, values: torch.Tensor, newline: torch.Tensor, image_size, arguments: dict) -> torch.Tensor:
        """The model's own packing of one image's (crops, g², 1) values: (tokens, 1)."""
        strategy = arguments.get("vision_feature_select_strategy") or self.config.vision_feature_select_strategy
        return self.inner.pack_image_features([values], [image_size], strategy, image_newline=newline)[0][0]

    def _packed_images(self, arguments: dict) -> list[PackedImage]:
        side = self.vision_config.image_size // self.vision_config.patch_size
        base = side * side
        images, first_crop = [], 0
        for size, n_crops in zip(arguments["image_sizes"], self._crop_counts(arguments)):
            indices = torch.arange(n_crops * base, dtype=torch.float64).view(n_crops, base, 1)
            sources = self._pack(indices, torch.tensor([_NEWLINE], dtype=indices.dtype), size, arguments)[:, 0]
            newline = sources == _NEWLINE
            rows = int(newline.sum())
            high_res = len(sources) - base
            grid = base + torch.arange(high_res).view(rows, -1) if rows and high_res % rows == 0 else None
            if grid is None or newline[:base].any() or not newline[grid[:, -1]].all():
                raise RuntimeError(
                    f"{type(self.inner).__name__}.pack_image_features no longer lays out the base view, then "
                    f"rows ending in a newline token: this transformers version changed it"
                )
            pieces = (torch.arange(base).view(side, side), grid[:, :-1], grid[:, -1:])
            crops = crop_maps(sources.long(), newline, n_crops, side)
            blocks = Pieces((piece for piece in pieces if piece.numel()), crops)
            options = {key: arguments.get(key) for key in ("vision_feature_select_strategy", "vision_aspect_ratio")}
            images.append(PackedImage(first_crop, n_crops, sources.long(), blocks, size, options))
            first_crop += n_crops
        return images

    def slots(self, inputs: dict, capture: VisionCapture) -> list[ImageSlot]:
        images = capture.inputs.get("images")
        if images is None:
            raise ValueError(
                "image tokens reached the model but tokensieve saw no image encoding: pass pixel_values and "
                "image_sizes (not precomputed image features) to the model inside the apply() block"
            )
        crops = sum(image.n_crops for image in images)
        if crops != capture.inputs["pixel_shape"][0]:
            raise ValueError(
                f"image_sizes and image_grid_pinpoints give {crops} crops, but the vision tower encoded "
                f"{capture.inputs['pixel_shape'][0]}: build pixel_values and image_sizes with the model's processor"
            )
        lengths = [len(image.sources) for image in images]
        blocks = self.placeholder_blocks(
            inputs, lengths, f"{len(images)} image(s) of {lengths} tokens (from image_sizes)"
        )
        return [
            ImageSlot(row, positions, (1, length), index, image.blocks)
            for index, ((row, positions), image, length) in enumerate(zip(blocks, images, lengths))
        ]

    def image_signals(self, wanted, capture: VisionCapture, image: int) -> dict:
        packed = capture.inputs["images"][image]
        per_crop = [request for request in wanted if request.name in ("cls_attention", "vision_attention", "vision_keys", "vision_features")]
        signals = super().image_signals([request for request in wanted if request not in per_crop], capture, image)
        crops = range(packed.first_crop, packed.first_crop + packed.n_crops)
        for request in per_crop:
            if request.name == "vision_features":  # (crops, g², d_vision), the projector's input
                features = capture.tensors["vision_features"][packed.first_crop : packed.first_crop + packed.n_crops]
                signals[request] = self._pack(features, features.new_zeros(features.shape[-1]), packed.size, packed.arguments)
                continue
            values = torch.stack([self.tower_attention(request, capture, crop) for crop in crops])
            if request.name == "vision_keys":  # (crops, heads, g², d_head): the token axis last, as attention's
                values = values.transpose(2, 3)
            # (crops, g², channels): each crop's values (LLaVA's, one tower image per crop), channels last
            shape = values.shape[1:-1]
            channels_last = values.flatten(1, -2).transpose(1, 2)
            tokens = self._pack(channels_last, channels_last.new_zeros(channels_last.shape[-1]), packed.size, packed.arguments)
            tokens = tokens.T.reshape(*shape, -1)
            signals[request] = tokens.transpose(-1, -2) if request.name == "vision_keys" else tokens
        return signals
