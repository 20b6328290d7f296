"""SparseVLM's recycling (v1, v1.5): the best 30% (+1) of the tokens a stage dropped, by the stage's scores, become
``floor(m/10) + 1`` cluster means (density-peak clustering, DPC-KNN, of their hidden states), each standing at its
centre token's slot. The code's ``cluster_and_merge`` (Gumpest/SparseVLMs, ``llava/model/language_model/utils.py``)."""

from __future__ import annotations

import math

from .._lazy import torch
from ..selection import top_k_in_order
from ..sieve import Selection


def recycled(dropped: int) -> tuple[int, int]:
    """(candidates, clusters) of a stage that dropped ``dropped`` tokens: the top 30% + 1 and ``floor(m/10) + 1``."""
    candidates = int(dropped * 0.3) + 1
    return candidates, candidates // 10 + 1


def split_count(count: int, n: int) -> tuple[int, int]:
    """(top-k, clusters) of a recycling stage that leaves ``count`` of ``n`` tokens: the largest k with
    ``k + clusters(n - k) <= count`` (steps of 0 or 1 in k, so it meets ``count``); (count, 0) when none fits."""
    fits = next((k for k in range(count, 0, -1) if k + recycled(n - k)[1] <= count), None)
    return (count, 0) if fits is None else (fits, count - fits)


def dpc_knn(x: torch.Tensor, clusters: int, neighbours: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering with k-nearest-neighbour density (the code's ``cluster_and_merge``; k = ``neighbours``,
    None: ``clusters`` as in SparseVLM's code; HoliTom and PruneVid pass their own k) of ``x`` (m, d): distances
    ``|x_i - x_j| / sqrt(d)``, density ``exp(-mean of the k nearest squared)`` (itself
    included), each token's distance to its nearest denser token (the largest distance for the densest), centres the
    ``clusters`` largest ``distance · density``, every token to its nearest centre. Returns (centres (clusters,)
    indices into x, assignment (m,) into centres); ties to the lower index."""
    x = x.float()
    dist = torch.cdist(x[None], x[None], compute_mode="donot_use_mm_for_euclid_dist")[0] / math.sqrt(x.shape[-1])
    k = clusters if neighbours is None else neighbours
    density = (-(dist.topk(k, dim=-1, largest=False).values ** 2).mean(dim=-1)).exp()
    index = torch.arange(len(x), device=x.device)
    denser = (density[None, :] > density[:, None]) | ((density[None, :] == density[:, None]) & (index[None, :] < index[:, None]))
    parent = torch.where(denser, dist, dist.max()).min(dim=-1).values
    centres = torch.sort(parent * density, descending=True, stable=True).indices[:clusters]
    assignment = dist[centres].argmin(dim=0)
    assignment[centres] = torch.arange(clusters, device=x.device)
    return centres, assignment


def keep_and_recycle(scores: torch.Tensor, features: torch.Tensor, top: int, clusters: int) -> Selection:
    """The ``top`` best-scored tokens and ``clusters`` cluster means of the best dropped ones (a merge map: each
    cluster at its centre token's slot, the kept tokens and centres in raster order)."""
    n, device = len(scores), scores.device
    kept = top_k_in_order(scores, top)
    if not clusters:
        return Selection(kept)
    dropped = torch.ones(n, dtype=torch.bool, device=device)
    dropped[kept] = False
    dropped = dropped.nonzero().squeeze(1)
    candidates = dropped[torch.sort(scores[dropped], descending=True, stable=True).indices[: recycled(len(dropped))[0]]]
    centres, joined = dpc_knn(features[candidates], clusters)
    everything = torch.cat([kept, candidates[centres]]).sort().values
    assignment = torch.full((n,), -1, dtype=torch.long, device=device)
    assignment[everything] = torch.arange(len(everything), device=device)
    assignment[candidates] = torch.searchsorted(everything, candidates[centres][joined])
    return Selection(everything, assignment=assignment)
