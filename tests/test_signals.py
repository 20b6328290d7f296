"""Parameterised signals (tokensieve/signals.py): each new signal equals what eager attention, or the
reference computation, gives on the same input; requests are validated before the model is touched."""

from __future__ import annotations

import pytest
import torch
from transformers.vision_utils import get_vision_window_index

import tokensieve as ts
from conftest import build_model
from test_contract import _assert_same, _snapshot
from tiny_idefics3 import IDEFICS3, SMOLVLM, tiny_idefics3, tiny_smolvlm
from tiny_llava_next import LLAVA_NEXT, LLAVA_ONEVISION, tiny_llava_next, tiny_llava_onevision
from tiny_models import IMAGE_TOKEN, LLAVA, left_padded, random_image, tiny_llava
from tiny_qwen2_vl import QWEN2_5_VL, QWEN2_VL, tiny_qwen2_5_vl, tiny_qwen2_vl
from tokensieve.sieve import Selection, Sieve
from tokensieve.signals import Signal, instruction_positions

MEAN = {layer: Signal("vision_attention", layer=layer) for layer in (1, 2, -1, None)}


class Probe(Sieve):
    """Asks for ``asks``, keeps every token and records what it was given (not registered)."""

    name, paper = "probe", "test"
    signals = ("cls_attention", "vision_attention", "text_embeddings")

    def __init__(self, *asks):
        super().__init__(keep=1.0)
        self.asks, self.seen = asks, []

    def requests(self):
        return self.asks

    def select(self, tokens):
        self.seen.append(tokens)
        return Selection(torch.arange(len(tokens)))


class ProjectionCheck(Sieve):
    """Keeps every token and records, per image, the shape of ``vision_features`` and how far ``project`` of them
    lies from the image's LLM tokens (not registered)."""

    name, paper = "projection-check", "test"
    signals = ("vision_features", "project")

    def __init__(self):
        super().__init__(keep=1.0)
        self.shapes, self.errors = [], []

    def select(self, tokens):
        projected = tokens["project"](tokens["vision_features"])
        self.shapes.append(tuple(tokens["vision_features"].shape))
        self.errors.append(float((projected - tokens.features).abs().max()))
        return Selection(torch.arange(len(tokens)))


def probed(family, inputs, *asks):
    probe = Probe(*asks)
    with ts.apply(build_model(family), probe):
        build_model(family)(**inputs)
    return probe.seen


def eager(build):
    model = build()
    for module in model.modules():  # every vision tower of the family, eager
        if hasattr(module, "set_attn_implementation") and module is not model and "vision" in type(module).__name__.lower():
            module.set_attn_implementation("eager")
    return model


def block(layer, n):
    return (layer - 1 if layer > 0 else n + layer) if layer is not None else None


def test_llava_vision_and_cls_attention_equal_eager_at_every_layer():
    inputs = LLAVA.make_inputs([[5, 6], [7]], n_images=[2, 1])
    asks = [*MEAN.values(), Signal("vision_attention", layer=1, queries="cls"), Signal("vision_attention", layer=-2, queries="cls"),
            Signal("cls_attention", layers=(1, 3)), Signal("cls_attention")]
    seen = probed(LLAVA, inputs, *asks)
    attentions = eager(tiny_llava).model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    assert len(seen) == 3 and len(attentions) == 3
    for image, tokens in enumerate(seen):
        maps = [a[image] for a in attentions]  # (heads, 65, 65) per block, [CLS] first
        for layer, request in MEAN.items():
            want = maps[block(layer, 3) if layer is not None else 1].mean(dim=1)[:, 1:]  # feature layer -2: block 1
            torch.testing.assert_close(tokens[request], want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(tokens[asks[4]], maps[0][:, 0, 1:], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(tokens[asks[5]], maps[1][:, 0, 1:], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(tokens[asks[6]], torch.stack([maps[0][:, 0, 1:], maps[2][:, 0, 1:]]), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(tokens["cls_attention"], maps[1][:, 0, 1:], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(seen[0][MEAN[1]], seen[0][MEAN[2]])  # the layers differ


@pytest.mark.parametrize("family, build", [(LLAVA_NEXT, tiny_llava_next), (LLAVA_ONEVISION, tiny_llava_onevision)],
                         ids=["llava_next", "llava_onevision"])
def test_anyres_vision_attention_is_each_crops_packed_like_the_features(family, build):
    inputs = family.make_inputs([[5, 6]])
    seen = probed(family, inputs, MEAN[1], MEAN[None])
    model = eager(build)
    crops = inputs["pixel_values"][0]
    attentions = model.model.vision_tower(crops, output_attentions=True).attentions
    offset = 1 if model.config.vision_feature_select_strategy == "default" else 0
    feature = block(model.config.vision_feature_layer, len(attentions))
    for request, index in ((MEAN[1], 0), (MEAN[None], feature)):
        per_crop = attentions[index].mean(dim=2)[:, :, offset:].transpose(1, 2)  # (crops, patches, heads)
        newline = torch.zeros(per_crop.shape[-1])
        if family is LLAVA_NEXT:
            packed, _ = model.model.pack_image_features([per_crop], inputs["image_sizes"], "default", newline)
        else:
            packed, _ = model.model.pack_image_features([per_crop], inputs["image_sizes"], newline, model.config.vision_aspect_ratio)
        torch.testing.assert_close(seen[0][request], packed[0].T, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family, build", [(QWEN2_VL, tiny_qwen2_vl), (QWEN2_5_VL, tiny_qwen2_5_vl)], ids=["qwen2_vl", "qwen2_5_vl"])
def test_qwen_vision_attention_is_eagers_received_attention_pooled_per_merged_token(family, build, monkeypatch):
    inputs = family.make_inputs([[5, 6], [7]], n_images=[2, 1])
    seen = probed(family, inputs, MEAN[1], MEAN[2])
    model = eager(build)
    visual = model.model.visual
    module = __import__(type(visual).__module__, fromlist=["eager_attention_forward"])
    current, weights = [None], {}
    original = module.eager_attention_forward

    def recording(attention, *args, **kwargs):
        output, attn = original(attention, *args, **kwargs)
        weights.setdefault(current[0], []).append(attn[0])  # (heads, segment, segment)
        return output, attn

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    for index, blk in enumerate(visual.blocks):
        blk.register_forward_pre_hook(lambda m, a, index=index: current.__setitem__(0, index))
    visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    grid, patches = inputs["image_grid_thw"], inputs["image_grid_thw"].prod(-1).tolist()
    for request, index in ((MEAN[1], 0), (MEAN[2], 1)):
        received = torch.cat([w.sum(dim=1) for w in weights[index]], dim=1)  # column sums, in the tower's order
        received = torch.cat([part / n for part, n in zip(received.split(patches, dim=1), patches)], dim=1)
        merged = received.view(received.shape[0], -1, 4).mean(-1)
        if family is QWEN2_5_VL:
            window, _ = get_vision_window_index(grid, 2, model.config.vision_config.window_size, model.config.vision_config.patch_size)
            merged = merged[:, window.argsort()]
        for image, tokens in enumerate(seen):
            want = merged[:, image * len(tokens) : (image + 1) * len(tokens)]
            torch.testing.assert_close(tokens[request], want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family, build", [(IDEFICS3, tiny_idefics3), (SMOLVLM, tiny_smolvlm)], ids=["idefics3", "smolvlm"])
def test_idefics3_vision_attention_is_eagers_pooled_over_each_tokens_patch_block(family, build):
    inputs = family.make_inputs([[5, 6], [7]], n_images=[2, 1])
    seen = probed(family, inputs, MEAN[1], MEAN[-1])
    model = eager(build)
    pixels = inputs["pixel_values"].flatten(0, 1)
    pixels = pixels[pixels.flatten(1).any(1)]  # the tower sees the real images only
    attentions = model.model.vision_model(pixels, output_attentions=True).attentions
    s = model.config.scale_factor
    for request, index in ((MEAN[1], 0), (MEAN[-1], len(attentions) - 1)):
        received = attentions[index].mean(dim=2)  # (images, heads, patches)
        side = int(received.shape[-1] ** 0.5)
        blocks = received.view(*received.shape[:2], side // s, s, side // s, s).mean(dim=(3, 5)).flatten(2)
        for image, tokens in enumerate(seen):
            torch.testing.assert_close(tokens[request], blocks[image], atol=1e-6, rtol=1e-5)


def test_text_embeddings_are_the_instruction_tokens_input_embeddings():
    """Row 0: two images then text (each image's instruction is the text after both); row 1 (left-padded):
    text before and after its image (only the text after counts); row 2: the image ends the prompt (every
    text token of the prompt)."""
    n = 64
    rows = [[1] + [IMAGE_TOKEN] * 2 * n + [5, 6, 7], [1, 9] + [IMAGE_TOKEN] * n + [8], [1, 9, 10] + [IMAGE_TOKEN] * n]
    input_ids, attention_mask = left_padded(rows)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
              "pixel_values": torch.stack([random_image(1, i, 64) for i in range(4)])}
    seen = probed(LLAVA, inputs, Signal("text_embeddings"))
    table = build_model(LLAVA).get_input_embeddings().weight
    expected = [[5, 6, 7], [5, 6, 7], [8], [1, 9, 10]]
    assert [len(t) for t in seen] == [n] * 4
    for tokens, ids in zip(seen, expected):
        assert torch.equal(tokens["text_embeddings"], table[ids])


def test_text_embeddings_of_a_longer_conversation_stay_those_of_the_prompt():
    """A no-cache loop re-reads the prompt plus what was generated: the instruction stays the prompt's."""
    inputs = LLAVA.make_inputs([[5, 6]])
    probe = Probe(Signal("text_embeddings"))
    model = build_model(LLAVA)
    with ts.apply(model, probe):
        model(**inputs)
        longer = torch.cat([inputs["input_ids"], torch.tensor([[11, 12]])], dim=1)
        model(input_ids=longer, attention_mask=torch.ones_like(longer), pixel_values=inputs["pixel_values"])
        other = inputs["input_ids"].clone()
        other[0, -1] = 13  # a different prompt over the same image
        model(input_ids=other, attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"])
    table = model.get_input_embeddings().weight
    assert [t["text_embeddings"].tolist() for t in probe.seen] == [table[[5, 6]].tolist()] * 2 + [table[[5, 13]].tolist()]


def test_instruction_rule_by_hand():
    real = torch.tensor([0, 1, 1, 1, 1, 1, 1, 1], dtype=torch.bool)
    image = torch.tensor([0, 0, 1, 1, 0, 1, 0, 0], dtype=torch.bool)
    assert instruction_positions(real, image, image_end=3, prompt_end=6).tolist() == [4, 6]
    assert instruction_positions(real, image, image_end=5, prompt_end=6).tolist() == [6]
    assert instruction_positions(real, image, image_end=5, prompt_end=5).tolist() == [1, 4]  # nothing after: the prompt's text


def test_requests_are_frozen_hashable_and_checked():
    assert Signal("vision_attention") == Signal("vision_attention", layer=None, queries="mean")
    assert len({Signal("cls_attention"), Signal("cls_attention", layers=None), Signal("cls_attention", layers=[1, 2])}) == 2
    assert Signal("cls_attention", layers=[1, 2]).layers == (1, 2)
    assert repr(Signal("vision_attention", layer=9)) == "vision_attention(layer=9, queries='mean')"
    assert repr(Signal("cls_attention")) == "cls_attention"
    with pytest.raises(AttributeError):
        Signal("vision_attention").layer = 3
    for bad, words in [(dict(name="nope"), "unknown signal"), (dict(name="vision_attention", layer=0), "0 is the embeddings"),
                       (dict(name="vision_attention", queries="max"), "queries"), (dict(name="project", layer=1), "takes no parameters")]:
        with pytest.raises(ValueError, match=words):
            Signal(**bad)
    every = ts.list_methods()
    for signal, some, not_one in [("vision_attention", {"fopru", "hiprune"}, "fastervlm"), ("text_embeddings", {"cdpruner", "mmtok"}, "divprune")]:
        listed = [m.name for m in ts.list_methods(needs=signal)]
        assert listed == [m.name for m in every if signal in m.signals]
        assert some <= set(listed) and not_one not in listed


def test_a_layer_beyond_the_tower_is_refused_before_touching_the_model():
    model = build_model(LLAVA)
    before = _snapshot(model)
    words = (r"hiprune needs signals LlavaForConditionalGeneration cannot give \(vision_attention\(layer=9, queries='mean'\): "
             r"the vision tower has 3 layers: pass a layer from 1 to 3 .*\)\. Use a method that needs none of them, such as .*divprune")
    with pytest.raises(ValueError, match=words):
        ts.apply(model, ts.HiPrune())
    _assert_same(model, before)
    with ts.apply(model, ts.HiPrune(keep=8, object_layer=-3)) as run:
        model(**LLAVA.make_inputs([[5]]))
    assert run.stats.images[0].after == 8


@pytest.mark.parametrize("family", [QWEN2_VL, IDEFICS3, LLAVA_ONEVISION], ids=lambda f: f.name)
def test_cls_queries_are_refused_by_towers_without_cls(family):
    model = build_model(family)
    with pytest.raises(ValueError, match=r"probe needs signals .*vision_attention\(layer=None, queries='cls'\): .*no \[CLS\] token"):
        ts.apply(model, Probe(Signal("vision_attention", queries="cls")))


def test_a_sieve_must_declare_what_it_requests():
    class Undeclared(Probe):
        signals = ("text_embeddings",)

    with pytest.raises(ValueError, match="asks for vision_attention but does not declare it"):
        ts.apply(build_model(LLAVA), Undeclared(Signal("vision_attention")))
