"""Evaluate an exported model on the test splits of a benchmark and print its table.

    python pipelines/evaluate.py --model runs/tiny/exports/grpo [--splits test_s,test_u,test_n] [key=value ...]
    python pipelines/evaluate.py --model runs/tiny/exports/grpo --benchmark avsbench --subset s4|ms3

Ref-AVS (default): the run's data. AVSBench: zero-shot unreferenced segmentation on the subset's test
split, from `unreferenced.source` (synthetic, generated on first use) or the release at
`unreferenced.root` (converted on first use). Writes <run>/eval/<name>/results.json (AVSBench:
<name>-avsbench-<subset>) and answers.jsonl; logs metrics, the table and mask overlays of the best and
worst clips to MLflow.
"""

import sys
from pathlib import Path

from aurora_core import cli, stages
from aurora_core.evaluate import scoring, table_title
from aurora_core.metrics import format_table


def main() -> int:
    p = cli.arg_parser(__doc__)
    p.add_argument("--model", required=True, help="an export directory (e.g. <run>/exports/grpo)")
    p.add_argument("--splits", help="comma-separated splits (default: eval.splits, else the benchmark's test splits)")
    p.add_argument("--name", help="row name in the table (default: the model directory's name)")
    p.add_argument("--benchmark", choices=["refavs", "avsbench"], default="refavs",
                   help="avsbench: zero-shot on an AVSBench subset (--subset)")
    p.add_argument("--subset", choices=["s4", "ms3"], help="the AVSBench subset (with --benchmark avsbench)")
    args = p.parse_args()
    if (args.benchmark == "avsbench") != (args.subset is not None):
        print("error: --benchmark avsbench and --subset s4|ms3 go together", file=sys.stderr)
        return 2
    cfg = cli.config_from_args(args)
    cli.setup_logging(cfg)
    tracker = stages.tracker_for(cfg)
    parent = tracker.parent("evaluate", stages.params_of(cfg))
    try:
        if args.subset:
            name = args.name or Path(args.model).name
            result = stages.evaluate_unreferenced(cfg, tracker, parent, {name: Path(args.model)}, args.subset)[name]
            cfg = cfg.for_unreferenced(args.subset)
        else:
            result = stages.evaluate(cfg, tracker, parent, args.model, args.name,
                                     args.splits.split(",") if args.splits else None)
    except (FileNotFoundError, ValueError) as e:  # incl. a bad AVSBench row (BadRow, DatasetError)
        print(f"error: {e}", file=sys.stderr)
        tracker.finish(parent, "FAILED")
        return 1
    tracker.finish(parent)
    print(format_table({result["name"]: result["table"]}, table_title(cfg, result.get("protocol")), scoring(cfg).columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
