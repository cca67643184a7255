"""Stage 3: GRPO with IoU-based rewards — a pool of Ray rollout actors and a DeepSpeed ZeRO-3 learner.

    python pipelines/grpo.py                          # embedded default: local Ray, configs/tiny.yaml,
                                                      # starting from <run>/exports/reflect
    python pipelines/grpo.py --init PATH [key=value ...]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python pipelines/grpo.py run.root=/abs/runs

Rerunning with the same run.name resumes from the last GRPO checkpoint.
"""

import sys

from aurora_core import cli, stages


def main() -> int:
    p = cli.arg_parser(__doc__)
    p.add_argument("--init", help="export directory to start from (default: the run's stage-2 export)")
    args = p.parse_args()
    cfg = cli.config_from_args(args)
    cli.setup_logging(cfg)
    tracker = stages.tracker_for(cfg)
    try:
        parent = tracker.parent("grpo", stages.params_of(cfg))
        stages.grpo(cfg, tracker, parent, init=args.init)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    tracker.finish(parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
