"""Parquet shards: conversion from the Ref-AVS layout, and the Ray Data pipeline that reads them.

Shard set layout::

    <shards>/manifest.json                 written last: its presence marks a complete set
    <shards>/<split>/part-<k>.parquet      one row per expression (SCHEMA)
    <shards>/quarantine.jsonl              lenient mode only: {key, uid, file, reason, line} per rejected row

Conversion streams: rows are cut into chunks of ``data.rows_per_shard``; a process pool reads and
validates each chunk and writes its shard itself, so the parent only holds counts and memory stays
bounded by (workers x in-flight chunks x shard size) whatever the dataset size. The whole set is
built in a staging directory and swapped into place (aurora_core.data.atomic).
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing as mp
import sys
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from aurora_core import reasoning
from aurora_core.config import DataConfig
from aurora_core.data import avsbench, refavs
from aurora_core.data.atomic import staged_dir
from aurora_core.data.refavs import BadRow, cot_for, read_cot, resolve_cot

log = logging.getLogger(__name__)

# 2: row keys and metadata lines (duplicated uids of the real release); 3: kind; 4: gt_frames and
# AVSBench shard sets (manifest: benchmark, subset, splits); 5: clip (the content address)
SCHEMA_VERSION = 5
SCHEMA = pa.schema([
    ("key", pa.string()),  # unique row key: the uid, or <uid>#<csv line> for a uid's later rows
    ("line", pa.int32()),  # line in metadata.csv (header = 1): the official evaluation order
    ("vid", pa.string()), ("uid", pa.string()), ("split", pa.string()), ("fid", pa.string()),
    ("class", pa.string()), ("exp", pa.string()), ("has_target", pa.bool_()),
    ("frames", pa.list_(pa.binary())),  # image bytes as released (Ref-AVS JPEG, AVSBench PNG), one per frame
    ("audio", pa.binary()),  # FLAC (lossless) mono at sample_rate
    ("sample_rate", pa.int32()),
    ("masks", pa.list_(pa.binary())),  # 8-bit PNG, 0 = background, 255 = target
    ("gt_frames", pa.list_(pa.bool_())),  # per frame: it has a ground-truth mask (AVSBench S4 train: frame 1 only)
    ("cot", pa.string()),  # ground-truth structured chain of thought
    ("kind", pa.string()),  # what the expression asks (synthetic: category/position/sound/time/combo/null;
    #                         AVSBench: s4 / ms3), or ""
    ("height", pa.int32()), ("width", pa.int32()),  # of frame 0, as released
    ("clip", pa.string()),  # sha256 of the frames' and the audio's bytes (clip_id): the frozen-feature cache's key
])
# what a decoder needs to read when the frozen-feature cache holds every encoder's output
# (data.cache_towers): no frame or audio bytes (the audio is ~90 % of a synthetic shard's bytes)
MEDIA_COLUMNS = ("frames", "audio")


def clip_id(frames: Iterable[bytes], audio: bytes) -> str:
    """The content address of a clip: sha256 over its frames' and its audio's bytes (each length-prefixed).
    Rows of one video (a Ref-AVS video has ~5 expressions) share it."""
    import hashlib

    h = hashlib.sha256()
    for b in [*frames, audio]:
        b = bytes(b)
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


@dataclass
class ConversionSummary:
    out: str
    splits: tuple[str, ...] = refavs.SPLITS  # the benchmark's splits
    rows_read: int = 0
    rows_kept: int = 0
    rows_quarantined: int = 0
    rows_skipped_by_split: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    duplicate_uid_rows: int = 0  # rows whose uid occurred on an earlier line (kept, keyed <uid>#<line>)
    duplicate_uids: list[str] = field(default_factory=list)
    media_from_vid: int = 0  # rows whose uid folder (uid.rsplit('_', 2)[0]) was missing: read from media/<vid>
    seconds: float = 0.0

    def render(self) -> str:
        skipped = sum(self.rows_skipped_by_split.values())
        lines = [f"shards: {self.out}",
                 f"rows read {self.rows_read} = kept {self.rows_kept} + quarantined {self.rows_quarantined}"
                 f" + skipped by split {skipped}"
                 + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(self.rows_skipped_by_split.items()))})"
                    if skipped else ""),
                 "rows per split: " + ", ".join(f"{s} {self.counts.get(s, 0)}" for s in self.splits),
                 f"duplicate uids: {len(self.duplicate_uids)} ({self.duplicate_uid_rows} later rows kept under "
                 "<uid>#<line> keys)",
                 f"media from the vid column: {self.media_from_vid}",
                 f"took {self.seconds:.1f}s"]
        return "\n".join(lines)


@dataclass
class ChunkResult:
    """What a conversion worker returns for one chunk of rows."""
    kept: dict[str, int]  # rows written per split
    quarantined: list[dict]  # {key, uid, file, reason, line} per rejected row (lenient)
    error: dict | None  # the first bad row (strict), same fields
    media_from_vid: int  # rows read from media/<vid> because their uid folder is missing


def _convert_chunk(loader, rows: list, idx: int, out: str, lenient: bool) -> ChunkResult:
    """Worker: load one chunk (``loader``: a RowLoader / AVSRowLoader holding the chunk's CoTs), write its shard(s)."""
    by_split: dict[str, list[dict[str, Any]]] = {}
    quarantined: list[dict] = []
    from_vid = 0
    for row in rows:
        try:
            rec = loader.load(row)
        except BadRow as e:
            entry = {**e.as_quarantine(), "uid": row.uid, "line": row.line}
            if not lenient:
                return ChunkResult({}, [], entry, from_vid)
            quarantined.append(entry)
            continue
        from_vid += rec.pop("media_from_vid")
        rec["clip"] = clip_id(rec["frames"], rec["audio"])
        by_split.setdefault(rec["split"], []).append(rec)
    for split, recs in by_split.items():
        (Path(out) / split).mkdir(exist_ok=True)
        table = pa.Table.from_pylist(recs, schema=SCHEMA)
        pq.write_table(table, Path(out) / split / f"part-{idx:05d}.parquet", compression="zstd")
    return ChunkResult({s: len(r) for s, r in by_split.items()}, quarantined, None, from_vid)


@dataclass
class Release:
    """A dataset in an official layout, read as far as the converter needs it."""

    benchmark: str  # refavs | avsbench
    subset: str | None  # AVSBench s4 | ms3
    splits: tuple[str, ...]
    metadata: Path  # the metadata CSV (named in messages)
    rows: list  # refavs.MetaRow / avsbench.AVSRow in file order (key, uid, line, split, problem)
    skipped: Counter[str]  # rows per split value that is not a split of the benchmark
    cot: dict | None  # row key or uid -> refavs.CotEntry (cot.jsonl), None: template CoTs
    loader: Any  # refavs.RowLoader / avsbench.AVSRowLoader (without CoTs; with_cot per chunk)


def open_release(root: Path, data: DataConfig) -> Release:
    """The Ref-AVS layout, or the AVSBench one when ``data.subset`` names a subset."""
    root = Path(root).resolve()
    if data.subset is None:
        rows, skipped = refavs.read_metadata(root)
        cot = read_cot(root)
        if cot is not None:
            rows = resolve_cot(rows, cot)
        return Release("refavs", None, refavs.SPLITS, root / "metadata.csv", rows, skipped, cot,
                       refavs.RowLoader(root, data.num_frames, data.sample_rate, None))
    rows, skipped = avsbench.read_metadata(root, data.subset)
    meta = avsbench.metadata_path(root, data.subset)
    cot = read_cot(meta.parent)
    if cot is not None:
        rows = avsbench.cot_problems(rows, cot)
    return Release("avsbench", data.subset, avsbench.AVSBENCH_SPLITS, meta, rows, skipped, cot,
                   avsbench.AVSRowLoader(root, data.subset, data.sample_rate, data.unref_expression, None))


def _chunk_cot(release: Release, rows: list) -> dict | None:
    if release.cot is None:
        return None
    if release.benchmark == "refavs":
        return {r.key: cot_for(r, release.cot) for r in rows if r.problem is None}
    return {r.key: release.cot.get(r.key) or release.cot[r.name] for r in rows if r.problem is None}


def convert(root: Path, out: Path, data: DataConfig, *, source: str, seed: int | None = None,
            config: dict[str, Any] | None = None, lenient: bool | None = None,
            progress: bool = True) -> ConversionSummary:
    """Convert a dataset in an official layout at ``root`` (Ref-AVS, or the AVSBench subset
    ``data.subset``) into a shard set at ``out``.

    Strict mode raises the first :class:`BadRow` (in metadata order) and leaves ``out`` untouched.
    """
    t0 = time.time()
    lenient = data.lenient if lenient is None else lenient
    root, out = Path(root).resolve(), Path(out).resolve()
    release = open_release(root, data)
    rows, skipped, splits = release.rows, release.skipped, release.splits
    dup_rows = [r for r in rows if r.key != r.uid]
    dup_uids = list(dict.fromkeys(r.uid for r in dup_rows))
    if dup_uids:
        log.warning("%d uids occur more than once in %s (%s%s): every row is kept, later ones under the "
                    "row key <uid>#<line>", len(dup_uids), release.metadata, ", ".join(dup_uids[:5]),
                    f" and {len(dup_uids) - 5} more" if len(dup_uids) > 5 else "")
    chunks = [rows[i:i + data.rows_per_shard] for i in range(0, len(rows), data.rows_per_shard)]
    summary = ConversionSummary(out=str(out), splits=splits, rows_read=len(rows) + sum(skipped.values()),
                                rows_skipped_by_split=dict(skipped), duplicate_uid_rows=len(dup_rows),
                                duplicate_uids=dup_uids)
    log.info("converting %d rows from %s into %d chunks (%s mode, %d workers)", len(rows), root,
             len(chunks), "lenient" if lenient else "strict", data.conversion_workers)
    counts: Counter[str] = Counter()
    quarantine: list[dict] = []
    with staged_dir(out) as tmp:
        def args(i: int) -> tuple:
            return (release.loader.with_cot(_chunk_cot(release, chunks[i])), chunks[i], i, str(tmp), lenient)

        # a bar on a terminal only (in a log its carriage returns pile up); the summary says the rest
        bar = tqdm(total=len(rows), unit="row", desc="shards", disable=not (progress and sys.stderr.isatty()),
                   file=sys.stderr)
        for res in _run_chunks(args, len(chunks), data.conversion_workers):
            if res.error is not None:
                bar.close()
                err = res.error
                raise BadRow(err["key"], err["file"], err["reason"] + f" ({release.metadata.name} line {err['line']})",
                             err["uid"])
            counts.update(res.kept)
            quarantine.extend(res.quarantined)
            summary.media_from_vid += res.media_from_vid
            bar.update(sum(res.kept.values()) + len(res.quarantined))
        bar.close()
        if summary.media_from_vid:
            log.warning("%d rows read their media from media/<vid>: the folder their uid names "
                        "(uid.rsplit('_', 2)[0], which the official loader reads) is missing", summary.media_from_vid)
        if lenient:
            with open(tmp / "quarantine.jsonl", "w", encoding="utf-8") as f:
                for q in quarantine:
                    f.write(json.dumps(q) + "\n")
        summary.rows_kept = sum(counts.values())
        summary.rows_quarantined = len(quarantine)
        summary.counts = {s: counts.get(s, 0) for s in splits}
        assert summary.rows_read == summary.rows_kept + summary.rows_quarantined + sum(skipped.values())
        summary.seconds = time.time() - t0
        manifest = {
            "schema_version": SCHEMA_VERSION, "source": source, "seed": seed, "root": str(root),
            "benchmark": release.benchmark, "subset": release.subset, "splits": list(splits),
            "counts": summary.counts, "rows_read": summary.rows_read, "rows_kept": summary.rows_kept,
            "rows_quarantined": summary.rows_quarantined, "rows_skipped_by_split": summary.rows_skipped_by_split,
            "duplicate_uid_rows": summary.duplicate_uid_rows, "duplicate_uids": summary.duplicate_uids,
            "media_from_vid": summary.media_from_vid,
            "num_frames": release.loader.num_frames, "sample_rate": data.sample_rate,
            "has_cot_annotations": release.cot is not None,
            "files": {s: sorted(p.name for p in (tmp / s).glob("*.parquet")) for s in splits if (tmp / s).is_dir()},
            "config": config or {}, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if quarantine:
        log.warning("%d rows quarantined, see %s", len(quarantine), out / "quarantine.jsonl")
    return summary


def _run_chunks(args, n: int, workers: int) -> Iterable[ChunkResult]:
    """Results in chunk order; at most 2 x workers chunks in flight (bounded memory)."""
    if workers == 1 or n <= 1:
        for i in range(n):
            yield _convert_chunk(*args(i))
        return
    # spawn: the parent may hold Ray or torch threads, which fork does not copy safely.
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
        pending: dict[int, Future] = {}
        nxt = 0
        for i in range(n):
            while nxt < n and len(pending) < 2 * workers:
                pending[nxt] = ex.submit(_convert_chunk, *args(nxt))
                nxt += 1
            while not pending[i].done():
                wait(list(pending.values()), return_when=FIRST_COMPLETED)
            result = pending.pop(i).result()
            if result.error is not None:
                for f in pending.values():
                    f.cancel()
            yield result


# --------------------------------------------------------------------------- reading

def load_manifest(shards: Path) -> dict[str, Any]:
    path = Path(shards) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no complete shard set at {shards} (manifest.json missing): run "
            f"`python pipelines/prepare_data.py` (or give data.shards=DIR)")
    manifest = json.loads(path.read_text())
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {manifest.get('schema_version')} but this code reads "
                         f"{SCHEMA_VERSION}; re-run pipelines/prepare_data.py")
    return manifest


def manifest_exists(shards: Path) -> bool:
    return (Path(shards) / "manifest.json").is_file()


def split_files(shards: Path, splits: Iterable[str]) -> list[str]:
    manifest = load_manifest(shards)
    files = []
    for s in splits:
        if s not in manifest["splits"]:
            raise ValueError(f"unknown split {s!r}: the {manifest['benchmark']} shard set {shards} has splits "
                             f"{', '.join(manifest['splits'])}")
        files += [str(Path(shards) / s / f) for f in manifest["files"].get(s, [])]
    if not files:
        raise ValueError(f"shard set {shards} has no rows for splits {list(splits)}")
    return files


def decode_frames(images: list[bytes], size: int):
    """A row's frames as stored (JPEG for Ref-AVS, PNG for AVSBench) -> uint8 [T, 3, size, size] RGB."""
    import torch
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2 import functional as TF

    imgs = [decode_image(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode.RGB) for b in images]
    return TF.resize(torch.stack(imgs), [size, size], antialias=True)


def decode_audio(wav_bytes: bytes, sample_rate: int, audio_seconds: float, row: str) -> np.ndarray:
    """A row's WAV bytes -> float32 [audio_seconds x sample_rate], zero-padded or cut."""
    import soundfile as sf

    n = int(round(audio_seconds * sample_rate))
    wav, sr = sf.read(io.BytesIO(wav_bytes), dtype="float32")
    if sr != sample_rate:
        raise ValueError(f"row {row}: audio at {sr} Hz, expected data.sample_rate={sample_rate}; "
                         "re-run prepare_data with this sample rate")
    out = np.zeros(n, dtype=np.float32)
    out[: min(n, len(wav))] = wav[:n]
    return out


def decode_batch(batch: dict[str, np.ndarray], frame_size: int, num_frames: int, sample_rate: int,
                 audio_seconds: float, score_size: int = 0, features_dir: str | None = None) -> dict[str, np.ndarray]:
    """Shard rows -> fixed-shape arrays: frames uint8 [B,T,3,S,S], masks uint8 [B,T,S,S] (0/1),
    gt_frames bool [B,T] (the frame has a ground-truth mask; an empty mask stands in where not),
    audio float32 [B,L] at ``sample_rate`` padded/cut to ``audio_seconds``; with ``score_size`` also
    score_masks uint8 [B,T,Z,Z] (0/1): the ground truth as the official Ref-AVS loader prepares it
    for scoring (:func:`aurora_core.metrics.official_gt_resize`); with ``features_dir`` (the
    frozen-feature cache, ``data.features_dir``) also sam_embeddings float16 [B,T,D,e,e] and, when it
    holds the towers' outputs, audio_features [B,na,H] and video_features [B,nv,H]."""
    import torch
    from torchvision.io import decode_png
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    n = len(batch["uid"])
    S, L = frame_size, int(round(audio_seconds * sample_rate))
    media = "frames" in batch  # read without MEDIA_COLUMNS: the model reads the frozen-feature cache only
    frames = np.empty((n, num_frames, 3, S, S), dtype=np.uint8) if media else None
    masks = np.empty((n, num_frames, S, S), dtype=np.uint8)
    audio = np.zeros((n, L), dtype=np.float32) if media else None
    gt_frames = np.ones((n, num_frames), dtype=bool)
    score_masks = np.empty((n, num_frames, score_size, score_size), dtype=np.uint8) if score_size else None
    for i in range(n):
        pngs = list(batch["masks"][i])
        jpgs = list(batch["frames"][i]) if media else pngs
        if len(jpgs) != num_frames or len(pngs) != num_frames:
            raise ValueError(f"row {batch['uid'][i]}: {len(jpgs)} frames / {len(pngs)} masks, "
                             f"expected data.num_frames={num_frames}")
        gt_frames[i] = batch["gt_frames"][i]
        if media:
            frames[i] = decode_frames(jpgs, S).numpy()
        ms = torch.stack([decode_png(torch.frombuffer(bytearray(b), dtype=torch.uint8)) for b in pngs])
        ms = TF.resize(ms, [S, S], interpolation=InterpolationMode.NEAREST)
        masks[i] = (ms[:, 0] > 0).numpy()
        if score_masks is not None:
            from aurora_core.metrics import official_gt_resize

            score_masks[i] = official_gt_resize(ms[:, 0], score_size).numpy()
        if media:
            audio[i] = decode_audio(batch["audio"][i], sample_rate, audio_seconds, batch["uid"][i])
    out = {k: np.asarray(batch[k]) for k in ("key", "uid", "vid", "split", "class", "exp", "cot", "kind", "clip")}
    out.update(line=np.asarray(batch["line"], dtype=np.int64), has_target=np.asarray(batch["has_target"], dtype=bool),
               masks=masks, gt_frames=gt_frames)
    if media:
        out.update(frames=frames, audio=audio)
    if score_masks is not None:
        out["score_masks"] = score_masks
    if features_dir is not None:
        from aurora_core.data import feature_cache

        out.update(feature_cache.read(features_dir, batch["clip"], batch["key"]))
    if "epoch" in batch:  # added by the training pipeline (aurora_core.train.epochs)
        out["epoch"] = np.asarray(batch["epoch"])
    return out


def read_shards(files: list[str], data: DataConfig, media: bool = False):
    """``ray.data.read_parquet`` of shard files: every column, but the frame and audio bytes left out
    when the frozen-feature cache holds every encoder's output (``data.cache_towers``) and ``media``
    is not asked for (an evaluation that silences the audio or blanks the frames re-encodes them)."""
    import ray.data

    cols = [f.name for f in SCHEMA if media or not data.cache_towers or f.name not in MEDIA_COLUMNS]
    # select_columns after the read is pushed down into it (Ray's replacement of read_parquet's columns=)
    return ray.data.read_parquet(files, schema=pa.schema([SCHEMA.field(c) for c in cols])).select_columns(cols)


def clip_dataset(shards: Path, splits: Iterable[str], data: DataConfig, *, batch_size: int = 16,
                 shuffle_seed: int | None = None, rows_per_block: int | None = None, score_size: int = 0,
                 media: bool = False, keys: list[str] | None = None):
    """A Ray Dataset of decoded, fixed-shape clips of the given splits (lazy, streaming); ``keys``:
    only the rows with these keys. ``rows_per_block`` re-cuts the blocks (one per shard file
    otherwise) so that a pool of N actors downstream gets at least N blocks to work on;
    ``score_size`` adds the scoring masks (decode_batch); ``media``: decode frames and audio even
    when the frozen-feature cache makes them unneeded."""
    from ray.data.expressions import col

    splits = list(splits)
    ds = read_shards(split_files(shards, splits), data, media)
    if keys is not None:
        ds = ds.filter(expr=col("key").is_in(list(keys)))  # pushed down into the Parquet read
    if rows_per_block:
        ds = ds.repartition(target_num_rows_per_block=rows_per_block)
    if shuffle_seed is not None:
        ds = ds.random_shuffle(seed=shuffle_seed)
    return ds.map_batches(
        decode_batch, batch_size=batch_size, batch_format="numpy",
        fn_kwargs=dict(frame_size=data.frame_size, num_frames=data.num_frames, sample_rate=data.sample_rate,
                       audio_seconds=data.audio_seconds, score_size=score_size, features_dir=data.features_dir))


def split_keys(shards_dir: Path, split: str) -> list[str]:
    """The row keys of a split, in shard order."""
    return pq.read_table(split_files(shards_dir, [split]), columns=["key"])["key"].to_pylist()


def null_keys(shards_dir: Path, split: str) -> list[str]:
    """The row keys of a split whose referent is absent (class ``null``), in shard order."""
    import pyarrow.compute as pc

    t = pq.read_table(split_files(shards_dir, [split]), columns=["key", "class"])
    return t.filter(pc.equal(t["class"], reasoning.NULL_CLASS))["key"].to_pylist()


def rows_by_key(shards: Path, keys: list[str], splits: list[str], data: DataConfig) -> dict[str, np.ndarray]:
    """Decoded rows by row key, in the given order, read directly (no Ray): a handful of rows, e.g. to
    restore queued rollouts or to draw mask overlays."""
    import pyarrow.dataset as pads

    table = pads.dataset(split_files(shards, splits), format="parquet").to_table(filter=pads.field("key").isin(keys))
    raw = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    dec = decode_batch(raw, data.frame_size, data.num_frames, data.sample_rate, data.audio_seconds,
                       features_dir=data.features_dir)
    order = {u: i for i, u in enumerate(dec["key"])}
    missing = [u for u in keys if u not in order]
    if missing:
        raise KeyError(f"rows {missing[:3]} are not in the {splits} splits of {shards}")
    idx = [order[u] for u in keys]
    return {k: v[idx] for k, v in dec.items()}


def collate(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """A batch of numpy columns -> tensors (string columns -> lists), for the model's processor."""
    import torch

    # read-only arrays (zero-copy from Arrow) are copied: torch tensors must be writable
    return {k: (v.tolist() if v.dtype == object or v.dtype.kind in "US"
                else torch.from_numpy(np.require(v, requirements=["C", "W"])))
            for k, v in batch.items()}


def summary_json(s: ConversionSummary) -> str:
    return json.dumps(asdict(s), indent=1)
