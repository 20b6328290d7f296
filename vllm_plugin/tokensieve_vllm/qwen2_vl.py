"""vLLM's Qwen2-VL and Qwen2.5-VL with tokensieve's image-token reduction: ``TokensieveQwen2VLForConditionalGeneration``
and ``TokensieveQwen2_5_VLForConditionalGeneration``.

- The processor lays out, per image, as many ``<|image_pad|>`` placeholders as the method keeps of that image's
  ``(h/2, w/2)`` token grid (``methods.checked_count``: a pure function of the grid and the budget, checked before the
  request runs) and sends the method's spelling and that count with the image's pixels to the worker.
- ``embed_multimodal`` runs vLLM's tower and merger, then tokensieve's own method code on each image's tokens (raster
  order, as the merger returns them) and returns exactly the kept tokens, each with 4 extra channels: the mrope
  position (t, h, w) of its cell on the unpruned grid and the extent ``max(h, w)`` of the image's positions.
- vLLM's model runner then calls ``recompute_mrope_positions`` (Qwen2.5-VL's, which vLLM wrote for its EVS video
  pruning), which strips the channels and gives the kept tokens their cells' positions and the text after the image
  the positions it has in the unpruned prompt. So the tokens equal ``ts.apply(model, method)`` on the transformers
  model, original positions (docs/vllm.md). The runner calls it only when its multimodal config says pruning is on
  (``video_pruning_rate > 0``): the model switches that on in its worker's config (the plugin serves no videos, so
  EVS never runs).

Built on vLLM 0.32.0's Qwen2-VL internals (``_parse_and_validate_image_input``, ``_process_image_input``,
``_apply_hf_processor_main``, ``get_mrope_input_positions``, the runner's pruning path): pinned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from transformers import BatchFeature
from vllm.model_executor.models.qwen2_5_vl import (Qwen2_5_VLDummyInputsBuilder, Qwen2_5_VLForConditionalGeneration,
                                                   Qwen2_5_VLMultiModalProcessor, Qwen2_5_VLProcessingInfo)
from vllm.model_executor.models.qwen2_vl import (Qwen2VLDummyInputsBuilder, Qwen2VLForConditionalGeneration,
                                                 Qwen2VLMultiModalProcessor, Qwen2VLProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from . import CONFIGS, architecture_fix, methods
from .methods import COUNT_FIELD, METHOD_FIELD, REQUEST_KEY, ImageShape, UnservableMethod, server_default
from tokensieve.sieve import VisualTokens

QWEN2_VL = "TokensieveQwen2VLForConditionalGeneration"
QWEN2_5_VL = "TokensieveQwen2_5_VLForConditionalGeneration"
#: the channels each kept token's embedding carries to recompute_mrope_positions: t, h, w, and the image's extent
POSITION_CHANNELS = 4
#: a video pruning rate that only switches vLLM's model runner onto its pruning path (no video reaches the model)
PRUNING_SWITCH = 1e-6


def check_config(hf_config, architecture: str) -> None:
    """:class:`UnservableMethod` for a checkpoint the architecture does not cover."""
    expected = CONFIGS[architecture]
    if type(hf_config).__name__ != expected:
        raise UnservableMethod(f"{architecture} serves {expected} checkpoints; this model's config is "
                               f"{type(hf_config).__name__}: {architecture_fix(hf_config)}")


def image_shape(grid_thw, merge: int) -> ImageShape:
    """The LLM token grid of one image of ``grid_thw`` (1, h, w) patches: (h/merge, w/merge); the tower has no [CLS]."""
    t, h, w = (int(x) for x in grid_thw)
    if t != 1:
        raise UnservableMethod(f"image_grid_thw {[t, h, w]} has {t} frames: the plugin serves still images")
    return ImageShape((h // merge, w // merge), has_cls=False)


def served_count(spelling: str, shape: ImageShape) -> int:
    """How many tokens ``spelling`` keeps of an image of ``shape`` (:func:`methods.checked_count`), refusing a method
    that asks the tower for signals: the plugin's Qwen2-VL computes none (no [CLS]; its patch attention is not served)."""
    method = methods.served_method(spelling, shape.has_cls)
    if method is not None and (asked := methods.signals_asked(method, shape.has_cls)):
        raise UnservableMethod(f"{method.name} needs {', '.join(map(str, asked))}, which the plugin does not compute for "
                               f"Qwen2-VL; serve one of {', '.join(qwen_servable_names())}")
    return methods.checked_count(spelling, shape)


def qwen_servable_names() -> tuple[str, ...]:
    """The methods the plugin serves on Qwen2-VL: those it serves without [CLS] that ask the tower for nothing."""
    import tokensieve as ts

    return tuple(name for name in methods.servable_names(False) if not methods.signals_asked(ts.load(name), False))


def kept_positions(kept: torch.Tensor, shape: ImageShape) -> torch.Tensor:
    """(K, 4) for the kept tokens of one image: the mrope position (t, h, w) of each one's cell on the unpruned grid,
    relative to the image's first position, and ``max(h, w)``: where the text after the image continues in the
    unpruned prompt (stock Qwen2-VL numbers it from the image's largest position plus one; vLLM's EVS channel is the
    grid's width alone, which differs for a portrait image)."""
    rows, cols = kept // shape.grid[1], kept % shape.grid[1]
    extent = torch.full_like(kept, max(shape.grid))
    return torch.stack([torch.zeros_like(kept), rows, cols, extent], dim=1)


class _ProcessingInfo:
    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}  # videos would need their own counts and positions: not served

    def spelling(self, hf_kwargs: Mapping[str, object]) -> str:
        return methods.method_spelling(dict(hf_kwargs), server_default(self.get_hf_config()))


class _Processor:
    def _apply_hf_processor_main(self, mm_items: MultiModalDataItems, hf_kwargs: Mapping[str, object]) -> BatchFeature:
        # the HF processor does not know the plugin's key (Qwen3-VL's vLLM processor calls it from here, not through
        # _call_hf_processor); each image's method and count join its outputs after
        processed_data = super()._apply_hf_processor_main(mm_items, {k: v for k, v in hf_kwargs.items() if k != REQUEST_KEY})
        return self._with_kept_counts(processed_data, hf_kwargs)

    def _with_kept_counts(self, processed_data: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]) -> BatchFeature:
        grids = processed_data.get("image_grid_thw")
        if grids is None:
            return processed_data
        spelling = self.info.spelling(hf_processor_mm_kwargs)
        if processed_data.get("pixel_values") is None:
            if methods.served_method(spelling, False) is not None:
                raise UnservableMethod(f"{spelling}: images given as precomputed embeddings have no pixels to prune "
                                       f"from; pass the images, or tokensieve_method='none'")
            return processed_data
        merge = self.info.get_hf_config().vision_config.spatial_merge_size
        counts = [served_count(spelling, image_shape(grid, merge)) for grid in grids]
        processed_data[METHOD_FIELD] = methods.encode_spelling(spelling).expand(len(counts), -1).clone()
        processed_data[COUNT_FIELD] = torch.tensor(counts, dtype=torch.long)
        return processed_data

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
                              ) -> Mapping[str, MultiModalFieldConfig]:
        return {**super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs),
                METHOD_FIELD: MultiModalFieldConfig.batched("image"), COUNT_FIELD: MultiModalFieldConfig.batched("image")}

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        config = self.info.get_hf_config()
        image_token, merge = config.image_token_id, config.vision_config.spatial_merge_size

        def kept_placeholders(item_idx: int) -> list[int]:
            item = out_mm_kwargs["image"][item_idx]
            if COUNT_FIELD in item:
                return [image_token] * int(item[COUNT_FIELD].data)
            return [image_token] * image_shape(item["image_grid_thw"].data, merge).tokens  # precomputed embeddings

        return [PromptReplacement(modality="image", target=[image_token], replacement=kept_placeholders)]


class _Model:
    """What the Qwen architectures add to vLLM's model: the kept tokens with their positions, and the positions of a
    prompt laid out with the kept counts."""

    architecture: str
    supports_multimodal_pruning = True  # vLLM's SupportsMultiModalPruning: the runner calls recompute_mrope_positions

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        from . import check_vllm_version

        check_vllm_version()
        config = vllm_config.model_config.hf_config
        check_config(config, self.architecture)
        default = methods.method_spelling(None, server_default(config))
        methods.served_method(default, False)  # a bad server default fails at start (its count depends on the image)
        multimodal = vllm_config.model_config.multimodal_config
        if not multimodal.is_multimodal_pruning_enabled():
            multimodal.video_pruning_rate = PRUNING_SWITCH  # the runner's pruning path: see the module's docstring
        super().__init__(vllm_config=vllm_config, prefix=prefix)

    # vLLM's own, written for Qwen2.5-VL's EVS: strips the 4 channels, gives the kept tokens their positions and the
    # text after each image the positions from the image's extent on
    recompute_mrope_positions = Qwen2_5_VLForConditionalGeneration.recompute_mrope_positions

    def embed_multimodal(self, **kwargs: object):
        spellings, counts = kwargs.pop(METHOD_FIELD, None), kwargs.pop(COUNT_FIELD, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        merge = self.config.vision_config.spatial_merge_size
        embeddings = self._process_image_input(image_input)  # per image (N, d), raster order
        kept = []
        for index, (rows, grid) in enumerate(zip(embeddings, image_input["image_grid_thw"].tolist())):
            shape = image_shape(grid, merge)
            method = None if spellings is None else methods.served_method(methods.decode_spelling(spellings[index]), False)
            if method is None:
                chosen, indices = rows, torch.arange(len(rows), device=rows.device)
            else:
                chosen, indices = self.kept_rows(method, rows, shape)
                if len(chosen) != int(counts[index]):
                    raise RuntimeError(f"{method!r} kept {len(chosen)} tokens where the processor laid out "
                                       f"{int(counts[index])} placeholders: a tokensieve_vllm bug (methods.EXACT_COUNT)")
            kept.append(torch.cat([chosen, kept_positions(indices, shape).to(chosen.dtype)], dim=1))
        return kept

    def kept_rows(self, method, rows: torch.Tensor, shape: ImageShape) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows ``method`` keeps of one image's (N, d) merger output, and their indices."""
        return methods.kept_tokens(method, VisualTokens(rows, shape.grid, {}))

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[torch.Tensor, int]:
        """Stock Qwen2-VL numbers every cell of each image's grid, but the prompt holds only the kept count: the
        placeholders take the first cells' positions until ``recompute_mrope_positions`` gives them their kept
        cells', and the text after an image continues from the unpruned image's extent, as in the unpruned prompt."""
        merge = self.config.vision_config.spatial_merge_size
        pieces, start, next_position = [], 0, 0
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            offset, count = feature.mm_position.offset, feature.mm_position.length
            shape = image_shape(feature.data["image_grid_thw"].data, merge)
            text = offset - start
            pieces.append(np.broadcast_to(np.arange(text), (3, text)) + next_position)
            base = next_position + text
            pieces.append(kept_positions(torch.arange(count), shape)[:, :3].T.numpy() + base)
            next_position, start = base + max(shape.grid), offset + count
        tail = len(input_tokens) - start
        pieces.append(np.broadcast_to(np.arange(tail), (3, tail)) + next_position)
        positions = np.concatenate(pieces, axis=1)
        return torch.from_numpy(positions), int(positions.max() + 1 - len(input_tokens))


class TokensieveQwen2VLProcessingInfo(_ProcessingInfo, Qwen2VLProcessingInfo):
    pass


class TokensieveQwen2VLMultiModalProcessor(_Processor, Qwen2VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(TokensieveQwen2VLMultiModalProcessor, info=TokensieveQwen2VLProcessingInfo,
                                        dummy_inputs=Qwen2VLDummyInputsBuilder)
class TokensieveQwen2VLForConditionalGeneration(_Model, Qwen2VLForConditionalGeneration):
    architecture = QWEN2_VL


class TokensieveQwen2_5_VLProcessingInfo(_ProcessingInfo, Qwen2_5_VLProcessingInfo):
    pass


class TokensieveQwen2_5_VLMultiModalProcessor(_Processor, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(TokensieveQwen2_5_VLMultiModalProcessor, info=TokensieveQwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class TokensieveQwen2_5_VLForConditionalGeneration(_Model, Qwen2_5_VLForConditionalGeneration):
    architecture = QWEN2_5_VL
