"""Algorithms shared by several sieves. Each works on one image's tokens and returns indices."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ._lazy import F, torch


def top_k_in_order(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, in ascending (raster) order; of each row for (..., N) scores.

    Scores are compared in float32 and ties go to the lower index (a stable sort), so the
    selection does not depend on the dtype the model runs in or on the top-k kernel.
    """
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices
    return order[..., :k].sort(dim=-1).values


def farthest_point(features: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min diversity (Gonzalez k-center) on cosine distance, in raster order: :func:`k_center_greedy`
    seeded with the token farthest from its nearest neighbour. A running minimum keeps it O(k·N) after the N×N
    matrix."""
    unit = F.normalize(features.float(), dim=-1)
    distance = 1.0 - unit @ unit.T
    isolated = distance.clone().fill_diagonal_(float("inf")).min(dim=1).values.argmax(dim=0, keepdim=True)
    return k_center_greedy(distance, k, isolated).sort().values


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


def contextual_targets(n: int, dominant: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip's contextual split (VisionDrop's too): of the ``n`` tokens not in ``dominant``, ``count`` targets
    at a uniform stride (:func:`strided`) and the members, the others; both ascending. ``nonzero_static``: the
    counts are known, so nothing is read back to the host (a GPU stall per image)."""
    device = dominant.device
    remaining = torch.ones(n, dtype=torch.bool, device=device)
    remaining[dominant] = False
    remaining = remaining.nonzero_static(size=n - len(dominant)).squeeze(1)
    picks = strided(len(remaining), count).to(device)
    is_member = torch.ones(len(remaining), dtype=torch.bool, device=device)
    is_member[picks] = False
    return remaining[picks], remaining[is_member.nonzero_static(size=len(remaining) - count).squeeze(1)]


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


def bipartite_round(metric: torch.Tensor, r: int, protect_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One round of ToMe's bipartite soft matching on each row of ``metric`` (batch, T, d).

    The tokens split alternately into sets A (even positions) and B (odd), each A token finds its most
    cosine-similar B token, and the ``r`` A tokens with the most similar partners go into them (ties to the
    earlier A token); ``protect_first`` keeps token 0 (a [CLS] token) out, as ToMe's ``class_token``.
    Returns ``target`` (batch, T), the token each token goes into (itself unless merged), and ``survivors``
    (batch, T), False at the ``r`` merged ones.
    """
    batch, t = metric.shape[:2]
    unit = F.normalize(metric.float(), dim=-1)
    scores = unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)
    if protect_first:
        scores[:, 0] = -float("inf")
    best, partner = scores.max(dim=-1)
    ranked = torch.sort(best, dim=-1, descending=True, stable=True).indices[:, :r]
    src, dst = ranked * 2, partner.gather(1, ranked) * 2 + 1
    target = torch.arange(t, device=metric.device).expand(batch, t).scatter(1, src, dst)
    survivors = torch.ones(batch, t, dtype=torch.bool, device=metric.device).scatter(1, src, False)
    return target, survivors


def merge_into(values: torch.Tensor, sizes: torch.Tensor, target: torch.Tensor, survivors: torch.Tensor) -> torch.Tensor:
    """(batch, survivors, d) the size-weighted mean of the tokens of ``values`` (batch, T, d) going into each
    survivor (``bipartite_round``'s ``target``); ``sizes`` (batch, T) counts the originals each token holds."""
    batch, t, d = values.shape
    totals = torch.zeros(batch, t, device=values.device).scatter_add(1, target, sizes)
    summed = torch.zeros(batch, t, d, device=values.device).scatter_add(1, target.unsqueeze(-1).expand(-1, -1, d),
                                                                        values.float() * sizes.unsqueeze(-1))
    kept = survivors.sum(1)[0]
    return (summed[survivors] / totals[survivors].unsqueeze(-1)).view(batch, int(kept), d).to(values.dtype)


def bipartite_merge(features: torch.Tensor, metric: torch.Tensor, k: int) -> Merge:
    """ToMe's bipartite soft matching (``bipartite_round``), repeated until exactly ``k`` tokens are left.

    Each round merges ``r`` tokens (at most half of them, as ToMe, and never below ``k``); merged features
    and metrics are size-weighted means, so a kept token's features are the mean of every original token
    it holds, and it stands at its B token's position.
    """
    n = features.shape[0]
    device = features.device
    values, keys = features.float().unsqueeze(0), metric.float().unsqueeze(0)
    sizes = torch.ones(1, n, device=device)
    positions = torch.arange(n, device=device)  # each current token's representative (a B token's own index)
    owner = torch.arange(n, device=device)  # each original token's current token
    while len(positions) > k:
        m = len(positions)
        target, survivors = bipartite_round(keys, min(m - k, m // 2))
        values, keys = merge_into(values, sizes, target, survivors), merge_into(keys, sizes, target, survivors)
        sizes = torch.zeros(1, m, device=device).scatter_add(1, target, sizes)[survivors].unsqueeze(0)
        owner = (survivors[0].cumsum(0) - 1)[target[0, owner]]
        positions = positions[survivors[0]]
    return Merge(positions, values[0].to(features.dtype), sizes[0], owner)


def dpp_map(kernel: torch.Tensor, k: int, eps: float = 1e-10) -> torch.Tensor:
    """Greedy MAP inference of a determinantal point process: ``k`` indices of the (N, N) positive
    semi-definite ``kernel``, in the order chosen.

    The fast greedy algorithm of Chen et al. (NeurIPS 2018), an incremental Cholesky factorisation: each
    step adds the item with the largest gain in log-determinant, ``d_i² = L_ii - |c_i|²`` (ties to the lower
    index), and updates every item's ``c_i`` and ``d_i²`` with the new factor row, so a step costs O(k·N)
    after the kernel. When the kernel's rank is below ``k`` the gains reach zero; the division is then
    floored at ``eps`` so the remaining picks stay finite and distinct.
    """
    kernel = kernel.float()
    n = kernel.shape[0]
    k = min(k, n)
    gains = kernel.diagonal().clone()
    factors = kernel.new_zeros(k, n)  # row t: the t-th Cholesky row over every item
    chosen = torch.empty(k, dtype=torch.long, device=kernel.device)
    for step in range(k):
        # picks stay one-element tensors: indexing with a 0-d tensor would stall a GPU once per step
        pick = gains.argmax(dim=0, keepdim=True)
        chosen[step : step + 1] = pick
        projected = (factors[:step].index_select(1, pick) * factors[:step]).sum(0)
        row = (kernel.index_select(0, pick).squeeze(0) - projected) / gains.index_select(0, pick).clamp(min=eps).sqrt()
        factors[step] = row
        gains = (gains - row.square()).index_fill_(0, pick, float("-inf"))
    return chosen


#: an adaptive coverage_greedy reads its progress back to the host once every this many steps
COVERAGE_CHECK_EVERY = 16


def coverage_greedy(coverage: torch.Tensor, k: int, fraction: float | None = None, at_least: int = 1,
                    weight: torch.Tensor | None = None, add: bool = False) -> torch.Tensor:
    """Greedy maximum coverage (facility location): ``k`` column indices of the (R, N) non-negative
    ``coverage`` matrix, in the order chosen, maximising ``f(S) = sum_r max_{j in S} coverage[r, j]``.

    Each step adds the column with the largest gain ``sum_r max(0, coverage[r, j] - best_r)`` (ties to the
    lower index), ``best_r`` the row's cover by the columns chosen so far (0 at the start). ``f`` is monotone
    submodular, so the greedy set is within ``1 - 1/e`` of the best ``k`` columns (Nemhauser, Wolsey and
    Fisher, 1978). A step costs O(R·N); chosen columns are never picked again, also when every gain is 0.

    With ``fraction`` (an adaptive budget, ``ts.Adaptive(coverage=...)``): the fewest greedy columns, at
    least ``at_least`` and at most ``k``, whose ``f`` reaches ``fraction`` of ``f`` of every column (up to a
    relative 1e-6 for float rounding). The greedy order does not depend on ``k``, so this is the prefix of
    the plain greedy's choice; the loop reads ``f`` back once every :data:`COVERAGE_CHECK_EVERY` steps and
    trims the few steps past the threshold.

    With ``weight`` (N,): each step picks the largest ``gain_j * weight_j`` (``gain_j + weight_j`` with ``add``):
    SCOPE's saliency-weighted greedy, no longer a set function's greedy; ``fraction`` still measures the
    unweighted ``f``.
    """
    coverage = coverage.float()
    n = coverage.shape[1]
    k = min(k, n)
    best = coverage.new_zeros(coverage.shape[0])
    # each row's excess over its cover, per column: a step recomputes only the rows whose cover it raised (the same
    # values as recomputing every row, so the same picks), and the gains are its column sums
    excess = (coverage - best[:, None]).clamp_(min=0)
    taken = coverage.new_zeros(n)  # -inf at the chosen columns
    chosen = torch.empty(k, dtype=torch.long, device=coverage.device)
    if fraction is not None:
        reach = (fraction - 1e-6) * coverage.max(dim=1).values.clamp(min=0).sum()
        covered = coverage.new_zeros(k)  # f after each step
    for step in range(k):
        gains = excess.sum(dim=0)
        if weight is not None:
            gains = gains + weight if add else gains * weight
        gains = gains + taken
        # picks stay one-element tensors: indexing with a 0-d tensor would stall a GPU once per step
        pick = gains.argmax(dim=0, keepdim=True)
        chosen[step : step + 1] = pick
        # the rows the pick covers better (one wait for a GPU per step, cheaper than a pass over every row)
        raised = (coverage.index_select(1, pick).squeeze(1) > best).nonzero().squeeze(1)
        best.index_copy_(0, raised, coverage[raised, pick])
        excess.index_copy_(0, raised, (coverage[raised] - best[raised, None]).clamp_(min=0))
        taken.index_fill_(0, pick, float("-inf"))
        if fraction is not None:
            covered[step] = best.sum()
            if step + 1 >= at_least and ((step + 1) % COVERAGE_CHECK_EVERY == 0 or step + 1 == k):
                short = int((covered[: step + 1] < reach).sum())  # steps before f reached the threshold
                if short < step + 1:
                    return chosen[: max(short + 1, at_least)]
    return chosen

def grid_neighbours(layout: tuple[torch.Tensor, ...], n: int) -> torch.Tensor:
    """(n, 4) the token above, below, left and right of each of ``n`` tokens within its 2D piece of
    ``layout`` (maps of token indices, as ``VisualTokens.layout()``), -1 where there is none."""
    table = torch.full((n, 4), -1, dtype=torch.long)
    for piece in layout:
        padded = torch.full((piece.shape[0] + 2, piece.shape[1] + 2), -1, dtype=torch.long)
        padded[1:-1, 1:-1] = piece
        around = [padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        table[piece.flatten()] = torch.stack(around, dim=-1).view(-1, 4)
    return table


def target_grid(grid: tuple[int, int], k: int) -> tuple[int, int]:
    """The largest rows×cols <= k with cols within one of rows·w/h (64 -> 8×8, 192 -> 13×14 on 24×24)."""
    h, w = grid
    best = (1, 1)
    for rows in range(1, h + 1):
        for cols in {min(w, max(1, round(rows * w / h) + extra)) for extra in (0, 1)}:
            if rows * cols <= k and rows * cols > best[0] * best[1]:
                best = (rows, cols)
    return best


def cell_bounds(size: int, cells: int) -> list[tuple[int, int]]:
    """The [start, end) spans adaptive average pooling uses for each of ``cells`` cells over ``size``."""
    return [((i * size) // cells, -(-((i + 1) * size) // cells)) for i in range(cells)]


def cell_centres(grid: tuple[int, int], cells: tuple[int, int]) -> torch.Tensor:
    """Raster index in an h×w ``grid`` of the centre token of each cell of a rows×cols split (``cell_bounds``)."""
    (h, w), (rows, cols) = grid, cells
    return torch.tensor([((top + bottom - 1) // 2) * w + (left + right - 1) // 2
                         for top, bottom in cell_bounds(h, rows) for left, right in cell_bounds(w, cols)])


def dct(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Orthonormal DCT-II of ``x`` along ``dim`` (scipy's ``dct(type=2, norm="ortho")``), by one FFT of
    length N (Makhoul 1980): the even-indexed samples in order, then the odd ones reversed, transformed and
    turned by ``exp(-iπk/2N)``. Floating inputs keep their dtype (float64 stays float64); others go to float32."""
    x = x.transpose(dim, -1)
    n = x.shape[-1]
    real = x if x.dtype in (torch.float32, torch.float64) else x.float()
    v = torch.cat([real[..., ::2], real[..., 1::2].flip(-1)], dim=-1)
    k = torch.arange(n, device=x.device, dtype=real.dtype)
    turned = torch.fft.fft(v, dim=-1) * torch.polar(torch.ones_like(k), -math.pi * k / (2 * n))
    scale = torch.full((n,), math.sqrt(2 / n), device=x.device, dtype=real.dtype)
    scale[0] = math.sqrt(1 / n)
    return (turned.real * scale).transpose(dim, -1)


def idct(coefficients: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`dct` (the orthonormal DCT-III) along ``dim``, by one inverse FFT of length N."""
    c = coefficients.transpose(dim, -1)
    c = c if c.dtype in (torch.float32, torch.float64) else c.float()
    n = c.shape[-1]
    scale = torch.full((n,), math.sqrt(n / 2), device=c.device, dtype=c.dtype)
    scale[0] = math.sqrt(n)
    plain = c * scale  # the unnormalised sums C[k] = Σ x[j] cos(πk(2j+1)/2N)
    mirrored = torch.cat([torch.zeros_like(plain[..., :1]), plain[..., 1:].flip(-1)], dim=-1)  # C[N-k], C[N] = 0
    k = torch.arange(n, device=c.device, dtype=c.dtype)
    spectrum = torch.complex(plain, -mirrored) * torch.polar(torch.ones_like(k), math.pi * k / (2 * n))
    v = torch.fft.ifft(spectrum, dim=-1).real
    x = torch.empty_like(v)
    x[..., ::2] = v[..., : (n + 1) // 2]
    x[..., 1::2] = v[..., (n + 1) // 2 :].flip(-1)
    return x.transpose(dim, -1)


def dct_lowpass(values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resample an (h, w, d) grid to ``size`` = (h', w') <= (h, w) in the frequency domain, per channel: the
    2D orthonormal DCT-II, its low-frequency h'×w' block, the inverse DCT at h'×w', scaled by ``sqrt(h'w'/hw)``
    so a constant grid stays that constant (the mean is kept, and so is any per-token affine map of the
    channels). Float32 (float64 stays float64)."""
    (h, w), (rows, cols) = values.shape[:2], size
    low = dct(dct(values, dim=0)[:rows], dim=1)[:, :cols]
    return idct(idct(low, dim=0), dim=1) * math.sqrt(rows * cols / (h * w))


def _one(index, device) -> torch.Tensor:
    """A first pick as a one-element long tensor on ``device`` (an int or a tensor of one element)."""
    return torch.as_tensor(index, dtype=torch.long, device=device).reshape(1)


def k_center_greedy(distance: torch.Tensor, k: int, first) -> torch.Tensor:
    """Greedy k-center (Gonzalez; max-min diversity) from a given first pick: ``k`` indices of the (N, N)
    ``distance`` matrix, in the order chosen, each step adding the item whose distance to its nearest chosen
    item is largest (ties to the lower index). :func:`farthest_point` is this on cosine distance with its own
    first pick (the token farthest from its nearest neighbour), sorted. A running minimum: O(k·N)."""
    distance = distance.float()
    k = min(k, distance.shape[0])
    pick = _one(first, distance.device)
    chosen = torch.empty(k, dtype=torch.long, device=distance.device)
    chosen[:1] = pick
    to_set = distance.index_select(0, pick).squeeze(0).index_fill(0, pick, -float("inf"))
    for step in range(1, k):
        # picks stay one-element tensors: indexing with a 0-d tensor would stall a GPU once per step
        pick = to_set.argmax(dim=0, keepdim=True)
        chosen[step : step + 1] = pick
        to_set = torch.minimum(to_set, distance.index_select(0, pick).squeeze(0)).index_fill_(0, pick, -float("inf"))
    return chosen


def max_sum_greedy(similarity: torch.Tensor, k: int, first) -> torch.Tensor:
    """Greedy max-sum diversification from a given first pick: ``k`` indices of the (N, N) symmetric
    ``similarity`` matrix, in the order chosen, each step adding the item whose summed similarity to the
    items chosen so far is smallest (ties to the lower index). On cosine similarity this maximises, step by
    step, the sum of cosine distances to the chosen set (``|S| - sum cos``). A running sum: O(k·N)."""
    similarity = similarity.float()
    k = min(k, similarity.shape[0])
    pick = _one(first, similarity.device)
    chosen = torch.empty(k, dtype=torch.long, device=similarity.device)
    chosen[:1] = pick
    sums = similarity.index_select(0, pick).squeeze(0).index_fill(0, pick, float("inf"))
    for step in range(1, k):
        pick = sums.argmin(dim=0, keepdim=True)
        chosen[step : step + 1] = pick
        sums = (sums + similarity.index_select(0, pick).squeeze(0)).index_fill_(0, pick, float("inf"))
    return chosen


def mmr_greedy(importance: torch.Tensor, similarity: torch.Tensor, k: int, trade_off: float,
               per_step: int = 1) -> torch.Tensor:
    """Maximal marginal relevance (Carbonell and Goldstein, 1998): ``k`` indices, in the order chosen, of
    items with ``importance`` (N,) and pairwise ``similarity`` (N, N, symmetric).

    The first ``per_step`` picks are the most important items; each later step adds the ``per_step`` items
    with the highest ``trade_off * importance - (1 - trade_off) * max_{j chosen} similarity[i, j]`` (the
    maximum over every item chosen before the step; ties to the lower index, the last step may add fewer).
    A running maximum: O(k·N) with ``per_step=1``.
    """
    importance, similarity = importance.float(), similarity.float()
    n = importance.shape[0]
    k = min(k, n)
    chosen = torch.empty(k, dtype=torch.long, device=importance.device)
    taken = importance.new_zeros(n)  # -inf at the chosen items
    closest = None  # each item's largest similarity to a chosen one
    filled = 0
    while filled < k:
        step = min(per_step, k - filled)
        score = importance if closest is None else (trade_off * importance) - ((1 - trade_off) * closest)
        score = score + taken
        if step == 1:
            # picks stay one-element tensors: indexing with a 0-d tensor would stall a GPU once per step
            picks = score.argmax(dim=0, keepdim=True)
        else:
            picks = torch.sort(score, descending=True, stable=True).indices[:step]
        chosen[filled : filled + step] = picks
        taken.index_fill_(0, picks, float("-inf"))
        nearest = similarity.index_select(1, picks).max(dim=1).values
        closest = nearest if closest is None else torch.maximum(closest, nearest)
        filled += step
    return chosen


def single_head_attention(rows: torch.Tensor) -> torch.Tensor:
    """(N,) the code's one-head [CLS] attention ``softmax(q·k / sqrt(d_model))`` over the patches, from the
    per-head rows ``p_h`` (heads, N): the per-head logits are ``log p_h`` up to a constant per head, and
    ``q·k / sqrt(d_model)`` is their sum over heads divided by ``sqrt(heads)``."""
    logs = rows.float().clamp_min(torch.finfo(torch.float32).tiny).log()
    return (logs.sum(dim=0) / rows.shape[0] ** 0.5).softmax(dim=0)
