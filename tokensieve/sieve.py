"""The Sieve interface: one method maps one image's visual tokens to a Selection."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

import time

import torch

from .budget import Budget
from .selection import top_k_in_order

#: Signals a sieve may ask for; an adapter computes only those asked for.
SIGNALS = {
    "cls_attention": "(heads, N) softmax attention of the vision [CLS] query to each patch, at the feature layer",
    "vision_features": "(N, d_vision) features of the vision feature layer, before the projector",
    "vision_keys": "(heads, N, d_head) key vectors of the feature layer's attention, [CLS] excluded",
    "project": "callable mapping (M, d_vision) vision features to (M, d_llm) LLM input embeddings",
    "llm_attention": "(heads, N) softmax attention of the prompt's last token to each image token at LLM layer K-1 (in_llm only)",
}
#: where a sieve acts: on the image tokens before the LLM, or between LLM layers ``layer - 1`` and ``layer``
STAGES = ("pre_llm", "in_llm")


@dataclass
class VisualTokens:
    """What a sieve sees of one image.

    ``features`` are the projected tokens as they enter the LLM, in raster order over ``grid``;
    ``signals`` holds exactly the signals the sieve declared (see :data:`SIGNALS`). An image made of
    several 2D pieces (LLaVA-NeXT: a base view, a high-res grid and a column of row-end newline
    tokens) has ``grid == (1, N)`` and lists the pieces in ``blocks``; methods that need 2D
    structure read :meth:`layout`.
    """

    features: torch.Tensor
    grid: tuple[int, int]
    signals: dict = field(default_factory=dict)
    blocks: tuple[torch.Tensor, ...] = ()

    def __len__(self) -> int:
        return self.features.shape[0]

    def layout(self) -> tuple[torch.Tensor, ...]:
        """The image's 2D pieces as maps of token indices (each in raster order, together covering
        every token once): ``blocks``, or the single map of ``grid``."""
        if self.blocks:
            return self.blocks
        h, w = self.grid
        return (torch.arange(h * w).view(h, w),)

    def __getitem__(self, signal: str):
        return self.signals[signal]


@dataclass
class Selection:
    """Kept token indices (ascending, into ``range(N)``) and, for merging methods, the features that
    replace the kept tokens' own (one row per kept index)."""

    kept: torch.Tensor
    features: torch.Tensor | None = None


@dataclass
class Sieve:
    """Base class of every method: a dataclass whose fields are the method's arguments.

    A method is ``@register @dataclass class Name(Sieve)`` with class attributes ``name``, ``paper``,
    ``stage`` and ``signals``, its arguments as fields (``keep`` first, with the method's default
    budget), and :meth:`select` (or, through :class:`ScoringSieve`, only :meth:`ScoringSieve.score`).
    Its repr, :meth:`defaults` and the registry's listing come from the fields; checks of its own
    arguments go in ``__post_init__`` after ``super().__post_init__()``. A sieve is pure tensor code:
    it never sees a model class. An ``in_llm`` sieve also has a ``layer`` field: it sees the image
    tokens' hidden states at the input of that decoder layer, and the layers from it on keep only
    what it selects.
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    stage: ClassVar[str] = "pre_llm"
    signals: ClassVar[tuple[str, ...]] = ()

    keep: int | float = 64

    def __post_init__(self) -> None:
        self.budget = Budget(self.keep)
        self.keep = self.budget.value  # a numpy scalar or 0-d tensor becomes the number it holds

    def select(self, tokens: VisualTokens) -> Selection:
        raise NotImplementedError

    def defaults(self) -> dict:
        """The arguments of this instance (its fields), for display and for the benchmark log."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class ScoringSieve(Sieve):
    """A sieve that scores every token and keeps the top ``keep`` in raster order."""

    def score(self, tokens: VisualTokens) -> torch.Tensor:
        """One score per token, shape (N,); higher is kept first."""
        raise NotImplementedError

    def select(self, tokens: VisualTokens) -> Selection:
        k = self.budget.resolve(len(tokens))
        return Selection(top_k_in_order(self.score(tokens), k))


def timed_select(sieve: Sieve, tokens: VisualTokens) -> tuple[Selection, float]:
    """``sieve.select(tokens)``, checked (kept indices ascending and in range) and timed (GPU synchronised)."""
    _synchronize(tokens.features)
    start = time.perf_counter()
    selection = sieve.select(tokens)
    _synchronize(tokens.features)
    seconds = time.perf_counter() - start
    kept, n = selection.kept, len(tokens)
    if kept.ndim != 1 or len(kept) == 0:
        raise RuntimeError(f"{sieve.name} returned kept indices outside 0..{n - 1}")
    # both checks in one read-back: each host read stalls a GPU
    outside, unsorted = torch.stack([(kept.min() < 0) | (kept.max() >= n), (kept[1:] <= kept[:-1]).any()]).tolist()
    if outside:
        raise RuntimeError(f"{sieve.name} returned kept indices outside 0..{n - 1}")
    if unsorted:
        raise RuntimeError(f"{sieve.name} returned kept indices that are not strictly ascending")
    if selection.features is not None and selection.features.shape[0] != len(kept):
        raise RuntimeError(f"{sieve.name} returned {selection.features.shape[0]} features for {len(kept)} kept tokens")
    return selection, seconds


def _synchronize(tensor: torch.Tensor) -> None:
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
