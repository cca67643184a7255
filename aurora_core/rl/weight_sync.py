"""Weight sync by collective broadcast: learner rank 0 sends the trainable weights to every rollout
actor over a process group of their own (NCCL when all members have GPUs, gloo otherwise).

Why a group built by hand from a TCPStore: the rollout actors are not ranks of the learner's
torch.distributed world, and ``torch.distributed.new_group`` only groups ranks of one world. The group
lives beside the learner's ZeRO-3 group and is rebuilt (new store port) whenever its membership changes:
a rollout actor replaced, a learner group restarted.

The weights travel as one flat tensor in the order of a :class:`Manifest` that rank 0 sends once at
group opening; each side checks a checksum of the buffer so that a corrupted or misordered transfer
fails the step instead of training on garbage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def backend(g) -> str:
    return "nccl" if g.use_gpu and g.gpus_per_actor > 0 else "gloo"


def sync_mode(g) -> str:
    """``broadcast`` or ``object_store`` for a GRPO config (``auto``: broadcast when everything is on GPUs)."""
    if g.weight_sync != "auto":
        return g.weight_sync
    return "broadcast" if backend(g) == "nccl" else "object_store"


@dataclass
class Manifest:
    names: list[str]
    shapes: list[list[int]]
    dtype: str  # wire dtype: the learner's compute dtype (bf16 on GPUs halves the bytes)

    @property
    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]


class BroadcastGroup:
    """One member of the sync group; rank 0 (learner rank 0) hosts the store and sends."""

    def __init__(self, host: str, port: int, rank: int, world: int, backend: str, timeout_s: int):
        import torch.distributed as dist

        self.rank, self.world, self.backend = rank, world, backend
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        timeout = timedelta(seconds=timeout_s)
        # the store must outlive the group's rendezvous: keep a reference
        self.store = dist.TCPStore(host, port, world, is_master=rank == 0, timeout=timeout)
        cls = dist.ProcessGroupNCCL if backend == "nccl" else dist.ProcessGroupGloo
        self.pg = cls(self.store, rank, world, timeout)

    def gpu_uuid(self) -> str | None:
        return str(torch.cuda.get_device_properties(self.device).uuid) if self.backend == "nccl" else None

    def send(self, weights: dict[str, torch.Tensor], manifest: Manifest) -> float:
        """Rank 0: broadcast ``weights`` packed in manifest order; returns the buffer's checksum."""
        if set(weights) != set(manifest.names):
            raise ValueError(f"weights and manifest differ: {sorted(set(weights) ^ set(manifest.names))[:3]}")
        dtype = DTYPES[manifest.dtype]
        flat = torch.cat([weights[n].reshape(-1).to(dtype) for n in manifest.names]).to(self.device)
        self.pg.broadcast(flat, 0).wait()
        return checksum(flat)

    def receive(self, manifest: Manifest) -> tuple[dict[str, torch.Tensor], float]:
        """Ranks > 0: the broadcast weights by name (views of one buffer) and the buffer's checksum."""
        flat = torch.empty(sum(manifest.sizes), dtype=DTYPES[manifest.dtype], device=self.device)
        self.pg.broadcast(flat, 0).wait()
        parts = flat.split(manifest.sizes)
        return {n: t.view(shape) for n, t, shape in zip(manifest.names, parts, manifest.shapes)}, checksum(flat)


def checksum(flat: torch.Tensor, pieces: int = 64) -> float:
    """Sums of consecutive slices weighted by their position, so a misordered buffer does not pass as
    the same; slice by slice, so it needs no buffer-sized temporary on the sync path."""
    return float(sum(k * piece.sum(dtype=torch.float64) for k, piece in enumerate(flat.chunk(pieces), 1)))
