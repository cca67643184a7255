"""The GRPO driver (single controller): prompts -> rollouts -> rewards -> advantages -> learner step ->
weight push -> log -> checkpoint, step after step.

Checkpoints (``<run>/stages/grpo/checkpoints/step_<n>``) hold the learner's trainable weights and
optimizer (safetensors), the driver's step, policy version, data position (the row keys handed out in
the current epoch), RNG, and, in async mode, the rollouts already generated for the next step.
Rerunning with the same run name continues from the newest one.
"""

from __future__ import annotations

import collections
import concurrent.futures
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
from aurora_core.rl.learner import LearnerFailed, learner_call, learner_get
from aurora_core.rl.trajectory import RolloutGroup, StepBatch
from aurora_core.rl.weight_sync import WeightSync

log = logging.getLogger(__name__)

CLIP_KEYS = ("key", "uid", "vid", "split", "class", "exp", "cot", "has_target", "frames", "masks", "gt_frames",
             "audio")
# decoded only with data.cache_frozen_features (the towers' outputs with data.cache_towers, when
# frames and audio are not read at all: shards.read_shards)
CACHED_KEYS = ("sam_embeddings", "audio_features", "video_features")
MEDIA_KEYS = ("frames", "audio")


def clip_columns(batch: dict[str, np.ndarray]) -> list[str]:
    return [k for k in (*CLIP_KEYS, *CACHED_KEYS) if k in batch or k not in (*CACHED_KEYS, *MEDIA_KEYS)]


@dataclass
class DriverState:
    step: int = 0  # learner steps done (= the policy version the rollout actors hold)
    epoch: int = 0
    consumed: list[str] = field(default_factory=list)  # row keys handed out in `epoch`
    rng: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- prompts

class PromptStream:
    """Train rows in a seeded order per epoch (block order, then a seeded local shuffle buffer),
    endlessly. What ``take`` hands out is the data position (``state.epoch`` / ``state.consumed``);
    ``prefetch`` reads ahead (the next step's clips decode while the learner works) without moving it,
    so a checkpoint taken meanwhile resumes at the first row not handed out."""

    def __init__(self, cfg: AuroraConfig, shards_dir: Path, state: DriverState):
        self.cfg, self.shards_dir, self.state = cfg, Path(shards_dir), state
        self.files = shards.split_files(self.shards_dir, ["train"])
        self._ahead: collections.deque[tuple[int, dict[str, Any]]] = collections.deque()  # (epoch, row)
        self._rows = self._iter()

    def _iter(self) -> Iterator[tuple[int, dict[str, Any]]]:
        from aurora_core.train.epochs import epoch_pipeline

        epoch, skip = self.state.epoch, list(self.state.consumed)
        g = self.cfg.grpo
        while True:
            ds = epoch_pipeline(self.files, self.cfg.data, epoch, self.cfg.run.seed, skip, None,
                                batch_size=16, shuffle=True)
            # the seeded block order is only the prompt order if streaming keeps it (same seed, same run)
            ds.context.execution_options.preserve_order = True
            any_row = False
            for batch in ds.iter_batches(batch_size=16, batch_format="numpy",
                                         local_shuffle_buffer_size=g.shuffle_buffer or None,
                                         local_shuffle_seed=self.cfg.run.seed * 1000 + epoch):
                for i in range(len(batch["key"])):
                    any_row = True
                    yield epoch, {k: batch[k][i] for k in clip_columns(batch)}
            if not any_row and not skip:
                raise RuntimeError(f"the train split of {self.shards_dir} is empty")
            epoch, skip = epoch + 1, []

    def close(self) -> None:
        """Stop the open Ray Data iteration now (not at interpreter exit, when Ray may be gone)."""
        self._rows.close()

    def prefetch(self, n: int) -> None:
        """Read and decode the next ``n`` rows ahead; the data position does not move."""
        while len(self._ahead) < n:
            self._ahead.append(next(self._rows))

    def take(self, n: int) -> dict[str, np.ndarray]:
        self.prefetch(n)
        rows = []
        for _ in range(n):
            epoch, row = self._ahead.popleft()
            if epoch != self.state.epoch:  # the first row of a new epoch
                self.state.epoch, self.state.consumed = epoch, []
            self.state.consumed.append(str(row["key"]))
            rows.append(row)
        return stack(rows)


def stack(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    return {k: np.stack([r[k] for r in rows]) if isinstance(rows[0][k], np.ndarray)
            else np.asarray([r[k] for r in rows]) for k in rows[0]}


def select(clips: dict[str, np.ndarray], idx: list[int]) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in clips.items()}


# --------------------------------------------------------------------------- one batch of rollouts

def collect(cfg: AuroraConfig, pool, stream: PromptStream) -> StepBatch:
    """P groups of rollouts (and, with KL on, their reference log-probs); with dynamic sampling,
    zero-variance groups are dropped and refilled."""
    import ray

    g = cfg.grpo
    P = g.prompts_per_step
    kept: list[tuple[dict[str, np.ndarray], RolloutGroup]] = []
    spare: list[tuple[dict[str, np.ndarray], RolloutGroup]] = []
    drawn = zero_var = tokens = 0
    t_gen = t_ref = t_fetch = t_put = 0.0
    rounds = 0
    first_ref = None
    while len(kept) < P:
        need = P - len(kept)
        t0 = time.time()
        clips = stream.take(need)
        drawn += need
        t1 = time.time()
        ref = ray.put(clips)
        first_ref = ref if rounds == 0 else None
        t2 = time.time()
        results = pool.generate(ref, list(range(need)))
        t_fetch, t_put, t_gen = t_fetch + t1 - t0, t_put + t2 - t1, t_gen + time.time() - t2
        if pool.reference is not None:
            t0 = time.time()
            pool.reference_logprobs(ref, results)
            t_ref += time.time() - t0
        for i in range(need):
            grp = results[i]
            tokens += grp.gen_tokens
            flat = zero_variance(grp)
            zero_var += int(flat)
            (spare if g.dynamic_sampling and flat else kept).append((select(clips, [i]), grp))
        rounds += 1
        if g.dynamic_sampling and len(kept) < P and rounds > g.max_refill_rounds:
            log.warning("dynamic sampling: %d of %d groups have reward variance after %d rounds; "
                        "filling with zero-variance groups (no policy gradient from them)", len(kept), P, rounds)
            kept += spare[: P - len(kept)]
            break
    clips = {k: np.concatenate([c[k] for c, _ in kept]) for k in kept[0][0]}
    # every drawn prompt kept, in order: the clips already in the object store serve the learner too
    reuse = first_ref if drawn == P and rounds == 1 else None
    return StepBatch(clips, [grp for _, grp in kept], drawn, zero_var, t_gen, tokens, ref_time=t_ref, clips_ref=reuse,
                     fetch_time=t_fetch, put_time=t_put)


def zero_variance(group: RolloutGroup) -> bool:
    return bool(grpo.zero_variance_groups(torch.tensor(group.rewards["total"])[None])[0])


def batch_advantages(cfg: AuroraConfig, groups: list[RolloutGroup]) -> np.ndarray:
    rewards = torch.from_numpy(np.stack([grp.rewards["total"] for grp in groups]))
    return grpo.group_advantages(rewards, cfg.grpo.scale_rewards, cfg.grpo.adv_eps).numpy()


def batch_metrics(batch: StepBatch, adv: np.ndarray) -> dict[str, float]:
    m: dict[str, float] = {}
    for term in batch.groups[0].rewards:
        v = np.concatenate([grp.rewards[term] for grp in batch.groups])
        m[f"reward/{term}_mean"], m[f"reward/{term}_std"] = float(v.mean()), float(v.std())
    m["iou"] = m["reward/iou_mean"]
    m["J"] = float(np.concatenate([grp.j for grp in batch.groups]).mean())
    m["format_rate"] = m["reward/format_mean"]
    classes = batch.clips["class"]
    m["class_acc"] = float(np.mean([p == classes[i] for i, grp in enumerate(batch.groups) for p in grp.pred_class]))
    # completions cut by grpo.max_new_tokens, and answers without [SEG] (empty masks): never silent
    m["truncated_frac"] = float(np.concatenate([grp.truncated for grp in batch.groups]).mean())
    m["no_seg_frac"] = float(1.0 - np.concatenate([grp.has_seg for grp in batch.groups]).mean())
    m["zero_variance_frac"] = batch.zero_var / max(1, batch.drawn)
    m["prompts_drawn"] = float(batch.drawn)
    m.update({"adv/mean": float(adv.mean()), "adv/std": float(adv.std()), "adv/min": float(adv.min()),
              "adv/max": float(adv.max())})
    m["gen_tokens_per_s"] = batch.gen_tokens / max(batch.gen_time, 1e-9)
    m["completion_len"] = batch.gen_tokens / max(1, sum(grp.num_samples for grp in batch.groups))
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


def save_checkpoint(cfg: AuroraConfig, learner, state: DriverState, queued: StepBatch | None) -> Path:
    out = checkpoints_dir(cfg) / f"step_{state.step:06d}"
    with staged_dir(out) as tmp:
        learner.call("save", str(tmp), state.step)
        state.rng = _rng_state()
        meta = {"state": asdict(state), "queued": None}
        if queued is not None:
            arrays = {f"{i}/{k}": np.ascontiguousarray(v) for i, grp in enumerate(queued.groups)
                      for k, v in grp.arrays().items()}
            save_np(arrays, str(tmp / "queued.safetensors"))
            meta["queued"] = {"keys": [str(k) for k in queued.clips["key"]], "drawn": queued.drawn,
                              "zero_var": queued.zero_var, "gen_time": queued.gen_time,
                              "gen_tokens": queued.gen_tokens, "groups": [grp.meta() for grp in queued.groups]}
        (tmp / "driver.json").write_text(json.dumps(meta, default=str))
    for old in sorted(p for p in checkpoints_dir(cfg).glob("step_*") if p.is_dir())[: -cfg.grpo.num_to_keep]:
        shutil.rmtree(old, ignore_errors=True)
    return out


def read_state(path: Path) -> DriverState:
    """The driver's step, epoch and data position of a checkpoint."""
    return DriverState(**json.loads((path / "driver.json").read_text())["state"])


def load_checkpoint(cfg: AuroraConfig, path: Path, learner, state: DriverState, shards_dir: Path) -> StepBatch | None:
    """The learner's weights and optimizer, the RNG (``state`` from :func:`read_state`) and the
    rollouts queued for the next step (async mode)."""
    from aurora_core.train.checkpoint import set_rng_state

    meta = json.loads((path / "driver.json").read_text())
    learner.call("load", str(path))
    if state.rng:
        set_rng_state(state.rng)
    q = meta.get("queued")
    if not q:
        return None
    arrays = load_np(str(path / "queued.safetensors"))
    groups = [RolloutGroup.restore(info, {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{i}/")})
              for i, info in enumerate(q["groups"])]
    rows = shards.rows_by_key(shards_dir, q["keys"], ["train"], cfg.data)
    clips = {k: rows[k] for k in clip_columns(rows)}
    return StepBatch(clips, groups, q["drawn"], q["zero_var"], q["gen_time"], q["gen_tokens"])


# --------------------------------------------------------------------------- the loop

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
    ckpt = latest_checkpoint(cfg)
    state, queued = (read_state(ckpt) if ckpt is not None else DriverState()), None
    stream = PromptStream(cfg, shards_dir, state)
    # the first prompts are read and decoded (Ray Data's start-up, seconds) while the actors load
    warm = concurrent.futures.ThreadPoolExecutor(1).submit(stream.prefetch, g.prompts_per_step)
    try:
        learner = LearnerGroup(cfg, str(init))
        if ckpt is not None:
            queued = load_checkpoint(cfg, ckpt, learner, state, shards_dir)
            log.info("resumed GRPO from %s (step %d)", ckpt, state.step)
        pool = RolloutPool(cfg, str(init))
        sync = WeightSync(cfg, learner, pool)
        if state.step > 0:
            sync.push(state.step)
    except BaseException:
        concurrent.futures.wait([warm])
        stream.close()
        raise
    concurrent.futures.wait([warm])
    print(f"[grpo] learner x{g.learner_workers}, rollout actors x{g.rollout_actors}, ready in {time.time() - t0:.0f}s; "
          f"steps {state.step + 1}..{g.steps}, {g.prompts_per_step} prompts x {g.num_samples} samples"
          + (", async" if g.async_rollouts else "") + (", dynamic sampling" if g.dynamic_sampling else ""),
          flush=True)
    metrics: dict[str, float] = {}
    history: list[dict[str, float]] = []
    try:
        warm.result()  # re-raises what the prefetch raised (an empty train split)
        while state.step < g.steps:
            t_step = time.time()
            batch = queued if queued is not None else collect(cfg, pool, stream)
            queued = None
            t_gen_wall = time.time() - t_step
            t0 = time.time()
            adv = batch_advantages(cfg, batch.groups)
            clips_ref = batch.clips_ref if batch.clips_ref is not None else ray.put(batch.clips)
            t_learn = time.time()
            t_adv = t_learn - t0
            step_refs = learner.step(clips_ref, batch.groups, adv)
            # one-step off-policy: the next batch is generated (by the current weights) meanwhile
            nxt: dict[str, Any] = {}
            worker = None
            t_prefetch = 0.0
            if g.async_rollouts and state.step + 1 < g.steps:
                worker = threading.Thread(target=lambda: nxt.setdefault("batch", collect(cfg, pool, stream)))
                worker.start()
            elif state.step + 1 < g.steps:  # sync: the next prompts read and decoded while the learner works
                t0 = time.time()
                stream.prefetch(g.prompts_per_step)
                t_prefetch = time.time() - t0
            learn = learner_get(step_refs)[0]
            t_learn = time.time() - t_learn
            overlap = 0.0
            if worker is not None:
                t_join = time.time()
                worker.join()
                overlap = time.time() - t_join
                queued = nxt["batch"]
            t_sync = time.time()
            sync.push(state.step + 1)
            t_sync = time.time() - t_sync
            state.step += 1
            wall = time.time() - t_step
            metrics = {**batch_metrics(batch, adv), **learn}
            reward_time = sum(grp.reward_time for grp in batch.groups) / max(1, g.rollout_actors)
            compute = t_gen_wall + learn["learner_time_s"] + overlap
            metrics.update({"time/step_s": wall, "time/generate_s": batch.gen_time, "time/reward_s": reward_time,
                            "time/reference_s": batch.ref_time,
                            "time/learner_s": learn["learner_time_s"], "time/sync_s": t_sync,
                            "time/wait_next_batch_s": overlap, "sync/payload_mb": sync.payload_bytes / 2**20,
                            # the step's overhead, itemised: prompts taken from the stream (what the
                            # prefetch left), object-store puts, advantages, the learner call's round trip
                            # beyond the learner's own time (scheduling, arguments), prefetch (overlapped)
                            "time/fetch_s": batch.fetch_time, "time/put_s": batch.put_time,
                            "time/advantages_s": t_adv,
                            "time/learner_call_s": max(0.0, t_learn - learn["learner_time_s"]),
                            "time/prefetch_s": t_prefetch,
                            "time/idle_s": max(0.0, wall - compute - t_sync), "policy_version": float(state.step),
                            "rollout_actors_replaced": float(pool.replaced), "epoch": float(state.epoch)})
            logger.metrics(metrics, state.step)
            history.append(metrics)
            print(f"[grpo] step {state.step}/{g.steps} reward {metrics['reward/total_mean']:.3f} "
                  f"(format {metrics['reward/format_mean']:.2f} class {metrics['reward/class_mean']:.2f} "
                  f"iou {metrics['reward/iou_mean']:.3f}) J {metrics['J']:.3f} kl {metrics['kl']:.4f} "
                  f"ratio {metrics['ratio_mean']:.4f} clip {metrics['clip_frac']:.3f} "
                  f"cut {metrics['truncated_frac']:.2f} no-seg {metrics['no_seg_frac']:.2f} "
                  f"zero-var {metrics['zero_variance_frac']:.2f} | "
                  f"gen {batch.gen_time:.1f}s learn {learn['learner_time_s']:.1f}s sync {t_sync:.2f}s "
                  f"{metrics['gen_tokens_per_s']:.0f} tok/s, {sync.payload_bytes / 2**20:.1f} MB pushed, learner "
                  f"peak RSS {learn['learner_mem/peak_rss_mb']:.0f} MiB", flush=True)
            if state.step % g.checkpoint_every == 0 or state.step == g.steps:
                learner_call(save_checkpoint, cfg, learner, state, queued)
        learner_call(learner.call, "export", str(out), {"stage": "grpo", "global_step": state.step,
                                                         "metrics": metrics})
    finally:
        stream.close()
        pool.shutdown()
        learner.shutdown()
    return {**metrics, "history": history}
