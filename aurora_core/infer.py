"""Batch inference with exported models on a Ray Data actor pool.

One callable class, :class:`ExportPredictor`, serves three jobs:
- ``seg_embedding``: the projected [SEG] embedding of the model's direct answer (SFT distillation targets);
- ``answer``: the model's own answer (greedy or sampled), its parsed class, its masks and their
  per-row metric counts (reflect stage, evaluation).
Each actor loads its exports once (``map_batches(..., compute=ActorPoolStrategy(size=N))``). In
``answer`` mode an actor may hold several exports (``eval.together``: every stage of a small model in
one pass over the data): each row is answered by each of them, the output rows tagged with the
export's name (``model``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from aurora_core import logs, reasoning
from aurora_core.config import AuroraConfig, config_from_dict, to_dict
from aurora_core.data import shards
from aurora_core.metrics import SplitMetrics, mask_iou, score_logits
from aurora_core.model.aurora import empty_masks_where_none

log = logging.getLogger(__name__)


class ExportPredictor:
    def __init__(self, exports: dict[str, str], cfg: dict[str, Any], mode: str, max_new_tokens: int = 160,
                 temperature: float = 0.0, seed: int = 0, score_size: int = 0, no_seg: str = "empty",
                 j_threshold: float = 0.4):
        from aurora_core.model.build import load_export

        self.cfg = config_from_dict(cfg)
        logs.setup(self.cfg.run.dir, "inference", console_level="WARNING")
        if mode != "answer" and len(exports) != 1:
            raise ValueError(f"mode {mode!r} reads one export, got {len(exports)}")
        self.mode = mode
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.score_size = score_size  # >0: metrics at this size against the batch's score_masks (evaluation)
        self.no_seg = no_seg  # empty | force (eval.no_seg)
        self.j_threshold = j_threshold  # sigmoid threshold of J: 0.4 Ref-AVS, 0.5 AVSBench (metrics)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.models = {}  # name -> (model, processor), in the order given
        for name, export_dir in exports.items():
            model, proc, _ = load_export(export_dir, self.cfg.data, trainable=False, runtime=self.cfg.model)
            self.models[name] = (model.to(self.device).eval(), proc)
        self.seed = seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        b = shards.collate(batch)
        with torch.no_grad():
            if self.mode == "seg_embedding":
                model, proc = next(iter(self.models.values()))
                inp = proc.train_batch(b, [reasoning.direct_answer(c) for c in b["class"]])
                out = model(inp.to(self.device, next(model.llm.parameters()).dtype), with_masks=False)
                return {"key": np.asarray(b["key"]), "embedding": list(out.seg_embedding.float().cpu().numpy())}
            if self.mode == "answer":
                parts = []
                for name, (model, proc) in self.models.items():
                    # the same draws whatever the other exports did: seeded per batch and model
                    torch.manual_seed(self.seed + int(b["line"][0]))
                    parts.append({**self._answer(b, model, proc), "model": np.asarray([name] * len(b["key"]))})
                return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        raise ValueError(f"unknown mode {self.mode!r}")

    def _answer(self, b: dict[str, Any], model, proc) -> dict[str, Any]:
        from torchvision.io import encode_png

        dtype = next(model.llm.parameters()).dtype
        prompts = ablated_prompts(proc, b, self.cfg.eval.ablate).to(self.device, dtype)
        sample = self.temperature > 0
        r = model.generate_with_masks(
            prompts, num_samples=1, temperature=self.temperature if sample else 1.0, top_p=1.0,
            max_new_tokens=self.max_new_tokens, eos_id=proc.eos_id, pad_id=proc.pad_id,
            suppress_ids=proc.suppress_ids, decode=proc.decode, do_sample=sample)
        masks = r.mask_logits
        if self.no_seg == "force":
            suffix = proc.tok(" " + reasoning.ANSWER_SUFFIX, add_special_tokens=False).input_ids
            masks = model.masks_with_forced_seg(prompts, r, suffix, proc.eos_id)
        if self.cfg.model.empty_mask_on_none:
            masks = empty_masks_where_none(masks, r.texts)
        masks = masks.float().cpu()
        out: dict[str, list] = {k: [] for k in ("key", "line", "uid", "split", "class", "kind", "answer",
                                                "pred_class", "class_correct", "well_formed", "structured",
                                                "has_seg", "iou", "metrics", "pred_masks")}
        for i, text in enumerate(r.texts):
            p = reasoning.parse_answer(text)
            if self.score_size:  # as the official protocol scores: its size, its own ground-truth resize
                pred, gt = score_logits(masks[i], self.score_size), b["score_masks"][i]
            else:
                pred, gt = masks[i], b["masks"][i]
            valid = b["gt_frames"][i]  # frames with a ground-truth mask
            pred, gt = pred[valid], gt[valid]
            acc = SplitMetrics(j_threshold=self.j_threshold)
            acc.update(pred, gt)
            out["key"].append(b["key"][i])
            out["line"].append(int(b["line"][i]))
            out["uid"].append(b["uid"][i])
            out["split"].append(b["split"][i])
            out["class"].append(b["class"][i])
            out["answer"].append(text)
            out["pred_class"].append(p.predicted_class or "")
            out["class_correct"].append(p.class_correct(b["class"][i]))
            out["well_formed"].append(p.well_formed)
            out["structured"].append(p.structured)
            out["kind"].append(b["kind"][i])
            out["has_seg"].append(bool(r.has_seg[i]))
            out["iou"].append(mask_iou(pred, gt, self.j_threshold))
            out["metrics"].append(json.dumps(acc.to_state()))
            fg = (torch.sigmoid(masks[i]) > 0.4).to(torch.uint8) * 255
            out["pred_masks"].append([encode_png(m[None]).numpy().tobytes() for m in fg])
        result = {k: np.asarray(v) for k, v in out.items() if k != "pred_masks"}
        masks = np.empty(len(out["pred_masks"]), dtype=object)  # 1-D: one list of PNGs per row (list<binary>)
        masks[:] = out["pred_masks"]
        result["pred_masks"] = masks
        return result


def ablated_prompts(proc, b: dict[str, Any], ablate: str | None):
    """The prompt batch of ``b`` with one input taken away (``eval.ablate``): ``audio`` silence,
    ``text`` an empty expression, ``video`` blank frames for the thinker's vision tower while SAM
    keeps the real frames (its image embeddings are what the mask decoder draws on)."""
    from dataclasses import replace

    if ablate is None:
        return proc.prompt_batch(b)
    if ablate in ("audio", "video"):  # the towers' cached outputs are those of the real media: recompute
        b = {k: v for k, v in b.items() if k not in ("audio_features", "video_features")}
    if ablate == "audio":
        return proc.prompt_batch(dict(b, audio=torch.zeros_like(b["audio"])))
    if ablate == "text":
        return proc.prompt_batch(dict(b, exp=[""] * len(b["exp"])))
    if ablate == "video":
        real = proc.prompt_batch(b)
        blank = proc.prompt_batch(dict(b, frames=torch.zeros_like(b["frames"])))
        return replace(blank, sam_pixel_values=real.sam_pixel_values, sam_image_embeddings=real.sam_image_embeddings)
    raise ValueError(f"unknown eval.ablate {ablate!r}")


def predict(cfg: AuroraConfig, exports: Path | dict[str, Path], shards_dir: Path, splits: list[str], mode: str, *,
            actors: int, batch_size: int, cpus_per_actor: float, gpus_per_actor: float,
            max_new_tokens: int = 160, temperature: float = 0.0, score_size: int = 0, no_seg: str = "empty",
            j_threshold: float = 0.4, keys: list[str] | None = None):
    """A lazy Ray Dataset of predictions for the rows of ``splits`` (``keys``: only those rows), in shard
    order, batched the same way on every run: each row carries its metadata ``line``; with several
    ``exports`` {name: dir} also the ``model`` that answered. ``score_size``: per-row metrics as the
    official protocol scores, J at ``j_threshold``."""
    import ray.data

    from aurora_core.runtime import init_ray

    init_ray(cfg)
    if not isinstance(exports, dict):
        exports = {Path(exports).name: Path(exports)}
    ds = shards.clip_dataset(shards_dir, splits, cfg.data, batch_size=batch_size,
                             rows_per_block=batch_size if actors > 1 else None, score_size=score_size,
                             media=mode == "answer" and cfg.eval.ablate in ("audio", "video"), keys=keys)
    # the same rows in the same batches from run to run: a row's padded length, hence its result to
    # ~1e-6, depends on its batch, and the streaming re-cut into blocks follows arrival order unless
    # the order is kept (seen: 10 of 1,413 teacher embeddings differed, and SFT after them diverged)
    ds.context.execution_options.preserve_order = True
    return ds.map_batches(
        ExportPredictor, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor or None,
        fn_constructor_kwargs=dict(exports={n: str(p) for n, p in exports.items()}, cfg=to_dict(cfg), mode=mode,
                                   max_new_tokens=max_new_tokens, temperature=temperature, seed=cfg.run.seed,
                                   score_size=score_size, no_seg=no_seg, j_threshold=j_threshold))


def write_table(rows: list[dict[str, Any]], out: Path) -> None:
    """Write a small result table atomically (temp file, then rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    os.replace(tmp, out)


def teacher_embeddings(cfg: AuroraConfig, teacher_dir: Path, shards_dir: Path, out: Path) -> int:
    """The frozen teacher's projected [SEG] embedding of every train row, saved as Parquet (key, embedding)."""
    inf = cfg.inference
    ds = predict(cfg, teacher_dir, shards_dir, ["train"], "seg_embedding", actors=inf.actors,
                 batch_size=inf.batch_size, cpus_per_actor=inf.cpus_per_actor, gpus_per_actor=inf.gpus_per_actor)
    rows = [{"key": str(x["key"]), "embedding": np.asarray(x["embedding"], dtype=np.float32).tolist()}
            for x in ds.iter_rows()]
    write_table(rows, out)
    return len(rows)
