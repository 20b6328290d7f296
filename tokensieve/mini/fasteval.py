"""Greedy answers from cached vision features: the projector and the language model without the tower.

Used during training (validation every few hundred steps) and for quick per-skill tables, on images
and on clips of the video suite (a clip's features are its frames', one after another). Optional
random pruning keeps a fraction of the image tokens at their original positions, the same thing
tokensieve's pre-LLM methods do, to check that the QA suite punishes losing visual information.
"""

from __future__ import annotations

import torch

from ..engine.compat import CACHE_ARGUMENT, output_cache
from ..qa import VIDEO_CHANCE, Example, VideoExample, accuracy_by_skill, is_correct
from ..qa.video_questions import Track, describe_frame, named_objects, object_spans
from .sequences import Encoder, embed_with_images


@torch.no_grad()
def answer(lm, projector, encoder: Encoder, features: torch.Tensor, questions: list[str],
           keep_ratio: float = 1.0, seed: int = 0, max_new_tokens: int = 5, images: int = 1) -> list[str]:
    """Answers to one question per image, or per clip of `images` frames. features: (B, N, D_vision), N the
    image tokens of all `images` images."""
    device = next(lm.parameters()).device
    prompts = [encoder.prompt(q, images) for q in questions]
    length = max(map(len, prompts))
    pad = encoder.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (length - len(p)) + p for p in prompts], device=device)  # left padding
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    embeds = embed_with_images(lm.get_input_embeddings(), ids, encoder.image_token_id,
                               projector(features.to(device, torch.float32)))
    if keep_ratio < 1.0:  # drop the same count of random image tokens from every row
        n_image = features.shape[1]
        n_keep = max(1, round(keep_ratio * n_image))
        generator = torch.Generator().manual_seed(seed)
        keep = torch.ones_like(ids, dtype=torch.bool)
        for row in range(ids.shape[0]):
            image_positions = (ids[row] == encoder.image_token_id).nonzero().squeeze(-1)
            dropped = torch.randperm(n_image, generator=generator)[n_keep:]
            keep[row, image_positions[dropped.to(device)]] = False
        index = keep.nonzero()[:, 1].view(ids.shape[0], -1)
        embeds = embeds.gather(1, index.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
        mask, positions = mask.gather(1, index), positions.gather(1, index)

    out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
    tokens = [out.logits[:, -1].argmax(-1)]
    for _ in range(max_new_tokens - 1):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions = positions[:, -1:] + 1
        out = lm(input_ids=tokens[-1][:, None], attention_mask=mask, position_ids=positions,
                 use_cache=True, **{CACHE_ARGUMENT: output_cache(out)})
        tokens.append(out.logits[:, -1].argmax(-1))
    answers = []
    for row in torch.stack(tokens, 1).tolist():
        if encoder.end_of_turn_id in row:
            row = row[: row.index(encoder.end_of_turn_id)]
        answers.append(encoder.tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers


def evaluate(lm, projector, encoder: Encoder, exs: list[Example], features: torch.Tensor,
             keep_ratio: float = 1.0, batch: int = 16) -> dict[str, dict[str, float]]:
    """Per-skill accuracy on each example's own question (qas[0])."""
    records = []
    for start in range(0, len(exs), batch):
        chunk = exs[start:start + batch]
        preds = answer(lm, projector, encoder, features[start:start + len(chunk)],
                       [ex.qas[0].question for ex in chunk], keep_ratio, seed=start)
        records += [(ex.skill, is_correct(p, ex.qas[0].answer)) for ex, p in zip(chunk, preds)]
    return accuracy_by_skill(records)


def evaluate_clips(lm, projector, encoder: Encoder, exs: list[VideoExample], features: torch.Tensor,
                   batch: int = 4) -> dict[str, dict[str, float]]:
    """Per-skill accuracy on the video suite, with its chance levels. features: (clips, frames * tokens, D)."""
    frames = features.shape[1] // encoder.image_tokens
    records = []
    for start in range(0, len(exs), batch):
        chunk = exs[start:start + batch]
        preds = answer(lm, projector, encoder, features[start:start + len(chunk)],
                       [ex.qa.question for ex in chunk], images=frames)
        records += [(ex.skill, is_correct(p, ex.qa.answer)) for ex, p in zip(chunk, preds)]
    return accuracy_by_skill(records, VIDEO_CHANCE)


def evaluate_lookups(lm, projector, encoder: Encoder, tracks: list[list[Track]], features: torch.Tensor,
                     batch: int = 4) -> dict[str, float | None]:
    """Accuracy of the training's per-frame lookups on clips (each given by its tracks): "What is in frame n?"
    (clip i: frame i mod frames), as the whole description ("frame") and as the objects it names, positions
    aside ("objects"), and "In which frames is the ...?" (clip i: its (i mod objects)-th object). A model that
    cannot tell one frame's tokens from the next fails them, whatever its answers to the suite's questions.
    A kind with no question (spans where no clip shows an object) is None, not a score of 0."""
    frames = features.shape[1] // encoder.image_tokens
    asked = []
    for i, clip in enumerate(tracks):
        t = i % frames
        asked.append((i, "frame", f"What is in frame {t + 1}?", describe_frame(clip, t)))
        if spans := object_spans(clip):
            name, seen = spans[i % len(spans)]
            asked.append((i, "spans", f"In which frames is the {name}?", seen))
    correct = {"frame": [], "objects": [], "spans": []}
    for start in range(0, len(asked), batch):
        chunk = asked[start:start + batch]
        preds = answer(lm, projector, encoder, features[[i for i, *_ in chunk]], [q for _, _, q, _ in chunk],
                       max_new_tokens=32, images=frames)
        for (_, kind, _, truth), pred in zip(chunk, preds):
            correct[kind].append(is_correct(pred, truth))
            if kind == "frame":
                correct["objects"].append(named_objects(pred) == named_objects(truth))
    return {kind: sum(v) / len(v) if v else None for kind, v in correct.items()}


def format_lookups(lookups: dict[str, float | None]) -> str:
    """evaluate_lookups' scores as one line of the evaluation file."""
    names = {"frame": "frame descriptions", "spans": "object spans", "objects": "frame objects"}
    return ", ".join(f"{name} {'none asked' if lookups[kind] is None else f'{lookups[kind]:.3f}'}"
                     for kind, name in names.items())
