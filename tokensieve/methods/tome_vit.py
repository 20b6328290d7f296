"""``tome_vit``: Token Merging inside the vision tower: fewer tokens reach its later layers, the projector and the LLM."""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import register
from ..sieve import Selection, Sieve, VisualTokens


@register
@dataclass
class ToMeViT(Sieve):
    """ToMe inside the ViT: from vision layer ``start_layer`` up to the layer whose output the model reads,
    merge tokens at each layer's input by bipartite soft matching on the previous layer's keys (head mean),
    as size-weighted means, a [CLS] token never merged, with proportional attention (the log of each token's
    size added to its attention logits) in every later layer; ``r`` tokens a layer, or (``r=None``) the
    merges the budget needs spread evenly over those layers. Each group reaches the LLM as one token, at
    the position of the patch that absorbed the others; the budget ``keep`` is the patch tokens left at the
    feature layer (with ``r`` set, a floor).

    Paper: "Token Merging: Your ViT But Faster" (Bolya et al., ICLR 2023, arXiv 2210.09461); official code
    facebookresearch/ToMe (``bipartite_soft_matching``, ``merge_wavg``, ``ToMeBlock``). Its settings are
    ``r`` per layer (8 and 16 in its ViT-L tables); here ``keep=64`` (the budget the other methods default
    to) and ``r=None`` unless given. Differences: ToMe merges inside each block, between attention and MLP,
    from the first block on; hooks act at block boundaries, so here a layer's merges happen at its input,
    after the previous block's MLP (which ran on the unmerged tokens), from ``start_layer=1``. A layer merges
    at most half its tokens in one round (as ToMe), and more rounds when its count needs them (ToMe never
    does). Only towers of stock LLaVA classes (CLIP, DINOv2, SigLIP) are served: windowed or 3D-rotary
    towers (Qwen2-VL, Qwen2.5-VL), pixel-shuffle connectors (Idefics3, SmolVLM) and anyres crops
    (LLaVA-NeXT, LLaVA-OneVision) are refused.
    """

    name = "tome_vit"
    paper = "ToMe (arXiv 2210.09461), inside the vision tower"
    stage = "in_vision"
    signals = ("vision_tower",)

    keep: int | float = 64
    r: int | None = None
    start_layer: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r is not None and (isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1):
            raise ValueError(f"r={self.r!r}: pass the tokens to merge per layer, an int >= 1 (ToMe's 8 or 16), or None")
        if isinstance(self.start_layer, bool) or not isinstance(self.start_layer, int) or self.start_layer < 1:
            raise ValueError(f"start_layer={self.start_layer!r}: pass the first vision layer to merge before, an int >= 1")

    def select(self, tokens: VisualTokens) -> Selection:
        raise TypeError("tome_vit merges inside the vision tower: apply it with ts.apply(model, ts.ToMeViT())")

    def merges(self, step: int, steps: int, patches: int, current: int) -> int:
        """Tokens to merge at merging layer ``step`` of ``steps``, with ``current`` of the image's ``patches`` left."""
        remaining = current - self.budget.resolve(patches)
        if remaining <= 0:
            return 0
        if self.r is not None:
            return min(self.r, remaining)
        return -(-remaining // (steps - step))
