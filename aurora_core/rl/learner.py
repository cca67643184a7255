"""The GRPO learner: K Ray actors forming one torch.distributed group, each with a DeepSpeed ZeRO-3 engine.

Why an actor group and not a TorchTrainer: GRPO's driver must hand each step's rollouts to the
learner and get weights back between steps; a TorchTrainer runs a function to completion, so that
exchange would need queues around it. Actors give the driver a call per step (``step``,
``gather_weights``, ``save``) with the same DeepSpeed engine inside (gloo on CPU, NCCL + bf16 on GPU).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aurora_core import losses
from aurora_core.config import StageConfig
from aurora_core.rl import grpo

log = logging.getLogger(__name__)


def learner_stage_config(g) -> StageConfig:
    """The DeepSpeed settings of the learner, in the shape the shared engine code takes."""
    per_worker = g.prompts_per_step // g.learner_workers * g.num_samples
    return StageConfig(epochs=1, batch_size=g.micro_batch, grad_accum=per_worker // g.micro_batch, lr=g.lr,
                       weight_decay=g.weight_decay, warmup_steps=g.warmup_steps, min_lr_ratio=1.0)


class LearnerWorker:
    """Ray actor class (wrapped with ray.remote by LearnerGroup)."""

    def __init__(self, cfg: dict[str, Any], init_export: str, rank: int, world: int):
        from aurora_core.config import config_from_dict

        self.cfg = config_from_dict(cfg)
        self.init_export = init_export
        self.rank, self.world = rank, world
        self.last_weights: tuple[int, dict[str, torch.Tensor] | None] = (0, None)  # rank 0's last broadcast

    def address(self) -> tuple[str, int]:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        import ray

        return ray.util.get_node_ip_address(), port

    def setup(self, master: tuple[str, int]) -> int:
        import torch.distributed as dist

        from aurora_core.model.build import load_export
        from aurora_core.train import engine as ds

        g = self.cfg.grpo
        gpu = torch.cuda.is_available() and g.use_gpu
        self.device = torch.device("cuda:0" if gpu else "cpu")
        os.environ.update(LOCAL_RANK="0", RANK=str(self.rank), WORLD_SIZE=str(self.world),
                          MASTER_ADDR=master[0], MASTER_PORT=str(master[1]))
        dist.init_process_group("nccl" if gpu else "gloo", init_method=f"tcp://{master[0]}:{master[1]}",
                                rank=self.rank, world_size=self.world)
        torch.manual_seed(self.cfg.run.seed * 100 + self.rank)
        model, self.proc, _ = load_export(self.init_export, self.cfg.data, trainable=True)
        if g.kl_coef > 0 and not model.has_lora:
            raise ValueError("grpo.kl_coef > 0 needs a LoRA model: the reference is the policy with its "
                             "adapter disabled")
        model.to(self.device)
        self.st = learner_stage_config(g)
        self.engine, self.scheduler = ds.initialize(
            model, ds.deepspeed_config(g.deepspeed_config, self.st, g.steps * g.num_iterations, bf16=gpu))
        self.dtype = torch.bfloat16 if gpu else torch.float32
        return self.rank

    # ------------------------------------------------------------------ a step
    def step(self, clips: dict[str, Any], groups: list[dict[str, Any]], advantages: np.ndarray) -> dict[str, float]:
        """One GRPO update on this rank's groups. ``advantages`` [len(groups), G]."""
        import torch.distributed as dist

        from aurora_core.data.shards import collate

        g = self.cfg.grpo
        G = g.num_samples
        t0 = time.time()
        idx = [grp["index"] for grp in groups]
        sub = collate({k: v[idx] for k, v in clips.items()})
        c = max(grp["completion_ids"].shape[1] for grp in groups)

        def pad(a, value):
            return np.pad(a, ((0, 0), (0, c - a.shape[1])), constant_values=value)

        comp = torch.from_numpy(np.concatenate([pad(x["completion_ids"], self.proc.pad_id) for x in groups])).long()
        cmask = torch.from_numpy(np.concatenate([pad(x["completion_mask"], 0) for x in groups])).long()
        old = torch.from_numpy(np.concatenate([pad(x["logprobs"], 0.0) for x in groups])).float()
        adv = torch.from_numpy(np.asarray(advantages, dtype=np.float32).reshape(-1))
        masks_gt = sub["masks"].repeat_interleave(G, 0)
        prompts = self.proc.prompt_batch(sub).repeat_interleave(G)
        n = comp.shape[0]
        mb = g.micro_batch
        tokens = torch.tensor([float(cmask.sum())], dtype=torch.float64)
        dist.all_reduce(tokens)
        global_tokens = float(tokens.item())
        sums = torch.zeros(7, dtype=torch.float64)
        for _ in range(g.num_iterations):
            for start in range(0, n, mb):
                rows = slice(start, start + mb)
                p = _rows(prompts, rows, G).to(self.device, self.dtype)
                cm, ids = cmask[rows].to(self.device), comp[rows].to(self.device)
                out, logits = _forward(self.engine, p, ids, cm)
                logp = _logprobs(logits, ids, g.temperature)
                loss, stats = grpo.policy_loss(logp, old[rows].to(self.device), adv[rows].to(self.device), cm,
                                               g.clip_eps, g.clip_eps_high, num_tokens=global_tokens)
                total = loss
                kl_sum = torch.zeros((), device=self.device)
                if g.kl_coef > 0:
                    with torch.no_grad(), self.engine.module.adapter_disabled():
                        _, ref_logits = _forward(self.engine, p, ids, cm)
                    kl = grpo.kl_per_token(logp, _logprobs(ref_logits, ids, g.temperature), g.kl_estimator)
                    kl_sum = (kl * cm).sum()
                    total = total + g.kl_coef * kl_sum / global_tokens
                mask_l = 2.0 * losses.mask_bce(out.mask_logits, masks_gt[rows].to(self.device)) + \
                    0.5 * losses.dice_loss(out.mask_logits, masks_gt[rows].to(self.device))
                # mean over this worker's micro-batches, like the token mean above spans the batch
                total = total + g.mask_loss_weight * mask_l * (mb / n)
                # DeepSpeed averages gradients over ranks and divides by the accumulation steps; the
                # loss above is already normalised by the global token count, so undo both.
                self.engine.backward(total * self.world, scale_wrt_gas=False)
                self.engine.step()
                with torch.no_grad():
                    ent = (grpo.entropy_per_token(logits) * cm).sum()
                sums += torch.tensor([float(loss) * global_tokens, float(kl_sum), float(stats["clip_frac_sum"]),
                                      float(stats["tokens"]), float(ent), float(mask_l) * (mb / n),
                                      float(stats["ratio_sum"])], dtype=torch.float64)
        dist.all_reduce(sums)
        it = g.num_iterations
        tok = max(1.0, float(sums[3]))
        return {"loss/policy": float(sums[0]) / tok, "kl": float(sums[1]) / tok, "clip_frac": float(sums[2]) / tok,
                "entropy": float(sums[4]) / tok, "loss/mask": float(sums[5]) / (self.world * it),
                "ratio_mean": float(sums[6]) / tok, "lr": float(self.scheduler.get_last_lr()[0]),
                "learner_time_s": time.time() - t0, "optimizer_step": int(self.engine.global_steps)}

    # ------------------------------------------------------------------ weights and state
    def gather_weights(self) -> dict[str, torch.Tensor] | None:
        """Collective: every rank takes part, rank 0 returns the full trainable tensors."""
        from aurora_core.train import engine as ds

        w = ds.gather_trainable(self.engine)
        return w if self.rank == 0 else None

    def sync_manifest(self):
        """Names, full shapes and wire dtype of the trainable weights, in broadcast order."""
        from aurora_core.rl.weight_sync import Manifest
        from aurora_core.train import engine as ds

        params = ds.trainable(self.engine)
        self.manifest = Manifest([n for n, _ in params],
                                 [list(getattr(p, "ds_shape", p.shape)) for _, p in params],
                                 str(self.dtype).removeprefix("torch."))
        return self.manifest

    def open_sync_group(self, host: str, port: int, world: int, backend: str, timeout_s: int) -> str | None:
        """Rank 0 only: host the weight-sync group as its rank 0 (returns after every member joined);
        returns the GPU this rank broadcasts from (None on gloo)."""
        from aurora_core.rl.weight_sync import BroadcastGroup

        self.sync_group = BroadcastGroup(host, port, 0, world, backend, timeout_s)
        return self.sync_group.gpu_uuid()

    def broadcast_weights(self, version: int) -> float | None:
        """Collective over the learner ranks (the ZeRO-3 gather), then rank 0 broadcasts to the sync
        group and keeps the weights (a replaced rollout actor reads them). Returns rank 0's checksum."""
        from aurora_core.train import engine as ds

        w = ds.gather_trainable(self.engine)
        if self.rank != 0:
            return None
        self.last_weights = (version, w)
        return self.sync_group.send(w, self.manifest)

    def weights_of(self, version: int) -> dict[str, torch.Tensor]:
        """Rank 0: the weights of the last broadcast, which must be ``version``."""
        held, weights = self.last_weights
        if held != version:
            raise RuntimeError(f"asked for the weights of version {version}, rank 0 holds version {held}")
        return weights

    def save(self, path: str, step: int) -> None:
        from aurora_core.train import checkpoint as ckpt_io

        ckpt_io.save(self.engine, self.scheduler, ckpt_io.TrainState(global_step=step, world_size=self.world),
                     Path(path), self.rank, self.world)

    def load(self, path: str) -> int:
        from aurora_core.train import checkpoint as ckpt_io

        return ckpt_io.load(self.engine, self.scheduler, Path(path), self.rank, self.world).global_step

    def export(self, out: str, extra: dict[str, Any]) -> None:
        from aurora_core.model.build import export_with_weights

        w = self.gather_weights()
        if self.rank == 0:
            export_with_weights(self.init_export, self.cfg.model, self.cfg.data, w, Path(out), extra)


def _forward(engine, prompts, ids, cmask):
    """Through the DeepSpeed engine (its forward does ZeRO-3's parameter bookkeeping)."""
    from aurora_core.model.aurora import with_completions

    p = prompts.input_ids.shape[1]
    out = engine(with_completions(prompts, ids, cmask), True, p)
    return out, out.logits[:, p - 1:-1]


def _logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    from aurora_core.model.aurora import token_logprobs

    return token_logprobs(logits, ids, temperature)


def _rows(prompts, rows: slice, G: int):
    """Rows ``rows`` of a repeat_interleaved prompt batch (video patches are per-row blocks)."""
    from dataclasses import fields, replace

    n = prompts.input_ids.shape[0]
    per = prompts.pixel_values_videos.shape[0] // n
    kw = {f.name: getattr(prompts, f.name)[rows] for f in fields(prompts)
          if isinstance(getattr(prompts, f.name), torch.Tensor) and f.name != "pixel_values_videos"}
    pv = prompts.pixel_values_videos[rows.start * per:min(rows.stop, n) * per]
    return replace(prompts, **kw, pixel_values_videos=pv)


class LearnerGroup:
    def __init__(self, cfg, init_export: str):
        import ray

        from aurora_core.config import to_dict

        g = cfg.grpo
        resources = dict(num_cpus=g.learner_cpus, num_gpus=1 if g.use_gpu else None)
        cls = ray.remote(**{k: v for k, v in resources.items() if v is not None})(LearnerWorker)
        self.workers = [cls.remote(to_dict(cfg), str(init_export), r, g.learner_workers)
                        for r in range(g.learner_workers)]
        master = ray.get(self.workers[0].address.remote())
        ray.get([w.setup.remote(master) for w in self.workers])

    def step(self, clips_ref, groups: list[dict[str, Any]], advantages: np.ndarray):
        """Split the groups evenly over the ranks (prompts_per_step is a multiple of K); returns refs."""
        k = len(self.workers)
        per = len(groups) // k
        return [w.step.remote(clips_ref, groups[r * per:(r + 1) * per], advantages[r * per:(r + 1) * per])
                for r, w in enumerate(self.workers)]

    def gather_weights(self):
        """Refs of every rank's call; the first (rank 0) holds the weights, stored once in the object store."""
        return [w.gather_weights.remote() for w in self.workers]

    def broadcast_weights(self, version: int):
        """Refs of every rank's call; the first (rank 0) returns the checksum of what it sent."""
        return [w.broadcast_weights.remote(version) for w in self.workers]

    def call(self, method: str, *args):
        import ray

        return ray.get([getattr(w, method).remote(*args) for w in self.workers])

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w)
