"""VisionDrop's in-LLM stages: the stage rule worked by hand on a 2×5 grid (dominant tokens by the head-mean attention
the image's own tokens pay them, strided targets, members by hidden-state cosine, the merge map with the target at
weight 1 and members at 1/n, or the code's ``target + mean(members)`` as features), checked against a plain loop of the official rule, the code's schedule (48 -> 35 -> 26 -> 19, contextual
5, 4, 3), and run inside a tiny model after the vision stage."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from conftest import build_model
from tiny_models import LLAVA
from tokensieve.adapters import adapter_for
from tokensieve.budget import Adaptive
from tokensieve.methods.visiondrop_llm import IMAGE_ROWS, VisionDropLLM, VisionDropStage, split, stage_count
from tokensieve.sieve import VisualTokens


def visual(attention: torch.Tensor, hidden: torch.Tensor, grid=None, entered=None) -> VisualTokens:
    # only the image-row attention is given: a stage reading another query set would fail with a KeyError
    return VisualTokens(hidden, grid or (1, len(hidden)), {IMAGE_ROWS: attention}, entered=entered)


def hand_worked_tokens() -> VisualTokens:
    # head means: 7 (0.9), 2 (0.8), 4 (0.7) lead; 9 gets 1.0 from head 0 alone (mean 0.5), so a rule taking the
    # largest head's score would keep 9; the rest 0.1
    attention = torch.full((2, 10), 0.1)
    attention[:, [7, 2, 4]] = torch.tensor([0.9, 0.8, 0.7])
    attention[:, 9] = torch.tensor([1.0, 0.0])
    hidden = torch.full((10, 3), 10.0)
    hidden[0], hidden[5] = torch.tensor([2.0, 0.0, 0.0]), torch.tensor([0.0, 3.0, 0.0])  # the targets (below)
    hidden[1] = torch.tensor([3.0, 1.0, 0.0])  # nearer target 0's direction
    hidden[8] = torch.tensor([4.0, 0.0, 7.0])  # cosine 0.50 to target 0, 0 to target 5 (a dot product ties less)
    hidden[3] = torch.tensor([1.0, 2.0, 0.0])  # nearer target 5's direction
    hidden[6] = torch.tensor([0.0, 5.0, 1.0])
    hidden[9] = torch.tensor([2.0, 2.5, 0.0])  # cosine 0.62 to target 0, 0.78 to target 5
    return visual(attention, hidden, grid=(2, 5))


@pytest.mark.parametrize("merge", ["mean", "sum"])
def test_hand_worked_grid(merge):
    # a stage keeping 5 with contextual_share 0.4: ceil(2.0) = 2 contextual, 3 dominant: 7, 2, 4 (not 9, see above).
    # The rest in raster order: 0 1 3 5 6 8 9; stride 7 // 2 = 3: targets 0 and 5.
    # Members 1, 8 join target 0; 3, 6, 9 join target 5.
    stage = VisionDropStage(keep=5, layer=1, index=1, stages=1, contextual_share=0.4, merge=merge)
    selection = stage.select(tokens := hand_worked_tokens())
    assert selection.kept.tolist() == [0, 2, 4, 5, 7]
    assert selection.assignment.tolist() == [0, 0, 1, 3, 2, 3, 3, 4, 0, 3]
    assert selection.sizes().tolist() == [3, 1, 1, 4, 1]
    hidden = tokens.features
    values = selection.merged(hidden)  # what the engine writes: the features, or the map's weighted means
    assert torch.equal(values[[1, 2, 4]], hidden[[2, 4, 7]])  # dominant tokens keep their hidden states
    # the code's: target 0 is (2, 0, 0) + mean((3, 1, 0), (4, 0, 7)); target 5 (0, 3, 0) + mean((1, 2, 0), (0, 5, 1), (2, 2.5, 0))
    code = torch.stack([torch.tensor([5.5, 0.5, 3.5]), torch.tensor([1.0, 3 + 9.5 / 3, 1 / 3])])
    if merge == "sum":
        assert selection.weights is None
        torch.testing.assert_close(values[[0, 3]], code)
    else:  # the target at weight 1, members at 1/2 and 1/3: half the code's value
        assert selection.features is None
        torch.testing.assert_close(selection.weights, torch.tensor([1, 1 / 2, 1, 1 / 3, 1, 1, 1 / 3, 1, 1 / 2, 1 / 3]))
        torch.testing.assert_close(values[[0, 3]], code / 2)
    # neither is the plain group mean
    assert not torch.allclose(values[0], hidden[[0, 1, 8]].mean(0))


def test_targets_without_members_keep_their_hidden_states():
    # keep 9 with contextual_share 6/9: 6 contextual, 3 dominant (7, 2, 4); the rest 0 1 3 5 6 8 9 at stride
    # 7 // 6 = 1: targets 0 1 3 5 6 8, and the one member, 9 = (2, 2.5, 0), joins 3 = (1, 2, 0) (cosine 0.98; 5: 0.78)
    stage = VisionDropStage(keep=9, layer=1, index=1, stages=1, contextual_share=6 / 9)
    selection = stage.select(tokens := hand_worked_tokens())
    assert selection.kept.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert selection.sizes().tolist() == [1, 1, 1, 2, 1, 1, 1, 1, 1]
    values = selection.merged(tokens.features)
    unchanged = [0, 1, 2, 4, 5, 6, 7, 8]
    assert torch.equal(values[unchanged], tokens.features[unchanged])
    torch.testing.assert_close(values[3], (tokens.features[3] + tokens.features[9]) / 2)


def test_without_contextual_share_the_stage_is_a_top_k():
    stage = VisionDropStage(keep=5, layer=1, index=1, stages=1, contextual_share=0.0)
    selection = stage.select(hand_worked_tokens())
    # six tokens tie at 0.1 for the last two places after 7, 2, 4 and 9 (0.5): the lower index, 0
    assert selection.kept.tolist() == [0, 2, 4, 7, 9] and selection.assignment is None and selection.features is None


def test_a_budget_covering_the_tokens_keeps_them_as_they_are():
    tokens = hand_worked_tokens()
    for stage in (VisionDropStage(keep=1.0, layer=1), VisionDropStage(keep=10, layer=1, index=3, stages=3),
                  VisionDropStage(keep=10, layer=1, index=1, stages=1)):
        selection = stage.select(tokens)
        assert selection.kept.tolist() == list(range(10)) and selection.features is None and selection.assignment is None


def reference(scores: torch.Tensor, hidden: torch.Tensor, count: int, contextual: int, merge: str = "sum"):
    """The official stage rule as a plain loop: kept indices, their values (``merge="sum"``: the code's target +
    mean(members); ``"mean"``: half that, for a target with members) and the group of every token."""
    n = len(scores)
    ranked = sorted(range(n), key=lambda i: (-float(scores[i]), i))
    dominant = ranked[: count - contextual]
    rest = [i for i in range(n) if i not in dominant]
    step = max(1, len(rest) // contextual)
    targets = rest[0::step][:contextual]
    groups = {t: [] for t in targets}
    for member in (i for i in rest if i not in targets):
        similarity = [float(torch.nn.functional.cosine_similarity(hidden[member], hidden[t], dim=0)) for t in targets]
        groups[targets[similarity.index(max(similarity))]].append(member)
    kept = sorted(dominant + targets)
    values, assignment = [], [None] * n
    for slot, i in enumerate(kept):
        members = groups.get(i, [])
        if members:
            code = hidden[i] + torch.stack([hidden[m] for m in members]).mean(0)
            values.append(code if merge == "sum" else code / 2)
        else:
            values.append(hidden[i])
        for m in [i, *members]:
            assignment[m] = slot
    return kept, torch.stack(values), assignment


@pytest.mark.parametrize("merge", ["mean", "sum"])
@pytest.mark.parametrize("seed", range(3))
def test_the_code_schedule_at_48_tokens_matches_a_loop_of_the_official_rule(seed, merge):
    generator = torch.Generator().manual_seed(seed)
    stages = VisionDropLLM(merge=merge).schedule(32)
    assert [(s.layer, s.index, s.stages) for s in stages] == [(8, 1, 3), (16, 2, 3), (24, 3, 3)]
    n, hidden = 48, torch.randn(48, 16, generator=generator)
    counts = []
    for stage, (dominant, contextual) in zip(stages, [(30, 5), (22, 4), (16, 3)]):  # the code's image_token_list
        attention = torch.rand(4, n, generator=generator)
        selection = stage.select(visual(attention, hidden, entered=48))
        kept, values, assignment = reference(attention.mean(0), hidden, dominant + contextual, contextual, merge)
        assert selection.kept.tolist() == kept and selection.assignment.tolist() == assignment
        merged = selection.merged(hidden)
        torch.testing.assert_close(merged, values)
        hidden, n = merged, len(kept)  # the next stage sees the merged hidden states
        counts.append(n)
    assert counts == [35, 26, 19]


def test_counts_and_splits():
    assert [stage_count(48, 19, s, 3) for s in (1, 2, 3)] == [35, 26, 19]  # the code's, with keep=0.4 of 48
    assert [stage_count(576, 230, s, 3) for s in (1, 2, 3)] == [424, 312, 230]
    assert [stage_count(64, 64, s, 3) for s in (1, 2, 3)] == [64, 64, 64]
    assert [split(count, 0.125) for count in (48, 35, 26, 19)] == [(42, 6), (30, 5), (22, 4), (16, 3)]
    assert split(4, 0.0) == (4, 0) and split(1, 0.5) == (1, 0) and split(3, 1.0) == (1, 2)
    assert split(30, 0.1) == (27, 3)  # 30 * 0.1 is 3.0000000000000004 in floats: still 3
    assert VisionDropLLM().budget.resolve(48) == 19
    assert VisionDropLLM().defaults() == {"keep": 0.4, "layers": None, "contextual_share": 0.125, "merge": "mean",
                                            "positions": "original"}
    assert [s.layer for s in VisionDropLLM().schedule(4)] == [1, 2, 3]
    assert [s.layer for s in VisionDropLLM(layers=(2, 3)).schedule(4)] == [2, 3]
    assert repr(ts.build("visiondrop+visiondrop_llm")) == repr(ts.Chain(ts.VisionDrop(), ts.VisionDropLLM()))


class _Recording(VisionDropLLM):
    """VisionDropLLM whose stages record what they are given and what they return."""

    def schedule(self, n_layers):
        owner = self

        class Recording(VisionDropStage):
            def select(stage, tokens):
                selection = super().select(tokens)
                owner.seen.append((stage.layer, tokens, selection))
                return selection

        self.seen = []
        return tuple(Recording(s.keep, s.layer, s.index, s.stages, s.contextual_share, s.merge) for s in super().schedule(n_layers))


@pytest.mark.parametrize("merge", ["mean", "sum"])
def test_after_the_vision_stage_inside_a_tiny_model(merge):
    """The full method, visiondrop+visiondrop_llm, on the tiny LLaVA (64 tokens, 4 decoder layers): 48 before the
    LLM, then 35, 26, 19 before layers 1, 2, 3, each stage's selection the official rule on the image-row attention
    and hidden states it was given, the groups recorded, and the merged hidden states what layer K receives."""
    model = build_model(LLAVA)
    inputs = LLAVA.make_inputs([[5, 6, 7, 8]])
    method = _Recording(merge=merge)
    layers = adapter_for(model).decoder.layers
    received = {}

    def capture(layer):
        def hook(module, args, kwargs):
            received[layer] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        return hook

    with ts.apply(model, ts.Chain(ts.VisionDrop(), method)) as run:
        handles = [layers[k].register_forward_pre_hook(capture(k), with_kwargs=True) for k in (1, 2, 3)]
        try:
            model(**inputs)
        finally:
            for handle in handles:
                handle.remove()
    (record,) = run.stats.images
    assert [(s.method, s.layer, s.after) for s in record.stages] == [
        ("visiondrop", None, 48), ("visiondrop_llm", 1, 35), ("visiondrop_llm", 2, 26), ("visiondrop_llm", 3, 19)]
    start = int((inputs["input_ids"][0] == LLAVA.image_token).nonzero()[0])
    for (layer, tokens, selection), stage, (dominant, contextual) in zip(method.seen, record.stages[1:], [(30, 5), (22, 4), (16, 3)]):
        assert tokens.entered == 48 and tokens[IMAGE_ROWS].shape[1] == len(tokens)
        kept, values, assignment = reference(tokens[IMAGE_ROWS].mean(0), tokens.features, dominant + contextual, contextual, merge)
        assert selection.kept.tolist() == kept and selection.assignment.tolist() == assignment
        merged = selection.merged(tokens.features)
        torch.testing.assert_close(merged, values, atol=1e-5, rtol=1e-5)
        assert torch.equal(stage.assignment, selection.assignment) and stage.sizes.sum() == len(tokens)
        # one prompt, no padding: the kept tokens sit in order where the image began
        torch.testing.assert_close(received[layer][0, start : start + len(kept)], merged)


def test_repacked_positions_run_and_are_refused_on_mrope():
    from tiny_qwen2_vl import QWEN2_VL

    model = build_model(LLAVA)
    inputs = LLAVA.make_inputs([[5, 6, 7, 8], [9, 10]])
    with ts.apply(model, ts.VisionDropLLM(positions="repack")) as run:
        tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert tokens.shape[1] == inputs["input_ids"].shape[1] + 3
    assert [[s.after for s in r.stages] for r in run.stats.images] == [[47, 35, 26]] * 2  # 0.4 of 64 is 26
    with pytest.raises(ValueError, match="mrope"):
        ts.apply(build_model(QWEN2_VL), ts.VisionDropLLM(positions="repack"))


def test_bad_arguments_name_what_to_change():
    for layers in ((3, 2), (0,), (2, 2), (), (1.5,)):
        with pytest.raises(ValueError, match="strictly increasing ints >= 1"):
            VisionDropLLM(layers=layers)
    for share in (-0.1, 1.5, True, "0.1", None):
        with pytest.raises(ValueError, match="contextual_share must be the share of each stage's tokens"):
            VisionDropLLM(contextual_share=share)
    with pytest.raises(ValueError, match="merge='add': choose 'mean'"):
        VisionDropLLM(merge="add")
    with pytest.raises(ValueError, match="choose 'original'"):
        VisionDropLLM(positions="packed")
    with pytest.raises(ValueError, match="visiondrop_llm cannot take an adaptive budget"):
        VisionDropLLM(keep=Adaptive(0.9))
    with pytest.raises(TypeError, match="runs as stages inside the LLM"):
        VisionDropLLM().select(hand_worked_tokens())
