"""Where each process's log records go: our own lines on the console, library noise in the run's log files.

Every process the pipeline starts (the driver, each Ray Train worker, each rollout, learner and
inference actor) calls :func:`setup` with its role:

- console (stderr; Ray forwards a worker's to the driver): aurora's records from ``AURORA_LOG_LEVEL``
  (INFO on the driver, WARNING in workers, whose progress reaches the console as printed lines), any
  other logger's only from ERROR up;
- ``<run>/logs/<role>.log`` (appended, each line with its pid): every record from INFO up, Python
  warnings included (DeepSpeed's calls of deprecated ``torch.distributed`` functions, transformers'
  config notices, DeepSpeed's per-module notes): the place to look when something goes wrong. What
  Ray itself prints (raylet, Ray Train's controller) stays in Ray's session logs
  (``/tmp/ray/session_latest/logs``).

transformers and DeepSpeed print through handlers of their own; :func:`adopt_library_loggers`
detaches them so their records reach the two above. Ray Data's progress bars are drawn only when the
driver's stderr is a terminal, and its INFO chatter is left out (:func:`progress_env`).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

OURS = ("aurora_core", "__main__")
_FORMAT = "%(asctime)s %(levelname)s [{role} pid %(process)d] %(name)s: %(message)s"


class _ConsoleFilter(logging.Filter):
    def __init__(self, ours_level: int):
        super().__init__()
        self.ours_level = ours_level

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name.split(".")[0] in OURS
        return record.levelno >= (self.ours_level if ours else logging.ERROR)


def setup(run_dir: Path | str | None, role: str, console_level: str = "INFO") -> Path | None:
    """Route this process's records (see the module docstring); returns the log file (None without a
    run directory). Replaces what an earlier call installed, so calling it again is harmless."""
    level = logging.getLevelName(os.environ.get("AURORA_LOG_LEVEL", console_level).upper())
    if not isinstance(level, int):
        raise ValueError(f"AURORA_LOG_LEVEL={os.environ.get('AURORA_LOG_LEVEL')!r} is not a logging level")
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "aurora", False) or _foreign_console(h)]:
        root.removeHandler(h)
        if getattr(h, "aurora", False):
            h.close()
    console = logging.StreamHandler(sys.stderr)
    console.addFilter(_ConsoleFilter(level))
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handlers: list[logging.Handler] = [console]
    path = None
    if run_dir is not None:
        path = Path(run_dir) / "logs" / f"{role}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(path, mode="a", encoding="utf-8")
        file.setLevel(logging.INFO)
        file.setFormatter(logging.Formatter(_FORMAT.format(role=role)))
        handlers.append(file)
    for h in handlers:
        h.aurora = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(min(logging.INFO, level))
    logging.captureWarnings(False)  # re-install: a test harness may have swapped warnings.showwarning since
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger -> the file
    adopt_library_loggers()
    return path


def _foreign_console(h: logging.Handler) -> bool:
    """A handler someone else put on the root that prints to this process's stdout or stderr (Ray
    Train gives its workers Ray's PlainRayHandler there, printing every record from INFO up). File
    handlers and in-memory ones (a test harness's) stay."""
    return (isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
            and getattr(h, "stream", None) in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__))


def adopt_library_loggers() -> None:
    """Detach the handlers transformers and DeepSpeed print through and let their records propagate
    to ours. DeepSpeed installs its handler when imported: call this again after importing it."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
        if not sys.stderr.isatty():  # "Loading weights" bars: a Ray worker's stderr is never a terminal
            hf_logging.disable_progress_bar()
    ds = logging.getLogger("DeepSpeed")
    for h in list(ds.handlers):
        ds.removeHandler(h)
    ds.propagate = True


def progress_env(interactive: bool) -> dict[str, str]:
    """Environment of every process for the libraries' progress output: Ray Data's INFO records
    ("Running Dataset ...", progress logged as lines) left out, and off a terminal no tqdm bars from
    Ray workers: Ray Data's (Ray Train's ingest actor draws them through Ray's distributed tqdm, cursor
    escapes and all, whatever the console; Ray Data then reports progress as INFO records) and
    transformers' "Loading weights" bars (huggingface_hub's switch, read when transformers is imported:
    a training worker imports it after :func:`setup`), nor the colour codes Ray wraps round the
    ``(RayTrainWorker pid=...)`` prefix of the workers' lines it prints (read by the driver at each
    line). Values the user set win."""
    env = {"RAY_DATA_LOG_LEVEL": "WARNING"}
    if not interactive:
        env["RAY_TQDM"] = "0"
        env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        env["RAY_COLOR_PREFIX"] = "0"
    return {k: os.environ.get(k, v) for k, v in env.items()}
