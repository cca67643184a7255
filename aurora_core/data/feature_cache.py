"""SAM image embeddings computed once per clip and stored beside the shards (``data.cache_frozen_features``).

SAM's image encoder is frozen, and at ViT-H widths (~3 TFLOP a 1024-px frame) it is the largest
repeated cost of a run: every epoch of every supervised stage, every GRPO step and every evaluation
embeds the same frames again. With the option on, a Ray Data job -- an actor pool holding only SAM's
image encoder, on GPUs where ``inference.gpus_per_actor`` > 0 -- embeds each distinct clip once; the
decoders (:func:`aurora_core.data.shards.decode_batch`) then hand the model the stored embeddings
instead of SAM's pixels, and the encoder never runs in training, rollouts or evaluation.

Layout, content-addressed: every shard set of a run (the Ref-AVS shards, the reflect stage's
rewritten copy, the AVSBench subsets beside them) shares one cache, and a clip that several
expressions refer to (Ref-AVS: 20,261 expressions over 4,002 videos) is stored once::

    <shards parent>/frozen-features/sam-<fingerprint>/manifest.json      what the embeddings depend on
    <shards parent>/frozen-features/sam-<fingerprint>/<ab>/<clip>.safetensors
                                                    image_embeddings float16 [T, D, e, e] (SAM: 256 x 64 x 64)

``<clip>`` is the sha256 of the row's frame bytes as the shards store them. ``<fingerprint>`` hashes
the SAM checkpoint's files (config, preprocessor config, weights), ``model.sam_image_size``,
``data.frame_size`` (frames are resized to it before SAM's processor) and the format version: another
SAM or another resolution is another directory, never a stale hit.

Disk: D x e x e x 2 bytes a frame = 2 MiB for SAM ViT-B/L/H at 1024 px; a 10-frame Ref-AVS clip 20 MiB,
the 4,002 Ref-AVS videos ~78 GiB (one file per expression would be ~400 GiB). The embeddings are
computed in ``model.dtype`` and stored as float16; the model reads them back in its own dtype.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow.parquet as pq
from ray.data import Datasink

from aurora_core import logs
from aurora_core.config import AuroraConfig, DataConfig, ModelConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
TENSOR = "image_embeddings"  # the one tensor of each clip's safetensors file


def clip_id(frames: Iterable[bytes]) -> str:
    """The content address of a clip: sha256 over its frames' bytes (each length-prefixed)."""
    h = hashlib.sha256()
    for b in frames:
        b = bytes(b)
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def sam_fingerprint(m: ModelConfig, data: DataConfig) -> dict[str, Any]:
    """What the stored embeddings depend on. Hashes the SAM checkpoint's weight files in full
    (ViT-H: 2.5 GB, a few seconds, once per stage on the driver): two random-weight checkpoints of
    the same shapes share every header byte, so a header-only digest would not tell them apart."""
    if m.sam_path is None:
        raise ValueError("data.cache_frozen_features needs model.sam_path: the tiny default's SAM is drawn "
                         "at random per run, so its embeddings cannot be stored for later stages")
    root = Path(m.sam_path)
    weights = sorted(root.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"{root}: no *.safetensors weights to fingerprint (model.sam_path)")
    files = {p.name: _file_digest(p) for p in [root / "config.json", root / "preprocessor_config.json", *weights]
             if p.is_file()}
    return {"format_version": FORMAT_VERSION, "sam_path": str(root.resolve()), "files": files,
            "sam_image_size": m.sam_image_size, "frame_size": data.frame_size, "dtype": "float16"}


def _digest(fp: dict[str, Any]) -> str:
    key = {k: v for k, v in fp.items() if k != "sam_path"}  # the same files elsewhere are the same SAM
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir(cfg: AuroraConfig, fp: dict[str, Any] | None = None) -> Path:
    """Where this run's cache lives: ``data.frozen_features_dir`` if set, else beside the shard set."""
    if cfg.data.frozen_features_dir:
        return Path(cfg.data.frozen_features_dir).expanduser().resolve()
    fp = fp or sam_fingerprint(cfg.model, cfg.data)
    return cfg.data.shards_dir(cfg.run).parent / "frozen-features" / f"sam-{_digest(fp)}"


def _clip_path(root: Path, clip: str) -> Path:
    return root / clip[:2] / f"{clip}.safetensors"


def _check_manifest(root: Path, fp: dict[str, Any]) -> None:
    path = root / "manifest.json"
    if not path.is_file():
        return
    theirs = json.loads(path.read_text())["fingerprint"]
    if _digest(theirs) != _digest(fp):
        diff = sorted(k for k in set(fp) | set(theirs) if k != "sam_path" and fp.get(k) != theirs.get(k))
        raise ValueError(f"{path}: the cached SAM embeddings were made with other settings ({', '.join(diff)}: "
                         f"cached {[theirs.get(k) for k in diff]}, this run {[fp.get(k) for k in diff]}); "
                         "point data.frozen_features_dir elsewhere or unset it")


# --------------------------------------------------------------------------- building

@dataclass
class CacheReport:
    dir: str
    rows: int  # rows of the shard set
    clips: int  # distinct clips among them
    cached_before: int  # clips already in the cache
    computed: int  # clips embedded by this call
    bytes_written: int
    seconds: float


class SamEncoderStage:
    """Ray Data actor UDF: SAM's image encoder alone (no prompt encoder, no mask decoder, no LLM),
    loaded once per actor; {clip, frames} rows -> {clip, embeddings float16 [T, D, e, e]}."""

    def __init__(self, cfg: dict[str, Any]):
        import torch
        from transformers import SamModel

        from aurora_core.config import config_from_dict
        from aurora_core.model.build import torch_dtype
        from aurora_core.model.processor import sam_processor

        c = config_from_dict(cfg)
        logs.setup(c.run.dir, "feature-cache", console_level="WARNING")
        self.frame_size = c.data.frame_size
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch_dtype(c.model.dtype)
        self.encoder = SamModel.from_pretrained(c.model.sam_path, local_files_only=True, dtype=self.dtype,
                                                use_safetensors=True).vision_encoder.to(self.device).eval()
        self.processor = sam_processor(c.model)
        self.encoder_batch = c.model.encoder_batch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from aurora_core.data.shards import decode_frames

        out = []
        for frames in batch["frames"]:
            px = self.processor(images=list(decode_frames(list(frames), self.frame_size)),
                                return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
            with torch.no_grad():
                emb = torch.cat([self.encoder(px[i:i + self.encoder_batch]).last_hidden_state
                                 for i in range(0, px.shape[0], self.encoder_batch)])
            out.append(emb.to(torch.float16).cpu().numpy())
        return {"clip": np.asarray(batch["clip"]), "embeddings": np.stack(out)}


class EmbeddingSink(Datasink):
    """Writes each row's embeddings to ``<root>/<ab>/<clip>.safetensors`` (temp file, then rename: a
    reader never sees half a file, and a rerun after a crash redoes only what is missing)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def write(self, blocks, ctx) -> int:
        from ray.data.block import BlockAccessor
        from safetensors.numpy import save_file

        written = 0
        for block in blocks:
            rows = BlockAccessor.for_block(block).to_numpy()
            for clip, emb in zip(rows["clip"], rows["embeddings"]):
                path = _clip_path(self.root, str(clip))
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
                save_file({TENSOR: np.ascontiguousarray(emb, dtype=np.float16)}, str(tmp))
                os.replace(tmp, path)
                written += path.stat().st_size
        return written


def _row_clips(files: list[str]) -> tuple[list[str], dict[str, str]]:
    """Every row's clip id, and one row key per distinct clip (the first), reading the shards'
    ``key`` and ``frames`` columns one row group at a time."""
    clips, first = [], {}
    for f in files:
        pf = pq.ParquetFile(f)
        for g in range(pf.num_row_groups):
            t = pf.read_row_group(g, columns=["key", "frames"])
            for key, frames in zip(t["key"].to_pylist(), t["frames"].to_pylist()):
                c = clip_id(frames)
                clips.append(c)
                first.setdefault(c, key)
    return clips, first


def ensure(cfg: AuroraConfig, shards_dir: Path) -> CacheReport:
    """Embed every clip of the shard set at ``shards_dir`` that the cache lacks (a Ray Data actor pool,
    ``inference.actors`` x (``cpus_per_actor``, ``gpus_per_actor``)), then write the manifest."""
    import ray.data
    from ray.data.expressions import col

    from aurora_core.config import to_dict
    from aurora_core.data import shards
    from aurora_core.runtime import init_ray

    t0 = time.time()
    fp = sam_fingerprint(cfg.model, cfg.data)
    root = cache_dir(cfg, fp)
    _check_manifest(root, fp)
    manifest = shards.load_manifest(shards_dir)
    files = shards.split_files(shards_dir, manifest["splits"])
    clips, first = _row_clips(files)
    missing = [c for c in first if not _clip_path(root, c).is_file()]
    report = CacheReport(str(root), len(clips), len(first), len(first) - len(missing), len(missing), 0, 0.0)
    log.info("SAM embedding cache %s: %d rows, %d distinct clips, %d cached, %d to embed", root, len(clips),
             len(first), report.cached_before, len(missing))
    if missing:
        init_ray(cfg)
        inf = cfg.inference
        keys = {first[c] for c in missing}
        ds = (ray.data.read_parquet(files).select_columns(["key", "frames"])
              .filter(expr=col("key").is_in(sorted(keys))))  # pushed down into the Parquet read
        ds = ds.map_batches(_with_clip, batch_format="numpy", batch_size=16)
        ds = ds.map_batches(SamEncoderStage, batch_size=max(1, cfg.model.encoder_batch // cfg.data.num_frames),
                            batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=inf.actors),
                            num_cpus=inf.cpus_per_actor,
                            num_gpus=inf.gpus_per_actor or None, fn_constructor_kwargs={"cfg": to_dict(cfg)})
        root.mkdir(parents=True, exist_ok=True)
        ds.write_datasink(EmbeddingSink(root))
        report.bytes_written = sum(_clip_path(root, c).stat().st_size for c in missing)
        still = [c for c in missing if not _clip_path(root, c).is_file()]
        if still:
            raise RuntimeError(f"SAM embedding cache {root}: {len(still)} clips were not written "
                               f"(e.g. the clip of row {first[still[0]]} in {shards_dir})")
    report.seconds = time.time() - t0
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"manifest.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"fingerprint": fp, "last_build": asdict(report)}, indent=1))
    os.replace(tmp, root / "manifest.json")
    return report


def _with_clip(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"clip": np.asarray([clip_id(f) for f in batch["frames"]]), "frames": batch["frames"]}


# --------------------------------------------------------------------------- reading

def read(root: str | Path, frames: Iterable[Iterable[bytes]], keys: Iterable[str]) -> np.ndarray:
    """The cached embeddings of a batch of rows (their frame bytes) -> float16 [B, T, D, e, e]. A clip
    missing from the cache is an error naming the row: the cache is built before a stage reads it."""
    from safetensors.numpy import load_file

    root = Path(root)
    out = []
    for f, key in zip(frames, keys):
        path = _clip_path(root, clip_id(f))
        if not path.is_file():
            raise FileNotFoundError(f"row {key}: its clip has no SAM embeddings in {root} ({path.name}); "
                                    "the cache is built at the start of each stage (data.cache_frozen_features): "
                                    "rerun the stage, or unset data.frozen_features_dir")
        out.append(load_file(str(path))[TENSOR])
    return np.stack(out)
