"""Static caches under a method (``generate(cache_implementation="static")`` or a ``StaticCache`` passed in), and
compiled forwards, which are refused (end of this file).

What transformers 5.24 does with one (the engine builds on these facts, tests/test_static_cache.py checks them):

- Each layer (``StaticLayer``) preallocates ``max_cache_len`` slots and writes a forward's keys and values at
  its own ``cumulative_length`` (a 0-d tensor of what it holds), then advances it. There is no
  ``cache_position`` any more: the slot is physical. A pruned prefill writes its kept tokens to slots 0..K-1,
  and decode steps follow at K, K+1, ...; the slots past K stay zero and masked.
- ``generate()`` sizes the cache for the unpruned prompt plus ``max_new_tokens`` (pruning saves compute there,
  not cache memory: pass a ``StaticCache`` sized for the kept tokens to save that too), and builds the decoder's
  masks ahead, in ``prepare_inputs_for_generation`` (``create_masks_for_generate``): 4D over the preallocated
  length, causal by physical slot (``q_offset`` is the cache's ``cumulative_length``) with the padding of its 2D
  mask, which keeps the unpruned length (Qwen-type text configs get a dict keyed by layer type; SDPA gets None
  where a prefill has no padding).
- Positions come from ``generate()``'s ``position_ids``, which count the unpruned sequence: kept tokens keep
  theirs and decode tokens get the ones they would have had without pruning.

So at a prefill the engine reads the call's padding back from the prebuilt mask (its last query row sees every
token of the call), and, as with a dynamic cache, hands the decoder the 2D mask over what the cache physically
holds; the decoder builds its own masks against the static cache from it (causal by slot, padded to
``max_cache_len``). Later forwards on a pruned cache bring real tokens only (generate() appends ones to its mask).

In-LLM stages are refused: from a stage's layer on, layers would hold fewer tokens than the layers before it,
and the decoder builds one mask, from layer 0's length, for every layer.
"""

from __future__ import annotations

import torch

from .compat import cache_length


def is_static(cache) -> bool:
    """Whether ``cache`` has preallocated, fixed-size layers (``StaticCache`` and the compileable caches)."""
    return bool(getattr(cache, "is_compileable", False))


def refuse_static_cache_with_in_llm(cache, stages, has_images: bool) -> None:
    """Refuse a call that brings images and a static cache to a run with in-LLM stages (FastV, PyramidDrop, a
    chain with one), before any image is pruned or any cache slot written."""
    if not has_images or not stages or not is_static(cache):
        return
    names = "+".join(dict.fromkeys(stage.method.name for stage in stages))
    raise ValueError(
        f"{names} needs the default dynamic cache: a static cache (cache_implementation='static', or a StaticCache "
        f"passed in) gives every decoder layer one preallocated length and one mask, while {names} prunes inside "
        f"the LLM, so from decoder layer {stages[0].layer} on the layers hold fewer tokens than the layers before. "
        f"Generate without cache_implementation (the default dynamic cache) inside the apply() block, or prune "
        f"before the LLM: pre-LLM methods work with a static cache"
    )


def flat_mask_for_static_cache(mask, cache, pruned_cache: bool, batch: int, length: int, device) -> torch.Tensor:
    """The 2D mask the engine works with, for a decoder call that carries the masks ``generate()`` built ahead
    for a static cache (a 4D tensor, a dict of them keyed by layer type, or None).

    On a cache that holds every token (a prefill, or a cache nothing was pruned from) it is the padding of
    every token so far, (batch, past + length), read from the full-attention mask's last query row (in a
    prebuilt mask only the padding varies along a row). On a pruned cache (``pruned_cache``) the prebuilt mask
    mixes the cache's slots with the unpruned sequence's columns: the call's own tokens are then real ones,
    as generate() appends them, (batch, length) ones. Any other prebuilt mask is refused."""
    if not is_static(cache):
        raise ValueError(
            "tokensieve needs the 2D attention mask the processor returns; this call carries a prebuilt 4D mask "
            "and no static cache to read it against: pass the 2D attention_mask"
        )
    if pruned_cache:
        return torch.ones(batch, length, dtype=torch.long, device=device)
    if isinstance(mask, dict):
        if "full_attention" not in mask:
            raise ValueError(
                f"a static cache with only {', '.join(mask)} layers: tokensieve reads the padding from the full-attention "
                f"mask, which this model has none of; use the default dynamic cache"
            )
        mask = mask["full_attention"]
    seen = cache_length(cache) + length
    if mask is None:  # SDPA needs no mask where the prefill has no padding
        return torch.ones(batch, seen, dtype=torch.long, device=device)
    if not isinstance(mask, torch.Tensor) or mask.ndim != 4:
        raise ValueError(
            f"a static cache with a prebuilt {type(mask).__name__} mask (flex attention?): tokensieve reads padding from "
            f"SDPA's and eager's 4D masks; use attn_implementation='sdpa' or the default dynamic cache"
        )
    row = mask[:, 0, -1, :seen]
    attends = (row if row.dtype == torch.bool else row == 0).long().expand(batch, -1)  # eager: 0 where a token attends
    if attends.shape[1] < seen:
        # a cache shorter than the unpruned prompt (sized for the kept tokens, which include every padding token):
        # its mask shows the left padding, and the columns past it are real tokens
        if not attends[:, -1].all():
            raise ValueError(
                "a static cache shorter than the prompt, and a row that is still padding at the cache's last slot: "
                "tokensieve reads left padding only (as generate() pads); pad on the left or use a longer cache"
            )
        attends = torch.cat([attends, attends.new_ones(batch, seen - attends.shape[1])], dim=1)
    return attends


# Compiled forwards. Dynamo does not guard on a module's hooks (torch._dynamo.config.skip_nnmodule_hook_guards,
# True by default: "if your model has hooks and you remove them, or doesn't and you add them, dynamo will not
# notice and will execute whichever version you first compiled"). A forward compiled before apply() would run
# without tokensieve's hooks, silently unpruned, and one compiled inside the block could keep calling them after
# it. So a run refuses both: a forward that is already compiled when it is applied, and any forward that dynamo
# traces through its hooks while it is applied (torch.compile(model.forward), torch.compile(model), or generate()'s
# own compilation of the decode steps, which it does with a static cache on CUDA and other accelerators).

_COMPILED_HINT = (
    "tokensieve's hooks run Python on every forward and dynamo does not notice hooks added or removed after it "
    "compiled (torch._dynamo.config.skip_nnmodule_hook_guards), so a compiled forward would run pruned or unpruned "
    "by whatever it first saw"
)


def compiled_forwards(model, modules) -> list[str]:
    """Names of the forwards among ``model`` and ``modules`` (name -> module) that torch.compile has wrapped."""
    found = []
    if type(model).__name__ == "OptimizedModule":
        found.append("the model (torch.compile(model))")
    for name, module in (("model", model), *modules.items()):
        forward = module.__dict__.get("forward")  # torch.compile(module.forward) assigned back to the instance
        if forward is not None and hasattr(forward, "_torchdynamo_orig_callable") and not getattr(forward, "_torchdynamo_disable", False):
            found.append(f"{name}.forward")
    if "_compiled_call" in model.__dict__:  # generate() keeps the one it compiled (a static cache on an accelerator)
        found.append("model._compiled_call, which an earlier generate() compiled and later ones reuse")
    return found


def refuse_compiled_model(model, modules, method_name: str) -> None:
    """At apply(): refuse a model whose forward torch.compile has already wrapped."""
    found = compiled_forwards(model, modules)
    if found:
        raise ValueError(
            f"{method_name} cannot hook a compiled forward ({', '.join(found)}): {_COMPILED_HINT}. Apply it to the "
            f"uncompiled model (delete what is listed: `del model.forward` restores the class's forward), and inside "
            f"the block generate with disable_compile=True where generate() would compile"
        )


@torch.compiler.disable
def _refuse_tracing(method_name: str) -> None:
    # not traced: called where dynamo traced the hook, it raises when the compiled code runs
    raise ValueError(
        f"{method_name} is applied and dynamo is compiling the forward (torch.compile, or generate() compiling the "
        f"decode steps of a static cache on an accelerator): {_COMPILED_HINT}. Run the forward uncompiled inside the "
        f"apply() block: generate(..., disable_compile=True) with a static cache, or the default dynamic cache"
    )


def refuse_tracing(method_name: str) -> None:
    """In a hook: refuse when dynamo is tracing it (the hook then runs in compiled code)."""
    if torch.compiler.is_compiling():
        _refuse_tracing(method_name)
