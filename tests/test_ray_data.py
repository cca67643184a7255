"""The Ray Data reading pipeline: decode to fixed shapes, and a disjoint complete split across workers."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from aurora_core.data import shards


def _worker_loop(config):
    import ray.train

    ctx = ray.train.get_context()
    it = ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=4, collate_fn=shards.collate)
    seen, shapes = [], set()
    for batch in it:
        seen += batch["key"]
        shapes.add((tuple(batch["frames"].shape[1:]), tuple(batch["masks"].shape[1:]), tuple(batch["audio"].shape[1:])))
    with open(f"{config['out']}/rank{ctx.get_world_rank()}.json", "w") as f:
        json.dump({"keys": seen, "shapes": [list(map(list, s)) for s in shapes]}, f)


def test_manifest_and_files(small_shards):
    m = shards.load_manifest(small_shards)
    assert m["schema_version"] == shards.SCHEMA_VERSION and m["source"] == "synthetic"
    for split, n in m["counts"].items():
        files = [small_shards / split / f for f in m["files"].get(split, [])]
        assert sum(pq.read_metadata(f).num_rows for f in files) == n
    with pytest.raises(ValueError, match="unknown split"):
        shards.split_files(small_shards, ["bogus"])


def test_missing_shards_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare_data.py"):
        shards.load_manifest(tmp_path)


@pytest.mark.slow
def test_trainer_workers_get_disjoint_complete_shares(ray_session, small_cfg, small_shards, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ds = shards.clip_dataset(small_shards, ["train"], small_cfg.data, batch_size=8)
    trainer = TorchTrainer(
        _worker_loop, train_loop_config={"out": str(tmp_path)},
        # fractional CPUs: leave CPUs for the Ray Data read tasks (2-core deadlock trap)
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
        datasets={"train": ds}, run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="split"),
    )
    trainer.fit()
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    a, b = set(got[0]["keys"]), set(got[1]["keys"])
    expected = set(pq.read_table(shards.split_files(small_shards, ["train"]), columns=["key"])["key"].to_pylist())
    assert a and b and not (a & b)
    assert a | b == expected
    assert len(got[0]["keys"]) + len(got[1]["keys"]) == len(expected)  # nothing read twice
    T, S = small_cfg.data.num_frames, small_cfg.data.frame_size
    L = int(small_cfg.data.audio_seconds * small_cfg.data.sample_rate)
    for g in got:
        assert g["shapes"] == [[[T, 3, S, S], [T, S, S], [L]]]


def test_an_epoch_leaves_out_the_excluded_rows(ray_session, small_cfg, small_shards):
    """A stage with null_rows=false (the tiny teacher): every epoch reads the split's rows less
    the null ones (and less its seeded left-out rows), each once."""
    from aurora_core.train.epochs import left_out, train_datasets

    files = shards.split_files(small_shards, ["train"])
    table = pq.read_table(files, columns=["key", "class"]).to_pylist()
    nulls = shards.null_keys(small_shards, "train")
    assert nulls and sorted(nulls) == sorted(r["key"] for r in table if r["class"] == "null")
    keys = [r["key"] for r in table if r["class"] != "null"]
    ds = train_datasets(files, keys, small_cfg.data, epochs=2, multiple=4, seed=0, resume_file=None,
                        batch_size=4, excluded=nulls)
    for e in (0, 1):
        got = [k for b in ds[f"train_e{e}"].iter_batches(batch_size=8) for k in b["key"]]
        assert sorted(got) == sorted(set(keys) - set(left_out(keys, 4, 0, e)))
