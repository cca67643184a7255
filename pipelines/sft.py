"""Stage 1: structured-CoT SFT with [SEG] feature distillation against the frozen stage-0 teacher.

    python pipelines/sft.py [--config configs/tiny.yaml] [key=value ...]

Rerunning with the same run.name resumes from the last checkpoint; a finished stage is skipped.
"""

import sys

from aurora_core import cli, stages


def main() -> int:
    args = cli.arg_parser(__doc__).parse_args()
    cli.setup_logging()
    cfg = cli.config_from_args(args)
    tracker = stages.tracker_for(cfg)
    parent = tracker.parent("sft", stages.params_of(cfg))
    try:
        stages.sft(cfg, tracker, parent)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        tracker.finish(parent, "FAILED")
        return 1
    tracker.finish(parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
