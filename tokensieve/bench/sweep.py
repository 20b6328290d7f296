"""`tokensieve bench`: run every configuration (the baseline, and each method at each budget) on
every sample of a suite, and append one JSON line per (configuration, sample) to
`OUT/runs/<config>.jsonl` as soon as the sample is done.

Rerunning the same sweep resumes it: samples a configuration has recorded are never run again,
and a torn last line (a kill mid-write) is cut off first. With `workers > 1` configurations run in
parallel processes, each loading the model once. What each field measures: docs/bench.md and
tokensieve/bench/measure.py.
"""

from __future__ import annotations

import json
import multiprocessing
import shlex
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import transformers
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

import tokensieve as ts

from ..qa.video import DEFAULT_FRAMES
from .datasets import BenchmarkDataMissing
from .measure import Meter
from .suites import (BUILTIN, VIDEO, check_model, frame_size, load_model, load_suite, model_inputs, model_view,
                     takes_frames, video_frames)

BASELINE = "baseline"
DEFAULT_KEEPS = (256, 128, 64, 32, 16)
WARMUP_NEW_TOKENS = 2  # a prefill and one decode step: enough to pay every first-call cost
# Settings a resumed sweep must share with the records already in OUT: mixing them would mix numbers.
_FIXED_ON_RESUME = ("model", "suite", "split", "data", "device", "dtype", "max_new_tokens", "frames")


class SweepSpecError(ValueError):
    """The sweep asks for something it cannot run: an unknown method or suite, a bad chain, a bad budget."""


@dataclass(frozen=True)
class Config:
    """One configuration: the stock model (`method=None`), one method at one budget, or a chain
    (`"fastervlm:128+fastv"`: `keep` is the budget of each method that states none)."""

    method: str | None = None
    keep: int | float | None = None

    @property
    def id(self) -> str:
        if self.method is None:
            return BASELINE
        method = self.method.replace(":", "-k")
        return method if self.keep is None else f"{method}-k{self.keep}"


@dataclass
class Settings:
    """What every worker process needs to rebuild the same model and samples."""

    model: str
    suite: str
    split: str | None
    data: str | None
    limit: int | None
    device: str
    dtype: str
    max_new_tokens: int
    show: int
    out: str
    frames: int | None = None  # frames per video of the video suite or a video benchmark (None: image suites)


def parse_keep(text: str | int | float) -> int | float:
    try:
        return ts.parse_keep(text)
    except ValueError as err:
        raise SweepSpecError(str(err)) from None


def plan(methods: list[str], keeps: list[int | float], videos: bool = True) -> list[Config]:
    """The baseline, then each method at each budget (`name:keep` gives one method its own budget;
    `name:keep,arg=value` passes it arguments too).

    Every method is built here once, so an unknown name or a bad budget fails before a model loads.
    With "all", an adaptive budget runs for the methods that take one (their `adaptive_rules`): the
    others have no score to threshold, and asking for one of them by name is refused as usual. Where the
    suite has no videos (`videos=False`), "all" leaves out the methods for videos only.
    """
    every_method = methods == ["all"]
    names = ([info.name for info in ts.list_methods() if videos or not info.needs_video] if every_method
             else methods)
    configs = [Config()]
    for spec in names:
        try:
            parts = ts.parse_spec(spec)
        except ValueError as err:
            raise SweepSpecError(str(err)) from None
        if len(parts) == 1 and list(parts[0][1]) == ["keep"]:  # `name:keep`: recorded as that method at that budget
            spec, budgets = parts[0][0], [parts[0][1]["keep"]]
        else:  # a spec with every budget written runs once; otherwise once per swept budget
            budgets = [None] if all("keep" in kwargs for _, kwargs in parts) else keeps
        for budget in budgets:
            try:
                ts.build(spec, keep=budget)
            except (TypeError, ValueError) as err:
                if every_method and isinstance(budget, ts.Adaptive):
                    continue
                raise SweepSpecError(str(err)) from None
            configs.append(Config(spec, budget))
    return list(dict.fromkeys(configs))  # a configuration asked for twice runs once


def sweep(model: str = "sieve-mini", suite: str = BUILTIN, methods: list[str] | str = "all",
          keeps: list[int | float] | str = DEFAULT_KEEPS, limit: int | None = None, out: Path | str = "results",
          workers: int = 1, data: Path | str | None = None, split: str | None = None, device: str | None = None,
          dtype: str | None = None, max_new_tokens: int | None = None, show: int = 6,
          progress: bool = True, ray: str | None = None, shard: int | None = None,
          frames: int | None = None) -> Path:
    """Run the sweep into `out`, resuming what is there, and return `out`.

    `methods`: names, `name:keep` specs or "all"; `keeps`: counts and ratios; either may be one
    comma-separated string. `device` defaults to CUDA when there is one (on a Ray cluster: when it has
    GPUs); `dtype` to bfloat16 on CUDA, float32 on the CPU; `max_new_tokens` to 5 for the builtin and video
    suites (one-word answers) and 16 for benchmarks. `show`: save the image as the model saw it for the first
    `show` samples (a video: its frames). `ray`: a Ray cluster's address, "auto" or "local", to run the
    configurations as Ray tasks (tokensieve/bench/ray_sweep.py), `shard` samples per task (default: a
    configuration's all). `frames`: frames per clip of the video suite, or sampled uniformly from each video
    of a video benchmark (videomme, mvbench; default 16).
    """
    if ray is None:
        if shard is not None:
            raise SweepSpecError("shard splits a configuration into Ray tasks: it needs ray (--ray ADDRESS)")
        return _sweep(model, suite, methods, keeps, limit, out, workers, data, split, device, dtype,
                      max_new_tokens, show, progress, frames=frames)
    if workers != 1:
        raise SweepSpecError(f"workers={workers} is for a run on this machine: with ray, every free GPU (or CPU) "
                             f"of the cluster runs a task")
    if shard is not None and shard < 1:
        raise SweepSpecError(f"shard must be at least 1 sample, not {shard}")
    if takes_frames(suite):  # its tasks would send back one picture per sample, not a clip's frames
        raise SweepSpecError(f"the {suite} suite does not run on Ray yet: run it on this machine (--workers N)")
    from .ray_sweep import cluster

    with cluster(ray) as ray_cluster:  # an address that does not answer fails here, before any work
        return _sweep(model, suite, methods, keeps, limit, out, workers, data, split, device, dtype,
                      max_new_tokens, show, progress, ray_cluster, shard, frames)


def _sweep(model, suite, methods, keeps, limit, out, workers, data, split, device, dtype, max_new_tokens, show,
           progress, ray_cluster=None, shard=None, frames=None) -> Path:
    if device is None:
        device = ray_cluster.default_device() if ray_cluster else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    settings = Settings(model=model, suite=suite, split=split, data=None if data is None else str(data),
                        limit=limit, device=device, dtype=dtype, show=show, out=str(out),
                        max_new_tokens=max_new_tokens or (5 if suite in (BUILTIN, VIDEO) else 16),
                        frames=frames if frames is not None or not takes_frames(suite) else DEFAULT_FRAMES)
    try:
        methods = ts.split_specs(methods) if isinstance(methods, str) else [m for m in methods if m]
        configs = plan(methods, [parse_keep(k) for k in (ts.budget.split_top_level(keeps) if isinstance(keeps, str) else keeps)],
                       videos=takes_frames(suite))
        check_model(model, settings.dtype)
        if workers < 1 or (limit is not None and limit < 1):
            raise ValueError(f"workers and limit must be at least 1, not {workers} and {limit}")
        samples, settings.split = load_suite(suite, limit, data, split, settings.frames)
    except BenchmarkDataMissing:
        raise
    except (ValueError, FileNotFoundError) as err:  # a video benchmark's videos not where its questions say
        raise SweepSpecError(str(err)) from None
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    description = _describe(out, settings, configs, workers, len(samples))

    retried = {}
    with SweepProgress(enabled=progress) as bar:
        for config in configs:
            bar.add(config.id, len(samples), len(read_done(out / "runs" / f"{config.id}.jsonl")))
        if ray_cluster is not None:
            skipped, retried = ray_cluster.run(settings, configs, [s.id for s in samples], shard, bar)
        elif workers == 1:
            worker = Worker(settings, samples)
            skipped = {c.id: reason for c in configs if (reason := worker.run(c, bar.handle))}
        else:
            skipped = _run_in_processes(settings, configs, workers, bar)
    # refusals of earlier runs into this OUT stay, unless this run ran the configuration again
    earlier = {config: why for config, why in description["skipped"].items() if config not in {c.id for c in configs}}
    description.update(skipped={**earlier, **skipped}, finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    if retried:  # a Ray task that died, and was run again on what its configuration still lacked
        description["retried"] = retried
    (out / "sweep.json").write_text(json.dumps(description, indent=2) + "\n")
    return out


def _describe(out: Path, settings: Settings, configs: list[Config], workers: int, n_samples: int) -> dict:
    """Write OUT/sweep.json (the settings, versions, command line); refuse to mix two sweeps in one OUT."""
    path = out / "sweep.json"
    fixed = {key: asdict(settings)[key] for key in _FIXED_ON_RESUME}
    before = json.loads(path.read_text()) if path.is_file() else {}
    changed = ", ".join(f"{k}: {before[k]!r} -> {v!r}" for k, v in fixed.items() if before and before.get(k) != v)
    if changed:
        raise SweepSpecError(f"{out} holds a sweep with other settings ({changed}): resume it with its own "
                             f"settings, or pass another --out")
    configs_ever = list(dict.fromkeys(before.get("configs", []) + [c.id for c in configs]))  # this run's and earlier
    description = {**fixed, "limit": settings.limit, "samples": n_samples, "configs": configs_ever,
                   "workers": workers, "torch": torch.__version__, "transformers": transformers.__version__,
                   "tokensieve": ts.__version__, "command": shlex.join(sys.argv),
                   "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "finished": None,
                   "skipped": before.get("skipped", {})}
    path.write_text(json.dumps(description, indent=2) + "\n")
    return description


def read_done(path: Path) -> set[str]:
    """The samples a configuration's JSONL already holds. A last line without its newline was torn
    by a kill mid-write: it is cut from the file, and that sample runs again."""
    if not path.is_file():
        return set()
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    if complete < len(data):
        with path.open("r+b") as file:
            file.truncate(complete)
    return {json.loads(line)["sample"] for line in data[:complete].splitlines()}


class Worker:
    """One process's model, processor, samples and meter; runs configurations one after another."""

    def __init__(self, settings: Settings, samples: list | None = None):
        self.settings = settings
        self.model, self.processor = load_model(settings.model, settings.device, settings.dtype)
        self.samples = samples or load_suite(settings.suite, settings.limit, settings.data, settings.split,
                                             settings.frames)[0]
        self.meter = Meter(self.model)
        # a video suite on a family without videos: each clip's frames go as images (at sieve-mini's trained size),
        # read as one video
        self.video_frames = video_frames(self.processor, self.samples[0]) if self.samples else None
        self.frame_size = frame_size(settings.model)

    def run(self, config: Config, report: Callable) -> str | None:
        """Run `config` on every sample it has not recorded; returns why it was skipped, if it was.
        `report(config_id, "done" | "skipped", detail)` hears of each finished sample and of a skip."""
        out = Path(self.settings.out)
        self._save_images(out / "images")
        path = out / "runs" / f"{config.id}.jsonl"
        done = read_done(path)
        todo = [sample for sample in self.samples if sample.id not in done]
        if not todo:
            return None
        sieve, reason = self.sieve(config)
        if reason:
            report(config.id, "skipped", reason)
            return reason
        with path.open("a") as file:
            for record in self.records(config, sieve, todo):
                file.write(json.dumps(record) + "\n")
                file.flush()
                report(config.id, "done", record["sample"])
        return None

    def sieve(self, config: Config):
        """The configuration's sieve (None for the baseline), and why this model refuses it, if it does."""
        sieve = ts.build(config.method, keep=config.keep) if config.method else None
        return sieve, None if sieve is None else self.meter.refusal(sieve, self.video_frames)

    def records(self, config: Config, sieve, todo: list):
        """One record per sample of `todo`, each yielded as soon as it is measured."""
        # Untimed warm-up on this configuration, so no record pays first-call costs.
        self.meter.generate(model_inputs(self.model, self.processor, todo[0], self.frame_size), WARMUP_NEW_TOKENS, sieve,
                            self.video_frames)
        for sample in todo:
            yield self._record(config, sieve, sample)

    def _record(self, config: Config, sieve, sample) -> dict:
        inputs = model_inputs(self.model, self.processor, sample, self.frame_size)
        measured = self.meter.generate(inputs, self.settings.max_new_tokens, sieve, self.video_frames)
        prediction = self.processor.decode(measured.new_tokens, skip_special_tokens=True).strip()
        score = sample.score(prediction)
        stats = measured.stats  # the baseline's is ts.observe's: every token kept, the stock prefill
        first_image = stats.images[0]
        record = {
            "config": config.id, "method": config.method, "keep": config.keep if isinstance(config.keep, (int, float, type(None))) else str(config.keep), "sample": sample.id,
            "category": sample.category, "question": sample.question, "target": sample.target,
            "prediction": prediction, "correct": score >= 1.0, "score": score,
            "tokens_before": stats.tokens_before, "tokens_after": stats.tokens_after,
            "tokens_llm_input": stats.tokens_at_llm_input, "tokens_per_layer": stats.tokens_per_layer,
            "kept": first_image.kept.tolist(), "grid": list(first_image.grid),
            # where a stage merged: every patch's group, as the raster index of the token it ended in
            "groups": first_image.groups().tolist() if any(s.assignment is not None for s in first_image.stages) else None,
            "prefill_flops": stats.prefill_flops, "prefill_flops_unreduced": stats.prefill_flops_unreduced,
            "vision_flops": stats.vision_flops, "prefill_seconds": measured.prefill_seconds,
            "decode_seconds_per_token": measured.decode_seconds_per_token, "new_tokens": len(measured.new_tokens),
            "peak_memory_added_bytes": measured.peak_memory_added_bytes, "kv_cache_bytes": stats.kv_bytes,
            # the baseline selects nothing: null, not the observer's 0.0
            "selection_seconds": stats.selection_seconds if sieve is not None else None, "warmup": False,
        }
        if first_image.frames is not None:  # a video: `kept` and `grid` run over all its frames, frame after frame
            record.update(frames=list(first_image.frames), frame_counts=first_image.frame_counts.tolist(),
                          kept_frames=first_image.kept_frames.tolist())
        return record

    def view(self, sample):
        """The sample's image as the model saw it (resized, cropped), for the report's kept-patch pictures."""
        return model_view(self.processor, model_inputs(self.model, self.processor, sample, self.frame_size), sample)

    def _save_images(self, folder: Path) -> None:
        """The first `show` samples' images as the model saw them (a video: its frames as rendered, in
        `<sample>/<frame>.png`), for the report's kept-patch pictures."""
        folder.mkdir(exist_ok=True)
        for sample in self.samples[: self.settings.show]:
            if sample.frames is not None:
                _save_frames(sample, folder / sample.id)
                continue
            target = folder / f"{sample.id}.png"
            if not target.is_file():
                scratch = target.with_name(f"{target.stem}.{multiprocessing.current_process().pid}.tmp.png")
                self.view(sample).save(scratch)
                scratch.replace(target)  # atomic: parallel workers may write the same picture


def _save_frames(sample, folder: Path) -> None:
    """A video's frames as `folder/00.png`, `01.png`, ...; the folder appears whole (parallel workers)."""
    if folder.is_dir():
        return
    scratch = folder.with_name(f"{folder.name}.{multiprocessing.current_process().pid}.tmp")
    scratch.mkdir(exist_ok=True)
    for index, frame in enumerate(sample.frames()):
        frame.save(scratch / f"{index:02d}.png")
    try:
        scratch.rename(folder)  # atomic; another worker may have won the race
    except OSError:
        shutil.rmtree(scratch)


class SweepProgress:
    """Rich progress bars with ETA: one for the whole sweep, one per configuration."""

    def __init__(self, enabled: bool = True):
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), disable=not enabled)
        self.total = self.progress.add_task("sweep", total=0)
        self.tasks: dict[str, int] = {}

    def add(self, config_id: str, samples: int, done: int) -> None:
        self.tasks[config_id] = self.progress.add_task(config_id, total=samples, completed=done)
        self.progress.update(self.total, total=self.progress.tasks[self.total].total + samples, advance=done)

    def handle(self, config_id: str, event: str, detail: str) -> None:
        if event == "done":
            self.progress.advance(self.tasks[config_id])
            self.progress.advance(self.total)
        else:  # skipped: its samples leave the sweep's total
            task = self.progress.tasks[self.tasks[config_id]]
            self.progress.update(task.id, description=f"{config_id} [yellow]skipped[/]: {detail[:80]}")
            self.progress.update(self.total, total=self.progress.tasks[self.total].total - task.remaining)

    def __enter__(self) -> SweepProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()


_WORKER: Worker | None = None  # in a worker process: its model and samples
_MESSAGES = None  # in a worker process: the queue its progress goes back through


def _start_worker(settings: Settings, threads: int, messages) -> None:
    global _WORKER, _MESSAGES
    torch.set_num_threads(threads)
    _WORKER, _MESSAGES = Worker(settings), messages


def _run_config(config: Config) -> str | None:
    return _WORKER.run(config, lambda *event: _MESSAGES.put(event))


def _run_in_processes(settings: Settings, configs: list[Config], workers: int, bar: SweepProgress) -> dict:
    """Configurations spread over `workers` spawned processes that split the CPU threads between
    them; progress comes back through a queue. Returns {config id: why it was skipped}."""
    context = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools and locks
    messages = context.Queue()
    threads = max(1, torch.get_num_threads() // workers)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                             initargs=(settings, threads, messages)) as pool:
        futures = {pool.submit(_run_config, config): config for config in configs}
        pending = set(futures)
        while pending:
            _, pending = wait(pending, timeout=0.2)
            while not messages.empty():
                bar.handle(*messages.get())
        reasons = {futures[future].id: future.result() for future in futures}
    while not messages.empty():
        bar.handle(*messages.get())
    return {config_id: reason for config_id, reason in reasons.items() if reason}
