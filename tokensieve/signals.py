"""Parameterised signals: what a sieve asks the model for, with its parameters.

A sieve declares the *names* of the signals it needs in its class attribute ``signals`` (that drives
``ts.list_methods(needs=...)``); an instance asks for them with parameters through
:meth:`~tokensieve.sieve.Sieve.requests`, as :class:`Signal` values (``Signal("vision_attention",
layer=9)``). A bare name is the signal with its default parameters. Requests are validated against the
model's adapter before the model is touched, each is computed once per forward, and a sieve reads
each one from ``VisualTokens`` by the same request (``tokens[Signal("vision_attention", layer=9)]``,
or ``tokens["cls_attention"]`` for the defaults).

**Vision layer numbering** (``layer``, ``layers``): as Hugging Face's ``hidden_states`` and LLaVA's
``vision_feature_layer``: layer ``L`` is the transformer block whose *output* is ``hidden_states[L]``,
so ``1..n`` count blocks from the first and ``-1..-n`` from the last (``-2`` is the penultimate block,
LLaVA's default feature layer); ``0`` (the embeddings) has no attention. ``None`` is the block whose
output the model feeds to its projector (its feature layer; the last block for Qwen2-VL and Idefics3).
"""

from __future__ import annotations

import functools

from ._lazy import torch

#: each parameterised signal's parameters and their defaults (the others take none)
PARAMETERS: dict[str, dict] = {
    "cls_attention": {"layers": None},
    "vision_attention": {"layer": None, "queries": "mean"},
    "llm_attention": {"queries": "last", "per_query": False, "debiased": False},
    "llm_input": {"tokens": "image"},
    "llm_transition": {"start": None},
    "vision_keys": {"missing": "refuse"},
    "vision_features": {"missing": "refuse"},
}
#: what ``vision_keys`` and ``vision_features`` give a token that has no vision-tower key or feature (LLaVA-NeXT's
#: row-end newline tokens): "refuse" (a model with such tokens refuses the request) or "zeros" (zero rows, for a
#: method that never keeps or merges such a token by these values)
MISSING = ("refuse", "zeros")
#: whose attention rows a signal averages: the vision [CLS] row or every row of the tower's sequence; in the LLM,
#: the prompt's last token, the image's instruction tokens (the ``text_embeddings`` rule) or the image's own tokens
QUERIES = {"vision_attention": ("cls", "mean"), "llm_attention": ("last", "instruction", "image")}
#: whose decoder-input embeddings ``llm_input`` gives: the image's tokens still there, every token it had at the
#: decoder input, or its instruction tokens
INPUT_TOKENS = ("image", "whole_image", "instruction")


def _check_layer(value, what: str):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value == 0:
        raise ValueError(f"{what} must be a vision layer number (1..n, or -1..-n from the last; 0 is the embeddings), not {value!r}")
    return value


class Signal:
    """One signal with its parameters, e.g. ``Signal("vision_attention", layer=9, queries="mean")``.

    Frozen and hashable; equal requests are computed once. Parameters left out take their defaults, so
    ``Signal("cls_attention") == Signal("cls_attention", layers=None)``.
    """

    __slots__ = ("name", "params")

    def __init__(self, name: str, **params):
        from .sieve import SIGNALS  # sieve.py imports this module

        if name not in SIGNALS:
            raise ValueError(f"unknown signal {name!r}: choose from {', '.join(sorted(SIGNALS))}")
        defaults = PARAMETERS.get(name, {})
        unknown = sorted(set(params) - set(defaults))
        if unknown:
            takes = ", ".join(defaults) or "no parameters"
            raise ValueError(f"signal {name} takes {takes}; not {', '.join(unknown)}")
        values = {**defaults, **params}
        if "layer" in values:
            values["layer"] = _check_layer(values["layer"], f"{name}(layer=...)")
        if values.get("layers") is not None:
            layers = values["layers"]
            layers = (layers,) if isinstance(layers, int) else tuple(layers)
            if not layers:
                raise ValueError(f"{name}(layers=...) needs at least one layer (or None for the feature layer)")
            values["layers"] = tuple(_check_layer(layer, f"{name}(layers=...)") for layer in layers)
        if "missing" in values and values["missing"] not in MISSING:
            raise ValueError(f"{name}(missing=...) must be one of {MISSING}, not {values['missing']!r}")
        if values.get("start") is not None and (isinstance(values["start"], bool) or not isinstance(values["start"], int)
                                                or values["start"] < 0):
            raise ValueError(f"{name}(start=...) must be a decoder layer index (0 is the first layer), not {values['start']!r}")
        if values.get("per_query") and values["queries"] == "last":
            raise ValueError(f"{name}(per_query=True) keeps each query's row apart: ask for queries='instruction' or 'image'")
        if "debiased" in values and not isinstance(values["debiased"], bool):
            raise ValueError(f"{name}(debiased=...) must be True or False, not {values['debiased']!r}")
        if "tokens" in values and values["tokens"] not in INPUT_TOKENS:
            raise ValueError(f"{name}(tokens=...) must be one of {INPUT_TOKENS}, not {values['tokens']!r}")
        if "queries" in values and values["queries"] not in QUERIES[name]:
            raise ValueError(f"{name}(queries=...) must be one of {QUERIES[name]}, not {values['queries']!r}")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "params", tuple(values.items()))

    def __setattr__(self, key, value):
        raise AttributeError("a Signal is frozen")

    def __getattr__(self, key):
        for param, value in object.__getattribute__(self, "params"):
            if param == key:
                return value
        raise AttributeError(f"signal {self.name} has no parameter {key!r}")

    def __eq__(self, other) -> bool:
        return isinstance(other, Signal) and (self.name, self.params) == (other.name, other.params)

    def __hash__(self) -> int:
        return hash((self.name, self.params))

    def __repr__(self) -> str:
        if self.params == tuple(PARAMETERS.get(self.name, {}).items()):
            return self.name
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.params)})"

    __str__ = __repr__


def as_signal(request: str | Signal) -> Signal:
    """A request as a :class:`Signal` (a bare name: its default parameters)."""
    return request if isinstance(request, Signal) else _by_name(request)


@functools.cache
def _by_name(name: str) -> Signal:
    # a bare name is looked up for every image of every forward: build its Signal once
    return Signal(name)


class Either:
    """A request for the first of several signals the model can give, in order of preference: VisPruner asks
    for ``Either(Signal("cls_attention"), Signal("vision_attention", layer=-1))``, the [CLS] row where the tower
    has a [CLS] token, else the attention each token receives at the last layer. The sieve then finds the one
    given in ``VisualTokens`` (``"cls_attention" in tokens``)."""

    __slots__ = ("options",)

    def __init__(self, *options: str | Signal):
        if len(options) < 2:
            raise ValueError("Either(...) takes two or more signals, in order of preference")
        object.__setattr__(self, "options", tuple(as_signal(option) for option in options))

    def __setattr__(self, key, value):
        raise AttributeError("an Either is frozen")

    def choose(self, adapter) -> Signal:
        """The first option ``adapter`` can give (None, or none can: the first, whose reason a refusal then names)."""
        if adapter is not None:
            for option in self.options:
                if not adapter.missing_signals((option,)):
                    return option
        return self.options[0]

    def __eq__(self, other) -> bool:
        return isinstance(other, Either) and self.options == other.options

    def __hash__(self) -> int:
        return hash(self.options)

    def __repr__(self) -> str:
        return " or ".join(map(repr, self.options))


def requests_of(sieve, adapter=None) -> tuple[Signal, ...]:
    """The sieve's requests, each once, an :class:`Either` resolved to the first option ``adapter`` can give; each
    name must be one of those its class declares in ``signals``."""
    asked = tuple(sieve.requests())
    names = {option.name for r in asked for option in (r.options if isinstance(r, Either) else (as_signal(r),))}
    undeclared = sorted(names - set(sieve.signals))
    if undeclared:
        raise ValueError(
            f"{type(sieve).__name__} asks for {', '.join(undeclared)} but does not declare it in its class "
            f"attribute signals = {tuple(sieve.signals)!r}"
        )
    return tuple(dict.fromkeys(r.choose(adapter) if isinstance(r, Either) else as_signal(r) for r in asked))


# computations shared by the adapters


def attention_received(query: torch.Tensor, key: torch.Tensor, scale: float, mask: torch.Tensor | None = None,
                       chunk_elements: int = 1 << 24) -> torch.Tensor:
    """(heads, S) mean over the S query rows of ``softmax(q k^T * scale + mask)``: the attention each token
    receives. ``query``/``key``: (heads, S, d); ``mask``: None, or (S, S) / (heads, S, S), boolean (True:
    attend) or additive. Rows are computed in chunks of queries, so heads x S x S is never held."""
    heads, length, _ = query.shape
    step = max(1, chunk_elements // max(1, heads * length))
    received = query.new_zeros(heads, length, dtype=torch.float32)
    key_t = key.float().transpose(1, 2)
    for start in range(0, length, step):
        logits = (query[:, start : start + step].float() @ key_t) * scale
        if mask is not None:
            logits = _masked(logits, mask[..., start : start + step, :])
        received += logits.softmax(dim=-1).sum(dim=1)
    return received / length


def attention_row(query: torch.Tensor, key: torch.Tensor, scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(heads, S) softmax attention of one query row: ``query`` (heads, 1, d), ``key`` (heads, S, d);
    ``mask`` as for :func:`attention_received`, its first row used."""
    logits = (query.float() @ key.float().transpose(1, 2)) * scale
    if mask is not None:
        logits = _masked(logits, mask[..., :1, :])
    return logits.softmax(dim=-1).squeeze(1)


def _masked(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return logits.masked_fill(~mask, float("-inf"))
    return logits + mask.float()


def instruction_positions(real: torch.Tensor, placeholders: torch.Tensor, image_end: int, prompt_end: int) -> torch.Tensor:
    """Positions in one row of the instruction that conditions an image (the ``text_embeddings`` rule).

    The instruction is the prompt's tokens after the image: every real (unmasked) token of the row after
    the image's last placeholder up to the prompt's last token (``prompt_end``, inclusive), that is no
    image placeholder (of any image). If there is none (the image ends the prompt), it is every real
    non-placeholder token of the prompt. ``real``/``placeholders``: (length,) booleans of the row.
    """
    index = torch.arange(len(real), device=real.device)
    text = real.bool() & ~placeholders & (index <= prompt_end)
    after = text & (index > image_end)
    chosen = after if bool(after.any()) else text
    return chosen.nonzero().squeeze(1)
