"""The head fit that ends a supervised stage (``<stage>.head_steps`` > 0): ``seg_proj`` and SAM's mask
decoder trained alone on the stage's final ``[SEG]`` states, just before the export is written.

Why it exists (tiny default, measured with bench/seg_prompt_probe.py; README, "The masks do not follow
the reference"): after SFT the ``[SEG]`` state carries the class (a linear probe reads it on 85 % of
test_s rows), yet the ``seg_proj`` trained with the LLM on the raw states passes none of it to the
decoder: any row's prompt gives the same masks, and 2,500 more decoder steps on those raw states
leave test_s IoU at the one-prompt prior's 0.34. A fresh ``seg_proj`` on the states standardised
per feature does learn to refer, but late: 0.35 after 625 steps, 0.43 after 1,250, 0.49 after 2,500
(a prompt per class, the oracle: 0.70). A stage gives its head ~600 steps, with states that move
under it. With the LLM frozen the states are computed once and a step is the decoder's alone
(~0.06 s for 16 rows x 3 frames on 2 cores), so the head gets its thousands of steps here.

What it does, on the plain (gathered) model in the export step of rank 0: the stage's train rows with
a referent, teacher-forced on the stage's targets, give the ``[SEG]`` states once; ``seg_norm``
takes their per-feature mean and standard deviation; ``seg_proj`` starts afresh (a seeded init) and
learns at ``head_lr`` with the decoder at the stage's ``lr``, on seeded draws of rows and frames.
It reads SAM's embeddings from the frozen-feature cache (``data.cache_frozen_features``) and holds
them in memory (~42 MiB for the tiny default's train split; SAM ViT-H's are 2 MiB a frame, ~20 GiB
for Ref-AVS's: the fit is for small heads, and says so past 8 GiB). Deterministic in the seed and
independent of the worker count. A restart after the last training step redoes the fit from the last
checkpoint (it is not checkpointed itself).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from aurora_core import losses
from aurora_core.config import DataConfig, StageConfig
from aurora_core.data import shards
from aurora_core.metrics import J_THRESHOLD, mask_iou

log = logging.getLogger(__name__)

# (contexts, answers) of a batch: what precedes each answer untrained (None: nothing) and the answer
Targets = Callable[[dict[str, np.ndarray]], tuple[list[str] | None, list[str]]]
MAX_EMBEDDING_BYTES = 8 << 30  # the SAM embeddings the fit holds; beyond, a clear error


def read_rows(shards_dir: Path, split: str, data: DataConfig) -> dict[str, np.ndarray]:
    """The split's rows that have a referent, decoded without media: the SAM embeddings come from the
    frozen-feature cache (``sam_embeddings`` float16 [N, T, D, e, e]), with masks and gt_frames."""
    import pyarrow.parquet as pq

    if not data.cache_frozen_features:
        raise ValueError("the head fit reads SAM's embeddings from the frozen-feature cache: set "
                         "data.cache_frozen_features=true, or <stage>.head_steps=0")
    table = pq.read_table(shards.split_files(shards_dir, [split]))
    raw = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names
           if c not in shards.MEDIA_COLUMNS}
    dec = shards.decode_batch(raw, data.frame_size, data.num_frames, data.sample_rate, data.audio_seconds,
                              features_dir=data.features_dir)
    keep = dec["has_target"]
    rows = {k: v[keep] for k, v in dec.items()}
    size = rows["sam_embeddings"].nbytes if len(rows["key"]) else 0
    if size > MAX_EMBEDDING_BYTES:
        raise MemoryError(f"the head fit would hold {size / 2**30:.1f} GiB of SAM embeddings ({len(rows['key'])} "
                          f"rows of {shards_dir}, split {split}): it is for small heads; set <stage>.head_steps=0")
    return rows


def seg_states(model, proc, rows: dict[str, np.ndarray], targets: Targets, batch: int = 32) -> torch.Tensor:
    """[N, H] the last hidden state at each row's answer's [SEG], teacher-forced (``seg_norm``'s input)."""
    seen: dict[str, torch.Tensor] = {}
    hook = model.seg_norm.register_forward_hook(lambda m, args, out: seen.update(h=args[0].detach()))
    out = []
    try:
        with torch.no_grad():
            for i in range(0, len(rows["key"]), batch):
                b = shards.collate({k: v[i:i + batch] for k, v in rows.items()})
                contexts, answers = targets(b)
                model(proc.train_batch(b, answers, contexts), with_masks=False)
                out.append(seen["h"].float())
    finally:
        hook.remove()
    return torch.cat(out)


def decode(model, prompts: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """[B, D] prompts x [B*T, D, e, e] SAM embeddings -> mask logits [B, T, S, S]."""
    b = prompts.shape[0]
    dtype = model.seg_proj[0].weight.dtype
    return model.decode_masks(prompts.to(dtype), torch.zeros(b, emb.shape[0] // b), torch.ones(b, dtype=torch.bool),
                              emb.to(dtype))


def _gt_at(masks: np.ndarray, size: int) -> torch.Tensor:
    return torch.nn.functional.interpolate(torch.from_numpy(masks).float(), size=(size, size), mode="nearest")


def mean_iou(model, prompts: torch.Tensor, rows: dict[str, np.ndarray]) -> tuple[float, list[torch.Tensor]]:
    """Mean IoU (J at Ref-AVS's threshold) over ``rows`` (their frames with ground truth) of the masks
    the prompts [N, D] give, and each row's mask logits [T, S, S]."""
    ious, logits = [], []
    with torch.no_grad():
        for i in range(0, len(rows["key"]), 8):
            emb = torch.from_numpy(rows["sam_embeddings"][i:i + 8]).flatten(0, 1)
            m = decode(model, prompts[i:i + 8], emb).float()
            gt = _gt_at(rows["masks"][i:i + 8], m.shape[-1])
            for j in range(m.shape[0]):
                valid = torch.from_numpy(rows["gt_frames"][i + j])
                ious.append(mask_iou(m[j][valid], gt[j][valid], J_THRESHOLD))
                logits.append(m[j])
    return float(np.mean(ious)), logits


def train_head(model, prompt_of: Callable[[np.ndarray], torch.Tensor], params: list[torch.nn.Parameter],
               rows: dict[str, np.ndarray], steps: int, *, lr: float, params_lr: float, batch: int, frames: int,
               st: StageConfig, seed: int, report: Callable[[int, float], None] | None = None) -> float:
    """``steps`` AdamW steps of the mask decoder (at ``lr``) and ``params`` (at ``params_lr``) on the
    stage's mask loss: each step ``batch`` rows and ``frames`` of their frames, drawn by a generator
    seeded with ``seed``; ``prompt_of(row indices)`` -> [batch, D]. ``report(step, loss)`` four times.
    Returns the last step's loss."""
    decoder = [p for p in model.sam.mask_decoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": decoder}, {"params": params, "lr": params_lr}], lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    n, t = len(rows["key"]), rows["masks"].shape[1]
    batch, frames = min(batch, n), min(frames or t, t)
    pick = torch.arange(batch)[:, None]
    loss = torch.zeros(())
    for step in range(steps):
        idx = rng.choice(n, batch, replace=False)
        fr = torch.from_numpy(np.stack([rng.choice(t, frames, replace=False) for _ in idx]))
        emb = torch.from_numpy(rows["sam_embeddings"][idx])[pick, fr].flatten(0, 1)
        m = decode(model, prompt_of(idx), emb)
        gt = _gt_at(rows["masks"][idx], m.shape[-1])[pick, fr]
        valid = torch.from_numpy(rows["gt_frames"][idx])[pick, fr]
        loss = (st.bce_weight * losses.mask_bce(m, gt, valid=valid)
                + st.dice_weight * losses.dice_loss(m, gt, valid=valid))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if report is not None and (step + 1) % max(1, steps // 4) == 0:
            report(step + 1, loss.item())
    return loss.item()


def reset_projection(proj: torch.nn.Sequential, seed: int) -> None:
    """``seg_proj`` back to a fresh init, drawn from ``seed`` (the global RNG left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer in proj:
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()


def fit(model, proc, st: StageConfig, data: DataConfig, train_shards: str, val_shards: str, targets: Targets,
        seed: int, label: str) -> dict[str, float]:
    """The head fit on ``model`` in place (see the module docstring); returns its metrics (``head/*``),
    val IoU before and after included. Prints one line a quarter."""
    t0 = time.time()
    tr = read_rows(Path(train_shards), "train", data)
    va = read_rows(Path(val_shards), "val", data)
    if len(tr["key"]) < 2:
        raise ValueError(f"{label}: the head fit needs train rows with a referent; {train_shards} has "
                         f"{len(tr['key'])}")
    model.eval()  # dropout off: the states are the ones the export will produce
    h_tr, h_va = seg_states(model, proc, tr, targets), seg_states(model, proc, va, targets)
    prompt = lambda h: model.seg_proj(model.seg_norm(h))  # noqa: E731  the [SEG] prompt of states [N, H]
    dtype = model.seg_proj[0].weight.dtype
    x_tr, x_va = h_tr.to(dtype), h_va.to(dtype)
    before = mean_iou(model, prompt(x_va), va)[0]
    mean, sd = h_tr.mean(0), h_tr.std(0)
    with torch.no_grad():
        model.seg_norm.mean.copy_(mean)
        model.seg_norm.scale.copy_(1.0 / (sd + 1e-6))
    reset_projection(model.seg_proj, seed)
    print(f"[{label}] head fit: {len(tr['key'])} train rows with a referent, states in {time.time() - t0:.0f}s "
          f"(norm {float(h_tr.norm(dim=1).mean()):.2f}); val IoU as trained {before:.4f}; {st.head_steps} steps",
          flush=True)
    t1 = time.time()

    def report(step: int, loss: float) -> None:
        with torch.no_grad():
            iou = mean_iou(model, prompt(x_va), va)[0]
        print(f"[{label}] head fit step {step}/{st.head_steps}: loss {loss:.4f} | val IoU {iou:.4f} "
              f"({time.time() - t1:.0f}s)", flush=True)
        log.info("head fit step %d: loss %.4f, val IoU %.4f", step, loss, iou)

    model.train()
    last = train_head(model, lambda idx: prompt(x_tr[idx]), list(model.seg_proj.parameters()),
                      tr, st.head_steps, lr=st.lr, params_lr=st.head_lr, batch=st.batch_size,
                      frames=st.mask_frames, st=st, seed=seed, report=report)
    model.eval()
    with torch.no_grad():
        after = mean_iou(model, prompt(x_va), va)[0]
    return {"head/val_iou_before": before, "head/val_iou": after, "head/loss": last,
            "head/steps": float(st.head_steps), "head/seconds": time.time() - t0}
