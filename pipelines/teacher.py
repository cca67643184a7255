"""Stage 0: train the teacher (direct answers "It is <class> [SEG].") on Ray Train + DeepSpeed ZeRO-3.

    python pipelines/teacher.py [--config configs/tiny.yaml] [key=value ...]

Rerunning with the same run.name resumes from the last checkpoint; a finished stage is skipped.
"""

import sys

from aurora_core import cli, stages


def main() -> int:
    args = cli.arg_parser(__doc__).parse_args()
    cli.setup_logging()
    cfg = cli.config_from_args(args)
    tracker = stages.tracker_for(cfg)
    parent = tracker.parent("teacher", stages.params_of(cfg))
    try:
        stages.teacher(cfg, tracker, parent)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        tracker.finish(parent, "FAILED")
        return 1
    tracker.finish(parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
