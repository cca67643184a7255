"""The whole pipeline on one command (what `make demo` runs):

    prepare data -> the tiny LLM's text pretraining (text_pretrain.steps > 0) -> teacher -> SFT
    -> reflect -> GRPO -> evaluate each stage's export -> the table
    -> each stage zero-shot on the unreferenced AVSBench subsets (unreferenced.subsets) -> their table

    python pipelines/all.py [--config configs/tiny.yaml] [key=value ...]

Stages whose output is complete are skipped, so a rerun continues where the last one stopped.
"""

import sys
import time

from aurora_core import cli, stages
from aurora_core.evaluate import scoring, table_title
from aurora_core.metrics import AVS_COLUMNS, format_table


def run_all(cfg) -> dict:
    """Every stage in turn (each skipped if complete), then the evaluation of every stage's export,
    on the run's benchmark and zero-shot on the unreferenced subsets."""
    stages.prepare(cfg)
    tracker = stages.tracker_for(cfg)
    parent = tracker.parent("all", stages.params_of(cfg))
    layout = stages.RunLayout(cfg)
    try:
        stages.pretrain_text(cfg, tracker, parent)
        stages.teacher(cfg, tracker, parent)
        stages.sft(cfg, tracker, parent)
        stages.reflect(cfg, tracker, parent)
        stages.grpo(cfg, tracker, parent)
        exports = {s: layout.export(s) for s in stages.STAGES}
        results = stages.evaluate_models(cfg, tracker, parent, exports)
        # zero-shot unreferenced segmentation (the paper's generalisation claim); not when the run
        # trains on AVSBench itself (its own table above is then the AVSBench one)
        subsets = cfg.unreferenced.subsets if cfg.data.subset is None else []
        per_subset = {u: stages.evaluate_unreferenced(cfg, tracker, parent, exports, u) for u in subsets}
        unref = {s: {u: per_subset[u][s] for u in subsets} for s in stages.STAGES} if subsets else {}
    except BaseException:
        tracker.finish(parent, "FAILED")
        raise
    cols = scoring(cfg).columns
    other = "split" if cfg.eval.protocol == "official" else "official"
    table = format_table({s: r["table"] for s, r in results.items()}, table_title(cfg), cols)
    full = table + "\n\n" + format_table({s: r["tables"][other] for s, r in results.items()},
                                         table_title(cfg, other), cols)
    unref_table = ""
    if unref:
        def rows(protocol: str) -> dict:
            return {s: {c: v for r in per.values() for c, v in r["tables"][protocol].items() if c in AVS_COLUMNS}
                    for s, per in unref.items()}

        title = unreferenced_title(cfg, subsets)
        unref_table = format_table(rows(cfg.eval.protocol), title + f", {cfg.eval.protocol} protocol:", AVS_COLUMNS)
        full += ("\n\n" + unref_table + "\n\n"
                 + format_table(rows(other), title + f", {other} protocol:", AVS_COLUMNS))
    (layout.dir / "results_table.txt").write_text(full + "\n")
    from aurora_core.tracking import RunLogger

    RunLogger(tracker.uri if tracker.enabled else None, parent).text(full + "\n", "results_table.txt")
    tracker.finish(parent)
    return {"results": results, "table": table, "unreferenced": unref, "unreferenced_table": unref_table,
            "tracking_uri": tracker.uri}


def unreferenced_title(cfg, subsets: list[str]) -> str:
    u = cfg.unreferenced
    src = "synthetic, AVSBench layout" if u.source.value == "synthetic" else f"AVSBench release at {u.root}"
    return (f"Unreferenced AVS zero-shot ({', '.join(x.upper() for x in subsets)} test, {src}; prompt "
            f"'{cfg.data.unref_expression}'; mIoU at sigmoid > 0.5, F; batches of 4 clips as AVSBench's test.py)")


def main() -> int:
    args = cli.arg_parser(__doc__).parse_args()
    cfg = cli.config_from_args(args)
    cli.setup_logging(cfg)
    t0 = time.time()
    out = run_all(cfg)
    if cfg.data.subset is None:
        print(f"\nRef-AVS metrics on the {cfg.data.source.value} test splits (J, F: higher is better; Null S: lower)")
    else:
        print(f"\nAVSBench {cfg.data.subset.upper()} metrics on the {cfg.data.source.value} test split "
              "(mIoU, F: higher is better)")
    print(out["table"])
    if out["unreferenced_table"]:
        print("\n" + out["unreferenced_table"])
    print(f"(both protocols: {cfg.run.dir / 'results_table.txt'})")
    print(f"\nfinished in {time.time() - t0:.0f}s; everything is under {cfg.run.dir}")
    print(f"MLflow store: {out['tracking_uri']}")
    print(f"open its UI:  make mlflow-ui RUN_ROOT={cfg.run.root} RUN={cfg.run.name}   (http://127.0.0.1:5000)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
