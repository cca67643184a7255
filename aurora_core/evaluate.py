"""Evaluation on the Ref-AVS test splits: the model answers (greedy) on a Ray Data actor pool, the
per-row metric counts are merged per split into J / F / S (aurora_core.metrics), and the Ref-AVS
table is printed, written to ``results.json`` and logged to MLflow with mask overlays of the best and
worst clips."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aurora_core.config import AuroraConfig
from aurora_core.data import shards
from aurora_core.infer import predict
from aurora_core.metrics import SplitMetrics, format_table, refavs_table

log = logging.getLogger(__name__)


def evaluate(cfg: AuroraConfig, model_dir: Path, shards_dir: Path, out_dir: Path, splits: list[str],
             name: str, logger=None) -> dict[str, Any]:
    e = cfg.eval
    t0 = time.time()
    ds = predict(cfg, model_dir, shards_dir, splits, "answer", actors=e.actors, batch_size=e.batch_size,
                 cpus_per_actor=e.cpus_per_actor, gpus_per_actor=e.gpus_per_actor, max_new_tokens=e.max_new_tokens)
    acc = {s: SplitMetrics() for s in splits}
    rows: list[dict[str, Any]] = []
    for r in ds.iter_rows():
        acc[r["split"]].merge(SplitMetrics.from_state(json.loads(r["metrics"])))
        rows.append({k: r[k] for k in ("uid", "split", "class", "answer", "pred_class", "class_correct",
                                       "well_formed", "iou")} | {"pred_masks": r["pred_masks"]})
    per_split = {}
    for s in splits:
        srows = [r for r in rows if r["split"] == s]
        if not srows:
            raise ValueError(f"no rows of split {s} in {shards_dir}")
        per_split[s] = {**acc[s].compute(), "rows": len(srows),
                        "class_acc": float(np.mean([r["class_correct"] for r in srows])),
                        "format_rate": float(np.mean([r["well_formed"] for r in srows]))}
    table = refavs_table(per_split)
    result = {"model": str(model_dir), "name": name, "splits": per_split, "table": table,
              "seconds": time.time() - t0}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    with open(out_dir / "answers.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({k: (bool(v) if isinstance(v, np.bool_) else v) for k, v in r.items()
                                if k != "pred_masks"}, default=float) + "\n")
    text = format_table({name: table})
    if logger:
        logger.metrics({f"eval/{k}": v for k, v in table.items() if v is not None}, 0)
        logger.metrics({f"eval/{s}/{k}": float(v) for s, m in per_split.items() for k, v in m.items()}, 0)
        logger.text(text, "eval/table.txt")
        logger.json(result, "eval/results.json")
        for uid, png in overlays(cfg, shards_dir, rows, splits):
            logger.png(png, f"eval/overlays/{uid}.png")
    return result


def overlays(cfg: AuroraConfig, shards_dir: Path, rows: list[dict[str, Any]], splits: list[str]):
    """(uid, PNG) for the best and the worst clips of each split (by IoU of the answer's masks)."""
    from torchvision.io import decode_png

    from aurora_core.tracking import mask_overlay_png

    k = cfg.eval.overlays
    picked: list[dict[str, Any]] = []
    for s in splits:
        srows = sorted((r for r in rows if r["split"] == s), key=lambda r: r["iou"])
        picked += srows[-k:] + [r for r in srows[:k] if r not in srows[-k:]]
    if not picked:
        return []
    clips = shards.rows_by_uid(shards_dir, [r["uid"] for r in picked], splits, cfg.data)
    out = []
    for i, r in enumerate(picked):
        pred = torch.stack([decode_png(torch.frombuffer(bytearray(b), dtype=torch.uint8))[0] for b in r["pred_masks"]])
        logits = torch.where(pred > 0, 10.0, -10.0)
        tag = f"{r['split']}_iou{r['iou']:.2f}_{r['uid']}"
        out.append((tag, mask_overlay_png(torch.from_numpy(clips["frames"][i]), logits,
                                          torch.from_numpy(clips["masks"][i]))))
    return out
