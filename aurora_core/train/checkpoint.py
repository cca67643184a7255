"""Training checkpoints without pickle: safetensors for tensors, JSON for everything else.

A checkpoint directory holds the full (gathered) trainable parameters in fp32, Adam's moments,
and ``state.json``: step, the row keys already trained on in each unfinished epoch (the data
position), the optimizer step count, the LR scheduler state and every rank's RNG states. Full
tensors make a checkpoint independent of how ZeRO-3 partitioned them. DeepSpeed's own
``save_checkpoint`` is not used because its loader unpickles (``torch.load(weights_only=False)``).
"""

from __future__ import annotations

import base64
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from aurora_core.train import zero3

CHECKPOINT_FORMAT = 1


@dataclass
class TrainState:
    global_step: int = 0
    epochs_done: int = 0  # every row of the epochs before this one has been trained on
    consumed: dict[str, list[str]] = field(default_factory=dict)  # epoch -> row keys trained on, all ranks
    world_size: int = 1
    metrics: dict[str, float] = field(default_factory=dict)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py = random.getstate()
    return {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "cuda": [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
        if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py[0], list(py[1]), py[2]],
    }


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(s["torch"])), dtype=torch.uint8))
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(base64.b64decode(x)), dtype=torch.uint8)
                                      for x in s["cuda"]])
    n = s["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = s["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def save(engine, scheduler, state: TrainState, out: Path, rank: int, world: int) -> None:
    """Collective: every rank gathers; rank 0 writes ``out``."""
    import torch.distributed as dist

    params = zero3.gather_trainable(engine)
    moments = zero3.gather_optimizer(engine)
    rngs: list[Any] = [None] * world
    dist.all_gather_object(rngs, rng_state())
    if rank != 0:
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in params.items()}, str(out / "trainable.safetensors"))
    save_file({k: v.contiguous() for k, v in moments.items()}, str(out / "optimizer.safetensors"))
    meta = {"format": CHECKPOINT_FORMAT, "state": asdict(state), "optimizer_step": zero3.optimizer_step(engine),
            "scheduler": scheduler.state_dict() if scheduler is not None else None, "rng": rngs,
            "engine": {"global_steps": engine.global_steps, "global_samples": engine.global_samples}}
    (out / "state.json").write_text(json.dumps(meta))


def read_state(path: Path) -> TrainState:
    meta = json.loads((Path(path) / "state.json").read_text())
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {meta.get('format')}, this code reads {CHECKPOINT_FORMAT}")
    return TrainState(**meta["state"])


def load(engine, scheduler, path: Path, rank: int, world: int) -> TrainState:
    """Collective: restore parameters, optimizer, scheduler, this rank's RNG; return the state."""
    path = Path(path)
    meta = json.loads((path / "state.json").read_text())
    state = read_state(path)
    if state.world_size != world:
        raise ValueError(f"checkpoint {path} was written by {state.world_size} workers but this run has {world}: "
                         f"its epochs were cut to multiples of workers x batch; rerun with "
                         f"train.num_workers={state.world_size}")
    zero3.set_trainable(engine, load_file(str(path / "trainable.safetensors")))
    zero3.set_optimizer(engine, load_file(str(path / "optimizer.safetensors")), meta["optimizer_step"])
    if scheduler is not None and meta["scheduler"] is not None:
        scheduler.load_state_dict(meta["scheduler"])
    engine.global_steps = meta["engine"]["global_steps"]
    engine.global_samples = meta["engine"]["global_samples"]
    set_rng_state(meta["rng"][rank])
    return state
