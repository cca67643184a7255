"""Shared fixtures: one local Ray for the whole session, a small synthetic shard set."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray's single-machine mode before anything imports Ray: every local Ray of the tests (the session's,
# the pipelines' subprocesses, cluster/start_local.sh's head) listens on 127.0.0.1 only
from aurora_core.runtime import LOCAL_ONLY_ENV  # noqa: E402  (imports no Ray)

os.environ.update(LOCAL_ONLY_ENV)

# Small enough to convert in seconds, big enough that every split and expression kind appears.
SMALL_DATA = [
    "data.synthetic.train_clips=12", "data.synthetic.val_clips=4", "data.synthetic.test_s_clips=4",
    "data.synthetic.test_u_clips=4", "data.synthetic.test_n_clips=4", "data.rows_per_shard=16",
    "data.conversion_workers=1",
    # the unreferenced AVSBench-layout set that pipelines/all.py evaluates zero-shot: 6 test clips per
    # subset, so the official protocol has a short last batch
    "data.synthetic.avs_train_clips=2", "data.synthetic.avs_val_clips=1", "data.synthetic.avs_test_clips=6",
    # the tiny LLM's text pretraining (before the teacher, in the chain and the resume tests): a few steps
    "text_pretrain.steps=4", "text_pretrain.scenes=8", "text_pretrain.check_scenes=4",
]


# The model, Ray Data and GRPO unit tests run the frozen encoders in the forward (the path of a real
# config without the cache); the chain tests (test_train_stages.py) and test_feature_cache.py run the
# tiny default as it is, its encoders' outputs read from the frozen-feature cache.
# the head fit (teacher/sft.head_steps) reads the cache's SAM embeddings: off with it
NO_CACHE = ["data.cache_frozen_features=false", "data.cache_towers=false", "teacher.head_steps=0", "sft.head_steps=0"]
# Every ZeRO-3 run of the tests partitions every tiny parameter (configs/tiny.yaml keeps them whole:
# zero3.json's threshold), so that the gathers of partitioned weights are exercised.
ZERO3_GATHERS = ["train.deepspeed_config=configs/deepspeed/zero3-tiny.json",
                 "grpo.deepspeed_config=configs/deepspeed/zero3-tiny.json"]


# `make test` runs pytest-xdist with --dist loadfile --no-loadscope-reorder: two processes, a file each
# at a time, in this order first. xdist hands a process its next file once <= 2 of its tests are left, so
# the chain goes to one process and the kill test then GRPO to the other; the chain's process takes the
# real-width file after the chain: the two largest memory users (measured together: 21.6 of 24 GiB
# used) never run at once, and the short files fill the other process meanwhile.
LONG_FILES = ("test_train_stages.py", "test_train_resume.py", "test_grpo.py", "test_real_checkpoints.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every test that needs it (starting Ray costs ~5 s)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local", num_cpus=4, include_dashboard=False, object_store_memory=256 * 1024**2,
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
            runtime_env={"env_vars": {
                "DS_ACCELERATOR": "cpu", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")]),
            }},
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_cfg(tmp_path_factory):
    from aurora_core.config import load_config

    root = tmp_path_factory.mktemp("runs")
    # LoRA on, as in the real-model configs: the model, rollout and learner tests check its wiring. The
    # chain tests (test_train_stages.py) run the tiny default as it is, its whole LLM training.
    return load_config(ROOT / "configs" / "tiny.yaml",
                       SMALL_DATA + NO_CACHE + ZERO3_GATHERS + ["model.lora.enabled=true", f"run.root={root}"])


@pytest.fixture(scope="session")
def small_shards(small_cfg):
    """A converted synthetic shard set (session-wide: read-only for tests)."""
    from aurora_core.data import shards, synthetic

    raw = small_cfg.data.raw_dir(small_cfg.run)
    synthetic.generate(raw, small_cfg.data)
    out = small_cfg.data.shards_dir(small_cfg.run)
    shards.convert(raw, out, small_cfg.data, source="synthetic", progress=False)
    return out


def load_script(path: Path):
    """A script of bench/ or pipelines/ imported as a module (neither folder is a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(*args: str, cwd: Path = ROOT, timeout: int = 600, env: dict | None = None):
    import subprocess

    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=e)


def decoded_rows(shards_dir, split: str, n: int, data_cfg, features_dir: str | None = None):
    """The first n rows of a split, decoded like the Ray Data pipeline does (no Ray needed);
    ``features_dir``: with the SAM embeddings of that cache (data.cache_frozen_features)."""
    import pyarrow.parquet as pq

    from aurora_core.data import shards

    table = pq.read_table(shards.split_files(shards_dir, [split])).slice(0, n)
    raw = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    return shards.collate(shards.decode_batch(raw, data_cfg.frame_size, data_cfg.num_frames,
                                              data_cfg.sample_rate, data_cfg.audio_seconds,
                                              features_dir=features_dir))
