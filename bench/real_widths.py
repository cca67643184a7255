"""Benchmark: where one GRPO step's work goes at real widths, and what a weight push costs at 7B.

    python bench/real_widths.py [--ckpt DIR] [--prompts 2] [--samples 3] [--out bench-real-widths.json]

Config: configs/qwen2.5-omni-7b.yaml on a reduced-depth checkpoint at the real widths in the hub's
layout (bench/make_reduced_checkpoint.py; built into a temporary directory unless ``--ckpt`` names
one: 3B text widths, 1 layer per tower, SAM ViT-B widths at 1024 px), on this machine's CPU, in one
process (no Ray, no DeepSpeed: the learner part is plain autograd, so ZeRO-3's gathers are not in it).
One step = the rollout side's ``generate_with_masks`` of ``--prompts`` prompts x ``--samples`` samples,
then the learner side's work on the same completions: the rollout's frozen features shipped through
the object store (grpo.learner_features=ship, the default), a teacher-forced forward + backward per
micro-batch (``grpo.micro_batch``).

It prints, per step:
  - calls and wall time of each frozen encoder (SAM image encoder, vision tower, audio tower), the
    mask decoder, and the rest (LLM forward/backward, generate), measured with forward hooks;
  - frozen work done / needed over the whole step, where *needed* is each clip once: SAM frames B*T,
    vision patches of B clips, B audio clips; 1.0 = nothing recomputed;
  - the learner's frozen features shipped (object store put + get, same node) against recomputed;
  - the weight-push payload at the full 7B widths (28 layers, LoRA r=8 on q/v, SAM ViT-H's mask
    decoder, seg_proj) for model.trainable_tokens=new and =full, counted on a meta-device build, in the
    learner's GPU wire dtype (bf16);
  - peak RSS of this process.
It writes the same figures as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import make_reduced_checkpoint as reduced  # noqa: E402

from aurora_core import cli, memory  # noqa: E402
from aurora_core.config import load_config  # noqa: E402


class Meter:
    """Forward hooks on a module: calls, items seen (frames, patches or clips) and wall time."""

    def __init__(self, module: torch.nn.Module, items):
        self.calls = self.items = 0
        self.seconds = 0.0
        self._t0 = 0.0
        self.hooks = [module.register_forward_pre_hook(self._pre, with_kwargs=True),
                      module.register_forward_hook(self._post)]
        self._items = items

    def _pre(self, mod, args, kwargs):
        self.calls += 1
        self.items += self._items(args, kwargs)
        self._t0 = time.perf_counter()

    def _post(self, mod, args, out):
        self.seconds += time.perf_counter() - self._t0

    def reset(self) -> None:
        self.calls = self.items = 0
        self.seconds = 0.0


def payload_mb(size: str, trainable_tokens: str) -> dict[str, float]:
    """Trainable parameters and bf16 push size of the full-depth model at ``size`` widths (meta device)."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration, SamConfig, SamModel

    from aurora_core.config import ModelConfig
    from aurora_core.model import token_rows
    from aurora_core.model.aurora import AuroraModel
    from aurora_core.model.build import _lora
    from peft import get_peft_model

    tcfg = reduced.thinker_config(size, 1, text_layers=reduced.TEXT[size]["num_hidden_layers"])
    m = replace(ModelConfig(llm_path="meta"), trainable_tokens=trainable_tokens)
    with torch.device("meta"):
        thinker = Qwen2_5OmniThinkerForConditionalGeneration(tcfg)
        llm = get_peft_model(thinker, _lora(m))
        if trainable_tokens == "new":
            token_rows.wrap(thinker, [151665])  # [SEG]: the first id after Qwen's added tokens
        sam = SamModel(SamConfig(vision_config=dict(**{**reduced.SAM_VISION["vit-h"], "num_hidden_layers": 1})))
        model = AuroraModel(llm, sam, 151665, 256)
    parts = collections.Counter()
    for n, p in model.named_parameters():
        if p.requires_grad:
            key = ("lora" if "lora_" in n else "token rows" if (".rows" in n or "modules_to_save" in n)
                   else n.split(".")[0] if not n.startswith("sam.") else "sam.mask_decoder")
            parts[key] += p.numel()
    total = sum(parts.values())
    return {"trainable": total, "mb_bf16": total * 2 / 2**20, **{f"params/{k}": v for k, v in parts.items()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="directory made by make_reduced_checkpoint.py (default: build one, 3b/1 layer)")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--out", default="bench-real-widths.json")
    args = p.parse_args()
    cli.setup_logging()
    import pyarrow.parquet as pq

    from aurora_core import stages
    from aurora_core.data import shards
    from aurora_core.model.aurora import token_logprobs
    from aurora_core.model.build import build_model

    payload = {tt: payload_mb("7b", tt) for tt in ("new", "full")}  # first: seconds, and fails fast
    work = Path(tempfile.mkdtemp(prefix="real-widths-"))
    if args.ckpt:
        ck = Path(args.ckpt)
        dirs = {"full": next(ck.glob("qwen2.5-omni-*[0-9]b")), "sam": next(ck.glob("sam-*"))}
    else:
        dirs = reduced.build(work / "ckpt", "3b", 1, "vit-b")
    cfg = load_config(REPO / "configs" / "qwen2.5-omni-7b.yaml",
                      reduced.cpu_overrides(dirs, work / "runs") + [f"data.synthetic.val_clips={args.prompts}"])
    stages.prepare(cfg)
    d = cfg.data
    table = pq.read_table(shards.split_files(cfg.data.shards_dir(cfg.run), ["val"])).slice(0, args.prompts)
    raw = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    batch = shards.collate(shards.decode_batch(raw, d.frame_size, d.num_frames, d.sample_rate, d.audio_seconds))
    B, G, T = len(batch["key"]), args.samples, d.num_frames

    t0 = time.time()
    model, proc = build_model(cfg.model, cfg.data)
    print(f"model built in {time.time() - t0:.1f}s from {dirs['full']}")
    th = model.thinker.model
    meters = {
        "sam image encoder (frames)": Meter(model.sam.vision_encoder, lambda a, k: a[0].shape[0]),
        "vision tower (patches)": Meter(th.visual, lambda a, k: a[0].shape[0]),
        "audio tower (clips)": Meter(th.audio_tower, lambda a, k: len(k["feature_lens"])),
        "mask decoder (frames)": Meter(model.sam.mask_decoder, lambda a, k: k["image_embeddings"].shape[0]),
    }
    prompts = proc.prompt_batch(batch)
    needed = {"sam image encoder (frames)": B * T, "vision tower (patches)": prompts.pixel_values_videos.shape[0],
              "audio tower (clips)": B}
    report: dict[str, dict] = {}

    # ---- rollout side
    model.eval()
    t0 = time.perf_counter()
    r = model.generate_with_masks(prompts, num_samples=G, temperature=1.0, top_p=0.9,
                                  max_new_tokens=cfg.grpo.max_new_tokens, eos_id=proc.eos_id, pad_id=proc.pad_id,
                                  suppress_ids=proc.suppress_ids, decode=proc.decode)
    wall = time.perf_counter() - t0
    report["rollout"] = {"wall_s": wall, "tokens": int(r.completion_mask.sum()),
                         **{k: vars_of(m) for k, m in meters.items()}}
    for m in meters.values():
        m.reset()

    # ---- learner side: the rollout's features shipped (one object per prompt, as the actors put
    # them), forward + backward per micro-batch
    import ray

    from aurora_core.model.aurora import FrozenFeatures

    size = sum(x.numel() * x.element_size() for x in (r.features.audio, r.features.video, r.features.image_embeddings))
    ray.init(address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=max(256 * 2**20, 4 * size), log_to_driver=False)
    model.train()
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    t0 = time.perf_counter()
    refs = [ray.put(r.features.rows(j, j + 1)) for j in range(B)]
    feats = FrozenFeatures.cat(ray.get(refs)).repeat_interleave(G)
    t_ship = time.perf_counter() - t0
    rep = prompts.repeat_interleave(G)
    fwd = bwd = 0.0
    mb = cfg.grpo.micro_batch
    for s in range(0, B * G, mb):
        e = min(B * G, s + mb)
        t1 = time.perf_counter()
        out, logits = model.forward_completions(rep.rows(s, e), r.completion_ids[s:e], r.completion_mask[s:e],
                                                features=feats.rows(s, e))
        loss = -(token_logprobs(logits, r.completion_ids[s:e]) * r.completion_mask[s:e]).sum() \
            + out.mask_logits.float().mean()
        t2 = time.perf_counter()
        loss.backward()
        fwd, bwd = fwd + t2 - t1, bwd + time.perf_counter() - t2
    report["learner"] = {"wall_s": time.perf_counter() - t0, "llm_forward_s": fwd, "backward_s": bwd,
                         **{k: vars_of(m) for k, m in meters.items()}}
    ray.shutdown()

    # what grpo.learner_features=recompute would cost the learner instead (not counted as done work)
    with torch.no_grad():
        t0 = time.perf_counter()
        model.frozen_features(prompts)
        t_compute = time.perf_counter() - t0
    h7, e = reduced.TEXT["7b"]["hidden_size"], 64  # SAM ViT-H: 256 x 64 x 64 per frame
    per_prompt_7b = (T * 256 * e * e + (proc.num_video_tokens + proc.num_audio_tokens) * h7) * 2  # bf16
    report["ship_or_recompute"] = {"recompute_s": t_compute, "ship_same_node_s": t_ship, "bytes": size,
                                   "bytes_per_prompt_7b_vit_h_bf16": per_prompt_7b}

    report["frozen_done_over_needed"] = {
        k: (report["rollout"][k]["items"] + report["learner"][k]["items"]) / n for k, n in needed.items()}
    report["payload_7b"] = payload
    report["config"] = {"checkpoint": str(dirs["full"]), "prompts": B, "samples": G, "frames": T,
                        "sam_image_size": cfg.model.sam_image_size, "video_size": cfg.model.video_size,
                        "audio_seconds": d.audio_seconds, "max_new_tokens": cfg.grpo.max_new_tokens,
                        "micro_batch": mb, "encoder_batch": cfg.model.encoder_batch}
    report["memory"] = memory.peak_mb()

    print(f"\nreal widths, one GRPO step on CPU: {B} prompts x {G} samples, {T} frames, SAM {cfg.model.sam_image_size} px, "
          f"{cfg.grpo.max_new_tokens} new tokens ({dirs['full'].name}, 1 layer per tower)")
    for side in ("rollout", "learner"):
        rs = report[side]
        enc = sum(rs[k]["seconds"] for k in meters)
        rest = "LLM forward + backward" if side == "learner" else "generate + scoring forward"
        extra = (f"teacher-forced forward {rs['llm_forward_s']:.1f}s, backward {rs['backward_s']:.1f}s"
                 if side == "learner" else f"{rs['tokens']} tokens generated")
        print(f"  {side}: {rs['wall_s']:.1f}s wall; {extra}; outside the frozen encoders and the mask decoder "
              f"({rest}) {rs['wall_s'] - enc:.1f}s")
        for k in meters:
            print(f"    {k:28s} {rs[k]['calls']:3d} calls {rs[k]['items']:6d} items {rs[k]['seconds']:6.2f}s")
    for k, v in report["frozen_done_over_needed"].items():
        print(f"  frozen work done / needed  {k:28s} {v:.2f}")
    sr = report["ship_or_recompute"]
    print(f"  learner's frozen features for {B} prompts: shipped through the object store (same node, put + get; "
          f"used) {sr['ship_same_node_s']:.3f}s for {sr['bytes'] / 2**20:.0f} MB, recomputed {sr['recompute_s']:.2f}s; "
          f"at 7B + ViT-H {sr['bytes_per_prompt_7b_vit_h_bf16'] / 2**20:.1f} MB per prompt in bf16")
    for tt, pl in report["payload_7b"].items():
        print(f"  weight push at 7B, trainable_tokens={tt:4s}  {pl['trainable'] / 1e6:8.1f} M params  "
              f"{pl['mb_bf16']:8.1f} MB bf16  ({', '.join(f'{k[7:]} {v / 1e6:.1f} M' for k, v in pl.items() if k.startswith('params/'))})")
    print(f"  {memory.describe(report['memory'])} (one process; build without zero.Init)")
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"  written to {args.out}")
    return 0


def vars_of(m: Meter) -> dict[str, float]:
    return {"calls": m.calls, "items": m.items, "seconds": m.seconds}


if __name__ == "__main__":
    sys.exit(main())
