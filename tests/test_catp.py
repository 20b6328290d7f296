"""CATP's first stage: diversity plus paired-text alignment by hand on four tokens, each image's paired text in a
prompt of several images (in-context examples), against a brute-force greedy of the paper's objective, budgets
per image, per prompt and adaptive, on a model with interleaved images and text, and its arguments."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tokensieve as ts
from conftest import build_model
from tiny_models import IMAGE_TOKEN, LLAVA, left_padded, random_image
from tokensieve.methods.catp import paired_texts
from tokensieve.sieve import VisualTokens

# a 2x2 image of 2-d tokens: 0 and 1 are duplicates, 2 is orthogonal to them, 3 opposite; rescaled cosines
# s = (cos + 1) / 2 between them:
#        0    1    2    3
#   0    1    1   .5    0
#   2   .5   .5    1   .5
#   3    0    0   .5    1
# (row 1 as row 0): every column but 3 covers 2.5 at the first step, column 3 only 1.5
TOKENS = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]
ALONG, ACROSS = [1.0, 0.0], [0.0, 1.0]  # text embeddings aligned with tokens 0/1, and with token 2


def image(text, prompt=None, features=TOKENS, grid=(2, 2)):
    features = torch.as_tensor(features, dtype=torch.float)
    text = torch.as_tensor(text, dtype=torch.float).reshape(-1, features.shape[1])
    return VisualTokens(features, grid, {"text_embeddings": text}, prompt=prompt)


def test_by_hand_alignment_breaks_the_tie_and_can_outweigh_diversity():
    # text ALONG: alignments a = s(token, v) are 1, 1, .5, 0. Step 1: 2.5 + .7 (tokens 0, 1), 2.5 + .35 (2), 1.5 (3):
    # token 0. Step 2: token 2 gains .5 + .5 for rows 2, 3 plus .35 = 1.35, token 3 gains 1.0 + 0, token 1 only its
    # alignment .7: token 2. Step 3: token 1 gains .7 (its alignment), token 3 gains .5 (row 3 from .5 to 1): token 1
    assert ts.CATP(keep=3).select(image([ALONG])).kept.tolist() == [0, 1, 2]
    # without alignment the duplicate adds nothing and the opposite token's .5 wins; at alignment .5 they tie (.5
    # each: the lower index), at .4 diversity wins
    assert ts.CATP(keep=3, alignment=0).select(image([ALONG])).kept.tolist() == [0, 2, 3]
    assert ts.CATP(keep=3, alignment=0.5).select(image([ALONG])).kept.tolist() == [0, 1, 2]
    assert ts.CATP(keep=3, alignment=0.4).select(image([ALONG])).kept.tolist() == [0, 2, 3]
    # text ACROSS: a = .5, .5, 1, .5. Token 2 first (2.5 + .7), then 0 (1.0 + .35 against 3's .5 + .35), then 3
    # (.5 + .35 against the duplicate's .35)
    assert ts.CATP(keep=3).select(image([ACROSS])).kept.tolist() == [0, 2, 3]
    assert ts.CATP(keep=2).select(image([ACROSS])).kept.tolist() == [0, 2]
    # the text rows are averaged first: two ALONG and one ACROSS point closer to tokens 0/1 (a = .95, .95, .72, .05)
    many = image([ALONG, ALONG, ACROSS])
    assert ts.CATP(keep=3).select(many).kept.tolist() == [0, 1, 2]
    # no text: diversity alone
    assert ts.CATP(keep=3).select(image([])).kept.tolist() == [0, 2, 3]


def test_the_objective_matrix_by_hand():
    rows = ts.CATP(alignment=0.5).objective(image([ACROSS]), torch.tensor([ACROSS]))
    similar = torch.tensor([[1, 1, 0.5, 0], [1, 1, 0.5, 0], [0.5, 0.5, 1, 0.5], [0, 0, 0.5, 1]])
    # the alignment rides on the diagonal: a kept token covers its own row with 1 + alignment · a
    torch.testing.assert_close(rows, similar + torch.diag(torch.tensor([0.5, 0.5, 1, 0.5]) * 0.5))
    # so the coverage of a set is the paper's F: for {2, 3}, rows 0 and 1 .5 each, row 2 1 + .5, row 3 1 + .25
    assert rows[:, [2, 3]].max(dim=1).values.sum().item() == pytest.approx(0.5 + 0.5 + 1.5 + 1.25)


def test_several_images_of_a_prompt_each_align_with_their_own_paired_text():
    # prompt: <image 0> "ALONG" <image 1> "ACROSS ACROSS ACROSS". text_embeddings gives each image the text after it
    # up to the prompt's end: image 0 all four rows (mean closer to ACROSS), image 1 the last three
    example, query = image([ALONG, ACROSS, ACROSS, ACROSS], prompt=0), image([ACROSS] * 3, prompt=0)
    paired = paired_texts([example, query])
    assert paired[0].tolist() == [ALONG] and paired[1].tolist() == [ACROSS] * 3
    # the in-context example aligns with its own answer (ALONG: [0, 1, 2]), the query with its question
    assert [s.kept.tolist() for s in ts.CATP(keep=3).select_all([example, query])] == [[0, 1, 2], [0, 2, 3]]
    # alone, the example only has its whole text_embeddings (mean (1, 3)/4: a = .66, .66, .97, .34): token 2 first,
    # then 0, then 3 (.5 + .24 against the duplicate's .46)
    assert ts.CATP(keep=3).select(example).kept.tolist() == [0, 2, 3]
    # text="instruction": every image its whole text_embeddings, as select on each alone
    instruction = ts.CATP(keep=3, text="instruction").select_all([example, query])
    assert [s.kept.tolist() for s in instruction] == [[0, 2, 3], [0, 2, 3]]
    # images of another prompt are not the example's next image; adjacent images (same text after both) and the
    # prompt's last image keep their whole text
    other = image([ACROSS] * 3, prompt=1)
    assert paired_texts([example, other])[0].tolist() == [ALONG, ACROSS, ACROSS, ACROSS]
    assert paired_texts([image([ALONG], prompt=0), image([ALONG], prompt=0)])[0].tolist() == [ALONG]
    # a last image with no text after it is given every text token of the prompt (the signal's rule): longer than
    # the image before it holds, so that image keeps its own rows
    before, last = image([ALONG], prompt=0), image([ACROSS, ALONG], prompt=0)
    assert paired_texts([before, last])[0].tolist() == [ALONG]


def test_a_total_budget_is_shared_by_token_count_within_each_prompt():
    example, query = image([ALONG, ACROSS, ACROSS, ACROSS], prompt=0), image([ACROSS] * 3, prompt=0)
    # 5 over two images of 4: one each, then 3 left, 1.5 each: the earlier image takes the odd one
    selections = ts.CATP(keep=ts.Budget(total=5)).select_all([example, query])
    assert [s.kept.tolist() for s in selections] == [[0, 1, 2], [0, 2]]
    alone = ts.CATP(keep=ts.Budget(total=5)).select_all([image([ACROSS], prompt=1)])
    assert alone[0].kept.tolist() == [0, 1, 2, 3]


def test_an_adaptive_budget_keeps_the_fewest_greedy_tokens_reaching_a_share_of_the_objective():
    # text ACROSS: F(all) = 4 (every token covers itself) + .7 · (.5 + .5 + 1 + .5) = 5.75; the greedy's F after
    # tokens 2, 0, 3, 1 is 3.2, 4.55, 5.4, 5.75 (56%, 79%, 94%, 100%)
    counts = {share: len(ts.CATP(keep=ts.Adaptive(coverage=share, min=1)).select(image([ACROSS])).kept)
              for share in (0.5, 0.75, 0.9, 0.95, 1.0)}
    assert counts == {0.5: 1, 0.75: 2, 0.9: 3, 0.95: 4, 1.0: 4}
    assert ts.CATP(keep=ts.Adaptive(coverage=0.5, min=2)).select(image([ACROSS])).kept.tolist() == [0, 2]


def objective(features: torch.Tensor, text: torch.Tensor, chosen: list[int], weight: float) -> float:
    """The paper's F(Y) = sum_x max_{y in Y} s(y, x) + weight · sum_{y in Y} s(y, v), written out in float64."""
    if not chosen:
        return 0.0
    unit = F.normalize(features.double(), dim=-1)
    mean = F.normalize(text.double().mean(0), dim=0)
    diversity = sum(max((unit[x] @ unit[y] + 1).item() / 2 for y in chosen) for x in range(len(unit)))
    return diversity + weight * sum((unit[y] @ mean + 1).item() / 2 for y in chosen)


def brute_force_greedy(features, text, k, weight) -> list[int]:
    chosen = []
    for _ in range(k):
        gains = {j: objective(features, text, chosen + [j], weight) for j in range(len(features)) if j not in chosen}
        chosen.append(max(gains, key=lambda j: (gains[j], -j)))
    return sorted(chosen)


# fixed examples: a float64 loop and the float32 greedy may disagree on near-ties of random floats
@pytest.mark.parametrize("seed", range(6))
def test_the_greedy_is_the_brute_force_greedy_of_the_papers_objective(seed):
    generator = torch.Generator().manual_seed(seed)
    features, text = torch.randn(12, 5, generator=generator), torch.randn(3, 5, generator=generator)
    tokens = VisualTokens(features, (3, 4), {"text_embeddings": text})
    for k, weight in ((4, 0.7), (7, 2.0)):
        assert ts.CATP(keep=k, alignment=weight).select(tokens).kept.tolist() == brute_force_greedy(features, text, k, weight)


def interleaved(model, segments: list[list[list[int]]]) -> tuple[dict, list[list[torch.Tensor]]]:
    """Inputs of rows ``bos, <image>, text, <image>, text, ...`` (one list of text segments per row, one image before
    each) and, per image in order, the input embeddings of its own segment."""
    per_image = LLAVA.tokens_per_image
    rows = [[1] + [id for segment in row for id in [IMAGE_TOKEN] * per_image + segment] for row in segments]
    input_ids, attention_mask = left_padded(rows)
    n = sum(len(row) for row in segments)
    pixel_values = torch.stack([random_image(1, i, 64) for i in range(n)])
    embed = model.get_input_embeddings()
    texts = [embed(torch.tensor(segment)) for row in segments for segment in row]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}, texts


class Recording(ts.CATP):
    """CATP that keeps what the engine handed it (not registered)."""

    def select_all(self, images):
        self.seen = images
        return super().select_all(images)


@torch.no_grad()
def test_on_a_model_in_context_examples_and_the_query_each_align_with_their_own_text():
    model = build_model(LLAVA)
    # row 0: two in-context examples (image, question and answer) and the query; row 1: one image (a padded batch)
    segments = [[[10, 11, 12, 13], [14, 15, 16], [20, 21, 22, 23, 24]], [[30, 31]]]
    inputs, texts = interleaved(model, segments)
    method = Recording(keep=0.5)
    with ts.apply(model, method) as run:
        model(**inputs)
    records = run.stats.images
    assert [record.row for record in records] == [0, 0, 0, 1] and all(record.after == 32 for record in records)
    assert [tokens.prompt for tokens in method.seen] == [0, 0, 0, 1]
    whole = []
    for number, (tokens, record) in enumerate(zip(method.seen, records)):
        # the engine's text_embeddings: the text after the image up to the prompt's end, here every later segment
        later = torch.cat(texts[number : 3] if number < 3 else texts[3:])
        torch.testing.assert_close(tokens["text_embeddings"], later)
        # each image was selected with its own segment, as by hand
        own = VisualTokens(tokens.features, tokens.grid, {"text_embeddings": texts[number]})
        assert torch.equal(record.kept, ts.CATP(keep=0.5).select(own).kept)
        whole.append(torch.equal(record.kept, ts.CATP(keep=0.5).select(tokens).kept))
    # the query and the lone image have no later image: their paired text is their whole instruction; an
    # in-context example's selection changes when it is given the whole instruction instead of its own segment
    assert whole[2] and whole[3] and not all(whole[:2])


def test_arguments_are_checked():
    assert repr(ts.CATP()) == "CATP(keep=0.611, alignment=0.7, text='paired')"
    assert ts.build("catp:0.25,alignment=0.5").alignment == 0.5
    for bad in (-0.1, float("nan"), float("inf"), True, "0.7", None):
        with pytest.raises(ValueError, match="alignment must be the weight of the paired-text alignment"):
            ts.CATP(alignment=bad)
    with pytest.raises(ValueError, match="text must be one of \\('paired', 'instruction'\\)"):
        ts.CATP(text="segment")
    with pytest.raises(ValueError, match="catp takes Adaptive\\(coverage=...\\)"):
        ts.CATP(keep=ts.Adaptive(mass=0.9))
    with pytest.raises(ValueError, match="catp cannot split its budget per crop"):
        ts.CATP(keep=ts.Budget(64, per_crop=True))
    with pytest.raises(ValueError, match="keep=0 keeps no token"):
        ts.CATP(keep=0)
    # keep-all returns every token as it is (the stock model, bit for bit: the contract checks it on every family)
    assert ts.CATP(keep=1.0).select(image([ALONG])).kept.tolist() == [0, 1, 2, 3]
