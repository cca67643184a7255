"""Reading the per-rank sample logs back: which rows (row keys) each epoch trained on (for audits and tests).

A restart from a checkpoint rewrites the steps after it, so for every (rank, step) the record
written last is the one whose gradient survived.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path


def committed_samples(stage_dir: Path) -> dict[int, Counter]:
    """epoch -> Counter(row key -> times trained) over all ranks."""
    last: dict[tuple[str, int], dict] = {}
    for f in sorted((Path(stage_dir) / "sample_log").glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            if "step" in rec:
                last[(f.stem, rec["step"])] = rec
    out: dict[int, Counter] = defaultdict(Counter)
    for rec in last.values():
        for key, epoch in rec["rows"]:
            out[epoch][key] += 1
    return dict(out)


def restarts(stage_dir: Path) -> list[int]:
    """The global steps at which rank 0's worker (re)started."""
    f = Path(stage_dir) / "sample_log" / "rank0.jsonl"
    return [json.loads(x)["start_step"] for x in f.read_text().splitlines() if '"start_step"' in x]
