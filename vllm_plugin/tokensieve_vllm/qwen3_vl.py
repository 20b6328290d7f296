"""vLLM's Qwen3-VL with tokensieve's image-token reduction: ``TokensieveQwen3VLForConditionalGeneration``.

Qwen2-VL's plugin (qwen2_vl.py: placeholders laid out with the kept counts, kept tokens at their unpruned mrope
positions through vLLM's ``recompute_mrope_positions``), plus Qwen3-VL's DeepStack: the tower also projects the patch
states of a few of its blocks (``deepstack_visual_indexes``) to one set of rows per image token and level, which the
LLM adds to the image positions after its first decoder layers. vLLM 0.32 carries them through ``embed_multimodal``
as extra columns of each image token's embedding ((N, d * (1 + levels)): the embedding, then each level's row), and
its ``embed_input_ids`` splits them off after the runner's pruning path has stripped the position channels (vLLM's own
EVS video pruning for Qwen3-VL prunes whole rows the same way). So the method sees the embeddings alone and each kept
token keeps its own DeepStack rows, at the same index, as tokensieve's engine keeps them (a merge map's group means
apply to them too): the tokens equal ``ts.apply(model, method)`` on the transformers model, original positions.

Positions travel as Qwen2.5-VL's 4 channels (t, h, w and the image's extent), not Qwen3-VL's own 5: vLLM continues the
text after an image from the largest position among the 5-channel rows it is given, which for a pruned image is
the largest kept one, not the unpruned image's extent.

Built on vLLM 0.32.0's Qwen3-VL internals (``_parse_and_validate_image_input``, ``_process_image_input``, the
DeepStack column layout of ``_compute_deepstack_embeds``, ``_apply_hf_processor_main``): pinned.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.qwen3_vl import (Qwen3VLDummyInputsBuilder, Qwen3VLForConditionalGeneration,
                                                 Qwen3VLMultiModalProcessor, Qwen3VLProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import BaseProcessingInfo

from . import QWEN3_VL_ARCHITECTURE, methods
from .methods import ImageShape
from .qwen2_vl import _Model, _ProcessingInfo, _Processor
from tokensieve.sieve import VisualTokens


class TokensieveQwen3VLProcessingInfo(_ProcessingInfo, Qwen3VLProcessingInfo):
    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        # Qwen3-VL's adds its video options to a videos scope, which a model serving images only has not
        return BaseProcessingInfo.get_supported_mm_processor_kwargs(self)


class TokensieveQwen3VLMultiModalProcessor(_Processor, Qwen3VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(TokensieveQwen3VLMultiModalProcessor, info=TokensieveQwen3VLProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class TokensieveQwen3VLForConditionalGeneration(_Model, Qwen3VLForConditionalGeneration):
    architecture = QWEN3_VL_ARCHITECTURE

    def kept_rows(self, method, rows: torch.Tensor, shape: ImageShape) -> tuple[torch.Tensor, torch.Tensor]:
        """The method chooses among the embeddings (the first ``visual_dim`` columns); each kept token's DeepStack
        columns follow it."""
        embeddings, deepstack = rows[:, :self.visual_dim], rows[:, self.visual_dim:]
        return methods.kept_tokens(method, VisualTokens(embeddings, shape.grid, {}), carried=deepstack)
