"""Atomic directory output: build in a sibling staging directory, then swap it into place.

A reader therefore sees either the previous complete directory or the new complete one, never a
half-written one; a crash leaves only a ``*.tmp-<pid>`` directory that the next run removes.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(out.name + ".tmp-*"):  # left by a run that crashed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
