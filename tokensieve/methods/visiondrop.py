"""``visiondrop``: VisionDrop's vision stage, dominant patches by [CLS] attention plus contextual tokens merged
by key similarity (VisionZip's rule at VisionDrop's split)."""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import register
from ..sieve import Selection, Sieve, VisualTokens
from .visionzip import VisionZip


@register
@dataclass
class VisionDrop(Sieve):
    """VisionDrop's pre-LLM (vision) stage: keep ``dominant`` patches by head-summed [CLS] attention at the
    vision feature layer and merge the rest into ``contextual`` tokens (targets at a uniform stride over the
    remaining patches, every other remaining patch joins its most similar target by head-mean key cosine,
    a contextual token is ``target + mean(members)`` in vision space, then projected).

    Paper: "Rethinking Visual Token Reduction in LVLMs under Cross-modal Misalignment" (Xu, Wang, Luo and Du,
    AAAI 2026, arXiv 2506.22283); code Ruixxxx/VisionDrop at f7a9444 (``llava/visionzip/``: ``clip_encoder.py``,
    ``utils.py``, ``main.py``; ``scripts/v1_5/visiondrop_eval/*.sh``). The code's vision stage *is* VisionZip's
    code: its ``llava/visionzip`` files equal dvlab-research/VisionZip's ``visionzip/clip_encoder.py`` and
    ``utils.py`` but for whitespace and a print, so the arithmetic here is :class:`VisionZip`'s, called with
    VisionDrop's split; only the budget and the split differ.

    Defaults: ``keep=48`` split 42 dominant + 6 contextual, the ``--dominant 42 --contextual 6`` of every
    evaluation script and the README (its "average 32 tokens" setting, the only one the code ships); with
    ``contextual=None`` other budgets keep that 1/8 (``round(keep * 6 / 48)``: 64 -> 56+8, 192 -> 168+24), a
    choice here; pass ``contextual`` to set it. Differences, as ``visionzip``: the code's 42 dominant count the
    [CLS] token (``visionzip()`` keeps ``dominant - 1`` = 41 patches plus [CLS]); stock HF LLaVA drops [CLS]
    before the projector, so all 42 go to patches; contextual tokens sit at their target's grid position
    instead of being appended after the dominant ones. The paper argues for visual-only (intra-modal) scores;
    on CLIP the code's vision stage scores by the [CLS] row, as here. No text is used.

    Not here: VisionDrop's later stages inside the LLM (``visiondrop_rank_drop`` in
    ``llava/model/modeling_llama_visiondrop.py``, after layers 8, 16 and 24: image queries' attention to image
    keys recomputed, head mean, mean over the image queries; dominant plus contextual by the LLM keys with the
    schedule ``[[30, 5], [22, 4], [16, 3]]``, 48 -> 35 -> 26 -> 19 tokens) are ``visiondrop_llm``; the full
    pipeline is the chain ``visiondrop+visiondrop_llm``. Needs what
    ``visionzip`` needs: towers without [CLS] (SigLIP, Qwen, Idefics3) and LLaVA-NeXT/OneVision (newline
    tokens have no keys or vision features) are refused.

    Adaptive budget (this library's): ``keep=ts.Adaptive(mass=0.9, min=16, max=None)`` sets ``dominant +
    contextual`` to the fewest patches whose head-summed [CLS] attention holds 90% of its mass (clamped to
    ``[min, max]``), split 7:1 as a fixed ``keep`` of that count is (as ``visionzip``'s).
    """

    name = "visiondrop"
    paper = "VisionDrop (arXiv 2506.22283)"
    signals = VisionZip.signals
    adaptive_rules = ("mass",)  # keep=ts.Adaptive(mass=0.9): the total holds 90% of the [CLS] attention

    keep: int | float = 48
    contextual: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        contextual = self.contextual
        if contextual is not None and (isinstance(contextual, bool) or not isinstance(contextual, int) or contextual < 0):
            raise ValueError(f"contextual must be a count >= 0 (or None for VisionDrop's 6 of every 48), not {contextual!r}")

    def split(self, k: int) -> tuple[int, int]:
        """(dominant, contextual) counts for a budget of ``k`` tokens: 42+6 at 48."""
        contextual = round(k * 6 / 48) if self.contextual is None else min(self.contextual, k - 1)
        return k - contextual, contextual

    def select(self, tokens: VisualTokens) -> Selection:
        k = self.budget.count(tokens["cls_attention"].sum(dim=0))
        return VisionZip(keep=k, contextual=self.split(k)[1]).select(tokens)
