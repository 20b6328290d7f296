"""The packing step every stage shares (tokensieve/engine/pack.py), against plain loops."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from tokensieve.engine.pack import Packing, Selections, gather_sequence, left_packed


def random_keep(rows: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(rows, length, generator=generator) < 0.5
    keep[torch.arange(rows), torch.randint(length, (rows,), generator=generator)] = True  # every row keeps one
    return keep, torch.randint(0, 2, (rows, length), generator=generator)


@given(st.integers(1, 5), st.integers(1, 12), st.integers(0, 10**6))
def test_left_packed_right_aligns_each_rows_kept_tokens(rows, length, seed):
    keep, own_mask = random_keep(rows, length, seed)
    index, mask = left_packed(keep, own_mask)
    width = int(keep.sum(1).max())
    assert index.shape == mask.shape == (rows, width)
    for row in range(rows):
        kept = keep[row].nonzero().squeeze(1)
        padding = width - len(kept)
        assert index[row, padding:].tolist() == kept.tolist() and index[row, :padding].eq(0).all()
        assert mask[row, padding:].tolist() == own_mask[row, kept].tolist() and mask[row, :padding].eq(0).all()


@given(st.integers(1, 5), st.integers(1, 12), st.integers(0, 10**6))
def test_a_packing_says_where_each_kept_token_went_and_which_slots_are_padding(rows, length, seed):
    keep, own_mask = random_keep(rows, length, seed)
    packing = Packing.of(keep, own_mask)
    slots, filled = packing.slots(), packing.filled()
    for row in range(rows):
        for position in range(length):
            slot = int(slots[row, position])
            assert (slot >= 0) == bool(keep[row, position])
            if slot >= 0:
                assert int(packing.index[row, slot]) == position and filled[row, slot]
        assert int(filled[row].sum()) == int(keep[row].sum())
    values = torch.randn(rows, length, 3)
    packed = packing.gather(values, dim=1)
    assert torch.equal(packed[filled], values[keep])


def test_gather_sequence_takes_every_layout_the_decoder_passes():
    index = torch.tensor([[0, 2], [1, 2]])
    positions = torch.arange(4).unsqueeze(0)  # (1, length): shared by the rows
    assert gather_sequence(positions, index, dim=-1).tolist() == [[0, 2], [1, 2]]
    mrope = torch.arange(3 * 4).view(3, 1, 4)  # (rows of positions, 1, length)
    assert gather_sequence(mrope, index, dim=-1).tolist() == [[[0, 2], [1, 2]], [[4, 6], [5, 6]], [[8, 10], [9, 10]]]
    cos = torch.arange(2 * 4 * 2).view(2, 4, 2).float()  # (batch, length, d)
    assert torch.equal(gather_sequence(cos, index, dim=-2)[1], cos[1, [1, 2]])


def test_selections_write_merged_features_into_a_copy_only():
    keep = torch.ones(2, 5, dtype=torch.bool)
    selections = Selections(keep)
    selections.mark(1, torch.tensor([1, 2, 3]), torch.tensor([0, 2]), torch.tensor([[7.0], [9.0]]))
    assert keep.tolist() == [[True] * 5, [True, True, False, True, True]] and not selections.changes_nothing
    values = torch.zeros(2, 5, 1)
    written = selections.written(values)
    assert written[1, :, 0].tolist() == [0.0, 7.0, 0.0, 9.0, 0.0] and values.eq(0).all()
    untouched = Selections(torch.ones(1, 3, dtype=torch.bool))
    assert untouched.changes_nothing and untouched.written(values) is values
