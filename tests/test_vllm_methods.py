"""The vLLM plugin's pure functions (vllm_plugin/tokensieve_vllm/methods.py), which import without vLLM: what it
serves, the placeholder count it lays out before the tower runs (against what each method's own code keeps), and its
refusals. The plugin under vLLM itself: vllm_plugin/tests (bash scripts/test_vllm.sh)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "vllm_plugin"))

import tokensieve as ts  # noqa: E402
from tokensieve_vllm import methods  # noqa: E402
from tokensieve_vllm.methods import ImageShape, UnservableMethod  # noqa: E402

CLIP = ImageShape((24, 24), has_cls=True)
SIGLIP = ImageShape((16, 16), has_cls=False)


def test_served_methods_are_the_exact_count_methods_the_signals_allow():
    assert set(methods.servable_names(True)) == set(methods.EXACT_COUNT) - {"dart_pre"}  # dart_pre: text_pivots=0
    assert set(methods.servable_names(False)) == {"divprune", "downsample", "fourier", "pool", "random", "uniform"}
    assert methods.served_method("dart_pre:64,text_pivots=0", True).name == "dart_pre"


@pytest.mark.parametrize("name", methods.EXACT_COUNT)
@pytest.mark.parametrize("shape", [CLIP, ImageShape((5, 7), True)], ids=["24x24", "5x7"])
def test_the_count_laid_out_is_what_the_method_keeps_of_real_tokens(name, shape):
    """On random features and signals of the shape (several draws, budgets from 1 to every token), the method's own
    code keeps exactly :func:`placeholder_count` tokens: the count vLLM lays out before the tower runs."""
    extra = ",text_pivots=0" if name == "dart_pre" else ""
    for keep in sorted({1, 2, 3, 7, shape.tokens // 3, shape.tokens // 2, shape.tokens - 1, shape.tokens, 0.3, 0.05}):
        method = methods.served_method(f"{name}:{keep}{extra}", shape.has_cls)
        count = methods.placeholder_count(method, shape)
        for seed in range(3):
            torch.manual_seed(seed)
            heads, d = 3, 8
            projector = torch.nn.Linear(heads * d, 16)
            features = torch.randn(shape.tokens, heads * d)
            tokens = methods.image_tokens(method, projector(features).detach(), shape.grid,
                                          qkv=torch.randn(shape.tokens + 1, 3 * heads * d), heads=heads,
                                          features=features, projector=projector)
            assert len(methods.kept_embeddings(method, tokens, shape.grid)) == count, (name, keep, seed)


def test_grid_methods_count_the_largest_whole_grid():
    assert methods.checked_count("pool:32", CLIP) == 30  # 5x6: the probe's pool killed the engine expecting 32
    assert methods.checked_count("downsample:64", CLIP) == 64
    assert methods.checked_count("pool:1.0", CLIP) == 576
    assert methods.checked_count("none", CLIP) == 576


def test_kept_embeddings_are_the_engines_decoder_input_rows():
    """What the plugin returns for one image is what ts.apply hands the decoder: the kept rows, merged ones written."""
    torch.manual_seed(0)
    embeddings = torch.randn(CLIP.tokens, 16)
    method = ts.Pool(keep=64)
    kept = methods.kept_embeddings(method, methods.image_tokens(method, embeddings, CLIP.grid, qkv=None, heads=1,
                                                                features=None, projector=None), CLIP.grid)
    pooled = torch.nn.functional.adaptive_avg_pool2d(embeddings.T.reshape(1, 16, 24, 24), (8, 8)).reshape(16, 64).T
    torch.testing.assert_close(kept, pooled)
    method = ts.DivPrune(keep=10)
    selection = method.select(ts.VisualTokens(embeddings, CLIP.grid))
    tokens = methods.image_tokens(method, embeddings, CLIP.grid, qkv=None, heads=1, features=None, projector=None)
    assert torch.equal(methods.kept_embeddings(method, tokens, CLIP.grid), embeddings[selection.kept])


def test_cls_attention_is_the_class_rows_softmax_without_its_own_column():
    torch.manual_seed(1)
    heads, d, n = 2, 4, 9
    qkv = torch.randn(n + 1, 3 * heads * d)
    method = ts.FasterVLM(keep=3)
    tokens = methods.image_tokens(method, torch.randn(n, 5), (3, 3), qkv=qkv, heads=heads, features=None, projector=None)
    q, k, _ = qkv.chunk(3, dim=-1)
    q, k = q.view(n + 1, heads, d).transpose(0, 1), k.view(n + 1, heads, d).transpose(0, 1)
    expected = torch.softmax(q[:, 0:1] @ k.transpose(1, 2) / d ** 0.5, dim=-1)[:, 0, 1:]
    torch.testing.assert_close(tokens["cls_attention"], expected)


@pytest.mark.parametrize(("spelling", "shape", "message"), [
    ("fastv:0.5", CLIP, "prunes inside the LLM"),
    ("pyramiddrop", CLIP, "paged KV cache"),
    ("cdpruner:64", CLIP, "never sees the prompt"),
    ("dart_pre:64", CLIP, "text_embeddings"),
    ("tome_vit", CLIP, "inside the vision tower"),
    ("tome:64", CLIP, "not known to follow from its budget"),
    ("fastervlm:keep=Adaptive", CLIP, "keep"),
    ("pool:32+fastv", CLIP, "is a chain"),
    ("uniform:577", CLIP, "more than the 576 tokens"),
    ("fastervlm:64", SIGLIP, "no \\[CLS\\] token"),
    ("nosuch:3", CLIP, "unknown method"),
])
def test_refusals_name_what_to_change(spelling, shape, message):
    with pytest.raises(UnservableMethod, match=message):
        methods.checked_count(spelling, shape)


def test_a_request_overrides_the_server_default():
    assert methods.method_spelling({"tokensieve_method": "uniform:8"}, "divprune:64") == "uniform:8"
    assert methods.method_spelling({}, "divprune:64") == "divprune:64"
    assert methods.method_spelling(None, None) == "none"
    with pytest.raises(UnservableMethod, match="method spelling"):
        methods.method_spelling({"tokensieve_method": 64}, None)
    assert methods.decode_spelling(methods.encode_spelling("dart_pre:64,text_pivots=0")) == "dart_pre:64,text_pivots=0"
