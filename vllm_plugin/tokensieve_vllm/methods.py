"""What the plugin serves, as pure functions of tokensieve's own method code (no vLLM import: the main test suite
runs them too).

vLLM lays out a prompt's image placeholders in the front-end process, before the vision tower runs, so a method is
served only if its output count is a pure function of the image's token count, grid and budget
(:func:`placeholder_count`), checked on synthetic tokens of the model's shape before any request runs
(:func:`checked_count`). The model's embedding function then calls the method on the tensors vLLM hands over
(:func:`kept_embeddings`). A method that needs the prompt (``text_embeddings``), works inside the LLM or the vision
tower, or asks for a signal the plugin cannot compute is refused with the reason (:func:`served_method`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import torch

import tokensieve as ts
from tokensieve.chain import Chain
from tokensieve.selection import target_grid
from tokensieve.sieve import GridSieve, Sieve, VisualTokens, timed_select
from tokensieve.signals import Signal, attention_row, requests_of

#: the per-server default method: this environment variable, or ``--hf-overrides '{"tokensieve_method": ...}'``
ENV_METHOD = "TOKENSIEVE_VLLM_METHOD"
#: the per-request key: ``mm_processor_kwargs={"tokensieve_method": "divprune:64"}`` (or "none": every token)
REQUEST_KEY = "tokensieve_method"
#: the per-image fields the processor adds for the worker: the method's spelling and the count laid out
METHOD_FIELD, COUNT_FIELD = "tokensieve_method", "tokensieve_count"
#: a method spelling that keeps every token (the stock model)
OFF = ("", "none", "off")
#: the signals the plugin computes from vLLM's tower: the [CLS] row and keys of the feature layer (hooked on its
#: fused qkv projection), the projector's input, and the projector itself
SERVED_SIGNALS = {
    Signal("cls_attention"): "the [CLS] row at the feature layer",
    Signal("vision_keys"): "the feature layer's keys",
    Signal("vision_features"): "the projector's input",
    Signal("project"): "the projector",
    # every token of a LLaVA-1.5 image has a key and a feature: asking for zero rows where one is missing (VisionZip,
    # for LLaVA-NeXT's newline tokens) gives the same values
    Signal("vision_keys", missing="zeros"): "the feature layer's keys",
    Signal("vision_features", missing="zeros"): "the projector's input",
}
CLS_SIGNALS = {Signal("cls_attention"), Signal("vision_keys"), Signal("vision_keys", missing="zeros")}
#: the pre-LLM methods whose kept count is a pure function of (tokens, grid, budget) by construction: each keeps
#: exactly its budget, or (grid methods) the largest whole grid within it. Others (merging by thresholds, scores
#: that decide the count) could not have their placeholders laid out before the tower runs
EXACT_COUNT = ("divprune", "dart_pre", "downsample", "fastervlm", "fourier", "pool", "random", "uniform", "visionzip",
               "vispruner")
#: a method spelling travels from the front end to the worker as a fixed-width byte tensor per image
SPEC_BYTES = 192


class UnservableMethod(ValueError):
    """A method, budget or model the plugin cannot serve, with what to change."""


@dataclass(frozen=True)
class ImageShape:
    """What a model's image gives the method: its token grid, and whether its tower has a [CLS] token the model drops."""

    grid: tuple[int, int]
    has_cls: bool

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]


class _ServedSignals:
    """The adapter-like view :func:`tokensieve.signals.requests_of` resolves an ``Either`` against."""

    def __init__(self, has_cls: bool):
        self.has_cls = has_cls

    def missing_signals(self, wanted) -> dict[str, str]:
        return {str(request): why for request in wanted if (why := self.why_not(request)) is not None}

    def why_not(self, request: Signal) -> str | None:
        if request not in SERVED_SIGNALS:
            if request.name == "text_embeddings":
                return "it needs the prompt's text, and vLLM's multimodal embedding function never sees the prompt"
            return f"the plugin computes only {', '.join(map(str, SERVED_SIGNALS))}"
        if request in CLS_SIGNALS and not self.has_cls:
            return ("the vision tower has no [CLS] token (SigLIP, Qwen2-VL), or the model keeps it among the image "
                    "tokens")
        return None


def server_default(hf_config) -> str | None:
    """The server's method: ``--hf-overrides '{"tokensieve_method": ...}'``, else $TOKENSIEVE_VLLM_METHOD."""
    return getattr(hf_config, "tokensieve_method", None) or os.environ.get(ENV_METHOD)


def method_spelling(request_kwargs: dict | None, server_default: str | None) -> str:
    """The method a request asks for: its ``mm_processor_kwargs["tokensieve_method"]``, else the server's default."""
    asked = (request_kwargs or {}).get(REQUEST_KEY)
    spelling = server_default if asked is None else asked
    if spelling is None:
        return "none"
    if not isinstance(spelling, str):
        raise UnservableMethod(f"{REQUEST_KEY}={spelling!r}: pass a method spelling such as 'divprune:64' (or 'none')")
    return spelling.strip() or "none"


@lru_cache(maxsize=64)
def served_method(spelling: str, has_cls: bool) -> Sieve | None:
    """The sieve a spelling names (None: every token kept), or :class:`UnservableMethod` naming why not."""
    if spelling.lower() in OFF:
        return None
    try:
        method = ts.build(spelling)
    except (ValueError, TypeError) as error:
        raise UnservableMethod(f"{REQUEST_KEY}={spelling!r}: {error}") from None
    if isinstance(method, Chain):
        raise UnservableMethod(f"{spelling!r} is a chain: the plugin serves one pre-LLM method (vLLM lays the prompt out "
                               f"once, before the tower runs)")
    why = refusal(method, has_cls)
    if why is not None:
        raise UnservableMethod(f"{why}; serve one of {', '.join(servable_names(has_cls))}")
    return method


def refusal(method: Sieve, has_cls: bool) -> str | None:
    """Why the plugin cannot serve ``method`` (None: it can)."""
    if method.stage == "in_llm":
        return (f"{method.name} prunes inside the LLM: vLLM's paged KV cache holds every prompt token at every layer "
                f"and the plugin's only hook is the image embedding function, so in-LLM methods cannot run there")
    if method.stage == "in_vision":
        return f"{method.name} merges inside the vision tower: vLLM's tower has no hooks between its layers"
    if method.budget.adaptive is not None or method.budget.total is not None:
        return (f"{method.name} with keep={method.budget!r}: vLLM lays out the image's placeholders before the tower "
                f"runs, so the count must follow from the budget alone; pass a count or a ratio")
    signals = _ServedSignals(has_cls)
    missing = signals.missing_signals(requests_of(method, signals))
    if missing:
        return f"{method.name} needs signals the plugin cannot give ({'; '.join(f'{n}: {why}' for n, why in missing.items())})"
    if method.name not in EXACT_COUNT:
        return (f"{method.name}'s kept count is not known to follow from its budget alone, and vLLM lays out the "
                f"image's placeholders before the tower runs")
    return None


@lru_cache(maxsize=2)
def servable_names(has_cls: bool = True) -> tuple[str, ...]:
    """The registered pre-LLM methods the plugin serves, with their default arguments."""
    return tuple(info.name for info in ts.list_methods(stage="pre_llm")
                 if refusal(ts.load(info.name), has_cls) is None)


def placeholder_count(method: Sieve | None, shape: ImageShape) -> int:
    """How many tokens ``method`` keeps of an image of ``shape``: the placeholders vLLM lays out for it. A budget above
    the image's tokens is refused (vLLM would lay out placeholders the tower cannot fill)."""
    n = shape.tokens
    if method is None:
        return n
    value = method.budget.value
    if not isinstance(value, float) and value > n:
        raise UnservableMethod(f"{method.name} keep={value} is more than the {n} tokens of this model's image "
                               f"({shape.grid[0]}x{shape.grid[1]}): pass keep <= {n}, or a ratio such as keep=0.25")
    k = method.budget.resolve(n)
    if isinstance(method, GridSieve) and k < n:
        rows, cols = target_grid(shape.grid, k)
        return rows * cols  # a grid method keeps the largest whole grid within the budget (pool: 32 -> 5x6 = 30)
    return k


@lru_cache(maxsize=256)
def checked_count(spelling: str, shape: ImageShape) -> int:
    """:func:`placeholder_count`, checked once against what the method's own code keeps of synthetic tokens of that
    shape, so that a count the worker would not meet fails here, in the front end, with what to change, instead of
    killing the engine mid-request."""
    method = served_method(spelling, shape.has_cls)
    count = placeholder_count(method, shape)
    if method is not None:
        kept = len(kept_embeddings(method, _synthetic(method, shape), shape.grid))
        if kept != count:
            raise UnservableMethod(f"{method!r} keeps {kept} tokens of a {shape.grid[0]}x{shape.grid[1]} image where the "
                                   f"plugin lays out {count}: vLLM needs the count before the tower runs; choose another "
                                   f"budget")
    return count


def kept_embeddings(method: Sieve, tokens: VisualTokens, grid: tuple[int, int]) -> torch.Tensor:
    """The (K, d) embeddings ``method`` keeps of one image (:func:`kept_tokens`)."""
    return kept_tokens(method, tokens)[0]


def kept_tokens(method: Sieve, tokens: VisualTokens, carried: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The (K, d) embeddings ``method`` keeps of one image, its kept rows with merged ones replaced (tokensieve's
    own ``select``, checked by ``timed_select``, as the engine applies it before the LLM), and their (K,) indices
    into the image's tokens, whose places on the grid the kept tokens keep (the engine's positions).

    ``carried`` (N, c): other values per token that the method does not see (Qwen3-VL's DeepStack rows), appended to
    the kept embeddings' columns as the engine carries them (``Selections.carried``): a merge map's group means,
    else each kept token's own rows (a method that writes its own features says nothing about them)."""
    selection, _ = timed_select(method, tokens)
    kept = selection.kept.to(tokens.features.device)
    merged = selection.merged(tokens.features)
    chosen = merged if merged is not None else tokens.features[kept]
    if carried is None:
        return chosen, kept
    means = selection.group_means(carried)
    return torch.cat([chosen, means if means is not None else carried[kept]], dim=1), kept


def signals_asked(method: Sieve, has_cls: bool) -> list[Signal]:
    """The signals ``method`` asks of the tower (an ``Either`` resolved as the plugin serves it)."""
    return list(requests_of(method, _ServedSignals(has_cls)))


def image_tokens(method: Sieve, embeddings: torch.Tensor, grid: tuple[int, int], *, qkv: torch.Tensor | None,
                 heads: int, features: torch.Tensor | None, projector) -> VisualTokens:
    """One image's :class:`VisualTokens` from what vLLM's LLaVA computes: the projected ``embeddings`` (N, d), the
    feature layer's fused ``qkv`` output over the tower's sequence ([CLS] first), the projector's input and the
    projector, each given only if the method asks for it."""
    signals = {}
    for request in requests_of(method, _ServedSignals(qkv is not None)):
        if request in CLS_SIGNALS:
            query, key, _ = qkv.float().chunk(3, dim=-1)
            query = query.view(query.shape[0], heads, -1).transpose(0, 1)
            key = key.view(key.shape[0], heads, -1).transpose(0, 1)
            if request.name == "cls_attention":
                signals[request] = attention_row(query[:, :1], key, key.shape[-1] ** -0.5)[:, 1:]
            else:
                signals[request] = key[:, 1:]
        elif request.name == "vision_features":
            signals[request] = features
        elif request.name == "project":
            signals[request] = projector
    return VisualTokens(embeddings, grid, signals)


def _synthetic(method: Sieve, shape: ImageShape) -> VisualTokens:
    """Random tokens of ``shape`` with every signal ``method`` asks for, for :func:`checked_count`."""
    generator = torch.Generator().manual_seed(0)
    n, heads, d = shape.tokens, 2, 8
    qkv = torch.randn(n + 1, 3 * heads * d, generator=generator) if shape.has_cls else None
    projector = torch.nn.Linear(d * heads, d * heads)
    features = torch.randn(n, d * heads, generator=generator)
    return image_tokens(method, projector(features).detach(), shape.grid, qkv=qkv, heads=heads, features=features,
                        projector=projector)


def encode_spelling(spelling: str) -> torch.Tensor:
    """A method spelling as a fixed-width uint8 tensor, to travel with the image's pixels to the worker."""
    data = spelling.encode()
    if len(data) > SPEC_BYTES:
        raise UnservableMethod(f"{REQUEST_KEY}={spelling!r} is longer than {SPEC_BYTES} bytes")
    return torch.tensor(list(data) + [0] * (SPEC_BYTES - len(data)), dtype=torch.uint8)


def decode_spelling(encoded: torch.Tensor) -> str:
    data = bytes(int(b) for b in encoded.tolist())
    return data.rstrip(b"\0").decode()
