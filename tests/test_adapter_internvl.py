"""InternVL specifics: the tile and pixel-shuffle map pinned by hand, [CLS] signals per tile against an eager
tower, images of several tile counts, the budget over a whole image (or per tile), refusals, and the two
silent traps of pruning this model: features out of the kept placeholders' order, and a forward without a
mask read as packed sequences."""

from __future__ import annotations

import pytest
import torch

import tokensieve as ts
from conftest import build_model
from test_contract import TEXTS, _assert_same, _snapshot, greedy
from tiny_internvl import (
    INTERNVL, TOKENS_PER_TILE, image_tokens, internvl_inputs, sized_inputs, tiles_of, tiny_internvl,
)
from tiny_models import left_padded
from tokensieve.adapters import PlaceholderMismatch, adapter_for
from tokensieve.sieve import Selection, Sieve
from tokensieve.signals import Signal

SIZES = [(64, 32), (32, 32), (64, 64)]  # (height, width): 3 tiles (1x2 crops + thumbnail), 1 tile, 5 tiles
SIDE = 8  # patches along a tile's side
FEATURE_BLOCK = 2  # vision_feature_layer=-1: the last of the tiny tower's three blocks
CLS_ROW, MEAN_ROWS = Signal("vision_attention", layer=1, queries="cls"), Signal("vision_attention", layer=2)
EARLY_CLS = Signal("cls_attention", layers=(1, 3))


class Probe(Sieve):
    """Asks for ``asks``, keeps every token and records what it was given (not registered)."""

    name, paper = "probe", "test"
    signals = ("cls_attention", "vision_attention", "vision_keys", "vision_features", "project")

    def __init__(self, *asks):
        super().__init__(keep=1.0)
        self.asks, self.seen = asks, []

    def requests(self):
        return self.asks

    def select(self, tokens):
        self.seen.append(tokens)
        return Selection(torch.arange(len(tokens)))


def token_patches() -> torch.Tensor:
    """(16, 4) the tower sequence positions each LLM token of a tile carries, written out by hand: token
    t = r*4 + c holds patches (2r, 2c), (2r, 2c+1), (2r+1, 2c), (2r+1, 2c+1), after the [CLS] at 0."""
    return torch.tensor([[1 + (2 * r + dr) * SIDE + 2 * c + dc for dr in (0, 1) for dc in (0, 1)]
                         for r in range(SIDE // 2) for c in range(SIDE // 2)])


def tile_ranges(sizes) -> list[range]:
    counts = [tiles_of(size) for size in sizes]
    return [range(sum(counts[:i]), sum(counts[: i + 1])) for i in range(len(counts))]


def by_tile(values: torch.Tensor, tiles: range) -> torch.Tensor:
    """(tiles, heads, 16) per-tile values laid out as one image's tokens: (heads, 16 x tiles)."""
    return values[tiles.start : tiles.stop].transpose(0, 1).flatten(1)


def probed(inputs, *asks) -> list:
    model = build_model(INTERNVL)
    probe = Probe(*asks)
    with ts.apply(model, probe):
        model(**inputs)
    return probe.seen


def test_the_adapters_pixel_shuffle_map_is_the_models_and_the_hand_written_one():
    """The projector's input for a tile is, token by token, the tower's output at the 4 hand-mapped patches."""
    model = build_model(INTERNVL)
    inputs = sized_inputs(SIZES)
    tower = model.model.vision_tower(inputs["pixel_values"]).last_hidden_state  # (tiles, 1 + 64, 32)
    (tokens,) = probed({**sized_inputs(SIZES[:1])}, "vision_features")
    by_hand = tower[:3, token_patches()].flatten(2).flatten(0, 1)  # (48, 4 x 32), tile after tile
    torch.testing.assert_close(tokens["vision_features"], by_hand, atol=0, rtol=0)
    assert torch.equal(adapter_for(model)._token_patches(SIDE, "cpu") + 1, token_patches())


def test_tiles_are_laid_out_tile_major_as_the_model_scatters_them():
    """Each image is one run of placeholders: its features are its tiles' projected tokens, tile after tile
    (thumbnail last), in blocks of one tile each; a one-tile image is a plain 4x4 grid."""
    model = build_model(INTERNVL)
    inputs = sized_inputs(SIZES)
    projected = model.model.get_image_features(inputs["pixel_values"]).pooler_output  # (9 tiles, 16, 64)
    seen = probed(inputs, "vision_features", "project")
    with ts.apply(model, ts.load("uniform", keep=1.0)) as run:
        model(**inputs)
    assert [r.before for r in run.stats.images] == [48, 16, 80]
    assert [r.grid for r in run.stats.images] == [(1, 48), (4, 4), (1, 80)]
    for tokens, tiles in zip(seen, tile_ranges(SIZES)):
        assert torch.equal(tokens.features, projected[tiles.start : tiles.stop].flatten(0, 1))
        torch.testing.assert_close(tokens["project"](tokens["vision_features"]), tokens.features, atol=1e-6, rtol=1e-5)
        layout = tokens.layout()
        assert len(layout) == len(tiles) and all(block.shape == (4, 4) for block in layout)
        assert torch.equal(torch.cat([block.flatten() for block in layout]), torch.arange(len(tokens)))


def test_cls_signals_are_each_tiles_own_row_of_an_eager_tower_pooled_over_its_patches():
    """[CLS] rows summed over each token's 4 patches, received attention averaged over them, keys concatenated;
    per tile, then tile after tile. The reference runs the same weights with eager attention."""
    inputs = sized_inputs(SIZES)
    seen = probed(inputs, "cls_attention", CLS_ROW, MEAN_ROWS, EARLY_CLS, "vision_keys")
    reference = tiny_internvl()
    reference.model.vision_tower.set_attn_implementation("eager")
    maps = reference.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions  # per block
    patches = token_patches()
    cls_rows = [m[:, :, 0][:, :, patches].sum(-1) for m in maps]  # (tiles, heads, 16) per block
    received = [m.mean(dim=2)[:, :, patches].mean(-1) for m in maps]
    attention = reference.model.vision_tower.encoder.layer[FEATURE_BLOCK].attention
    keys = {}
    hook = attention.k_proj.register_forward_hook(lambda module, args, out: keys.setdefault("k", out))
    reference.model.vision_tower(inputs["pixel_values"])
    hook.remove()
    heads = keys["k"].view(*keys["k"].shape[:2], 4, -1).transpose(1, 2)  # (tiles, heads, 65, 8)
    token_keys = heads[:, :, patches].flatten(3)  # (tiles, heads, 16, 32)
    assert len(seen) == len(SIZES)
    for tokens, tiles in zip(seen, tile_ranges(SIZES)):
        torch.testing.assert_close(tokens["cls_attention"], by_tile(cls_rows[FEATURE_BLOCK], tiles), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(tokens[CLS_ROW], by_tile(cls_rows[0], tiles), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(tokens[MEAN_ROWS], by_tile(received[1], tiles), atol=1e-6, rtol=1e-5)
        early = torch.stack([by_tile(cls_rows[0], tiles), by_tile(cls_rows[2], tiles)])
        torch.testing.assert_close(tokens[EARLY_CLS], early, atol=1e-6, rtol=1e-5)
        want_keys = token_keys[tiles.start : tiles.stop].transpose(0, 1).flatten(1, 2)
        torch.testing.assert_close(tokens["vision_keys"], want_keys, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(seen[0]["cls_attention"], seen[0][CLS_ROW])  # the layers differ


def test_a_tower_with_qk_norm_is_read_after_its_norms():
    """InternViT-6B normalises queries and keys after their projections: the rows must come from the norms."""
    model = tiny_internvl(use_qk_norm=True, norm_type="rms_norm")
    with torch.no_grad():
        for layer in model.model.vision_tower.encoder.layer:
            layer.attention.q_norm.weight.normal_(generator=torch.Generator().manual_seed(3))
    inputs = sized_inputs(SIZES[:1])
    probe = Probe("cls_attention")
    with torch.no_grad(), ts.apply(model, probe):
        model(**inputs)
    model.model.vision_tower.set_attn_implementation("eager")
    with torch.no_grad():
        rows = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions[-1][:, :, 0]
    torch.testing.assert_close(probe.seen[0]["cls_attention"], by_tile(rows[:, :, token_patches()].sum(-1), range(3)),
                               atol=1e-6, rtol=1e-5)


def _decoder_inputs(model, inputs, method) -> tuple[dict, list]:
    """The decoder's keyword inputs under ``method`` (after tokensieve's hook) and the image records."""
    calls = []
    with ts.apply(model, method) as run:
        hook = model.model.language_model.register_forward_pre_hook(lambda m, a, kw: calls.append(dict(kw)), with_kwargs=True)
        try:
            model(**inputs)
        finally:
            hook.remove()
    return calls[0], run.stats.images


def test_kept_tokens_get_their_own_tiles_features_in_the_kept_placeholders_order():
    """Trap: the model checks only the feature count, so features of the wrong tile or in another order would
    pass silently. Each kept token must enter the LLM with the projected feature of its own tile and index."""
    model = build_model(INTERNVL)
    sizes = [(64, 64), (32, 32)]
    inputs = sized_inputs(sizes)
    projected = model.model.get_image_features(inputs["pixel_values"]).pooler_output.flatten(0, 1)
    decoder, records = _decoder_inputs(model, inputs, ts.load("random", keep=12))
    embeds = decoder["inputs_embeds"][0]
    placeholders = (inputs["input_ids"][0] == INTERNVL.image_token).nonzero().squeeze(1)
    kept_positions, kept_features, start = [], [], 0
    for record in records:
        kept_positions.append(placeholders[start + record.kept])
        kept_features.append(projected[start + record.kept])
        start += record.before
    kept_positions, kept_features = torch.cat(kept_positions), torch.cat(kept_features)
    assert [r.before for r in records] == [80, 16] and [r.after for r in records] == [12, 12]
    rows = (decoder["position_ids"][0].unsqueeze(1) == kept_positions).nonzero()  # kept tokens keep their positions
    assert torch.equal(rows[:, 1], torch.arange(len(kept_positions)))
    assert torch.equal(embeds[rows[:, 0]], kept_features)


def test_a_forward_without_a_mask_is_not_read_as_packed_sequences():
    """Trap: with no attention mask and no cache, transformers reads the gaps that pruning leaves in the position
    ids as the starts of packed sequences (a block-diagonal mask, silently wrong logits). The engine passes an
    explicit mask, so a call without one equals the call with an all-ones one, and the masked reference."""
    model = build_model(INTERNVL)
    inputs = internvl_inputs(TEXTS[:1])
    unmasked = {key: value for key, value in inputs.items() if key != "attention_mask"}
    method = ts.load("random", keep=16)
    with ts.apply(model, method):
        without = model(**unmasked, use_cache=False).logits
        with_mask = model(**inputs, use_cache=False).logits
    assert torch.equal(without, with_mask)
    decoder, _ = _decoder_inputs(model, unmasked | {"use_cache": False}, method)
    assert decoder["attention_mask"] is not None and bool(decoder["attention_mask"].all())
    # the trap is real on this transformers version: the same decoder input without the mask differs
    positions, embeds = decoder["position_ids"], decoder["inputs_embeds"]
    assert bool((positions[0, 1:] - positions[0, :-1] > 1).any())
    language_model = model.model.language_model
    masked = language_model(inputs_embeds=embeds, position_ids=positions, attention_mask=decoder["attention_mask"], use_cache=False)
    packed = language_model(inputs_embeds=embeds, position_ids=positions, use_cache=False)
    assert not torch.allclose(masked.last_hidden_state[0, -1], packed.last_hidden_state[0, -1], atol=1e-3)


def test_the_budget_covers_the_whole_image_or_each_tile():
    model = build_model(INTERNVL)
    inputs = sized_inputs(SIZES[:1])
    with ts.apply(model, ts.load("fastervlm", keep=15)) as run:
        model(**inputs)
    (record,) = run.stats.images
    assert record.after == 15
    with ts.apply(model, ts.FasterVLM(keep=ts.Budget(15, per_crop=True))) as run:
        model(**inputs)
    (record,) = run.stats.images
    per_tile = torch.bincount(record.kept // TOKENS_PER_TILE, minlength=3)
    assert per_tile.tolist() == [5, 5, 5]


@pytest.mark.parametrize("name", ["uniform", "pool", "random", "fastervlm", "visionzip", "fastv"])
def test_images_of_different_tile_counts_are_each_pruned_to_the_budget(name):
    model = build_model(INTERNVL)
    inputs = sized_inputs(SIZES)
    method = ts.load(name, keep=16, **({"layer": 1} if name == "fastv" else {}))
    with ts.apply(model, method) as run:
        tokens = greedy(model, inputs)
    assert [r.before for r in run.stats.images] == [48, 16, 80]
    afters = [r.after for r in run.stats.images]
    assert afters[1] == 16 and (all(0 < a <= 16 for a in afters) if name == "pool" else afters == [16, 16, 16])
    assert tokens.shape == (1, inputs["input_ids"].shape[1] + 4)


def test_a_row_without_images_beside_one_with_an_image():
    model = build_model(INTERNVL)
    batch = INTERNVL.make_inputs([[5, 6], [7, 8, 9]], n_images=[0, 1])
    alone = INTERNVL.make_inputs([[7, 8, 9]])
    with ts.apply(model, ts.load("fastervlm", keep=16)) as run:
        batch_tokens = greedy(model, batch)
        alone_tokens = greedy(model, alone)
    assert [(r.row, r.after) for r in run.stats.images] == [(1, 16), (0, 16)]
    assert torch.equal(batch_tokens[1, -4:], alone_tokens[0, -4:])


def test_images_and_placeholders_that_disagree_are_refused():
    model = build_model(INTERNVL)
    inputs = INTERNVL.make_inputs([[5, 6]], n_images=[2])
    one_tile_short = {**inputs, "pixel_values": inputs["pixel_values"][:-1]}
    ragged, mask = left_padded([[1] + image_tokens()[:-2] + [126, 5, 6]])  # a run of 63 placeholders
    with ts.apply(model, ts.load("divprune", keep=8)):
        with pytest.raises(ValueError, match=r"encoded 7 tile\(s\) of 16 tokens, but input_ids has runs of \[64, 64\]"):
            model(**one_tile_short)
        with pytest.raises(PlaceholderMismatch, match=r"runs of \[63\] image placeholder tokens: each image needs 16"):
            model(input_ids=ragged, attention_mask=mask, pixel_values=inputs["pixel_values"][:4])
        model(**INTERNVL.make_inputs([[5, 6]]))  # the block still works after the errors


@pytest.mark.parametrize("name, words", [
    ("tome_vit", "pixel shuffle, which needs every patch"),
    ("hiprune", r"vision_attention\(layer=9, queries='mean'\): the vision tower has 3 layers"),
])
def test_methods_it_cannot_serve_are_refused(name, words):
    model = build_model(INTERNVL)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=f"{name} needs signals .*{words}"):
        ts.apply(model, ts.load(name, keep=16))
    _assert_same(model, before)
