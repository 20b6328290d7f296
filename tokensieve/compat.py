"""What differs between the transformers releases tokensieve supports (5.23 and 5.24)."""

from __future__ import annotations

import inspect

from transformers import LlamaModel

#: the keyword forwards take the KV cache by: 5.24 renamed ``past_key_values`` to ``cache``
CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def output_cache(output):
    """The KV cache a model or generate() output carries (``.cache`` from 5.24, ``.past_key_values`` before)."""
    return getattr(output, CACHE_ARGUMENT, None)
