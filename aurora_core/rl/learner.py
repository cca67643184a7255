"""The GRPO learner: K Ray actors forming one torch.distributed group, each with a DeepSpeed ZeRO-3 engine.

Why an actor group and not a TorchTrainer: GRPO's driver must hand each step's rollouts to the
learner and get weights back between steps; a TorchTrainer runs a function to completion, so that
exchange would need queues around it. Actors give the driver a call per step (``step``,
``gather_weights``, ``save``) with the same DeepSpeed engine inside (gloo on CPU, NCCL + bf16 on GPU).
"""

from __future__ import annotations

import collections
import logging
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aurora_core import logs, losses, memory
from aurora_core.model.aurora import FrozenFeatures, token_logprobs
from aurora_core.model.processor import ModelInputs
from aurora_core.rl import grpo
from aurora_core.rl.trajectory import RolloutGroup, shipped_features

log = logging.getLogger(__name__)


@dataclass
class LearnerBatch:
    """One rank's share of a step, padded and repeated, with the global counts the losses divide by."""

    prompts: ModelInputs  # [n] each prompt repeated G times (n = this rank's completions)
    features: FrozenFeatures  # [n] the frozen encoders' outputs of each completion's clip (once per prompt)
    completion_ids: torch.Tensor  # [n, C] long, pad_id after the end token
    completion_mask: torch.Tensor  # [n, C] long, 1 on generated tokens
    policy_mask: torch.Tensor  # [n, C] long, the tokens of the policy/KL terms (grpo.overlong)
    old_logprobs: torch.Tensor  # [n, C] float32, under the sampling policy
    ref_logprobs: torch.Tensor | None  # [n, C] float32, under the reference policy (KL on)
    advantages: torch.Tensor  # [n] float32
    masks_gt: torch.Tensor  # [n, T, S, S] ground-truth masks of each completion's clip
    gt_frames: torch.Tensor  # [n, T] bool, the frame has a ground-truth mask (the mask loss uses those)
    global_tokens: float  # policy tokens over all ranks
    global_seqs: float  # completions with at least one policy token, over all ranks
    global_samples: float  # completions over all ranks (the mask loss's mean)
    features_recomputed: float  # prompts whose frozen features the learners computed (not shipped), all ranks


class LearnerWorker:
    """Ray actor class (wrapped with ray.remote by LearnerGroup)."""

    def __init__(self, cfg: dict[str, Any], init_export: str, rank: int, world: int):
        from aurora_core.config import config_from_dict

        self.cfg = config_from_dict(cfg)
        logs.setup(self.cfg.run.dir, "grpo-learner", console_level="WARNING")
        self.init_export = init_export
        self.rank, self.world = rank, world
        self.last_weights: tuple[int, dict[str, torch.Tensor] | None] = (0, None)  # rank 0's last broadcast

    def __repr__(self) -> str:
        # Ray shows this in errors, the dashboard and the state API (repr_name): which rank failed
        return f"LearnerWorker(rank={self.rank}/{self.world})"

    def address(self) -> tuple[str, int]:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        import ray

        return ray.util.get_node_ip_address(), port

    def setup(self, master: tuple[str, int]) -> int:
        import torch.distributed as dist

        from aurora_core.model.build import load_export
        from aurora_core.train import zero3

        g = self.cfg.grpo
        gpu = torch.cuda.is_available() and g.use_gpu
        self.device = torch.device("cuda:0" if gpu else "cpu")
        os.environ.update(LOCAL_RANK="0", RANK=str(self.rank), WORLD_SIZE=str(self.world),
                          MASTER_ADDR=master[0], MASTER_PORT=str(master[1]))
        dist.init_process_group("nccl" if gpu else "gloo", init_method=f"tcp://{master[0]}:{master[1]}",
                                rank=self.rank, world_size=self.world)
        torch.manual_seed(self.cfg.run.seed * 100 + self.rank)
        opt = zero3.Optimization.for_grpo(g)
        ds_cfg = zero3.deepspeed_config(g.deepspeed_config, opt, gpu)
        with zero3.partitioned_build(ds_cfg, self.cfg.model.zero_init):
            model, self.proc, _ = load_export(self.init_export, self.cfg.data, trainable=True,
                                                 runtime=self.cfg.model)
        model.to(self.device)
        self.engine, self.scheduler = zero3.initialize(model, ds_cfg, opt)
        # GRPO's forwards run without dropout (peft's LoRA dropout included), as the rollout actors
        # do: an on-policy ratio exp(logp - logp_old) is then exactly 1 before the first update, and
        # clipping never fires on noise. The SFT stages keep train mode.
        self.engine.eval()
        if self.cfg.model.gradient_checkpointing:
            # transformers checkpoints a decoder layer only while that layer is in training mode: flag
            # the layers alone, their submodules (LoRA dropout) stay in eval
            for layer in self.engine.module.thinker.model.language_model.layers:
                layer.training = True
        self.dtype = torch.bfloat16 if gpu else torch.float32
        log.info("learner rank %d of %d ready (%s group at %s:%d)", self.rank, self.world,
                 dist.get_backend(), master[0], master[1])
        return self.rank

    # ------------------------------------------------------------------ a step
    def step(self, clips: dict[str, np.ndarray], rows: tuple[int, int], groups: list[RolloutGroup],
             advantages: np.ndarray) -> dict[str, float]:
        """One GRPO update on this rank's share of the step: rows ``rows[0]:rows[1]`` of the step's
        ``clips`` (read in place from the object store), aligned with ``groups``; ``advantages``
        [len(groups), G]. Returns the step's metrics, reduced over the ranks."""
        t0 = time.time()
        lrs = [float(x) for x in self.scheduler.get_last_lr()]  # the LRs this step's update uses (head, [LLM])
        batch = self._prepare({k: v[rows[0]:rows[1]] for k, v in clips.items()}, groups, advantages)
        sums, extremes = self._update(batch)
        return {**self._metrics(sums, extremes, lrs, t0), "features_recomputed": batch.features_recomputed}

    def _prepare(self, clips: dict[str, np.ndarray], groups: list[RolloutGroup], advantages: np.ndarray
                 ) -> LearnerBatch:
        """Pad the groups' completions to one width, repeat each prompt G times, and count the global
        tokens / completions / samples every loss term is divided by."""
        import torch.distributed as dist

        from aurora_core.data.shards import collate

        g = self.cfg.grpo
        G = g.num_samples
        sub = collate(clips)
        c = max(grp.completion_ids.shape[1] for grp in groups)

        def cat(field: str, value, dtype) -> torch.Tensor:
            arrs = [getattr(grp, field) for grp in groups]
            return torch.from_numpy(np.concatenate([np.pad(a, ((0, 0), (0, c - a.shape[1])), constant_values=value)
                                                    for a in arrs])).to(dtype)

        cmask = cat("completion_mask", 0, torch.long)
        truncated = torch.from_numpy(np.concatenate([grp.truncated for grp in groups]))
        # DAPO's overlong filtering: completions cut by the length limit leave the policy and KL terms
        pmask = cmask * (~truncated)[:, None].long() if g.overlong == "mask" else cmask
        counts = torch.tensor([float(pmask.sum()), float((pmask.sum(1) > 0).sum()), float(cmask.shape[0])],
                              dtype=torch.float64)
        dist.all_reduce(counts)
        prompts = self.proc.prompt_batch(sub)
        feats, recomputed = self._frozen_features(groups, prompts)
        return LearnerBatch(
            prompts=prompts.repeat_interleave(G), features=feats.repeat_interleave(G),
            completion_ids=cat("completion_ids", self.proc.pad_id, torch.long), completion_mask=cmask,
            policy_mask=pmask, old_logprobs=cat("logprobs", 0.0, torch.float32),
            ref_logprobs=cat("ref_logprobs", 0.0, torch.float32) if g.kl_coef > 0 else None,
            advantages=torch.from_numpy(np.asarray(advantages, dtype=np.float32).reshape(-1)),
            masks_gt=sub["masks"].repeat_interleave(G, 0), gt_frames=sub["gt_frames"].repeat_interleave(G, 0),
            global_tokens=float(counts[0]), global_seqs=float(counts[1]), global_samples=float(counts[2]),
            features_recomputed=recomputed)

    def _frozen_features(self, groups: list[RolloutGroup], prompts: ModelInputs) -> tuple[FrozenFeatures, float]:
        """The frozen towers' and SAM encoder's outputs for this rank's prompts, once per step (not per
        sample, micro-batch or iteration): the ones the rollout actors shipped (grpo.learner_features=ship),
        else computed here. Collective: if any rank lacks one (a rollout actor died, a batch restored
        from a checkpoint), every rank recomputes all of its own, since under ZeRO-3 each encoder forward
        gathers parameters from all ranks and every rank must make the same calls. Returns the features
        and the prompts recomputed over all ranks."""
        import torch.distributed as dist

        shipped = shipped_features([grp.features for grp in groups], self.device, self.dtype,
                                   f"learner rank {self.rank}")
        missing = torch.tensor([0.0 if shipped is not None else 1.0], dtype=torch.float64)
        dist.all_reduce(missing, op=dist.ReduceOp.MAX)
        if not missing.item():
            return shipped, 0.0
        feats = self.engine.module.frozen_features(prompts.to(self.device, self.dtype))
        return feats, float(len(groups) * self.world)

    def _update(self, b: LearnerBatch) -> tuple[dict[str, float], dict[str, float]]:
        """``grpo.num_iterations`` optimizer steps over the batch, in micro-batches. Every term is a
        share of a mean over the *global* batch, so the update is the same on 1 or K ranks:

            L = agg(pg + beta * KL) + w_mask * (w_bce * BCE + w_dice * Dice) * rows / global samples
        """
        g = self.cfg.grpo
        dev = self.device
        sums: dict[str, float] = collections.defaultdict(float)
        extremes = {"ratio_max": -math.inf, "ratio_min": math.inf}
        n = b.completion_ids.shape[0]
        for _ in range(g.num_iterations):
            for start in range(0, n, g.micro_batch):
                stop = min(n, start + g.micro_batch)
                ids, cm = b.completion_ids[start:stop].to(dev), b.completion_mask[start:stop].to(dev)
                pm = b.policy_mask[start:stop].to(dev)
                out, logits = _forward(self.engine, b.prompts.rows(start, stop).to(dev, self.dtype), ids, cm,
                                       b.features.rows(start, stop))
                logp = token_logprobs(logits, ids, g.temperature)
                pg, ratio, clipped = grpo.clipped_surrogate(logp, b.old_logprobs[start:stop].to(dev),
                                                            b.advantages[start:stop].to(dev), g.clip_eps,
                                                            g.clip_eps_high)
                per_token = pg
                if b.ref_logprobs is not None:
                    kl = grpo.kl_per_token(logp, b.ref_logprobs[start:stop].to(dev), g.kl_estimator)
                    per_token = pg + g.kl_coef * kl
                    sums["kl"] += float((kl.detach() * pm).sum())
                loss_policy = grpo.aggregate(per_token, pm, g.loss_agg, b.global_tokens, b.global_seqs)
                gt, valid = b.masks_gt[start:stop].to(dev), b.gt_frames[start:stop].to(dev)
                share = (stop - start) / b.global_samples
                loss_mask = (g.bce_weight * losses.mask_bce(out.mask_logits, gt, valid=valid)
                             + g.dice_weight * losses.dice_loss(out.mask_logits, gt, valid=valid)) * share
                total = loss_policy + g.mask_loss_weight * loss_mask
                # DeepSpeed averages gradients over the K ranks; with scale_wrt_gas=False it does not
                # divide by the accumulation steps. The terms above are shares of global means, so x K
                # turns the rank average back into the plain sum.
                self.engine.backward(total * self.world, scale_wrt_gas=False)
                self.engine.step()
                with torch.no_grad():
                    sums["loss/policy"] += float(loss_policy)
                    sums["loss/mask"] += float(loss_mask)
                    sums["loss/total"] += float(total)
                    sums["pg_tokens"] += float((pg.detach() * pm).sum())
                    sums["tokens"] += float(pm.sum())
                    sums["clipped"] += float((clipped.float() * pm).sum())
                    sums["ratio"] += float((ratio.detach() * pm).sum())
                    sums["entropy"] += float((grpo.entropy_per_token(logits) * cm).sum())
                    sums["entropy_tokens"] += float(cm.sum())
                    if pm.any():
                        r = ratio.detach()[pm.bool()]
                        extremes["ratio_max"] = max(extremes["ratio_max"], float(r.max()))
                        extremes["ratio_min"] = min(extremes["ratio_min"], float(r.min()))
        return sums, extremes

    def _metrics(self, sums: dict[str, float], extremes: dict[str, float], lrs: list[float], t0: float) -> dict[str, float]:
        """Sums over ranks (and max/min of the ratio), per iteration where a term is a loss."""
        import torch.distributed as dist

        names = ["loss/policy", "loss/mask", "loss/total", "pg_tokens", "tokens", "clipped", "ratio", "kl",
                 "entropy", "entropy_tokens"]
        red = torch.tensor([sums.get(k, 0.0) for k in names], dtype=torch.float64)
        dist.all_reduce(red)
        tot = dict(zip(names, red.tolist()))
        hi = torch.tensor([extremes["ratio_max"]], dtype=torch.float64)
        lo = torch.tensor([extremes["ratio_min"]], dtype=torch.float64)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        peaks = memory.peak_mb_over_ranks()
        it = self.cfg.grpo.num_iterations
        tok = max(1.0, tot["tokens"])
        return {"loss/policy": tot["loss/policy"] / it, "loss/mask": tot["loss/mask"] / it,
                "loss/total": tot["loss/total"] / it, "pg_token_mean": tot["pg_tokens"] / tok,
                "kl": tot["kl"] / tok, "clip_frac": tot["clipped"] / tok, "ratio_mean": tot["ratio"] / tok,
                "ratio_max": float(hi) if tot["tokens"] else 1.0, "ratio_min": float(lo) if tot["tokens"] else 1.0,
                "entropy": tot["entropy"] / max(1.0, tot["entropy_tokens"]), "lr": lrs[0],
                **({"llm_lr": lrs[1]} if len(lrs) > 1 else {}),
                "policy_tokens": tot["tokens"] / it, "learner_time_s": time.time() - t0,
                "optimizer_step": int(self.engine.global_steps),
                **{f"learner_{k}": v for k, v in peaks.items()}}

    # ------------------------------------------------------------------ weights and state
    def gather_weights(self, wire: bool = False) -> dict[str, torch.Tensor] | None:
        """Collective: every rank takes part, rank 0 returns the full trainable tensors (fp32 master
        copies; ``wire``: in the compute dtype, what a rollout actor loads: bf16 on GPUs halves a push)."""
        from aurora_core.train import zero3

        w = zero3.gather_trainable(self.engine)
        if self.rank != 0:
            return None
        return {n: v.to(self.dtype) for n, v in w.items()} if wire else w

    def sync_manifest(self):
        """Names, full shapes and wire dtype of the trainable weights, in broadcast order."""
        from aurora_core.rl.weight_sync import Manifest
        from aurora_core.train import zero3

        params = zero3.trainable(self.engine)
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
        from aurora_core.train import zero3

        w = zero3.gather_trainable(self.engine)
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


def _forward(engine, prompts, ids, cmask, features: FrozenFeatures):
    """Through the DeepSpeed engine (its forward does ZeRO-3's parameter bookkeeping)."""
    from aurora_core.model.aurora import with_completions

    p = prompts.input_ids.shape[1]
    out = engine(with_completions(prompts, ids, cmask), True, p, features, p - 1)
    return out, out.logits[:, :-1]


class LearnerGroup:
    def __init__(self, cfg, init_export: str):
        import ray

        from aurora_core.config import to_dict

        g = cfg.grpo
        resources = dict(num_cpus=g.learner_cpus, num_gpus=g.learner_gpus if g.use_gpu else None)
        cls = ray.remote(**{k: v for k, v in resources.items() if v is not None})(LearnerWorker)
        self.workers = [cls.remote(to_dict(cfg), str(init_export), r, g.learner_workers)
                        for r in range(g.learner_workers)]
        master = ray.get(self.workers[0].address.remote())
        ray.get([w.setup.remote(master) for w in self.workers])

    def step(self, clips_ref, groups: list[RolloutGroup], advantages: np.ndarray):
        """Split the step evenly over the ranks (prompts_per_step is a multiple of K); returns refs."""
        k = len(self.workers)
        per = len(groups) // k
        return [w.step.remote(clips_ref, (r * per, (r + 1) * per), groups[r * per:(r + 1) * per],
                              advantages[r * per:(r + 1) * per]) for r, w in enumerate(self.workers)]

    def gather_weights(self, wire: bool = False):
        """Refs of every rank's call; the first (rank 0) holds the weights, stored once in the object store."""
        return [w.gather_weights.remote(wire) for w in self.workers]

    def broadcast_weights(self, version: int):
        """Refs of every rank's call; the first (rank 0) returns the checksum of what it sent."""
        return [w.broadcast_weights.remote(version) for w in self.workers]

    def call(self, method: str, *args):
        import ray

        return learner_get([getattr(w, method).remote(*args) for w in self.workers])

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w)


class LearnerFailed(RuntimeError):
    """A learner worker (or a member of the weight-sync group) died: the loop restarts from a checkpoint."""


def _actor_lost():
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return RayActorError, ActorDiedError, ActorUnavailableError


def learner_call(fn, *args):
    """Run a learner interaction; a dead learner actor becomes LearnerFailed (the loop restarts)."""
    try:
        return fn(*args)
    except _actor_lost() as e:
        raise LearnerFailed("learner worker died") from e


# How long the other ranks' results are awaited once one rank has failed, to tell a dead peer from a bug.
PEER_GRACE_S = 60.0


def learner_get(refs: list) -> list:
    """ray.get over every rank's call. When a rank dies inside a collective, its peers fail too (gloo: "Connection
    reset by peer", NCCL: a watchdog error) and ray.get raises the first error in list order, so a surviving
    rank 0 would hide rank 1's death behind a RayTaskError: look at every rank before calling it a bug."""
    import ray
    from ray.exceptions import RayTaskError

    try:
        return learner_call(ray.get, refs)
    except RayTaskError:
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=PEER_GRACE_S)  # a rank still stuck stays out
        for ref in ready:
            try:
                ray.get(ref)
            except _actor_lost() as e:
                raise LearnerFailed("learner worker died (a peer's collective failed first)") from e
            except RayTaskError:
                continue
        raise
