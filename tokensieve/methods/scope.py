"""``scope``: greedy saliency-weighted coverage (SCOPE): each step adds the token whose coverage gain, weighted by
its [CLS] attention, is largest."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import F, torch
from ..registry import register
from ..selection import coverage_greedy
from ..sieve import Selection, Sieve, VisualTokens

COMBINE = ("multiply", "add")
SPACES = ("vision", "projected")


@register
@dataclass
class SCOPE(Sieve):
    """Keep ``keep`` tokens chosen one at a time by the SCOPE score ``g_j * a_j ** alpha``: ``g_j`` the
    token-coverage gain ``sum_i max(0, cos(x_i, x_j) - c_i)`` over every token ``i`` (``c_i`` its best cosine to
    a token chosen so far, 0 at the start: facility-location coverage), ``a_j`` the head-summed [CLS] attention
    at the vision feature layer (saliency), ties to the lower index; kept indices in raster order. With
    ``alpha=0`` it is plain greedy coverage (``selection.coverage_greedy`` on the cosine matrix, tested);
    ``combine="add"`` scores ``g_j + a_j ** alpha`` instead. ``x`` are the vision features before the
    projector (``vision_space="vision"``, the code's ``hidden_states[-2]`` patches) or the projected tokens
    (``"projected"``, for LLaVA-NeXT, which gives no vision features).

    Paper: "SCOPE: Saliency-Coverage Oriented Token Pruning for Efficient Multimodel LLMs" (Deng, Li, Zhou
    and He, NeurIPS 2025, arXiv 2510.24214); code kinredon/SCOPE at 6bf7306 (``SCOPE`` and
    ``CLIPVisionTower_SCOPE`` in ``scope/clip_encoder.py``, ``scope/main.py``, ``run_scope_llava.sh``).
    Defaults as the code: ``alpha=1.0`` (env ``ALPHA``, 1.0 in both run scripts), ``combine="multiply"``
    (env ``COMBINED``, default ``multi``), saliency = ``attentions[-2]`` [CLS] row summed over heads, cosine
    of ``hidden_states[-2]`` patches ([CLS] excluded). ``keep=64``: the README's example budget (the code
    takes it as ``num_token``). Training-free: nothing is learnt.

    Differences: the greedy runs in float32 (the code: the model's dtype, fp16); the [CLS] row is recomputed
    from the feature layer's hooked q/k (the code runs the tower eagerly with ``output_attentions``); one
    budget per image in any batch (the code divides its budget by the number of images its tower sees at
    once). LLaVA-NeXT (``vision_space="projected"``): one budget per image over every crop, cosine of the
    projected tokens; newline tokens have saliency 0, so they score 0 when multiplied; the code selects
    ``int(keep / crops)`` in each crop on its vision features and drops every newline token (its LLaVA-NeXT
    run script sets ``BASELINE=VISIONZIPSUB``, which its model builder does not handle). The greedy is
    ``selection.coverage_greedy`` with the saliency as its per-column weight. Towers without [CLS] (SigLIP, so
    LLaVA-OneVision; Qwen; Idefics3) are refused.

    Adaptive budget (this library's): ``keep=ts.Adaptive(coverage=0.9, min=16, max=None)`` keeps the fewest of
    SCOPE's greedy picks (the same order as any ``keep``) whose coverage ``sum_i max(0, max_{j kept} cos(x_i,
    x_j))`` reaches 90% of every token's together (``N`` where no feature is zero), clamped to ``[min, max]``; as
    ``mmtok``'s. The saliency weights the order, not the coverage. ``Adaptive(mass=...)`` is refused: the
    picks are not the top of one score.
    """

    name = "scope"
    paper = "SCOPE (arXiv 2510.24214)"
    signals = ("cls_attention", "vision_features")
    adaptive_rules = ("coverage",)  # keep=ts.Adaptive(coverage=0.9): the fewest picks covering 90% of the tokens

    alpha: float = 1.0
    combine: str = "multiply"
    vision_space: str = "vision"

    def __post_init__(self) -> None:
        super().__post_init__()
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha < float("inf"):
            raise ValueError(f"alpha must be a finite number >= 0 (the saliency's exponent; 0 ignores it), not {alpha!r}")
        if self.combine not in COMBINE:
            raise ValueError(f"combine must be one of {COMBINE} (the coverage gain times or plus the saliency), "
                             f"not {self.combine!r}")
        if self.vision_space not in SPACES:
            raise ValueError(f"vision_space must be one of {SPACES} (vision features before the projector, or "
                             f"the projected tokens), not {self.vision_space!r}")

    def requests(self) -> tuple[str, ...]:
        return self.signals if self.vision_space == "vision" else ("cls_attention",)

    def select(self, tokens: VisualTokens) -> Selection:
        n = len(tokens)
        low, k, fraction = self.budget.coverage_steps(n)
        if k >= n and fraction is None:
            return Selection.every(tokens)
        features = tokens["vision_features"] if self.vision_space == "vision" else tokens.features
        unit = F.normalize(features.float(), dim=-1)
        saliency = tokens["cls_attention"].float().sum(dim=0) ** self.alpha
        chosen = scope_greedy(unit @ unit.T, saliency, k, self.combine == "add", fraction, low)
        return Selection(chosen.sort().values)


def scope_greedy(similarity: torch.Tensor, saliency: torch.Tensor, k: int, add: bool = False,
                 fraction: float | None = None, at_least: int = 1) -> torch.Tensor:
    """``k`` indices of the (N, N) ``similarity`` in the order chosen: each step the largest
    ``gain_j * saliency_j`` (``gain_j + saliency_j`` with ``add``), ``gain_j = sum_i max(0, similarity[i, j] -
    best_i)``, ``best_i`` row i's largest similarity to a chosen index (0 at the start); ties to the lower
    index, chosen indices never again. A step costs O(N²); picks stay on the device (no host read). With
    ``fraction``: the fewest of them (at least ``at_least``) whose coverage reaches that share of every
    index's (``coverage_greedy``'s threshold)."""
    return coverage_greedy(similarity, k, fraction, at_least, weight=saliency, add=add)
