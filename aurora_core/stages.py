"""The pipeline's stages as functions (the scripts in pipelines/ and pipelines/all.py call these).

Where things live in a run directory ``<run.root>/<run.name>``::

    data/raw, data/shards        the dataset (pipelines/prepare_data.py)
    data/raw-avsbench, data/shards-<s4|ms3>   the unreferenced AVSBench subsets (synthetic default)
    exports/<stage>              each stage's model (aurora_core.model.build export format)
    stages/<stage>/              side files: resume.json, sample_log/, teacher embeddings, reflect shards
    ray_train/<stage>/           Ray Train checkpoints (resumed by a rerun with the same run name)
    mlflow.db, mlartifacts/      MLflow store (unless MLFLOW_TRACKING_URI is set)

A stage whose export exists is complete and is skipped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aurora_core.config import AuroraConfig, flatten, to_dict
from aurora_core.data import shards
from aurora_core.model.build import is_export
from aurora_core.tracking import Tracker

log = logging.getLogger(__name__)

STAGES = ("teacher", "sft", "reflect", "grpo")


@dataclass
class RunLayout:
    cfg: AuroraConfig

    @property
    def dir(self) -> Path:
        return self.cfg.run.dir

    @property
    def shards(self) -> Path:
        return self.cfg.data.shards_dir(self.cfg.run)

    def export(self, stage: str) -> Path:
        return self.dir / "exports" / stage

    def stage_dir(self, stage: str) -> Path:
        return self.dir / "stages" / stage


def tracker_for(cfg: AuroraConfig) -> Tracker:
    return Tracker(cfg.run.dir, cfg.run.name, cfg.tracking.experiment, cfg.tracking.enabled)


def params_of(cfg: AuroraConfig) -> dict[str, Any]:
    return flatten(to_dict(cfg))


def open_stage_run(tracker: Tracker, parent: str | None, stage: str, cfg: AuroraConfig) -> str | None:
    """The stage's MLflow child run, with the resolved config as params and as config.yaml."""
    from aurora_core.config import to_yaml
    from aurora_core.tracking import RunLogger

    child = tracker.stage(parent, stage, params_of(cfg))
    RunLogger(tracker.uri if tracker.enabled else None, child).text(to_yaml(cfg), "config.yaml")
    return child


def prepare(cfg: AuroraConfig) -> None:
    """The run's shard set (``cfg.data``: Ref-AVS, or the AVSBench subset ``data.subset``), generated
    first for the synthetic source; skipped when complete."""
    from aurora_core.config import Source
    from aurora_core.data import avsbench, synthetic

    layout = RunLayout(cfg)
    d = cfg.data
    tag = "data" if d.subset is None else f"data {d.subset}"
    if shards.manifest_exists(layout.shards):
        print(f"[{tag}] shard set at {layout.shards}: skipped")
        return
    raw = d.raw_dir(cfg.run)
    if d.source == Source.synthetic:
        if d.subset is None:
            print(f"[{tag}] generating synthetic Ref-AVS into {raw}")
            synthetic.generate(raw, d)
        elif not avsbench.metadata_path(raw, d.subset).is_file():
            print(f"[{tag}] generating the synthetic unreferenced set (AVSBench layout, S4 and MS3) into {raw}")
            synthetic.generate_avsbench(raw, d)
    summary = shards.convert(raw, layout.shards, d, source=d.source.value, seed=d.synthetic.seed,
                             config=params_of(cfg))
    print(f"[{tag}] " + summary.render().replace("\n", f"\n[{tag}] "))


_cache_ready: set[tuple[str, str]] = set()  # (cache dir, shard set) checked in this process


def require_shards(layout: RunLayout) -> dict[str, Any]:
    """The run's shard manifest; with ``data.cache_frozen_features`` also the frozen-feature cache:
    what it lacks for this shard set encoded, and ``data.frozen_features_dir`` pointed at it (the
    decoders of every stage and worker read it from the config)."""
    manifest = shards.load_manifest(layout.shards)
    d = layout.cfg.data
    if d.cache_frozen_features and (d.frozen_features_dir, str(layout.shards)) not in _cache_ready:
        from aurora_core.data import feature_cache

        r = feature_cache.ensure(layout.cfg, layout.shards)
        d.frozen_features_dir = r.dir
        _cache_ready.add((r.dir, str(layout.shards)))
        what = "SAM embeddings and tower outputs" if d.cache_towers else "SAM embeddings"
        print(f"[data] {what} of {r.clips} distinct clips ({r.rows} rows): {r.cached_before} cached, "
              f"{r.computed} encoded now ({r.bytes_written / 2**20:.0f} MiB, {r.seconds:.0f}s) in {r.dir}")
    return manifest


def require_export(layout: RunLayout, stage: str, builder: str) -> Path:
    path = layout.export(stage)
    if not is_export(path):
        raise FileNotFoundError(f"the {stage} model is missing ({path}); build it first: python pipelines/{builder}.py "
                                f"--config ... run.root={layout.cfg.run.root} run.name={layout.cfg.run.name}")
    return path


def _supervised(cfg: AuroraConfig, stage: str, target: str, tracker: Tracker, parent: str | None, *,
                init: Path | None = None, distill: Path | None = None, train_shards: Path | None = None
                ) -> dict[str, Any]:
    from aurora_core.train.loop import StageSpec, run_stage

    layout = RunLayout(cfg)
    out = layout.export(stage)
    if is_export(out):
        print(f"[{stage}] export exists at {out}: skipped")
        return {"skipped": True, "export": str(out)}
    require_shards(layout)
    child = open_stage_run(tracker, parent, stage, cfg)
    spec = StageSpec(stage=stage, target=target, train_shards=str(train_shards or layout.shards),
                     val_shards=str(layout.shards), export_dir=str(out), stage_dir=str(layout.stage_dir(stage)),
                     init=str(init) if init else None, distill=str(distill) if distill else None,
                     tracking_uri=tracker.uri if tracker.enabled else None, mlflow_run_id=child,
                     own_reasoning_trained=stage != "reflect" or cfg.reflect.train_own_reasoning)
    t0 = time.time()
    try:
        metrics = run_stage(cfg, spec)
    except BaseException:
        tracker.finish(child, "FAILED")
        raise
    took = time.time() - t0
    tracker.finish(child)
    print(f"[{stage}] done in {took:.0f}s; export: {out}")
    return {"export": str(out), "seconds": took, **metrics}


def pretrain_text(cfg: AuroraConfig, tracker: Tracker, parent: str | None) -> dict[str, Any] | None:
    """Before stage 0, the tiny LLM's language pretraining (``text_pretrain.steps`` > 0; see
    aurora_core.train.text_pretrain): written once to ``base/llm.safetensors`` of the run, then
    ``model.tiny.llm_weights`` points there, so every process that builds a fresh model (teacher,
    SFT) starts from it. An explicit ``model.tiny.llm_weights`` is used as it is."""
    from aurora_core.train import text_pretrain

    p, tiny = cfg.text_pretrain, cfg.model.tiny
    if p.steps == 0 or tiny.llm_weights:
        return None
    out = RunLayout(cfg).dir / "base" / "llm.safetensors"
    if out.is_file():
        print(f"[text] pretrained LLM at {out}: skipped")
    else:
        from aurora_core.tracking import RunLogger

        child = open_stage_run(tracker, parent, "text_pretrain", cfg)
        logger = RunLogger(tracker.uri if tracker.enabled else None, child)
        try:
            r = text_pretrain.pretrain(cfg, out, logger.metrics)
        except BaseException:
            tracker.finish(child, "FAILED")
            raise
        logger.metrics({"lm_first": r.first_loss, "lm_last": r.last_loss, "seconds": r.seconds}, step=r.steps)
        tracker.finish(child)
        print(f"[text] done in {r.seconds:.0f}s: {r.steps} steps on {r.rows} rows, LM loss {r.first_loss:.3f} -> "
              f"{r.last_loss:.3f} (first and last tenth), Step 4 check on held-out rows {r.check}; {out}")
    tiny.llm_weights = str(out)
    return {"path": str(out)}


def teacher(cfg: AuroraConfig, tracker: Tracker, parent: str | None) -> dict[str, Any]:
    """Stage 0: the non-CoT model answering ``It is <class> [SEG].``."""
    pretrain_text(cfg, tracker, parent)
    return _supervised(cfg, "teacher", "direct", tracker, parent)


def sft(cfg: AuroraConfig, tracker: Tracker, parent: str | None) -> dict[str, Any]:
    """Stage 1: structured-CoT SFT with [SEG] feature distillation against the frozen teacher."""
    from aurora_core.infer import teacher_embeddings

    layout = RunLayout(cfg)
    if is_export(layout.export("sft")):
        return _supervised(cfg, "sft", "cot", tracker, parent)
    pretrain_text(cfg, tracker, parent)
    distill = None
    require_shards(layout)
    if cfg.sft.distill_weight > 0:
        teacher_dir = require_export(layout, "teacher", "teacher")
        distill = layout.stage_dir("sft") / "teacher_seg.parquet"
        if not distill.is_file():
            n = teacher_embeddings(cfg, teacher_dir, layout.shards, distill)
            print(f"[sft] teacher [SEG] embeddings for {n} train rows -> {distill}")
    return _supervised(cfg, "sft", "cot", tracker, parent, distill=distill)


def build_reflect_shards(cfg: AuroraConfig, sft_dir: Path, layout: RunLayout) -> dict[str, Any]:
    """Run the stage-1 model over the train split and write the stage-2 training set.

    Wrong answers (class mismatch, or IoU under ``reflect.iou_threshold``) get the target
    ``<own reasoning> Wait, let me reconsider. <correct CoT>``; right ones keep the ground-truth CoT.
    Writes ``stages/reflect/shards`` (same schema, ``cot`` = the target) and ``answers.parquet``
    (row key, uid, the model's answer, class, IoU, corrected) for inspection. With ``reflect.rows``
    only that many train rows (a seeded choice) are answered and make up the stage-2 set.
    """
    import json as _json

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from aurora_core import reasoning
    from aurora_core.data.atomic import staged_dir
    from aurora_core.infer import predict, write_table
    from aurora_core.model.tokenizer import load_tokenizer

    r, inf = cfg.reflect, cfg.inference
    out = layout.stage_dir("reflect") / "shards"
    t0 = time.time()
    keys = None
    if r.rows:  # a seeded choice of train rows, answered and trained on (the rest are left out)
        import numpy as np

        every = shards.split_keys(layout.shards, "train")
        rng = np.random.default_rng([cfg.run.seed, 2])
        keys = sorted(every[i] for i in rng.choice(len(every), size=min(r.rows, len(every)), replace=False))
    preds = predict(cfg, sft_dir, layout.shards, ["train"], "answer", actors=inf.actors,
                    batch_size=inf.batch_size, cpus_per_actor=inf.cpus_per_actor,
                    gpus_per_actor=inf.gpus_per_actor, max_new_tokens=inf.max_new_tokens, temperature=inf.temperature,
                    keys=keys)
    answers = {}
    for row in preds.select_columns(["key", "answer", "pred_class", "class_correct", "iou", "well_formed"]).iter_rows():
        answers[row["key"]] = row
    tok = load_tokenizer(sft_dir / "tokenizer")
    budget = cfg.model.max_answer_tokens - 1
    report, counts = [], {"corrected": 0, "kept": 0, "class_wrong": 0, "iou_low": 0}
    with staged_dir(out) as tmp:
        (tmp / "train").mkdir()
        files = shards.split_files(layout.shards, ["train"])
        for f in files:
            table = pq.read_table(f)
            if keys is not None:
                table = table.filter(pc.is_in(table["key"], value_set=pa.array(keys, pa.string())))
            targets = []
            for key, uid, cot in zip(table["key"].to_pylist(), table["uid"].to_pylist(), table["cot"].to_pylist()):
                a = answers.get(key)
                if a is None:
                    raise RuntimeError(f"reflect: no stage-1 answer for train row {key}")
                class_wrong = not a["class_correct"]
                iou_low = float(a["iou"]) < r.iou_threshold
                wrong = class_wrong or iou_low
                target = cot
                if wrong:
                    own = a["answer"].replace(reasoning.ANSWER_SUFFIX, "").strip()
                    room = budget - len(tok(f"{reasoning.REFLECT_TRIGGER} {cot}", add_special_tokens=False).input_ids)
                    own_ids = tok(own, add_special_tokens=False).input_ids[: max(0, room)]
                    target = reasoning.reflective_answer(tok.decode(own_ids), cot)
                counts["corrected" if wrong else "kept"] += 1
                counts["class_wrong"] += class_wrong
                counts["iou_low"] += iou_low
                targets.append(target)
                report.append({"key": key, "uid": uid, "answer": a["answer"], "pred_class": a["pred_class"],
                               "class_correct": bool(a["class_correct"]), "iou": float(a["iou"]),
                               "corrected": wrong})
            table = table.set_column(table.schema.get_field_index("cot"), "cot", pa.array(targets, pa.string()))
            pq.write_table(table, tmp / "train" / Path(f).name, compression="zstd")
        manifest = _json.loads((layout.shards / "manifest.json").read_text())
        manifest.update(counts={"train": len(report)}, files={"train": [Path(f).name for f in files]},
                        reflect=counts, source_model=str(sft_dir))
        (tmp / "manifest.json").write_text(_json.dumps(manifest, indent=1))
    write_table(report, layout.stage_dir("reflect") / "answers.parquet")
    n = max(1, len(report))
    counts.update(rows=len(report), mean_iou=sum(x["iou"] for x in report) / n,
                  class_accuracy=sum(x["class_correct"] for x in report) / n, seconds=time.time() - t0)
    (layout.stage_dir("reflect") / "reflect_counts.json").write_text(_json.dumps(counts, indent=1))
    return counts


def reflect(cfg: AuroraConfig, tracker: Tracker, parent: str | None) -> dict[str, Any]:
    """Stage 2: corrective reflective-style training on the stage-1 model's own mistakes."""
    import json as _json

    from aurora_core.tracking import RunLogger

    layout = RunLayout(cfg)
    if is_export(layout.export("reflect")):
        return _supervised(cfg, "reflect", "cot", tracker, parent)
    sft_dir = require_export(layout, "sft", "sft")
    require_shards(layout)
    counts_file = layout.stage_dir("reflect") / "reflect_counts.json"
    if shards.manifest_exists(layout.stage_dir("reflect") / "shards") and counts_file.is_file():
        counts = _json.loads(counts_file.read_text())
    else:
        counts = build_reflect_shards(cfg, sft_dir, layout)
    print(f"[reflect] stage-1 answers on {counts['rows']} train rows: {counts['corrected']} corrected "
          f"(class wrong {counts['class_wrong']}, IoU < {cfg.reflect.iou_threshold} {counts['iou_low']}), "
          f"{counts['kept']} kept; class accuracy {counts['class_accuracy']:.3f}, mean IoU {counts['mean_iou']:.3f}")
    child = open_stage_run(tracker, parent, "reflect", cfg)
    RunLogger(tracker.uri if tracker.enabled else None, child).metrics(
        {f"reflect/{k}": float(v) for k, v in counts.items()}, 0)
    result = _supervised(cfg, "reflect", "cot", tracker, parent, init=sft_dir,
                         train_shards=layout.stage_dir("reflect") / "shards")
    return {**result, "reflect": counts}


def grpo(cfg: AuroraConfig, tracker: Tracker, parent: str | None, init: Path | None = None) -> dict[str, Any]:
    """Stage 3: GRPO from the stage-2 export (or ``init``) on a rollout pool and a ZeRO-3 learner."""
    from aurora_core.rl import driver
    from aurora_core.runtime import init_ray
    from aurora_core.tracking import RunLogger

    layout = RunLayout(cfg)
    out = layout.export("grpo")
    if is_export(out):
        print(f"[grpo] export exists at {out}: skipped")
        return {"skipped": True, "export": str(out)}
    init = Path(init or cfg.grpo.init or layout.export("reflect"))
    if not is_export(init):
        raise FileNotFoundError(
            f"no model to start GRPO from: {init} is not an export. Build the stage-2 model first "
            f"(python pipelines/all.py, or prepare_data.py, teacher.py, sft.py and reflect.py in turn, with "
            f"run.root={cfg.run.root} run.name={cfg.run.name}) or name one with --init PATH")
    require_shards(layout)
    init_ray(cfg)
    child = open_stage_run(tracker, parent, "grpo", cfg)
    logger = RunLogger(tracker.uri if tracker.enabled else None, child)
    logger.tag("aurora.init", str(init))
    t0 = time.time()
    try:
        result = driver.run(cfg, init, out, layout.shards, logger)
    except BaseException:
        tracker.finish(child, "FAILED")
        raise
    logger.tag("aurora.export", str(out))
    logger.text(f"{out}\n", "export_path.txt")
    tracker.finish(child)
    took = time.time() - t0
    print(f"[grpo] done in {took:.0f}s; export: {out}")
    return {"export": str(out), "seconds": took, **result}


def evaluate(cfg: AuroraConfig, tracker: Tracker, parent: str | None, model: Path, name: str | None = None,
             splits: list[str] | None = None) -> dict[str, Any]:
    """The benchmark's metrics of one exported model on the test splits (``<run>/eval/<name>/results.json``);
    results newer than the export are reused."""
    name = name or Path(model).name
    return evaluate_models(cfg, tracker, parent, {name: Path(model)}, splits)[name]


def evaluate_models(cfg: AuroraConfig, tracker: Tracker, parent: str | None, models: dict[str, Path],
                    splits: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """:func:`evaluate` for several exports {name: export}: those whose results are older than the
    export (or missing) are evaluated, together in one pass over the data with ``eval.together``
    (each predictor actor holds all of them), one after the other without; each has its own MLflow run."""
    import json as _json

    from aurora_core.evaluate import EvalTarget, evaluate_many, scoring
    from aurora_core.runtime import init_ray
    from aurora_core.tracking import RunLogger

    layout = RunLayout(cfg)
    splits = list(splits or cfg.eval_splits)
    e, sc = cfg.eval, scoring(cfg)
    results: dict[str, dict[str, Any]] = {}
    todo: list[tuple[str, Path]] = []
    for name, model in models.items():
        model = Path(model)
        if not is_export(model):
            raise FileNotFoundError(f"{model} is not an exported model (no aurora.json)")
        res = layout.dir / "eval" / name / "results.json"
        if res.is_file() and res.stat().st_mtime >= (model / "aurora.json").stat().st_mtime:
            cached = _json.loads(res.read_text())
            if (sorted(cached["splits"]) == sorted(splits) and "tables" in cached and cached.get("no_seg") == e.no_seg
                    and cached.get("ablate") == e.ablate and cached.get("empty_mask_on_none") == cfg.model.empty_mask_on_none
                    and (cached.get("protocol_batch_clips"), cached.get("score_size"), cached.get("j_threshold"))
                    == (sc.batch_clips, sc.score_size, sc.j_threshold)):
                print(f"[eval] {name}: results at {res} are newer than the model: reused")
                results[name] = dict(cached, protocol=e.protocol, table=cached["tables"][e.protocol])
                continue
        todo.append((name, model))
    if todo:
        require_shards(layout)
        init_ray(cfg)
        groups = [todo] if e.together else [[t] for t in todo]
        for group in groups:
            targets, children = [], {}
            for name, model in group:
                children[name] = open_stage_run(tracker, parent, f"eval-{name}", cfg)
                logger = RunLogger(tracker.uri if tracker.enabled else None, children[name])
                logger.tag("aurora.model", str(model))
                targets.append(EvalTarget(name, model, layout.dir / "eval" / name, logger))
            try:
                out = evaluate_many(cfg, targets, layout.shards, splits)
            except BaseException:
                for child in children.values():
                    tracker.finish(child, "FAILED")
                raise
            for t in targets:
                tracker.finish(children[t.name])
                print(f"[eval] {t.name}: {out[t.name]['seconds']:.0f}s"
                      f"{f' (one pass for {len(targets)} models)' if len(targets) > 1 else ''}, results in "
                      f"{t.out_dir / 'results.json'}")
            results.update(out)
    return {name: results[name] for name in models}


def evaluate_unreferenced(cfg: AuroraConfig, tracker: Tracker, parent: str | None, models: dict[str, Path],
                          subset: str) -> dict[str, dict[str, Any]]:
    """Zero-shot AVSBench metrics (``subset`` s4 | ms3, its test split) of exports {name: export}
    trained on the run's data: the run's config with the data swapped (:meth:`AuroraConfig.for_unreferenced`),
    shards prepared if missing; results in ``<run>/eval/<name>-avsbench-<subset>/``."""
    ucfg = cfg.for_unreferenced(subset)
    prepare(ucfg)
    out = evaluate_models(ucfg, tracker, parent, {f"{n}-avsbench-{subset}": Path(m) for n, m in models.items()})
    return {n: out[f"{n}-avsbench-{subset}"] for n in models}
