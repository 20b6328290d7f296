"""Train sieve-mini's projector (and LoRA adapters in the language model) on the QA suite's train split.

    nice -n 19 python -m tokensieve.mini.train --out /tmp/sieve-mini-train --steps 3000
    nice -n 19 python -m tokensieve.mini.train --out /tmp/sieve-mini-video --init-from-weights --video-batch 4 ...

The vision tower and the language model's own weights stay frozen; gradients flow through the
whole language model to the projector and adapters. Vision features are cached (features.py).
Each training sequence packs several questions about one image. The loss covers answer tokens
only. bf16 where the hardware has it (a GPU, a CPU with bf16 units), else fp32 (`training_dtype`). Checkpoints
every --checkpoint-every steps; rerunning the same command resumes. --export writes the small
trained files that `tokensieve model build` assembles into sieve-mini.

The multi-frame phase (--video-batch N) starts from the committed weights (--init-from-weights) and adds,
at every step, N clips of the video suite (one sequence per clip: its frames as images, video.py, then
its question) to the image sequences; it evaluates both suites and exports only when --export is given.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import typer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, LlamaForCausalLM, LlavaConfig
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from ..engine.compat import from_pretrained
from ..qa import DATA_VERSION, QA, VIDEO_DATA_VERSION, examples, format_table, video_examples
from ..qa.video import MAX_FRAMES
from ..qa.questions import describe
from ..qa.video_questions import Track, describe_clip, describe_frame, object_spans, suite_questions
from .align import WordTargets, fit_projector, refit_words, word_patches
from .build import LORA_FILE, PROJECTOR_FILE, VISION_FEATURE_LAYER, language_dir, vision_dir
from .assemble import llava_config
from .fasteval import evaluate, evaluate_clips, evaluate_lookups, format_lookups
from .features import SHARD_SIZE, FeatureCache
from .lora import LoRALinear, add_lora, dequantised, lora_state, quantised
from .sequences import IGNORE, Encoder, embed_with_images
from .video import VIDEO_FRAME_SIZE, VIDEO_SHARD_SIZE, VideoFeatureCache

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


LOOKUP_CLIPS = 40  # validation clips whose frame and span lookups each evaluation checks (evaluate_lookups)


def make_projector(vision: Path, language: Path, layer: int) -> LlavaMultiModalProjector:
    """The stock LLaVA projector for this pair of parts (fresh weights)."""
    config: LlavaConfig = llava_config(vision, language, image_token_id=0, vocab_size=49153, vision_feature_layer=layer)
    return LlavaMultiModalProjector(config)


def standardise_first_layer(projector: LlavaMultiModalProjector, features: torch.Tensor) -> None:
    """Initialise linear_1 to see standardised features: DINOv2's mid-layer channels vary widely in scale."""
    flat = features.float().reshape(-1, features.shape[-1])
    mean, std = flat.mean(0), flat.std(0).clamp(min=1e-3)
    with torch.no_grad():
        weight = projector.linear_1.weight / std
        projector.linear_1.weight.copy_(weight)
        projector.linear_1.bias.copy_(projector.linear_1.bias - weight @ mean)


def pool_grid(features: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool a square grid of patch features (B, N, D) by `factor` per side: cheaper training sequences."""
    if factor == 1:
        return features
    side = math.isqrt(features.shape[1])
    grid = features.float().view(features.shape[0], side, side, -1).permute(0, 3, 1, 2)
    return torch.nn.functional.avg_pool2d(grid, factor).flatten(2).transpose(1, 2).contiguous()


def pool_frames(features: torch.Tensor, frames: int, factor: int) -> torch.Tensor:
    """pool_grid on each frame of clips (B, frames * N, D): (B, frames * N / factor**2, D)."""
    per_frame = pool_grid(features.reshape(features.shape[0] * frames, -1, features.shape[-1]), factor)
    return per_frame.reshape(features.shape[0], -1, features.shape[-1])


def init_from_committed(projector: LlavaMultiModalProjector, wrapped: dict[str, LoRALinear]) -> None:
    """The committed projector and (dequantised) LoRA adapters as the starting point: the published sieve-mini."""
    projector.load_state_dict(load_file(str(PROJECTOR_FILE)), strict=True)
    with safe_open(str(LORA_FILE), "pt") as f:
        scale = float(f.metadata()["scale"])
    lora = dequantised(load_file(str(LORA_FILE)))
    if set(lora) != {f"{name}.{ab}" for name in wrapped for ab in ("lora_A", "lora_B")}:
        raise ValueError(f"{LORA_FILE} adapts other layers than --lora-rank's adapters on {LORA_TARGETS}; "
                         "pass the --lora-rank the committed weights were trained with (16)")
    for name, layer in wrapped.items():
        if layer.lora_A.shape != lora[f"{name}.lora_A"].shape or layer.scale != scale:
            raise ValueError(f"{LORA_FILE} has rank {lora[f'{name}.lora_A'].shape[0]} and scale {scale}; "
                             f"--lora-rank {layer.lora_A.shape[0]} gives scale {layer.scale}: pass --lora-rank 16")
        layer.lora_A.data.copy_(lora[f"{name}.lora_A"])
        layer.lora_B.data.copy_(lora[f"{name}.lora_B"])


def shuffled(seed: int, step: int, n_shards: int, shard_size: int, batch: int) -> tuple[int, np.ndarray]:
    """Step -> (shard, indices in it): epochs visit shards in a seeded order, items in a seeded order within each."""
    steps_per_shard = shard_size // batch
    epoch, within = divmod(step, n_shards * steps_per_shard)
    shard_slot, offset = divmod(within, steps_per_shard)
    shard = int(np.random.default_rng((seed, epoch)).permutation(n_shards)[shard_slot])
    return shard, np.random.default_rng((seed, epoch, shard)).permutation(shard_size)[offset * batch:(offset + 1) * batch]


def batch_tensors(encoder: Encoder, convs: list[tuple[list[int], list[int]]], device) -> tuple[torch.Tensor, ...]:
    length = max(len(ids) for ids, _ in convs)
    pad = encoder.tokenizer.pad_token_id
    ids = torch.tensor([i + [pad] * (length - len(i)) for i, _ in convs], device=device)
    labels = torch.tensor([l + [IGNORE] * (length - len(l)) for _, l in convs], device=device)
    mask = torch.tensor([[1] * len(i) + [0] * (length - len(i)) for i, _ in convs], device=device)
    return ids, labels, mask


def training_dtype(device: str) -> torch.dtype:
    """bf16 on a GPU or a CPU with bf16 units (AVX512-BF16, AMX); fp32 elsewhere: there bf16 matrix products
    fall back to a slow single-threaded kernel (a training step went from 13 s to over 2 minutes on AVX2 cores)."""
    return torch.bfloat16 if device == "cuda" or _cpu_has_bf16() else torch.float32


def _cpu_has_bf16() -> bool:
    try:  # torch has no public check; a release without this private one falls back to fp32
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def leading_answers(labels: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: each row's first `counts[row]` runs of labelled tokens, the answers to its first questions."""
    labelled = labels != IGNORE
    starts = labelled & ~torch.nn.functional.pad(labelled[:, :-1], (1, 0), value=False)
    return labelled & (starts.cumsum(-1) <= counts.to(labels.device).unsqueeze(-1))


def visual_frames(is_image: torch.Tensor, frame_tokens: int) -> torch.Tensor:
    """(B, L) bool of visual tokens -> the 0-based frame of each, in `hidden[is_image]` order: each row holds
    one clip, frame after frame of `frame_tokens` tokens."""
    return ((is_image.long().cumsum(-1) - 1) // frame_tokens)[is_image]


def window_of(tracks: list[Track], start: int, length: int) -> list[Track]:
    """A clip's tracks over frames `start` to `start + length - 1`, those seen there only: a shorter clip."""
    cut = [replace(track, poses=track.poses[start:start + length]) for track in tracks]
    return [track for track in cut if any(pose is not None for pose in track.poses)]


def mixed_windows(windows: list[list[Track]], features: torch.Tensor, length: int
                  ) -> tuple[list[list[Track]], torch.Tensor]:
    """Windows whose frames come from different clips: the i-th one's frame t is frame t of window (i + t) mod B.

    windows: B windows of `length` frames each (window_of); features: their (B, length * tokens, D) patches.
    In a window of one clip's frames, neighbours mostly show the same objects, so "What is in frame 2?" can be
    answered from any frame; here each frame shows another clip and only the frame asked for answers it.
    """
    count = len(windows)
    per_frame = features.unflatten(1, (length, -1))
    mixed = [[replace(track, poses=tuple(track.poses[t] if u == t else None for u in range(length)))
              for t in range(length) for track in windows[(i + t) % count] if track.poses[t] is not None]
             for i in range(count)]
    picked = torch.stack([per_frame[(torch.arange(count) + t) % count, t] for t in range(length)], dim=1)
    return mixed, picked.flatten(1, 2)


def lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main(
    out: Path = typer.Option(Path("/tmp/sieve-mini-train"), help="checkpoints, logs and eval tables"),
    steps: int = typer.Option(3000, help="optimizer steps in total (the schedule's length)"),
    batch: int = typer.Option(4, help="images (sequences) per step"),
    questions: int = typer.Option(4, help="questions packed per image"),
    train_images: int = typer.Option(8000, help="size of the train split used (multiple of 500)"),
    lr: float = typer.Option(1e-3, help="peak learning rate of the projector"),
    lora_lr: float = typer.Option(5e-4, help="peak learning rate of the LoRA adapters"),
    warmup: int = typer.Option(100, help="steps of linear warm-up to the peak rates (then cosine to a tenth)"),
    lora_rank: int = typer.Option(16, help="LoRA rank on every linear layer of the language model; 0: projector only"),
    align_steps: int = typer.Option(600, help="patch-to-word alignment steps fitting the projector before training "
                                    "through the language model (align.py); 0 starts from random weights"),
    read_weight: float = typer.Option(0.0, help="weight of the reading loss: the projector keeps mapping every patch "
                                      "a word covers to that word's embedding (align.word_patches), beside the answers"),
    read_refit: int = typer.Option(0, help="steps of the reading refit (align.refit_words), run once before training "
                                   "resumes: word patches are fitted to their words' embeddings, other outputs kept"),
    describe_scene: bool = typer.Option(True, "--describe/--no-describe",
                                        help="end each training sequence with a full description of the scene"),
    pool: int = typer.Option(1, help="train on features average-pooled by this factor per side (2: 64 tokens "
                             "instead of 256, about 3x cheaper); validation runs at full tokens"),
    layer: int = typer.Option(VISION_FEATURE_LAYER, help="vision hidden_states index fed to the projector"),
    val_examples: int = typer.Option(210, help="validation examples per evaluation (30 per skill)"),
    eval_every: int = typer.Option(250),
    checkpoint_every: int = typer.Option(50),
    log_every: int = typer.Option(10, help="steps between loss lines (mean loss and seconds per step since the last)"),
    seed: int = typer.Option(0),
    init_from_weights: bool = typer.Option(False, help="start from the committed projector and LoRA "
                                           "(tokensieve/mini/weights) instead of the alignment; a checkpoint wins"),
    video_batch: int = typer.Option(0, help="clips of the video suite per step, beside --batch images (0: none)"),
    video_frames: int = typer.Option(16, help="frames per clip (8 to 32), each an image of its own"),
    video_frame_size: int = typer.Option(VIDEO_FRAME_SIZE, help="pixels per side of each frame, a multiple of 14 "
                                         "(112: 8x8 = 64 tokens a frame; 56: 16); evaluation runs at it too"),
    video_clips: int = typer.Option(2000, help=f"train clips used (multiple of {VIDEO_SHARD_SIZE})"),
    video_pool: int = typer.Option(1, help="train on each frame's features pooled by this factor per side "
                                   "(2: 16 tokens a frame); validation runs at full tokens"),
    video_full_every: int = typer.Option(0, help="with --video-pool, every this many steps the clips go at full "
                                         "tokens instead (0: never), so that the model sees both"),
    video_describe: bool = typer.Option(True, "--video-describe/--no-video-describe",
                                        help="end each clip's sequence with what happens in it, object by object"),
    video_window: int = typer.Option(0, help="train on a window of this many consecutive frames of each clip, at "
                                     "a seeded random start, asked only about the window (its frames, spans and "
                                     "description): a curriculum's early stages. 0: whole clips"),
    video_mix: bool = typer.Option(False, help="with --video-window, take each window's frames from different "
                                   "clips of the step (mixed_windows), so that only the frame asked for answers a "
                                   "frame question; the window lookups then mix the validation clips too"),
    whole_clips: int = typer.Option(0, help="with --video-mix and a window of all --video-frames, this many of "
                                    "each step's clips stay whole, unmixed, and are asked their own question "
                                    "(or --suite-questions) too, while the others' frames are mixed: the lookup "
                                    "keeps being taught while the suite is"),
    frame_questions: int = typer.Option(4, help="questions per clip on what one frame shows (\"What is in frame 7?\"), "
                                        "frames drawn by step; they tie frame numbers to frame contents"),
    span_questions: int = typer.Option(0, help="questions per clip on when one object is seen (\"In which frames is "
                                       "the red star?\" -> \"frames 3 to 5 and 9\"), objects drawn by step"),
    video_weight: float = typer.Option(1.0, help="weight of the clips' answer loss beside the images'"),
    suite_questions_: bool = typer.Option(False, "--suite-questions/--own-question",
                                          help="ask every question of the suite's kinds that a clip answers "
                                          "(suite_questions: an order clip's late objects each flash once), "
                                          "not only the one it was made for"),
    question_weight: float = typer.Option(1.0, help="weight of each answer token of a clip's suite questions "
                                          "beside the tokens of its frame, span and description answers (1: equal)"),
    frame_probe_weight: float = typer.Option(0.0, help="weight of a loss that makes each visual token of a clip "
                                             "carry its frame: a linear probe on the language model's hidden state "
                                             "after --frame-probe-layer must name the token's frame (the probe is "
                                             "for training only and not exported)"),
    frame_probe_layer: int = typer.Option(8, help="the language model's layer whose outputs the frame probe reads"),
    video_val_examples: int = typer.Option(100, help="validation clips per evaluation (20 per skill)"),
    threads: int = typer.Option(1, help="torch CPU threads; 0: torch's default. On a shared CPU one thread is "
                                "fastest: OpenMP workers of a niced job wait on each other (5x slower with 2)"),
    export: bool = typer.Option(None, help="write weights to tokensieve/mini/weights at each evaluation and at "
                                "the end; default: yes, except in the multi-frame phase (--video-batch)"),
):
    if train_images % SHARD_SIZE:
        raise typer.BadParameter(f"--train-images must be a multiple of {SHARD_SIZE}, got {train_images}")
    if video_batch and (video_clips % VIDEO_SHARD_SIZE or VIDEO_SHARD_SIZE % video_batch):
        raise typer.BadParameter(f"--video-clips must be a multiple of {VIDEO_SHARD_SIZE} and --video-batch "
                                 f"divide it, got {video_clips} and {video_batch}")
    if whole_clips and not (video_mix and video_window == video_frames and 0 < whole_clips <= video_batch - 2):
        raise typer.BadParameter(f"--whole-clips keeps some of a mixed step's clips whole: give --video-mix, "
                                 f"--video-window equal to --video-frames and --video-batch at least --whole-clips "
                                 f"+ 2 (two clips to mix), got --whole-clips {whole_clips}")
    if video_window and not (video_batch and 0 < video_window <= video_frames
                             and (whole_clips or not suite_questions_)):
        raise typer.BadParameter(f"--video-window cuts the clips of --video-batch to 1 to --video-frames "
                                 f"({video_frames}) frames and their suite questions ask about whole clips: give "
                                 f"--video-batch and --own-question, got --video-window {video_window}")
    if video_mix and not video_window:
        raise typer.BadParameter("--video-mix mixes the frames of --video-window's windows: give --video-window too")
    if video_window and not (frame_questions or span_questions or video_describe):
        raise typer.BadParameter("--video-window asks only about the window: give --frame-questions, "
                                 "--span-questions or --video-describe")
    if frame_probe_weight and not video_batch:
        raise typer.BadParameter("--frame-probe-weight reads clips' visual tokens: give --video-batch too")
    export = not video_batch if export is None else export
    if threads:
        torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "log.jsonl").open("a")

    vision, language = vision_dir(), language_dir()
    tokenizer = AutoTokenizer.from_pretrained(language)
    dtype = training_dtype(device)
    print(f"training in {dtype} on {device}", flush=True)

    def autocast() -> torch.autocast:
        """Mixed precision where the device has a faster dtype than fp32 (see training_dtype)."""
        return torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)

    # Frozen weights in the compute dtype: autocast would otherwise re-cast every fp32 weight at every step.
    lm = from_pretrained(LlamaForCausalLM, language, dtype=dtype).to(device)
    lm.requires_grad_(False)
    wrapped = add_lora(lm.model, LORA_TARGETS, lora_rank, alpha=2 * lora_rank) if lora_rank else {}
    lm.to(device)
    projector = make_projector(vision, language, layer).to(device)
    cache = FeatureCache(layer, device=device)
    encoder = Encoder(tokenizer, image_tokens=cache.shard("train", 0).shape[1])
    train_encoder = Encoder(tokenizer, image_tokens=cache.shard("train", 0).shape[1] // pool**2)

    # Frame of each visual token from the language model's hidden state; trained beside the projector.
    frame_probe = torch.nn.Linear(lm.config.hidden_size, MAX_FRAMES).to(device) if frame_probe_weight else None
    projector_params = list(projector.parameters()) + (list(frame_probe.parameters()) if frame_probe else [])
    lora_params = [p for w in wrapped.values() for p in (w.lora_A, w.lora_B)]
    params = projector_params + lora_params
    optimizer = torch.optim.AdamW([{"params": projector_params, "peak": lr},
                                   {"params": lora_params, "peak": lora_lr}], lr=lr, weight_decay=0.0)
    checkpoint, start, refitted = out / "checkpoint.pt", 0, False
    if checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        projector.load_state_dict(state["projector"])
        for name, w in wrapped.items():
            w.lora_A.data.copy_(state["lora"][f"{name}.lora_A"])
            w.lora_B.data.copy_(state["lora"][f"{name}.lora_B"])
        if frame_probe:
            frame_probe.load_state_dict(state["frame_probe"])
        optimizer.load_state_dict(state["optimizer"])
        for group, peak in zip(optimizer.param_groups, (lr, lora_lr)):  # a rerun may change the peak rates
            group["peak"] = peak
        start, refitted = state["step"], state.get("read_refit", False)
        print(f"resumed from {checkpoint} at step {start}")
    elif init_from_weights:
        init_from_committed(projector, wrapped)
        print(f"started from the committed weights ({PROJECTOR_FILE.parent})", flush=True)
    else:
        standardise_first_layer(projector, cache.shard("train", 0))
        if align_steps:
            targets = WordTargets(lm.get_input_embeddings().weight, tokenizer)
            side = math.isqrt(encoder.image_tokens)
            aligned = [cache.shard("train", s) for s in range(2)]
            wanted = torch.stack([targets(ex, side, cache.image_size) for ex in examples("train", 2 * SHARD_SIZE)])
            error = fit_projector(projector, torch.cat(aligned).to(device), wanted.to(device), align_steps, seed=seed)
            print(f"patch-to-word alignment: {align_steps} steps, relative error {error:.3f}", flush=True)

    n_shards = train_images // SHARD_SIZE
    if read_weight or read_refit:
        word_features, word_wanted = word_patches(cache, WordTargets(lm.get_input_embeddings().weight, tokenizer),
                                                  "train", n_shards)
        word_scale = word_wanted.pow(2).mean()
        print(f"{len(word_features)} word patches for the reading refit and loss (weight {read_weight})", flush=True)
    if read_refit and not refitted:
        kept_images = torch.cat([cache.shard("train", s) for s in range(min(4, n_shards))])
        errors = refit_words(projector, word_features, word_wanted, kept_images, read_refit, seed=seed)
        refitted = True
        print(f"reading refit: {read_refit} steps, relative error {errors[0]:.3f} on word patches, "
              f"{errors[1]:.3f} from the projector's own outputs elsewhere", flush=True)

    def batch_at(step: int) -> tuple[list, torch.Tensor]:
        shard, order = shuffled(seed, step, n_shards, SHARD_SIZE, batch)
        exs = [examples("train", 1, shard * SHARD_SIZE + int(i), questions)[0] for i in order]
        return exs, pool_grid(cache.shard("train", shard)[torch.from_numpy(order)], pool)

    if video_batch:  # clips in their own seeded order (seed + 1), so that the images' order stays as it was
        video_cache = VideoFeatureCache(layer, video_frames, video_frame_size, device=device)
        video_encoder = Encoder(tokenizer, image_tokens=video_cache.frame_tokens // video_pool**2)
        frame_encoder = Encoder(tokenizer, image_tokens=video_cache.frame_tokens)
        video_val = video_examples("validation", video_val_examples, frames=video_frames)
        video_val_features = video_cache.first("validation", video_val_examples)

    def clip_pool_at(step: int) -> int:
        return 1 if video_full_every and step % video_full_every == 0 else video_pool

    shown_frames = video_window or video_frames

    def clips_at(step: int) -> tuple[list, list[list[Track]], torch.Tensor]:
        """The step's clips, the tracks of what each shows (its window with --video-window) and their features."""
        shard, order = shuffled(seed + 1, step, video_clips // VIDEO_SHARD_SIZE, VIDEO_SHARD_SIZE, video_batch)
        exs = [video_examples("train", 1, shard * VIDEO_SHARD_SIZE + int(i), video_frames)[0] for i in order]
        features = pool_frames(video_cache.shard("train", shard)[torch.from_numpy(order)], video_frames,
                               clip_pool_at(step))
        if not video_window:
            return exs, [ex.clip.tracks for ex in exs], features
        starts = [int(np.random.default_rng((seed, step, ex.index, 1)).integers(video_frames - video_window + 1))
                  for ex in exs]
        per_frame = features.unflatten(1, (video_frames, -1))
        features = torch.stack([per_frame[i, t:t + video_window] for i, t in enumerate(starts)]).flatten(1, 2)
        windows = [window_of(ex.clip.tracks, t, video_window) for ex, t in zip(exs, starts)]
        if not video_mix:
            return exs, windows, features
        mixed = video_batch - whole_clips  # the step's last --whole-clips clips stay as they are
        mixed_tracks, mixed_features = mixed_windows(windows[:mixed], features[:mixed], video_window)
        return exs, mixed_tracks + windows[mixed:], torch.cat([mixed_features, features[mixed:]])

    def is_whole(i: int) -> bool:
        """Whether the step's i-th clip shows the whole clip, unmixed, and is asked about it."""
        return not video_window or i >= video_batch - whole_clips

    val = examples("validation", val_examples)
    val_features = torch.cat([cache.shard("validation", s) for s in range(math.ceil(val_examples / SHARD_SIZE))])[:val_examples]

    def val_windows() -> tuple[list[list[Track]], torch.Tensor]:
        """The first frames of the lookup clips, mixed across clips with --video-mix, as training sees them."""
        windows = [window_of(ex.clip.tracks, 0, video_window) for ex in video_val[:LOOKUP_CLIPS]]
        features = video_val_features[:LOOKUP_CLIPS, :video_window * frame_encoder.image_tokens]
        return mixed_windows(windows, features, video_window) if video_mix else (windows, features)

    def run_eval(step: int) -> None:
        projector.eval()
        windows = val_windows() if video_window else None  # outside autocast: its stack refuses fp16 features
        with autocast():
            table = evaluate(lm, projector, encoder, val, val_features)
            video_table = evaluate_clips(lm, projector, frame_encoder, video_val, video_val_features) if video_batch else None
            pooled_table = (evaluate_clips(lm, projector, video_encoder, video_val,
                                           pool_frames(video_val_features, video_frames, video_pool))
                            if video_batch and video_pool > 1 else None)
            lookups = (evaluate_lookups(lm, projector, frame_encoder, [ex.clip.tracks for ex in video_val[:LOOKUP_CLIPS]],
                                        video_val_features[:LOOKUP_CLIPS]) if video_batch else None)
            window_lookups = evaluate_lookups(lm, projector, frame_encoder, *windows) if windows else None
        projector.train()
        text = f"images ({val_examples} validation examples, full tokens):\n\n{format_table(table)}\n"
        if video_table:
            text += (f"\nclips ({video_val_examples} validation clips of {video_frames} frames, full tokens):\n\n"
                     f"{format_table(video_table)}\n")
        if pooled_table:
            text += (f"\nclips at the training's pooled tokens ({video_encoder.image_tokens} a frame):\n\n"
                     f"{format_table(pooled_table)}\n")
        if lookups:
            text += (f"\nlookups on the first {min(LOOKUP_CLIPS, video_val_examples)} clips, full tokens: "
                     f"{format_lookups(lookups)}\n")
        if window_lookups:
            text += (f"\nlookups on their first {video_window} frames{', mixed across clips' if video_mix else ''}: "
                     f"{format_lookups(window_lookups)}\n")
        print(f"validation at step {step}:\n{text}", flush=True)
        (out / f"val-step{step:05d}.md").write_text(text)
        log.write(json.dumps({"step": step, "validation": table, "video_validation": video_table,
                             "video_validation_pooled": pooled_table,
                             "lookups": lookups, "window_lookups": window_lookups}) + "\n")
        log.flush()
        if export:
            export_weights(step)

    def export_weights(step: int) -> None:
        meta = {"vision_feature_layer": str(layer), "data_version": DATA_VERSION, "step": str(step),
                "seed": str(seed), "read_weight": str(read_weight), "read_refit": str(read_refit),
                **({"video_data_version": VIDEO_DATA_VERSION, "video_frames": str(video_frames)} if video_batch else {})}
        save_file({k: v.detach().float().cpu().contiguous() for k, v in projector.state_dict().items()},
                  str(PROJECTOR_FILE), metadata=meta)
        if wrapped:
            save_file({k: v.cpu() for k, v in quantised(lora_state(wrapped)).items()}, str(LORA_FILE),
                      metadata={**meta, "scale": str(wrapped[next(iter(wrapped))].scale), "targets": ",".join(LORA_TARGETS)})
        elif LORA_FILE.is_file():
            LORA_FILE.unlink()

    def save_checkpoint(step: int) -> None:
        partial = checkpoint.with_suffix(".partial")
        torch.save({"projector": projector.state_dict(), "lora": lora_state(wrapped),
                    "optimizer": optimizer.state_dict(), "step": step,
                    "read_refit": refitted,
                    **({"frame_probe": frame_probe.state_dict()} if frame_probe else {})}, partial)
        partial.replace(checkpoint)

    def forward(convs: list[tuple[list[int], list[int]]], features: torch.Tensor, hidden_states: bool = False):
        """Token ids, labels and the language model's outputs (every layer's with `hidden_states`) for a batch."""
        ids, labels, mask = batch_tensors(encoder, convs, device)
        with autocast():
            embeds = embed_with_images(lm.get_input_embeddings(), ids, encoder.image_token_id,
                                       projector(features.to(device, torch.float32)))
            outputs = lm.model(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=hidden_states)
        return ids, labels, outputs

    def answer_loss_of(labels: torch.Tensor, hidden: torch.Tensor, leading: list[int] | None = None,
                       leading_weight: float = 1.0) -> torch.Tensor:
        """Mean cross-entropy over answer tokens; those of row i's first `leading[i]` answers weigh `leading_weight`."""
        # Logits only where an answer token is predicted: the 49k-way head over every token costs a lot.
        targets = labels[:, 1:]
        picked = targets != IGNORE
        with autocast():
            logits = lm.lm_head(hidden[:, :-1][picked])
        losses = torch.nn.functional.cross_entropy(logits.float(), targets[picked], reduction="none")
        if leading is None:
            return losses.mean()
        weights = torch.where(leading_answers(labels, torch.tensor(leading))[:, 1:][picked], leading_weight, 1.0)
        return (weights * losses).sum() / weights.sum()

    def frame_probe_loss(ids: torch.Tensor, outputs, frame_tokens: int) -> tuple[torch.Tensor, float]:
        """The frame probe's cross-entropy and accuracy at the visual tokens of clips of `frame_tokens` per frame."""
        is_image = ids == encoder.image_token_id
        frames = visual_frames(is_image, frame_tokens)
        with autocast():
            guesses = frame_probe(outputs.hidden_states[frame_probe_layer][is_image]).float()
        return (torch.nn.functional.cross_entropy(guesses, frames),
                (guesses.argmax(-1) == frames).float().mean().item())

    def clip_questions(ex, whole: bool) -> list[QA]:
        """The clip's own question, then (--suite-questions) the suite's other questions it answers; none of a
        window or mixed clip (`whole` false), whose answers may differ from the whole clip's."""
        if not whole:
            return []
        if not suite_questions_:
            return [ex.qa]
        return [ex.qa] + [qa for qa in suite_questions(ex.clip.tracks) if qa.question != ex.qa.question]

    def clip_pack(ex, tracks: list[Track], step: int, whole: bool) -> list[QA]:
        """The clip's suite questions, then questions on single frames (as many as it shows, at most) and on when
        objects are seen, then (--video-describe) what happens in it; `tracks`: what the clip shows."""
        rng = np.random.default_rng((seed, step, ex.index))
        frames = rng.choice(shown_frames, min(frame_questions, shown_frames), replace=False)
        pack = clip_questions(ex, whole) + [QA("frame", f"What is in frame {t + 1}?", describe_frame(tracks, t))
                                     for t in frames]
        spans = object_spans(tracks)
        pack += [QA("spans", f"In which frames is the {spans[i][0]}?", spans[i][1])
                 for i in rng.permutation(len(spans))[:span_questions]]
        if video_describe and tracks:
            pack.append(QA("description", "Describe the video.", describe_clip(tracks)))
        return pack

    projector.train()
    clock, recent, recent_read, recent_video, recent_probe = time.time(), [], [], [], []
    for step in range(start, steps):
        exs, features = batch_at(step)
        packs = [ex.qas + [describe(ex.scene)] if describe_scene else ex.qas for ex in exs]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, group["peak"], warmup)
        _, labels, outputs = forward([train_encoder.conversation(qas) for qas in packs], features)
        loss = answer_loss = answer_loss_of(labels, outputs.last_hidden_state)
        if video_batch:  # one sequence per clip: its frames, then its questions
            clips, shown, clip_features = clips_at(step)
            clip_encoder = video_encoder if clip_pool_at(step) > 1 else frame_encoder
            wholes = [is_whole(i) for i in range(len(clips))]
            ids, labels, outputs = forward([clip_encoder.conversation(clip_pack(ex, tracks, step, whole), shown_frames)
                                            for ex, tracks, whole in zip(clips, shown, wholes)],
                                           clip_features, hidden_states=frame_probe is not None)
            video_loss = answer_loss_of(labels, outputs.last_hidden_state,
                                        [len(clip_questions(ex, whole)) for ex, whole in zip(clips, wholes)],
                                        question_weight)
            loss = loss + video_weight * video_loss
            recent_video.append(video_loss.item())
            if frame_probe:
                probe_loss, probe_accuracy = frame_probe_loss(ids, outputs, clip_encoder.image_tokens)
                loss = loss + frame_probe_weight * probe_loss
                recent_probe.append(probe_accuracy)
        if read_weight:  # word patches drawn by step, so that resuming anywhere draws the same ones
            index = torch.randint(len(word_features), (256,), generator=torch.Generator().manual_seed(seed * 10**6 + step))
            projected = projector(word_features[index].to(device, torch.float32))
            read_loss = torch.nn.functional.mse_loss(projected, word_wanted[index].to(device)) / word_scale
            loss = loss + read_weight * read_loss
            recent_read.append(read_loss.item())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        recent.append(answer_loss.item())

        done = step + 1
        if done % log_every == 0:
            elapsed = (time.time() - clock) / len(recent)
            extra = {"read_loss": recent_read, "video_loss": recent_video, "frame_probe_accuracy": recent_probe}
            extra = {k: float(np.mean(v)) for k, v in extra.items() if v}
            print(f"step {done}/{steps} loss {np.mean(recent):.4f} lr {lr_at(step, steps, lr, warmup):.2e} "
                  + "".join(f"{k} {v:.4f} " for k, v in extra.items()) + f"{elapsed:.2f}s/step", flush=True)
            log.write(json.dumps({"step": done, "loss": float(np.mean(recent)), **extra, "s_per_step": elapsed}) + "\n")
            log.flush()
            clock, recent, recent_read, recent_video, recent_probe = time.time(), [], [], [], []
        if done % checkpoint_every == 0 or done == steps:
            save_checkpoint(done)
        if done % eval_every == 0 or done == steps:
            run_eval(done)
    if start >= steps:
        print(f"already trained to step {start} (--steps {steps}); raise --steps to continue")
        if export:  # so a run trained with --no-export can still hand over its weights
            export_weights(start)


if __name__ == "__main__":
    typer.run(main)
