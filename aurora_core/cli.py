"""The command line every pipeline script shares: ``--config FILE`` plus ``key=value`` overrides."""

from __future__ import annotations

import argparse
import sys

from aurora_core.config import DEFAULT_CONFIG, REPO_ROOT, AuroraConfig, ConfigError, load_config


def setup_logging(cfg: AuroraConfig | None = None) -> None:
    """The driver's logging (aurora_core.logs): our records on the console, everything from INFO up
    in ``<run>/logs/driver.log`` once the config, hence the run directory, is known."""
    from aurora_core import logs

    path = logs.setup(cfg.run.dir if cfg is not None else None, "driver")
    if path is not None:
        print(f"logs: {path} (the driver), {path.parent}/*.log (the workers)", flush=True)


def arg_parser(description: str) -> argparse.ArgumentParser:
    """The command line every pipeline script shares: --config FILE and key=value overrides."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG),
                   help=f"YAML config (default: {DEFAULT_CONFIG.relative_to(REPO_ROOT)})")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. data.synthetic.train_clips=32 run.name=exp1")
    return p


def config_from_args(args: argparse.Namespace) -> AuroraConfig:
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: invalid configuration: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def stage_main(doc: str, stage: str) -> int:
    """The whole main() of a supervised stage script (teacher.py, sft.py, reflect.py)."""
    from aurora_core import stages

    args = arg_parser(doc).parse_args()
    cfg = config_from_args(args)
    setup_logging(cfg)
    tracker = stages.tracker_for(cfg)
    parent = tracker.parent(stage, stages.params_of(cfg))
    try:
        getattr(stages, stage)(cfg, tracker, parent)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        tracker.finish(parent, "FAILED")
        return 1
    tracker.finish(parent)
    return 0
