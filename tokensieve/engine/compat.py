"""What differs between the transformers releases tokensieve supports (5.23 and 5.24)."""

from __future__ import annotations

import inspect

from transformers import LlamaModel

#: the keyword forwards take the KV cache by: 5.24 renamed ``past_key_values`` to ``cache``
CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def output_cache(output):
    """The KV cache a model or generate() output carries (``.cache`` from 5.24, ``.past_key_values`` before)."""
    return getattr(output, CACHE_ARGUMENT, None)


def cache_length(cache) -> int:
    """Tokens ``cache`` holds (its first layer), as an int: a static cache's layers count them in a 0-d tensor
    (``StaticLayer.cumulative_length``), so that compiled forwards read them without a graph break."""
    return int(cache.get_seq_length()) if cache is not None else 0
