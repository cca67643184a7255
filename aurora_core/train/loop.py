"""The supervised training loop shared by the teacher, SFT and reflect stages.

Driver side, :func:`run_stage` builds one Ray Dataset per epoch plus the validation set and runs a
``TorchTrainer`` whose workers (:func:`train_worker`) each hold a DeepSpeed ZeRO-3 engine. Per
optimizer step: LM + mask (BCE + Dice) (+ [SEG] distillation) loss, gradient accumulation, warm-up
and cosine LR. Per epoch: validation (loss and teacher-forced J), mask overlays, a checkpoint
through ``ray.train.report``. Restarts (``FailureConfig``) and reruns with the same run name resume
from the newest checkpoint: model, optimizer, scheduler, RNG and the data position. At the end
rank 0 writes the stage's export, which the next stage loads, after the head fit
(``<stage>.head_steps``, aurora_core/train/head_fit.py) where the stage has one.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from aurora_core import logs, losses, memory, reasoning
from aurora_core.config import AuroraConfig, StageConfig, config_from_dict, to_dict
from aurora_core.data import shards
from aurora_core.metrics import SplitMetrics, mask_iou
from aurora_core.train import checkpoint as ckpt_io
from aurora_core.train import head_fit
from aurora_core.train import zero3
from aurora_core.train.epochs import train_datasets, val_dataset, write_resume_file

log = logging.getLogger(__name__)


@dataclass
class StageSpec:
    stage: str  # teacher | sft | reflect (also the config section with its StageConfig)
    target: str  # "direct" (the teacher's answer) or "cot" (the row's cot column)
    train_shards: str
    val_shards: str
    export_dir: str
    stage_dir: str  # checkpoints, logs and side files of this stage
    init: str | None = None  # export to start from; None: a fresh model from the config
    distill: str | None = None  # Parquet row key -> teacher [SEG] embedding (SFT)
    # reflective targets: the LM loss on the model's own reasoning too (False: only on the trigger and
    # the correction that follow it; reflect.train_own_reasoning)
    own_reasoning_trained: bool = True
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None


def targets(spec: StageSpec, batch: dict[str, Any]) -> tuple[list[str] | None, list[str]]:
    """(contexts, answers) of a batch: what precedes each answer untrained (None: nothing) and the
    answer trained on."""
    if spec.target == "direct":
        return None, [reasoning.direct_answer(c) for c in batch["class"]]
    if not spec.own_reasoning_trained:  # reflect: the model's own reasoning is the context of its correction
        split = [reasoning.split_reflective(t) for t in batch["cot"]]
        return [c for c, _ in split], [a for _, a in split]
    return None, list(batch["cot"])


def loss_terms(out, inp, masks: torch.Tensor, st: StageConfig, teacher: torch.Tensor | None,
               gt_frames: torch.Tensor | None = None, distill_rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``gt_frames`` [B, T] bool: the mask terms over frames with ground truth only (None: all);
    ``distill_rows`` [B] bool: the rows the distillation pulls on (None: all)."""
    t = {"lm": losses.lm_loss(out.logits, inp.labels[:, out.logits_from:]),
         "bce": losses.mask_bce(out.mask_logits, masks, valid=gt_frames),
         "dice": losses.dice_loss(out.mask_logits, masks, valid=gt_frames)}
    loss = st.lm_weight * t["lm"] + st.bce_weight * t["bce"] + st.dice_weight * t["dice"]
    if teacher is not None:
        t["distill"] = losses.distill_loss(out.seg_embedding, teacher, distill_rows)
        loss = loss + st.distill_weight * t["distill"]
    t["loss"] = loss
    return t


class EpochLine:
    """The console's one line per epoch: the mean of each loss term over the epoch's optimizer steps,
    the validation metrics when it ran, samples/s over the epoch's step time."""

    TERMS = ("loss", "lm", "bce", "dice", "distill")

    def __init__(self, stage: str, epochs: int):
        self.stage, self.epochs = stage, epochs
        self.reset()

    def reset(self) -> None:
        self.sums = {k: 0.0 for k in self.TERMS}
        self.steps, self.samples, self.seconds = 0, 0, 0.0

    def add(self, metrics: dict[str, float], samples: int, seconds: float) -> None:
        for k in self.TERMS:
            self.sums[k] += metrics.get(f"train/{k}", 0.0)
        self.steps += 1
        self.samples += samples
        self.seconds += seconds

    def render(self, epoch: int, val: dict[str, float] | None, memory_note: str) -> str:
        m = {k: v / max(1, self.steps) for k, v in self.sums.items()}
        terms = f"lm {m['lm']:.3f} bce {m['bce']:.3f} dice {m['dice']:.3f}" + (
            f" distill {m['distill']:.4f}" if m["distill"] else "")
        line = (f"[{self.stage}] epoch {epoch + 1}/{self.epochs} ({self.steps} steps, {self.seconds:.0f}s): "
                f"train loss {m['loss']:.4f} ({terms})")
        if val is not None:
            line += f" | val loss {val['val/loss']:.4f} J {val['val/J']:.4f} ({int(val['val/rows'])} rows)"
        return line + f" | {self.samples / max(self.seconds, 1e-9):.1f} samples/s | {memory_note}"


def mask_frames(st: StageConfig, shape: tuple[int, int], seed: int, rank: int, step: int) -> torch.Tensor | None:
    """``st.mask_frames`` frames of each of a batch's clips (``shape`` = (rows, frames)) for the mask
    losses, drawn by a generator seeded by (seed, rank, step): a resumed run draws the same; None: all."""
    b, t = shape
    if not st.mask_frames or st.mask_frames >= t:
        return None
    g = torch.Generator().manual_seed(seed * 1_000_003 + rank * 10_007 + step)
    return torch.stack([torch.randperm(t, generator=g)[:st.mask_frames].sort().values for _ in range(b)])


def initial_model(cfg: AuroraConfig, spec: StageSpec):
    from aurora_core.model.build import build_model, load_export

    if spec.init:
        return load_export(spec.init, cfg.data, trainable=True, runtime=cfg.model)
    model, proc = build_model(cfg.model, cfg.data)
    return model, proc, cfg.model


def load_distill_targets(path: str) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    return {k: np.asarray(e, dtype=np.float32) for k, e in zip(t["key"].to_pylist(), t["embedding"].to_pylist())}


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- worker

class TorchCollate(NumpyBatchCollateFn):
    """shards.collate in the form iter_torch_batches takes (a plain function is deprecated since Ray 2.47)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return shards.collate(batch)


class EpochBatches:
    """This worker's batches of epochs first_epoch.. in order (each epoch is its own dataset shard).
    An epoch's Ray Data pipeline starts, and its first batch is fetched, in a thread ahead of its
    turn: the first epoch's while the model is built and DeepSpeed initialised, each next one while
    the epoch before trains (an epoch's start, ~5-20 s on 2 CPU cores, was a third of a tiny stage)."""

    def __init__(self, st: StageConfig, first_epoch: int, seed: int, rank: int, shuffle_batches: int):
        import concurrent.futures

        self.st, self.first_epoch, self.seed, self.rank = st, first_epoch, seed, rank
        self.shuffle_batches = shuffle_batches
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="next-epoch")
        self.ahead = self.pool.submit(self._open, first_epoch) if first_epoch < st.epochs else None

    def _open(self, e: int):
        import ray.train

        st = self.st
        it = iter(ray.train.get_dataset_shard(f"train_e{e}").iter_torch_batches(
            batch_size=st.batch_size, collate_fn=TorchCollate(),
            local_shuffle_buffer_size=self.shuffle_batches * st.batch_size,
            local_shuffle_seed=self.seed * 1000 + e * 10 + self.rank))
        return it, next(it, None)

    def __iter__(self):
        try:
            for e in range(self.first_epoch, self.st.epochs):
                log.info("epoch %d: reading train_e%d", e + 1, e)
                it, head = self.ahead.result()
                self.ahead = self.pool.submit(self._open, e + 1) if e + 1 < self.st.epochs else None
                if head is not None:
                    yield head
                    yield from it
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)


def train_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from ray.train import Checkpoint

    from aurora_core.tracking import RunLogger, mask_overlay_png

    cfg = config_from_dict(config["cfg"])
    spec = StageSpec(**config["spec"])
    st: StageConfig = getattr(cfg, spec.stage)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    bf16 = device.type == "cuda"  # NCCL + bf16 on GPUs; gloo + fp32 on CPUs
    _seed(cfg.run.seed * 100 + rank)
    logs.setup(cfg.run.dir, spec.stage, console_level="WARNING")  # progress: the lines rank 0 prints

    steps_per_epoch = config["steps_per_epoch"]
    rows_per_epoch = steps_per_epoch * st.batch_size * st.grad_accum * world
    total_steps = st.epochs * steps_per_epoch
    if st.max_steps:
        total_steps = min(total_steps, st.max_steps)
    # the data position first: the training pipeline reads resume.json when it starts, and it starts
    # now, while the model is built
    restored = ray.train.get_checkpoint()
    position = ckpt_io.TrainState(world_size=world)
    if restored is not None:
        with restored.as_directory() as d:
            position = ckpt_io.read_state(Path(d))
    stage_dir = Path(spec.stage_dir)
    if rank == 0:
        write_resume_file(stage_dir / "resume.json", position.epochs_done, position.consumed)
    dist.barrier()
    batches = EpochBatches(st, position.epochs_done, cfg.run.seed, rank, cfg.train.shuffle_buffer_batches)

    opt = zero3.Optimization.for_stage(st, total_steps)
    ds_cfg = zero3.deepspeed_config(cfg.train.deepspeed_config, opt, bf16)
    with zero3.partitioned_build(ds_cfg, cfg.model.zero_init):
        model, proc, _ = initial_model(cfg, spec)
    model.to(device)
    log.info("model ready (%s, %s); initialising DeepSpeed ZeRO-3 on %d workers", device,
             "built partitioned" if cfg.model.zero_init else "built whole", world)
    engine, scheduler = zero3.initialize(model, ds_cfg, opt)
    log.info("engine ready: %d optimizer steps planned (%d per epoch)", total_steps, steps_per_epoch)
    dtype = torch.bfloat16 if bf16 else torch.float32

    state = position
    if restored is not None:
        with restored.as_directory() as d:
            state = ckpt_io.load(engine, scheduler, Path(d), rank, world)
        log.info("resumed at step %d (%d epochs done)", state.global_step, state.epochs_done)

    teacher = load_distill_targets(spec.distill) if (spec.distill and st.distill_weight > 0) else None
    logger = RunLogger(spec.tracking_uri, spec.mlflow_run_id if rank == 0 else None)
    sample_log = None
    if cfg.train.sample_log:
        (stage_dir / "sample_log").mkdir(parents=True, exist_ok=True)
        sample_log = open(stage_dir / "sample_log" / f"rank{rank}.jsonl", "a")
        sample_log.write(json.dumps({"start_step": state.global_step}) + "\n")
    consumed_local: dict[str, list[str]] = {}  # epoch -> this rank's rows applied since the (re)start

    def save_checkpoint(metrics: dict[str, float]) -> None:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, consumed_local)
        merged = {k: list(v) for k, v in state.consumed.items()}
        for part in gathered:
            for e, keys in part.items():
                merged.setdefault(e, []).extend(keys)
        while len(merged.get(str(state.epochs_done), [])) >= rows_per_epoch:
            merged.pop(str(state.epochs_done))  # a finished epoch needs no key list
            state.epochs_done += 1
        state.consumed, state.metrics = merged, metrics
        consumed_local.clear()
        with tempfile.TemporaryDirectory() as d:
            ckpt_io.save(engine, scheduler, state, Path(d), rank, world)
            ray.train.report({**metrics, "step": state.global_step},
                             checkpoint=Checkpoint.from_directory(d) if rank == 0 else None)

    def validate(epoch: int) -> dict[str, float]:
        engine.eval()
        acc = SplitMetrics()
        sums = torch.zeros(5, dtype=torch.float64)  # loss, lm, bce, dice, rows
        overlays = []
        cap = st.val_rows // world if st.val_rows else None
        for batch in ray.train.get_dataset_shard("val").iter_torch_batches(
                batch_size=st.batch_size, collate_fn=TorchCollate()):
            if cap is not None and sums[4] >= cap:
                continue  # keep consuming: every rank must see its whole share
            contexts, answers = targets(spec, batch)
            inp = proc.train_batch(batch, answers, contexts).to(device, dtype)
            with torch.no_grad():
                out = engine(inp)
                t = loss_terms(out, inp, batch["masks"].to(device), st, None, batch["gt_frames"])
            n = len(batch["key"])
            sums += torch.tensor([t["loss"].item() * n, t["lm"].item() * n, t["bce"].item() * n,
                                  t["dice"].item() * n, n], dtype=torch.float64)
            valid = batch["gt_frames"].flatten(0, 1)  # J over frames with ground truth
            acc.update(out.mask_logits.flatten(0, 1).float().cpu()[valid], batch["masks"].flatten(0, 1)[valid])
            if rank == 0 and len(overlays) < cfg.train.overlay_clips:
                for i in range(min(n, cfg.train.overlay_clips - len(overlays))):
                    overlays.append((batch["key"][i], out.mask_logits[i].float().cpu(), answers[i]))
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, (sums, acc))
        total = sum(p[0] for p in parts)
        merged = SplitMetrics()
        for p in parts:
            if p[1].num_frames:
                merged.merge(p[1])
        n = max(1.0, float(total[4]))
        m = {"val/loss": total[0] / n, "val/lm": total[1] / n, "val/bce": total[2] / n, "val/dice": total[3] / n,
             "val/J": merged.compute()["J"] if merged.num_frames else float("nan"), "val/rows": float(total[4])}
        if overlays:  # the frames are read for these clips only (training batches may carry none)
            clips = shards.rows_by_key(Path(spec.val_shards), [k for k, _, _ in overlays], ["val"], cfg.data)
            for i, (key, pred, answer) in enumerate(overlays):
                gt = torch.from_numpy(clips["masks"][i])
                logger.png(mask_overlay_png(torch.from_numpy(clips["frames"][i]), pred, gt,
                                            expression=str(clips["exp"][i]),
                                            answer=f"(teacher-forced target) {answer}", iou=mask_iou(pred, gt)),
                           f"overlays/epoch{epoch}/{key}.png")
        engine.train()
        return {k: float(v) for k, v in m.items()}

    metrics: dict[str, float] = dict(state.metrics)
    if state.global_step < total_steps:
        engine.train()
        pending: list[tuple[str, int]] = []
        step_sums = torch.zeros(6, dtype=torch.float64)  # loss lm bce dice distill tokens
        epoch_line = EpochLine(spec.stage, st.epochs)
        t_step, t_data, t_wait = time.time(), 0.0, time.time()
        log.info("training from step %d to %d", state.global_step, total_steps)
        for batch in batches:
            t_data += time.time() - t_wait
            contexts, answers = targets(spec, batch)
            inp = proc.train_batch(batch, answers, contexts).to(device, dtype)
            tt, distill_rows = None, None
            if teacher is not None:
                missing = [k for k in batch["key"] if k not in teacher]
                if missing:
                    raise KeyError(f"no teacher [SEG] embedding for {missing[:3]} in {spec.distill}")
                tt = torch.tensor(np.stack([teacher[k] for k in batch["key"]]), device=device)
                if not cfg.teacher.null_rows:  # a teacher never shown a null row has nothing to teach there
                    distill_rows = torch.tensor([c != reasoning.NULL_CLASS for c in batch["class"]], device=device)
            frames = mask_frames(st, batch["masks"].shape[:2], cfg.run.seed, rank, engine.global_steps)
            masks, gt_frames = batch["masks"], batch["gt_frames"]
            if frames is not None:
                rows = torch.arange(len(frames))[:, None]
                masks, gt_frames = masks[rows, frames], gt_frames[rows, frames]
            out = engine(inp, mask_frames=None if frames is None else frames.to(device))
            t = loss_terms(out, inp, masks.to(device), st, tt, gt_frames, distill_rows)
            before = engine.global_steps
            lrs = scheduler.get_last_lr()  # the LRs of the update this micro-batch may complete (head, [LLM])
            engine.backward(t["loss"])
            engine.step()
            pending += list(zip(batch["key"], batch["epoch"].tolist()))
            step_sums += torch.tensor([t["loss"].item(), t["lm"].item(), t["bce"].item(), t["dice"].item(),
                                       t.get("distill", torch.zeros(())).item(),
                                       float((inp.labels != losses.IGNORE_INDEX).sum())], dtype=torch.float64)
            if engine.global_steps == before:
                t_wait = time.time()
                continue
            # ---- one optimizer step done
            state.global_step = engine.global_steps
            for key, e in pending:
                consumed_local.setdefault(str(e), []).append(key)
            if sample_log is not None:
                sample_log.write(json.dumps({"step": state.global_step, "rows": pending}) + "\n")
                sample_log.flush()
            dt = time.time() - t_step
            red = step_sums.clone()
            dist.all_reduce(red)
            micro = st.grad_accum * world
            epoch = (state.global_step - 1) // steps_per_epoch
            metrics = {"train/loss": red[0] / micro, "train/lm": red[1] / micro, "train/bce": red[2] / micro,
                       "train/dice": red[3] / micro, "train/lr": lrs[0],
                       "train/samples_per_s": len(pending) * world / dt, "train/tokens_per_s": red[5] / dt,
                       "train/step_time_s": dt, "train/data_wait_s": t_data, "train/epoch": epoch}
            if len(lrs) > 1:
                metrics["train/llm_lr"] = lrs[1]
            if teacher is not None:
                metrics["train/distill"] = red[4] / micro
            metrics.update(memory.peak_mb_over_ranks())
            metrics = {k: float(v) for k, v in metrics.items()}
            if state.global_step % cfg.train.log_every_steps == 0:
                logger.metrics(metrics, state.global_step)
            epoch_line.add(metrics, len(pending) * world, dt)
            if rank == 0 and cfg.train.print_every_steps and state.global_step % cfg.train.print_every_steps == 0:
                print(f"[{spec.stage}] epoch {epoch + 1}/{st.epochs} step {state.global_step}/{total_steps} "
                      f"loss {metrics['train/loss']:.4f} (lm {metrics['train/lm']:.3f} bce {metrics['train/bce']:.3f} "
                      f"dice {metrics['train/dice']:.3f}"
                      + (f" distill {metrics['train/distill']:.4f}" if teacher is not None else "")
                      + f") lr {metrics['train/lr']:.2e}"
                      + (f" llm lr {metrics['train/llm_lr']:.2e}" if "train/llm_lr" in metrics else "")
                      + f" {metrics['train/samples_per_s']:.1f} samples/s "
                      f"{memory.describe(metrics)}",
                      flush=True)
            pending = []
            step_sums.zero_()
            last = state.global_step >= total_steps
            val = None
            if state.global_step % steps_per_epoch == 0:  # an epoch's worth of steps
                ep = state.global_step // steps_per_epoch
                if last or ep % st.val_every_epochs == 0:
                    val = validate(ep - 1)
                    metrics = {**metrics, **val}
                    logger.metrics(val, state.global_step)
                save_checkpoint(metrics)
            elif last or (cfg.train.checkpoint_every_steps
                          and state.global_step % cfg.train.checkpoint_every_steps == 0):
                save_checkpoint(metrics)
            if state.global_step % steps_per_epoch == 0 or last:
                if rank == 0:
                    print(epoch_line.render(epoch, val, memory.describe(metrics)), flush=True)
                epoch_line.reset()
            if last:
                break
            t_step, t_data, t_wait = time.time(), 0.0, time.time()

    # ---- export: gather the trained weights into a plain model on rank 0
    log.info("training done at step %d; exporting", state.global_step)
    params = zero3.gather_trainable(engine)
    if rank == 0:
        from aurora_core.model.build import export_with_weights

        fit = None
        if st.head_steps:
            def fit(model, proc) -> dict[str, Any]:
                out = head_fit.fit(model, proc, st, cfg.data, spec.train_shards, spec.val_shards,
                                   lambda batch: targets(spec, batch), cfg.run.seed, spec.stage)
                logger.metrics(out, state.global_step)
                return {"head_fit": out}

        export_with_weights(spec.init, cfg.model, cfg.data, params, Path(spec.export_dir),
                            extra={"stage": spec.stage, "global_step": state.global_step, "metrics": metrics},
                            before_save=fit)
        logger.tag("aurora.export", spec.export_dir)
        logger.text(spec.export_dir + "\n", "export_path.txt")
    dist.barrier()
    if sample_log is not None:
        sample_log.close()
    ray.train.report({**metrics, "step": state.global_step, "exported": 1.0})


# --------------------------------------------------------------------------- driver

def _ordered_ingest():
    """Ray Train's default ingest options with ``preserve_order``: the epoch's seeded block order reaches
    the workers as it is (map tasks finishing out of order would reorder it), so which rows each rank
    trains on, and in which order, is the same from run to run with the same seed."""
    from ray.train import DataConfig

    opts = DataConfig.default_ingest_options()
    opts.preserve_order = True
    return opts


def run_stage(cfg: AuroraConfig, spec: StageSpec) -> dict[str, Any]:
    """Train one stage on Ray Train; returns the final reported metrics."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from aurora_core.runtime import init_ray

    st: StageConfig = getattr(cfg, spec.stage)
    init_ray(cfg)
    w = cfg.train.num_workers
    multiple = w * st.batch_size * st.grad_accum
    keys = shards.split_keys(Path(spec.train_shards), "train")
    excluded: list[str] = []
    if not st.null_rows:
        excluded = shards.null_keys(Path(spec.train_shards), "train")
        dropped = set(excluded)
        keys = [k for k in keys if k not in dropped]
        log.info("%s: %d train rows without a referent left out (%s.null_rows=false)", spec.stage, len(excluded),
                 spec.stage)
    steps_per_epoch = len(keys) // multiple
    if steps_per_epoch == 0:
        raise ValueError(f"{spec.stage}: the train split has {len(keys)} rows, fewer than workers x batch x "
                         f"accumulation = {multiple}")
    train_files = shards.split_files(Path(spec.train_shards), ["train"])
    resume_file = str(Path(spec.stage_dir) / "resume.json")
    datasets = train_datasets(train_files, keys, cfg.data, epochs=st.epochs, multiple=multiple, seed=cfg.run.seed,
                              resume_file=resume_file, batch_size=st.batch_size, excluded=excluded)
    if len(keys) % multiple:
        log.info("%s: each epoch leaves out %d of %d train rows (a seeded choice per epoch): every step takes "
                 "%d (workers x batch x accumulation)", spec.stage, len(keys) % multiple, len(keys), multiple)
    val_keys = shards.split_keys(Path(spec.val_shards), "val")
    datasets["val"] = val_dataset(shards.split_files(Path(spec.val_shards), ["val"]), val_keys, cfg.data,
                                  workers=w, seed=cfg.run.seed, batch_size=st.batch_size)
    Path(spec.stage_dir).mkdir(parents=True, exist_ok=True)
    resources = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": to_dict(cfg), "spec": asdict(spec), "steps_per_epoch": steps_per_epoch},
        scaling_config=ScalingConfig(num_workers=w, use_gpu=cfg.train.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=spec.stage, storage_path=str(cfg.run.dir / "ray_train"),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            # Ray Train's own console lines (worker group start, every reported TrainingReport) from
            # WARNING up; all of them stay in its session logs (/tmp/ray/session_latest/logs/train)
            logging_config=LoggingConfig(log_level="WARNING")),
        datasets=datasets, dataset_config=DataConfig(datasets_to_split="all", execution_options=_ordered_ingest()),
    )
    log.info("%s: %d workers, %d steps per epoch, %d epochs", spec.stage, w, steps_per_epoch, st.epochs)
    result = trainer.fit()
    return dict(result.metrics or {})
