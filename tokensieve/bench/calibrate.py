"""`tokensieve calibrate`: VFlowOpt's offline Bayesian hyper-parameter search, on a user's samples.

VFlowOpt (Yang et al., ICCV 2025, arXiv 2508.05211) tunes its pruning per model with Bayesian optimisation
(sihany077/VFlowOpt, ``src/lmms_eval-0.2.4/lmms_eval/models/llava_ov_opt_all.py``; the stored version read is
from commit 7a26608, the project's method files cite 129eeef). What the code does:

- **Objective**: on up to 30 calibration prompts (``random.sample`` of the task's requests), the sum
  over prompts of the cosine similarity between the final-layer hidden state (after the last norm) of the
  prompt's last token in the stock model and in the pruned one (one prefill each, ``generate`` with
  ``max_new_tokens=1``, ``hidden_states[0][-1][-1][-1]``); a NaN similarity counts 0. It is maximised.
- **Search space**: ``r_v`` (the vision stage's keep ratio) in 0.25..0.375, ``r_1`` (the first in-LLM stage's
  ratio) in 0.2/0.375..1, ``t`` in 0..50, ``m`` in 3..24, ``alpha_v`` in -1..1.
- **Budget**: the last in-LLM stage's ratio is not searched but solved from the target layer-averaged share
  of visual tokens, ``28·T = 9·r_v + 9·r_v·r_1 + 10·r_v·r_1·r_2`` (the vision stage before layer 0, stages
  before layers 9 and 18 of the 28), ``r_2`` clipped to at most 1, so a point never exceeds the budget.
  ``TARGET_AVERAGE = 0.25`` in the file, with its bounds written for that target (``# NOTE to change``).
- **Search**: scikit-optimize ``Optimizer`` (a Gaussian process, Matern kernel, ``gp_hedge`` acquisition),
  ``random_state=42``, 27 random initial points, 300 calls; the best point is kept.

What :func:`calibrate` does, and every difference:

- Objective: the same cosine, read from ``output_hidden_states`` of one forward (the prefill ``generate``
  runs), averaged over the samples instead of summed (a constant factor: the same optimum, a readable
  number); a NaN counts 0, as in the code. The stock model's states are computed once, not at every call.
  The samples: the first ``samples`` prompts of the built-in QA suite's test split (its skills cycle, so
  any 7 in a row are balanced) or the inputs the caller passes, not a random draw of a benchmark's.
- Search space: only what tokensieve's ``vflowopt``/``vflowopt_llm`` use. ``m`` in 3..24 and ``ratios=(r_1,)``
  in 0.2/0.375..1, as the code; ``keep`` (``r_v``) in ``[T, min(1, 1.5·T)]``: the code's 0.25..0.375 at its
  T = 0.25, carried to other targets by this rule (ours: the code edits the bounds by hand; the shipped 10% and
  50% configs' ``r_v``, 0.1166 and 0.7233, lie in ``[0.1, 0.15]`` and ``[0.5, 0.75]``; below T no later stage
  could reach the target, and past about 1.55·T the last stage would have to keep nothing). ``t`` is not
  searched: ``vflowopt``'s ``relevance="received"`` takes every token as global (the code's ``t = 0``), so
  ``t`` changes nothing; ``alpha_v`` is not searched: ``vflowopt`` refuses any value but 0 (the entropy term
  needs pixels no signal gives; every shipped config has 0). ``method="vflowopt"`` alone searches ``m`` at
  ``keep = T`` (the layer-averaged share of a vision-only method is its keep).
- Budget: the same equation for any depth: the in-LLM stages sit where ``vflowopt_llm`` puts them
  (``layers=None``: ``floor(s·9/28)`` of the depth, the code's 9 and 18 of 28), and what is solved is
  ``vflowopt_llm``'s ``keep`` (its last stage's share of the tokens that reached its first stage, the
  code's ``r_1·r_2``), clipped to at most ``r_1`` (the code's ``r_2 <= 1``) and floored to 4 decimals.
  Parameters are rounded (4 decimals, ``m`` 3) before a call, so each record's spec is exactly what ran.
  The counts round to whole tokens per image, so the measured share (``measured`` in each record, read
  from ``run.stats``) may differ from the nominal one by about a token per stage.
- Search: optuna's ``GPSampler`` (a Gaussian process with a Matern-5/2 ARD kernel, log expected improvement),
  ``initial`` random points from its seeded ``RandomSampler``, then one GP proposal per call, default seed 42,
  27 initial points and 300 calls as the code. Why not scikit-optimize: it is barely maintained (rare
  releases; its 0.9 used ``np.int`` and failed on numpy >= 1.24 until a much later release); optuna is well
  kept, its GP sampler runs on torch (a tokensieve dependency) and scipy, and is deterministic with a seed. Its acquisition is logEI, not skopt's ``gp_hedge`` (a hedge of EI, PI and LCB).

Cost: one stock prefill per sample once, then one pruned prefill per sample per call, plus the sampler's
proposal (a GP fit and an acquisition search: a few CPU seconds at the first GP call on sieve-mini, growing
with the points; each record's ``seconds`` and ``cpu_seconds`` include it). ``output_hidden_states`` keeps every
layer's states of one prompt alive during a forward, as in the code. Measured: docs/usage.md.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import tokensieve as ts

from ..extras import require

CHAIN, VISION = "vflowopt+vflowopt_llm", "vflowopt"
METHODS = (CHAIN, VISION)
SEARCHED = {"vflowopt": ("keep", "m"), "vflowopt_llm": ("keep", "ratios")}
M_RANGE = (3.0, 24.0)  # the code's vit_m bounds
RATIO_RANGE = (0.2 / 0.375, 1.0)  # the code's ratio_1 bounds
KEEP_SPAN = 1.5  # r_v in [T, 1.5 T]: the code's 0.25..0.375 at T = 0.25
DEFAULTS = dict(samples=30, target=0.25, calls=300, initial=27, seed=42)  # the code's


@dataclass
class Trial:
    """One call of the search: the parameters it ran, the spec that runs them, the budget and the score."""

    call: int
    spec: str
    params: dict
    layer_average: float  # nominal layer-averaged share of each image's visual tokens
    measured: float  # the same share measured from run.stats (whole tokens per image)
    score: float  # mean cosine similarity of the last prompt token's final hidden state, pruned vs stock
    seconds: float  # wall time of the call, the sampler's proposal included
    cpu_seconds: float  # this process's CPU time in it (all threads): what a shared machine's load does not inflate


@dataclass
class Calibration:
    """The search's result: the best spec (``ts.build(result.spec)``), its parameters and score, and every call."""

    method: str
    target: float  # layer-averaged share of the visual tokens
    spec: str
    params: dict
    score: float
    layers: int
    stage_layers: tuple[int, ...]
    samples: int
    tokens: list[int]  # each sample image's visual token count
    calls: int
    initial: int
    seed: int
    sampler: str
    seconds: float
    trials: list[Trial] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def write(self, path: Path | str) -> Path:
        """Write the record as JSON; ``ts.build(path)`` and ``--method path`` read its spec back."""
        path = Path(path)
        scratch = path.with_name(path.name + ".tmp")
        scratch.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        scratch.replace(path)
        return path


def check_method(method: str) -> tuple[dict, dict]:
    """The fixed arguments of each part of ``method`` (``"vflowopt+vflowopt_llm"``, or with arguments the search
    keeps, e.g. ``"vflowopt:relevance=cls+vflowopt_llm:merge=tail"``)."""
    try:
        parts = ts.parse_spec(method)
    except ValueError as err:
        raise ValueError(f"method={method!r}: {err}") from None
    names = "+".join(name for name, _ in parts)
    if names not in METHODS:
        raise ValueError(f"calibrate searches VFlowOpt's parameters: method must be {CHAIN!r} or {VISION!r} "
                         f"(optionally with fixed arguments, e.g. 'vflowopt:relevance=cls+vflowopt_llm:merge=tail'), "
                         f"not {method!r}")
    fixed = {name: kwargs for name, kwargs in parts}
    for name, kwargs in fixed.items():
        searched = sorted(set(kwargs) & set(SEARCHED[name]))
        if searched:
            raise ValueError(f"method={method!r}: remove {name}'s {', '.join(searched)}: the search sets "
                             f"{' and '.join(SEARCHED[name])} of {name}")
    ts.build(method, keep=0.5)  # the fixed arguments are checked by the methods themselves
    return fixed.get("vflowopt", {}), fixed.get("vflowopt_llm", {})


def check_search(calls: int, initial: int, seed: int) -> None:
    for name, value in (("calls", calls), ("initial", initial)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, not {value!r}")
    if calls < initial:
        raise ValueError(f"calls={calls} is fewer than initial={initial}: the search spends its first {initial} calls "
                         f"on random points before the Gaussian process proposes any; pass calls >= initial "
                         f"(the code's: 300 calls, 27 initial)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be a whole number, not {seed!r}")


class TargetError(ValueError):
    """The target budget cannot be searched (the command line names --target)."""


def check_target(target: int | float, tokens: list[int] | None = None) -> float:
    """``target`` as a share of each image's visual tokens: a share in (0, 1), or a count below the images'
    token count (``tokens``: each sample image's; a count needs them all equal)."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target) or target <= 0:
        raise TargetError(f"target must be a layer-averaged budget: a share of each image's visual tokens in (0, 1) "
                          f"(0.25) or a count of them (64), not {target!r}")
    if isinstance(target, float):
        if target >= 1:
            raise TargetError(f"target={target!r} is not a share in (0, 1): 1.0 keeps every token, nothing to search; "
                              f"pass e.g. 0.25, or a count of tokens as a whole number")
        return target
    if tokens is None:
        return target  # a count: checked once the images' token counts are known
    if len(set(tokens)) != 1:
        raise TargetError(f"target={target} is a count, but the samples' images have {min(tokens)} to {max(tokens)} "
                          f"visual tokens: give the target as a share of each image's tokens (e.g. 0.25)")
    if target >= tokens[0]:
        raise TargetError(f"target={target} is not below the {tokens[0]} visual tokens of the samples' images: "
                          f"pass fewer (a count) or a share in (0, 1)")
    return target / tokens[0]


def segments(n_layers: int, stage_layers: tuple[int, ...]) -> list[int]:
    """Decoder layers that see each token count: before the first in-LLM stage, between stages, after the last."""
    bounds = (0, *stage_layers, n_layers)
    return [b - a for a, b in zip(bounds, bounds[1:])]


def layer_average(n_layers: int, stage_layers: tuple[int, ...], keep: float, ratio: float, final: float) -> float:
    """The share of an image's visual tokens averaged over the decoder's layers: ``keep`` (the vision stage's
    ratio) before the first in-LLM stage, ``keep·ratio`` until the second, ``keep·final`` after it (the code's
    ``(9 r_v + 9 r_v r_1 + 10 r_v r_1 r_2) / 28``)."""
    before, middle, after = segments(n_layers, stage_layers)
    return (before * keep + middle * keep * ratio + after * keep * final) / n_layers


def final_keep(target: float, n_layers: int, stage_layers: tuple[int, ...], keep: float, ratio: float) -> float:
    """``vflowopt_llm``'s ``keep`` that brings the layer average to ``target`` (the code's ``r_1·r_2`` from its
    ``ratio_list_3``), at most ``ratio`` (``r_2 <= 1``), floored to 4 decimals so the average stays <= target."""
    before, middle, after = segments(n_layers, stage_layers)
    final = (target * n_layers - before * keep - middle * keep * ratio) / (after * keep)
    final = min(ratio, math.floor(final * 1e4 + 1e-9) / 1e4)
    if final <= 0:  # cannot happen within the bounds: keep <= 1.5 T and the second stage past 9/28 of the depth
        raise ValueError(f"keep={keep}, ratio={ratio} leave no tokens for the last stage at target={target}")
    return final


def measured_average(stats, n_layers: int) -> float:
    """The layer-averaged share of visual tokens each image had in ``run.stats``, averaged over the images."""
    shares = []
    for image in stats.images:
        counts = torch.full((n_layers,), float(image.before))
        for stage in image.stages:  # in order: each stage sets the count of every layer from where it acts
            counts[(stage.layer or 0):] = stage.after
        shares.append(float(counts.mean()) / image.before)
    return sum(shares) / len(shares)


def last_states(model, inputs: dict) -> torch.Tensor:
    """(rows, hidden) the final-layer hidden state (after the last norm) of each row's last prompt token."""
    with torch.inference_mode():
        out = model(**inputs, output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1][:, -1].float()


def similarity(model, sieve, samples: list[dict], references: list[torch.Tensor]) -> tuple[float, float]:
    """The objective: the mean over samples (and their rows) of the cosine similarity between the last prompt
    token's final hidden state with ``sieve`` and without (``references``); NaN counts 0. Also the measured
    layer-averaged share of visual tokens."""
    total, rows = 0.0, 0
    with ts.apply(model, sieve) as run:
        for inputs, reference in zip(samples, references):
            cosine = F.cosine_similarity(last_states(model, inputs), reference, dim=-1)
            total += float(torch.nan_to_num(cosine, nan=0.0).sum())
            rows += len(cosine)
    return total / rows, measured_average(run.stats, n_layers(model))


def n_layers(model) -> int:
    return model.config.get_text_config().num_hidden_layers


def suite_samples(model, processor, count: int, suite: str = "builtin", data=None) -> list[dict]:
    """The model inputs of the first ``count`` prompts of ``suite`` (the built-in QA suite's test split)."""
    from .suites import load_suite, model_inputs

    if processor is None:
        raise ValueError("samples is a count of the built-in suite's prompts: pass processor= to build them, "
                         "or samples=[inputs, ...] (the processor's outputs, one prompt each)")
    return [model_inputs(model, processor, sample) for sample in load_suite(suite, count, data)[0]]


def format_spec(keep: float, m: float, fixed_vision: dict, ratio: float | None = None, final: float | None = None,
                fixed_llm: dict | None = None) -> str:
    def arguments(values: dict) -> str:
        return "".join(f",{key}={value!r}" for key, value in values.items())

    spec = f"vflowopt:{keep!r},m={m!r}{arguments(fixed_vision)}"
    if final is not None:
        spec += f"+vflowopt_llm:{final!r},ratios=({ratio!r},){arguments(fixed_llm or {})}"
    return spec


def calibrate(model, method: str = CHAIN, samples: int | list[dict] = DEFAULTS["samples"],
              target: int | float = DEFAULTS["target"], calls: int = DEFAULTS["calls"],
              initial: int = DEFAULTS["initial"], seed: int = DEFAULTS["seed"], processor=None,
              progress: Callable[[Trial], None] | None = None) -> Calibration:
    """Search VFlowOpt's parameters for ``model`` at a layer-averaged token budget (see the module docstring for
    the objective, the space and every difference from the official search).

    ``samples``: the model's inputs, one dict per prompt (the processor's output), or a count of the built-in
    QA suite's prompts (needs ``processor``). ``target``: the share of each image's visual tokens averaged over
    the decoder's layers (0.25), or a count of them (64). ``calls`` evaluations, the first ``initial`` at random
    points, seeded by ``seed``. ``progress(trial)`` hears of each call. Returns a :class:`Calibration`: its
    ``spec`` is what ``ts.build`` takes, ``write(path)`` saves the record (``ts.build(path)`` reads it).
    """
    fixed_vision, fixed_llm = check_method(method)
    check_search(calls, initial, seed)
    check_target(target)
    require("calibrate", "optuna", "scipy", purpose="tokensieve calibrate's Bayesian search (optuna's GPSampler)")
    import optuna

    if isinstance(samples, int) and not isinstance(samples, bool):
        if samples < 1:
            raise ValueError(f"samples must be at least 1 prompt, not {samples}")
        samples = suite_samples(model, processor, samples)
    samples = list(samples)
    if not samples or not all(isinstance(s, dict) or hasattr(s, "keys") for s in samples):
        raise ValueError("samples must be a count or a non-empty list of model inputs (the processor's outputs)")

    start = time.perf_counter()
    with ts.observe(model) as stock:
        references = [last_states(model, inputs) for inputs in samples]
    tokens = [image.before for image in stock.stats.images]
    if not tokens:
        raise ValueError("the samples carry no image: calibrate needs prompts with images")
    share = check_target(target, tokens)
    layers = n_layers(model)
    stage_layers: tuple[int, ...] = ()
    if method != VISION:
        stage_layers = tuple(stage.layer for stage in ts.build("vflowopt_llm", **fixed_llm).schedule(layers))
        if len(stage_layers) != 2:
            raise ValueError(f"the decoder's {layers} layers are too few for vflowopt_llm's two stages: calibrate "
                             f"method='vflowopt' (the vision stage alone)")
    keep_range = (round(share, 4), round(min(1.0, KEEP_SPAN * share), 4))

    trials: list[Trial] = []

    def objective(trial) -> float:
        began, cpu_began = time.perf_counter(), time.process_time()
        m = round(trial.suggest_float("m", *M_RANGE), 3)
        if method == VISION:
            keep, ratio, final, average = share, None, None, share
            params = {"keep": keep, "m": m}
        else:
            keep = round(trial.suggest_float("keep", *keep_range), 4) if keep_range[0] < keep_range[1] else keep_range[0]
            ratio = round(trial.suggest_float("ratio", *RATIO_RANGE), 4)
            final = final_keep(share, layers, stage_layers, keep, ratio)
            average = layer_average(layers, stage_layers, keep, ratio, final)
            params = {"keep": keep, "m": m, "ratios": (ratio,), "final": final}
        spec = format_spec(keep, m, fixed_vision, ratio, final, fixed_llm)
        score, measured = similarity(model, ts.build(spec), samples, references)
        record = Trial(len(trials), spec, params, average, measured, score, time.perf_counter() - began,
                       time.process_time() - cpu_began)
        trials.append(record)
        if progress is not None:
            progress(record)
        return score

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        # the GP fits by autograd: a caller's torch.no_grad() must not reach it (the forwards run in inference mode)
        with warnings.catch_warnings(), torch.enable_grad():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # GPSampler before optuna 4.5
            sampler = optuna.samplers.GPSampler(seed=seed, n_startup_trials=initial)
            study = optuna.create_study(direction="maximize", sampler=sampler)
            study.optimize(objective, n_trials=calls)
    finally:
        optuna.logging.set_verbosity(verbosity)
    best = max(trials, key=lambda t: t.score)  # the first of equal scores
    return Calibration(method=method, target=share, spec=best.spec, params=best.params, score=best.score,
                       layers=layers, stage_layers=stage_layers, samples=len(samples), tokens=tokens, calls=calls,
                       initial=initial, seed=seed, sampler=f"optuna {optuna.__version__} GPSampler",
                       seconds=time.perf_counter() - start, trials=trials)
