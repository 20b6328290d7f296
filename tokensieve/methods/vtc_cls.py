"""``vtc_cls``: keep the patches the vision [CLS] token attends to most, summed over several vision layers."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import torch
from ..registry import register
from ..sieve import ScoringSieve, VisualTokens
from ..signals import Signal


@register
@dataclass
class VTCCLS(ScoringSieve):
    """Score each patch by the [CLS] query's attention to it, averaged over heads in each vision layer from
    ``first_layer`` to the penultimate one (-2) and summed over those layers; keep the top ``keep`` in raster
    order (no merging).

    Paper: "[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs" (Wang et al., arXiv
    2412.05819); code THU-MIG/VTC-CLS (e41ac9b: ``cls_token_only`` in
    llava/model/multimodal_encoder/clip_encoder.py, ``encode_images`` in llava/model/llava_arch.py). Checked
    against the code: per layer the head mean of the [CLS] row of ``attentions[l]`` with the [CLS] column
    dropped (the softmax over all 577 tokens, not renormalised), a plain sum over
    ``attentions[start_layer:-1]`` (no per-layer normalisation; a comment there names min or max as options),
    then ``topk(token_num)`` sorted back to raster order. The code's ``--layer`` (start layer) defaults to 16
    (0-based, ``model_vqa_loader.py``), i.e. ``attentions[16..22]``: the blocks whose outputs are
    ``hidden_states[17..23]`` of CLIP-L's 24, layers -8..-2 here, so ``first_layer=-8`` (7 layers).
    Layers count from the last so that the range ends at -2 on any depth; a positive ``first_layer`` is
    refused. ``keep=64``, the library's default and one of the budgets the paper reports (64/128/256, as
    transcribed); the code's ``--token_num`` defaults to 36 and its eval scripts take it as an argument.

    Differences: the [CLS] rows are recomputed from the hooked q/k of each layer (the code runs the whole
    tower with ``output_attentions=True``, eager), so SDPA/FlashAttention stay on. Ties go to the lower index
    in float32 (the code's fp16 ``topk`` breaks them arbitrarily). The code runs one LLaVA-1.5 image at a
    time with a hard-coded 576-token grid; here any grid and batch, and LLaVA-NeXT gets one budget per image
    over every crop's [CLS] scores (newline tokens score 0). A third-party transcription of the paper reports
    three layers (the penultimate and the two before it, ``first_layer=-4``) as its best ensemble; the
    default follows the code. Needs a [CLS] token: SigLIP, Qwen and Idefics3 towers refuse it.
    """

    name = "vtc_cls"
    paper = "VTC-CLS (arXiv 2412.05819)"
    signals = ("cls_attention",)

    first_layer: int = -8

    def __post_init__(self) -> None:
        super().__post_init__()
        first = self.first_layer
        if isinstance(first, bool) or not isinstance(first, int) or not first <= -2:
            raise ValueError(
                f"first_layer must count from the last vision layer, -2 or below (the range ends at -2, the "
                f"penultimate; -8 is the code's --layer 16 on a 24-layer CLIP), not {first!r}"
            )

    def requests(self) -> tuple[Signal, ...]:
        return (Signal("cls_attention", layers=tuple(range(self.first_layer, -1))),)

    def score(self, tokens: VisualTokens) -> torch.Tensor:
        # (layers, heads, N): head mean in each layer, then the plain sum over layers, as the code does
        return tokens[self.requests()[0]].float().mean(dim=1).sum(dim=0)
