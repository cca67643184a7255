"""Fault tolerance of a training stage: a Ray Train worker killed mid-epoch (Ray restarts the group
from the last checkpoint), then the whole driver killed; the rerun finishes the stage and every row of
every epoch is trained exactly once. In a module of its own so that pytest-xdist (``make test``) runs it
beside the chain of tests/test_train_stages.py instead of after it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from aurora_core import stages
from aurora_core.model.build import is_export
from aurora_core.train.audit import committed_samples, restarts
from conftest import NO_CACHE, ROOT, SMALL_DATA
from test_train_stages import TRAIN, assert_has_duplicate_uids, cfg_for, expected_epoch, teacher_keys

pytestmark = pytest.mark.slow


def _wait(cond, timeout: float, what: str, proc=None):
    deadline = time.time() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended while waiting for {what}:\n" + proc.stdout.read()[-4000:])
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _train_workers(root_pid: int) -> list:
    """The Ray Train worker processes under the driver. A process a worker forks (a subprocess between
    fork and exec) carries the worker's title for a moment: seen once at the first checkpoint, a third
    'ray::RayTrainWorker' whose parent was a worker. Only processes whose parent is no worker count."""
    import psutil

    named = []
    for p in psutil.Process(root_pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                named.append(p)
        except psutil.Error:  # gone or exec'd meanwhile
            continue
    pids = {p.pid for p in named}
    return [p for p in named if p.ppid() not in pids]


def test_worker_kill_then_driver_stop_resume_exactly_once(small_shards, tmp_path):
    """A training worker is killed (Ray restarts the group from the last checkpoint), then the whole
    driver is killed; rerunning the same command with the same run name finishes the stage, and
    every epoch's rows are trained exactly once, as in an uninterrupted run."""
    epochs = 2
    # the frozen encoders run in the forward (no cache job to start in each of the two runs)
    # NO_CACHE after TRAIN: its head_steps=0 overrides the chain's (the head fit needs the cache)
    args = [sys.executable, "pipelines/teacher.py", *SMALL_DATA, *TRAIN, *NO_CACHE, f"run.root={tmp_path}",
            f"data.shards={small_shards}", f"teacher.epochs={epochs}", f"teacher.val_every_epochs={epochs}",
            "train.checkpoint_every_steps=2", "train.max_failures=3", "ray.num_cpus=4", "ray.object_store_mb=256",
            # the kill waits for the first checkpoint (400 s): no text pretraining before the teacher here (the
            # chain runs it); on a loaded machine its 4 steps took 3 min in this driver
            "text_pretrain.steps=0"]
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    cfg = cfg_for(tmp_path, *NO_CACHE, f"data.shards={small_shards}", f"teacher.epochs={epochs}")
    stage_dir = stages.RunLayout(cfg).stage_dir("teacher")
    ckpt_dir = tmp_path / "tiny" / "ray_train" / "teacher"
    p = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    try:
        # the snapshot is written once Ray Train has registered a reported checkpoint
        _wait(lambda: (ckpt_dir / "checkpoint_manager_snapshot.json").is_file(), 400, "a first checkpoint", p)
        workers = _train_workers(p.pid)
        assert len(workers) == 2, workers
        workers[1].kill()  # SIGKILL one training worker
        _wait(lambda: (stage_dir / "sample_log" / "rank0.jsonl").is_file() and len(restarts(stage_dir)) >= 2,
              300, "the worker group to restart", p)
        n = len([d for d in ckpt_dir.glob("checkpoint_*") if d.is_dir()])
        before = {d.name for d in ckpt_dir.glob("checkpoint_*")}
        _wait(lambda: {d.name for d in ckpt_dir.glob("checkpoint_*")} - before, 300,
              "a checkpoint after the restart", p)
        assert n >= 1
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the driver and everything it started
        p.wait()
    assert not is_export(stages.RunLayout(cfg).export("teacher"))
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert is_export(stages.RunLayout(cfg).export("teacher"))
    starts = restarts(stage_dir)
    assert len(starts) == 3 and starts[0] == 0 and 0 < starts[1] <= starts[2], starts
    seen = committed_samples(stage_dir)
    assert_has_duplicate_uids(small_shards)
    assert sorted(seen) == list(range(epochs))
    for epoch in range(epochs):
        assert set(seen[epoch]) == expected_epoch(cfg, small_shards, epoch) and max(seen[epoch].values()) == 1
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/tiny/mlflow.db")
    runs = c.search_runs([c.get_experiment_by_name("aurora-tiny").experiment_id],
                         filter_string="tags.`aurora.stage` = 'teacher'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the rerun logged into the same run
    steps = {m.step for m in c.get_metric_history(runs[0].info.run_id, "train/loss")}
    multiple = cfg.train.num_workers * cfg.teacher.batch_size * cfg.teacher.grad_accum
    assert steps == set(range(1, epochs * (len(teacher_keys(cfg, small_shards)) // multiple) + 1))
