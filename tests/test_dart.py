"""DART's pivots and duplication rule, worked by hand and checked against a plain loop (in the LLM and before it)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tokensieve as ts
from conftest import build_model
from tiny_models import LLAVA
from tokensieve.sieve import VisualTokens

LLAVA_GRID = (8, 8)  # the tiny LLaVA's 64 tokens per image

#: six tokens on a 2×3 grid; L1 norms 3, 2, 4, 2, 1, 1
HAND = torch.tensor([[0.0, 3.0], [2.0, 0.0], [4.0, 0.0], [1.0, 1.0], [0.0, -1.0], [-1.0, 0.0]])


def test_hand_worked_pivots_by_norm_then_the_least_similar_tokens_for_each():
    # pivots=2: t2 (norm 4) then t0 (norm 3); the 3 left of keep=5 split 2, 1 (the first pivot one more).
    # t2, direction (1, 0): cosines t1 1, t3 .71, t4 0, t5 -1 -> takes t5, t4.
    # t0, direction (0, 1): t1 0, t3 .71 left -> takes t1.
    tokens = VisualTokens(HAND, (2, 3))
    assert ts.DART(keep=5, pivots=2).select(tokens).kept.tolist() == [0, 1, 2, 4, 5]
    # one pivot (t2) takes two: t5 (-1), then t0 and t4 tie at 0 and the lower index wins
    assert ts.DART(keep=3, pivots=1).select(tokens).kept.tolist() == [0, 2, 5]
    # a budget under the pivot count keeps the largest norms; a full budget keeps everything
    assert ts.DART(keep=1).select(tokens).kept.tolist() == [2]
    assert ts.DART(keep=2).select(tokens).kept.tolist() == [0, 2]
    assert ts.DART(keep=6).select(tokens).kept.tolist() == list(range(6))


def test_ties_go_to_the_lower_index():
    # every norm 1: the pivot is t0 = (1, 0); t1 and t3 tie at cosine 0, t2 is its opposite
    tokens = VisualTokens(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]), (2, 2))
    assert ts.DART(keep=3, pivots=1).select(tokens).kept.tolist() == [0, 1, 2]


def test_dart_pre_adds_the_instructions_pivots_after_the_image_pivots():
    # image pivot t2; text pivots by L1 norm: (-1, -1) [2], then (0, -1) [1] ((0.5, 0) [0.5] is not one).
    # keep=5: 4 left for 3 pivots -> 2, 1, 1.
    # t2 (1, 0): t0 0, t1 1, t3 .71, t4 0, t5 -1 -> t5, then t0 (tie with t4, lower index)
    # (-1, -1): left t1 -.71, t3 -1, t4 .71 -> t3
    # (0, -1): left t1 0, t4 1 -> t1
    text = torch.tensor([[0.0, -1.0], [-1.0, -1.0], [0.5, 0.0]])
    tokens = VisualTokens(HAND, (2, 3), {"text_embeddings": text})
    assert ts.DARTPre(keep=5, pivots=1, text_pivots=2).select(tokens).kept.tolist() == [0, 1, 2, 3, 5]
    # keep=4: the image pivot alone takes t5, t0, t4 (t3 and t1 are its near-duplicates); with one text pivot
    # (3 left -> 2, 1) it takes t5, t0 and the text pivot (-1, -1) takes t3
    assert ts.DARTPre(keep=4, pivots=1, text_pivots=0).select(VisualTokens(HAND, (2, 3))).kept.tolist() == [0, 2, 4, 5]
    assert ts.DARTPre(keep=4, pivots=1, text_pivots=1).select(tokens).kept.tolist() == [0, 2, 3, 5]
    # an instruction shorter than text_pivots gives what it has; none at all leaves the image pivots alone
    empty = VisualTokens(HAND, (2, 3), {"text_embeddings": torch.zeros(0, 2)})
    assert ts.DARTPre(keep=3, pivots=1).select(empty).kept.tolist() == [0, 2, 5]
    assert ts.DARTPre(text_pivots=0).requests() == () and ts.DARTPre().requests() == ("text_embeddings",)


def reference(features: torch.Tensor, k: int, pivots: int, text: torch.Tensor | None = None, text_pivots: int = 0) -> list[int]:
    """The official loop (get_retained_image_token) over Python sets, with the exact budget and pivot order used here."""
    n = len(features)
    if k >= n:
        return list(range(n))
    by_norm = sorted(range(n), key=lambda i: -float(features[i].abs().sum()))
    image_pivots = by_norm[: min(pivots, k)]
    vectors = [features[i] for i in image_pivots]
    if text is not None and text_pivots:
        by_text_norm = sorted(range(len(text)), key=lambda i: -float(text[i].abs().sum()))
        vectors += [text[i] for i in by_text_norm[:text_pivots]]
    rest = k - len(image_pivots)
    kept = set(image_pivots)
    for j, vector in enumerate(vectors):
        quota = rest // len(vectors) + (j < rest % len(vectors))
        valid = [i for i in range(n) if i not in kept]
        similarity = [F.cosine_similarity(vector, features[i], dim=0).item() for i in valid]
        kept.update(valid[i] for i in sorted(range(len(valid)), key=lambda i: similarity[i])[:quota])
    return sorted(kept)


@pytest.mark.parametrize("seed", range(6))
def test_random_tokens_match_the_reference_loop(seed):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(40, 6, generator=generator, dtype=torch.float64)
    text = torch.randn(5, 6, generator=generator, dtype=torch.float64)
    for keep, pivots in [(12, 4), (13, 3), (3, 4), (39, 4), (40, 2)]:
        tokens = VisualTokens(features, (5, 8), {"text_embeddings": text})
        assert ts.DART(keep=keep, pivots=pivots).select(tokens).kept.tolist() == reference(features, keep, pivots)
        got = ts.DARTPre(keep=keep, pivots=pivots, text_pivots=2).select(tokens).kept.tolist()
        assert got == reference(features, keep, pivots, text, 2)
        assert len(got) == min(keep, 40)


class _Recorder(ts.Sieve):
    """Keeps every token and records the hidden states it was given."""

    name, paper, stage, signals = "recorder", "test", "in_llm", ()

    def __init__(self, layer):
        super().__init__(1.0)
        self.layer, self.features = layer, []

    def select(self, tokens):
        self.features.append(tokens.features.clone())
        return ts.Selection(torch.arange(len(tokens)))


def test_in_the_llm_it_selects_on_the_hidden_states_at_the_input_of_its_layer():
    model = build_model(LLAVA)
    inputs = LLAVA.make_inputs([[5, 6, 7]])
    recorder = _Recorder(layer=1)
    with ts.apply(model, recorder):
        model(**inputs)
    sieve = ts.DART(keep=10, layer=1)
    with ts.apply(model, sieve) as run:
        model(**inputs)
    (record,) = run.stats.images
    expected = sieve.select(VisualTokens(recorder.features[0], LLAVA_GRID)).kept
    assert torch.equal(record.kept, expected)
    assert [(s.method, s.layer, s.after) for s in record.stages] == [("dart", 1, 10)]



def test_bad_arguments_name_what_to_change():
    with pytest.raises(ValueError, match=r"layer=0: pass the decoder layer to prune before, an int >= 1"):
        ts.DART(layer=0)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="pivots=.*the number of image pivot tokens, an int >= 1"):
            ts.DART(pivots=bad)
        with pytest.raises(ValueError, match="pivots=.*an int >= 1"):
            ts.DARTPre(pivots=bad)
    with pytest.raises(ValueError, match="text_pivots=-1: pass the number of text pivot tokens, an int >= 0"):
        ts.DARTPre(text_pivots=-1)
    assert ts.build("dart:64,layer=3,pivots=2") == ts.DART(keep=64, layer=3, pivots=2)
    assert (ts.DART.stage, ts.DARTPre.stage) == ("in_llm", "pre_llm")
