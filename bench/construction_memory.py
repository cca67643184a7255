"""Benchmark: host memory of each ZeRO-3 worker while the model is built, with and without
``model.zero_init`` (deepspeed.zero.Init through transformers' HfDeepSpeedConfig).

    python bench/construction_memory.py [--ckpt DIR] [--text-layers 8] [--workers 2] [--out bench-construction-memory.json]

Config: configs/qwen2.5-omni-7b.yaml (+ make_reduced_checkpoint.cpu_overrides) on a reduced-depth
checkpoint at the real widths in the hub's layout (built into a temporary directory unless ``--ckpt``
names one: 3B text widths, ``--text-layers`` decoder layers, 1 layer per other tower, SAM ViT-B at
1024 px). The decoder layers are what zero.Init spreads over the ranks; with 1 layer the model is
mostly the embedding and lm_head, which each rank still materialises whole for a moment (one module
at a time) while they are loaded. ``--workers`` processes form one
gloo group on this machine's CPU, as the SFT workers and the GRPO learner do, and each runs what a
fresh SFT stage runs before its first step: ``build_model`` (the full-Omni checkpoint, its thinker
only), then ``deepspeed.initialize``. Each mode runs in fresh processes, so ``ru_maxrss`` is that
mode's peak. Per worker it prints peak RSS after the build and after the engine is up, and checks
that the weights really loaded: a decoder weight gathered from the partitions equals the tensor in
``model.safetensors``.

What it divides by: nothing; the figures are per worker process. The whole-model RSS of one worker
is the model's size (fp32 here) plus the process's own (torch, transformers: ~0.6 GB); with
zero_init each worker holds ~1/K of the parameters, and rank 0 reads the checkpoint through a
memory map.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import make_reduced_checkpoint as reduced  # noqa: E402

PROBE = "model.layers.0.self_attn.q_proj.weight"  # a thinker weight, under the hub's "thinker." prefix


def worker(rank: int, world: int, port: int, overrides: list[str], zero_init: bool, out: str) -> None:
    import torch.distributed as dist
    from safetensors import safe_open

    from aurora_core import memory
    from aurora_core.config import load_config
    from aurora_core.model.build import build_model
    from aurora_core.train import zero3

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = load_config(REPO / "configs" / "qwen2.5-omni-7b.yaml", overrides + [f"model.zero_init={zero_init}"])
    opt = zero3.Optimization.for_stage(cfg.teacher, 1)
    ds_cfg = zero3.deepspeed_config(cfg.train.deepspeed_config, opt, bf16=False)
    with zero3.partitioned_build(ds_cfg, zero_init):
        model, _ = build_model(cfg.model, cfg.data)
    built = memory.peak_mb()["mem/peak_rss_mb"]
    local = sum(p.ds_tensor.numel() if zero3.is_partitioned(p) else p.numel() for p in model.parameters())
    partitioned = sum(p.ds_numel for p in model.parameters() if zero3.is_partitioned(p))
    engine, _ = zero3.initialize(model, ds_cfg, opt)
    ready = memory.peak_mb()["mem/peak_rss_mb"]
    q = engine.module.thinker.model.language_model.layers[0].self_attn.q_proj.base_layer.weight
    with zero3.gathered([q]):
        got = q.detach().clone()
    with safe_open(str(Path(cfg.model.llm_path) / "model.safetensors"), "pt") as f:
        want = f.get_tensor("thinker." + PROBE).to(got.dtype)
    peaks = torch.tensor([built, ready, float(local), float(partitioned), float(torch.equal(got, want))],
                         dtype=torch.float64)
    every = [torch.zeros_like(peaks) for _ in range(world)]
    dist.all_gather(every, peaks)
    if rank == 0:
        Path(out).write_text(json.dumps([dict(zip(("built_rss_mb", "engine_rss_mb", "local_params", "partitioned_params", "weights_loaded"),
                                                  t.tolist())) for t in every]))
    dist.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="directory made by make_reduced_checkpoint.py (default: build one, 3b/1 layer)")
    p.add_argument("--text-layers", type=int, default=8, help="decoder layers of the checkpoint built here")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="bench-construction-memory.json")
    args = p.parse_args()
    import torch.multiprocessing as mp

    work = Path(tempfile.mkdtemp(prefix="construction-memory-"))
    if args.ckpt:
        ck = Path(args.ckpt)
        dirs = {"full": next(ck.glob("qwen2.5-omni-*[0-9]b")), "sam": next(ck.glob("sam-*"))}
    else:
        dirs = reduced.build(work / "ckpt", "3b", 1, "vit-b", text_layers=args.text_layers)
    overrides = reduced.cpu_overrides(dirs, work / "runs")
    report = {"config": {"checkpoint": str(dirs["full"]), "sam": str(dirs["sam"]), "workers": args.workers,
                         "dtype": "float32"}}
    for zero_init in (False, True):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        res = work / f"zero_init_{zero_init}.json"
        mp.start_processes(worker, args=(args.workers, port, overrides, zero_init, str(res)), nprocs=args.workers,
                           start_method="spawn")
        report[f"zero_init={str(zero_init).lower()}"] = json.loads(res.read_text())

    layers = json.loads((dirs["full"] / "config.json").read_text())["thinker_config"]["text_config"]["num_hidden_layers"]
    report["config"]["text_layers"] = layers
    print(f"\nconstruction memory per ZeRO-3 worker: {dirs['full'].name} ({layers} decoder layers, fp32) + {dirs['sam'].name}, "
          f"{args.workers} gloo workers, build_model then deepspeed.initialize")
    for mode in ("zero_init=false", "zero_init=true"):
        for r, w in enumerate(report[mode]):
            print(f"  {mode:16s} rank {r}: peak RSS after build {w['built_rss_mb']:7.0f} MiB, with the engine "
                  f"{w['engine_rss_mb']:7.0f} MiB; {w['local_params'] / 1e6:7.1f} M parameters held after the build; "
                  f"weights loaded {'yes' if w['weights_loaded'] else 'NO'}")
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"  written to {args.out}")
    return 0 if all(w["weights_loaded"] for m in ("zero_init=false", "zero_init=true") for w in report[m]) else 1


if __name__ == "__main__":
    sys.exit(main())
