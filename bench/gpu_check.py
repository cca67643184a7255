"""The GPU path in one script (<= 8 minutes on one H100/H200): run it whenever a GPU is at hand.

    python bench/gpu_check.py [--out DIR] [--size 3b|7b] [--layers 2]
    python bench/gpu_check.py --config-only      # no GPU needed: compose and validate the config

On a reduced-depth checkpoint at the real widths (bench/make_reduced_checkpoint.py, SAM ViT-H
widths at 1024 px) with configs/qwen2.5-omni-7b.yaml's data and model settings, on one GPU:
  1. NCCL: a process group of one rank, an all-reduce on the GPU;
  2. a bf16 ZeRO-3 SFT step (the teacher stage, 1 Ray Train GPU worker, NCCL);
  3. CUDA generate_with_masks (2 prompts x 3 samples, 10 frames at SAM 1024);
  4. two GRPO steps: a learner (half the GPU) and a rollout actor (the other half); on one GPU the
     weights go through the object store (an NCCL broadcast needs a GPU per member);
  5. an evaluation batch;
and prints tokens/s, samples/s, the GRPO step breakdown and the peak GPU memory of each part, and
writes them to <out>/gpu_check.json. Nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import make_reduced_checkpoint as reduced  # noqa: E402

from aurora_core import cli, memory  # noqa: E402
from aurora_core.config import load_config  # noqa: E402

# on top of the CPU overrides (files, sizes): the GPU settings of the real config, squeezed onto one GPU
GPU = ["model.dtype=bfloat16", "model.max_answer_tokens=128", "train.use_gpu=true", "train.num_workers=1",
       "train.cpus_per_worker=2", "teacher.max_steps=2", "teacher.batch_size=2",
       "inference.gpus_per_actor=1", "eval.gpus_per_actor=1", "grpo.use_gpu=true", "grpo.learner_gpus=0.5",
       "grpo.gpus_per_actor=0.5", "grpo.weight_sync=object_store", "grpo.steps=2", "grpo.prompts_per_step=2",
       "grpo.num_samples=3", "grpo.max_new_tokens=128", "grpo.micro_batch=3", "grpo.checkpoint_every=2",
       "inference.max_new_tokens=128", "eval.max_new_tokens=128"]


def gpu_config(dirs, root: Path):
    return load_config(REPO / "configs" / "qwen2.5-omni-7b.yaml", reduced.cpu_overrides(dirs, root) + GPU)


def nccl_check() -> dict:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29591")
    t0 = time.time()
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    x = torch.ones(1 << 20, device="cuda")
    dist.all_reduce(x)
    torch.cuda.synchronize()
    ok = bool(x[0] == 1)
    dist.destroy_process_group()
    return {"nccl_ok": ok, "nccl_version": ".".join(map(str, torch.cuda.nccl.version())), "seconds": time.time() - t0}


def generate_check(cfg) -> dict:
    import pyarrow.parquet as pq

    from aurora_core.data import shards
    from aurora_core.model.build import build_model

    d = cfg.data
    table = pq.read_table(shards.split_files(d.shards_dir(cfg.run), ["val"])).slice(0, 2)
    raw = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    batch = shards.collate(shards.decode_batch(raw, d.frame_size, d.num_frames, d.sample_rate, d.audio_seconds))
    model, proc = build_model(cfg.model, cfg.data)
    model.to("cuda").eval()
    torch.cuda.reset_peak_memory_stats()
    prompts = proc.prompt_batch(batch).to("cuda", torch.bfloat16)
    torch.cuda.synchronize()
    t0 = time.time()
    r = model.generate_with_masks(prompts, num_samples=3, temperature=1.0, top_p=0.9,
                                  max_new_tokens=cfg.model.max_answer_tokens, eos_id=proc.eos_id, pad_id=proc.pad_id,
                                  suppress_ids=proc.suppress_ids, decode=proc.decode)
    torch.cuda.synchronize()
    dt = time.time() - t0
    n = int(r.completion_mask.sum())
    out = {"seconds": dt, "tokens": n, "tokens_per_s": n / dt, "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20}
    del model
    torch.cuda.empty_cache()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu-check")
    p.add_argument("--size", choices=sorted(reduced.TEXT), default="3b")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--config-only", action="store_true", help="compose and validate the GPU config; exit")
    args = p.parse_args()
    cli.setup_logging()
    out = Path(args.out).resolve()
    if args.config_only:
        dirs = {"full": out / "ckpt" / f"qwen2.5-omni-{args.size}", "sam": out / "ckpt" / "sam-vit-h"}
        cfg = gpu_config(dirs, out / "runs")
        g = cfg.grpo
        print(f"GPU check config ok: {cfg.model.dtype}, SAM {cfg.model.sam_image_size} px, {cfg.data.num_frames} frames, "
              f"learner {g.learner_gpus} GPU + {g.rollout_actors} rollout actor x {g.gpus_per_actor} GPU, "
              f"weights by {g.weight_sync}")
        return 0
    if not torch.cuda.is_available():
        print("error: no CUDA device; bench/gpu_check.py is for a GPU machine (--config-only runs anywhere)",
              file=sys.stderr)
        return 1
    from aurora_core import stages

    t_all = time.time()
    res: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    print(f"[gpu-check] {res['device']}, torch {res['torch']}", flush=True)
    res["nccl"] = nccl_check()
    print(f"[gpu-check] NCCL {res['nccl']}", flush=True)
    t0 = time.time()
    dirs = reduced.build(out / "ckpt", args.size, args.layers, "vit-h")
    res["checkpoint_s"] = time.time() - t0
    cfg = gpu_config(dirs, out / "runs")
    stages.prepare(cfg)
    tracker = stages.tracker_for(cfg)

    t = stages.teacher(cfg, tracker, None)
    res["sft"] = {k: t.get(k) for k in ("seconds", "train/samples_per_s", "train/tokens_per_s", "train/step_time_s",
                                        "mem/peak_gpu_mb", "mem/peak_rss_mb")}
    print(f"[gpu-check] SFT (bf16 ZeRO-3, NCCL): {res['sft']}", flush=True)
    res["generate"] = generate_check(cfg)
    print(f"[gpu-check] generate_with_masks: {res['generate']}", flush=True)
    g = stages.grpo(cfg, tracker, None, init=stages.RunLayout(cfg).export("teacher"))
    keys = ("time/step_s", "time/generate_s", "time/learner_s", "time/sync_s", "time/idle_s", "gen_tokens_per_s",
            "sync/payload_mb", "learner_mem/peak_gpu_mb", "learner_mem/peak_rss_mb")
    res["grpo"] = [{k: h.get(k) for k in keys} for h in g["history"]]
    print(f"[gpu-check] GRPO steps: {json.dumps(res['grpo'], indent=1)}", flush=True)
    e = stages.evaluate(cfg, tracker, None, stages.RunLayout(cfg).export("grpo"), splits=["test_s"])
    res["eval_s"] = e["seconds"]
    res["total_s"] = time.time() - t_all
    res["driver_memory"] = memory.peak_mb()
    (out / "gpu_check.json").write_text(json.dumps(res, indent=1))
    print(f"[gpu-check] done in {res['total_s']:.0f}s; {out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
