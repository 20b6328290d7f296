"""What a run did: per image tokens before/after and kept indices, per prefill the FLOPs."""

from __future__ import annotations

from dataclasses import dataclass, field

from ._lazy import torch


@dataclass
class StageRecord:
    """What one stage of a method left of one image: the method, where it acted (``in_vision``,
    ``pre_llm``, or ``in_llm`` before decoder ``layer``), the tokens left after it and their raster
    indices; a stage that merged also says which original tokens each kept one holds."""

    method: str
    stage: str
    layer: int | None  # the decoder layer the stage prunes before (in_llm), None before the LLM
    after: int
    kept: torch.Tensor  # raster indices over the image's grid
    seconds: float  # time spent in the stage's select() (or, inside the vision tower, in its merges)
    sizes: torch.Tensor | None = None  # merging stages: the original tokens each kept token holds
    # merging stages: for every token the stage received (in the raster order of what the stage before it kept),
    # its group (an index into kept; -1: dropped without merging)
    assignment: torch.Tensor | None = None
    # merging stages with a weighted map: each received token's weight in its group's mean (None: equal weights)
    weights: torch.Tensor | None = None

    def __repr__(self) -> str:
        where = f"layer {self.layer}" if self.layer is not None else self.stage
        return f"StageRecord({self.method} at {where}: {self.after} tokens)"


@dataclass
class ImageRecord:
    """One image of one forward call; ``after`` and ``kept`` are what its last stage left, and ``stages``
    holds one record per stage that ran (each keeps a subset of what the one before it kept)."""

    call: int  # index of the forward call within the run
    row: int  # batch row
    before: int  # visual tokens the model produced
    after: int  # visual tokens that entered the LLM
    kept: torch.Tensor  # kept token indices, raster order over grid
    grid: tuple[int, int]
    seconds: float  # time spent in every stage's select()
    stages: list[StageRecord] = field(default_factory=list)
    frames: tuple[int, int, int] | None = None  # a video's (t, h, w) grid (kept indices run frame after frame); None: an image
    timestamps: torch.Tensor | None = None  # a video's frame start times in seconds, where the model has them

    @property
    def frame_counts(self) -> torch.Tensor | None:
        """A video's kept tokens in each of its t frames, (t,) (None for an image)."""
        if self.frames is None:
            return None
        t, h, w = self.frames
        return torch.bincount(self.kept // (h * w), minlength=t)

    @property
    def kept_frames(self) -> torch.Tensor | None:
        """The frames of a video that kept at least one token, ascending (None for an image)."""
        counts = self.frame_counts
        return None if counts is None else counts.nonzero().squeeze(1)

    def groups(self) -> torch.Tensor:
        """(before,) for every token of the image, the raster index of the kept token it ended in, through every
        stage's merge map (itself if kept as it was; -1 if dropped without merging)."""
        into = torch.arange(self.before)
        for stage in self.stages:
            received = torch.unique(into[into >= 0])  # what the stage was given, in raster order
            rank = torch.full((self.before,), -1, dtype=torch.long)
            rank[received] = torch.arange(len(received))
            if stage.assignment is not None:
                group = torch.where(into >= 0, stage.assignment[rank[into.clamp(min=0)]], -1)
                into = torch.where(group >= 0, stage.kept[group.clamp(min=0)], -1)
            else:
                survives = torch.zeros(self.before, dtype=torch.bool)
                survives[stage.kept] = True
                into = torch.where((into >= 0) & survives[into.clamp(min=0)], into, -1)
        return into

    @property
    def at_llm_input(self) -> int:
        """Visual tokens that entered the LLM: what the last stage before it left (``before`` if none ran)."""
        counts = [stage.after for stage in self.stages if stage.stage != "in_llm"]
        return counts[-1] if counts else self.before

    def tokens_per_layer(self, n_layers: int) -> float:
        """The visual tokens each of the decoder's ``n_layers`` layers processes, on average: how in-LLM papers count
        a budget (SparseVLM's "192 tokens" on LLaVA-1.5), where ``after`` is only what the last layers see."""
        in_llm = [stage for stage in self.stages if stage.stage == "in_llm"]
        starts = [0] + [stage.layer for stage in in_llm]
        counts = [self.at_llm_input] + [stage.after for stage in in_llm]
        ends = starts[1:] + [n_layers]
        return sum(count * (end - start) for count, start, end in zip(counts, starts, ends)) / n_layers

    def __repr__(self) -> str:
        shown = ", ".join(str(i) for i in self.kept[:8].tolist()) + (", ..." if len(self.kept) > 8 else "")
        grid = "x".join(map(str, self.frames)) if self.frames is not None else f"{self.grid[0]}x{self.grid[1]}"
        return (f"ImageRecord(call={self.call}, row={self.row}, grid={grid}, "
                f"{self.before} -> {' -> '.join(str(stage.after) for stage in self.stages) or self.after} tokens, kept=[{shown}])")


@dataclass
class RunStats:
    images: list[ImageRecord] = field(default_factory=list)
    prefill_flops: int = 0  # LLM decoder prefill FLOPs with the reduction
    prefill_flops_unreduced: int = 0  # the same prefill without it
    calls: int = 0  # forward calls that carried images
    # bytes those calls (the prefills) added to the KV cache, read from its key and value tensors: every
    # decoder layer at the length it holds (in-LLM pruning shortens layers K..), every batch row and padding
    kv_bytes: int = 0
    vision_flops: int | None = None  # vision tower + projector FLOPs; counted with apply(..., vision_flops=True)
    decoder_layers: int = 0  # the language model's depth, for tokens_per_layer

    @property
    def tokens_at_llm_input(self) -> int:
        return sum(r.at_llm_input for r in self.images)

    @property
    def tokens_per_layer(self) -> float:
        """Visual tokens a decoder layer processes, on average over the layers (summed over images)."""
        return sum(r.tokens_per_layer(self.decoder_layers) for r in self.images)

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
