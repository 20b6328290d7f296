"""Patch-to-word alignment (the projector's starting point) and the training-only scene description."""

import math

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers

from tokensieve.mini.align import BACKGROUND, WordTargets, fit_projector, patch_labels, refit_words, word_patches
from tokensieve.mini.train import pool_grid
from tokensieve.qa import Example, examples
from tokensieve.qa.questions import describe
from tokensieve.qa.scenes import WORDS, Scene, Shape, Word


def _example(shapes, word=None) -> Example:
    return Example("train", 0, Scene(seed=(0,), shapes=shapes, word=word), qas=[])


def _word_tokenizer(words):
    vocab = {w: i for i, w in enumerate(["[UNK]", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def test_patches_are_labelled_by_the_object_covering_them():
    square = Shape("square", "red", x=0.25, y=0.25, r=0.12)
    circle = Shape("circle", "blue", x=0.75, y=0.75, r=0.1)
    labels = patch_labels(_example([square, circle]), grid=16, size=224).reshape(16, 16)
    assert labels[4, 4] == 0 and labels[12, 12] == 1  # the patches at each centre
    assert labels[0, 15] == BACKGROUND and labels[15, 0] == BACKGROUND
    # the square (circumradius 0.12, side 0.17 of 224 px = 38 px) covers about 2.7 patches per side
    assert 4 <= (labels == 0).sum() <= 16


def test_the_word_gets_its_own_label():
    word = Word("cat", x=0.1, y=0.6, w=0.3, h=0.16)
    labels = patch_labels(_example([Shape("star", "green", 0.7, 0.2, 0.1)], word), grid=16, size=224)
    rows, cols = np.divmod(np.flatnonzero(labels == 1), 16)
    assert len(rows) >= 3  # rendered text covers several patches
    assert rows.min() >= int(0.6 * 16) - 1 and cols.max() <= int(0.4 * 16) + 1


def test_targets_are_the_word_embeddings_of_what_covers_each_patch():
    words = ["red", "square", "cat", "background"]
    embeddings = torch.randn(len(words) + 1, 8)
    targets = WordTargets(embeddings, _word_tokenizer(words))
    example = _example([Shape("square", "red", 0.25, 0.25, 0.12)], Word("cat", 0.55, 0.7, 0.3, 0.16))
    labels = patch_labels(example, grid=16, size=224)
    got = targets(example, grid=16, size=224)
    red, square, cat, background = (embeddings[i] for i in range(1, 5))
    assert torch.allclose(got[labels == 0], ((red + square) / math.sqrt(2)).expand((labels == 0).sum(), 8))
    assert torch.allclose(got[labels == 1], cat.expand((labels == 1).sum(), 8))
    assert torch.allclose(got[labels == BACKGROUND], background.expand((labels == BACKGROUND).sum(), 8))


class _NumberedFeatures:
    """A feature cache whose every patch feature is (image index, patch index): shards of 10 images."""

    image_size = 224

    def shard(self, split, shard):
        image = torch.arange(shard * 10, shard * 10 + 10).view(10, 1, 1).expand(10, 256, 1)
        patch = torch.arange(256).view(1, 256, 1).expand(10, 256, 1)
        return torch.cat([image, patch], dim=-1).half()


def test_word_patches_are_exactly_the_patches_words_cover_with_their_words_embedding():
    embeddings = torch.randn(len(WORDS) + 2, 8)
    targets = WordTargets(embeddings, _word_tokenizer([*WORDS, "background"]))
    features, wanted = word_patches(_NumberedFeatures(), targets, "train", shards=2)
    expected = []
    for example in examples("train", 20):
        if example.scene.word is not None:
            covered = np.flatnonzero(patch_labels(example, 16, 224) == len(example.scene.shapes))
            expected += [(example.index, int(p), WORDS.index(example.scene.word.text) + 1) for p in covered]
    assert len(expected) > 20  # about half the scenes show a word, over several patches each
    assert features.tolist() == [[image, patch] for image, patch, _ in expected]
    assert torch.equal(wanted, embeddings[[word for _, _, word in expected]])


def test_fit_projector_learns_a_mapping_it_can_represent():
    torch.manual_seed(0)
    features = torch.randn(4, 64, 6)
    truth = torch.nn.Linear(6, 5)
    targets = truth(features).detach()
    projector = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 5))
    before = torch.nn.functional.mse_loss(projector(features), targets).item() / targets.pow(2).mean().item()
    after = fit_projector(projector, features, targets, steps=400, lr=1e-2, batch=64)
    assert before > 0.5 and after < 0.05


def test_refit_words_moves_word_patches_to_their_words_and_keeps_the_other_outputs():
    torch.manual_seed(0)
    projector = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.GELU(), torch.nn.Linear(32, 5))
    others = torch.randn(4, 64, 6)  # patches the language model already reads
    word = torch.randint(4, (200,))  # four words, each a cluster of patch features with its own embedding
    word_features = torch.randn(4, 6)[word] * 2 + 0.1 * torch.randn(200, 6)
    word_wanted = torch.randn(4, 5)[word]
    before_others, before_words = projector(others).detach(), projector(word_features).detach()
    start_error = (torch.nn.functional.mse_loss(before_words, word_wanted) / word_wanted.pow(2).mean()).item()
    word_error, kept_error = refit_words(projector, word_features, word_wanted, others, steps=400, lr=1e-2)
    assert word_error < 0.2 * start_error and kept_error < 0.05
    drift = (projector(others) - before_others).pow(2).mean() / before_others.pow(2).mean()
    assert drift < 0.05


def test_pool_grid_averages_two_by_two_blocks():
    features = torch.arange(16.0).view(1, 16, 1)  # a 4x4 grid
    pooled = pool_grid(features, 2)
    assert pooled.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert pool_grid(features, 1) is features


def test_description_names_every_object_where_it_is():
    shapes = [Shape("star", "green", 0.8, 0.85, 0.1), Shape("circle", "red", 0.1, 0.1, 0.1),
              Shape("cross", "white", 0.5, 0.5, 0.04, small=True)]
    qa = describe(Scene(seed=(0,), shapes=shapes, word=Word("sun", 0.4, 0.1, 0.2, 0.1)))
    assert qa.answer == "2 shapes: red circle top left, green star bottom right; small white cross centre; the word sun."
