"""Weight sync after each GRPO step, behind one object (:class:`WeightSync`: ``push(version)``): the
learner's trainable weights go to every rollout actor either through the object store (one ray.put
read by every actor) or by collective broadcast: learner rank 0 sends them over a process group of
their own (NCCL when all members have GPUs, gloo otherwise).

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


class WeightSync:
    """The learner -> rollout actors weight push of a GRPO run (``grpo.weight_sync``)."""

    def __init__(self, cfg, learner, pool):
        from aurora_core.rl.learner import learner_get

        self.cfg, self.learner, self.pool = cfg, learner, pool
        self.mode = sync_mode(cfg.grpo)
        manifest = learner_get([learner.workers[0].sync_manifest.remote()])[0]
        # what every push sends to each rollout actor (logged as sync/payload_mb)
        self.payload_bytes = sum(manifest.sizes) * DTYPES[manifest.dtype].itemsize
        if self.mode == "broadcast":  # a replacement actor reads the current weights from rank 0
            pool.weights_source = lambda version: learner.workers[0].weights_of.remote(version)

    def push(self, version: int) -> None:
        """Gather the trainable weights once (a collective over the learner ranks), then broadcast them
        from learner rank 0 to every rollout actor, or leave them in the object store (rank 0's return
        value: never copied into the driver) and point every actor at them."""
        import ray

        from aurora_core.rl.learner import learner_call, learner_get

        if self.mode == "broadcast":
            if self.pool.group_stale:
                self._open_group()
            refs = self.learner.broadcast_weights(version)
            # the ranks and the actors awaited together: a member lost mid-broadcast fails its peers'
            # collective too, and learner_get tells that from a bug (a death restarts the loop)
            got = learner_get([*refs, *self.pool.receive(version)])
            sent, received = got[0], got[len(refs):]
            bad = [i for i, d in enumerate(received) if abs(d - sent) > 1e-9 * max(1.0, abs(sent))]
            if bad:
                raise RuntimeError(f"weight broadcast of version {version} arrived corrupted at rollout actor(s) "
                                   f"{bad} (checksum {[received[i] for i in bad]} != {sent})")
            return
        refs = self.learner.gather_weights(wire=True)
        ray.wait(refs, num_returns=len(refs), fetch_local=False)
        learner_get(refs[1:])  # ranks > 0 return None; raises if one died
        learner_call(self.pool.push, refs[0], version)

    def _open_group(self) -> None:
        """(Re)build the broadcast group: learner rank 0 + the current rollout actors, on a fresh port."""
        import logging
        import time

        from aurora_core.rl.learner import learner_get

        g = self.cfg.grpo
        rank0 = self.learner.workers[0]
        host, port = learner_get([rank0.address.remote()])[0]
        manifest = learner_get([rank0.sync_manifest.remote()])[0]
        t0 = time.time()
        first = rank0.open_sync_group.remote(host, port, len(self.pool.actors) + 1, backend(g), g.sync_timeout_s)
        members = self.pool.open_group(host, port, backend(g), g.sync_timeout_s, manifest)
        gpus = learner_get([first, *members])
        if backend(g) == "nccl" and len(set(gpus)) < len(gpus):
            raise ValueError("grpo.weight_sync=broadcast over NCCL needs learner rank 0 and every rollout actor "
                             "on a GPU of its own (some share one); use whole grpo.gpus_per_actor or "
                             "grpo.weight_sync=object_store")
        logging.getLogger(__name__).info("weight-sync group (%s) of %d members open in %.1fs", backend(g),
                                         len(gpus), time.time() - t0)
