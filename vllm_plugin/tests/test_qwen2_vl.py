"""The plugin's Qwen2-VL, Qwen2.5-VL and Qwen3-VL under vLLM's offline ``LLM.generate``: one engine per model (pytest
groups the tests by it; each start costs a minute or more on a 2-core CPU); methods and budgets vary per request. Images
are portraits (14 x 11 tokens at Qwen2-VL's 28 pixels a token, 12 x 9 at Qwen3-VL's 32), where the text after the
image continues from the grid's height."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoProcessor, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig
from transformers import Qwen2VLForConditionalGeneration, Qwen3VLConfig, Qwen3VLForConditionalGeneration

import tokensieve as ts
from tokensieve.sieve import VisualTokens
from conftest import QWEN_PROMPT, portrait
from tokensieve_vllm import ARCHITECTURE as LLAVA_ARCHITECTURE
from tokensieve_vllm import QWEN2_5_VL_ARCHITECTURE, QWEN2_VL_ARCHITECTURE, QWEN3_VL_ARCHITECTURE
from tokensieve_vllm.methods import ImageShape, UnservableMethod, kept_tokens
from tokensieve_vllm.qwen2_vl import (TokensieveQwen2_5_VLForConditionalGeneration, TokensieveQwen2VLForConditionalGeneration,
                                      check_config, kept_positions, qwen_servable_names, served_count)
from tokensieve_vllm.qwen3_vl import TokensieveQwen3VLForConditionalGeneration

#: a portrait's tokens: 392 x 308 pixels after the processor's resize at 28 pixels a token, 384 x 288 at 32
QWEN2_GRID, QWEN3_GRID = (14, 11), (12, 9)
NEW_TOKENS = 5
MODELS = {"qwen2-vl": (QWEN2_VL_ARCHITECTURE, Qwen2VLForConditionalGeneration, TokensieveQwen2VLForConditionalGeneration,
                       QWEN2_GRID),
          "qwen2.5-vl": (QWEN2_5_VL_ARCHITECTURE, Qwen2_5_VLForConditionalGeneration,
                         TokensieveQwen2_5_VLForConditionalGeneration, QWEN2_GRID),
          "qwen3-vl": (QWEN3_VL_ARCHITECTURE, Qwen3VLForConditionalGeneration, TokensieveQwen3VLForConditionalGeneration,
                       QWEN3_GRID)}
#: uniform:0.25's count, worked out by hand: a quarter of the image's tokens, rounded
QUARTER = {QWEN2_GRID: 38, QWEN3_GRID: 27}
#: one request per method, each on its own image
SERVED = ["divprune:30", "pool:16", "uniform:0.25", "random:40", "downsample:20", "fourier:24", "dart_pre:30,text_pivots=0",
          "divprune:1.0", "none"]


@pytest.fixture(scope="module", params=list(MODELS))
def model(request, qwen_dir):
    """(checkpoint directory, the plugin's architecture, the transformers class, the plugin's class, the portraits'
    token grid) of one model."""
    return (str(qwen_dir / request.param), *MODELS[request.param])


@pytest.fixture(scope="module")
def llm(model):
    from vllm import LLM

    engine = LLM(model=model[0], hf_overrides={"architectures": [model[1]]}, dtype="float32", max_model_len=2048,
                 limit_mm_per_prompt={"image": 1}, enforce_eager=True, seed=0)
    yield engine
    engine.llm_engine.engine_core.shutdown()  # the next model's engine starts on the same 2 cores


@pytest.fixture(scope="module")
def answers(llm):
    """Every SERVED spelling on its own image, in one batch: (prompt token count, generated token ids) per spelling."""
    from vllm import SamplingParams

    requests = [{"prompt": QWEN_PROMPT, "multi_modal_data": {"image": portrait(seed)},
                 "mm_processor_kwargs": {"tokensieve_method": spelling}} for seed, spelling in enumerate(SERVED)]
    outputs = llm.generate(requests, SamplingParams(temperature=0, max_tokens=NEW_TOKENS))
    return {spelling: (len(out.prompt_token_ids), list(out.outputs[0].token_ids)) for spelling, out in zip(SERVED, outputs)}


@pytest.fixture(scope="module")
def reference(model):
    """The transformers model and processor of the same checkpoint, for ts.apply."""
    return model[2].from_pretrained(model[0], dtype=torch.float32).eval(), AutoProcessor.from_pretrained(model[0])


def _hf_inputs(processor, image):
    return processor(images=image, text=QWEN_PROMPT, return_tensors="pt", return_mm_token_type_ids=True)


def test_prompt_tokens_fall_by_exactly_what_was_pruned(model, answers, reference):
    grid = model[4]
    n_tokens = grid[0] * grid[1]
    assert _hf_inputs(reference[1], portrait(0))["image_grid_thw"].tolist() == [[1, 2 * grid[0], 2 * grid[1]]]
    stock_length = answers["none"][0]
    for spelling, (length, _) in answers.items():
        assert length == stock_length - n_tokens + served_count(spelling, ImageShape(grid, False)), spelling
    assert answers["pool:16"][0] == stock_length - n_tokens + 16  # 4 x 4 cells of the grid
    assert answers["uniform:0.25"][0] == stock_length - n_tokens + QUARTER[grid]


def test_tokens_equal_ts_apply_with_original_positions(answers, reference):
    """vLLM gives the kept tokens their cells' mrope positions and the text after the image its unpruned ones: its
    tokens are ts.apply(...)'s with tokensieve's default (original) positions, token for token."""
    model, processor = reference
    assert len({tuple(tokens) for _, tokens in answers.values()}) > 1  # the methods' answers differ: a real comparison
    for seed, spelling in enumerate(SERVED):
        inputs = _hf_inputs(processor, portrait(seed))
        with torch.no_grad():
            if spelling == "none":
                out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
            else:
                with ts.apply(model, ts.build(spelling)):
                    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert out[0, inputs["input_ids"].shape[1]:].tolist() == answers[spelling][1], spelling


def test_kept_tokens_get_the_positions_of_the_unpruned_image(model, reference):
    """The plugin's two steps on a pruned prompt (its placeholder layout, then vLLM's recompute_mrope_positions with
    the kept tokens' position channels) give every kept token and every text token the mrope position it has in the
    unpruned prompt, and the next token the unpruned prompt's next position."""
    hf_model, processor = reference
    inputs = _hf_inputs(processor, portrait(3))
    ids, grid = inputs["input_ids"][0], inputs["image_grid_thw"]
    unpruned, _ = hf_model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], grid)
    unpruned = unpruned[:, 0]  # (3, L)
    grid_tokens = model[4]
    kept = torch.randperm(grid_tokens[0] * grid_tokens[1], generator=torch.Generator().manual_seed(0))[:30].sort().values
    image = ids == hf_model.config.image_token_id
    keep = ~image
    keep[image.nonzero()[kept, 0]] = True
    pruned_ids = ids[keep].tolist()

    plugin = model[3].__new__(model[3])  # the two methods read only the config
    torch.nn.Module.__init__(plugin)
    plugin.config = hf_model.config
    from vllm.multimodal.inputs import PlaceholderRange

    feature = SimpleNamespace(mm_position=PlaceholderRange(offset=pruned_ids.index(hf_model.config.image_token_id),
                                                           length=len(kept)),
                              data={"image_grid_thw": SimpleNamespace(data=grid[0])})
    laid_out, _ = plugin.get_mrope_input_positions(pruned_ids, [feature])
    assert laid_out.shape == (3, len(pruned_ids))
    embeddings = torch.randn(len(kept), 8)
    channels = torch.cat([embeddings, kept_positions(kept, ImageShape(grid_tokens, False)).float()], dim=1)
    stripped, positions, delta = plugin.recompute_mrope_positions(pruned_ids, [channels], laid_out.clone(), 0)
    assert torch.equal(stripped[0], embeddings)
    assert torch.equal(positions, unpruned[:, keep])
    assert len(pruned_ids) + delta == int(unpruned.max()) + 1  # where generated tokens continue, as unpruned
    assert not torch.equal(positions, laid_out)  # the recompute moved the kept tokens to their cells


def test_keep_all_gives_the_tokens_of_the_plugin_switched_off(model, llm):
    from vllm import SamplingParams

    requests = [{"prompt": QWEN_PROMPT, "multi_modal_data": {"image": portrait(99)},
                 "mm_processor_kwargs": {"tokensieve_method": spelling}}
                for spelling in ("none", "divprune:1.0", f"uniform:{model[4][0] * model[4][1]}")]
    outputs = llm.generate(requests, SamplingParams(temperature=0, max_tokens=NEW_TOKENS))
    tokens = [list(out.outputs[0].token_ids) for out in outputs]
    assert tokens[0] == tokens[1] == tokens[2]
    assert len({len(out.prompt_token_ids) for out in outputs}) == 1


@pytest.mark.parametrize(("spelling", "message"), [
    ("fastervlm:30", "no \\[CLS\\] token"),
    ("visionzip:30", "no \\[CLS\\] token"),
    ("fastv:0.5", "prunes inside the LLM"),
    ("cdpruner:30", "never sees the prompt"),
    ("uniform:1000", "more than the {n_tokens} tokens"),
])
def test_bad_input_is_refused_before_the_request_runs(model, llm, spelling, message):
    from vllm import SamplingParams

    request = {"prompt": QWEN_PROMPT, "multi_modal_data": {"image": portrait(7)},
               "mm_processor_kwargs": {"tokensieve_method": spelling}}
    with pytest.raises(Exception, match=message.format(n_tokens=model[4][0] * model[4][1])) as refused:
        llm.generate(request, SamplingParams(temperature=0, max_tokens=1))
    assert isinstance(refused.value, UnservableMethod) or UnservableMethod.__name__ in repr(refused.value), refused.value
    after = llm.generate({**request, "mm_processor_kwargs": {"tokensieve_method": "uniform:16"}},
                         SamplingParams(temperature=0, max_tokens=1))  # the engine survived
    assert len(after[0].outputs[0].token_ids) == 1


def test_served_methods_and_checkpoints():
    assert set(qwen_servable_names()) == {"divprune", "downsample", "fourier", "pool", "random", "uniform"}
    with pytest.raises(UnservableMethod, match=f"use {QWEN2_5_VL_ARCHITECTURE}"):
        check_config(Qwen2_5_VLConfig(), QWEN2_VL_ARCHITECTURE)
    with pytest.raises(UnservableMethod, match=f"use {QWEN3_VL_ARCHITECTURE}"):
        check_config(Qwen3VLConfig(), QWEN2_5_VL_ARCHITECTURE)
    with pytest.raises(UnservableMethod, match=f"use {QWEN2_VL_ARCHITECTURE}"):
        check_config(Qwen2VLConfig(), QWEN3_VL_ARCHITECTURE)
    with pytest.raises(UnservableMethod, match=f"use {LLAVA_ARCHITECTURE}"):
        check_config(AutoConfig.for_model("llava"), QWEN2_5_VL_ARCHITECTURE)
    with pytest.raises(UnservableMethod, match="drop the architecture override"):
        check_config(AutoConfig.for_model("llava_next"), QWEN2_5_VL_ARCHITECTURE)
    with pytest.raises(UnservableMethod, match="drop the architecture override"):  # Qwen3-VL's MoE: not covered
        check_config(AutoConfig.for_model("qwen3_vl_moe"), QWEN3_VL_ARCHITECTURE)
    check_config(Qwen2VLConfig(), QWEN2_VL_ARCHITECTURE)
    check_config(Qwen3VLConfig(), QWEN3_VL_ARCHITECTURE)


@pytest.mark.parametrize("spelling", ["divprune:30", "pool:16", "fourier:24"])
def test_qwen3_vl_keeps_each_kept_tokens_own_deepstack_rows(spelling):
    """The method sees the embeddings only; every kept token's DeepStack columns are its own rows at the same index
    (pool and fourier write their own embeddings, which says nothing about the DeepStack rows, as in tokensieve's
    engine), so the kept index is readable back from them."""
    visual_dim, levels = 16, 2
    n_tokens = QWEN3_GRID[0] * QWEN3_GRID[1]
    embeddings = torch.randn(n_tokens, visual_dim, generator=torch.Generator().manual_seed(1))
    index = torch.arange(n_tokens, dtype=torch.float32)[:, None]
    deepstack = torch.cat([index.expand(-1, visual_dim), -index.expand(-1, visual_dim)], dim=1)  # level 0: i, 1: -i
    plugin = TokensieveQwen3VLForConditionalGeneration.__new__(TokensieveQwen3VLForConditionalGeneration)
    plugin.visual_dim = visual_dim  # kept_rows reads only the embedding width
    rows, kept = plugin.kept_rows(ts.build(spelling), torch.cat([embeddings, deepstack], dim=1),
                                  ImageShape(QWEN3_GRID, False))
    assert rows.shape == (served_count(spelling, ImageShape(QWEN3_GRID, False)), visual_dim * (1 + levels))
    assert torch.equal(rows[:, visual_dim:], deepstack[kept])
    expected, indices = kept_tokens(ts.build(spelling), VisualTokens(embeddings, QWEN3_GRID, {}))
    assert torch.equal(rows[:, :visual_dim], expected) and torch.equal(kept, indices)


def test_qwen3_vl_tokens_depend_on_which_deepstack_rows_each_token_gets(qwen_dir):
    """What makes the comparison with ts.apply cover DeepStack: in the tiny Qwen3-VL, giving each image token its
    neighbour's DeepStack rows changes the pruned model's tokens, so the plugin's equal tokens mean equal rows."""
    path = str(qwen_dir / "qwen3-vl")
    model = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    inputs = _hf_inputs(processor, portrait(0))

    def pruned_tokens() -> list[int]:
        with torch.no_grad(), ts.apply(model, ts.build("divprune:30")):
            return model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[0, -NEW_TOKENS:].tolist()

    own = pruned_tokens()
    shifted = [merger.register_forward_hook(lambda module, args, rows: rows.roll(1, 0))
               for merger in model.model.visual.deepstack_merger_list]
    try:
        assert pruned_tokens() != own
    finally:
        for hook in shifted:
            hook.remove()
