"""Benchmark: N GRPO steps on the tiny default; throughput and where a step's wall time goes.

    python bench/grpo_step.py [--steps 10] [--init EXPORT] [key=value ...]

Without --init it starts from <run>/exports/reflect when that exists (after `make demo`), else from
a freshly built untrained model (throughput does not depend on the weights). It runs in its own
run directory (<run.root>/bench-grpo, reset each time) and prints:
  samples/s, generated tokens/s, and the step time split into model compute (generation + learner),
  weight sync, and idle/overhead as shares of the wall time, the overhead itemised (prompt fetch,
  object-store puts, advantages, the learner call's round trip beyond its own time, the rest);
  the mean reward / IoU of the first and last quarter of the steps (is the policy improving?).
"""

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from aurora_core import cli
from aurora_core.config import load_config
from aurora_core.model.build import build_model, is_export, save_export
from aurora_core.rl import driver
from aurora_core.rl.weight_sync import sync_mode
from aurora_core.runtime import init_ray
from aurora_core.stages import RunLayout
from aurora_core.tracking import RunLogger


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--init", help="export to start from")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cli.setup_logging()
    base = load_config(args.config, args.overrides)
    shards_dir = RunLayout(base).shards
    if not (shards_dir / "manifest.json").is_file():
        print(f"error: no shards at {shards_dir}; run `python pipelines/prepare_data.py` first", file=sys.stderr)
        return 1
    cfg = load_config(args.config, [*args.overrides, "run.name=bench-grpo", f"grpo.steps={args.steps}",
                                    f"grpo.checkpoint_every={args.steps}", f"data.shards={shards_dir}"])
    shutil.rmtree(cfg.run.dir, ignore_errors=True)
    init = Path(args.init) if args.init else RunLayout(base).export("reflect")
    if not is_export(init):
        model, proc = build_model(cfg.model, cfg.data)
        init = save_export(model, proc, cfg.model, cfg.run.dir / "init")
        print(f"(no stage-2 export: starting from an untrained model at {init})")
    init_ray(cfg)
    t0 = time.time()
    res = driver.run(cfg, init, cfg.run.dir / "exports" / "grpo", shards_dir, RunLogger(None, None))
    total = time.time() - t0
    h = res["history"]
    wall = sum(x["time/step_s"] for x in h)
    gen = sum(x["time/generate_s"] for x in h)
    learn = sum(x["time/learner_s"] for x in h)
    sync = sum(x["time/sync_s"] for x in h)
    g = cfg.grpo
    samples = len(h) * g.prompts_per_step * g.num_samples
    tokens = sum(x["gen_tokens_per_s"] * x["time/generate_s"] for x in h)
    print(f"\nGRPO bench: {len(h)} steps, {g.prompts_per_step} prompts x {g.num_samples} samples, "
          f"{g.rollout_actors} rollout actors, {g.learner_workers} learner workers "
          f"({'async' if g.async_rollouts else 'sync'}, weights by {sync_mode(g)}); "
          f"{total:.0f}s including {total - wall:.0f}s of set-up")
    print(f"  samples/s            {samples / wall:8.2f}")
    print(f"  generated tokens/s   {tokens / wall:8.1f}   (while generating: {tokens / max(gen, 1e-9):.1f})")
    print(f"  step wall time       {wall / len(h):8.2f} s")
    other = max(0.0, wall - gen - learn - sync)
    for name, v in (("model compute: generate", gen), ("model compute: learner", learn),
                    ("weight sync", sync), ("idle / overhead", other)):
        print(f"  {name:26s} {v / wall:6.1%}  ({v / len(h):.2f} s/step)")
    # the overhead itemised (the driver times each part; prefetch runs while the learner works)
    items = {k: sum(x[f"time/{k}_s"] for x in h) for k in ("fetch", "put", "advantages", "learner_call")}
    print(f"    prompt fetch per step: first {h[0]['time/fetch_s']:.3f} s, "
          f"median {float(np.median([x['time/fetch_s'] for x in h])):.3f} s")
    items["rest (scheduling, logging)"] = max(0.0, other - sum(items.values()))
    for name, v in items.items():
        print(f"    overhead: {name:24s} {v / wall:6.1%}  ({v / len(h):.3f} s/step)")
    pre = sum(x["time/prefetch_s"] for x in h)
    print(f"    next prompts prefetched under the learner: {pre / len(h):.3f} s/step (not in the step's critical path "
          f"unless the learner is faster)")
    q = max(1, len(h) // 4)
    for key in ("reward/total_mean", "iou", "J", "format_rate"):
        first, last = np.mean([x[key] for x in h[:q]]), np.mean([x[key] for x in h[-q:]])
        print(f"  {key:22s} first {q} steps {first:.3f} -> last {q} steps {last:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
