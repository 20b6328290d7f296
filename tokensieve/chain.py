"""``Chain``: one method before the LLM, then one inside it (``ts.Chain(ts.VisionZip(keep=128), ts.FastV())``)."""

from __future__ import annotations

from .sieve import STAGES, Sieve


class Chain:
    """Sieves applied in stage order: at most one ``pre_llm`` sieve, then at most one ``in_llm`` sieve,
    which sees the tokens the first one kept. ``run.stats`` reports, per image, what is left after both."""

    def __init__(self, *sieves: Sieve):
        for sieve in sieves:
            if not isinstance(sieve, Sieve):
                raise TypeError(f"expected tokensieve methods (e.g. ts.load('fastervlm', keep=64)), not {type(sieve).__name__}")
        if not sieves:
            raise ValueError("a chain needs at least one method, e.g. ts.Chain(ts.VisionZip(keep=128), ts.FastV(keep=0.5))")
        stages = [sieve.stage for sieve in sieves]
        if len(set(stages)) != len(stages) or stages != sorted(stages, key=STAGES.index):
            described = ", ".join(f"{s.name} ({s.stage})" for s in sieves)
            raise ValueError(
                f"a chain takes at most one method per stage, in the order {' then '.join(STAGES)}; got {described}"
            )
        self.sieves = sieves
        by_stage = {sieve.stage: sieve for sieve in sieves}
        self.pre: Sieve | None = by_stage.get("pre_llm")
        self.inside: Sieve | None = by_stage.get("in_llm")

    @property
    def name(self) -> str:
        return "+".join(sieve.name for sieve in self.sieves)

    def __repr__(self) -> str:
        return f"Chain({', '.join(map(repr, self.sieves))})"
