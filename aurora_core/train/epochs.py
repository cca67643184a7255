"""Training data on Ray Data, with an exactly-once data position across restarts.

Every epoch is its own dataset (``train_e<k>``: seeded block order, rows tagged with their epoch)
that Ray Train splits across the workers (``get_dataset_shard``). ZeRO-3 needs every rank to take the same number of steps, so each epoch is
trimmed, by a seeded choice, to a multiple of workers x batch x accumulation rows (the left-out rows
differ from epoch to epoch; the count is logged). Which rows a worker receives is decided by Ray
Data's streaming split at run time, so the data position of a checkpoint is the *set* of row keys
(unique even where the release repeats a uid) already trained on in the current epoch. On resume, rank 0 writes that set to ``resume.json`` before
any worker starts reading, and the pipeline drops those rows before the split: the rest of every
epoch is trained exactly once, whatever rank held which row before.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aurora_core.config import DataConfig
from aurora_core.data import shards


def left_out(keys: list[str], multiple: int, seed: int, epoch: int) -> list[str]:
    """The rows (keys) an epoch leaves out so that its size is a multiple of ``multiple`` (seeded)."""
    extra = len(keys) % multiple
    if extra == 0:
        return []
    rng = np.random.default_rng([seed, epoch])
    return sorted(keys[i] for i in rng.choice(len(keys), size=extra, replace=False))


class DropRows:
    """Ray Data batch filter for one epoch: drops the epoch's left-out row keys and, read from
    ``resume_file`` when the pipeline runs (so a worker-group restart sees the newest checkpoint),
    the rows already trained on; tags the rows with their epoch."""

    def __init__(self, dropped: list[str], resume_file: str | None, epoch: int):
        self.dropped = set(dropped)
        self.resume_file = resume_file
        self.epoch = epoch

    def _resumed(self) -> tuple[bool, set[str]]:
        """(whole epoch done, row keys of it done)"""
        if not self.resume_file or not os.path.exists(self.resume_file):
            return False, set()
        state = json.loads(Path(self.resume_file).read_text())
        if self.epoch < state["epochs_done"]:
            return True, set()
        return False, set(state["consumed"].get(str(self.epoch), []))

    def __call__(self, batch: pa.Table) -> pa.Table:
        all_done, consumed = self._resumed()
        if all_done:
            batch = batch.slice(0, 0)
        drop = self.dropped | consumed
        if drop and batch.num_rows:
            keep = pc.invert(pc.is_in(batch["key"], value_set=pa.array(sorted(drop), type=pa.string())))
            batch = batch.filter(keep)
        return batch.append_column("epoch", pa.array([self.epoch] * batch.num_rows, pa.int32()))


def _drop_fn(batch: pa.Table, rows: DropRows) -> pa.Table:
    # A plain function holding the filter object: Ray Data treats callable *classes* as actor UDFs.
    return rows(batch)


def epoch_pipeline(files: list[str], data: DataConfig, epoch: int, seed: int, dropped: list[str],
                    resume_file: str | None, batch_size: int, shuffle: bool):
    ds = shards.read_shards(files, data)
    if shuffle:
        # block order here, rows within a window in iter_torch_batches(local_shuffle_*): a full
        # random_shuffle is an all-to-all exchange that costs more than the tiny default's epoch
        ds = ds.randomize_block_order(seed=seed * 1000 + epoch)
    ds = ds.map_batches(_drop_fn, fn_kwargs={"rows": DropRows(dropped, resume_file, epoch)},
                        batch_format="pyarrow", batch_size=None)
    return ds.map_batches(
        shards.decode_batch, batch_size=batch_size, batch_format="numpy",
        fn_kwargs=dict(frame_size=data.frame_size, num_frames=data.num_frames, sample_rate=data.sample_rate,
                       audio_seconds=data.audio_seconds, features_dir=data.features_dir))


def train_datasets(files: list[str], keys: list[str], data: DataConfig, *, epochs: int, multiple: int, seed: int,
                   resume_file: str | None, batch_size: int, excluded: list[str] = ()) -> dict:
    """One dataset per epoch, ``train_e<k>``, rows tagged with their epoch; epoch k leaves out
    ``left_out(keys, multiple, seed, k)`` and every row of ``excluded`` (rows of ``files`` that are
    not in ``keys``: a stage's ``null_rows=false``). (A single union of all epochs would start one Ray
    Data execution instead of one per epoch, but its start-up grows with the epoch count and is slower.)"""
    return {f"train_e{e}": epoch_pipeline(files, data, e, seed, left_out(keys, multiple, seed, e) + list(excluded),
                                           resume_file, batch_size, True) for e in range(epochs)}


def val_dataset(files: list[str], keys: list[str], data: DataConfig, *, workers: int, seed: int, batch_size: int):
    """The validation rows, trimmed (seeded) to a multiple of the workers so ZeRO-3 ranks stay in step."""
    return epoch_pipeline(files, data, 0, seed, left_out(keys, workers, seed, 0), None, batch_size, False)


def write_resume_file(path: Path, epochs_done: int, consumed: dict[str, list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"epochs_done": epochs_done, "consumed": consumed}))
    os.replace(tmp, path)
