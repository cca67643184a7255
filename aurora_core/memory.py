"""Peak memory of this process: host RSS and, on a GPU, the CUDA allocator's peak. Logged by every
training step (the largest over ranks) so a real run shows how close it runs to its limits."""

from __future__ import annotations

import resource

import torch


def peak_mb() -> dict[str, float]:
    """``mem/peak_rss_mb`` (ru_maxrss: KiB on Linux) and, with CUDA, ``mem/peak_gpu_mb``."""
    out = {"mem/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["mem/peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def peak_mb_over_ranks() -> dict[str, float]:
    """:func:`peak_mb` of the fullest rank of the default process group (a collective)."""
    import torch.distributed as dist

    peaks = peak_mb()
    t = torch.tensor(list(peaks.values()), dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(peaks, t.tolist()))


def describe(peaks: dict[str, float]) -> str:
    gpu = f", GPU {peaks['mem/peak_gpu_mb']:.0f} MiB" if "mem/peak_gpu_mb" in peaks else ""
    return f"peak RSS {peaks['mem/peak_rss_mb']:.0f} MiB{gpu}"
