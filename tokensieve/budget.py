"""How many visual tokens a sieve keeps: a count (``keep=64``), a ratio (``keep=0.25``), or an adaptive
budget (``keep=ts.Adaptive(mass=0.9)``) whose count each image's own scores decide.

On a command line (``ts.build``, ``tokensieve run --keep``, ``tokensieve bench --keep``) a budget is spelt
as in Python: ``64``, ``0.25``, ``adaptive(0.9)``, ``adaptive(mass=0.9,min=32,max=256)``,
``adaptive(coverage=0.95)``, ``budget(64,per_crop=True)`` (:func:`parse_keep`); ``str()`` of a budget gives
that spelling back.
"""

from __future__ import annotations

import ast
import re
import warnings
from dataclasses import dataclass

#: relative slack when a cumulative share is compared with its threshold: float32 rounding of the scores
#: must not make ``mass=0.5`` of ``[1, 1]`` need both tokens
TOLERANCE = 1e-6

_CALL = re.compile(r"^\s*(adaptive|budget)\s*\(.*\)\s*$", re.IGNORECASE | re.DOTALL)


def parse_keep(text: str | int | float):
    """A budget as written on a command line, read as Python reads the same literal: "64" -> 64 tokens,
    "0.25" and "1.0" -> ratios (a quarter, all of them), "1e2" -> the ratio 100.0, which is refused;
    "adaptive(0.9)", "adaptive(coverage=0.95,min=32)" -> :class:`Adaptive`, "budget(64,per_crop=True)" ->
    :class:`Budget` (the call's arguments are Python literals, as ``ts.Adaptive(...)`` takes them).

    So "0" and "-1" fail as counts (with the count's message) and "1.5" as a ratio, as ``keep=1.5`` does.
    """
    if not isinstance(text, str):
        return text
    if _CALL.match(text):
        return _parse_call(text)
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"a budget must be a token count (64), a ratio (0.25) or adaptive(0.9) (the fewest "
                         f"tokens holding 90% of the score mass), not {text!r}") from None


def _parse_call(text: str):
    """``"adaptive(0.9,min=32)"`` -> ``Adaptive(mass=0.9, min=32)``; every argument a Python literal."""
    try:
        call = ast.parse(text.strip(), mode="eval").body
        if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
            raise ValueError
        args = [ast.literal_eval(arg) for arg in call.args]
        kwargs = {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}
        if any(key is None for key in kwargs):
            raise ValueError
    except (SyntaxError, ValueError, TypeError):
        raise ValueError(f"{text!r}: write an adaptive budget as adaptive(0.9) or adaptive(mass=0.9,min=16,max=256), "
                         f"a per-crop one as budget(64,per_crop=True); every argument a number or True/False") from None
    kind = Adaptive if call.func.id.lower() == "adaptive" else Budget
    try:
        return kind(*args, **kwargs)
    except TypeError as err:  # an unknown keyword or too many arguments: say which ones there are
        names = "mass, coverage, min, max, per_crop" if kind is Adaptive else "value, per_crop"
        raise ValueError(f"{text!r}: {kind.__name__.lower()}() takes {names} ({err})") from None


def split_top_level(text: str) -> list[str]:
    """``text`` split at the commas outside brackets, each item stripped, empty ones left out:
    ``"64,adaptive(0.9,min=32),0.25"`` -> ``["64", "adaptive(0.9,min=32)", "0.25"]``, ``"0.5,layers=(8,16)"`` ->
    ``["0.5", "layers=(8,16)"]``: lists of budgets, and method specs' arguments."""
    items, depth, start = [], 0, 0
    for position, char in enumerate(text):
        depth += (char in "([{") - (char in ")]}")
        if char == "," and depth == 0:
            items.append(text[start:position])
            start = position + 1
    return [item.strip() for item in items + [text[start:]] if item.strip()]


def as_budget(keep) -> Budget | Adaptive:
    """``keep`` as a budget: a :class:`Budget` or :class:`Adaptive` as it is, a number as ``Budget(keep)``,
    and the text of an adaptive or per-crop spelling (``"adaptive(0.9)"``, as a spec's ``keep=adaptive(0.9)``
    arrives) as :func:`parse_keep` reads it. Any other text is refused as ``Budget("64")`` is."""
    if isinstance(keep, (Budget, Adaptive)):
        return keep
    if isinstance(keep, str) and _CALL.match(keep):
        return parse_keep(keep)
    return Budget(keep)


def plain_number(value):
    """``value`` as a Python int or float when it is a numpy scalar or a 0-d tensor (``numpy.int64(64)``,
    ``torch.tensor(0.25)``); anything else unchanged."""
    if not isinstance(value, (bool, int, float)) and getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return value.item()
    return value


class BudgetClampedWarning(UserWarning):
    """A count budget asked for more tokens than an image has; every token was kept."""


def _check_per_crop(per_crop) -> None:
    if not isinstance(per_crop, bool):
        raise TypeError(f"per_crop must be True (split the budget over an image's crops by their sizes) or "
                        f"False (one budget over the whole image), not {per_crop!r}")


@dataclass(frozen=True, repr=False)
class Budget:
    """A validated token budget.

    An ``int`` is a count of tokens per image; a ``float`` in (0, 1] is a fraction of each image's
    tokens (rounded, at least 1). A count above an image's token count is clamped to it with a
    :class:`BudgetClampedWarning`, because images of one batch or one benchmark can differ in size
    (anyres crops, dynamic resolution); every other bad value raises at construction, before any
    model is touched.

    ``per_crop=True`` (``keep=ts.Budget(64, per_crop=True)``): an image made of several 2D pieces
    (LLaVA-NeXT's base view, high-res grid and newline column, ``VisualTokens.layout()``) shares the count
    among its pieces in proportion to their sizes (``selection.split_budget``) and each piece keeps its own
    top tokens; the default is one budget over the whole image. Scoring methods (``ScoringSieve``) and the
    grid methods (which always split by piece) take it; the others refuse it.

    ``total=256`` (``keep=ts.Budget(total=256)``, spelt ``budget(total=256)``): a count over all the images of
    one prompt (a batch row) together, shared among them by :func:`share_total`: in proportion to each image's
    score mass for scoring methods (the mass ``Adaptive`` defines), to its token count for the others; every
    image keeps at least one token. A lone image keeps ``min(total, N)``. Pre-LLM methods only.
    """

    value: int | float | None = None
    per_crop: bool = False
    total: int | None = None

    #: which adaptive rule decides the count (None: the count is fixed by ``value``)
    adaptive = None

    def __post_init__(self) -> None:
        value = plain_number(self.value)
        object.__setattr__(self, "value", value)
        if self.total is not None or value is None:
            self._check_total()
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(
                f"keep must be an int (a token count, e.g. keep=64) or a float ratio in (0, 1] "
                f"(e.g. keep=0.25), or an adaptive budget (keep=ts.Adaptive(mass=0.9)), not {type(value).__name__} {value!r}"
            )
        if isinstance(value, int) and value < 1:
            raise ValueError(f"keep={value} keeps no token: pass a count of at least 1, e.g. keep=64")
        if isinstance(value, float) and not 0.0 < value <= 1.0:
            raise ValueError(
                f"keep={value} is not a ratio in (0, 1]: pass e.g. keep=0.25 for a quarter of the "
                f"tokens, or an int for a count"
            )
        _check_per_crop(self.per_crop)

    def _check_total(self) -> None:
        total = plain_number(self.total)
        object.__setattr__(self, "total", total)
        if self.value is not None:
            raise ValueError(f"Budget({self.value}, total={total}): pass a count per image or a total per prompt, not both")
        if isinstance(total, bool) or not isinstance(total, int) or total < 1:
            raise ValueError(f"Budget(total={total!r}): the tokens every image of a prompt keeps together, an int >= 1 "
                             f"(e.g. total=256); or pass keep=64 for a count per image")
        _check_per_crop(self.per_crop)

    def resolve(self, n_tokens: int) -> int:
        """The number of tokens to keep out of ``n_tokens`` (a total budget: of a prompt's only image)."""
        if self.total is not None:
            return min(self.total, n_tokens)
        if isinstance(self.value, float):
            return max(1, min(n_tokens, round(self.value * n_tokens)))
        if self.value > n_tokens:
            warnings.warn(
                f"keep={self.value} is more than the {n_tokens} visual tokens of this image: keeping "
                f"all {n_tokens}. Pass a smaller count or a ratio (e.g. keep=0.25) to reduce it.",
                BudgetClampedWarning,
                stacklevel=3,
            )
            return n_tokens
        return self.value

    def count(self, scores) -> int:
        """The number of tokens to keep of an image whose tokens score ``scores`` (N,): ``resolve(N)``."""
        return self.resolve(len(scores))

    def coverage_steps(self, n_tokens: int) -> tuple[int, int, None]:
        """A greedy coverage method's ``(at_least, k, fraction)`` (``selection.coverage_greedy``): ``k = resolve(N)``
        steps, no coverage threshold."""
        return 1, self.resolve(n_tokens), None

    def __repr__(self) -> str:
        shown = [f"total={self.total}"] if self.total is not None else [repr(self.value)]
        return f"Budget({', '.join(shown + (['per_crop=True'] if self.per_crop else []))})"

    def __str__(self) -> str:
        crop = ",per_crop=True" if self.per_crop else ""
        if self.total is not None:
            return f"budget(total={self.total}{crop})"
        return f"budget({self.value}{crop})" if self.per_crop else str(self.value)


def share_total(total: int, weights: list[float], sizes: list[int]) -> list[int]:
    """``total`` tokens shared among images of ``sizes`` tokens in proportion to their ``weights`` (all zero: to
    their sizes): each image first keeps one, the rest goes by largest remainder (ties to the earlier image),
    and what an image cannot hold goes to the others. Every image keeps at least one token, so a total below
    the number of images keeps one each."""
    if total >= sum(sizes):
        return list(sizes)
    shares = [1] * len(sizes)
    left = max(0, total - len(sizes))
    open_images = [i for i, size in enumerate(sizes) if size > 1]
    while left > 0 and open_images:
        weight = {i: max(float(weights[i]), 0.0) for i in open_images}
        if sum(weight.values()) <= 0:
            weight = {i: float(sizes[i]) for i in open_images}
        exact = {i: left * weight[i] / sum(weight.values()) for i in open_images}
        full = [i for i in open_images if exact[i] >= sizes[i] - shares[i]]
        if full:  # these fill up; share again what is left among the others
            for i in full:
                left -= sizes[i] - shares[i]
                shares[i] = sizes[i]
            open_images = [i for i in open_images if i not in full]
            continue
        given = {i: int(exact[i]) for i in open_images}
        by_remainder = sorted(open_images, key=lambda i: given[i] - exact[i])
        for i in by_remainder[: left - sum(given.values())]:
            given[i] += 1
        for i in open_images:
            shares[i] += given[i]
        left = 0
    return shares


@dataclass(frozen=True, repr=False)
class Adaptive:
    """An adaptive budget: per image, the fewest tokens that reach a threshold, between ``min`` and ``max``.

    - ``mass`` (methods that rank by one score: every ``ScoringSieve`` and those that declare it, docs/usage.md):
      the fewest top-scoring tokens whose scores sum to at least
      ``mass`` of the image's total score (its "score mass"). Mass is defined on non-negative scores: scores
      that are all >= 0 (attention, the usual case) count as they are, so ``mass=0.9`` of a [CLS] attention row
      is the patches holding 90% of that attention; if any score is negative, every score is shifted by the
      lowest one first (``s - min(s)``: the lowest token holds no mass, and the count does not depend on
      the scores' offset or scale). Non-finite scores (-inf) hold no mass. An image whose total mass is 0
      (all scores equal after the shift) keeps ``min``.
    - ``coverage`` (greedy coverage methods: ``mmtok``, ``catp``, ``scope``): the fewest greedily chosen tokens
      whose coverage ``f(S)`` reaches ``coverage`` of the coverage of every token (``selection.coverage_greedy``).

    Either threshold is in (0, 1]; ``1.0`` keeps every token (also those with zero score), as ``keep=1.0``.
    The count is then clamped to ``[min, max]`` (``max=None``: no cap) and to the image's token count, so
    an image smaller than ``min`` keeps all its tokens, without the warning a count budget gives. A
    positional threshold is ``mass``: ``Adaptive(0.9)``. ``per_crop`` as :class:`Budget`'s: the count is
    decided over the whole image, then shared among its pieces by size. Comparisons allow a relative slack
    of :data:`TOLERANCE` for float rounding. Methods that are neither a ``ScoringSieve`` nor declare the rule
    (``Sieve.adaptive_rules``) refuse an adaptive budget when they are built.
    """

    mass: float | None = None
    coverage: float | None = None
    min: int = 16
    max: int | None = None
    per_crop: bool = False

    value = None  # no fixed count or ratio
    total = None  # a count per image, not per prompt

    def __post_init__(self) -> None:
        for name in ("mass", "coverage", "min", "max"):
            object.__setattr__(self, name, plain_number(getattr(self, name)))
        given = [name for name in ("mass", "coverage") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "an adaptive budget takes one threshold: mass=0.9 (the fewest top-scoring tokens holding 90% of "
                "the score mass; methods that rank by a score) or coverage=0.9 (coverage methods: mmtok, catp, scope), not "
                + ("both" if given else "none")
            )
        threshold = getattr(self, given[0])
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
            raise ValueError(f"Adaptive({given[0]}={threshold!r}): the threshold is a share in (0, 1], e.g. "
                             f"{given[0]}=0.9 (1.0 keeps every token)")
        object.__setattr__(self, given[0], float(threshold))
        if isinstance(self.min, bool) or not isinstance(self.min, int) or self.min < 1:
            raise ValueError(f"Adaptive(min={self.min!r}): the fewest tokens an image keeps, an int >= 1 (default 16)")
        if self.max is not None and (isinstance(self.max, bool) or not isinstance(self.max, int) or self.max < self.min):
            raise ValueError(f"Adaptive(max={self.max!r}): the most tokens an image keeps, an int >= min={self.min}, "
                             f"or None for no cap")
        _check_per_crop(self.per_crop)

    @property
    def adaptive(self) -> str:
        """The rule that decides the count: ``"mass"`` or ``"coverage"``."""
        return "mass" if self.mass is not None else "coverage"

    @property
    def threshold(self) -> float:
        return self.mass if self.mass is not None else self.coverage

    def bounds(self, n_tokens: int) -> tuple[int, int]:
        """``(min, max)`` clamped to an image of ``n_tokens`` tokens."""
        low = min(self.min, n_tokens)
        return low, n_tokens if self.max is None else min(self.max, n_tokens)

    def clamp(self, count: int, n_tokens: int) -> int:
        low, high = self.bounds(n_tokens)
        return max(low, min(high, count))

    def resolve(self, n_tokens: int) -> int:
        raise TypeError(f"keep={self!r} is adaptive: its count depends on each image's scores, so a method must "
                        f"call budget.count(scores) (or declare adaptive_rules and handle it)")

    def count(self, scores) -> int:
        """The number of tokens to keep of an image whose tokens score ``scores`` (N,), by the mass rule:
        the fewest top tokens (ranked as ``selection.top_k_in_order`` ranks them) whose mass reaches
        ``mass`` of the total, clamped to ``[min, max]``. One read back to the host (the count)."""
        if self.mass is None:
            raise TypeError(f"keep={self!r} covers, it does not rank: coverage budgets are for coverage methods "
                            f"(mmtok, catp, scope); pass Adaptive(mass=...) to a scoring method")
        return self.clamp(mass_count(scores, self.mass), len(scores))

    def coverage_steps(self, n_tokens: int) -> tuple[int, int, float | None]:
        """A greedy coverage method's ``(at_least, at_most, fraction)`` (``selection.coverage_greedy``), by the
        coverage rule: between ``min`` and ``max`` steps, stopping at ``coverage`` of the coverage of every token;
        ``coverage=1.0`` gives no fraction, so it keeps every token (up to ``max``), as ``keep=1.0``."""
        if self.coverage is None:
            raise TypeError(f"keep={self!r} ranks, it does not cover: mass budgets are for methods that rank by a "
                            f"score; pass Adaptive(coverage=...) to a coverage method")
        low, high = self.bounds(n_tokens)
        return low, high, self.coverage if self.coverage < 1.0 else None

    def __repr__(self) -> str:
        shown = [f"{self.adaptive}={self.threshold}"]
        shown += [f"min={self.min}"] if self.min != 16 else []
        shown += [f"max={self.max}"] if self.max is not None else []
        shown += ["per_crop=True"] if self.per_crop else []
        return f"Adaptive({', '.join(shown)})"

    def __str__(self) -> str:
        # the command-line spelling, without spaces (it names a benchmark's configuration)
        return "adaptive(" + repr(self)[len("Adaptive("):-1].replace(" ", "") + ")"


def mass_count(scores, mass: float) -> int:
    """The fewest of ``scores``' top tokens (descending, ties to the lower index) whose score mass reaches
    ``mass`` of the total, on the mass :class:`Adaptive` defines (shifted by the lowest score if any is
    negative; non-finite scores hold none); all of them at ``mass >= 1``; at least 1."""
    import torch  # budget.py stays importable without torch (the command line checks budgets before loading it)

    n = len(scores)
    if mass >= 1.0 or n <= 1:
        return n
    weights = mass_weights(scores)
    order = torch.sort(scores.detach().flatten().float(), descending=True, stable=True).indices
    held = weights[order].cumsum(0)
    short = (held < (mass - TOLERANCE) * held[-1]).sum()  # top tokens that have not reached the threshold yet
    return min(n, int(short) + 1)


def mass_weights(scores):
    """(N,) what each score holds of an image's score mass, in float64: the scores as they are if none is
    negative, else shifted by the lowest (``s - min(s)``); non-finite scores hold none."""
    import torch

    values = scores.detach().flatten().double()
    finite = torch.isfinite(values)
    lowest = torch.where(finite, values, torch.inf).min().clamp(max=0)  # 0 unless a score is negative
    return torch.where(finite, values - lowest, 0.0)


def score_mass(scores) -> float:
    """An image's score mass (:func:`mass_weights` summed; read back to the host)."""
    return float(mass_weights(scores).sum())
