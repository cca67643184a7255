"""What each stage and each input adds: the pipeline against its ablations, from the same seed.

    python bench/ablations.py [--config configs/tiny.yaml] [key=value ...]

Variants (runs under ``<run.root>/ablation-*``; a rerun skips what is complete):

    full           teacher -> SFT (with distillation) -> reflect -> GRPO, evaluated
    -grpo          the full run's reflect export (no further training)
    teacher, sft   the full run's teacher and SFT exports (stage for stage against sft -distillation)
    -reflect       GRPO started from the full run's SFT export
    -distillation  SFT without the distillation loss (sft.distill_weight=0), then reflect and GRPO
    sft -distillation  that run's SFT export
    -audio         the full model evaluated on silence
    -video         ... with blank frames for the thinker (SAM keeps the real ones: eval.ablate)
    -text          ... with an empty expression
    full drawn masks  the full model with model.empty_mask_on_none=false: the decoder's masks where
                   the answer says "none" too

The variants that train read the full run's shard set. Prints one table (the official protocol's
Mix / Seen / Unseen J, Null S, the share of test_n answers saying none, and on test_s the structure
rate, class accuracy and J by the synthetic expression's kind: what the expression refers by),
writes ``<run.root>/ablations.json`` and logs every run to one MLflow store
(``<run.root>/ablations-mlflow.db``, experiment ``aurora-ablations``). What it divides by: J over all
frames of the rows of a kind (test_s), class accuracy and structure rate over test_s rows. A second
table asks whether the mask follows the answer: of the test_s rows where the full model's weights on
ablated inputs name another class than on the full ones, how far the IoU moved (mask_follows_answer).
1,549 s on 2 CPU cores with the tiny default in a quiet hour: the full pipeline 856 s, -distillation 482 s
(SFT, reflect, GRPO), -reflect 58 s, each evaluation 18-32 s (2,732 s in a slow hour on a slower machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aurora_core import cli, reasoning, stages  # noqa: E402
from aurora_core.config import load_config  # noqa: E402

KINDS = ("category", "position", "sound", "time", "combo")
COLUMNS = ("Mix J", "Seen J", "Unseen J", "Null S")
INPUT_ABLATIONS = ("audio", "video", "text")


def mask_follows_answer(full_rows: list[dict], ablated_rows: list[dict]) -> dict[str, float | int | None]:
    """Does the mask depend on what the model says? ``answers.jsonl`` records of the *same weights* on
    the full and on ablated inputs. The decoder sees the text only through the ``[SEG]`` state (the
    video ablation blanks the thinker's frames, SAM keeps the real ones), so on the test_s rows where
    both answers name a class and the classes differ, a mask that follows the answer moves its IoU;
    ``unmoved`` counts the rows whose IoU moved by under 0.01. Rows answered ``none`` on either side
    are left out (their masks are emptied by rule: ``model.empty_mask_on_none``)."""
    ablated = {r["key"]: r for r in ablated_rows}
    moved = []
    for r in full_rows:
        q = ablated.get(r["key"])
        if r["split"] != "test_s" or q is None:
            continue
        a, b = r.get("pred_class"), q.get("pred_class")
        if a in (None, reasoning.NULL_CLASS) or b in (None, reasoning.NULL_CLASS) or a == b:
            continue
        moved.append(abs(r["iou"] - q["iou"]))
    return {"rows": len(moved), "mean_abs_diou": sum(moved) / len(moved) if moved else None,
            "unmoved": sum(d < 0.01 for d in moved)}


def render_follows(follows: dict[str, dict]) -> str:
    head = f"{'variant':<10}{'rows':>6}{'mean |dIoU|':>13}{'|dIoU| < 0.01':>15}"
    lines = ["Does the mask follow the answer? test_s rows where the full model and the same weights on ablated",
             "inputs name different classes (neither none), and how far their mask IoU moved:", head, "-" * len(head)]
    for name, f in follows.items():
        m = "-" if f["mean_abs_diou"] is None else f"{f['mean_abs_diou']:.4f}"
        lines.append(f"{name:<10}{f['rows']:>6}{m:>13}{f['unmoved']:>15}")
    return "\n".join(lines)


def row_of(result: dict) -> dict[str, float | None]:
    s = result["splits"]["test_s"]
    row = {c: result["table"].get(c) for c in COLUMNS}
    row.update({"Struct": s["structure_rate"], "Class": s["class_acc"], "None": result["table"].get("None")})
    row.update({f"J {k}": s["by_kind"].get(k, {}).get("J") for k in KINDS})
    return row


def render(rows: dict[str, dict[str, float | None]]) -> str:
    cols = list(next(iter(rows.values())))
    w = max(len(n) for n in rows) + 2
    head = "variant".ljust(w) + "".join(c.rjust(11) for c in cols)
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        lines.append(name.ljust(w) + "".join(("-" if r[c] is None else f"{r[c]:.3f}").rjust(11) for c in cols))
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(cli.DEFAULT_CONFIG))
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()
    t0 = time.time()

    def cfg_of(name: str, *extra: str):
        return load_config(args.config, [*args.overrides, f"run.name=ablation-{name}", *extra])

    full = cfg_of("full")
    root = Path(full.run.root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    # one MLflow store and experiment for every variant (each run directory would hold its own)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'ablations-mlflow.db'}")
    full.tracking.experiment = "aurora-ablations"
    cli.setup_logging(full)
    stages.prepare(full)
    tracker = stages.tracker_for(full)
    parent = tracker.parent("ablations", stages.params_of(full))
    layout = stages.RunLayout(full)
    shared = f"data.shards={layout.shards}"
    results: dict[str, dict] = {}
    seconds: dict[str, float] = {}

    def timed(name: str, fn):
        t = time.time()
        results[name] = fn()
        seconds[name] = time.time() - t
        print(f"[ablations] {name}: {seconds[name]:.0f}s", flush=True)

    try:
        def run_full():
            for stage in stages.STAGES:
                getattr(stages, stage)(full, tracker, parent)
            return stages.evaluate(full, tracker, parent, layout.export("grpo"), "full")
        timed("full", run_full)
        # the full run's earlier exports in one evaluation pass (eval.together): -grpo, and stage for
        # stage for the distillation claims, the teacher and SFT against SFT without distillation
        t = time.time()
        earlier = stages.evaluate_models(full, tracker, parent, {"no-grpo": layout.export("reflect"),
                                                                 "teacher": layout.export("teacher"),
                                                                 "sft": layout.export("sft")})
        results.update({"-grpo": earlier["no-grpo"], "teacher": earlier["teacher"], "sft": earlier["sft"]})
        seconds["-grpo, teacher, sft"] = time.time() - t
        print(f"[ablations] -grpo, teacher, sft: {seconds['-grpo, teacher, sft']:.0f}s", flush=True)

        no_reflect = cfg_of("noreflect", shared)
        no_reflect.tracking.experiment = "aurora-ablations"

        def run_no_reflect():
            stages.grpo(no_reflect, tracker, parent, init=layout.export("sft"))
            return stages.evaluate(no_reflect, tracker, parent, stages.RunLayout(no_reflect).export("grpo"), "no-reflect")
        timed("-reflect", run_no_reflect)

        # the full run's text-pretrained LLM (text_pretrain), not a second pretraining
        base = [f"model.tiny.llm_weights={full.model.tiny.llm_weights}"] if full.model.tiny.llm_weights else []
        no_distill = cfg_of("nodistill", shared, "sft.distill_weight=0", *base)
        no_distill.tracking.experiment = "aurora-ablations"

        def run_no_distill():
            for stage in ("sft", "reflect", "grpo"):
                getattr(stages, stage)(no_distill, tracker, parent)
            return stages.evaluate(no_distill, tracker, parent, stages.RunLayout(no_distill).export("grpo"),
                                   "no-distillation")
        timed("-distillation", run_no_distill)
        timed("sft -distillation", lambda: stages.evaluate(no_distill, tracker, parent,
                                                           stages.RunLayout(no_distill).export("sft"),
                                                           "sft-no-distillation"))

        # the full model's masks as its decoder draws them, also where the answer says "none"
        # (model.empty_mask_on_none=false): what the rule that empties them changes in Null S and J
        drawn = cfg_of("full", "model.empty_mask_on_none=false")
        drawn.tracking.experiment = "aurora-ablations"
        timed("full drawn masks", lambda: stages.evaluate(drawn, tracker, parent, layout.export("grpo"),
                                                           "full-drawn-masks"))
        for what in INPUT_ABLATIONS:
            ab = cfg_of("full", f"eval.ablate={what}")
            ab.tracking.experiment = "aurora-ablations"
            timed(f"-{what}", lambda ab=ab, what=what: stages.evaluate(ab, tracker, parent, layout.export("grpo"),
                                                                       f"full-no-{what}"))
    except BaseException:
        tracker.finish(parent, "FAILED")
        raise

    rows = {name: row_of(r) for name, r in results.items()}
    table = render(rows)

    def answers(name: str) -> list[dict]:
        return [json.loads(line) for line in (layout.dir / "eval" / name / "answers.jsonl").read_text().splitlines()]

    follows = {f"-{what}": mask_follows_answer(answers("full"), answers(f"full-no-{what}"))
               for what in INPUT_ABLATIONS}
    table += "\n\n" + render_follows(follows)
    title = (f"Ablations ({full.data.source.value} Ref-AVS, seed {full.run.seed}; official protocol J / Null S; "
             "Struct, Class and J by expression kind on test_s)")
    out = {"title": title, "rows": rows, "mask_follows_answer": follows, "seconds": seconds, "total_seconds": time.time() - t0,
           "results": {n: str(Path(r["model"])) for n, r in results.items()}}
    (root / "ablations.json").write_text(json.dumps(out, indent=1))
    from aurora_core.tracking import RunLogger

    logger = RunLogger(tracker.uri, parent)
    logger.text(title + "\n" + table + "\n", "ablations_table.txt")
    logger.json(out, "ablations.json")
    logger.metrics({f"ablation/{n}/{c}": v for n, r in rows.items() for c, v in r.items() if v is not None}, 0)
    tracker.finish(parent)
    print(f"\n{title}\n{table}\n\n{time.time() - t0:.0f}s; {root / 'ablations.json'}; MLflow: {tracker.uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
