"""Evaluate an exported model on the Ref-AVS test splits and print the Ref-AVS table.

    python pipelines/evaluate.py --model runs/tiny/exports/grpo [--splits test_s,test_u,test_n] [key=value ...]

Writes <run>/eval/<name>/results.json and answers.jsonl; logs metrics, the table and mask overlays of
the best and worst clips to MLflow.
"""

import sys

from aurora_core import cli, stages
from aurora_core.metrics import format_table


def main() -> int:
    p = cli.arg_parser(__doc__)
    p.add_argument("--model", required=True, help="an export directory (e.g. <run>/exports/grpo)")
    p.add_argument("--splits", help="comma-separated splits (default: eval.splits)")
    p.add_argument("--name", help="row name in the table (default: the model directory's name)")
    args = p.parse_args()
    cli.setup_logging()
    cfg = cli.config_from_args(args)
    tracker = stages.tracker_for(cfg)
    parent = tracker.parent("evaluate", stages.params_of(cfg))
    try:
        result = stages.evaluate(cfg, tracker, parent, args.model, args.name,
                                 args.splits.split(",") if args.splits else None)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        tracker.finish(parent, "FAILED")
        return 1
    tracker.finish(parent)
    from aurora_core.evaluate import table_title

    print(format_table({result["name"]: result["table"]}, table_title(cfg, result.get("protocol"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
