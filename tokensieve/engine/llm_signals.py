"""The signals the engine computes inside the LLM: which token of each row is its prompt's query, the
instruction's input embeddings (``text_embeddings``) and the query's attention row (``llm_attention``).

The vision-side signals come from the adapters (tokensieve/adapters/), from hooks on the vision tower.
``llm_attention`` is recomputed for one query row from the layer's own q/k projections and rotary function,
so the decoder's attention kernel (SDPA, FlashAttention) stays on; eager attention gives the same row
(tests/test_in_llm.py).
"""

from __future__ import annotations

import sys
from collections import OrderedDict

import torch
from torch import nn

from ..adapters import ImageSlot
from ..signals import instruction_positions


class PromptQueries:
    """Which token of each row is the query that scores its images: the row's last real token or, when the
    row continues a prompt this run has already scored with the same image features, that prompt's last
    token. So a prompt's selection holds for every later step: a generate loop without a cache re-runs the
    whole sequence, and a fresh prefill of a longer conversation, prune exactly as the cached run did."""

    LIMIT = 1024  # prompts remembered per run (oldest forgotten first)

    def __init__(self):
        self._seen: OrderedDict[int, list[tuple[int, ...]]] = OrderedDict()
        self.last: list[tuple] = []  # each row's prompt at the last call: (image features' key, its token ids)

    def query_positions(self, inputs: dict, embeds: torch.Tensor, slots: list, own_mask: torch.Tensor,
                        candidates: int = 0) -> torch.Tensor:
        """Each row's query position; the last ``candidates`` tokens of every row follow its prompt (drafts that
        assisted decoding verifies in the prefill) and are no part of it."""
        ids, real_rows = inputs["input_ids"].tolist(), own_mask.bool().tolist()  # two reads back to the host in all
        sums = [embeds[slot.row, slot.positions].detach().float().sum(-1) for slot in slots]
        sums = torch.cat(sums).cpu().split([len(slot.positions) for slot in slots]) if slots else []
        queries, self.last = [], []
        for row, (row_ids, row_real) in enumerate(zip(ids, real_rows)):
            real = [i for i, is_real in enumerate(row_real) if is_real]
            real = real[: max(len(real) - candidates, 1)]
            tokens = tuple(row_ids[i] for i in real)
            features = [summed for slot, summed in zip(slots, sums) if slot.row == row]
            key = hash(torch.cat(features).numpy().tobytes()) if features else 0
            prompts = self._seen.setdefault(key, [])
            prompt = next((p for p in prompts if tokens[: len(p)] == p), None)
            if prompt is None:
                prompts.append(prompt := tokens)
            queries.append(real[len(prompt) - 1])
            self.last.append((key, prompt))
        while len(self._seen) > self.LIMIT:
            self._seen.popitem(last=False)
        return torch.tensor(queries, device=own_mask.device)


def prompt_ends(prompts: PromptQueries, inputs: dict, embeds: torch.Tensor, slots: list, own_mask: torch.Tensor,
                candidates: int) -> torch.Tensor:
    """(batch,) position of each row's prompt's last token: the query of in-LLM methods and the end of the
    instruction of ``text_embeddings``. A row that continues a prompt already scored with the same image
    features keeps that prompt's end (:class:`PromptQueries`), so a no-cache loop or a fresh prefill of a longer
    conversation selects as the cached run did. Without input_ids: each row's last real token."""
    if inputs.get("input_ids") is not None:
        return prompts.query_positions(inputs, embeds, slots, own_mask, candidates)
    prompts.last = []  # no prompt to recognise without token ids
    real = own_mask.bool()
    last = real.shape[1] - 1 - real.flip(1).long().argmax(1)
    return (last - candidates).clamp(min=0)


def instruction(slot: ImageSlot, slots: list[ImageSlot], embeds: torch.Tensor, own_mask: torch.Tensor,
                prompt_ends: torch.Tensor) -> torch.Tensor:
    """``text_embeddings`` of one image: the decoder-input rows (the LLM's own input embeddings) of its
    instruction tokens, by the rule of ``signals.instruction_positions``."""
    placeholders = torch.zeros(embeds.shape[1], dtype=torch.bool, device=embeds.device)
    for other in slots:
        if other.row == slot.row:
            placeholders[other.positions] = True
    bounds = torch.stack([slot.positions[-1], prompt_ends[slot.row].to(slot.positions.device)]).tolist()
    positions = instruction_positions(own_mask[slot.row], placeholders, *bounds)
    return embeds[slot.row, positions]


def attention_module(layer: nn.Module) -> nn.Module:
    for module in layer.modules():
        if all(isinstance(getattr(module, name, None), nn.Linear) for name in ("q_proj", "k_proj")):
            return module
    raise TypeError(f"{type(layer).__name__} has no q_proj/k_proj: this transformers version renamed them")


def rotary_function(attention: nn.Module):
    """The rotary function the attention's own modeling file applies (``apply_rotary_pos_emb``)."""
    rotary = getattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb", None)
    if rotary is None:
        raise TypeError(f"{type(attention).__module__} has no apply_rotary_pos_emb: this transformers version changed it")
    return rotary


def query_attention(attention: nn.Module, rotary, hidden: torch.Tensor, position_embeddings, queries: torch.Tensor,
                    own_mask: torch.Tensor, chunk: int = 128, average: bool = True, debiased: bool = False) -> torch.Tensor:
    """(batch, heads, length) softmax attention of each row's query tokens to the forward's tokens, as the layer
    computes it (eager and SDPA agree on it), from the query projections of those tokens and the keys, averaged
    over the row's queries. ``queries``: (batch,), one query a row (the prompt's last token), or (batch, Q), -1
    where a row has fewer; taken ``chunk`` queries at a time, so heads x Q x length is never held, unless
    ``average=False`` asks for every query's row: (batch, heads, Q, length), zero at a missing query. ``debiased``:
    each weight divided by the rotation's own bias between the query's and the key's positions, the scaled dot
    product of all-ones q and k rotated as the layer rotates (SparseVLM+'s correction, ``positional_bias``)."""
    batch, length = hidden.shape[:2]
    queries = queries[:, None] if queries.ndim == 1 else queries
    rows = torch.arange(batch, device=hidden.device)[:, None]
    head_dim = attention.head_dim
    k = attention.k_proj(hidden).view(batch, length, -1, head_dim)
    if hasattr(attention, "k_norm"):  # Qwen3-style per-head norms come before the rotation
        k = attention.k_norm(k)
    cos, sin = (t.expand(batch, -1, -1) for t in position_embeddings)
    k = rotary(k.transpose(1, 2), k.transpose(1, 2), cos, sin)[1]
    real = own_mask.bool()[:, None, :]
    summed, counted, each = None, (queries >= 0).sum(1).clamp(min=1), []
    for start in range(0, queries.shape[1], chunk):
        part = queries[:, start : start + chunk]
        valid, part = part >= 0, part.clamp(min=0)
        q = attention.q_proj(hidden[rows, part]).view(batch, part.shape[1], -1, head_dim)
        if hasattr(attention, "q_norm"):
            q = attention.q_norm(q)
        q = rotary(q.transpose(1, 2), q.transpose(1, 2), cos[rows, part], sin[rows, part])[0]
        keys = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        logits = (q.float() @ keys.float().transpose(-1, -2)) * attention.scaling  # (batch, heads, queries, length)
        # causal and unpadded; a padding query sees everything, so its row is finite, and is then left out
        visible = ((torch.arange(length, device=hidden.device) <= part[:, :, None]) & real) | ~valid[:, :, None]
        probabilities = logits.masked_fill(~visible[:, None], float("-inf")).softmax(dim=-1)
        if debiased:
            bias = positional_bias(rotary, cos[rows, part], sin[rows, part], cos, sin, head_dim)
            probabilities = (probabilities / bias).masked_fill(~visible[:, None], 0.0)
        probabilities = probabilities * valid[:, None, :, None]
        if not average:
            each.append(probabilities)
            continue
        summed = probabilities.sum(2) if summed is None else summed + probabilities.sum(2)
    return torch.cat(each, dim=2) if not average else summed / counted[:, None, None]


def attention_rows(attention: nn.Module, rotary, hidden: torch.Tensor, position_embeddings, queries: torch.Tensor,
                   mask: torch.Tensor | None, keys: torch.Tensor | None = None) -> torch.Tensor:
    """(batch, Q, S) head-mean softmax attention of the ``queries`` slots (batch, Q; -1: none, a zero row) of ``hidden``
    (what ``attention`` received) to the S keys it attends: ``keys`` (batch, kv_heads, S, head_dim: the cache's, after
    this forward's update) or, without a cache, this forward's own, under the layer's 4D ``mask`` (None: causal). The
    decode stage's rows (decode_stage.py), as eager attention gives them (tests/test_decode_stage.py)."""
    batch, length = hidden.shape[:2]
    head_dim = attention.head_dim
    cos, sin = (t.expand(batch, -1, -1) for t in position_embeddings)
    if keys is None:
        k = attention.k_proj(hidden).view(batch, length, -1, head_dim)
        if hasattr(attention, "k_norm"):
            k = attention.k_norm(k)
        keys = rotary(k.transpose(1, 2), k.transpose(1, 2), cos, sin)[1]
    total = keys.shape[2]
    valid, part = queries >= 0, queries.clamp(min=0)
    rows = torch.arange(batch, device=hidden.device)[:, None]
    q = attention.q_proj(hidden[rows, part]).view(batch, part.shape[1], -1, head_dim)
    if hasattr(attention, "q_norm"):
        q = attention.q_norm(q)
    q = rotary(q.transpose(1, 2), q.transpose(1, 2), cos[rows, part], sin[rows, part])[0]
    keys = keys.repeat_interleave(q.shape[1] // keys.shape[1], dim=1)
    logits = (q.float() @ keys.float().transpose(-1, -2)) * attention.scaling  # (batch, heads, Q, S)
    if mask is None:
        allowed = torch.arange(total, device=hidden.device)[None, None, :] <= (part + total - length)[:, :, None]
    else:
        rows_of = mask[:, 0].expand(batch, -1, -1).gather(1, part[:, :, None].expand(-1, -1, mask.shape[-1]))
        allowed = rows_of if rows_of.dtype == torch.bool else rows_of > torch.finfo(rows_of.dtype).min / 2
    probabilities = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1)
    return probabilities.mean(1) * valid[:, :, None]


def positional_bias(rotary, query_cos: torch.Tensor, query_sin: torch.Tensor, key_cos: torch.Tensor, key_sin: torch.Tensor,
                    head_dim: int) -> torch.Tensor:
    """(batch, 1, Q, length) ``q·k / sqrt(head_dim)`` of all-ones q and k rotated by ``rotary`` at the queries' cos/sin
    (batch, Q, d) and the keys' (batch, length, d): what the rotation alone adds between two positions, the same for
    every head (SparseVLM+ divides each attention weight by it: ``rope_weights`` in its modelling_sparse_llama.py)."""
    batch = key_cos.shape[0]
    ones_q = key_cos.new_ones(batch, 1, query_cos.shape[1], head_dim)
    ones_k = key_cos.new_ones(batch, 1, key_cos.shape[1], head_dim)
    q = rotary(ones_q, ones_q, query_cos, query_sin)[0]
    k = rotary(ones_k, ones_k, key_cos, key_sin)[1]
    return (q.float() @ k.float().transpose(-1, -2)) / head_dim ** 0.5


def keys_and_values(layer: nn.Module, rotary, hidden: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, kv_heads, length, head_dim) keys (normed and rotated) and values decoder ``layer`` computes for tokens
    whose input is ``hidden`` at the positions of ``position_embeddings``: what its attention caches for them."""
    attention = attention_module(layer)
    x = input_norm(layer, hidden)
    batch, length = x.shape[:2]
    key = attention.k_proj(x).view(batch, length, -1, attention.head_dim)
    if hasattr(attention, "k_norm"):
        key = attention.k_norm(key)
    value = attention.v_proj(x).view(batch, length, -1, attention.head_dim).transpose(1, 2)
    cos, sin = (t.expand(batch, -1, -1) for t in position_embeddings)
    return rotary(key.transpose(1, 2), key.transpose(1, 2), cos, sin)[1], value


def input_norm(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """What decoder ``layer``'s attention receives of its input ``hidden``: its own input norm applied
    (``llm_attention_at = "input"``, PyramidDrop, scores as the layer computes it)."""
    norm = getattr(layer, "input_layernorm", None)
    if norm is None:
        raise TypeError(f"{type(layer).__name__} has no input_layernorm: this transformers version renamed it")
    return norm(hidden)

