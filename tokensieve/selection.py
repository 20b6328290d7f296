"""Algorithms shared by several sieves. Each works on one image's tokens and returns indices."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def top_k_in_order(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, in ascending (raster) order.

    Scores are compared in float32 and ties go to the lower index (a stable sort), so the
    selection does not depend on the dtype the model runs in or on the top-k kernel.
    """
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    return order[:k].sort().values


def farthest_point(features: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min diversity (Gonzalez k-center) on cosine distance, in raster order.

    Seeds with the token farthest from its nearest neighbour, then repeatedly adds the token whose
    distance to the chosen set is largest. A running minimum keeps it O(k·N) after the N×N matrix.
    """
    unit = F.normalize(features.float(), dim=-1)
    distance = 1.0 - unit @ unit.T
    n = distance.shape[0]
    chosen = torch.empty(k, dtype=torch.long, device=features.device)
    to_set = distance.clone()
    to_set.fill_diagonal_(float("inf"))
    # Picks stay one-element tensors: indexing with a 0-d tensor would read it back to the host and
    # stall a GPU once per step.
    pick = to_set.min(dim=1).values.argmax(dim=0, keepdim=True)
    chosen[:1] = pick
    to_set = distance.index_select(0, pick).squeeze(0).index_fill(0, pick, -float("inf"))
    for step in range(1, min(k, n)):
        pick = to_set.argmax(dim=0, keepdim=True)
        chosen[step : step + 1] = pick
        to_set = torch.minimum(to_set, distance.index_select(0, pick).squeeze(0)).index_fill_(0, pick, -float("inf"))
    return chosen.sort().values


def strided(n: int, k: int) -> torch.Tensor:
    """``k`` indices spread evenly over ``range(n)`` (the first one always included)."""
    step = max(1, n // k)
    return torch.arange(0, n, step)[:k]


def split_budget(sizes: list[int], k: int) -> list[int]:
    """``k`` shared among parts of the given sizes in proportion to them (largest remainder, ties to
    the earlier part); no part gets more than its size."""
    total = sum(sizes)
    if k >= total:
        return list(sizes)
    exact = [k * size / total for size in sizes]
    shares = [int(x) for x in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: shares[i] - exact[i])
    for i in by_remainder[: k - sum(shares)]:
        shares[i] += 1
    return shares


def grid_subsample(grid: tuple[int, int], k: int) -> torch.Tensor:
    """About ``k`` raster indices on an even 2D lattice over an ``h×w`` grid, exactly ``k`` of them.

    Picks the lattice with rows×cols closest to ``k`` from above that keeps the grid's aspect,
    takes the cell centres, and trims the surplus evenly so the count is exact.
    """
    h, w = grid
    rows = max(1, min(h, round((k * h / w) ** 0.5)))
    cols = max(1, min(w, -(-k // rows)))
    while rows * cols < k:
        rows = min(h, rows + 1)
        cols = max(1, min(w, -(-k // rows)))
    ys = ((torch.arange(rows) + 0.5) * h / rows).long()
    xs = ((torch.arange(cols) + 0.5) * w / cols).long()
    lattice = (ys[:, None] * w + xs[None, :]).flatten()
    return lattice[strided(lattice.numel(), k)] if lattice.numel() > k else lattice


def merge_into_targets(
    hidden: torch.Tensor, metric: torch.Tensor, targets: torch.Tensor, members: torch.Tensor
) -> torch.Tensor:
    """VisionZip's contextual merge: each member joins its most cosine-similar target (by ``metric``);
    a target becomes ``hidden[target] + mean(hidden[members])`` (unchanged if it has none)."""
    unit = F.normalize(metric.float(), dim=-1)
    assignment = (unit[members] @ unit[targets].T).argmax(dim=1)
    sums = torch.zeros(len(targets), hidden.shape[-1], dtype=torch.float32, device=hidden.device)
    sums.index_add_(0, assignment, hidden[members].float())
    counts = torch.bincount(assignment, minlength=len(targets)).clamp(min=1).unsqueeze(1)
    return (hidden[targets].float() + sums / counts).to(hidden.dtype)


@dataclass
class Merge:
    """What merging left of one image's N tokens: the kept tokens (ascending original indices, each
    standing at its representative's position), their features, how many originals each holds, and
    for every original token the kept token it went into (an index into ``kept``)."""

    kept: torch.Tensor  # (k,)
    features: torch.Tensor  # (k, d)
    sizes: torch.Tensor  # (k,) originals per kept token, summing to N
    assignment: torch.Tensor  # (N,) position in ``kept`` of the token each original joined


def bipartite_merge(features: torch.Tensor, metric: torch.Tensor, k: int) -> Merge:
    """ToMe's bipartite soft matching, repeated until exactly ``k`` tokens are left.

    Each round splits the current tokens alternately into sets A and B (in order), joins each A token to
    its most cosine-similar B token by ``metric``, and merges the ``r`` A tokens with the most similar
    partners into them (``r``: at most half the tokens, as ToMe, and never below ``k``); merged features
    and metrics are size-weighted means, so a kept token's features are the mean of every original
    token it holds. Ties in similarity go to the earlier A token.
    """
    n = features.shape[0]
    device = features.device
    values, keys = features.float(), metric.float()
    sizes = torch.ones(n, device=device)
    positions = torch.arange(n, device=device)  # each current token's representative (a B token's own index)
    owner = torch.arange(n, device=device)  # each original token's current token
    while len(positions) > k:
        m = len(positions)
        r = min(m - k, m // 2)  # at most half the tokens a round, as ToMe
        a, b = torch.arange(0, m, 2, device=device), torch.arange(1, m, 2, device=device)
        unit = F.normalize(keys, dim=-1)
        best, partner = (unit[a] @ unit[b].T).max(dim=1)
        ranked = torch.sort(best, descending=True, stable=True).indices
        src, dst = a[ranked[:r]], b[partner[ranked[:r]]]
        target = torch.arange(m, device=device)  # each current token's token after this round
        target[src] = dst
        survivors = torch.ones(m, dtype=torch.bool, device=device)
        survivors[src] = False
        renumber = survivors.cumsum(0) - 1
        weights = sizes.unsqueeze(1)
        new_sizes = torch.zeros(m, device=device).index_add_(0, target, sizes)
        values = torch.zeros_like(values).index_add_(0, target, values * weights)[survivors] / new_sizes[survivors, None]
        keys = torch.zeros_like(keys).index_add_(0, target, keys * weights)[survivors] / new_sizes[survivors, None]
        sizes, positions = new_sizes[survivors], positions[survivors]
        owner = renumber[target[owner]]
    return Merge(positions, values.to(features.dtype), sizes, owner)


def left_packed(keep: torch.Tensor, own_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the indices of kept tokens, left-padded to the longest row, and their 2D mask."""
    counts = keep.sum(1)
    width = int(counts.max())
    rows, columns = keep.nonzero(as_tuple=True)  # row-major: each row's kept tokens in order
    # a kept token's slot: past its row's left padding, then its rank among the row's kept tokens
    rank = torch.arange(len(rows), device=keep.device) - (counts.cumsum(0) - counts)[rows]
    slot = width - counts[rows] + rank
    index = torch.zeros(keep.shape[0], width, dtype=torch.long, device=keep.device)
    mask = torch.zeros(keep.shape[0], width, dtype=own_mask.dtype, device=keep.device)
    index[rows, slot] = columns
    mask[rows, slot] = own_mask[rows, columns]
    return index, mask
