"""The GRPO driver (single controller): prompts -> rollouts -> rewards -> advantages -> learner step ->
weight push -> log -> checkpoint, step after step.

Checkpoints (``<run>/stages/grpo/checkpoints/step_<n>``) hold the learner's trainable weights and
optimizer (safetensors), the driver's step, policy version, data position (the row keys handed out in
the current epoch), RNG, and, in async mode, the rollouts already generated for the next step.
Rerunning with the same run name continues from the newest one.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.numpy import load_file as load_np, save_file as save_np

from aurora_core.config import AuroraConfig
from aurora_core.data import shards
from aurora_core.data.atomic import staged_dir
from aurora_core.rl import grpo
from aurora_core.rl.weight_sync import backend, sync_mode

log = logging.getLogger(__name__)

CLIP_KEYS = ("key", "uid", "vid", "split", "class", "exp", "cot", "has_target", "frames", "masks", "audio")


@dataclass
class DriverState:
    step: int = 0  # learner steps done (= the policy version the rollout actors hold)
    epoch: int = 0
    consumed: list[str] = field(default_factory=list)  # row keys handed out in `epoch`
    rng: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- prompts

class PromptStream:
    """Train rows in a seeded order per epoch (block order, then a seeded local shuffle buffer),
    endlessly; what it hands out is the data position."""

    def __init__(self, cfg: AuroraConfig, shards_dir: Path, state: DriverState):
        self.cfg, self.shards_dir, self.state = cfg, Path(shards_dir), state
        self.files = shards.split_files(self.shards_dir, ["train"])
        self._rows = self._iter()

    def _iter(self) -> Iterator[dict[str, Any]]:
        from aurora_core.train.data import epoch_pipeline

        first = True
        while True:
            skip = list(self.state.consumed) if first else []
            first = False
            ds = epoch_pipeline(self.files, self.cfg.data, self.state.epoch, self.cfg.run.seed, skip, None,
                                batch_size=16, shuffle=True)
            # the seeded block order is only the prompt order if streaming keeps it (same seed, same run)
            ds.context.execution_options.preserve_order = True
            any_row = False
            g = self.cfg.grpo
            for batch in ds.iter_batches(batch_size=16, batch_format="numpy",
                                         local_shuffle_buffer_size=g.shuffle_buffer or None,
                                         local_shuffle_seed=self.cfg.run.seed * 1000 + self.state.epoch):
                for i in range(len(batch["key"])):
                    any_row = True
                    yield {k: batch[k][i] for k in CLIP_KEYS}
            if not any_row and not skip:
                raise RuntimeError(f"the train split of {self.shards_dir} is empty")
            self.state.epoch += 1
            self.state.consumed = []

    def close(self) -> None:
        """Stop the open Ray Data iteration now (not at interpreter exit, when Ray may be gone)."""
        self._rows.close()

    def take(self, n: int) -> dict[str, np.ndarray]:
        rows = [next(self._rows) for _ in range(n)]
        self.state.consumed.extend(str(r["key"]) for r in rows)
        return stack(rows)


def stack(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    return {k: np.stack([r[k] for r in rows]) if isinstance(rows[0][k], np.ndarray)
            else np.asarray([r[k] for r in rows]) for k in rows[0]}


def select(clips: dict[str, np.ndarray], idx: list[int]) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in clips.items()}


# --------------------------------------------------------------------------- one batch of rollouts

@dataclass
class Batch:
    clips: dict[str, np.ndarray]  # P prompts
    groups: list[dict[str, Any]]  # one per prompt, "index" = row in clips
    drawn: int  # prompts drawn for it (dynamic sampling draws more)
    zero_var: int  # drawn groups without reward variance
    gen_time: float  # wall time in the rollout pool
    gen_tokens: int


def collect(cfg: AuroraConfig, pool, stream: PromptStream) -> Batch:
    """P groups of rollouts; with dynamic sampling, zero-variance groups are dropped and refilled."""
    import ray

    g = cfg.grpo
    P = g.prompts_per_step
    kept_clips: list[dict[str, np.ndarray]] = []
    kept: list[dict[str, Any]] = []
    spare: list[tuple[dict[str, np.ndarray], dict[str, Any]]] = []
    drawn = zero_var = tokens = 0
    t_gen = 0.0
    rounds = 0
    while len(kept) < P:
        need = P - len(kept)
        clips = stream.take(need)
        drawn += need
        t0 = time.time()
        results = pool.generate(ray.put(clips), list(range(need)))
        t_gen += time.time() - t0
        for i in range(need):
            grp = results[i]
            tokens += grp["gen_tokens"]
            flat = zero_variance(grp)
            zero_var += int(flat)
            one = select(clips, [i])
            if g.dynamic_sampling and flat:
                spare.append((one, grp))
            else:
                kept_clips.append(one)
                kept.append(grp)
        rounds += 1
        if g.dynamic_sampling and len(kept) < P and rounds > g.max_refill_rounds:
            log.warning("dynamic sampling: %d of %d groups have reward variance after %d rounds; "
                        "filling with zero-variance groups (no policy gradient from them)", len(kept), P, rounds)
            for one, grp in spare[: P - len(kept)]:
                kept_clips.append(one)
                kept.append(grp)
            break
    clips = {k: np.concatenate([c[k] for c in kept_clips]) for k in kept_clips[0]}
    for i, grp in enumerate(kept):
        grp["index"] = i
    return Batch(clips, kept, drawn, zero_var, t_gen, tokens)


def zero_variance(group: dict[str, Any]) -> bool:
    return bool(grpo.zero_variance_groups(torch.from_numpy(group["rewards"]["total"])[None])[0])


def batch_advantages(cfg: AuroraConfig, groups: list[dict[str, Any]]) -> np.ndarray:
    rewards = torch.from_numpy(np.stack([grp["rewards"]["total"] for grp in groups]))
    return grpo.group_advantages(rewards, cfg.grpo.scale_rewards, cfg.grpo.adv_eps).numpy()


def batch_metrics(batch: Batch, adv: np.ndarray) -> dict[str, float]:
    m: dict[str, float] = {}
    for term in batch.groups[0]["rewards"]:
        v = np.concatenate([grp["rewards"][term] for grp in batch.groups])
        m[f"reward/{term}_mean"], m[f"reward/{term}_std"] = float(v.mean()), float(v.std())
    m["iou"] = m["reward/iou_mean"]
    m["J"] = float(np.concatenate([grp["j"] for grp in batch.groups]).mean())
    m["format_rate"] = m["reward/format_mean"]
    classes = batch.clips["class"]
    m["class_acc"] = float(np.mean([p == classes[grp["index"]] for grp in batch.groups for p in grp["pred_class"]]))
    m["zero_variance_frac"] = batch.zero_var / max(1, batch.drawn)
    m["prompts_drawn"] = float(batch.drawn)
    m.update({"adv/mean": float(adv.mean()), "adv/std": float(adv.std()), "adv/min": float(adv.min()),
              "adv/max": float(adv.max())})
    m["gen_tokens_per_s"] = batch.gen_tokens / max(batch.gen_time, 1e-9)
    m["completion_len"] = batch.gen_tokens / max(1, sum(len(grp["texts"]) for grp in batch.groups))
    return m


# --------------------------------------------------------------------------- checkpoints

def checkpoints_dir(cfg: AuroraConfig) -> Path:
    return cfg.run.dir / "stages" / "grpo" / "checkpoints"


def latest_checkpoint(cfg: AuroraConfig) -> Path | None:
    done = sorted(p for p in checkpoints_dir(cfg).glob("step_*") if (p / "driver.json").is_file())
    return done[-1] if done else None


def _rng_state() -> dict[str, Any]:
    from aurora_core.train.checkpoint import rng_state

    return rng_state()


def save_checkpoint(cfg: AuroraConfig, learner, state: DriverState, queued: Batch | None) -> Path:
    out = checkpoints_dir(cfg) / f"step_{state.step:06d}"
    with staged_dir(out) as tmp:
        learner.call("save", str(tmp), state.step)
        state.rng = _rng_state()
        meta = {"state": asdict(state), "queued": None}
        if queued is not None:
            arrays = {}
            for i, grp in enumerate(queued.groups):
                for k in ("completion_ids", "completion_mask", "logprobs", "j"):
                    arrays[f"{i}/{k}"] = np.ascontiguousarray(grp[k])
                for k, v in grp["rewards"].items():
                    arrays[f"{i}/rewards/{k}"] = np.ascontiguousarray(v)
            save_np(arrays, str(tmp / "queued.safetensors"))
            meta["queued"] = {"keys": [str(k) for k in queued.clips["key"]], "drawn": queued.drawn,
                              "zero_var": queued.zero_var, "gen_time": queued.gen_time,
                              "gen_tokens": queued.gen_tokens,
                              "groups": [{k: grp[k] for k in ("key", "version", "pred_class", "texts", "gen_tokens",
                                                                 "gen_time", "reward_time")}
                                         for grp in queued.groups]}
        (tmp / "driver.json").write_text(json.dumps(meta, default=str))
    for old in sorted(p for p in checkpoints_dir(cfg).glob("step_*") if p.is_dir())[: -cfg.grpo.num_to_keep]:
        shutil.rmtree(old, ignore_errors=True)
    return out


def load_checkpoint(cfg: AuroraConfig, path: Path, learner, shards_dir: Path) -> tuple[DriverState, Batch | None]:
    from aurora_core.train.checkpoint import set_rng_state

    meta = json.loads((path / "driver.json").read_text())
    learner.call("load", str(path))
    state = DriverState(**meta["state"])
    if state.rng:
        set_rng_state(state.rng)
    q = meta.get("queued")
    if not q:
        return state, None
    arrays = load_np(str(path / "queued.safetensors"))
    groups = []
    for i, info in enumerate(q["groups"]):
        grp = dict(info, index=i, rewards={k.split("/")[-1]: v for k, v in arrays.items()
                                            if k.startswith(f"{i}/rewards/")})
        for k in ("completion_ids", "completion_mask", "logprobs", "j"):
            grp[k] = arrays[f"{i}/{k}"]
        groups.append(grp)
    rows = shards.rows_by_key(shards_dir, q["keys"], ["train"], cfg.data)
    clips = {k: rows[k] for k in CLIP_KEYS}
    return state, Batch(clips, groups, q["drawn"], q["zero_var"], q["gen_time"], q["gen_tokens"])


# --------------------------------------------------------------------------- the loop

class LearnerFailed(RuntimeError):
    """A learner worker (or a member of the weight-sync group) died: the loop restarts from a checkpoint."""


def run(cfg: AuroraConfig, init: Path, out: Path, shards_dir: Path, logger) -> dict[str, Any]:
    """The loop, restarted from the newest checkpoint when a learner worker dies (at most
    ``grpo.max_learner_restarts`` times); rollout actor deaths are handled inside the pool."""
    restarts = 0
    while True:
        try:
            result = _run_from_latest(cfg, init, out, shards_dir, logger)
            result["learner_restarts"] = restarts
            return result
        except LearnerFailed as e:
            if restarts >= cfg.grpo.max_learner_restarts:
                raise RuntimeError(f"the GRPO learner failed {restarts + 1} times; last: {e.__cause__!r}") from e
            restarts += 1
            log.warning("a learner worker died (%s); restarting from the newest checkpoint (%d/%d)",
                        e.__cause__, restarts, cfg.grpo.max_learner_restarts)
            print(f"[grpo] learner failed; restarting from the newest checkpoint ({restarts}/"
                  f"{cfg.grpo.max_learner_restarts})", flush=True)


def _run_from_latest(cfg: AuroraConfig, init: Path, out: Path, shards_dir: Path, logger) -> dict[str, Any]:
    import ray

    from aurora_core.rl.learner import LearnerGroup
    from aurora_core.rl.rollout import RolloutPool

    g = cfg.grpo
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    t0 = time.time()
    learner = LearnerGroup(cfg, str(init))
    state, queued = DriverState(), None
    ckpt = latest_checkpoint(cfg)
    if ckpt is not None:
        state, queued = load_checkpoint(cfg, ckpt, learner, shards_dir)
        log.info("resumed GRPO from %s (step %d)", ckpt, state.step)
    pool = RolloutPool(cfg, str(init))
    if sync_mode(g) == "broadcast":
        pool.weights_source = lambda version: learner.workers[0].weights_of.remote(version)
    if state.step > 0:
        _sync_weights(cfg, learner, pool, state.step)
    stream = PromptStream(cfg, shards_dir, state)
    print(f"[grpo] learner x{g.learner_workers}, rollout actors x{g.rollout_actors}, ready in {time.time() - t0:.0f}s; "
          f"steps {state.step + 1}..{g.steps}, {g.prompts_per_step} prompts x {g.num_samples} samples"
          + (", async" if g.async_rollouts else "") + (", dynamic sampling" if g.dynamic_sampling else ""),
          flush=True)
    metrics: dict[str, float] = {}
    history: list[dict[str, float]] = []
    try:
        while state.step < g.steps:
            t_step = time.time()
            batch = queued if queued is not None else collect(cfg, pool, stream)
            queued = None
            t_gen_wall = time.time() - t_step
            adv = batch_advantages(cfg, batch.groups)
            clips_ref = ray.put(batch.clips)
            t_learn = time.time()
            step_refs = learner.step(clips_ref, batch.groups, adv)
            # one-step off-policy: the next batch is generated (by the current weights) meanwhile
            nxt: dict[str, Any] = {}
            worker = None
            if g.async_rollouts and state.step + 1 < g.steps:
                worker = threading.Thread(target=lambda: nxt.setdefault("batch", collect(cfg, pool, stream)))
                worker.start()
            learn = _learner_get(step_refs)[0]
            t_learn = time.time() - t_learn
            overlap = 0.0
            if worker is not None:
                t_join = time.time()
                worker.join()
                overlap = time.time() - t_join
                queued = nxt["batch"]
            t_sync = time.time()
            _sync_weights(cfg, learner, pool, state.step + 1)
            t_sync = time.time() - t_sync
            state.step += 1
            wall = time.time() - t_step
            metrics = {**batch_metrics(batch, adv), **learn}
            reward_time = sum(grp["reward_time"] for grp in batch.groups) / max(1, g.rollout_actors)
            compute = t_gen_wall + learn["learner_time_s"] + overlap
            metrics.update({"time/step_s": wall, "time/generate_s": batch.gen_time, "time/reward_s": reward_time,
                            "time/learner_s": learn["learner_time_s"], "time/sync_s": t_sync,
                            "time/wait_next_batch_s": overlap,
                            "time/idle_s": max(0.0, wall - compute - t_sync), "policy_version": float(state.step),
                            "rollout_actors_replaced": float(pool.replaced), "epoch": float(state.epoch)})
            logger.metrics(metrics, state.step)
            history.append(metrics)
            print(f"[grpo] step {state.step}/{g.steps} reward {metrics['reward/total_mean']:.3f} "
                  f"(format {metrics['reward/format_mean']:.2f} class {metrics['reward/class_mean']:.2f} "
                  f"iou {metrics['reward/iou_mean']:.3f}) J {metrics['J']:.3f} kl {metrics['kl']:.4f} "
                  f"clip {metrics['clip_frac']:.3f} zero-var {metrics['zero_variance_frac']:.2f} | "
                  f"gen {batch.gen_time:.1f}s learn {learn['learner_time_s']:.1f}s sync {t_sync:.2f}s "
                  f"{metrics['gen_tokens_per_s']:.0f} tok/s", flush=True)
            if state.step % g.checkpoint_every == 0 or state.step == g.steps:
                _learner_call(save_checkpoint, cfg, learner, state, queued)
        _learner_call(learner.call, "export", str(out), {"stage": "grpo", "global_step": state.step,
                                                         "metrics": metrics})
    finally:
        stream.close()
        pool.shutdown()
        learner.shutdown()
    return {**metrics, "history": history}


def _sync_weights(cfg: AuroraConfig, learner, pool, version: int) -> None:
    """Gather the trainable weights once (a collective over the learner ranks), then either broadcast
    them from learner rank 0 to every rollout actor, or leave them in the object store (rank 0's return
    value: not copied into the driver) and point every rollout actor at them."""
    import ray

    if sync_mode(cfg.grpo) == "broadcast":
        if pool.group_stale:
            _open_sync_group(cfg, learner, pool)
        refs = learner.broadcast_weights(version)
        received = _learner_call(pool.receive, version)  # a member lost mid-broadcast: restart too
        sent = _learner_get(refs)[0]
        bad = [i for i, d in enumerate(received) if abs(d - sent) > 1e-9 * max(1.0, abs(sent))]
        if bad:
            raise RuntimeError(f"weight broadcast of version {version} arrived corrupted at rollout actor(s) "
                               f"{bad} (checksum {[received[i] for i in bad]} != {sent})")
        return
    refs = learner.gather_weights()
    ray.wait(refs, num_returns=len(refs), fetch_local=False)
    _learner_get(refs[1:])  # ranks > 0 return None; raises if one died
    _learner_call(pool.push, refs[0], version)


def _open_sync_group(cfg: AuroraConfig, learner, pool) -> None:
    """(Re)build the broadcast group: learner rank 0 + the current rollout actors, on a fresh port."""
    g = cfg.grpo
    rank0 = learner.workers[0]
    host, port = _learner_get([rank0.address.remote()])[0]
    manifest = _learner_get([rank0.sync_manifest.remote()])[0]
    t0 = time.time()
    first = rank0.open_sync_group.remote(host, port, len(pool.actors) + 1, backend(g), g.sync_timeout_s)
    members = pool.open_group(host, port, backend(g), g.sync_timeout_s, manifest)
    gpus = _learner_get([first, *members])
    if backend(g) == "nccl" and len(set(gpus)) < len(gpus):
        raise ValueError("grpo.weight_sync=broadcast over NCCL needs learner rank 0 and every rollout actor "
                         "on a GPU of its own (some share one); use whole grpo.gpus_per_actor or "
                         "grpo.weight_sync=object_store")
    log.info("weight-sync group (%s) of %d members open in %.1fs", backend(g), len(gpus), time.time() - t0)


def _learner_get(refs: list) -> list:
    import ray

    return _learner_call(ray.get, refs)


def _learner_call(fn, *args):
    """Run a learner interaction; a dead learner actor becomes LearnerFailed (the loop restarts)."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    try:
        return fn(*args)
    except (RayActorError, ActorDiedError, ActorUnavailableError) as e:
        raise LearnerFailed("learner worker died") from e
