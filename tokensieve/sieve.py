"""The Sieve interface: one method maps one image's visual tokens to a Selection."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields, replace
from typing import ClassVar

from ._lazy import torch
from .budget import Budget, as_budget, score_mass, share_total
from .selection import split_budget, top_k_in_order
from .signals import Signal, as_signal

#: Signals a sieve may ask for; an adapter computes only those asked for.
SIGNALS = {
    "cls_attention": "(heads, N) softmax attention of the vision [CLS] query to each patch, at the feature layer; "
    "with layers=(...), (len(layers), heads, N)",
    "vision_attention": "(heads, N) attention at vision layer `layer` (default: the feature layer): the [CLS] row "
    "(queries='cls') or the mean over every query row, the attention each token receives (queries='mean')",
    "text_embeddings": "(T, d_llm) LLM input embeddings of the prompt's instruction tokens for this image (the tokens "
    "after the image up to the prompt's end, see signals.instruction_positions)",
    "vision_features": "(N, d_vision) features of the vision feature layer, before the projector; with missing='zeros', "
    "zero rows at tokens that have none (LLaVA-NeXT's newline tokens), which refuse the default missing='refuse'",
    "vision_tower": "(in_vision only) the vision tower's layers, to merge tokens between them (tokensieve/engine/vision_stage.py)",
    "vision_keys": "(heads, N, d_head) key vectors of the feature layer's attention, [CLS] excluded; missing='zeros' as "
    "for vision_features",
    "project": "callable mapping (M, d_vision) vision features to (M, d_llm) LLM input embeddings",
    "llm_attention": "(heads, N) softmax attention to each image token, in LLM layer K-1 or as layer K computes it on its "
    "input (in_llm only, see Sieve.llm_attention_at), of the prompt's last token (queries='last'), or averaged over the "
    "rows of the image's instruction tokens (queries='instruction') or of its own tokens (queries='image'); with "
    "per_query=True, (heads, Q, N): each of those Q rows apart; with debiased=True, each weight divided by the scaled dot "
    "product of all-ones q and k rotated at the query's and the token's positions (SparseVLM+'s positional-bias correction)",
    "llm_input": "(in_llm only) the decoder-input embeddings (what the decoder received, after the pre-LLM stage): (N, d_llm) "
    "of the image's tokens still there (tokens='image'; a merged token: its slot's token's), (N0, d_llm) of every token "
    "it had at the decoder input (tokens='whole_image', in sequence order), or (T, d_llm) of its "
    "instruction tokens (tokens='instruction': the rows of llm_attention(queries='instruction'), in order)",
    "llm_transition": "(N,) token transition variation (TransPrune) summed over the attention and MLP sublayers of LLM "
    "layers start..K-1 (in_llm only): each sublayer adds |y|/|x| times the softmax over the row's tokens of 1 - cos(x, y), "
    "x its normalised input and y its output before the residual add",
}
#: where a sieve acts: on a video's frames before the vision tower (docs/video.md), between vision-tower layers, on
#: the image tokens before the LLM, or between LLM layers ``layer - 1`` and ``layer``; a chain runs them in this order
STAGES = ("frames", "in_vision", "pre_llm", "in_llm")


@dataclass
class VisualTokens:
    """What a sieve sees of one image.

    ``features`` are the projected tokens as they enter the LLM, in raster order over ``grid``;
    ``signals`` holds exactly the signals the sieve requested (see :data:`SIGNALS`), keyed by
    :class:`~tokensieve.signals.Signal`: ``tokens[Signal("vision_attention", layer=9)]``, or
    ``tokens["cls_attention"]`` for a signal with its default parameters. An image made of
    several 2D pieces (LLaVA-NeXT: a base view, a high-res grid and a column of row-end newline
    tokens) has ``grid == (1, N)`` and lists the pieces in ``blocks``; methods that need 2D
    structure read :meth:`layout`. A video is such an image whose pieces are its frames (``frames``;
    docs/video.md); video methods read :meth:`video`.
    """

    features: torch.Tensor
    grid: tuple[int, int]
    signals: dict = field(default_factory=dict)
    blocks: tuple[torch.Tensor, ...] = ()
    #: in-LLM stages: how many tokens the image had when the method's first stage began (a multi-stage
    #: method's budget is over that count); None before the LLM, where it is ``len(features)``
    entered: int | None = None
    #: the prompt (batch row) the image belongs to, for a budget over a prompt's images (``Budget(total=...)``)
    prompt: int | None = None
    #: a video: its (t, h, w) grid (t frames, each an h×w raster; for Qwen2-VL a frame is a temporal patch pair), with
    #: ``grid == (1, t*h*w)`` and one block per frame, so image methods treat it as t pieces (a per-frame budget is
    #: ``per_crop=True``); None for an image. ``timestamps``: each frame's start in seconds, where the model has them
    frames: tuple[int, int, int] | None = None
    timestamps: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.signals = {as_signal(request): value for request, value in self.signals.items()}

    def __len__(self) -> int:
        return self.features.shape[0]

    def layout(self) -> tuple[torch.Tensor, ...]:
        """The image's 2D pieces as maps of token indices (each in raster order, together covering
        every token once): ``blocks``, or the single map of ``grid``."""
        if self.blocks:
            return self.blocks
        h, w = self.grid
        return (torch.arange(h * w).view(h, w),)

    def video(self, method: str) -> tuple[int, int, int]:
        """The (t, h, w) grid of a video, for a method that acts on videos only (``method`` names it in the refusal)."""
        if self.frames is None:
            raise ValueError(f"{method} acts on videos (frames over time), and this input is a still image: use an image "
                             f"method for images (see `tokensieve methods`), or pass the video as pixel_values_videos")
        return self.frames

    def __getitem__(self, signal: str | Signal):
        return self.signals[as_signal(signal)]

    def __contains__(self, signal: str | Signal) -> bool:
        """Whether the signal was given (of an :class:`~tokensieve.signals.Either` request, the option chosen)."""
        return as_signal(signal) in self.signals


@dataclass
class Frames:
    """What a ``frames`` sieve sees of one video before the vision tower: its (t, h, w) grid of LLM tokens (t
    frames; for Qwen2-VL a frame is a temporal patch pair), so that it picks frames by count and place."""

    grid: tuple[int, int, int]

    def __len__(self) -> int:
        return self.grid[0]


@dataclass
class Selection:
    """Kept token indices (ascending, into ``range(N)``) and, for merging methods, what replaces the kept
    tokens' own features: either the ``features`` themselves (one row per kept index), or a merge map the
    engine applies. ``assignment`` (N,) gives every token the kept token it went into (an index into
    ``kept``; -1: dropped without merging), each kept token in its own group; with no ``features`` the
    engine gives each kept token the mean of its group, weighted by ``weights`` (N,) if given, in every
    per-token tensor it carries, and records the group sizes (``StageRecord.sizes``)."""

    kept: torch.Tensor
    features: torch.Tensor | None = None
    assignment: torch.Tensor | None = None
    weights: torch.Tensor | None = None

    @classmethod
    def every(cls, tokens: VisualTokens) -> Selection:
        """Every token kept, as it is: what a method returns when its budget covers the image, so that keeping
        every token is the unmodified model bit for bit."""
        return cls(torch.arange(len(tokens), device=tokens.features.device))

    def sizes(self) -> torch.Tensor | None:
        """Tokens in each kept token's group (None without a merge map)."""
        if self.assignment is None:
            return None
        grouped = self.assignment[self.assignment >= 0]
        return torch.bincount(grouped, minlength=len(self.kept))

    def merged(self, values: torch.Tensor) -> torch.Tensor | None:
        """What replaces the kept tokens' rows of ``values`` (N, d): ``features``, or the group means the merge
        map gives (None: the kept tokens keep their own)."""
        if self.features is not None:
            return self.features
        return self.group_means(values)

    def group_means(self, values: torch.Tensor) -> torch.Tensor | None:
        """Each kept token's group mean of ``values`` (N, d) under the merge map (None: no merge map). The engine
        applies it to every per-token tensor it carries besides the features (e.g. Qwen3-VL's DeepStack rows)."""
        if self.assignment is None:
            return None
        members = self.assignment >= 0
        weights = self.weights if self.weights is not None else torch.ones(len(values), device=values.device)
        weights = weights.float() * members
        groups = self.assignment.clamp(min=0)
        summed = torch.zeros(len(self.kept), values.shape[-1], device=values.device).index_add_(
            0, groups, values.float() * weights[:, None])
        totals = torch.zeros(len(self.kept), device=values.device).index_add_(0, groups, weights)
        return (summed / totals[:, None]).to(values.dtype)


@dataclass(frozen=True)
class DecodeRule:
    """A method's policy at decode steps (docs/engine.md, tokensieve/engine/decode_stage.py). ``"last_stage"``
    (MustDrop's decoding stage): after a prefill, the layers from its first stage's ``layer - 1`` up to its last
    stage keep in their KV cache only the image tokens its last stage kept, so every later token attends those.
    ``"per_step"`` (DyCoke's): each token after the prompt attends, from decoder ``layer`` on, to the image tokens
    ``Sieve.decode_step`` picks from its attention in layer ``layer - 1``; the cache keeps every token."""

    kind: str
    layer: int | None = None


@dataclass
class Sieve:
    """Base class of every method: a dataclass whose fields are the method's arguments.

    A method is ``@register @dataclass class Name(Sieve)`` with class attributes ``name``, ``paper``,
    ``stage`` and ``signals``, its arguments as fields (``keep`` first, with the method's default
    budget), and :meth:`select` (or, through :class:`ScoringSieve`, only :meth:`ScoringSieve.score`).
    Its repr, :meth:`defaults` and the registry's listing come from the fields; checks of its own
    arguments go in ``__post_init__`` after ``super().__post_init__()``. ``signals`` names the signals
    it may need; :meth:`requests` asks for them with parameters (tokensieve/signals.py). A sieve is pure tensor code:
    it never sees a model class. An ``in_llm`` sieve also has a ``layer`` field: it sees the image
    tokens' hidden states at the input of that decoder layer, and the layers from it on keep only
    what it selects (a multi-stage method returns its stages from :meth:`schedule`). Its
    ``llm_attention`` is the attention inside layer ``layer - 1`` (``llm_attention_at = "previous"``,
    FastV) or the one layer ``layer`` computes on its input (``"input"``, PyramidDrop).
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    stage: ClassVar[str] = "pre_llm"
    signals: ClassVar[tuple[str, ...]] = ()
    llm_attention_at: ClassVar[str] = "previous"
    #: an in_llm sieve that may keep no token of an image (ToDRE's second stage drops all of them at once); the
    #: image's later stages then have nothing to select
    may_keep_none: ClassVar[bool] = False
    #: an in_llm sieve whose dropped tokens leave the hidden-state stream but stay keys and values of every later
    #: layer, computed from their hidden states at its layer (skip_visual): nothing updates them any more
    freezes: ClassVar[bool] = False
    #: an in_llm sieve that may bring back tokens its method's earlier stages dropped (LVLM_CSP's scattering): it
    #: sees every token the image had when its method's first stage began (``entered`` of them, in sequence order),
    #: a dropped one with its hidden state at the input of the stage that dropped it, and its kept indices index
    #: that set; kept tokens return to their own positions. It cannot ask for ``llm_attention`` or ``llm_transition``
    restores: ClassVar[bool] = False
    #: a method that acts on videos only (frames over time: evs, vidcom2): refused on images and on families that take
    #: no video (docs/video.md)
    needs_video: ClassVar[bool] = False

    #: the adaptive budgets (``ts.Adaptive``) the method honours: "mass" (it ranks by score) and/or
    #: "coverage"; a budget's ``per_crop=True`` needs ``crop_split``. Both count only where declared in the
    #: class that defines ``select`` or below it: a subclass that overrides ``select`` declares them again
    adaptive_rules: ClassVar[tuple[str, ...]] = ()
    crop_split: ClassVar[bool] = False

    keep: int | float = 64

    def __post_init__(self) -> None:
        #: ``keep=0`` for a sieve that may keep no token (``may_keep_none``): it keeps none, and its budget goes unused
        self.keeps_none = self.may_keep_none and self.keep == 0 and not isinstance(self.keep, bool)
        self.budget = as_budget(1.0 if self.keeps_none else self.keep)
        plain = type(self.budget) is Budget and not self.budget.per_crop and self.budget.total is None
        if plain and not self.keeps_none:
            self.keep = self.budget.value  # a numpy scalar or 0-d tensor becomes the number it holds
        elif not plain:
            self.keep = self.budget  # an adaptive or per-crop budget stays the object (its repr spells it)
        check_budget(self)

    def select(self, tokens: VisualTokens) -> Selection:
        raise NotImplementedError

    def select_frames(self, frames: Frames) -> torch.Tensor:
        """A ``frames`` sieve: the frames of one video to run the vision tower on, ascending indices into
        ``range(len(frames))`` (at least one)."""
        raise NotImplementedError

    def select_all(self, images: list[VisualTokens]) -> list[Selection]:
        """The selections of every image a stage sees in one forward: :meth:`select` on each (a method may batch
        them, as :class:`ScoringSieve` does); with a total budget, each image at its share of its prompt's."""
        if self.budget.total is None:
            return [self.select(tokens) for tokens in images]
        counts = total_counts(self.budget.total, images, [float(len(tokens)) for tokens in images])
        # each image's share keeps the budget's split over its crops
        return [replace(self, keep=Budget(k, per_crop=True) if self.budget.per_crop else k).select(tokens)
                for tokens, k in zip(images, counts)]

    def requests(self) -> tuple[Signal | str, ...]:
        """The signals this instance asks for, with their parameters (default: each name in ``signals`` with
        its default parameters). Override to ask with parameters that depend on the fields, e.g.
        ``Signal("vision_attention", layer=self.object_layer)``; every name must be in ``signals``."""
        return self.signals

    def schedule(self, n_layers: int) -> tuple[Sieve, ...]:
        """In-LLM methods: the stages this method runs on a decoder of ``n_layers`` layers, each a sieve with its
        ``layer``: the method itself (one stage) or several at increasing layers (PyramidDrop)."""
        return (self,)

    def decode_rule(self, n_layers: int) -> DecodeRule | None:
        """What the tokens after the prompt (decode steps, and every later token) attend to of the image tokens, where
        the method acts there too (tokensieve/engine/decode_stage.py); None: what the prefill's stages left them."""
        return None

    def decode_step(self, now: torch.Tensor, before: torch.Tensor | None, total: int) -> torch.Tensor | None:
        """A ``DecodeRule("per_step")`` method: the image tokens one decode token attends to from the rule's layer on,
        ascending indices, given its head-mean attention to the image's N tokens in the layer before (``now``, (N,))
        and the previous decode token's (``before``; None for the first after the prompt); ``total``: the image's tokens
        before any stage (a budget that covers them turns the rule off). None: every token."""
        raise NotImplementedError

    def defaults(self) -> dict:
        """The arguments of this instance (its fields), for display and for the benchmark log."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class ScoringSieve(Sieve):
    """A sieve that scores every token and keeps the top ``keep`` in raster order.

    It takes every budget: a count or ratio, an adaptive one (``ts.Adaptive(mass=0.9)``: the fewest top
    tokens holding that share of the score mass, see :class:`~tokensieve.budget.Adaptive`), and
    ``per_crop=True``, which shares the count among the image's 2D pieces by size (``split_budget``) and
    keeps each piece's own top tokens."""

    adaptive_rules = ("mass",)
    crop_split = True

    def score(self, tokens: VisualTokens) -> torch.Tensor:
        """One score per token, shape (N,); higher is kept first."""
        raise NotImplementedError

    def select(self, tokens: VisualTokens) -> Selection:
        scores = self.score(tokens)
        k = self.budget.count(scores)
        layout = tokens.layout() if self.budget.per_crop and k < len(tokens) else ()
        if len(layout) < 2:
            return Selection(top_k_in_order(scores, k))
        kept = []
        for block, share in zip(layout, split_budget([block.numel() for block in layout], k)):
            if share:
                index = block.flatten().to(scores.device)
                kept.append(index[top_k_in_order(scores[index], share)])
        return Selection(torch.cat(kept).sort().values)

    def select_all(self, images: list[VisualTokens]) -> list[Selection]:
        """Each image scored on its own, then one top-k for each set of images of equal size and count (a batch
        of equal images: one sort instead of one per image). Adaptive and per-crop budgets, and subclasses with
        their own ``select``, select image by image."""
        # a subclass's own select, or one set on the instance (a wrapper that records), selects image by image
        own_select = getattr(self.select, "__func__", None) is not ScoringSieve.select
        if own_select or self.budget.adaptive is not None or self.budget.per_crop:
            return super().select_all(images)
        scores = [self.score(tokens) for tokens in images]
        if self.budget.total is not None:  # shared by score mass
            counts = total_counts(self.budget.total, images, [score_mass(image_scores) for image_scores in scores])
        else:
            counts = [self.budget.resolve(len(image_scores)) for image_scores in scores]
        kept: list[torch.Tensor | None] = [None] * len(images)
        alike: dict[tuple, list[int]] = {}
        for index, (image_scores, k) in enumerate(zip(scores, counts)):
            key = (len(image_scores), k, image_scores.device)
            alike.setdefault(key, []).append(index)
        for (_, k, _), members in alike.items():
            for index, picked in zip(members, top_k_in_order(torch.stack([scores[i] for i in members]), k)):
                kept[index] = picked
        return [Selection(picked) for picked in kept]


def total_counts(total: int, images: list[VisualTokens], weights: list[float]) -> list[int]:
    """Each image's count under a ``total`` budget per prompt: the prompt's images (``VisualTokens.prompt``; None:
    each image its own prompt) share it by ``weights`` (``budget.share_total``)."""
    counts = [0] * len(images)
    prompts: dict = {}
    for index, tokens in enumerate(images):
        prompts.setdefault(tokens.prompt if tokens.prompt is not None else ("alone", index), []).append(index)
    for members in prompts.values():
        shares = share_total(total, [weights[i] for i in members], [len(images[i]) for i in members])
        for i, share in zip(members, shares):
            counts[i] = share
    return counts


def check_budget(sieve: Sieve) -> None:
    """Refuse, when a method is built, a budget it cannot honour: an adaptive rule it does not declare
    (``adaptive_rules``), or ``per_crop=True`` without ``crop_split``."""
    name, budget = getattr(sieve, "name", type(sieve).__name__), sieve.budget
    rules = adaptive_rules_of(type(sieve))
    if budget.adaptive is not None and budget.adaptive not in rules:
        if rules:
            fix = f"{name} takes " + " or ".join(f"Adaptive({rule}=...)" for rule in rules)
        elif isinstance(sieve, ScoringSieve):
            fix = (f"{name} overrides ScoringSieve.select without declaring adaptive_rules; pass a count (keep=64) "
                   f"or a ratio (keep=0.25)")
        else:
            fix = (f"{name} does not decide its count by one ranking of the image's tokens (docs/usage.md, Adaptive "
                   f"budgets), so no threshold can; pass a count (keep=64) or a ratio (keep=0.25), or use a method "
                   f"that takes it ({adaptive_methods(budget.adaptive)})")
        raise ValueError(f"{name} cannot take an adaptive budget keep={budget!r}: {fix}")
    if budget.total is not None and sieve.stage != "pre_llm":
        raise ValueError(f"{name} cannot take a total budget per prompt (keep={budget}): only pre-LLM methods share one "
                         f"among a prompt's images; pass a count per image (keep=64) or a ratio (keep=0.25)")
    if budget.per_crop and not _declared(type(sieve), "crop_split", False):
        raise ValueError(f"{name} cannot split its budget per crop (keep={budget!r}): only scoring and grid methods "
                         f"do; pass per_crop=False, one budget over the whole image")


def adaptive_rules_of(cls: type) -> tuple[str, ...]:
    """The adaptive rules a method class honours: its ``adaptive_rules``, counted as :data:`Sieve.adaptive_rules` says."""
    return _declared(cls, "adaptive_rules", ())


def adaptive_methods(rule: str) -> str:
    """The registered methods that take the adaptive ``rule`` ("mass" or "coverage"), comma-separated."""
    from .registry import _METHODS  # the registry imports this module

    return ", ".join(name for name, cls in sorted(_METHODS.items()) if rule in adaptive_rules_of(cls))


def _declared(cls: type, attribute: str, default):
    """``cls``'s ``attribute`` where a class at or below the one that defines ``select`` declares it, else ``default``."""
    for klass in cls.__mro__:
        if attribute in vars(klass):
            return vars(klass)[attribute]
        if "select" in vars(klass):
            return default
    return default


def check_layers(layers, example: str) -> tuple[int, ...] | None:
    """A multi-stage in-LLM method's ``layers`` as a tuple (None stays None: placed by the decoder's depth); refuse
    anything but strictly increasing ints >= 1, naming ``example`` (the paper's layers, e.g. ``"(8, 16, 24)"``)."""
    if layers is None:
        return None
    values = tuple(layers) if isinstance(layers, (list, tuple)) else (layers,)
    if not values or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in values) or list(values) != sorted(set(values)):
        raise ValueError(f"layers={layers!r}: pass the decoder layers to prune before, strictly increasing ints >= 1 "
                         f"({example}), or None to place them by the decoder's depth")
    return values


def check_fraction(name: str, value, meaning: str) -> None:
    """Refuse an argument that must be a number in [0, 1] (a bool is not one): ``{name} must be {meaning}, ...``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be {meaning}, in [0, 1], not {value!r}")


@dataclass
class GridSieve(Sieve):
    """A sieve that replaces each 2D piece of the image by a smaller grid of new tokens (pooling, a low-pass
    filter): the budget is shared among the pieces in proportion to their sizes (``VisualTokens.layout``),
    and each new token stands at the position of one token of its piece (so a budget's ``per_crop=True``
    changes nothing here)."""

    crop_split = True

    def resample(self, features: torch.Tensor, grid: tuple[int, int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One h×w piece (its features in raster order) as at most ``k`` tokens: the raster index within the
        piece where each stands, and its features."""
        raise NotImplementedError

    def select(self, tokens: VisualTokens) -> Selection:
        k = self.budget.resolve(len(tokens))
        device = tokens.features.device
        if k >= len(tokens):
            return Selection.every(tokens)
        layout = tokens.layout()
        kept, features = [], []
        for block, share in zip(layout, split_budget([block.numel() for block in layout], k)):
            if share:
                index = block.flatten().to(device)
                where, values = self.resample(tokens.features[index], tuple(block.shape), share)
                kept.append(index[where.to(device)])
                features.append(values)
        kept = torch.cat(kept)
        order = kept.argsort()
        return Selection(kept[order], torch.cat(features)[order].to(tokens.features.dtype))


@dataclass
class VideoSieve(Sieve):
    """A method for videos only (``needs_video``; a still image is refused by :meth:`VisualTokens.video`) with one
    count per video: :meth:`select_video` sees the video's tokens (``tokens.frames`` is its (t, h, w) grid) and the
    count ``k`` to keep, below the video's token count (a budget that covers them keeps every token)."""

    needs_video = True

    def select(self, tokens: VisualTokens) -> Selection:
        tokens.video(self.name)
        k = self.budget.resolve(len(tokens))
        return Selection.every(tokens) if k >= len(tokens) else self.select_video(tokens, k)

    def select_video(self, tokens: VisualTokens, k: int) -> Selection:
        raise NotImplementedError


def timed_select(sieve: Sieve, tokens: VisualTokens) -> tuple[Selection, float]:
    """``sieve.select(tokens)``, checked and timed: :func:`timed_select_all` of one image."""
    return timed_select_all(sieve, [tokens])[0]


def timed_select_all(sieve: Sieve, images: list[VisualTokens]) -> list[tuple[Selection, float]]:
    """``sieve.select_all(images)``: every image of one stage of a forward, checked (kept indices ascending and
    in range, merge maps that fit) with one read back to the host for all of them, and timed together (GPU
    synchronised; each image is given an equal share of the time)."""
    _synchronize(images[0].features)
    start = time.perf_counter()
    selections = sieve.select_all(images)
    _synchronize(images[0].features)
    seconds = (time.perf_counter() - start) / len(images)
    sizes = [len(tokens) for tokens in images]
    for selection, n in zip(selections, sizes):
        if selection.kept.ndim != 1 or (len(selection.kept) == 0 and not sieve.may_keep_none):
            raise RuntimeError(f"{sieve.name} returned kept indices outside 0..{n - 1}")
    # every check of every image in one read-back: each host read stalls a GPU
    device = images[0].features.device  # stacked where the images are: one copy to the host, not one per image
    flags = torch.stack([_index_flags(s.kept, n).to(device) for s, n in zip(selections, sizes)]).tolist()
    for selection, n, (outside, unsorted) in zip(selections, sizes, flags):
        kept = selection.kept
        if outside:
            raise RuntimeError(f"{sieve.name} returned kept indices outside 0..{n - 1}")
        if unsorted:
            raise RuntimeError(f"{sieve.name} returned kept indices that are not strictly ascending")
        if selection.features is not None and selection.features.shape[0] != len(kept):
            raise RuntimeError(f"{sieve.name} returned {selection.features.shape[0]} features for {len(kept)} kept tokens")
        if selection.assignment is not None:
            _check_merge_map(sieve, selection, n)
    return [(selection, seconds) for selection in selections]


def _index_flags(kept: torch.Tensor, n: int) -> torch.Tensor:
    """(outside 0..n-1, not strictly ascending) of kept indices, as a tensor (no read back)."""
    if len(kept) == 0:
        return torch.zeros(2, dtype=torch.bool, device=kept.device)
    return torch.stack([(kept.min() < 0) | (kept.max() >= n), (kept[1:] <= kept[:-1]).any()])


def _check_merge_map(sieve: Sieve, selection: Selection, n: int) -> None:
    """A merge map gives each of the ``n`` tokens a group among the kept ones (or -1), each kept token its own."""
    assignment, k = selection.assignment, len(selection.kept)
    if assignment.shape != (n,) or (selection.weights is not None and selection.weights.shape != (n,)):
        raise RuntimeError(f"{sieve.name} returned a merge map of shape {tuple(assignment.shape)} for {n} tokens: one entry per token")
    outside, misplaced = torch.stack([
        (assignment.min() < -1) | (assignment.max() >= k),
        (assignment[selection.kept] != torch.arange(k, device=assignment.device)).any(),
    ]).tolist()
    if outside:
        raise RuntimeError(f"{sieve.name} returned a merge map with groups outside -1..{k - 1}")
    if misplaced:
        raise RuntimeError(f"{sieve.name} returned a merge map that puts a kept token in another token's group")


def _synchronize(tensor: torch.Tensor) -> None:
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
