"""PruMerge and PruMerge+: the IQR count, the key-neighbour merge and the spatial samples, worked by hand on
small grids and checked against the official code's arithmetic written as plain loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import tokensieve as ts
from conftest import build_model
from tiny_llava_next import LLAVA_ONEVISION
from tiny_models import LLAVA
from tokensieve.adapters import adapter_for
from tokensieve.methods.prumerge import iqr_outliers
from tokensieve.selection import single_head_attention
from tokensieve.signals import Signal, requests_of

LAST = Signal("cls_attention", layers=(-1,))


def project(vision: torch.Tensor) -> torch.Tensor:
    """An affine projector: a merge done after it would give another answer."""
    return 2 * vision + 1


def grid_tokens(attention, keys: torch.Tensor, vision: torch.Tensor, grid) -> "ts.sieve.VisualTokens":
    """One image with a single-head [CLS] row (then the code's attention is the row itself, renormalised) and
    keys of two heads (the concatenation of their halves)."""
    rows = torch.tensor(attention, dtype=torch.float32)
    rows = (rows / rows.sum())[None, None]  # (layers, heads, N)
    n = len(vision)
    signals = {LAST: rows, "vision_keys": keys.view(n, 2, -1).transpose(0, 1), "vision_features": vision,
               "project": project}
    return ts.sieve.VisualTokens(project(vision), grid, signals)


# 4×4 grid, attention in 64ths: three outliers (3: 9, 5: 18, 10: 12) over a background of 1s, 2s and 3s
ATTENTION_4X4 = [1, 2, 3, 9, 1, 18, 2, 2, 3, 2, 12, 1, 2, 3, 1, 2]


def keys_4x4() -> torch.Tensor:
    e = torch.eye(4)
    keys = e[3].repeat(16, 1)  # the background shares one key, orthogonal to the three objects'
    keys[5], keys[6], keys[9] = e[0], e[0] + 0.5 * e[3], e[0] + 0.75 * e[3]  # cos to 5: 0.894, 0.8
    keys[10], keys[14] = e[1] + 0.5 * e[0], e[1]  # cos to 10: 14 0.894, 5 0.447, 6 0.4, 9 0.358
    keys[3], keys[2], keys[7] = e[2], e[2] + 0.5 * e[3], e[2] + 0.75 * e[3]  # cos to 3: 0.894, 0.8; 2 to 7: 0.984
    return keys


def test_hand_worked_grid_merges_each_outlier_with_its_two_nearest_keys():
    # sorted attention 1 1 1 1 2 2 2 2 2 2 3 3 3 9 12 18: Q1 = 1.75 (position 3.75), Q3 = 3 (11.25), bound
    # 3 + 1.5 * 1.25 = 4.875: three outliers, 3, 5 and 10. Each becomes x + sum(a_j x_j) over its 2 nearest:
    # 5 <- 6, 9; 10 <- 14 and the kept 5 (the code searches every other token); 3 <- 2, 7. One-hot x shows the sums.
    tokens = grid_tokens(ATTENTION_4X4, keys_4x4(), torch.eye(16), (4, 4))
    e = torch.eye(16)
    merged = {3: e[3] + 3 / 64 * e[2] + 2 / 64 * e[7], 5: e[5] + 2 / 64 * e[6] + 2 / 64 * e[9],
              10: e[10] + 1 / 64 * e[14] + 18 / 64 * e[5]}
    expected = project(torch.stack([merged[i] for i in (3, 5, 10)]))
    for sieve in (ts.PruMerge(keep=1.0, adaptive=True, neighbours=2), ts.PruMerge(keep=3, neighbours=2)):
        selection = sieve.select(tokens)
        assert selection.kept.tolist() == [3, 5, 10]
        assert torch.allclose(selection.features, expected, atol=1e-6)
    # a fixed budget of 4 adds the best background patch, 2 (ties at 3/64 go to the lower index): 2 <- 7, 3
    selection = ts.PruMerge(keep=4, neighbours=2).select(tokens)
    assert selection.kept.tolist() == [2, 3, 5, 10]
    assert torch.allclose(selection.features[0], project(e[2] + 2 / 64 * e[7] + 9 / 64 * e[3]), atol=1e-6)
    # adaptive under a cap of 2: the two best outliers; no neighbours: the kept tokens as they were
    assert ts.PruMerge(keep=2, adaptive=True, neighbours=2).select(tokens).kept.tolist() == [5, 10]
    plain = ts.PruMerge(keep=3, neighbours=0).select(tokens)
    assert torch.equal(plain.features, tokens.features[[3, 5, 10]])


def test_the_iqr_rule_counts_values_strictly_above_the_fence():
    assert iqr_outliers(torch.tensor(ATTENTION_4X4, dtype=torch.float32) / 64) == 3
    # Q1 = Q3 = 1: the fence is 1 itself, so the 1s stay and 2, 3, 4 are outliers
    assert iqr_outliers(torch.tensor([1.0] * 13 + [2, 3, 4])) == 3
    # no outlier at all (flat attention): one token is kept, where the code divides by zero
    assert iqr_outliers(torch.full((16,), 1 / 16)) == 1


@settings(max_examples=60, deadline=None)
@given(st.integers(4, 600), st.integers(0, 10_000), st.sampled_from([0.5, 1.0, 3.0]))
def test_the_iqr_count_matches_numpy_percentiles(n, seed, spread):
    generator = torch.Generator().manual_seed(seed)
    attention = (torch.randn(n, generator=generator, dtype=torch.float64) * spread).exp().float()
    values = attention.double().numpy()
    q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
    assert iqr_outliers(attention) == max(1, int((values > q3 + 1.5 * (q3 - q1)).sum()))


def test_the_per_head_rows_give_the_codes_single_head_attention():
    # the code: softmax(q k^T / sqrt(C)) over the whole q/k of the [CLS] query, [CLS] column dropped
    generator = torch.Generator().manual_seed(0)
    heads, d, n = 4, 8, 30
    q, k = torch.randn(heads * d, generator=generator) * 2, torch.randn(n + 1, heads * d, generator=generator)
    per_head = torch.stack([(q[h * d:(h + 1) * d] @ k[:, h * d:(h + 1) * d].T / d**0.5).softmax(0)
                            for h in range(heads)])[:, 1:]
    code = (q @ k.T / (heads * d) ** 0.5).softmax(0)[1:]
    assert torch.allclose(single_head_attention(per_head), code / code.sum(), atol=1e-6)
    assert not torch.allclose(per_head.mean(0) / per_head.mean(0).sum(), code / code.sum(), atol=1e-3)


def reference_features(tokens, kept: list[int], neighbours: int, layer_rows) -> torch.Tensor:
    """The code's loop: for each kept token, the other kept tokens then the pruned ones, cosine of the keys,
    the ``neighbours`` most similar (ties: lower raster index), ``x_i + sum(a_j x_j)``, projected."""
    attention = single_head_attention(layer_rows).tolist()
    keys = tokens["vision_keys"]
    keys = F.normalize(keys.transpose(0, 1).reshape(keys.shape[1], -1).float(), dim=-1)
    vision = tokens["vision_features"].float()
    pruned = [j for j in range(len(vision)) if j not in kept]
    rows = []
    for i in kept:
        rest = [j for j in kept if j != i] + pruned
        similarity = {j: float(keys[i] @ keys[j]) for j in rest}
        cluster = sorted(rest, key=lambda j: (-similarity[j], j))[:neighbours]
        rows.append(vision[i] + sum((attention[j] * vision[j] for j in cluster), torch.zeros(vision.shape[1])))
    return tokens["project"](torch.stack(rows))


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 70), st.integers(1, 70), st.integers(0, 40), st.booleans(), st.booleans(), st.integers(0, 10_000))
def test_the_merge_matches_the_codes_loop(n, keep, neighbours, plus, adaptive, seed):
    generator = torch.Generator().manual_seed(seed)
    keep = min(keep, n - 1)
    rows = torch.randn(1, 3, n, generator=generator).mul(2).softmax(-1)
    signals = {LAST: rows, "vision_keys": torch.randn(3, n, 4, generator=generator),
               "vision_features": torch.randn(n, 6, generator=generator), "project": project}
    tokens = ts.sieve.VisualTokens(torch.randn(n, 6, generator=generator), (1, n), signals)
    sieve = (ts.PruMergePlus if plus else ts.PruMerge)(keep=keep, adaptive=adaptive, neighbours=neighbours)
    selection = sieve.select(tokens)
    kept = selection.kept.tolist()
    assert kept == sorted(set(kept)) and 1 <= len(kept) <= keep
    assert len(kept) == keep or adaptive
    expected = reference_features(tokens, kept, min(neighbours, n - 1), rows[0])
    assert torch.allclose(selection.features, expected, atol=1e-5)


def plus_tokens() -> "ts.sieve.VisualTokens":
    # 8×8 grid, flat attention but for three outliers: 15 (10), 27 (8), 40 (3); Q1 = Q3 = the flat value
    attention = [1.0] * 64
    attention[15], attention[27], attention[40] = 10.0, 8.0, 3.0
    generator = torch.Generator().manual_seed(0)
    return grid_tokens(attention, torch.randn(64, 4, generator=generator), torch.randn(64, 5, generator=generator), (8, 8))


def test_plus_adds_the_codes_raster_samples():
    tokens = plus_tokens()
    # adaptive: c = 3, s = 64 // 3 = 21, samples range(21 // 6 = 3, 63, 21 // 3 = 7) = 3 10 17 24 31 38 45 52 59
    # (none is an outlier)
    assert ts.PruMergePlus(keep=1.0, adaptive=True).select(tokens).kept.tolist() == [
        3, 10, 15, 17, 24, 27, 31, 38, 40, 45, 52, 59]
    # capped at 8: the three outliers and 5 of the 9 samples, at positions 0 2 4 6 8 (floor((i + 1/2) 9/5))
    assert ts.PruMergePlus(keep=8, adaptive=True).select(tokens).kept.tolist() == [3, 15, 17, 27, 31, 40, 45, 59]
    assert ts.PruMergePlus(keep=2, adaptive=True).select(tokens).kept.tolist() == [15, 27]
    # fixed 6: 3 by attention (15 27 40), 3 at the centres of 3 even strides over the 61 others, positions
    # floor((i + 1/2) 61/3) = 10 30 50, which are patches 10, 32 (after 15 and 27 are skipped) and 53
    assert ts.PruMergePlus(keep=6).select(tokens).kept.tolist() == [10, 15, 27, 32, 40, 53]
    # PruMerge itself keeps the outliers only
    assert ts.PruMerge(keep=1.0, adaptive=True).select(tokens).kept.tolist() == [15, 27, 40]


def test_plus_on_576_patches_with_32_outliers_samples_every_sixth_patch_from_the_third():
    # the code: ratio 32/576, step int(1 / ratio) = 18, samples range(3, 575, 6): columns 3 9 15 21 of every row
    attention = [1.0] * 576
    outliers = list(range(0, 576, 18))  # 32 of them, columns 0 and 18 of every other row, collide with none
    outliers[1] = 9  # but this one is a sample
    for rank, patch in enumerate(outliers):
        attention[patch] = 100.0 - rank
    generator = torch.Generator().manual_seed(0)
    tokens = grid_tokens(attention, torch.randn(576, 4, generator=generator), torch.randn(576, 3, generator=generator), (24, 24))
    kept = ts.PruMergePlus(keep=1.0, adaptive=True).select(tokens).kept.tolist()
    assert kept == sorted(set(outliers) | set(range(3, 575, 6)))
    assert len(kept) == 32 + 96 - 1


def test_keep_all_keeps_every_token_as_it_was():
    tokens = grid_tokens(ATTENTION_4X4, keys_4x4(), torch.eye(16), (4, 4))
    for cls in (ts.PruMerge, ts.PruMergePlus):
        selection = cls(keep=1.0).select(tokens)
        assert selection.kept.tolist() == list(range(16)) and selection.features is None


def test_on_a_model_the_attention_is_the_codes_single_head_row_of_the_last_block():
    model = build_model(LLAVA)
    blocks = adapter_for(model)._blocks()
    captured = {}

    def keep_output(name):
        def hook(module, args, output):
            captured.setdefault(name, output[0].detach())  # the one image's (tokens, d_model); returns None
        return hook

    hooks = [getattr(blocks[-1].self_attn, name).register_forward_hook(keep_output(name)) for name in ("q_proj", "k_proj")]
    sieve = ts.PruMerge(keep=10)
    seen = []
    select = sieve.select
    sieve.select = lambda tokens: seen.append(tokens) or select(tokens)
    try:
        with ts.apply(model, sieve) as run:
            model(**LLAVA.make_inputs([[5, 6]]))
    finally:
        for hook in hooks:
            hook.remove()
    q, k = captured["q_proj"].float(), captured["k_proj"].float()
    code = (q[0] @ k.T / q.shape[-1] ** 0.5).softmax(0)[1:]  # the code's row: one head, [CLS] query
    tokens = seen[0]
    assert torch.allclose(single_head_attention(tokens[LAST][0]), code / code.sum(), atol=1e-5)
    expected = sorted(torch.sort(code, descending=True, stable=True).indices[:10].tolist())
    assert run.stats.images[0].kept.tolist() == expected
    assert torch.allclose(select(tokens).features.float(),
                          reference_features(tokens, expected, 32, tokens[LAST][0]).float(), atol=1e-4)


def test_towers_without_cls_are_refused():
    model = build_model(LLAVA_ONEVISION)  # SigLIP: no [CLS]
    for sieve in (ts.PruMerge(), ts.PruMergePlus()):
        missing = adapter_for(model).missing_signals(requests_of(sieve))
        assert missing["cls_attention(layers=(-1,))"] == "the vision tower (siglip_vision_model) has no [CLS] token"
        with pytest.raises(ValueError, match=f"{sieve.name} needs signals"):
            ts.apply(model, sieve)


def test_defaults_and_argument_checks():
    assert ts.PruMerge().defaults() == {"keep": 64, "adaptive": False, "neighbours": 32, "attention_layer": -1}
    assert ts.PruMergePlus().defaults() == ts.PruMerge().defaults()
    assert ts.PruMerge().requests() == (LAST, "vision_keys", "vision_features", "project")
    assert ts.PruMerge(attention_layer=None).requests()[0] == Signal("cls_attention")
    assert ts.build("prumerge_plus:0.25,adaptive=True").adaptive is True
    with pytest.raises(ValueError, match="adaptive must be True"):
        ts.PruMerge(adaptive=1)
    with pytest.raises(ValueError, match="neighbours must be a count"):
        ts.PruMergePlus(neighbours=-1)
    with pytest.raises(ValueError, match="attention_layer must be a vision layer"):
        ts.PruMerge(attention_layer=0)
