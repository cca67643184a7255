"""The rollout side of GRPO: Ray actors that each hold a policy copy, and the pool that feeds them.

A :class:`RolloutWorker` samples G completions per prompt with ``generate_with_masks``, scores them
(aurora_core.rl.rewards) and returns token ids, old log-probs, reward terms, IoU, the parsed class and
the policy version. Weights arrive either as one object-store reference per version or by a
broadcast from learner rank 0 (aurora_core.rl.weight_sync); an actor runs its calls one at a time, so
a generate call never mixes versions, and every call states the version it expects.

:class:`RolloutPool` (driver side) cuts a step's prompts into small chunks and hands the next chunk
to whichever actor is free, so a slow actor does not idle the others. An actor that dies is
replaced (initial weights, then the current version) and its chunk re-issued; results are keyed by
prompt index, so every prompt's group arrives exactly once. With KL on, the pool also holds the
reference worker (see ``RolloutPool.__init__``).
"""

from __future__ import annotations

import collections
import logging
import time
import zlib
from typing import Any, Callable

import numpy as np
import torch

from aurora_core import logs
from aurora_core.model.aurora import empty_masks_where_none, token_logprobs
from aurora_core.rl.trajectory import RolloutGroup, shipped_features

log = logging.getLogger(__name__)


class RolloutWorker:
    """Ray actor class (wrapped with ray.remote by the pool)."""

    def __init__(self, export_dir: str, cfg: dict[str, Any], seed: int):
        from aurora_core.config import config_from_dict
        from aurora_core.model.build import load_export
        from aurora_core.rl.rewards import RewardWeights

        self.cfg = config_from_dict(cfg)
        logs.setup(self.cfg.run.dir, "grpo-rollout", console_level="WARNING")
        g = self.cfg.grpo
        self.weights = RewardWeights(g.reward_format, g.reward_class, g.reward_iou, g.iou_threshold)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.proc, _ = load_export(export_dir, self.cfg.data, trainable=False,
                                                 runtime=self.cfg.model)
        self.model.to(self.device).eval()
        self.dtype = next(self.model.llm.parameters()).dtype
        self.params = {n: p for n, p in self.model.named_parameters()}
        self.version = 0
        self.seed = seed
        torch.manual_seed(seed)

    def ready(self) -> int:
        return self.version

    def set_weights(self, weights: dict[str, torch.Tensor], version: int) -> int:
        """Load trainable weights (gathered from the learner) by name; return the new version."""
        unknown = set(weights) - set(self.params)
        if unknown:
            raise KeyError(f"weights for unknown parameters {sorted(unknown)[:3]}")
        with torch.no_grad():
            for n, v in weights.items():
                self.params[n].copy_(v.to(device=self.device, dtype=self.params[n].dtype))
        self.version = version
        return version

    def open_sync_group(self, host: str, port: int, rank: int, world: int, backend: str, timeout_s: int,
                        manifest) -> str | None:
        """Join the weight-sync group hosted by learner rank 0 (aurora_core.rl.weight_sync)."""
        from aurora_core.rl.weight_sync import BroadcastGroup

        self.sync_group = BroadcastGroup(host, port, rank, world, backend, timeout_s)
        self.manifest = manifest
        return self.sync_group.gpu_uuid()

    def receive_weights(self, version: int) -> float:
        """Take part in learner rank 0's broadcast, load the weights; returns the received checksum."""
        weights, digest = self.sync_group.receive(self.manifest)
        self.set_weights(weights, version)
        return digest

    def generate(self, clips: dict[str, Any], indices: list[int], version: int) -> list[RolloutGroup]:
        """One group of G samples for each prompt ``clips[indices]``, in that order."""
        from aurora_core.data.shards import collate
        from aurora_core.metrics import mask_iou
        from aurora_core.reasoning import parse_answer
        from aurora_core.rl.rewards import score

        if version != self.version:
            raise RuntimeError(f"asked for policy version {version} but holds {self.version}")
        g = self.cfg.grpo
        sub = collate({k: v[indices] for k, v in clips.items()})
        # seeded by the run, the policy version and the prompt's row key, not by the actor or the
        # position: the same samples whichever actor is free (or a replacement) takes the chunk
        torch.manual_seed(self.cfg.run.seed * 100003 + version * 1009 + zlib.crc32(str(sub["key"][0]).encode()))
        t0 = time.time()
        prompts = self.proc.prompt_batch(sub).to(self.device, self.dtype)
        r = self.model.generate_with_masks(
            prompts, num_samples=g.num_samples, temperature=g.temperature, top_p=g.top_p,
            max_new_tokens=g.max_new_tokens, eos_id=self.proc.eos_id, pad_id=self.proc.pad_id,
            suppress_ids=self.proc.suppress_ids, decode=self.proc.decode)
        t_gen = time.time() - t0
        t0 = time.time()
        masks = r.mask_logits
        if self.cfg.model.empty_mask_on_none:  # a "none" answer is rewarded for the empty mask it stands for
            masks = empty_masks_where_none(masks, r.texts)
        masks = masks.float().cpu()
        # cut by the length limit: no end token among the generated tokens
        ended = ((r.completion_ids == self.proc.eos_id) & r.completion_mask.bool()).any(1).cpu().numpy()
        out = []
        G = g.num_samples
        for j, _ in enumerate(indices):
            rows = range(j * G, (j + 1) * G)
            valid = sub["gt_frames"][j]  # frames with a ground-truth mask (AVSBench S4 train: the first)
            gt, cls = sub["masks"][j][valid], sub["class"][j]
            terms = [score(r.texts[k], masks[k][valid], gt, cls, self.weights) for k in rows]
            out.append(RolloutGroup(
                key=str(sub["key"][j]), version=self.version,
                completion_ids=r.completion_ids[rows.start:rows.stop].cpu().numpy().astype(np.int32),
                completion_mask=r.completion_mask[rows.start:rows.stop].cpu().numpy().astype(np.int8),
                logprobs=r.logprobs[rows.start:rows.stop].float().cpu().numpy(),
                rewards={k: np.array([t[k] for t in terms], dtype=np.float32) for k in terms[0]},
                j=np.array([mask_iou(masks[k][valid], gt) for k in rows], dtype=np.float32),
                truncated=~ended[rows.start:rows.stop],
                has_seg=r.has_seg[rows.start:rows.stop].cpu().numpy().astype(bool),
                pred_class=[parse_answer(r.texts[k]).predicted_class or "" for k in rows],
                texts=r.texts[rows.start:rows.stop],
                gen_tokens=int(r.completion_mask[rows.start:rows.stop].sum())))
        t_rew = time.time() - t0
        for o in out:
            o.gen_time, o.reward_time = t_gen / len(indices), t_rew / len(indices)
        if g.learner_features == "ship":
            import ray

            # owned by this actor: if it dies before the learner reads them, the learner recomputes
            for j, o in enumerate(out):
                o.features = ray.put(r.features.rows(j, j + 1).to("cpu"))
        return out

    @torch.no_grad()
    def reference_logprobs(self, clips: dict[str, Any], indices: list[int],
                           completions: list[tuple[np.ndarray, np.ndarray]], features: list) -> list[np.ndarray]:
        """Per prompt ``clips[i]`` and its completions (ids, mask) [G, C]: log p of each completion token
        under this actor's weights, [G, C] float32 (0 on padding). A worker that never receives weights
        holds the export GRPO started from: the KL reference. ``features``: per prompt, the ObjectRef
        of the frozen features a rollout actor shipped, or None; computed here (once per prompt) when
        absent or lost."""
        from aurora_core.data.shards import collate

        g = self.cfg.grpo
        sub = collate({k: v[indices] for k, v in clips.items()})
        prompts = self.proc.prompt_batch(sub).to(self.device, self.dtype)
        out = []
        for j, (ids, mask) in enumerate(completions):
            ids_t = torch.from_numpy(ids).long().to(self.device)
            mask_t = torch.from_numpy(mask).long().to(self.device)
            feats = shipped_features([features[j]], self.device, self.dtype, f"KL reference, prompt {sub['key'][j]}")
            if feats is None:
                feats = self.model.frozen_features(prompts.rows(j, j + 1))
            one = prompts.rows(j, j + 1).repeat_interleave(ids.shape[0])
            _, logits = self.model.forward_completions(one, ids_t, mask_t, with_masks=False,
                                                       features=feats.repeat_interleave(ids.shape[0]))
            lp = token_logprobs(logits, ids_t, g.temperature) * mask_t
            out.append(lp.float().cpu().numpy())
        return out


class RolloutPool:
    def __init__(self, cfg, export_dir: str):
        import ray

        from aurora_core.config import to_dict

        self.cfg = cfg
        self.export_dir = str(export_dir)
        self.cfg_dict = to_dict(cfg)
        g = cfg.grpo
        self.actor_cls = ray.remote(num_cpus=g.cpus_per_actor, num_gpus=g.gpus_per_actor or None,
                                    max_restarts=0)(RolloutWorker)
        self.version = 0
        self.weights_ref = None  # latest weights in the object store (None: the export's own)
        # broadcast sync: where a replacement actor reads the current weights (version -> ref), and
        # whether the sync group must be rebuilt (at start, and after any replacement)
        self.weights_source: Callable[[int], Any] | None = None
        self.group_stale = True
        self.replaced = 0
        self._spawned = 0
        self.actors = [self._new_actor() for _ in range(g.rollout_actors)]
        # The KL reference is the policy GRPO starts from (TRL / OpenRLHF / verl: the initial actor),
        # not the adapter-disabled base, which has never seen [SEG] or the answer format: a worker
        # of the same class that loads the same export and never receives weights (OpenRLHF's
        # reference model). It costs one more policy copy, and only exists when KL is on.
        self.reference = self._new_reference() if g.kl_coef > 0 else None
        ray.get([a.ready.remote() for a in self.actors + ([self.reference] if self.reference else [])])

    def _new_reference(self):
        self._spawned += 1
        return self.actor_cls.remote(self.export_dir, self.cfg_dict, self.cfg.run.seed * 1000 + self._spawned)

    def reference_logprobs(self, clips_ref, groups: dict[int, RolloutGroup]) -> None:
        """Fill ``ref_logprobs`` of every group (prompt index -> group) from the reference worker; a
        dead reference worker is replaced once (it holds no state but the export)."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        order = sorted(groups)
        args = [(groups[i].completion_ids, groups[i].completion_mask) for i in order]
        feats = [groups[i].features for i in order]
        for attempt in (0, 1):
            try:
                lps = ray.get(self.reference.reference_logprobs.remote(clips_ref, order, args, feats))
                break
            except (RayActorError, ActorDiedError, ActorUnavailableError) as e:
                if attempt:
                    raise
                log.warning("the KL reference worker died (%s); replacing it", type(e).__name__)
                self.reference = self._new_reference()
        for i, lp in zip(order, lps):
            groups[i].ref_logprobs = lp

    def _new_actor(self):
        self._spawned += 1
        actor = self.actor_cls.remote(self.export_dir, self.cfg_dict, self.cfg.run.seed * 1000 + self._spawned)
        if self.weights_ref is not None:
            actor.set_weights.remote(self.weights_ref, self.version)
        elif self.version > 0:
            if self.weights_source is None:
                raise RuntimeError("no source for the current weights of a replacement rollout actor")
            actor.set_weights.remote(self.weights_source(self.version), self.version)
        return actor

    def push(self, weights_ref, version: int) -> None:
        """Every actor switches to ``version`` before its next generate call (actor calls run in order)."""
        import ray

        self.weights_ref, self.version = weights_ref, version
        ray.get([a.set_weights.remote(weights_ref, version) for a in self.actors])

    def open_group(self, host: str, port: int, backend: str, timeout_s: int, manifest) -> list:
        """Refs of every actor joining the sync group as ranks 1..M (rank 0, the learner, joins too)."""
        world = len(self.actors) + 1
        self.group_stale = False
        return [a.open_sync_group.remote(host, port, r + 1, world, backend, timeout_s, manifest)
                for r, a in enumerate(self.actors)]

    def receive(self, version: int) -> list:
        """Refs of every actor's part in the broadcast of ``version`` (started by the learner), each to its
        received checksum; the caller awaits them with the learner ranks' refs. The pool holds ``version``
        from here: a broadcast that fails raises, and the loop then restarts with a new pool."""
        self.version = version
        return [a.receive_weights.remote(version) for a in self.actors]

    def generate(self, clips_ref, indices: list[int],
                 on_result: Callable[[int, int], None] | None = None) -> dict[int, RolloutGroup]:
        """Groups for ``indices`` of the clips behind ``clips_ref``; ``on_result(done, total)`` is called
        as chunks come back (progress reporting)."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        chunk = self.cfg.grpo.rollout_chunk
        queue = collections.deque(indices[i:i + chunk] for i in range(0, len(indices), chunk))
        free = collections.deque(range(len(self.actors)))
        inflight: dict[Any, tuple[int, list[int]]] = {}
        results: dict[int, dict[str, Any]] = {}
        while queue or inflight:
            while queue and free:
                a = free.popleft()
                part = queue.popleft()
                inflight[self.actors[a].generate.remote(clips_ref, part, self.version)] = (a, part)
            done, _ = ray.wait(list(inflight), num_returns=1)
            a, part = inflight.pop(done[0])
            try:
                groups = ray.get(done[0])
            except (RayActorError, ActorDiedError, ActorUnavailableError) as e:
                log.warning("rollout actor %d died (%s); replacing it and re-issuing prompts %s",
                            a, type(e).__name__, part)
                self.replaced += 1
                self.group_stale = True
                self.actors[a] = self._new_actor()
                queue.appendleft(part)
                free.append(a)
                continue
            for i, grp in zip(part, groups):
                if i in results:
                    raise RuntimeError(f"prompt {i} came back twice")
                if grp.version != self.version:
                    raise RuntimeError(f"prompt {i} sampled with version {grp.version}, expected {self.version}")
                results[i] = grp
            free.append(a)
            if on_result is not None:
                on_result(len(results), len(indices))
        missing = set(indices) - set(results)
        if missing:
            raise RuntimeError(f"no rollouts for prompts {sorted(missing)}")
        return results

    def shutdown(self) -> None:
        import ray

        for a in self.actors + ([self.reference] if self.reference is not None else []):
            ray.kill(a)
