"""Patch-to-word alignment: the projector's starting point before training through the language model.

Every patch of a QA-suite scene is labelled with what covers it (the scenes are drawn from a known
layout): a shape gives the mean of its colour's and its shape's word embeddings, the word its own
embedding, bare background the embedding of " background". The projector is fitted to map each
patch's vision feature to that target (mean squared error, no language model in the loop, about a
minute on a CPU). The image tokens then start in the language model's own word space at the norm
of its embeddings, instead of at a random point three times as far out, so training through the
language model begins from inputs it can read.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..qa import Example, examples
from ..qa.scenes import WORD_HEIGHT, outline

BACKGROUND = -1
MIN_COVER = 0.3  # a patch belongs to an object covering at least this share of it


def patch_labels(example: Example, grid: int, size: int) -> np.ndarray:
    """Per patch (raster order): the index of the shape covering it, len(shapes) for the word, or BACKGROUND."""
    scene = example.scene
    canvas = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(canvas)
    for i, s in enumerate(scene.shapes):
        draw.polygon(outline(s.shape, s.x * size, s.y * size, s.r * size), fill=i)
    if scene.word is not None:
        font = ImageFont.load_default(size=int(WORD_HEIGHT * size))
        word_label = len(scene.shapes)
        draw.text((scene.word.x * size, scene.word.y * size), scene.word.text, font=font, fill=word_label,
                  stroke_width=max(2, size // 75), stroke_fill=word_label)
    side = size // grid
    pixels = np.asarray(canvas).reshape(grid, side, grid, side).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
    labels = np.full(grid * grid, BACKGROUND)
    for patch, values in enumerate(pixels):
        found, counts = np.unique(values[values != 255], return_counts=True)
        if len(found) and counts.max() >= MIN_COVER * values.size:
            labels[patch] = found[counts.argmax()]
    return labels


class WordTargets:
    """Target embeddings of patches, from the language model's input embeddings and tokenizer."""

    def __init__(self, embeddings: torch.Tensor, tokenizer):
        self.embeddings, self.tokenizer = embeddings.detach().float(), tokenizer
        self.background = self.word("background")

    def word(self, text: str) -> torch.Tensor:
        ids = self.tokenizer(" " + text, add_special_tokens=False).input_ids
        return self.embeddings[ids].mean(0)

    def __call__(self, example: Example, grid: int, size: int) -> torch.Tensor:
        shapes = example.scene.shapes
        by_label = {BACKGROUND: self.background}
        by_label |= {i: (self.word(s.colour) + self.word(s.shape)) / math.sqrt(2) for i, s in enumerate(shapes)}
        if example.scene.word is not None:
            by_label[len(shapes)] = self.word(example.scene.word.text)
        return torch.stack([by_label[int(label)] for label in patch_labels(example, grid, size)])


def word_patches(cache, targets: WordTargets, split: str, shards: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, target embeddings) of every patch that a word covers, over the first `shards` of a split.

    Words cover 1-3% of all patches, so the whole-image fit above hardly separates one word from
    another (nearest word embedding: 8% of word patches, chance 6%); these feed the reading loss.
    """
    features, wanted = [], []
    for shard in range(shards):
        grid = cache.shard(split, shard)
        side = math.isqrt(grid.shape[1])
        for i, example in enumerate(examples(split, len(grid), shard * len(grid))):
            if example.scene.word is None:
                continue
            covered = torch.from_numpy(patch_labels(example, side, cache.image_size) == len(example.scene.shapes))
            features.append(grid[i][covered])
            wanted.append(targets.word(example.scene.word.text).expand(int(covered.sum()), -1))
    return torch.cat(features), torch.cat(wanted)


@torch.enable_grad()  # a training step, also when the caller is under no_grad
def fit_projector(projector: torch.nn.Module, features: torch.Tensor, targets: torch.Tensor, steps: int,
                  lr: float = 1e-3, batch: int = 1024, seed: int = 0) -> float:
    """Fit projector(features) to targets, patches drawn at random; returns the final relative error."""
    x, y = features.reshape(-1, features.shape[-1]), targets.reshape(-1, targets.shape[-1])
    scale = y.pow(2).mean()
    optimizer = torch.optim.Adam(projector.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        index = torch.randint(len(x), (batch,), generator=generator)
        loss = torch.nn.functional.mse_loss(projector(x[index].float()), y[index]) / scale
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return loss.item()


@torch.enable_grad()
def refit_words(projector: torch.nn.Module, word_features: torch.Tensor, word_wanted: torch.Tensor,
                features: torch.Tensor, steps: int, lr: float = 1e-3, seed: int = 0) -> tuple[float, float]:
    """Fit a trained projector's outputs on word patches to their words' embeddings, keeping its outputs elsewhere.

    The second term holds the projector to its own earlier outputs on `features` (all patches of some
    images), so that the language model, already trained on those outputs, still reads the rest of
    the scene. Returns the final (word, kept) relative errors.
    """
    device = next(projector.parameters()).device
    reference = copy.deepcopy(projector).requires_grad_(False)
    patches = features.reshape(-1, features.shape[-1])
    word_scale = word_wanted.pow(2).mean().to(device)
    optimizer = torch.optim.Adam(projector.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        words = torch.randint(len(word_features), (512,), generator=generator)
        others = patches[torch.randint(len(patches), (1024,), generator=generator)].to(device, torch.float32)
        word_loss = torch.nn.functional.mse_loss(projector(word_features[words].to(device, torch.float32)),
                                                 word_wanted[words].to(device)) / word_scale
        kept = reference(others)
        kept_loss = torch.nn.functional.mse_loss(projector(others), kept) / kept.pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        (word_loss + kept_loss).backward()
        optimizer.step()
    return word_loss.item(), kept_loss.item()
