"""``zoo``: ZOO-Prune, zeroth-order sensitivity of the projector times diversity, greedily."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import F, torch
from ..registry import register
from ..sieve import Selection, Sieve, VisualTokens

#: projector rows per call while estimating sensitivity (directions are batched up to this many rows)
ROWS_PER_CALL = 1 << 15


@register
@dataclass
class ZOOPrune(Sieve):
    """Keep ``keep`` tokens by sensitivity-aware diverse selection (SADS).

    Sensitivity of token i: a central-difference (zeroth-order) estimate of how much the projector ``P``
    moves when its input ``z_i`` (``vision_features``) moves, ``S_i = mean_s ||P(z_i + h u_s) - P(z_i - h u_s)|| / 2h``
    over ``samples`` random unit directions ``u_s`` (standard normal, normalised), the same directions for
    every token. ``S`` is min-max normalised to ``Ŝ``. Greedy: the first token is the most sensitive one, then
    each step adds the token maximising ``Ŝ_i · min_{j chosen} (1 - cos(x_i, x_j))`` over the projected tokens
    ``x`` (ties to the lower index); kept indices in raster order.

    Cost: ``2 · samples`` extra projector passes over the image's N tokens, batched into calls of at most
    ``ROWS_PER_CALL`` (32768) rows (LLaVA-1.5's 576 tokens at 64 directions: 4 calls), then an N×N cosine
    matrix and ``keep`` greedy steps of O(N). No backpropagation, no attention.

    Paper: "Training-Free Token Pruning via Zeroth-Order Gradient Estimation in Vision-Language Models"
    (CVPR 2026, arXiv 2509.24837); code AIM-SKKU/ZOO-Prune (``LLaVA/llava/model/llava_arch.py`` at
    159f7f9607807c33b350a2add0bb4d82cf960dd8: ``prepare_inputs_labels_for_multimodal`` and
    ``select_tokens_sads``; ``run_zoo_prune.sh`` at 761702ab). Defaults as the code and the paper:
    ``samples=64`` (``NOISERECOV_NUM``), ``h=0.01`` (``NOISERECOV_INTENS``), central differences, directions
    shared by all tokens, diversity on the projected tokens (the code passes ``image_features[0]``, the
    projector's output, though its docstring says the pre-projector features); ``keep=64`` is this library's
    default budget (the script's ratio 0.1112 of 576). ``seed=0`` is this library's: the code draws from
    the global RNG.

    Differences: the directions come from a ``torch.Generator`` seeded with ``seed`` on the features'
    device, so a selection is reproducible (CPU and CUDA draw different directions). They are drawn in
    float32, added in float32 and cast to the vision features' dtype before the projector (the code casts to
    float16 whatever the model); differences are taken in float32. A step of 0.01 along a unit direction is
    near the resolution of half precision: on a random GELU MLP (256 -> 512, 16 directions) the rank
    correlation of the sensitivities with float32's is 0.82 in float16 (the code's precision) and 0.52 in
    bfloat16 at ``h=0.01``, 0.998 and 0.88 at ``h=0.1``, so raise ``h`` on bfloat16 models. An affine
    projector (Idefics3/SmolVLM's connector) gives every token the same sensitivity up to rounding; a spread
    of sensitivities below 1e-3 of the largest is taken as none (all weights 1, the code's rule for an exactly
    flat score) instead of min-max normalising rounding noise. LLaVA-NeXT/OneVision are refused (their newline tokens have no vision features; the
    code's NeXT variant is not ported).
    """

    name = "zoo"
    paper = "ZOO-Prune (arXiv 2509.24837)"
    signals = ("vision_features", "project")

    samples: int = 64
    h: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"samples must be a count of random directions >= 1, not {self.samples!r}")
        if isinstance(self.h, bool) or not isinstance(self.h, (int, float)) or not self.h > 0:
            raise ValueError(f"h must be a perturbation size > 0 (the paper's 0.01), not {self.h!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, not {self.seed!r}")

    def sensitivity(self, vision: torch.Tensor, project) -> torch.Tensor:
        """(N,) float32 ``S_i``: the mean over the random directions of ``||P(z_i + h u) - P(z_i - h u)|| / 2h``."""
        n, d = vision.shape
        generator = torch.Generator(device=vision.device).manual_seed(self.seed)
        directions = torch.randn(self.samples, d, generator=generator, device=vision.device, dtype=torch.float32)
        directions = directions / (directions.norm(dim=-1, keepdim=True) + 1e-12)
        base = vision.float().unsqueeze(0)
        total = torch.zeros(n, device=vision.device)
        step = max(1, ROWS_PER_CALL // max(1, n))
        for start in range(0, self.samples, step):  # chunks of directions, each one batch of rows
            shift = self.h * directions[start : start + step].unsqueeze(1)  # (s, 1, d)
            plus = project((base + shift).to(vision.dtype).reshape(1, -1, d)).float()
            minus = project((base - shift).to(vision.dtype).reshape(1, -1, d)).float()
            total += (plus - minus).reshape(len(shift), n, -1).norm(dim=-1).sum(dim=0)
        return total / (2 * self.h * self.samples)

    def select(self, tokens: VisualTokens) -> Selection:
        n = len(tokens)
        k = self.budget.resolve(n)
        if k >= n:
            return Selection.every(tokens)
        weights = normalised(self.sensitivity(tokens["vision_features"], tokens["project"]))
        return Selection(sensitive_diverse(tokens.features, weights, k).sort().values)


def normalised(scores: torch.Tensor, flat: float = 1e-3) -> torch.Tensor:
    """Min-max normalised ``scores`` (the code's ``+1e-8`` in the denominator); all ones when their spread is at
    most ``flat`` times the largest absolute score (equal up to rounding)."""
    low, high = scores.min(), scores.max()
    spread = high - low
    scaled = (scores - low) / (spread + 1e-8)
    return torch.where(spread > flat * scores.abs().max(), scaled, torch.ones_like(scores))


def sensitive_diverse(features: torch.Tensor, weights: torch.Tensor, k: int) -> torch.Tensor:
    """ZOO-Prune's greedy (SADS), in the order chosen: first the largest weight, then each step the token
    maximising ``weight · min cosine distance to the chosen ones``; ties to the lower index. A running minimum
    replaces the code's minimum over every chosen row (the same values), so a step costs O(N)."""
    unit = F.normalize(features.float(), dim=-1)
    distance = 1.0 - unit @ unit.T
    n = distance.shape[0]
    weights = weights.float()
    chosen = torch.empty(k, dtype=torch.long, device=features.device)
    # picks stay one-element tensors: indexing with a 0-d tensor would stall a GPU once per step
    pick = weights.argmax(dim=0, keepdim=True)
    chosen[:1] = pick
    nearest = distance.index_select(0, pick).squeeze(0)
    taken = weights.new_zeros(n).index_fill_(0, pick, float("-inf"))
    for step in range(1, min(k, n)):
        pick = (nearest * weights + taken).argmax(dim=0, keepdim=True)
        chosen[step : step + 1] = pick
        nearest = torch.minimum(nearest, distance.index_select(0, pick).squeeze(0))
        taken.index_fill_(0, pick, float("-inf"))
    return chosen
