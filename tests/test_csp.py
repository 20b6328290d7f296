"""LVLM_CSP's stages (tokensieve/methods/csp.py): the clustering picks, the scattering stage and the pruning rule,
each by hand, and the schedule by the decoder's depth."""

import pytest
import torch

import tokensieve as ts
from conftest import build_model
from test_in_llm import _image_blocks, _masked_stock_hidden
from tiny_models import LLAVA
from tiny_qwen2_vl import QWEN2_VL
from tokensieve.engine.flops import decoder_prefill_flops
from tokensieve.methods.csp import CSP, CSPCluster, CSPPrune, CSPScatter
from tokensieve.sieve import Selection, VisualTokens


def image(n: int, entered: int | None = None, cls=None, attention=None) -> VisualTokens:
    signals = {}
    if cls is not None:
        signals["cls_attention"] = torch.tensor(cls, dtype=torch.float32)
    if attention is not None:
        signals["llm_attention"] = torch.tensor(attention, dtype=torch.float32)
    return VisualTokens(torch.randn(n, 8, generator=torch.Generator().manual_seed(n)), (1, n), signals, entered=entered)


@pytest.mark.parametrize("n, clusters, expected", [
    (16, 4, [0, 4, 8, 12]),  # S[i] = i * floor(16 / 4)
    (10, 3, [0, 3, 6]),  # floor(10 / 3) = 3: token 9 is no representative
    (7, 3, [0, 2, 4]),
    (24, 0.25, [0, 4, 8, 12, 16, 20]),  # a share: 6 of 24
])
def test_uniform_picks_every_floor_n_over_clusters_th_token(n, clusters, expected):
    assert CSPCluster(clusters, 1, "uniform").select(image(n)).kept.tolist() == expected


def test_uniform_picks_follow_the_papers_formula():
    for n in range(1, 60):
        for clusters in range(1, n):
            kept = CSPCluster(clusters, 1, "uniform").select(image(n)).kept.tolist()
            assert kept == [i * (n // clusters) for i in range(clusters)], (n, clusters)


def test_cls_picks_the_top_head_mean_cls_attention_in_raster_order():
    # head means 0.25, 0.5, 0.1, 0.5, 0.9, 0.05: the top three are 4, then 1 and 3 (tied; both fit)
    cls = [[0.3, 0.6, 0.1, 0.4, 1.0, 0.0], [0.2, 0.4, 0.1, 0.6, 0.8, 0.1]]
    assert CSPCluster(3, 1, "cls").select(image(6, cls=cls)).kept.tolist() == [1, 3, 4]
    # two of them: the tie between 1 and 3 goes to the lower index
    assert CSPCluster(2, 1, "cls").select(image(6, cls=cls)).kept.tolist() == [1, 4]


def test_clustering_budget_is_over_the_tokens_the_image_entered_with():
    assert CSPCluster(0.5, 1, "uniform").select(image(8, entered=8)).kept.tolist() == [0, 2, 4, 6]
    assert torch.equal(CSPCluster(1.0, 1, "uniform").select(image(8)).kept, torch.arange(8))  # keep-all: every token
    # a final budget that covers the image turns the clustering off too: keeping every token is the stock model
    assert torch.equal(CSPCluster(2, 1, "uniform", final=1.0).select(image(8)).kept, torch.arange(8))
    assert torch.equal(CSPCluster(2, 1, "uniform", final=8).select(image(8, entered=8)).kept, torch.arange(8))
    assert CSPCluster(2, 1, "uniform", final=7).select(image(8, entered=8)).kept.tolist() == [0, 4]
    with pytest.warns(UserWarning, match="keep=20 is more than the 8 visual tokens"):
        assert torch.equal(CSPCluster(20, 1, "uniform").select(image(8)).kept, torch.arange(8))


def test_scattering_keeps_every_token_it_is_given():
    tokens = image(9, entered=9)
    selection = CSPScatter(1.0, 2).select(tokens)
    assert torch.equal(selection.kept, torch.arange(9)) and selection.features is None and selection.assignment is None
    assert CSPScatter.restores is True


def test_pruning_keeps_the_top_head_mean_query_attention_of_the_entered_count():
    # head means: 0.15, 0.4, 0.05, 0.35, 0.3, 0.1, 0.2, 0.45
    attention = [[0.1, 0.5, 0.0, 0.3, 0.4, 0.1, 0.2, 0.4], [0.2, 0.3, 0.1, 0.4, 0.2, 0.1, 0.2, 0.5]]
    # a quarter of the 8 the image entered with: 2 tokens, 7 and 1
    assert CSPPrune(0.25, 3).select(image(8, entered=8, attention=attention)).kept.tolist() == [1, 7]
    # a count; and a budget over more tokens than are left keeps them all
    assert CSPPrune(3, 3).select(image(8, entered=8, attention=attention)).kept.tolist() == [1, 3, 7]
    assert CSPPrune(0.5, 3).select(image(8, entered=32, attention=attention)).kept.tolist() == list(range(8))


def test_pruning_matches_a_plain_loop():
    generator = torch.Generator().manual_seed(0)
    for n in [5, 12, 30]:
        attention = torch.rand(4, n, generator=generator)
        for k in range(1, n + 1):
            kept = CSPPrune(k, 3).select(VisualTokens(torch.zeros(n, 2), (1, n), {"llm_attention": attention}, entered=n))
            mean = attention.mean(0).tolist()
            order = sorted(range(n), key=lambda i: (-mean[i], i))[:k]
            assert kept.kept.tolist() == sorted(order)


def test_schedule_places_the_three_stages_by_the_depth():
    method = CSP(keep=0.1, clusters=64)
    cluster, scatter, prune = method.schedule(4)  # the tiny models: 1, 2, 3
    assert (type(cluster), type(scatter), type(prune)) == (CSPCluster, CSPScatter, CSPPrune)
    assert (cluster.layer, scatter.layer, prune.layer) == (1, 2, 3)
    assert (cluster.keep, cluster.pick, cluster.final, prune.keep) == (64, "uniform", 0.1, 0.1)
    assert [stage.layer for stage in method.schedule(32)] == [8, 16, 24]  # LISA-7B's 32 decoder layers
    assert [stage.layer for stage in method.schedule(40)] == [10, 20, 30]  # LISA-13B's 40
    assert [stage.layer for stage in CSP(layers=(2, 10, 20)).schedule(32)] == [2, 10, 20]
    assert CSP().requests() == ("llm_attention",) and CSP(pick="cls").requests() == ("llm_attention", "cls_attention")
    assert CSP(pick="cls").schedule(4)[0].pick == "cls"
    assert CSPCluster(8, 1, "cls").requests() == ("cls_attention",) and cluster.requests() == ()


def test_the_method_itself_only_runs_as_stages():
    with pytest.raises(TypeError, match="runs as stages inside the LLM"):
        CSP().select(image(4))
    with pytest.raises(ValueError, match="needs three stages, but a decoder of 2 layers has room for 1"):
        CSP().schedule(2)


@pytest.mark.parametrize("kwargs, message", [
    ({"pick": "random"}, "pick='random': choose 'uniform'"),
    ({"clusters": 0}, "clusters=0: pass the representatives"),
    ({"clusters": 1.5}, "clusters=1.5: pass the representatives"),
    ({"clusters": True}, "clusters=True: pass the representatives"),
    ({"layers": (8, 16)}, r"layers=\(8, 16\): pass the three decoder layers"),
    ({"layers": (8, 8, 24)}, r"layers=\(8, 8, 24\): pass the decoder layers to prune before, strictly increasing"),
    ({"layers": (0, 8, 24)}, r"layers=\(0, 8, 24\): pass the decoder layers to prune before, strictly increasing"),
    ({"positions": "packed"}, "positions='packed': choose 'original'"),
    ({"keep": 0}, "keep"),
])
def test_bad_arguments_say_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CSP(**kwargs)


def test_selections_are_plain_kept_indices():
    selection = CSPCluster(4, 1, "uniform").select(image(16))
    assert isinstance(selection, Selection) and selection.features is None and selection.assignment is None


def test_csp_runs_its_three_stages_and_counts_each_layer_at_its_own_length():
    """On the tiny LLaVA (4 decoder layers, 64 tokens an image): layer 0 sees all 64, layer 1 the 16 representatives,
    layer 2 all 64 again (scattered back), layer 3 the 8 the query attends to most."""
    model = build_model(LLAVA)
    inputs = LLAVA.make_inputs([[5, 6, 7, 8]])
    with ts.apply(model, ts.CSP(keep=8, clusters=16)) as run:
        model(**inputs)
    (record,) = run.stats.images
    assert [(stage.layer, stage.after) for stage in record.stages] == [(1, 16), (2, 64), (3, 8)]
    assert record.stages[0].kept.tolist() == list(range(0, 64, 4))
    assert torch.equal(record.stages[1].kept, torch.arange(64)) and record.after == 8
    config, length = model.config.get_text_config(), inputs["input_ids"].shape[1]
    text = length - record.before
    expected = decoder_prefill_flops(config, [length], layers=1) + sum(
        decoder_prefill_flops(config, [text + stage.after], layers=1) for stage in record.stages)
    assert run.stats.prefill_flops == expected


def test_cls_picks_are_fastervlms_top_tokens():
    model = build_model(LLAVA)
    inputs = LLAVA.make_inputs([[5, 6, 7, 8]])
    with ts.apply(model, ts.CSP(keep=8, clusters=16, pick="cls")) as run:
        model(**inputs)
    with ts.apply(model, ts.FasterVLM(keep=16)) as reference:
        model(**inputs)
    assert torch.equal(run.stats.images[0].stages[0].kept, reference.stats.images[0].kept)
    assert [stage.after for stage in run.stats.images[0].stages] == [16, 64, 8]


class _RecordingCSP(CSP):
    """CSP whose pruning stage records the attention row it was given."""

    def schedule(self, n_layers):
        cluster, scatter, prune = super().schedule(n_layers)
        rows = self.rows = []

        class Recording(CSPPrune):
            def select(stage, tokens):
                rows.append(tokens["llm_attention"])
                return super().select(tokens)

        return cluster, scatter, Recording(prune.keep, prune.layer)


@pytest.mark.parametrize("family", [LLAVA, QWEN2_VL], ids=lambda f: f.name)
def test_the_pruning_row_is_eager_attention_over_the_scattered_tokens(family):
    """The pruning stage's row equals eager attention of the last token in layer p of the stock model in which the
    clustering stage's dropped keys are masked from layer c to s and come back at s with their layer-c states; and
    the stage keeps the top of that row among all N tokens."""
    model = family.build()
    model.set_attn_implementation("eager")
    inputs = family.make_inputs([[5, 6, 7, 8], [9, 10]])
    method = _RecordingCSP(keep=8, clusters=16)
    with ts.apply(model, method) as run:
        model(**inputs)
    records = run.stats.images
    attentions = []
    hook = model.register_forward_hook(lambda m, a, out: attentions.append(out.attentions))
    try:
        _masked_stock_hidden(model, {**inputs, "output_attentions": True}, records, family, before_stage_at=3)
    finally:
        hook.remove()
    for record, (row, positions), got in zip(records, _image_blocks(inputs, family, records), method.rows):
        assert got.shape[-1] == record.before
        torch.testing.assert_close(got, attentions[-1][3][row, :, -1, positions].float(), atol=1e-6, rtol=1e-4)
        assert torch.equal(record.kept, got.mean(0).topk(8).indices.sort().values)


def test_scattering_brings_back_what_csp_received_not_what_a_method_before_it_dropped():
    model = build_model(LLAVA)
    with ts.apply(model, ts.Chain(ts.Uniform(keep=32), CSP(keep=8, clusters=8))) as run:
        model(**LLAVA.make_inputs([[5, 6, 7, 8], [9, 10]]))
    for record in run.stats.images:
        before, cluster, scatter, prune = record.stages
        assert [stage.after for stage in record.stages] == [32, 8, 32, 8]
        assert torch.equal(scatter.kept, before.kept) and torch.equal(cluster.kept, before.kept[0::4])
        assert set(prune.kept.tolist()) <= set(before.kept.tolist())
