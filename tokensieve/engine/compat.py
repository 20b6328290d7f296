"""What differs between the transformers releases tokensieve supports (5.23, 5.24 and 5.25).

The hooks rely on these internals (``tests/test_compat.py`` names each one and fails with what to do when a
release moves it):

- the KV cache keyword of the forwards: ``past_key_values`` in 5.23, ``cache`` from 5.24 (``CACHE_ARGUMENT``);
- ``apply_rotary_pos_emb`` in the decoder's own modeling module (``llm_signals.rotary_function``), the decoder's
  ``rotary_emb`` module, and attention modules with ``q_proj``/``k_proj`` linears;
- ``masking_utils.ALL_MASK_ATTENTION_FUNCTIONS`` and ``causal_mask_function`` (``masks.full_causal_mask``).

Hub kernels (5.25). ``PreTrainedModel.from_pretrained`` has a ``use_kernels`` keyword (popped from ``**kwargs``,
so it is not in the signature) since before 5.23. Up to 5.24 it defaults to False. From 5.25 it defaults to True
unless the environment variable ``USE_HUB_KERNELS`` is off, and loading raises ``ValueError: Kernels are not
available`` when the ``kernels`` package is missing (5.25 requires ``kernels>=0.19.1,<0.20``, so a plain
``pip install`` brings it; an install with ``--no-deps``, or one forced over a pin, does not). With ``kernels``
present, ``kernelize`` swaps layers for the device the model is on: on CPU nothing is swapped for the families
tokensieve serves; on CUDA/ROCm/XPU, ``*RMSNorm`` forwards (Liger), the module-level ``apply_rotary_pos_emb``
that attention modules call (through ``use_kernelized_func``) and activations are replaced by kernels fetched from
the Hub (network on first use). tokensieve's hooks do not call RMSNorm themselves, but the LLM signals recompute
attention rows with the modeling file's own ``apply_rotary_pos_emb``: against a hub rotary kernel they would agree
to kernel rounding, not bit for bit. So every model tokensieve loads itself (sieve-mini and its parts,
``tokensieve bench --model``) goes through :func:`from_pretrained`, which passes ``use_kernels=False``: the stock
torch layers, on every supported release (5.23 and 5.24 accept the keyword with the same meaning), with or
without ``kernels`` installed, and without touching the process's environment (setting ``USE_HUB_KERNELS``
would also change models the user loads). A model the user loads and hands to ``ts.apply`` keeps whatever its
``from_pretrained`` chose.

Modeling files compared byte for byte, 5.24.0 against 5.25.0 (llava, llava_next, llava_onevision, idefics3,
smolvlm, qwen2_vl, qwen2_5_vl, llama, qwen2, clip, siglip, dinov2): every ``modeling_*.py`` and
``configuration_*.py`` is identical. What differs: the processors and image/video processors of llava,
llava_next, llava_onevision, idefics3, smolvlm, qwen2_vl and qwen2_5_vl now standardise their kwargs through
``_merge_and_standardize_kwargs`` in ``_get_num_multimodal_tokens`` / ``get_number_of_image_patches`` (idefics3
counts ``image_seq_len`` per crop there, without the row/column separator tokens; smolvlm gains the method);
``modular_smolvlm.py`` (not imported at runtime) sets ``model_type``. Outside the models: ``masking_utils``'s
mask builders expose ``past_key_values`` in their signatures again (deprecated alias of ``cache``) and the
sliding-window builders take ``position_ids`` (packed-sequence detection, as the causal one already did);
``generate()``'s prefill slicing no longer depends on ``cache.is_linear`` (same result for attention caches); the
SDPA attention's mask fill value fits the position bias's dtype under autocast; cache classes gain recurrent-state
bookkeeping for linear-attention layers.
"""

from __future__ import annotations

import inspect

from transformers import LlamaModel

#: the keyword forwards take the KV cache by: 5.24 renamed ``past_key_values`` to ``cache``
CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def from_pretrained(model_class, *args, **kwargs):
    """``model_class.from_pretrained(*args, **kwargs)`` with the stock torch layers: ``use_kernels=False``
    unless the caller passes it (5.25 turns hub kernels on by default and fails without the ``kernels``
    package; 5.23 and 5.24 take the same keyword, default False). For model classes only, not processors,
    tokenizers or configs, which do not take it."""
    kwargs.setdefault("use_kernels", False)
    return model_class.from_pretrained(*args, **kwargs)


def output_cache(output):
    """The KV cache a model or generate() output carries (``.cache`` from 5.24, ``.past_key_values`` before)."""
    return getattr(output, CACHE_ARGUMENT, None)


def cache_length(cache) -> int:
    """Tokens ``cache`` holds (its first layer), as an int: a static cache's layers count them in a 0-d tensor
    (``StaticLayer.cumulative_length``), so that compiled forwards read them without a graph break."""
    return int(cache.get_seq_length()) if cache is not None else 0
