"""The in-LLM schedule: the stages of a run's in-LLM methods, in chain order, and the checks that a schedule can run
on a decoder (strictly increasing layers, one transition tracker, restoring and freezing stages placed where their
tokens make sense, positions that can be renumbered) before the model is touched. layer_stages.py runs it."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..sieve import Sieve
from .llm_signals import attention_module
from .transitions import Transitions


@dataclass
class Stage:
    """One in-LLM stage of the schedule: the sieve that selects, and the method it belongs to."""

    sieve: Sieve
    method: Sieve

    @property
    def layer(self) -> int:
        return self.sieve.layer


def schedule(methods: tuple[Sieve, ...], n_layers: int) -> list[Stage]:
    """The stages of ``methods`` (in-LLM sieves, in chain order) on a decoder of ``n_layers`` layers, checked:
    every stage prunes before a layer from 1 to ``n_layers - 1``, at strictly increasing layers."""
    stages = [Stage(sieve, method) for method in methods for sieve in method.schedule(n_layers)]
    for stage in stages:
        if not 1 <= stage.layer < n_layers:
            raise ValueError(
                f"{stage.method.name} prunes after layer={stage.layer}, but this language model has {n_layers} layers: "
                f"pass a layer from 1 to {n_layers - 1}"
            )
    layers = [stage.layer for stage in stages]
    if layers != sorted(set(layers)):
        described = ", ".join(f"{stage.method.name} at layer {stage.layer}" for stage in stages)
        raise ValueError(
            f"in-LLM stages must prune before strictly increasing decoder layers, in chain order; got {described}: "
            f"give each method its own layers"
        )
    return stages


#: the signals an in-LLM stage may ask for that the engine computes inside the decoder
LLM_SIGNALS = ("llm_attention", "llm_transition", "llm_input")
#: the vision-tower signals an in-LLM stage may ask for: one value per image token on the last axis, which the
#: engine gathers at the tokens still there (``PendingImage.raster``) at each stage
VISION_SIGNALS = ("cls_attention", "vision_attention")


def transition_tracker(stages: list[Stage], asks: list[tuple], layers: nn.ModuleList) -> Transitions | None:
    """The one ``llm_transition`` tracker the stages' requests share (None: no stage asks), from the first layer
    any request starts at (its own previous layer, for ``start=None``) to the last asking stage's layer."""
    starts = {}
    for stage, requests in zip(stages, asks):
        for request in requests:
            start = request.start if request.start is not None else stage.layer - 1
            if start >= stage.layer:
                raise ValueError(f"{stage.method.name} asks for llm_transition(start={start}) at a stage before layer {stage.layer}: "
                                 f"pass a start below {stage.layer}")
            starts[start] = stage
    if not starts:
        return None
    if len(starts) > 1:
        raise ValueError(f"in-LLM stages ask for llm_transition from layers {sorted(starts)}: one start per run")
    end = max(stage.layer for stage, requests in zip(stages, asks) if requests)
    return Transitions(layers, next(iter(starts)), end, attention_module)


def check_restoring(stages: list[Stage], asked: list[tuple]) -> None:
    """A restoring stage (``Sieve.restores``) sees tokens absent from the layers before it: no signal computed over
    the present tokens reaches it, no stage of its method may drop an image whole, and no stage follows tokens
    across layers (``llm_transition``), which restored tokens missed."""
    restoring = [stage for stage in stages if stage.sieve.restores]
    if not restoring:
        return
    for stage, requests in zip(stages, asked):
        names = {r.name for r in requests}
        if stage.sieve.restores and names & set(LLM_SIGNALS):
            raise ValueError(f"{stage.method.name} brings tokens back at layer {stage.layer} (restores = True), so it "
                             f"cannot ask for {', '.join(sorted(names & set(LLM_SIGNALS)))}, computed over the tokens "
                             f"still there: score the tokens at a later stage")
        if "llm_transition" in names:
            raise ValueError(f"{stage.method.name} asks for llm_transition, which restored tokens ({restoring[0].method.name} "
                             f"at layer {restoring[0].layer}) have no value of: run them in separate calls")
        if stage.sieve.may_keep_none and any(other.method is stage.method for other in restoring):
            raise ValueError(f"{stage.method.name} may keep no token of an image (may_keep_none) and also brings tokens "
                             f"back: an image a stage drops whole leaves the schedule")


def check_freezing(stages: list[Stage], decoder: nn.Module) -> None:
    """A freezing stage (``Sieve.freezes``) writes its tokens' keys ahead of the others in each later layer's cache:
    it must be the last stage, keep original positions, and run where masks name keys by position (SDPA, eager)."""
    for number, stage in enumerate(stages):
        if not stage.sieve.freezes:
            continue
        if number + 1 < len(stages):
            raise ValueError(f"{stage.method.name} freezes image tokens from layer {stage.layer} on: it must be the last "
                             f"in-LLM stage, but {stages[number + 1].method.name} prunes at layer {stages[number + 1].layer}")
        if positions_of(stage.method) != "original":
            raise ValueError(f"{stage.method.name} keeps the frozen tokens at their positions: use positions='original'")
        implementation = decoder.config._attn_implementation
        if implementation not in ("sdpa", "eager"):
            raise ValueError(f"{stage.method.name} needs the decoder's attention in sdpa or eager (its masks name the frozen "
                             f"keys by position), not {implementation!r}: load the model with attn_implementation='sdpa'")


def check_repackable(decoder: nn.Module) -> None:
    """positions='repack' renumbers 1D rotary positions with the decoder's own rotary embedding."""
    rope = getattr(decoder.config, "rope_parameters", None) or getattr(decoder.config, "rope_scaling", None) or {}
    if "mrope_section" in rope:
        raise ValueError(
            f"positions='repack' renumbers 1D positions, but {type(decoder).__name__} uses multi-row (mrope) positions: "
            f"use positions='original'"
        )
    if not hasattr(decoder, "rotary_emb"):
        raise TypeError(f"{type(decoder).__name__} has no rotary_emb to renumber positions with: use positions='original'")


def scored_at(sieve: Sieve) -> str:
    return getattr(sieve, "llm_attention_at", "previous")


def positions_of(method: Sieve) -> str:
    return getattr(method, "positions", "original")
