"""Process logging (aurora_core.logs): our records on the console, library noise only in the run's log file."""

from __future__ import annotations

import importlib
import logging
import warnings

import pytest

from aurora_core import logs


@pytest.fixture
def restore_root_logging():
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield
    for h in [h for h in root.handlers if h not in before]:
        root.removeHandler(h)
        h.close()
    root.setLevel(level)
    logging.captureWarnings(False)


def test_library_noise_goes_to_the_file_and_ours_to_the_console(tmp_path, capsys, restore_root_logging, monkeypatch):
    from transformers.utils import logging as hf_logging

    importlib.import_module("deepspeed")  # installs its own stdout handler, which setup detaches

    monkeypatch.delenv("AURORA_LOG_LEVEL", raising=False)
    path = logs.setup(tmp_path, "teacher", console_level="INFO")
    assert path == tmp_path / "logs" / "teacher.log"
    logging.getLogger("aurora_core.stages").info("our progress")
    hf_logging.get_logger("transformers.models.x").warning("a config notice")
    logging.getLogger("DeepSpeed").warning("unknown output type")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("torch.distributed.all_gather_into_tensor is deprecated", FutureWarning)
    logging.getLogger("filelock").error("a library error")  # any library: its errors reach the console
    err = capsys.readouterr()
    console = err.err + err.out
    assert "our progress" in console and "a library error" in console
    for noise in ("a config notice", "unknown output type", "all_gather_into_tensor"):
        assert noise not in console
    text = path.read_text()
    for line in ("our progress", "a config notice", "unknown output type", "all_gather_into_tensor", "a library error"):
        assert line in text
    assert "[teacher pid " in text

    logs.setup(tmp_path, "teacher", console_level="WARNING")  # a worker: its progress is printed lines
    logging.getLogger("aurora_core.train.loop").info("training from step 0")
    logging.getLogger("aurora_core.train.loop").warning("a worker warning")
    console = "".join(capsys.readouterr())
    assert "training from step 0" not in console and "a worker warning" in console
    assert len([h for h in logging.getLogger().handlers if getattr(h, "aurora", False)]) == 2  # replaced, not added


def test_progress_bars_only_on_a_terminal(monkeypatch):
    for k in ("RAY_TQDM", "RAY_DATA_LOG_LEVEL", "HF_HUB_DISABLE_PROGRESS_BARS", "RAY_COLOR_PREFIX"):
        monkeypatch.delenv(k, raising=False)
    assert logs.progress_env(interactive=False) == {"RAY_DATA_LOG_LEVEL": "WARNING", "RAY_TQDM": "0",
                                                    "HF_HUB_DISABLE_PROGRESS_BARS": "1", "RAY_COLOR_PREFIX": "0"}
    assert logs.progress_env(interactive=True) == {"RAY_DATA_LOG_LEVEL": "WARNING"}
    monkeypatch.setenv("RAY_DATA_LOG_LEVEL", "DEBUG")
    assert logs.progress_env(interactive=True)["RAY_DATA_LOG_LEVEL"] == "DEBUG"  # the user's choice wins
