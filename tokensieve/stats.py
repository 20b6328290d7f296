"""What a run did: per image tokens before/after and kept indices, per prefill the FLOPs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ImageRecord:
    """One image of one forward call."""

    call: int  # index of the forward call within the run
    row: int  # batch row
    before: int  # visual tokens the model produced
    after: int  # visual tokens that entered the LLM
    kept: torch.Tensor  # kept token indices, raster order over grid
    grid: tuple[int, int]
    seconds: float  # time spent in the sieve's select()

    def __repr__(self) -> str:
        shown = ", ".join(str(i) for i in self.kept[:8].tolist()) + (", ..." if len(self.kept) > 8 else "")
        return (f"ImageRecord(call={self.call}, row={self.row}, grid={self.grid[0]}x{self.grid[1]}, "
                f"{self.before} -> {self.after} tokens, kept=[{shown}])")


@dataclass
class RunStats:
    images: list[ImageRecord] = field(default_factory=list)
    prefill_flops: int = 0  # LLM decoder prefill FLOPs with the reduction
    prefill_flops_unreduced: int = 0  # the same prefill without it
    calls: int = 0  # forward calls that carried images

    @property
    def tokens_before(self) -> int:
        return sum(r.before for r in self.images)

    @property
    def tokens_after(self) -> int:
        return sum(r.after for r in self.images)

    @property
    def selection_seconds(self) -> float:
        return sum(r.seconds for r in self.images)

    def summary(self) -> str:
        """One line: calls, images, visual tokens before -> after and the prefill's share of its FLOPs."""
        line = f"{self.calls} call(s), {len(self.images)} image(s), {self.tokens_before} -> {self.tokens_after} visual tokens"
        if self.prefill_flops_unreduced:
            line += f", LLM prefill at {self.prefill_flops / self.prefill_flops_unreduced:.1%} of its FLOPs"
        return line

    def __repr__(self) -> str:
        return f"<RunStats {self.summary()}>"

    def __str__(self) -> str:
        lines = [f"{'call':>4} {'row':>3} {'grid':>7} {'before':>6} {'after':>6}"]
        for r in self.images:
            lines.append(f"{r.call:>4} {r.row:>3} {r.grid[0]:>3}x{r.grid[1]:<3} {r.before:>6} {r.after:>6}")
        if self.prefill_flops_unreduced:
            ratio = self.prefill_flops / self.prefill_flops_unreduced
            lines.append(
                f"LLM prefill: {self.prefill_flops / 1e9:.3f} GFLOPs of {self.prefill_flops_unreduced / 1e9:.3f} "
                f"({ratio:.1%}); selection {self.selection_seconds * 1e3:.2f} ms"
            )
        return "\n".join(lines)
