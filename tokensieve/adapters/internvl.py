"""InternVL3 / InternVL3.5 (``InternVLForConditionalGeneration``): an InternViT tower with a [CLS] token, a
pixel-shuffle projector (``multi_modal_projector``) and a Qwen2-like decoder with 1D rotary positions.

**Tiles.** The processor cuts an image into square tiles (``crop_to_patches``: the crops of the best
grid in raster order, then a thumbnail of the whole image when there is more than one crop) and
stacks every tile of every image in ``pixel_values`` (tiles, 3, H, W), images in prompt order; video
frames are single tiles. The tower encodes each tile with its own [CLS] token, which
``get_image_features`` drops (``vision_feature_select_strategy="default"``); pixel shuffle then folds
each 2x2 square of the tile's SxS patches into one token, giving T = (S/2)² consecutive placeholders
per tile, tile after tile (``<img>``, T x tiles ``<IMG_CONTEXT>``, ``</img>``). Token t = r·S/2 + c of
a tile carries, in channel order, patches (2r, 2c), (2r, 2c+1), (2r+1, 2c), (2r+1, 2c+1): tower
sequence positions 1 + (2r+dr)·S + (2c+dc). The adapter finds that map by running the model's own
``pixel_shuffle`` on patch indices, so it follows the model.

**Images.** The model is told nothing of which tiles form one picture: an image is a run of
consecutive placeholders (the processor wraps each in ``<img>``/``</img>``), of T x its tiles tokens.
As for LLaVA-NeXT's crops, the budget covers the whole image: the sieve sees all its tokens with
``grid = (1, N)`` and one T-token block per tile (``VisualTokens.layout``), so grid methods work tile by
tile and ``per_crop=True`` shares the count among the tiles. A one-tile image (no crops, or a video
frame) is plainly its (S/2)x(S/2) grid.

**Signals**, per tile, then laid out tile after tile as the tokens are:

- ``cls_attention`` and ``vision_attention(queries="cls")``: the tile's own [CLS] row at the layer
  asked for, summed over each token's 4 patches. Summed, not averaged: the row is a distribution
  over the tile's patches, and the sum keeps it one over the tile's tokens (a token scores the
  attention mass of what it carries, comparable across tiles and with the per-patch rows of LLaVA).
  Every token carries exactly 4 patches, so the ranking, and any mass budget, equal the mean's.
- ``vision_attention(queries="mean")``: the attention each patch receives within its tile, averaged
  over the token's 4 patches, as the Idefics3 and Qwen2-VL adapters pool it (after HiPrune's reference).
- ``vision_keys``: the feature layer's keys of each token's 4 patches, concatenated per head in the
  projector's channel order: (heads, N, 4·d_head).
- ``vision_features``: the projector's input, the 4 patches' features concatenated (N, 4·d_vision);
  ``project`` is the projector, so ``project(vision_features)`` gives exactly the tokens the LLM sees.

Attention rows are recomputed from hooked queries and keys (after InternViT's optional q/k norms), so
the tower keeps its SDPA/FlashAttention kernel. Merging inside the tower (``vision_tower``) is refused:
pixel shuffle needs every patch of a tile.

Kept tokens keep their original positions and the decoder always gets an explicit 2D mask (engine):
without one, ``use_cache=False`` forwards would read the gaps in the positions as packed sequences.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..signals import Signal
from .attention import block_attention, block_keys, tap_blocks
from .base import ImageSlot, PlaceholderMismatch, VisionCapture
from .llava import LlavaAdapter, attention_with_qk

def _query_key(attention: nn.Module) -> tuple[nn.Module, nn.Module]:
    """InternViT's queries and keys as its kernel gets them: after ``q_norm``/``k_norm`` (Identity unless
    ``use_qk_norm``, as in InternViT-6B)."""
    norms = getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)
    if not all(isinstance(norm, nn.Module) for norm in norms):
        raise TypeError(f"{type(attention).__name__} has no q_norm/k_norm after its projections: this transformers "
                        f"version changed InternViT's attention")
    return norms


class InternVLAdapter(LlavaAdapter):
    family = "internvl"
    frames_as_images = False  # an image is several crops (or tiles): video_frames= is not served
    model_classes = ("InternVLForConditionalGeneration", "InternVLModel")
    signals = frozenset({"cls_attention", "vision_keys", "vision_attention", "vision_features", "project", "vision_tower"})

    def _side(self, pixel_shape) -> int:
        """Patches along a tile's side (S)."""
        return pixel_shape[-1] // self.vision_config.patch_size[-1]

    def _token_patches(self, side: int, device) -> torch.Tensor:
        """(T, 4) the tile's patch indices (row-major, [CLS] not counted) pixel shuffle folds into each token, in
        channel order, by the model's own function."""
        index = torch.arange(side * side, dtype=torch.float64, device=device).view(1, side, side, 1)
        shuffled = self.inner.pixel_shuffle(index, scale_factor=self.config.downsample_ratio)
        return shuffled.reshape(-1, shuffled.shape[-1]).long()

    def why_not(self, request: Signal) -> str | None:
        name = request.name
        if name == "vision_tower":
            return ("its projector folds each 2x2 square of a tile's patches into one token by pixel shuffle, which "
                    "needs every patch")
        if name not in ("cls_attention", "vision_keys", "vision_attention"):
            return None
        if self.config.vision_feature_select_strategy != "default":
            return "vision_feature_select_strategy is not 'default', so [CLS] is among the image tokens"
        try:
            _query_key(attention_with_qk(self._blocks()[0]))
        except TypeError as error:
            return str(error)
        if name == "cls_attention":
            layers = request.layers or (None,)
        else:
            layers = (request.layer if name == "vision_attention" else None,)
        return next((why for why in map(self.layer_problem, layers) if why), None)

    def install_signal_hooks(self, wanted, capture: VisionCapture) -> list:
        blocks, features = self._taps(wanted)
        layers = self._blocks()
        attentions = {block: attention_with_qk(layers[block]) for block in blocks}
        handles = tap_blocks(attentions, {block for block, full in blocks.items() if full}, capture, _query_key)
        if features:

            def keep_projector_input(module, args):
                # the first projector call after a vision pass; a sieve's own `project` calls come later
                capture.tensors.setdefault("vision_features", args[0].detach())

            handles.append(self.projector.register_forward_pre_hook(keep_projector_input))
        return handles

    def slots(self, inputs: dict, capture: VisionCapture) -> list[ImageSlot]:
        if not capture.seen:
            raise ValueError(
                "image tokens reached the model but tokensieve saw no vision pass: pass pixel_values "
                "(not precomputed image features) to the model inside the apply() block"
            )
        n_tiles, side = capture.inputs["pixel_shape"][0], self._side(capture.inputs["pixel_shape"])
        per_tile = self._token_patches(side, "cpu").shape[0]
        width = math.isqrt(per_tile)
        runs = self._placeholder_runs(inputs)
        lengths = [len(positions) for _, positions in runs]
        if any(length % per_tile for length in lengths) or sum(lengths) != n_tiles * per_tile:
            found = ("input_ids has" if inputs.get("input_ids") is not None
                     else "inputs_embeds has rows equal to the image token's embedding in")
            raise PlaceholderMismatch(
                f"the vision tower encoded {n_tiles} tile(s) of {per_tile} tokens, but {found} runs of {lengths} "
                f"image placeholder tokens: each image needs {per_tile} consecutive placeholders per tile (crops and "
                f"thumbnail), {n_tiles * per_tile} in all; build the inputs with the model's processor"
            )
        tiles = [length // per_tile for length in lengths]
        firsts = [sum(tiles[:i]) for i in range(len(tiles))]
        capture.inputs["tiles"] = list(zip(firsts, tiles))  # the image signals' tile ranges
        tile_grid = torch.arange(per_tile).view(width, width)
        slots = []
        for image, ((row, positions), count) in enumerate(zip(runs, tiles)):
            if count == 1:
                slots.append(ImageSlot(row, positions, (width, width), image))
            else:
                blocks = tuple(tile * per_tile + tile_grid for tile in range(count))
                slots.append(ImageSlot(row, positions, (1, count * per_tile), image, blocks))
        return slots

    def _placeholder_runs(self, inputs: dict) -> list[tuple[int, torch.Tensor]]:
        """(row, positions) of every run of consecutive image placeholders, in batch-row order (the order in which
        the model scatters the tiles' features)."""
        placed = self.placeholder_mask(inputs).nonzero()
        if not len(placed):
            return []
        rows, columns = placed[:, 0], placed[:, 1]
        starts = torch.ones(len(placed), dtype=torch.bool, device=placed.device)
        starts[1:] = (rows[1:] != rows[:-1]) | (columns[1:] != columns[:-1] + 1)
        first = starts.nonzero().squeeze(1)
        bounds = torch.cat([first, rows[first]]).tolist()  # one read back to the host
        begins, run_rows = bounds[: len(first)], bounds[len(first):]
        ends = begins[1:] + [len(placed)]
        return [(row, columns[begin:end]) for row, begin, end in zip(run_rows, begins, ends)]

    def _pooled(self, values: torch.Tensor, how: str) -> torch.Tensor:
        """(..., S²) values over a tile's patches -> (..., T) over its tokens: summed or averaged over each
        token's 4 patches."""
        patches = self._token_patches(math.isqrt(values.shape[-1]), values.device)
        per_token = values[..., patches]
        return per_token.sum(-1) if how == "sum" else per_token.mean(-1)

    def _tile_signal(self, request: Signal, capture: VisionCapture, tile: int) -> torch.Tensor:
        """One tile's value of an attention request over its T tokens: (heads, T), (layers, heads, T) for
        ``cls_attention(layers=...)``, or (heads, T, 4·d_head) for ``vision_keys``."""
        heads = self.vision_config.num_attention_heads
        if request.name == "vision_keys":
            keys = block_keys(capture, self.block_index(None), tile, heads)[:, 1:]  # (heads, S², d)
            patches = self._token_patches(math.isqrt(keys.shape[1]), keys.device)
            return keys[:, patches].flatten(2)
        if request.name == "vision_attention":
            rows = block_attention(capture, self.block_index(request.layer), tile, heads, request.queries)[:, 1:]
            return self._pooled(rows, "sum" if request.queries == "cls" else "mean")
        rows = [self._pooled(block_attention(capture, self.block_index(layer), tile, heads, "cls")[:, 1:], "sum")
                for layer in request.layers or (None,)]
        return rows[0] if request.layers is None else torch.stack(rows)

    def image_signals(self, wanted, capture: VisionCapture, image: int) -> dict:
        first, count = capture.inputs["tiles"][image]
        signals = {}
        for request in wanted:
            if request.name in ("cls_attention", "vision_keys", "vision_attention"):
                per_tile = [self._tile_signal(request, capture, tile) for tile in range(first, first + count)]
                token_axis = 2 if request.name == "cls_attention" and request.layers is not None else 1
                signals[request] = torch.cat(per_tile, dim=token_axis)
            elif request.name == "vision_features":
                signals[request] = capture.tensors["vision_features"][first : first + count].flatten(0, 1)
            elif request.name == "project":
                signals[request] = self.projector
        return signals
