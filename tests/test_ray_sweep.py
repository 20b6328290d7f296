"""`tokensieve bench --ray`: a sweep run as Ray tasks on a local cluster (started here with `ray start --head`,
2 CPUs) gives the same records and table as the same sweep run locally; a task whose process dies midway
is run again on only the samples its configuration lacks; an address where no cluster answers is refused
in one line before any work."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ray

from tokensieve.bench import sweep
from tokensieve.bench.ray_sweep import EXIT_AFTER_RECORDS, _tasks
from tokensieve.bench.summary import read_runs, summarise
from tokensieve.bench.sweep import Config
from tokensieve.cli import app

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(methods="random", keeps="16", max_new_tokens=3, progress=False, limit=3)
# what a sample's measurement decides; the timings and memory peaks differ from run to run
SAME = ("config", "method", "keep", "sample", "category", "target", "prediction", "correct", "score", "tokens_before",
        "tokens_after", "kept", "grid", "groups", "prefill_flops", "prefill_flops_unreduced", "vision_flops",
        "new_tokens", "kv_cache_bytes", "warmup")
CONFIGS = ("baseline", "random-k16")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A one-node Ray cluster with 2 CPUs, whose tasks' first attempts exit after 1 record
    (EXIT_AFTER_RECORDS: the test-only hook in tokensieve/bench/ray_sweep.py). Its workers import this
    checkout's tokensieve; token authentication is off, as on a cluster no one else can reach."""
    port = free_port()
    env = {**os.environ, EXIT_AFTER_RECORDS: "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=false", f"--temp-dir={tmp_path_factory.mktemp('ray')}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "status", f"--address={address}"],
                             env=env, capture_output=True).returncode != 0:
            assert head.poll() is None and time.monotonic() < deadline, "ray start --head did not come up"
            time.sleep(1)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # the head and every process it started (SIGTERM drains for 30 s)
        head.wait(timeout=60)


def records(out: Path, config: str) -> list[dict]:
    return [json.loads(line) for line in (out / "runs" / f"{config}.jsonl").read_text().splitlines()]


def measured(out: Path, config: str) -> list[tuple]:
    """What each sample's measurement decided, by sample: the timings and memory peaks vary run to run."""
    return sorted(tuple(json.dumps(record[key]) for key in SAME) for record in records(out, config))


def table(out: Path):
    timings = ["prefill_ms", "decode_ms_per_token", "peak_memory_added_mib", "selection_ms"]
    return summarise(read_runs(out)).drop(columns=timings)


def test_a_ray_sweep_resumes_a_local_one_and_a_task_killed_midway_without_redoing_a_record(ray_head, tmp_path):
    local = sweep(out=tmp_path / "local", **SMALL)
    out = tmp_path / "ray"
    sweep(out=out, **{**SMALL, "limit": 1})  # a local run measured the first sample of each configuration
    first = {config: (out / "runs" / f"{config}.jsonl").read_bytes() for config in CONFIGS}

    sweep(out=out, ray=ray_head, **SMALL)

    described = json.loads((out / "sweep.json").read_text())
    # each configuration's task (samples 2 and 3) died after streaming sample 2 ...
    assert described["retried"] == {config: ["WorkerCrashedError"] for config in CONFIGS}
    for config in CONFIGS:
        # ... and its retry measured sample 3 only: each sample once, after the local run's record, unchanged
        assert (out / "runs" / f"{config}.jsonl").read_bytes().startswith(first[config])
        assert [r["sample"] for r in records(out, config)] == ["test-00000", "test-00001", "test-00002"]
        assert measured(out, config) == measured(local, config)
    assert table(out).equals(table(local)) and len(table(out)) == len(CONFIGS)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["test-00000.png", "test-00001.png",
                                                                  "test-00002.png"]
    assert {key: described[key] for key in ("model", "split", "samples", "configs", "skipped")} == \
           {key: json.loads((local / "sweep.json").read_text())[key] for key in ("model", "split", "samples", "configs",
                                                                                  "skipped")}


def test_shards_split_only_the_samples_a_configuration_lacks(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "baseline.jsonl").write_text('{"sample": "b"}\n{"sample": "d"}\n')
    configs = [Config(), Config("random", 16)]
    tasks = [(task.config.id, task.samples) for task in _tasks(tmp_path, configs, list("abcde"), shard=2)]
    assert tasks == [("baseline", ["a", "c"]), ("baseline", ["e"]),
                     ("random-k16", ["a", "b"]), ("random-k16", ["c", "d"]), ("random-k16", ["e"])]
    assert [t.samples for t in _tasks(tmp_path, configs, list("abcde"), shard=None)] == [["a", "c", "e"], list("abcde")]


@pytest.mark.parametrize("args, message", [
    (["--shard", "2"], "shard splits a configuration into Ray tasks: it needs ray (--ray ADDRESS)"),
    (["--ray", "local", "--workers", "2"], "workers=2 is for a run on this machine"),
    (["--ray", "local", "--shard", "0"], "shard must be at least 1 sample, not 0"),
])
def test_options_a_ray_sweep_cannot_take_are_refused_before_any_work(tmp_path, args, message):
    result = CliRunner().invoke(app, ["bench", "--out", str(tmp_path / "out"), "--limit", "1", *args],
                                env={"COLUMNS": "250"})
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "out").exists() and not ray.is_initialized()


def test_an_address_where_no_cluster_answers_is_one_line_before_any_work(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--ray", f"127.0.0.1:{free_port()}", "--out", str(tmp_path / "out"),
                                      "--limit", "1", "--methods", "random", "--keep", "16"])
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert "no Ray cluster answers there" in message and "ray start --head" in message and "Traceback" not in message
    assert not (tmp_path / "out").exists()  # nothing written, no model loaded
    assert not ray.is_initialized()
