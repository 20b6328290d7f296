"""CDPruner and the shared DPP greedy MAP: hand-worked kernels and reference loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tokensieve as ts
from conftest import build_model
from tiny_models import LLAVA
from tokensieve.selection import dpp_map
from tokensieve.sieve import VisualTokens


def greedy_log_det(kernel: torch.Tensor, k: int) -> list[int]:
    """The reference: at each step add the item that maximises log det of the chosen submatrix."""
    chosen = []
    kernel = kernel.double()
    for _ in range(k):
        best, pick = -math.inf, None
        for i in range(len(kernel)):
            if i in chosen:
                continue
            sub = kernel[chosen + [i]][:, chosen + [i]]
            value = torch.linalg.slogdet(sub)
            score = value.logabsdet.item() if value.sign > 0 else -math.inf
            if score > best + 1e-9:
                best, pick = score, i
        chosen.append(pick)
    return chosen


@pytest.mark.parametrize("seed", range(8))
def test_dpp_map_is_the_greedy_log_det_maximiser(seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(20, 12, generator=generator, dtype=torch.float64)
    weights = torch.rand(20, generator=generator, dtype=torch.float64) + 0.5
    kernel = weights[:, None] * (x @ x.T) * weights[None, :]
    assert dpp_map(kernel, 8).tolist() == greedy_log_det(kernel, 8)


def test_dpp_map_by_hand_and_beyond_the_kernels_rank():
    # two near-duplicates (0, 1) and a distinct item (2): after the largest, the distinct one
    kernel = torch.tensor([[1.0, 0.99, 0.0], [0.99, 1.0, 0.0], [0.0, 0.0, 0.9]])
    assert dpp_map(kernel, 2).tolist() == [0, 2]
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    picks = dpp_map(x @ x.T, 7)  # rank 3: gains reach zero, picks stay distinct
    assert len(set(picks.tolist())) == 7


def image(features, text):
    return VisualTokens(torch.as_tensor(features, dtype=torch.float), (1, len(features)),
                        {"text_embeddings": torch.as_tensor(text, dtype=torch.float).reshape(-1, len(features[0]))})


def test_relevance_by_hand_follows_the_reference_sign_and_normalisation():
    features = torch.eye(4)  # orthogonal tokens: the DPP keeps the most relevant ones
    tokens = image(features, [[1.0, 0.0, 0.0, 0.0]])  # the text matches token 0
    relevance = ts.CDPruner(theta=1).relevance(tokens)
    torch.testing.assert_close(relevance, torch.tensor([0.0, 1, 1, 1]) / (1 + 1e-6))
    torch.testing.assert_close(ts.CDPruner().relevance(tokens), torch.exp(0.5 * relevance))  # theta 0.5: alpha 0.5
    assert ts.CDPruner(keep=2).select(tokens).kept.tolist() == [1, 2]  # negated similarity: token 0 goes last
    assert ts.CDPruner(keep=2).select(image(features, [[0.0, 0.0, 0.0, 1.0]])).kept.tolist() == [0, 1]


def test_without_instruction_tokens_it_is_a_plain_dpp_over_similarity():
    features = torch.randn(12, 6, generator=torch.Generator().manual_seed(1))
    tokens = VisualTokens(features, (3, 4), {"text_embeddings": torch.zeros(0, 6)})
    unit = F.normalize(features, dim=-1)
    assert ts.CDPruner(keep=5).select(tokens).kept.tolist() == sorted(greedy_log_det(unit @ unit.T, 5))


@pytest.mark.parametrize("theta", [0.0, 0.5, 0.9, 1.0])
def test_selection_is_the_greedy_map_of_the_conditional_kernel(theta):
    generator = torch.Generator().manual_seed(3)
    features, text = torch.randn(16, 8, generator=generator), torch.randn(3, 8, generator=generator)
    unit, words = F.normalize(features, dim=-1), F.normalize(text, dim=-1)
    r = -(unit @ words.T).mean(1)
    r = (r - r.min()) / (r.max() - r.min() + 1e-6)
    q = r if theta == 1 else torch.exp(theta / (2 * (1 - theta)) * r)
    kernel = q[:, None] * (unit @ unit.T) * q[None, :]
    kept = ts.CDPruner(keep=6, theta=theta).select(VisualTokens(features, (4, 4), {"text_embeddings": text}))
    assert kept.kept.tolist() == sorted(greedy_log_det(kernel, 6))


def test_the_instruction_changes_the_selection_on_a_model():
    model = build_model(LLAVA)
    kept = []
    for text in ([5, 6, 7], [40, 41, 90]):
        with ts.apply(model, ts.CDPruner(keep=16)) as run:
            model(**LLAVA.make_inputs([text]))
        kept.append(run.stats.images[0].kept.tolist())
    assert kept[0] != kept[1]


def test_arguments_are_checked():
    assert ts.CDPruner().defaults() == {"keep": 64, "theta": 0.5}
    for bad in (-0.1, 1.5, "x", True):
        with pytest.raises(ValueError, match="theta"):
            ts.CDPruner(theta=bad)
    assert ts.CDPruner(keep=1.0).select(image(torch.eye(3), [[1.0, 0, 0]])).kept.tolist() == [0, 1, 2]
