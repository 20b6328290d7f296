"""ZOO-Prune: the sensitivity estimate against its formula, the greedy against a reference loop of the official
rule, a hand-worked grid, determinism under the seed, and the arguments."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import tokensieve as ts
from tokensieve.methods import zoo
from tokensieve.methods.zoo import normalised, sensitive_diverse
from tokensieve.sieve import VisualTokens


def locally_scaling(x: torch.Tensor) -> torch.Tensor:
    """A projector that is, around each token, the identity times ``round(x_0)``: a step of ``h·u`` moves the
    output by ``h·u·round(x_0)``, so a token's sensitivity is exactly ``|round(x_0)|`` whatever the directions."""
    return x * x[..., :1].round()


def tokens_with(sensitivity, projected, project=locally_scaling) -> VisualTokens:
    vision = torch.zeros(len(sensitivity), 4)
    vision[:, 0] = torch.tensor(sensitivity, dtype=torch.float)
    projected = torch.as_tensor(projected, dtype=torch.float)
    return VisualTokens(projected, (2, len(sensitivity) // 2), {"vision_features": vision, "project": project})


E1, E2, E3 = torch.eye(3)
#: a 2×3 grid: sensitivities 1..5 and projected directions; the least sensitive token (0) duplicates the most
#: sensitive one (1), token 2 lies between e1 and e2, token 5 is opposite to e1
HAND = tokens_with([1, 5, 4, 3, 2, 3], torch.stack([E1, E1, (E1 + E2) / 2**0.5, E2, E3, -E1]))


def test_the_sensitivity_of_a_local_scaling_is_its_factor():
    sensitivity = ts.ZOOPrune().sensitivity(HAND["vision_features"], locally_scaling)
    torch.testing.assert_close(sensitivity, torch.tensor([1.0, 5, 4, 3, 2, 3]), rtol=1e-4, atol=0)


def test_hand_worked_grid():
    # Ŝ = (S - 1) / 4 = 0, 1, .75, .5, .25, .5 and the score is Ŝ times the cosine distance to the nearest pick.
    # seed: token 1 (most sensitive). Step 2: 0 -> 0 (a duplicate, and Ŝ=0), 2 -> .75·(1 - 1/√2) = .22,
    # 3 -> .5·1, 4 -> .25·1, 5 -> .5·2 = 1: token 5. Step 3: 3 -> .5 (e2 is at distance 1 from e1 and -e1): token 3.
    # Step 4: 4 -> .25 beats 2 -> .22 (still at distance .29 from e1 and from e2): the distant, less sensitive token.
    # Step 5: 2 -> .22 beats 0 -> 0.
    expected = {1: [1], 2: [1, 5], 3: [1, 3, 5], 4: [1, 3, 4, 5], 5: [1, 2, 3, 4, 5]}
    for keep, kept in expected.items():
        assert ts.ZOOPrune(keep=keep).select(HAND).kept.tolist() == kept
    assert ts.ZOOPrune(keep=6).select(HAND).kept.tolist() == list(range(6))


def test_sensitivity_is_the_central_difference_formula_direction_by_direction(monkeypatch):
    generator = torch.Generator().manual_seed(1)
    weight_in, weight_out = torch.randn(5, 7, generator=generator), torch.randn(7, 3, generator=generator)

    def mlp(x):  # a GELU MLP, as LLaVA's projector
        return F.gelu(x @ weight_in) @ weight_out

    vision = torch.randn(6, 5, generator=generator)
    sieve = ts.ZOOPrune(samples=5, h=0.05, seed=3)
    directions = torch.randn(5, 5, generator=torch.Generator().manual_seed(3))
    expected = torch.zeros(6)
    for i in range(6):  # token by token, direction by direction
        for u in directions:
            u = u / (u.norm() + 1e-12)
            expected[i] += (mlp(vision[i] + 0.05 * u) - mlp(vision[i] - 0.05 * u)).norm() / (2 * 0.05) / 5
    torch.testing.assert_close(sieve.sensitivity(vision, mlp), expected, rtol=1e-5, atol=1e-6)
    # the directions are batched into calls of at most ROWS_PER_CALL rows: one direction per call gives the same
    monkeypatch.setattr(zoo, "ROWS_PER_CALL", 6)
    torch.testing.assert_close(sieve.sensitivity(vision, mlp), expected, rtol=1e-5, atol=1e-6)


def reference_sads(features: torch.Tensor, scores: torch.Tensor, k: int) -> list[int]:
    """The official ``select_tokens_sads`` as a loop: min-max weights (all ones when flat), the most sensitive first,
    then the largest weight × minimum distance over every chosen row, chosen ones excluded, ties to the lower index."""
    unit = F.normalize(features.double(), dim=-1)
    distance = (1 - unit @ unit.T).tolist()
    scores = scores.double().tolist()
    low, high = min(scores), max(scores)
    weights = [(s - low) / (high - low + 1e-8) for s in scores] if high > low else [1.0] * len(scores)
    chosen = [max(range(len(scores)), key=lambda i: (weights[i], -i))]
    while len(chosen) < k:
        gains = {i: weights[i] * min(distance[j][i] for j in chosen) for i in range(len(scores)) if i not in chosen}
        chosen.append(max(gains, key=lambda i: (gains[i], -i)))
    return chosen


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 40), st.integers(1, 40), st.booleans(), st.integers(0, 10_000))
def test_greedy_matches_the_reference_loop(n, k, tied, seed):
    k = min(k, n)
    generator = torch.Generator().manual_seed(seed)
    if tied:  # signed one-hot features and integer scores: distances 0, 1 or 2 and many equal products
        signs = torch.randint(0, 2, (n, 1), generator=generator) * 2 - 1
        features = F.one_hot(torch.randint(0, 3, (n,), generator=generator), 3).float() * signs
        scores = torch.randint(0, 3, (n,), generator=generator).float()
    else:
        features, scores = torch.randn(n, 8, generator=generator), torch.rand(n, generator=generator)
    assert sensitive_diverse(features, normalised(scores), k).tolist() == reference_sads(features, scores, k)


def test_an_affine_projector_gives_equal_weights_and_plain_max_min_diversity():
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(4, 6, generator=generator), torch.randn(6, generator=generator)
    projected = torch.randn(12, 6, generator=generator)
    tokens = VisualTokens(projected, (3, 4), {"vision_features": torch.randn(12, 4, generator=generator),
                                             "project": lambda x: x @ weight + bias})
    sensitivity = ts.ZOOPrune().sensitivity(tokens["vision_features"], tokens["project"])
    assert not torch.equal(sensitivity, sensitivity[:1].expand(12))  # rounding differs from token to token,
    assert torch.equal(normalised(sensitivity), torch.ones(12))  # but it is no ranking
    kept = ts.ZOOPrune(keep=5).select(tokens).kept.tolist()
    assert kept == sorted(reference_sads(projected, torch.ones(12), 5))
    assert normalised(torch.tensor([1.0, 3.0, 2.0])).tolist() == pytest.approx([0, 1, 0.5])


def test_the_seed_fixes_the_directions():
    generator = torch.Generator().manual_seed(2)
    weight_in, weight_out = torch.randn(4, 16, generator=generator), torch.randn(16, 4, generator=generator)

    def mlp(x):
        return torch.relu(x @ weight_in) @ weight_out

    vision = torch.randn(10, 4, generator=generator)
    first, again = (ts.ZOOPrune(samples=4, seed=0).sensitivity(vision, mlp) for _ in range(2))
    other = ts.ZOOPrune(samples=4, seed=1).sensitivity(vision, mlp)
    assert torch.equal(first, again) and not torch.allclose(first, other)


def test_defaults_and_argument_checks():
    assert ts.ZOOPrune().defaults() == {"keep": 64, "samples": 64, "h": 0.01, "seed": 0}
    assert ts.build("zoo:32,samples=8,h=0.1").defaults() == {"keep": 32, "samples": 8, "h": 0.1, "seed": 0}
    with pytest.raises(ValueError, match="samples must be a count"):
        ts.ZOOPrune(samples=0)
    with pytest.raises(ValueError, match="h must be a perturbation size > 0"):
        ts.ZOOPrune(h=0)
    with pytest.raises(ValueError, match="h must be a perturbation size"):
        ts.ZOOPrune(h="small")
    with pytest.raises(ValueError, match="seed must be an int"):
        ts.ZOOPrune(seed=0.5)
