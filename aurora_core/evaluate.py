"""Evaluation on the test splits of the run's benchmark (Ref-AVS, or an AVSBench subset when
``data.subset`` is set): the model answers (greedy) on a Ray Data actor pool, each row's metric
counts come back with its metadata line, and per split the rows, put back in metadata order, are
aggregated under both protocols of aurora_core.metrics (``official``: per-batch means over batches
of 4 clips, as the benchmark's own test loop; ``split``: all frames at once). The table of
``eval.protocol`` is printed; ``results.json`` and MLflow get both, with mask overlays of the best and
worst clips."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aurora_core.config import AuroraConfig
from aurora_core.data import shards
from aurora_core.infer import predict
from aurora_core.metrics import (AVS_COLUMNS, AVS_J_THRESHOLD, AVS_SCORE_SIZE, J_THRESHOLD, PROTOCOLS, TABLE_COLUMNS,
                                  SplitMetrics, avsbench_table, format_table, protocol_from_rows, refavs_table)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scoring:
    """How the run's benchmark scores a split (see aurora_core.metrics)."""

    benchmark: str  # refavs | avsbench
    subset: str | None  # AVSBench s4 | ms3
    j_threshold: float  # sigmoid threshold of J: Ref-AVS 0.4, AVSBench 0.5
    score_size: int  # masks are scored at score_size^2: Ref-AVS eval.score_size (256), AVSBench 224
    batch_clips: int  # clips per batch of the official protocol (4 for both benchmarks)
    columns: tuple[str, ...]  # the table's columns

    def table(self, per_split: dict[str, dict[str, Any]], protocol: str) -> dict[str, float | None]:
        if self.benchmark == "refavs":
            row = refavs_table({s: m[protocol] for s, m in per_split.items()})
            shown = per_split.get("test_s")
        else:
            full = avsbench_table({self.subset: per_split["test"][protocol]} if "test" in per_split else {})
            row = {c: v for c, v in full.items() if c in self.columns}  # this subset's columns only
            shown = per_split.get("test")
        if shown is not None:  # structure rate and class accuracy of the seen (Ref-AVS) / test (AVSBench) split
            row.update({"Struct": shown["structure_rate"], "Class": shown["class_acc"]})
        if self.benchmark == "refavs" and "test_n" in per_split:  # answers "the target is none" on test_n
            row["None"] = per_split["test_n"]["class_acc"]
        return row


def scoring(cfg: AuroraConfig) -> Scoring:
    e, d = cfg.eval, cfg.data
    if d.subset is None:
        return Scoring("refavs", None, J_THRESHOLD, e.score_size, e.protocol_batch_clips, TABLE_COLUMNS)
    cols = tuple(c for c in AVS_COLUMNS if c.startswith(d.subset.upper() + " "))
    return Scoring("avsbench", d.subset, AVS_J_THRESHOLD, AVS_SCORE_SIZE, e.protocol_batch_clips, cols)


ROW_COLUMNS = ("key", "line", "uid", "split", "class", "kind", "answer", "pred_class", "class_correct", "well_formed",
               "structured", "has_seg", "iou", "metrics", "pred_masks")


@dataclass(frozen=True)
class EvalTarget:
    """One export to evaluate and where its results go."""

    name: str  # the run's name for it (results under eval/<name>, MLflow run eval-<name>)
    model_dir: Path
    out_dir: Path
    logger: Any = None  # aurora_core.tracking.RunLogger of its MLflow run, or None


def evaluate(cfg: AuroraConfig, model_dir: Path, shards_dir: Path, out_dir: Path, splits: list[str],
             name: str, logger=None) -> dict[str, Any]:
    return evaluate_many(cfg, [EvalTarget(name, Path(model_dir), Path(out_dir), logger)], shards_dir, splits)[name]


def evaluate_many(cfg: AuroraConfig, targets: list[EvalTarget], shards_dir: Path, splits: list[str]) -> dict[str, dict]:
    """Evaluate several exports in one pass over the data (each predictor actor holds all of them,
    ``eval.together``); results per export name, each as :func:`evaluate` writes them."""
    e = cfg.eval
    t0 = time.time()
    ds = predict(cfg, {t.name: t.model_dir for t in targets}, shards_dir, splits, "answer", actors=e.actors,
                 batch_size=e.batch_size, cpus_per_actor=e.cpus_per_actor, gpus_per_actor=e.gpus_per_actor,
                 max_new_tokens=e.max_new_tokens, score_size=scoring(cfg).score_size, no_seg=e.no_seg,
                 j_threshold=scoring(cfg).j_threshold)
    rows: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    for r in ds.iter_rows():
        rows[r["model"]].append({k: r[k] for k in ROW_COLUMNS})
    seconds = time.time() - t0
    return {t.name: _results(cfg, t, rows[t.name], shards_dir, splits, seconds) for t in targets}


def _results(cfg: AuroraConfig, target: EvalTarget, rows: list[dict[str, Any]], shards_dir: Path, splits: list[str],
             seconds: float) -> dict[str, Any]:
    """One export's rows -> its metrics under both protocols, results.json, answers.jsonl and MLflow."""
    e, sc = cfg.eval, scoring(cfg)
    name, model_dir, out_dir, logger = target.name, target.model_dir, target.out_dir, target.logger
    rows.sort(key=lambda r: int(r["line"]))  # metadata order: the official protocol batches consecutive rows
    per_split, tables = {}, {}
    for s in splits:
        srows = [r for r in rows if r["split"] == s]
        if not srows:
            raise ValueError(f"no rows of split {s} in {shards_dir}")
        accs = [SplitMetrics.from_state(json.loads(r["metrics"])) for r in srows]
        both = {p: protocol_from_rows(accs, s, p, sc.batch_clips) for p in PROTOCOLS}
        per_split[s] = {**both[e.protocol], **{p: both[p] for p in PROTOCOLS}, "rows": len(srows),
                        "class_acc": float(np.mean([r["class_correct"] for r in srows])),
                        "format_rate": float(np.mean([r["well_formed"] for r in srows])),
                        # four steps in order, then the answer, no loop (reasoning.is_structured)
                        "structure_rate": float(np.mean([r["structured"] for r in srows])),
                        # answers without [SEG]: empty masks (eval.no_seg=empty) or forced ones
                        "no_seg_frac": float(np.mean([not r["has_seg"] for r in srows])),
                        "by_kind": by_kind(srows, accs)}
    for p in PROTOCOLS:
        tables[p] = sc.table(per_split, p)
    table = tables[e.protocol]
    result = {"model": str(model_dir), "name": name, "benchmark": sc.benchmark, "subset": sc.subset,
              "protocol": e.protocol, "no_seg": e.no_seg,
              "empty_mask_on_none": cfg.model.empty_mask_on_none, "ablate": e.ablate, "splits": per_split, "table": table, "tables": tables,
              "protocol_batch_clips": sc.batch_clips, "score_size": sc.score_size, "j_threshold": sc.j_threshold,
              "seconds": seconds}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    with open(out_dir / "answers.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({k: (bool(v) if isinstance(v, np.bool_) else v) for k, v in r.items()
                                if k not in ("pred_masks", "metrics")}, default=float) + "\n")
    other = "split" if e.protocol == "official" else "official"
    text = (format_table({name: table}, table_title(cfg, e.protocol), sc.columns) + "\n\n"
            + format_table({name: tables[other]}, table_title(cfg, other), sc.columns))
    if logger:
        logger.metrics({f"eval/{k}": v for k, v in table.items() if v is not None}, 0)
        logger.metrics({f"eval/{p}/{k}": v for p, t in tables.items() for k, v in t.items() if v is not None}, 0)
        logger.metrics({f"eval/{s}/{k}": float(v) for s, m in per_split.items() for k, v in m.items()
                        if not isinstance(v, dict)}, 0)
        logger.metrics({f"eval/{s}/by_kind/{kind}/J": v["J"] for s, m in per_split.items()
                        for kind, v in m["by_kind"].items()}, 0)
        logger.metrics({f"eval/{s}/{p}/{k}": float(v) for s, m in per_split.items() for p in PROTOCOLS
                        for k, v in m[p].items()}, 0)
        logger.text(text + "\n", "eval/table.txt")
        logger.json(result, "eval/results.json")
        for tag, png in overlays(cfg, shards_dir, rows, splits):
            logger.png(png, f"eval/overlays/{tag}.png")
    return result


def by_kind(rows: list[dict[str, Any]], accs: list[SplitMetrics]) -> dict[str, dict[str, float]]:
    """J (all frames of the rows of each expression kind at once) and the row count, for datasets
    that record the kind (our synthetic one); empty otherwise."""
    groups: dict[str, SplitMetrics] = {}
    counts: dict[str, int] = {}
    for r, a in zip(rows, accs):
        if r["kind"]:
            groups.setdefault(r["kind"], SplitMetrics(a.j_threshold, a.s_threshold, a.beta2, a.num_thresholds)).merge(a)
            counts[r["kind"]] = counts.get(r["kind"], 0) + 1
    return {k: {"J": m.compute()["J"], "rows": counts[k]} for k, m in sorted(groups.items())}


def table_title(cfg: AuroraConfig, protocol: str | None = None) -> str:
    """The line above a table: which benchmark and protocol its numbers follow."""
    e, sc = cfg.eval, scoring(cfg)
    size = f"masks scored at {sc.score_size}x{sc.score_size}"
    if sc.benchmark == "avsbench":
        what = (f"test split in CSV order, mIoU (sigmoid > {sc.j_threshold}) and F per batch of {sc.batch_clips} "
                "clips, mean over batches, as their test.py" if (protocol or e.protocol) == "official"
                else "metrics over all frames of the test split at once")
        return f"AVSBench {sc.subset.upper()}, {protocol or e.protocol} protocol ({what}; {size}):"
    if (protocol or e.protocol) == "official":
        return (f"Ref-AVS, official protocol (splits in metadata order, metrics per batch of {e.protocol_batch_clips} "
                f"clips, mean over batches, as published tables; {size}):")
    return f"Ref-AVS, split protocol (metrics over all frames of a split at once; {size}):"


def overlays(cfg: AuroraConfig, shards_dir: Path, rows: list[dict[str, Any]], splits: list[str]):
    """(tag, PNG) for the best and the worst clips of each split (by IoU of the answer's masks)."""
    from torchvision.io import decode_png

    from aurora_core.tracking import mask_overlay_png

    k = cfg.eval.overlays
    picked: list[dict[str, Any]] = []
    for s in splits:
        srows = sorted((r for r in rows if r["split"] == s), key=lambda r: r["iou"])
        picked += srows[-k:] + [r for r in srows[:k] if r not in srows[-k:]]
    if not picked:
        return []
    clips = shards.rows_by_key(shards_dir, [r["key"] for r in picked], splits, cfg.data)
    out = []
    for i, r in enumerate(picked):
        pred = torch.stack([decode_png(torch.frombuffer(bytearray(b), dtype=torch.uint8))[0] for b in r["pred_masks"]])
        logits = torch.where(pred > 0, 10.0, -10.0)
        tag = f"{r['split']}_iou{r['iou']:.2f}_{r['key']}".replace("#", "-")
        out.append((tag, mask_overlay_png(torch.from_numpy(clips["frames"][i]), logits,
                                          torch.from_numpy(clips["masks"][i]), expression=str(clips["exp"][i]),
                                          answer=r["answer"], iou=float(r["iou"]))))
    return out
