"""vLLM's LLaVA-1.5 with tokensieve's image-token reduction: ``TokensieveLlavaForConditionalGeneration``.

- The processor lays out, per image, as many ``<image>`` placeholders as the method keeps
  (``methods.checked_count``: a pure function of the image's token count, grid and budget, checked before the
  request runs) and sends the method's spelling and that count with the image's pixels to the worker.
- ``embed_multimodal`` runs the whole tower and the projector as vLLM's LLaVA does, then tokensieve's own method
  code on each image's tensors (``methods.kept_embeddings``) and returns exactly the kept tokens.

vLLM numbers the kept tokens' positions without gaps: the tokens equal ``ts.apply(model, method,
positions="repack")`` on the transformers model (docs/vllm.md). Built on vLLM 0.32.0's LLaVA internals
(``_parse_and_validate_image_input``, ``_process_image_pixels``, ``_postprocess_hf_mm_data``): pinned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from transformers import BatchFeature, CLIPVisionConfig, LlavaConfig, SiglipVisionConfig
from vllm.model_executor.models.llava import (LlavaDummyInputsBuilder, LlavaForConditionalGeneration,
                                              LlavaImagePixelInputs, LlavaMultiModalProcessor, LlavaProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from . import architecture_fix, methods
from .methods import COUNT_FIELD, METHOD_FIELD, REQUEST_KEY, ImageShape, UnservableMethod, server_default

ARCHITECTURE = "TokensieveLlavaForConditionalGeneration"


def image_shape(hf_config) -> ImageShape:
    """The token grid of a LLaVA-1.5 image, or :class:`UnservableMethod` for a model the plugin does not cover."""
    if not isinstance(hf_config, LlavaConfig):
        raise UnservableMethod(f"{ARCHITECTURE} serves LLaVA-1.5 checkpoints (LlavaConfig); this model's config is "
                               f"{type(hf_config).__name__}: {architecture_fix(hf_config)}")
    vision = hf_config.vision_config
    if not isinstance(vision, (CLIPVisionConfig, SiglipVisionConfig)) or not isinstance(hf_config.vision_feature_layer, int):
        raise UnservableMethod(f"{ARCHITECTURE} serves LLaVA-1.5 with a CLIP or SigLIP tower and one feature layer; this "
                               f"model has a {type(vision).__name__} tower, vision_feature_layer="
                               f"{hf_config.vision_feature_layer!r}")
    side = vision.image_size // vision.patch_size
    strategy = hf_config.vision_feature_select_strategy
    has_cls = isinstance(vision, CLIPVisionConfig) and strategy == "default"
    if strategy != "default" and isinstance(vision, CLIPVisionConfig):
        raise UnservableMethod(f"vision_feature_select_strategy={strategy!r} keeps CLIP's [CLS] among the image tokens, "
                               f"which has no place on the image grid: {ARCHITECTURE} serves 'default'")
    return ImageShape((side, side), has_cls)


class TokensieveLlavaProcessingInfo(LlavaProcessingInfo):
    def image_shape(self) -> ImageShape:
        return image_shape(self.get_hf_config())

    def count_for(self, hf_kwargs: Mapping[str, object]) -> tuple[str, int]:
        """The method spelling a request asks for and how many tokens it keeps of each image."""
        spelling = methods.method_spelling(dict(hf_kwargs), server_default(self.get_hf_config()))
        return spelling, methods.checked_count(spelling, self.image_shape())


class TokensieveLlavaMultiModalProcessor(LlavaMultiModalProcessor):
    def _call_hf_processor(self, hf_data, hf_kwargs) -> BatchFeature:
        # the HF processor does not know the plugin's key
        return super()._call_hf_processor(hf_data, {k: v for k, v in hf_kwargs.items() if k != REQUEST_KEY})

    def _postprocess_hf_mm_data(self, mm_inputs, hf_processor_mm_kwargs, processed_data: BatchFeature) -> BatchFeature:
        processed_data = super()._postprocess_hf_mm_data(mm_inputs, hf_processor_mm_kwargs, processed_data)
        pixels = processed_data.get("pixel_values")
        spelling, count = self.info.count_for(hf_processor_mm_kwargs)
        if pixels is None:
            if processed_data.get("image_embeds") is not None and methods.served_method(spelling, True) is not None:
                raise UnservableMethod(f"{spelling}: images given as precomputed embeddings have no tower signals and no "
                                       f"pixels to prune from; pass the images, or tokensieve_method='none'")
            return processed_data
        n_images = len(pixels)
        processed_data[METHOD_FIELD] = methods.encode_spelling(spelling).expand(n_images, -1).clone()
        processed_data[COUNT_FIELD] = torch.full((n_images,), count, dtype=torch.long)
        return processed_data

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
                              ) -> Mapping[str, MultiModalFieldConfig]:
        return {**super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs),
                METHOD_FIELD: MultiModalFieldConfig.batched("image"), COUNT_FIELD: MultiModalFieldConfig.batched("image")}

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        image_token = self.info.get_hf_config().image_token_index
        _, count = self.info.count_for(hf_processor_mm_kwargs)
        return [PromptReplacement(modality="image", target=[image_token], replacement=[image_token] * count)]


@MULTIMODAL_REGISTRY.register_processor(TokensieveLlavaMultiModalProcessor, info=TokensieveLlavaProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class TokensieveLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        from . import check_vllm_version

        check_vllm_version()
        config = vllm_config.model_config.hf_config
        self.image = image_shape(config)
        default = methods.method_spelling(None, server_default(config))
        methods.checked_count(default, self.image)  # a bad server default fails at start, not at the first request
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._qkv: torch.Tensor | None = None
        if self.image.has_cls:  # the feature layer is the last one vLLM builds (it truncates the tower there)
            feature_layer = self.vision_tower.vision_model.encoder.layers[-1]
            feature_layer.self_attn.qkv_proj.register_forward_hook(self._keep_qkv)

    def _keep_qkv(self, module, args, output) -> None:
        self._qkv = output[0] if isinstance(output, tuple) else output

    def embed_multimodal(self, **kwargs: object):
        spellings, counts = kwargs.pop(METHOD_FIELD, None), kwargs.pop(COUNT_FIELD, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if spellings is None or not isinstance(image_input, LlavaImagePixelInputs):
            return self._process_image_input(image_input)
        features = self._process_image_pixels(image_input)  # (images, N, d_vision): the projector's input
        embeddings = self.multi_modal_projector(features)
        qkv, self._qkv = self._qkv, None
        kept = []
        for index in range(len(embeddings)):
            spelling = methods.decode_spelling(spellings[index])
            method = methods.served_method(spelling, self.image.has_cls)
            if method is None:
                kept.append(embeddings[index])
                continue
            tokens = methods.image_tokens(
                method, embeddings[index], self.image.grid, qkv=qkv[index] if qkv is not None else None,
                heads=self.config.vision_config.num_attention_heads, features=features[index],
                projector=self.multi_modal_projector)
            chosen = methods.kept_embeddings(method, tokens, self.image.grid)
            if len(chosen) != int(counts[index]):
                raise RuntimeError(f"{method!r} kept {len(chosen)} tokens where the processor laid out {int(counts[index])} "
                                   f"placeholders: a tokensieve_vllm bug (methods.EXACT_COUNT)")
            kept.append(chosen)
        return kept
