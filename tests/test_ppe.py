"""Positional Preservation Embedding (``ts.apply(model, method, ppe=k)``, tokensieve/engine/ppe.py): each merged token's
rotary frequencies are turned, chunk by chunk, by the positions of the tokens it merged."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from conftest import build_model
from test_contract import TEXTS
from tiny_models import LLAVA
from tiny_qwen2_vl import QWEN2_VL
from tokensieve.engine.ppe import PositionPreservation, frequency_chunks, group_members


def test_chunks_and_members_worked_by_hand():
    assert frequency_chunks([4], 2).tolist() == [0, 0, 1, 1]
    assert frequency_chunks([2, 3, 3], 2).tolist() == [0, 1, 0, 0, 1, 0, 0, 1]  # mrope: each section on its own
    assert frequency_chunks([3], 5).tolist() == [0, 1, 2]  # fewer frequencies than members: one each
    groups = torch.tensor([0, 0, 2, 2, 2, -1, 6, 2, 0])  # token -> the kept token it ended in (-1: dropped)
    # group 0 = 0 1 8 (m=3): the floor((j + 1/2)·3/2) = 0th and 2nd; group 2 = 2 3 4 7: the 1st and 3rd; 6 alone
    assert group_members(groups, torch.tensor([0, 2, 6]), 2).tolist() == [[0, 8], [3, 7], [6, 6]]


def spliced(rotary, x, members: list[torch.Tensor], chunks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin by hand: each member's own rotary output, frequency by frequency from the member its chunk names."""
    turned = [rotary(x, positions) for positions in members]
    dims = torch.cat([chunks, chunks])
    return tuple(torch.stack([turned[int(j)][part][..., d] for d, j in enumerate(dims)], dim=-1) for part in (0, 1))


@pytest.mark.parametrize("family", [LLAVA, QWEN2_VL], ids=lambda f: f.name)
def test_the_rotary_output_is_spliced_once_from_each_members_positions(family):
    decoder = build_model(family).model.language_model
    rotary = decoder.rotary_emb
    sections = list(getattr(rotary, "mrope_section", None) or [rotary.inv_freq.shape[-1]])
    x = torch.zeros(1, 3, 8)
    own = torch.tensor([[0, 5, 9]]) if len(sections) == 1 else torch.tensor([[[0, 5, 9]], [[0, 2, 4]], [[0, 7, 3]]])
    members = [own + 2, own * 3]
    preservation = PositionPreservation(decoder, 2)
    try:
        preservation.prepare(torch.stack(members))
        got = rotary(x, own)
        again = rotary(x, own)  # consumed: the next call is the model's own
    finally:
        preservation.remove()
    expected = spliced(rotary, x, members, frequency_chunks(sections, 2))
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
    assert all(torch.equal(a, b) for a, b in zip(again, rotary(x, own)))
    assert not rotary._forward_hooks


def test_a_merged_token_stands_at_its_members_positions_and_the_rest_at_their_own():
    model = build_model(LLAVA)
    inputs = LLAVA.make_inputs(TEXTS)
    decoder = model.model.language_model
    seen = []
    hook = decoder.layers[0].register_forward_pre_hook(lambda m, a, kw: seen.append((kw["position_ids"], kw["position_embeddings"])),
                                                       with_kwargs=True)
    try:
        with ts.apply(model, ts.ToMe(keep=8), ppe=2) as run:
            model(**inputs)
    finally:
        hook.remove()
    (positions, (cos, sin)), = seen
    columns = (inputs["input_ids"] == LLAVA.image_token).nonzero()
    chunks = frequency_chunks([decoder.rotary_emb.inv_freq.shape[-1]], 2)
    x = torch.zeros(1, 1, 8)
    merged, image_slots = 0, torch.zeros(positions.shape, dtype=torch.bool)
    for record in run.stats.images:
        placed = columns[columns[:, 0] == record.row, 1]
        members = group_members(record.groups(), record.kept, 2)
        for kept, pair in zip(record.kept, members):
            slot = int((positions[record.row] == placed[kept]).nonzero())
            image_slots[record.row, slot] = True
            expected = spliced(decoder.rotary_emb, x, [placed[pair[0]].view(1, 1), placed[pair[1]].view(1, 1)], chunks)
            torch.testing.assert_close(cos[record.row, slot], expected[0][0, 0])
            torch.testing.assert_close(sin[record.row, slot], expected[1][0, 0])
            merged += int(pair[0] != pair[1])
    assert merged > 0
    own = decoder.rotary_emb(x, positions)  # text and padding keep their own rotation
    assert torch.equal(cos[~image_slots], own[0][~image_slots]) and torch.equal(sin[~image_slots], own[1][~image_slots])


def test_nothing_merged_runs_as_without_ppe_and_generation_agrees_with_and_without_cache():
    model = build_model(LLAVA)
    inputs = LLAVA.make_inputs(TEXTS)
    with ts.apply(model, ts.Uniform(keep=8)):
        plain = model(**inputs).logits
    with ts.apply(model, ts.Uniform(keep=8), ppe=4):
        assert torch.equal(model(**inputs).logits, plain)
    with ts.apply(model, ts.ToMe(keep=8), ppe=4):
        settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        cached = model.generate(**inputs, **settings)
        assert torch.equal(cached, model.generate(**inputs, use_cache=False, **settings))


def test_a_bad_count_is_refused_and_leaves_the_model_untouched():
    model = build_model(LLAVA)
    rotary = model.model.language_model.rotary_emb
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="ppe=.*an int >= 1"):
            ts.apply(model, ts.ToMe(keep=8), ppe=bad)
    assert not rotary._forward_hooks and not model.model.language_model._forward_pre_hooks
