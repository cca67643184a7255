"""The whole pipeline on one command (what `make demo` runs):

    prepare data -> teacher -> SFT -> reflect -> GRPO -> evaluate each stage's export -> one table

    python pipelines/all.py [--config configs/tiny.yaml] [key=value ...]

Stages whose output is complete are skipped, so a rerun continues where the last one stopped.
"""

import sys
import time

from aurora_core import cli, stages
from aurora_core.config import Source
from aurora_core.data import shards, synthetic
from aurora_core.metrics import format_table


def prepare(cfg) -> None:
    layout = stages.RunLayout(cfg)
    if shards.manifest_exists(layout.shards):
        print(f"[data] shard set at {layout.shards}: skipped")
        return
    raw = cfg.data.raw_dir(cfg.run)
    if cfg.data.source == Source.synthetic:
        print(f"[data] generating synthetic Ref-AVS into {raw}")
        synthetic.generate(raw, cfg.data)
    summary = shards.convert(raw, layout.shards, cfg.data, source=cfg.data.source.value,
                             seed=cfg.data.synthetic.seed, config=stages.params_of(cfg))
    print("[data] " + summary.render().replace("\n", "\n[data] "))


def run_all(cfg) -> dict:
    """Every stage in turn (each skipped if complete), then the evaluation of every stage's export."""
    prepare(cfg)
    tracker = stages.tracker_for(cfg)
    parent = tracker.parent("all", stages.params_of(cfg))
    layout = stages.RunLayout(cfg)
    try:
        stages.teacher(cfg, tracker, parent)
        stages.sft(cfg, tracker, parent)
        stages.reflect(cfg, tracker, parent)
        stages.grpo(cfg, tracker, parent)
        results = {s: stages.evaluate(cfg, tracker, parent, layout.export(s), s) for s in stages.STAGES}
    except BaseException:
        tracker.finish(parent, "FAILED")
        raise
    from aurora_core.evaluate import table_title

    table = format_table({s: r["table"] for s, r in results.items()}, table_title(cfg))
    other = "split" if cfg.eval.protocol == "official" else "official"
    full = table + "\n\n" + format_table({s: r["tables"][other] for s, r in results.items()}, table_title(cfg, other))
    (layout.dir / "results_table.txt").write_text(full + "\n")
    from aurora_core.tracking import RunLogger

    RunLogger(tracker.uri if tracker.enabled else None, parent).text(full + "\n", "results_table.txt")
    tracker.finish(parent)
    return {"results": results, "table": table, "tracking_uri": tracker.uri}


def main() -> int:
    args = cli.arg_parser(__doc__).parse_args()
    cli.setup_logging()
    cfg = cli.config_from_args(args)
    t0 = time.time()
    out = run_all(cfg)
    print(f"\nRef-AVS metrics on the {cfg.data.source.value} test splits (J, F: higher is better; Null S: lower)")
    print(out["table"])
    print(f"(both protocols: {cfg.run.dir / 'results_table.txt'})")
    print(f"\nfinished in {time.time() - t0:.0f}s; everything is under {cfg.run.dir}")
    print(f"MLflow store: {out['tracking_uri']}")
    print(f"open its UI:  make mlflow-ui RUN_ROOT={cfg.run.root} RUN={cfg.run.name}   (http://127.0.0.1:5000)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
