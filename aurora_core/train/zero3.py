"""DeepSpeed ZeRO-3 for our model: the config, initialisation (with our LR schedule), and full views of
the trainable state.

Under ZeRO-3 every parameter is partitioned across ranks; the functions that read or write the full
trainable tensors (``deepspeed.utils.safe_get/set_full_*``) are collectives: every rank calls them,
in the same order.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aurora_core.config import REPO_ROOT, GRPOConfig, StageConfig

log = logging.getLogger(__name__)


def import_deepspeed():
    """Import DeepSpeed with two traps avoided: ``deepspeed.zero.Init`` fails with a signature mismatch
    unless ``torch._dynamo`` is imported first, and the CPU accelerator JIT-builds an op at start."""
    # the accelerator of *this* process: a Ray actor without a GPU sees none (CUDA_VISIBLE_DEVICES="")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    importlib.import_module("torch._dynamo")  # zero.Init's signature checks need it imported first
    import deepspeed

    from aurora_core import logs

    logs.adopt_library_loggers()  # DeepSpeed prints through a handler of its own, installed at import
    # The CPU accelerator JIT-builds an shm all-reduce op (~2 min of g++) used only for inference
    # all-reduce; we never use it. The attribute deepspeed.comm.torch is the torch module, hence sys.modules.
    comm_torch = sys.modules.get("deepspeed.comm.torch")
    if comm_torch is not None and hasattr(comm_torch, "build_shm_op"):
        comm_torch.build_shm_op = lambda: None
    return deepspeed


def load_ds_config(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_absolute():
        p = REPO_ROOT / p
    if not p.is_file():
        raise FileNotFoundError(f"DeepSpeed config {p} not found (train.deepspeed_config)")
    cfg = json.loads(p.read_text())
    cfg.pop("_comment", None)
    return cfg


@dataclass(frozen=True)
class Optimization:
    """What our config owns of a ZeRO-3 engine: batch, optimizer and LR schedule."""

    micro_batch: int  # samples per forward/backward on one rank
    grad_accum: int  # micro-batches per optimizer step
    lr: float
    weight_decay: float
    warmup_steps: int  # linear warm-up over this many optimizer steps (0: full LR from the first)
    min_lr_ratio: float  # cosine decay to lr * min_lr_ratio at the last step
    total_steps: int  # optimizer steps of the run
    llm_lr: float = 0.0  # > 0: the LLM's trainable weights at this peak LR, the segmentation head at lr

    @classmethod
    def for_stage(cls, st: StageConfig, total_steps: int) -> "Optimization":
        return cls(st.batch_size, st.grad_accum, st.lr, st.weight_decay, st.warmup_steps, st.min_lr_ratio,
                   total_steps, st.llm_lr)

    @classmethod
    def for_grpo(cls, g: GRPOConfig) -> "Optimization":
        """The learner: each rank's share of a step's samples, in micro-batches, is one optimizer step
        per iteration; constant LR after the warm-up."""
        per_rank = g.prompts_per_step // g.learner_workers * g.num_samples
        return cls(g.micro_batch, per_rank // g.micro_batch, g.lr, g.weight_decay, g.warmup_steps, 1.0,
                   g.steps * g.num_iterations, g.llm_lr)

    def lr_factor(self, step: int) -> float:
        """LR / lr for the update of optimizer step ``step`` (0-based). Warm-up starts at 1/warmup, not
        0, so the first update trains; with warmup_steps=0 it runs at full LR."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def deepspeed_config(path: str, opt: Optimization, bf16: bool) -> dict[str, Any]:
    """The JSON file's settings plus what our config owns: batch, optimizer, precision. The LR schedule
    is ours (:func:`initialize`): DeepSpeed's WarmupCosineLR gives the first update LR 0 and needs a
    warm-up of >= 1 step."""
    cfg = load_ds_config(path)
    cfg["train_micro_batch_size_per_gpu"] = opt.micro_batch
    cfg["gradient_accumulation_steps"] = opt.grad_accum
    cfg.pop("train_batch_size", None)
    cfg.pop("scheduler", None)
    ds_opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {"torch_adam": True}})
    ds_opt.setdefault("params", {}).update(lr=opt.lr, weight_decay=opt.weight_decay)
    cfg["bf16"] = {"enabled": bool(bf16)}
    return cfg


def param_groups(model: torch.nn.Module, opt: Optimization) -> list[dict[str, Any]]:
    """The trainable parameters as optimizer groups: one at ``opt.lr``, or with ``opt.llm_lr`` set, the
    rest (the segmentation head) at ``opt.lr`` first and the LLM's (``model.llm``) at ``opt.llm_lr``
    second. DeepSpeed builds the optimizer from the config with these groups; a group's own ``lr``
    overrides the config's and the schedule scales each group's peak."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if opt.llm_lr <= 0:
        return [{"params": [p for _, p in trainable]}]
    llm = [p for n, p in trainable if n.startswith("llm.")]
    head = [p for n, p in trainable if not n.startswith("llm.")]
    if not llm or not head:
        raise ValueError(f"llm_lr={opt.llm_lr} splits the trainable weights into the LLM's and the head's, but "
                         f"{'the LLM has' if not llm else 'the head has'} none: set llm_lr=0")
    return [{"params": head, "lr": opt.lr}, {"params": llm, "lr": opt.llm_lr}]


def initialize(model: torch.nn.Module, ds_cfg: dict[str, Any], opt: Optimization):
    """The engine and its LR scheduler (stepped by DeepSpeed at each optimizer step)."""
    deepspeed = import_deepspeed()
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, opt), config=ds_cfg,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, opt.lr_factor))
    return engine, scheduler


@contextlib.contextmanager
def partitioned_build(ds_cfg: dict[str, Any], enabled: bool):
    """``model.zero_init``: models built inside the block are constructed and loaded partitioned over
    the ranks (transformers' ``from_pretrained`` runs ``deepspeed.zero.Init`` and lets rank 0 alone read
    the checkpoint's values while an ``HfDeepSpeedConfig`` is alive). ``ds_cfg`` must be the config the
    engine is then initialised with (same precision). Every rank enters it: construction is collective."""
    if not enabled:
        yield
        return
    import_deepspeed()
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    hf_cfg = HfDeepSpeedConfig(ds_cfg)  # transformers keeps only a weak reference: held here for the block
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del hf_cfg


def is_partitioned(p: torch.Tensor) -> bool:
    """The parameter was partitioned by zero.Init (its local data is an empty placeholder)."""
    return hasattr(p, "ds_id")


def gathered(params, modifier_rank: int | None = None):
    """Full views of the partitioned ones of ``params`` inside the block (``modifier_rank``: that
    rank's writes are kept and re-partitioned); nothing to do when none is partitioned. Collective
    when they are: every rank enters it."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        return contextlib.nullcontext()
    return import_deepspeed().zero.GatheredParameters(params, modifier_rank=modifier_rank)


def trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def gather_trainable(engine) -> dict[str, torch.Tensor]:
    """Full fp32 master copies of the trainable parameters, on every rank (collective)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).detach().cpu() for n, p in trainable(engine)}


def gather_optimizer(engine) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_optimizer_state

    out = {}
    for n, p in trainable(engine):
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{key}/{n}"] = safe_get_full_optimizer_state(p, key).detach().cpu()
    return out


def set_trainable(engine, tensors: dict[str, torch.Tensor]) -> None:
    from deepspeed.utils import safe_set_full_fp32_param

    names = {n for n, _ in trainable(engine)}
    if set(tensors) != names:
        missing, extra = sorted(names - set(tensors)), sorted(set(tensors) - names)
        raise ValueError(f"checkpoint does not match the model's trainable parameters "
                         f"(missing {missing[:3]}, unexpected {extra[:3]})")
    deepspeed = import_deepspeed()
    rank = torch.distributed.get_rank()
    for n, p in trainable(engine):
        safe_set_full_fp32_param(p, tensors[n].float())  # the optimizer's fp32 master partition
        # ... and the module's own (possibly bf16) partition, which the next forward reads
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if rank == 0:
                p.data.copy_(tensors[n].to(p.dtype))


def _ensure_adam_state(engine) -> None:
    """torch Adam(W) creates its moments lazily at the first step, so a freshly initialised engine
    has none to restore into; create them exactly as torch's lazy init would (zeros, step 0)."""
    inner = engine.optimizer.optimizer
    for flat in engine.optimizer.fp32_partitioned_groups_flat:
        st = inner.state[flat]
        if "exp_avg" not in st:
            st["step"] = torch.tensor(0.0, dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(flat, memory_format=torch.preserve_format)


def set_optimizer(engine, tensors: dict[str, torch.Tensor], step: int) -> None:
    from deepspeed.utils import safe_set_full_optimizer_state

    _ensure_adam_state(engine)
    for n, p in trainable(engine):
        for key in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(p, tensors[f"{key}/{n}"].float(), key)
    # Adam's bias correction reads the step count of each (flat, partitioned) parameter group
    for state in engine.optimizer.optimizer.state.values():
        if "step" in state:
            state["step"] = torch.full_like(torch.as_tensor(state["step"]), step, dtype=torch.float32) \
                if torch.is_tensor(state["step"]) else step


def optimizer_step(engine) -> int:
    for state in engine.optimizer.optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0
