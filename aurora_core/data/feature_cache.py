"""The frozen encoders' outputs computed once per clip and stored beside the shards (``data.cache_frozen_features``).

SAM's image encoder is frozen, and at ViT-H widths (~3 TFLOP a 1024-px frame) it is the largest
repeated cost of a run: every epoch of every supervised stage, every GRPO step and every evaluation
embeds the same frames again. With the option on, a Ray Data job -- an actor pool holding the frozen
encoders, on GPUs where ``inference.gpus_per_actor`` > 0 -- embeds each distinct clip once; the
decoders (:func:`aurora_core.data.shards.decode_batch`) then hand the model the stored outputs
instead of SAM's pixels, and the encoder never runs in training, rollouts or evaluation.

``data.cache_towers`` stores the audio and vision towers' outputs beside them (the LLM-width features
that replace the ``<|AUDIO|>`` / ``<|VIDEO|>`` placeholders): the processors and the towers then do
not run either. At 7B the towers are ~7 % of the frozen FLOPs and their outputs ~6 MiB a clip, so
the real configs leave it off; on the tiny default (``configs/tiny.yaml``) the towers and SAM's
encoder were ~40 % of a training step's time and ~60 % of a ZeRO-3 step's (their modules' hooks),
measured in-process: 0.45 s -> 0.22 s a ZeRO-3 step of 8 rows.

Layout, content-addressed: every shard set of a run (the Ref-AVS shards, the reflect stage's
rewritten copy) shares one cache, and a clip that several expressions refer to (Ref-AVS: 20,261
expressions over 4,002 videos) is stored once::

    <shards parent>/frozen-features/<fingerprint>/manifest.json      what the outputs depend on
    <shards parent>/frozen-features/<fingerprint>/<ab>/<clip>.safetensors
        image_embeddings float16 [T, D, e, e] (SAM ViT-H: 256 x 64 x 64)
        audio, video     float16 [na, H], [nv, H]   (data.cache_towers only)

``<clip>`` is the shards' ``clip`` column: the sha256 of the row's frame and audio bytes as stored.
``<fingerprint>`` hashes the encoders' weights (a checkpoint's files, or the tiny default's seeded
random weights themselves), every size the inputs are prepared at, and the format version: another
SAM, another checkpoint or another resolution is another directory, never a stale hit. The AVSBench
subsets (5 frames, 5 s) get a cache of their own.

Disk: D x e x e x 2 bytes a frame = 2 MiB for SAM ViT-B/L/H at 1024 px; a 10-frame Ref-AVS clip 20 MiB,
the 4,002 Ref-AVS videos ~78 GiB (one file per expression would be ~400 GiB). The outputs are
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
from aurora_core.config import AuroraConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
SAM_TENSOR = "image_embeddings"
TOWER_TENSORS = ("audio", "video")  # data.cache_towers: the audio and vision towers' outputs
# what each stored tensor becomes in a decoded batch (aurora_core.data.shards.decode_batch)
BATCH_KEYS = {SAM_TENSOR: "sam_embeddings", "audio": "audio_features", "video": "video_features"}


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _files_digest(root: Path, what: str) -> dict[str, str]:
    """Digests of a checkpoint directory's config files and weights, hashed in full (ViT-H: 2.5 GB, a
    few seconds): two random-weight checkpoints of the same shapes share every header byte."""
    weights = sorted(root.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"{root}: no *.safetensors weights to fingerprint ({what})")
    return {p.name: _file_digest(p) for p in [root / "config.json", root / "preprocessor_config.json", *weights]
            if p.is_file()}


def _weights_digest(*modules) -> str:
    """sha256 over the named tensors of modules built in this process (the tiny default's seeded random
    weights: the same config and seed give the same bytes, another seed or width another digest)."""
    h = hashlib.sha256()
    for mod in modules:
        for name, t in sorted(mod.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def fingerprint(cfg: AuroraConfig) -> dict[str, Any]:
    """What the stored outputs depend on: the encoders' weights and every size their inputs are
    prepared at. ``paths`` (where the checkpoints lie) is recorded but not part of the digest."""
    m, d = cfg.model, cfg.data
    built = None
    if m.sam_path is None or (d.cache_towers and m.is_tiny):  # tiny parts: hash the weights themselves
        from aurora_core.model.build import build_model

        built, _ = build_model(m, d)
    sam = (_files_digest(Path(m.sam_path), "model.sam_path") if m.sam_path is not None
           else {"weights": _weights_digest(built.sam.vision_encoder)})
    fp: dict[str, Any] = {"format_version": FORMAT_VERSION, "sam": sam, "sam_image_size": m.sam_image_size,
                          "frame_size": d.frame_size, "num_frames": d.num_frames, "dtype": "float16",
                          "paths": {"sam": m.sam_path, "llm": m.llm_path}}
    if d.cache_towers:
        towers = ({"weights": _weights_digest(built.thinker.model.audio_tower, built.thinker.model.visual)}
                  if m.is_tiny else _files_digest(Path(m.llm_path), "model.llm_path"))
        fp.update(towers=towers, video_size=m.video_size, video_fps=m.video_fps,
                  audio_hop_length=m.audio_hop_length, audio_seconds=d.audio_seconds, sample_rate=d.sample_rate)
    return fp


def _digest(fp: dict[str, Any]) -> str:
    key = {k: v for k, v in fp.items() if k != "paths"}  # the same files elsewhere are the same encoders
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir(cfg: AuroraConfig, fp: dict[str, Any] | None = None) -> Path:
    """Where this run's cache lives: ``data.frozen_features_dir`` if set, else beside the shard set."""
    if cfg.data.frozen_features_dir:
        return Path(cfg.data.frozen_features_dir).expanduser().resolve()
    fp = fp or fingerprint(cfg)
    kind = "sam+towers" if cfg.data.cache_towers else "sam"
    return cfg.data.shards_dir(cfg.run).parent / "frozen-features" / f"{kind}-{_digest(fp)}"


def _clip_path(root: Path, clip: str) -> Path:
    return root / clip[:2] / f"{clip}.safetensors"


def _check_manifest(root: Path, fp: dict[str, Any]) -> None:
    path = root / "manifest.json"
    if not path.is_file():
        return
    theirs = json.loads(path.read_text())["fingerprint"]
    if _digest(theirs) != _digest(fp):
        diff = sorted(k for k in set(fp) | set(theirs) if k != "paths" and fp.get(k) != theirs.get(k))
        raise ValueError(f"{path}: the cached frozen features were made with other settings ({', '.join(diff)}: "
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


class FrozenEncoderStage:
    """Ray Data actor UDF: the frozen encoders, loaded once per actor; {clip, frames, audio} rows ->
    {clip, image_embeddings [B, T, D, e, e] (+ audio [B, na, H], video [B, nv, H] with data.cache_towers)},
    float16. A real SAM alone loads only its image encoder; the towers (and the tiny default, which
    is built whole from its config in a blink) come from the model builder, as every stage builds them."""

    def __init__(self, cfg: dict[str, Any]):
        import torch

        from aurora_core.config import config_from_dict
        from aurora_core.model.build import build_model, torch_dtype

        c = config_from_dict(cfg)
        logs.setup(c.run.dir, "feature-cache", console_level="WARNING")
        self.data = c.data
        self.towers = c.data.cache_towers
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch_dtype(c.model.dtype)
        self.whole = self.towers or c.model.sam_path is None
        if self.whole:
            self.model, self.proc = build_model(c.model, c.data)
            self.model.to(self.device).eval()
        else:
            from transformers import SamModel

            from aurora_core.model.processor import sam_processor

            self.encoder = SamModel.from_pretrained(c.model.sam_path, local_files_only=True, dtype=self.dtype,
                                                    use_safetensors=True).vision_encoder.to(self.device).eval()
            self.sam_processor = sam_processor(c.model)
            self.encoder_batch = c.model.encoder_batch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from aurora_core.data.shards import decode_audio, decode_frames

        keys = [str(k) for k in batch["key"]]
        frames = torch.stack([decode_frames(list(f), self.data.frame_size) for f in batch["frames"]])
        out: dict[str, Any] = {"clip": np.asarray(batch["clip"])}
        with torch.no_grad():
            if self.whole:
                audio = torch.from_numpy(np.stack([decode_audio(a, self.data.sample_rate, self.data.audio_seconds, k) for a, k in zip(batch["audio"], keys)]))
                inputs = self.proc.prompt_batch({"frames": frames, "audio": audio, "exp": [""] * len(keys)})
                f = self.model.frozen_features(inputs.to(self.device, self.dtype))
                out[SAM_TENSOR] = f.image_embeddings
                if self.towers:
                    out.update(audio=f.audio, video=f.video)
            else:
                px = self.sam_processor(images=list(frames.flatten(0, 1)), return_tensors="pt")["pixel_values"]
                px = px.to(self.device, self.dtype)
                emb = torch.cat([self.encoder(px[i:i + self.encoder_batch]).last_hidden_state
                                 for i in range(0, px.shape[0], self.encoder_batch)])
                out[SAM_TENSOR] = emb.unflatten(0, frames.shape[:2])
        return {k: v if k == "clip" else v.to(torch.float16).cpu().numpy() for k, v in out.items()}


class EmbeddingSink(Datasink):
    """Writes each clip's tensors to ``<root>/<ab>/<clip>.safetensors`` (temp file, then rename: a
    reader never sees half a file, and a rerun after a crash redoes only what is missing)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def write(self, blocks, ctx) -> int:
        from ray.data.block import BlockAccessor
        from safetensors.numpy import save_file

        written = 0
        for block in blocks:
            rows = BlockAccessor.for_block(block).to_numpy()
            names = [k for k in (SAM_TENSOR, *TOWER_TENSORS) if k in rows]
            for i, clip in enumerate(rows["clip"]):
                path = _clip_path(self.root, str(clip))
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
                save_file({k: np.ascontiguousarray(rows[k][i], dtype=np.float16) for k in names}, str(tmp))
                os.replace(tmp, path)
                written += path.stat().st_size
        return written


def _row_clips(files: list[str]) -> tuple[list[str], dict[str, str]]:
    """Every row's clip id (the shards' ``clip`` column), and one row key per distinct clip (the first)."""
    clips, first = [], {}
    for f in files:
        t = pq.read_table(f, columns=["key", "clip"])
        for key, c in zip(t["key"].to_pylist(), t["clip"].to_pylist()):
            clips.append(c)
            first.setdefault(c, key)
    return clips, first


def ensure(cfg: AuroraConfig, shards_dir: Path) -> CacheReport:
    """Encode every clip of the shard set at ``shards_dir`` that the cache lacks (a Ray Data actor pool,
    ``inference.actors`` x (``cpus_per_actor``, ``gpus_per_actor``)), then write the manifest."""
    import ray.data
    from ray.data.expressions import col

    from aurora_core.config import to_dict
    from aurora_core.data import shards
    from aurora_core.runtime import init_ray

    t0 = time.time()
    fp = fingerprint(cfg)
    root = cache_dir(cfg, fp)
    _check_manifest(root, fp)
    manifest = shards.load_manifest(shards_dir)
    files = shards.split_files(shards_dir, manifest["splits"])
    clips, first = _row_clips(files)
    missing = [c for c in first if not _clip_path(root, c).is_file()]
    report = CacheReport(str(root), len(clips), len(first), len(first) - len(missing), len(missing), 0, 0.0)
    log.info("frozen-feature cache %s: %d rows, %d distinct clips, %d cached, %d to encode", root, len(clips),
             len(first), report.cached_before, len(missing))
    if missing:
        init_ray(cfg)
        inf = cfg.inference
        keys = {first[c] for c in missing}
        ds = (ray.data.read_parquet(files).select_columns(["key", "clip", "frames", "audio"])
              .filter(expr=col("key").is_in(sorted(keys))))  # pushed down into the Parquet read
        # a 1024-px clip is ~120 MB of SAM pixels: few per call at real widths, more for the tiny default
        per_call = 16 if cfg.model.is_tiny else max(1, cfg.model.encoder_batch // cfg.data.num_frames)
        ds = ds.map_batches(FrozenEncoderStage, batch_size=per_call,
                            batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=inf.actors),
                            num_cpus=inf.cpus_per_actor,
                            num_gpus=inf.gpus_per_actor or None, fn_constructor_kwargs={"cfg": to_dict(cfg)})
        root.mkdir(parents=True, exist_ok=True)
        ds.write_datasink(EmbeddingSink(root))
        report.bytes_written = sum(_clip_path(root, c).stat().st_size for c in missing)
        still = [c for c in missing if not _clip_path(root, c).is_file()]
        if still:
            raise RuntimeError(f"frozen-feature cache {root}: {len(still)} clips were not written "
                               f"(e.g. the clip of row {first[still[0]]} in {shards_dir})")
    report.seconds = time.time() - t0
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"manifest.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"fingerprint": fp, "last_build": asdict(report)}, indent=1))
    os.replace(tmp, root / "manifest.json")
    return report


# --------------------------------------------------------------------------- reading

def read(root: str | Path, clips: Iterable[str], keys: Iterable[str]) -> dict[str, np.ndarray]:
    """The cached outputs of a batch of rows (their ``clip`` ids), float16, under their batch names:
    ``sam_embeddings`` [B, T, D, e, e] (+ ``audio_features`` [B, na, H], ``video_features`` [B, nv, H]
    when the cache holds the towers'). A clip missing from the cache is an error naming the row: the
    cache is built before a stage reads it."""
    from safetensors.numpy import load_file

    root = Path(root)
    out: dict[str, list[np.ndarray]] = {}
    for clip, key in zip(clips, keys):
        path = _clip_path(root, str(clip))
        if not path.is_file():
            raise FileNotFoundError(f"row {key}: its clip has no frozen features in {root} ({path.name}); "
                                    "the cache is built at the start of each stage (data.cache_frozen_features): "
                                    "rerun the stage, or unset data.frozen_features_dir")
        for k, v in load_file(str(path)).items():
            out.setdefault(BATCH_KEYS[k], []).append(v)
    return {k: np.stack(v) for k, v in out.items()}
