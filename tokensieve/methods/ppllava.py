"""``ppllava``: PPLLaVA's prompt-guided pooling, the token grid pooled with weights from each token's relevance
to the instruction."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .._lazy import F, torch
from ..registry import register
from ..selection import cell_bounds, cell_centres, target_grid
from ..sieve import GridSieve, Selection, VisualTokens


def _positive(name: str, value, meaning: str, zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not zero):
        raise ValueError(f"{name} must be {meaning}, a finite number {'>= 0' if zero else '> 0'}, not {value!r}")


def _windows(size: int, cells: int, device) -> torch.Tensor:
    """(cells, size) True where a token lies in a cell's span (``selection.cell_bounds``)."""
    bounds = torch.tensor(cell_bounds(size, cells), device=device)
    at = torch.arange(size, device=device)
    return (at[None] >= bounds[:, :1]) & (at[None] < bounds[:, 1:])


@register
@dataclass
class PPLLaVA(GridSieve):
    """Pool the token grid to the largest h'×w' grid of at most ``keep`` cells (``pool``'s grid and cell
    spans: 64 -> 8×8, 128 -> 11×11, 192 -> 13×14 on 24×24), each cell the weighted sum of its tokens with
    weights that favour the tokens most relevant to the prompt. Relevance, over every token of the image:
    ``w_j = softmax_j(scale · c_j)``, ``c_j`` the mean cosine similarity of projected token j to the
    instruction's tokens (``text_embeddings``); in each cell the weights are sharpened again,
    ``a_j = softmax_{j in cell}(w_j / temperature)``, and the cell's token is ``sum_j a_j x_j``. Each pooled
    token stands at its cell's centre token's position (``pool``'s placement). Without instruction tokens
    (or with ``scale=0``) every weight is equal and this is ``pool``. ``w`` sums to one over the image, so the
    cell softmax is close to an arg-max only where ``w`` is concentrated on few tokens (equal weights on 576
    tokens give ``w / temperature = 0.17`` everywhere).

    Paper: "PPLLaVA: Varied Video Sequence Understanding With Prompt Guidance" (Liu et al., arXiv 2411.02327);
    code farewellthree/PPLLaVA at d5766c8e69 (``LLaVACLIP3DMultiModalProjector`` in
    ppllava/models/llava_projector.py, ``weighted_adaptive_avg_pool3d_unfold`` in ppllava/models/utils.py).
    Kept from the code: the global softmax of the scaled cosines over every token of the image (the code: over
    every crop's patches together), the per-window softmax of those probabilities divided by the temperature,
    and the weighted sum of the MLP-projected tokens. Defaults: ``temperature=0.01`` (the code's
    ``pooling_temp``), ``scale=100`` (the code's ``logit_scale.exp()``, CLIP ViT-L/14-336's, which is 100),
    ``keep=64`` (the code's image kernel = stride (1, 3, 3): 24×24 -> 8×8). **The published numbers come from
    PPLLaVA models trained with this pooling** (and with a CLIP text encoder whose position table was
    extended and trained); used training-free on other models, as here, expect less than reported.

    Differences: tokensieve has no CLIP text encoder, so relevance is not scored in CLIP's joint space (the
    CLIP text encoder's pooled embedding of the prompt against ``visual_projection(post_layernorm(patch))``):
    as ``cdpruner``, it uses the LLM's own input embeddings of the instruction (the prompt's text after the
    image) against the projected tokens, and averages the cosines over the instruction's tokens (the code has
    one pooled text vector). Cells are adaptive average pooling's spans (``selection.cell_bounds``), so any
    budget gives ``pool``'s grid; the code derives kernel and stride from the output size (stride = h // h',
    kernel = h - (h' - 1)·stride), which is the same windows when h' divides h (24 -> 8) but very wide ones
    otherwise (24 -> 13: kernel 12, stride 1). An image of several 2D pieces (LLaVA-NeXT's base view, high-res
    grid and newline column; ``VisualTokens.layout``) takes one softmax over all its tokens, newline tokens
    included, and pools each piece on its own with the budget shared by size (the code pools each 24×24 crop
    to 8×8 before unpadding and adds newlines afterwards). Images only (the code's video pooling, kernel
    (2, 3, 3) over frames, is not here). Computed in float32.
    """

    name = "ppllava"
    paper = "PPLLaVA (arXiv 2411.02327)"
    signals = ("text_embeddings",)
    crop_split = True  # select() hands the pieces to GridSieve.select, which shares the budget by size

    temperature: float = 0.01
    scale: float = 100.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("temperature", self.temperature, "the softmax temperature inside each cell")
        _positive("scale", self.scale, "the multiplier of the cosines before the global softmax", zero=True)

    def relevance(self, tokens: VisualTokens) -> torch.Tensor:
        """(N,) ``w``: the softmax over the image's tokens of ``scale`` times their mean cosine to the instruction."""
        unit = F.normalize(tokens.features.float(), dim=-1)
        text = tokens["text_embeddings"]
        if len(text) == 0:
            return unit.new_full((len(unit),), 1 / len(unit))
        cosine = (unit @ F.normalize(text.float().to(unit.device), dim=-1).T).mean(dim=1)
        return torch.softmax(self.scale * cosine, dim=0)

    def select(self, tokens: VisualTokens) -> Selection:
        # the relevance rides through GridSieve's split into pieces as one more channel, read off in resample
        carried = torch.cat([tokens.features.float(), self.relevance(tokens)[:, None]], dim=1)
        selection = super().select(VisualTokens(carried, tokens.grid, blocks=tokens.blocks))
        if selection.features is not None:
            selection.features = selection.features.to(tokens.features.dtype)
        return selection

    def resample(self, features: torch.Tensor, grid: tuple[int, int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The piece pooled to at most ``k`` cells, each the sum of its tokens weighted by the softmax of ``w / temperature``."""
        values, weights = features[:, :-1], features[:, -1]
        size = target_grid(grid, k)
        if size == grid:
            return torch.arange(features.shape[0]), values
        (h, w), (rows, cols) = grid, size
        inside = _windows(h, rows, values.device)[:, None, :, None] & _windows(w, cols, values.device)[None, :, None, :]
        logits = (weights / self.temperature).reshape(1, 1, h, w).masked_fill(~inside, -math.inf)
        pooled = logits.reshape(rows * cols, h * w).softmax(dim=-1) @ values
        return cell_centres(grid, size), pooled
