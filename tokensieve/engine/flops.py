"""Exact matmul FLOPs of an LLM decoder prefill, counted from the real shapes, and their count in a run's stats."""

from __future__ import annotations


def decoder_prefill_flops(text_config, query_lengths: list[int], past_lengths: list[int] | None = None,
                          layers: int | None = None) -> int:
    """FLOPs of the decoder layers (all, or the last ``layers`` of them) for one forward over each row's
    ``query_lengths`` new tokens.

    Counts 2·m·n·k per matmul: q/k/v/o projections (grouped-query aware), causal attention scores
    and weighted values over exactly the keys each query sees (``past + i`` for the i-th new
    token), and the gated MLP (gate, up, down). Padding is not counted; norms, RoPE, softmax and the
    LM head are left out (they are small next to the rest, and the head depends on how many logits
    the caller keeps).
    """
    d = text_config.hidden_size
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or d // heads
    ffn = text_config.intermediate_size
    layers = text_config.num_hidden_layers if layers is None else layers
    past_lengths = past_lengths or [0] * len(query_lengths)
    total = 0
    for q, past in zip(query_lengths, past_lengths):
        projections = 2 * q * d * head_dim * (2 * heads + 2 * kv_heads)
        keys_seen = q * past + q * (q + 1) // 2
        attention = 2 * 2 * heads * head_dim * keys_seen
        mlp = 3 * 2 * q * d * ffn
        total += layers * (projections + attention + mlp)
    return total


def count_prefill(stats, text_config, real_before: list[int], real_after: list[int], past_before: list[int],
                  past_after: list[int]) -> None:
    """Add one prefill to ``stats``: every decoder layer over the ``real_after`` tokens each row keeps at the
    decoder's input and the ``past_after`` real tokens its cache holds, and without the reduction (``_before``)."""
    stats.prefill_flops += decoder_prefill_flops(text_config, real_after, past_after)
    stats.prefill_flops_unreduced += decoder_prefill_flops(text_config, real_before, past_before)


def count_stage(stats, text_config, layers: int, real_before: list[int], real_after: list[int],
                past_before: list[int], past_after: list[int]) -> None:
    """An in-LLM stage: the last ``layers`` decoder layers see what it kept, ``real_after`` tokens per row over
    ``past_after`` cached ones, instead of ``real_before`` over ``past_before``: replace their share of the count."""
    kept = decoder_prefill_flops(text_config, real_after, past_after, layers=layers)
    full = decoder_prefill_flops(text_config, real_before, past_before, layers=layers)
    stats.prefill_flops += kept - full
