"""sieve-mini's multi-frame phase: a clip is its frames as images at 112 px, one `<image>` each. The training
sequences, the processor, the feature cache, the fast evaluation and generate agree; the phase starts from
the committed weights and resumes from its checkpoints. Uses the real sieve-mini (built as test_mini_model.py
builds it) with tiny feature caches under a temporary folder.
"""

import itertools

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import LlamaForCausalLM
from typer.testing import CliRunner

from tokensieve.engine.compat import from_pretrained
from tokensieve.mini import SAMPLE_IMAGE, VIDEO_FRAME_SIZE, build, features, train, video, video_inputs
from tokensieve.mini.evaluate_video import generate_answers, language_model_of
from tokensieve.mini.fasteval import answer, evaluate_lookups, format_lookups
from tokensieve.mini.lora import add_lora
from tokensieve.mini.sequences import IGNORE, Encoder, embed_with_images
from tokensieve.qa import QA, VIDEO_DATA_VERSION, video_examples


@pytest.fixture(scope="module")
def sieve_mini():
    return build.load_sieve_mini()


@pytest.fixture
def small_caches(tmp_path, monkeypatch):
    """Feature caches of 8 images and 2 clips a shard, in a temporary folder (the real ones hold 500 and 100)."""
    monkeypatch.setattr(features, "mini_dir", lambda: tmp_path)
    monkeypatch.setattr(video, "mini_dir", lambda: tmp_path)
    for module, name, size in ((features, "SHARD_SIZE", 8), (train, "SHARD_SIZE", 8),
                               (video, "VIDEO_SHARD_SIZE", 2), (train, "VIDEO_SHARD_SIZE", 2)):
        monkeypatch.setattr(module, name, size)
    return tmp_path


def test_a_clip_is_one_run_of_placeholders_per_frame_and_only_the_answer_is_labelled(sieve_mini):
    tokenizer = sieve_mini[1].tokenizer
    encoder = Encoder(tokenizer, image_tokens=64)
    ex = video_examples("train", 1, 1)[0]  # motion
    ids, labels = encoder.conversation([ex.qa], images=16)
    is_image = [i == encoder.image_token_id for i in ids]
    runs = [len(list(run)) for image, run in itertools.groupby(is_image) if image]
    assert runs == [64] * 16
    between = tokenizer("\nframe 2: ", add_special_tokens=False).input_ids
    first_gap = is_image.index(True) + 64
    assert ids[first_gap:first_gap + len(between)] == between  # "frame n: <image>\n" per frame, as the template writes
    prompt = tokenizer.decode(ids[:is_image.index(True)])
    assert prompt.endswith("user\nframe 1: ") and tokenizer.decode(ids).count("frame ") == 16
    labelled = [i for i, label in zip(ids, labels) if label != IGNORE]
    assert tokenizer.decode(labelled) == f"{ex.qa.answer}<|im_end|>"
    assert labels[-len(labelled) - 1:-1] == labelled and labels[-1] == IGNORE  # not the closing "\n"
    assert all(label == IGNORE for label, image in zip(labels, is_image) if image)


def test_video_inputs_write_what_training_reads(sieve_mini):
    _, processor = sieve_mini
    ex = video_examples("validation", 1, 3)[0]
    inputs = video_inputs(processor, ex.frames(224), ex.qa.question)  # resized to 112 px by the processor
    assert inputs.pixel_values.shape == (16, 3, VIDEO_FRAME_SIZE, VIDEO_FRAME_SIZE)
    assert inputs.input_ids[0].tolist() == Encoder(processor.tokenizer, image_tokens=64).prompt(ex.qa.question, 16)
    assert (inputs.input_ids == processor.image_token_id).sum() == 1024
    with pytest.raises(ValueError, match="at least one frame"):
        video_inputs(processor, [], ex.qa.question)


def test_the_clip_cache_holds_the_towers_layer_8_patches_of_every_frame(sieve_mini, small_caches):
    model, processor = sieve_mini
    cache = video.VideoFeatureCache(8, frames=8)
    shard = cache.shard("validation", 0)
    assert shard.shape == (2, 8 * 64, 384) and shard.dtype == torch.float16
    path = cache.path("validation", 0)
    assert path == small_caches / "features" / f"{VIDEO_DATA_VERSION}-8f-112px-layer8" / "validation-0000.safetensors"
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"data_version": VIDEO_DATA_VERSION, "frames": "8", "frame_size": "112", "layer": "8"}
    ex = video_examples("validation", 1, 1, frames=8)[0]
    pixels = video_inputs(processor, ex.frames(VIDEO_FRAME_SIZE), ex.qa.question).pixel_values
    with torch.no_grad():
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[8][:, 1:]
    assert torch.allclose(shard[1].float(), hidden.reshape(8 * 64, 384), atol=2e-2)  # fp16 storage
    assert torch.equal(cache.first("validation", 3)[:2], shard)


def test_fast_answers_on_cached_clips_are_what_generate_answers(sieve_mini, small_caches):
    model, processor = sieve_mini
    clips = video_examples("validation", 4)
    cache = video.VideoFeatureCache(8, frames=16)
    fast = answer(language_model_of(model), model.model.multi_modal_projector,
                  Encoder(processor.tokenizer, 64), cache.first("validation", 4), [ex.qa.question for ex in clips],
                  images=16)
    assert fast == generate_answers(model, processor, clips)


def test_lookups_report_a_kind_nobody_was_asked_as_none_asked_not_as_zero(sieve_mini):
    model, processor = sieve_mini
    shown = video_examples("validation", 1, frames=8)[0].clip.tracks
    hidden = [train.replace(track, poses=(None,) * 8) for track in shown]  # a clip where no object is ever seen
    features = torch.randn(2, 8 * 16, 384)
    lookups = evaluate_lookups(language_model_of(model), model.model.multi_modal_projector,
                               Encoder(processor.tokenizer, 16), [hidden, hidden], features)
    assert lookups["spans"] is None and lookups["frame"] is not None and lookups["objects"] is not None
    assert "object spans none asked" in format_lookups(lookups)
    assert evaluate_lookups(language_model_of(model), model.model.multi_modal_projector,
                            Encoder(processor.tokenizer, 16), [shown, hidden], features)["spans"] in (0.0, 1.0)


def test_init_from_weights_is_the_committed_model(sieve_mini):
    model, processor = sieve_mini
    lm = from_pretrained(LlamaForCausalLM, build.language_dir(), dtype=torch.float32).eval()
    wrapped = add_lora(lm.model, train.LORA_TARGETS, 16, alpha=32)
    projector = train.make_projector(build.vision_dir(), build.language_dir(), 8)
    train.init_from_committed(projector, wrapped)

    question = "What colour is the triangle?"
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}], add_generation_prompt=True)
    inputs = processor(images=Image.open(SAMPLE_IMAGE), text=text, return_tensors="pt")
    encoder = Encoder(processor.tokenizer, image_tokens=256)
    ids = torch.tensor([encoder.prompt(question)])
    with torch.no_grad():
        patches = model.model.vision_tower(inputs.pixel_values, output_hidden_states=True).hidden_states[8][:, 1:]
        embeds = embed_with_images(lm.get_input_embeddings(), ids, encoder.image_token_id, projector(patches))
        trained = lm(inputs_embeds=embeds).logits[0, -1]
        committed = model(**inputs).logits[0, -1, :trained.shape[0]]
    # The same weights, the LoRA merged (assembled) or beside the frozen weights (training): fp32 rounding only.
    assert (trained - committed).abs().max() < 2e-4  # measured 3.8e-5 on logits up to 35
    assert trained.argmax() == committed.argmax()
    with pytest.raises(ValueError, match="--lora-rank 16"):
        train.init_from_committed(projector, add_lora(from_pretrained(LlamaForCausalLM, build.language_dir()).model,
                                                      train.LORA_TARGETS, 8, alpha=16))


def _invoke(out, steps, *options):
    app = train.typer.Typer()
    app.command()(train.main)
    with torch.enable_grad():  # conftest runs every test under no_grad
        return CliRunner().invoke(app, [
            "--out", str(out), "--steps", str(steps), "--batch", "1", "--questions", "2", "--train-images", "8",
            "--init-from-weights", "--video-batch", "1", "--video-frames", "8", "--video-clips", "2",
            "--video-pool", "2", "--val-examples", "2", "--video-val-examples", "2", "--checkpoint-every", "1",
            "--eval-every", "100", "--log-every", "1", "--threads", "1", *options])


def _train(out, steps, *options):
    result = _invoke(out, steps, *options)
    assert result.exit_code == 0, result.output
    return result.output


def test_the_video_phase_trains_resumes_and_leaves_the_committed_weights(sieve_mini, small_caches):
    committed = build.PROJECTOR_FILE.read_bytes(), build.LORA_FILE.read_bytes()
    straight = _train(small_caches / "straight", 3)
    assert "started from the committed weights" in straight and "video_loss" in straight
    assert "clips (2 validation clips of 8 frames" in (small_caches / "straight" / "val-step00003.md").read_text()
    _train(small_caches / "resumed", 2)
    assert "resumed from" in _train(small_caches / "resumed", 3)
    # Within the warm-up the rate does not depend on --steps, so stopping at 2 and resuming to 3 is the same run.
    a, b = (torch.load(small_caches / run / "checkpoint.pt", weights_only=True) for run in ("straight", "resumed"))
    assert a["step"] == b["step"] == 3
    for name, tensor in a["lora"].items():
        assert torch.equal(tensor, b["lora"][name]), name
    assert all(torch.equal(v, b["projector"][k]) for k, v in a["projector"].items())
    start = load_file(str(build.PROJECTOR_FILE))
    assert all((a["projector"][k] - v).abs().max() > 1e-6 for k, v in start.items())  # it did train
    assert (build.PROJECTOR_FILE.read_bytes(), build.LORA_FILE.read_bytes()) == committed
    table = (small_caches / "straight" / "val-step00003.md").read_text()
    assert "at the training's pooled tokens (16 a frame)" in table
    lookups = table.split("lookups on the first 2 clips, full tokens: ")[1].split()
    assert lookups[:2] == ["frame", "descriptions"] and lookups[3:5] == ["object", "spans"]
    assert lookups[6:8] == ["frame", "objects"]
    assert all(float(lookups[i].rstrip(",")) in (0.0, 0.5, 1.0) for i in (2, 5, 8))  # two validation clips


def test_a_resumed_run_takes_new_peak_rates_and_full_token_steps(sieve_mini, small_caches):
    _train(small_caches / "run", 1)
    _train(small_caches / "run", 3, "--lr", "5e-4", "--lora-lr", "7e-5", "--video-full-every", "2", "--warmup", "2")
    groups = torch.load(small_caches / "run" / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["peak"] for g in groups] == [5e-4, 7e-5]
    assert [g["lr"] for g in groups] == [train.lr_at(2, 3, peak, 2) for peak in (5e-4, 7e-5)]


def test_the_question_weight_falls_on_each_clips_leading_answers(sieve_mini):
    tokenizer = sieve_mini[1].tokenizer
    encoder = Encoder(tokenizer, image_tokens=4)
    ex = video_examples("train", 1, frames=8)[0]
    spans = train.object_spans(ex.clip.tracks)
    qas = [ex.qa] + [QA("spans", f"In which frames is the {name}?", frames) for name, frames in spans]
    rows = [encoder.conversation(qas, images=8), encoder.conversation(qas[1:], images=8)]
    ids, labels, _ = train.batch_tensors(encoder, rows, "cpu")
    leading = train.leading_answers(labels, torch.tensor([2, 1]))
    assert tokenizer.decode(ids[0][leading[0]]) == f"{ex.qa.answer}<|im_end|>{spans[0][1]}<|im_end|>"
    assert tokenizer.decode(ids[1][leading[1]]) == f"{spans[0][1]}<|im_end|>"
    assert ((labels != IGNORE) & ~leading).sum() > leading.sum()  # the other answers are still labelled
    assert torch.equal(train.leading_answers(labels, torch.tensor([99, 99])), labels != IGNORE)


def test_span_questions_and_the_question_weight_change_what_the_clips_teach(sieve_mini, small_caches):
    def video_loss(run, *options):
        output = _train(small_caches / run, 1, *options)
        return float(output.split("video_loss ")[1].split()[0])

    plain = video_loss("plain")
    assert video_loss("again") == plain  # deterministic, so the differences below are the options'
    assert video_loss("spans", "--span-questions", "3") != plain
    assert video_loss("weighted", "--question-weight", "20") != plain
    assert video_loss("suite", "--suite-questions") != plain  # the first train clip (order) answers more


def test_clips_train_and_evaluate_at_the_frame_size_given(sieve_mini, small_caches):
    _train(small_caches / "small", 1, "--video-frame-size", "56")
    assert (small_caches / "features" / f"{VIDEO_DATA_VERSION}-8f-56px-layer8").is_dir()
    assert "at the training's pooled tokens (4 a frame)" in (small_caches / "small" / "val-step00001.md").read_text()


def test_visual_frames_number_each_clips_tokens_frame_by_frame_whatever_the_padding():
    is_image = torch.tensor([[0, 1, 1, 0, 1, 1, 0, 0], [1, 1, 0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    assert train.visual_frames(is_image, 2).tolist() == [0, 0, 1, 1] + [0, 0, 1, 1, 2, 2]


def test_the_frame_probe_trains_the_adapters_resumes_and_stays_out_of_the_weights(sieve_mini, small_caches):
    committed = build.PROJECTOR_FILE.read_bytes(), build.LORA_FILE.read_bytes()
    assert "frame_probe_accuracy" not in _train(small_caches / "plain", 2)
    output = _train(small_caches / "probe", 2, "--frame-probe-weight", "1", "--frame-probe-layer", "3")
    accuracy = float(output.split("frame_probe_accuracy ")[1].split()[0])
    assert 0 <= accuracy <= 1
    plain, probe = (torch.load(small_caches / run / "checkpoint.pt", weights_only=True) for run in ("plain", "probe"))
    assert probe["frame_probe"]["weight"].shape == (train.MAX_FRAMES, sieve_mini[0].config.text_config.hidden_size)
    assert "frame_probe" not in plain and plain["step"] == probe["step"] == 2
    assert any(not torch.equal(probe["lora"][name], plain["lora"][name]) for name in probe["lora"])  # it taught
    assert "resumed from" in _train(small_caches / "probe", 3, "--frame-probe-weight", "1", "--frame-probe-layer", "3")
    assert (build.PROJECTOR_FILE.read_bytes(), build.LORA_FILE.read_bytes()) == committed


def test_the_frame_probe_without_clips_is_refused_before_training(small_caches):
    result = _invoke(small_caches / "images", 1, "--frame-probe-weight", "1", "--video-batch", "0")
    message = " ".join(result.output.replace("│", " ").split())  # typer's boxed, wrapped error
    assert result.exit_code == 2 and "--frame-probe-weight reads clips' visual tokens: give --video-batch too" in message
    assert not (small_caches / "images").exists()


def test_a_window_of_a_clip_is_the_clip_its_frames_show():
    tracks = video_examples("train", 4, frames=8)[3].clip.tracks  # flashes: an object unseen in some frames
    for start, length in itertools.product(range(8), (1, 3)):
        window = train.window_of(tracks, start, length)
        seen = [track for track in tracks if any(pose is not None for pose in track.poses[start:start + length])]
        assert [track.shape for track in window] == [track.shape for track in seen]
        assert all(track.poses == old.poses[start:start + length] for track, old in zip(window, seen))
        assert [train.describe_frame(window, t) for t in range(len(window[0].poses) if window else 0)] == \
            [train.describe_frame(tracks, t) for t in range(start, min(8, start + length)) if window]
    one = train.window_of(tracks, 0, 1)
    assert {frames for _, frames in train.object_spans(one)} == {"frame 1"}
    empty = train.window_of([train.replace(tracks[0], poses=(None,) * 8)], 2, 3)
    assert empty == [] and train.object_spans(empty) == [] and train.describe_frame(empty, 0) == "no shapes."


def test_mixed_windows_show_another_clip_in_each_frame_and_describe_what_they_show():
    clips = video_examples("train", 5, frames=8)
    windows = [train.window_of(ex.clip.tracks, 2, 3) for ex in clips]
    features = torch.randn(5, 3 * 16, 384)
    mixed, picked = train.mixed_windows(windows, features, 3)
    for i, t in itertools.product(range(5), range(3)):
        source = (i + t) % 5
        assert train.describe_frame(mixed[i], t) == train.describe_frame(windows[source], t)
        assert torch.equal(picked[i, t * 16:(t + 1) * 16], features[source, t * 16:(t + 1) * 16])
    assert all(sum(pose is not None for pose in track.poses) == 1 for window in mixed for track in window)
    assert train.describe_frame(mixed[0], 1) != train.describe_frame(mixed[0], 2)  # the frames are of other clips


def test_a_window_trains_on_what_it_shows_and_is_looked_up_at_its_own_length(sieve_mini, small_caches):
    output = _train(small_caches / "window", 1, "--video-window", "2", "--span-questions", "2", "--own-question")
    plain = _train(small_caches / "plain", 1, "--span-questions", "2")
    assert output.split("video_loss ")[1].split()[0] != plain.split("video_loss ")[1].split()[0]
    table = (small_caches / "window" / "val-step00001.md").read_text()
    assert "lookups on the first 2 clips, full tokens" in table  # the whole clips are still checked
    window = table.split("lookups on their first 2 frames: ")[1].split()
    assert window[:2] == ["frame", "descriptions"] and window[3:5] == ["object", "spans"]
    assert all(float(window[i].rstrip(",")) in (0.0, 0.5, 1.0) for i in (2, 5, 8))


def test_a_mixed_window_run_trains_and_looks_up_mixed_validation_windows(sieve_mini, small_caches):
    mixed = _train(small_caches / "mixed", 1, "--video-window", "2", "--video-mix", "--own-question", "--video-batch", "2")
    plain = _train(small_caches / "plain", 1, "--video-window", "2", "--own-question", "--video-batch", "2")
    assert mixed.split("video_loss ")[1].split()[0] != plain.split("video_loss ")[1].split()[0]
    table = (small_caches / "mixed" / "val-step00001.md").read_text()
    window = table.split("lookups on their first 2 frames, mixed across clips: ")[1].split()
    assert window[:2] == ["frame", "descriptions"] and float(window[2].rstrip(",")) in (0.0, 0.5, 1.0)


def test_whole_clips_of_a_mixed_step_are_asked_the_suite_and_the_rest_are_mixed(sieve_mini, small_caches,
                                                                                  monkeypatch):
    for module in (video, train):  # shards of 3 clips: two to mix and one kept whole
        monkeypatch.setattr(module, "VIDEO_SHARD_SIZE", 3)
    mixing = ("--video-window", "8", "--video-mix", "--video-batch", "3", "--video-clips", "3", "--suite-questions")
    kept = _train(small_caches / "kept", 1, *mixing, "--whole-clips", "1")
    more = _train(small_caches / "more", 1, *mixing, "--whole-clips", "1", "--question-weight", "5")
    all_mixed = _train(small_caches / "all-mixed", 1, *mixing[:-1], "--own-question")
    losses = [run.split("video_loss ")[1].split()[0] for run in (kept, more, all_mixed)]
    # The whole clip's suite answers are the leading ones that --question-weight weighs; mixed clips have none.
    assert len(set(losses)) == 3
    table = (small_caches / "kept" / "val-step00001.md").read_text()
    assert "lookups on their first 8 frames, mixed across clips" in table
    for unmixed, window, whole in ((), "8", "1"), (("--video-mix",), "4", "1"), (("--video-mix",), "8", "2"):
        refused = _invoke(small_caches / "refused", 1, "--video-window", window, *unmixed, "--video-batch", "3",
                          "--video-clips", "3", "--whole-clips", whole)
        assert refused.exit_code == 2, refused.output
        assert "--whole-clips keeps some of a mixed step's clips whole" in " ".join(refused.output.replace("│", " ").split())
    assert not (small_caches / "refused").exists()


WHOLE_CLIPS = "--video-window cuts the clips of --video-batch to 1 to --video-frames"


@pytest.mark.parametrize("options, message", [
    (("--video-window", "9"), WHOLE_CLIPS), (("--video-window", "2", "--suite-questions"), WHOLE_CLIPS),
    (("--video-window", "2", "--video-batch", "0"), WHOLE_CLIPS),
    (("--video-window", "2", "--frame-questions", "0", "--no-video-describe"), "--video-window asks only about the window"),
    (("--video-mix",), "--video-mix mixes the frames of --video-window's windows")])
def test_a_window_longer_than_the_clips_with_whole_clip_questions_or_nothing_to_ask_is_refused(small_caches, options,
                                                                                                  message):
    result = _invoke(small_caches / "refused", 1, *options)
    assert result.exit_code == 2 and message in " ".join(result.output.replace("│", " ").split())
    assert not (small_caches / "refused").exists()
