"""`tokensieve bench --ray ADDRESS`: the sweep's configurations run as Ray tasks across a cluster.

One task measures one configuration (or one shard of its samples, with `--shard N`) and streams each
record back to the driver as soon as it is measured; the driver appends it to `OUT/runs/<config>.jsonl`
exactly as a local run does. So OUT lives on the driver's machine only (no shared filesystem), the
outputs (tables, plots, report) are written from the same files, and a rerun resumes a Ray sweep, a
local one, or a mix of both.

A task whose process or machine dies is submitted again (Ray places it wherever there is room) with
only the samples its configuration still lacks: the records already written are never measured again.
An exception raised by the measurement itself (a bug, an out-of-memory error) ends the sweep as it
would end a local run.

Every node needs tokensieve (the same version, with the `bench` extra), the model (sieve-mini, which
each node builds in its own cache, or a checkpoint folder at the same path) and --data at the same path.
"""

from __future__ import annotations

import io
import json
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..extras import require

require("ray", "ray", purpose="tokensieve bench --ray (configurations as Ray tasks)")
import ray  # noqa: E402 (after the check, which names the pip command)
from ray.exceptions import AuthenticationError, RayError, RayTaskError  # noqa: E402

from .sweep import Config, Settings, SweepProgress, SweepSpecError, Worker, read_done  # noqa: E402

ATTEMPTS = 3  # a task is run at most this many times before the sweep gives up on its configuration
CONNECT_TIMEOUT_S = 5
DEFAULT_PORTS = {"ray://": 10001, "": 6379}  # Ray Client's server; the head's GCS (`ray start --head`)
# Tests only: a task's first attempt exits its process after streaming this many records, as a killed
# worker would (tests/test_ray_sweep.py). Unset, it does nothing.
EXIT_AFTER_RECORDS = "TOKENSIEVE_RAY_TEST_EXIT_AFTER"


class RaySweepError(RuntimeError):
    """A configuration's task died on every attempt."""


@contextmanager
def cluster(address: str):
    """Connect to the Ray cluster at `address` ("auto": the one running on this machine; "local": start
    one for this sweep) and disconnect at the end. A cluster that does not answer is a SweepSpecError,
    raised before any model loads."""
    if address not in ("auto", "local"):
        _check_answers(address)
    try:
        if address == "local":
            ray.init(include_dashboard=False, log_to_driver=False, logging_level="warning")
        else:
            ray.init(address=address, log_to_driver=False, logging_level="warning")
    except AuthenticationError:
        raise SweepSpecError(f"--ray {address}: the cluster refused this machine's Ray token: set RAY_AUTH_TOKEN "
                             f"to the one `ray get-auth-token` prints on the head") from None
    except (ConnectionError, ValueError, RuntimeError) as err:
        raise SweepSpecError(f"--ray {address}: no Ray cluster to connect to ({_first_line(err)}); start one with "
                             f"`ray start --head`, or pass --ray local") from None
    try:
        yield RayCluster()
    finally:
        ray.shutdown()  # disconnects; stops the cluster only where `local` started it


def _check_answers(address: str) -> None:
    """Refuse at once an address where nothing listens (ray.init would retry it for a minute)."""
    scheme = "ray://" if address.startswith("ray://") else ""
    host, _, port = address.removeprefix(scheme).rpartition(":")
    if not host:
        host, port = port, DEFAULT_PORTS[scheme]
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except ValueError:
        raise SweepSpecError(f"--ray {address}: expected HOST:PORT (the head's address, as `ray start --head` "
                             f"prints it), auto or local") from None
    except OSError as err:
        raise SweepSpecError(f"--ray {address}: no Ray cluster answers there ({err.strerror or err}); start one "
                             f"with `ray start --head`, or pass --ray local") from None


@dataclass
class Task:
    """One configuration's samples to measure, and how many times a task has been started for them."""

    config: Config
    samples: list[str]
    attempt: int = 0


class RayCluster:
    def default_device(self) -> str:
        return "cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"

    def run(self, settings: Settings, configs: list[Config], sample_ids: list[str], shard: int | None,
            bar: SweepProgress) -> tuple[dict[str, str], dict[str, list[str]]]:
        """Measure every (configuration, sample) OUT lacks, appending each record as it arrives. Returns
        {config id: why it was skipped} and {config id: the failures its tasks were retried after}."""
        out = Path(settings.out)
        running = {}  # each task's stream of results -> the task
        skipped, retried = {}, {}
        views = _missing_views(out, sample_ids[: settings.show])  # the first task draws the report's pictures
        for task in _tasks(out, configs, sample_ids, shard):
            running[_submit(settings, task, views)] = task
            views = []
        while running:
            (stream,), _ = ray.wait(list(running), num_returns=1)
            task = running[stream]
            try:
                kind, *item = ray.get(next(stream))
            except StopIteration:
                del running[stream]
                continue
            except RayTaskError as err:  # the measurement raised: the same error as a local run's
                raise err.as_instanceof_cause() from None
            except RayError as err:  # the task's process or node died
                del running[stream]
                retried.setdefault(task.config.id, []).append(type(err).__name__)
                retry, views = _retry(task, out, err), _missing_views(out, sample_ids[: settings.show])
                if retry.samples or views:  # it may have died after sending its last record
                    running[_submit(settings, retry, views)] = retry
                continue
            if kind == "record":
                _append(out / "runs" / f"{task.config.id}.jsonl", item[0])
                bar.handle(task.config.id, "done", item[0]["sample"])
            elif kind == "image":
                (out / "images").mkdir(exist_ok=True)
                (out / "images" / f"{item[0]}.png").write_bytes(item[1])
            elif task.config.id not in skipped:  # "skipped": every shard of the configuration says so
                skipped[task.config.id] = item[0]
                bar.handle(task.config.id, "skipped", item[0])
        return skipped, retried


def _tasks(out: Path, configs: list[Config], sample_ids: list[str], shard: int | None) -> list[Task]:
    """One task per configuration (per `shard` samples of it, if given) holding the samples it lacks."""
    tasks = []
    for config in configs:
        done = read_done(out / "runs" / f"{config.id}.jsonl")
        todo = [i for i in sample_ids if i not in done]
        size = shard or len(todo)
        tasks += [Task(config, todo[start:start + size]) for start in range(0, len(todo), size)]
    return tasks


def _retry(task: Task, out: Path, err: RayError) -> Task:
    """The task again, with only the samples its configuration still lacks (read from its JSONL)."""
    if task.attempt + 1 >= ATTEMPTS:
        raise RaySweepError(f"{task.config.id}: its task died {ATTEMPTS} times, last with {_first_line(err)}; "
                            f"rerun the same command to resume it")
    done = read_done(out / "runs" / f"{task.config.id}.jsonl")
    return Task(task.config, [i for i in task.samples if i not in done], task.attempt + 1)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _missing_views(out: Path, sample_ids: list[str]) -> list[str]:
    return [i for i in sample_ids if not (out / "images" / f"{i}.png").is_file()]


def _submit(settings: Settings, task: Task, views: list[str]):
    resources = {"num_gpus": 1} if settings.device.startswith("cuda") else {"num_cpus": 1}
    return _measure.options(**resources).remote(settings, task.config, task.samples, views, task.attempt)


def _append(path: Path, record: dict) -> None:
    with path.open("a") as file:
        file.write(json.dumps(record) + "\n")


_WORKER: Worker | None = None  # in a Ray worker process: the last settings' model and samples, kept for the next task


def _worker(settings: Settings) -> Worker:
    global _WORKER
    if _WORKER is None or _WORKER.settings != settings:
        _WORKER = Worker(settings)
    return _WORKER


# Backpressure 1: a task measures its next sample only once the driver has taken the last record, so a
# task that dies has lost at most the sample it was measuring.
@ray.remote(num_returns="streaming", max_retries=0, _generator_backpressure_num_objects=1)
def _measure(settings: Settings, config: Config, sample_ids: list[str], views: list[str], attempt: int):
    """Yields ("image", sample id, PNG bytes) for each of `views`, then ("skipped", why) or one
    ("record", record) per sample of `sample_ids`, as the driver writes them (the retries are the driver's)."""
    import torch

    if not settings.device.startswith("cuda"):
        torch.set_num_threads(1)  # the one CPU the task asked Ray for
    worker = _worker(settings)
    by_id = {sample.id: sample for sample in worker.samples}
    for sample_id in views:
        picture = io.BytesIO()
        worker.view(by_id[sample_id]).save(picture, format="png")
        yield "image", sample_id, picture.getvalue()
    if not sample_ids:
        return
    sieve, reason = worker.sieve(config)
    if reason:
        yield "skipped", reason
        return
    exit_after = int(os.environ.get(EXIT_AFTER_RECORDS, 0))
    for count, record in enumerate(worker.records(config, sieve, [by_id[i] for i in sample_ids]), 1):
        yield "record", record
        if attempt == 0 and count == exit_after:
            os._exit(1)
