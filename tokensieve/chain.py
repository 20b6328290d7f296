"""``Chain``: a schedule of methods, ``ts.Chain(ts.VisionZip(keep=128), ts.FastV(layer=2), ts.PyramidDrop(layers=(8, 16)))``."""

from __future__ import annotations

from .sieve import STAGES, Sieve


class Chain:
    """Methods applied in stage order: at most one ``frames`` method (a video's frames before the vision tower), at
    most one ``in_vision`` method (inside the vision tower), at most one ``pre_llm`` method, then any number of ``in_llm`` methods whose stages prune before strictly increasing
    decoder layers. Each stage sees the tokens the ones before it kept; ``run.stats`` holds, per image, one
    record per stage (``ImageRecord.stages``).

    Layers are checked here where the methods name them, and against the decoder's depth when the chain is
    applied (a method such as PyramidDrop places its stages by the depth), before the model is touched."""

    def __init__(self, *sieves: Sieve):
        for sieve in sieves:
            if not isinstance(sieve, Sieve):
                raise TypeError(f"expected tokensieve methods (e.g. ts.load('fastervlm', keep=64)), not {type(sieve).__name__}")
        if not sieves:
            raise ValueError("a chain needs at least one method, e.g. ts.Chain(ts.VisionZip(keep=128), ts.FastV(keep=0.5))")
        stages = [sieve.stage for sieve in sieves]
        singles = [stage for stage in stages if stage != "in_llm"]
        if stages != sorted(stages, key=STAGES.index) or len(set(singles)) != len(singles):
            described = ", ".join(f"{s.name} ({s.stage})" for s in sieves)
            raise ValueError(
                f"a chain takes at most one frames method, first; then at most one in_vision method; then at most one "
                f"pre_llm method; then in_llm methods at increasing layers; got {described}"
            )
        self.sieves = sieves
        by_stage = {sieve.stage: sieve for sieve in sieves if sieve.stage != "in_llm"}
        self.frames: Sieve | None = by_stage.get("frames")
        self.vision: Sieve | None = by_stage.get("in_vision")
        self.pre: Sieve | None = by_stage.get("pre_llm")
        self.in_llm: tuple[Sieve, ...] = tuple(sieve for sieve in sieves if sieve.stage == "in_llm")
        named = [(sieve, layers) for sieve in self.in_llm if (layers := _named_layers(sieve))]
        for (first, before), (second, after) in zip(named, named[1:]):
            if after[0] <= before[-1]:
                raise ValueError(
                    f"in-LLM methods must prune before increasing decoder layers, in chain order: {first.name} at "
                    f"layer {before[-1]} comes before {second.name} at layer {after[0]}"
                )

    @property
    def name(self) -> str:
        return "+".join(sieve.name for sieve in self.sieves)

    def __repr__(self) -> str:
        return f"Chain({', '.join(map(repr, self.sieves))})"


def _named_layers(sieve: Sieve) -> tuple[int, ...]:
    """The decoder layers an in-LLM method names (``layer``, or ``layers``); () where its depth places them."""
    layer, layers = getattr(sieve, "layer", None), getattr(sieve, "layers", None)
    return (layer,) if isinstance(layer, int) else tuple(layers or ())
