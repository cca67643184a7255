"""MLflow tracking: one experiment per pipeline run, a parent run for the pipeline, a child per stage.

The store is a sqlite file in the run directory (``<run>/mlflow.db``, artifacts in ``<run>/mlartifacts``)
unless ``MLFLOW_TRACKING_URI`` is set. Paths are absolute because Ray workers run in another working
directory. Runs are found again by tags, so a resumed pipeline or stage keeps logging into the same
MLflow run.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

PARENT_TAG = "aurora.pipeline"
STAGE_TAG = "aurora.stage"
RUN_TAG = "aurora.run_name"


def tracking_uri(run_dir: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(run_dir).resolve()}/mlflow.db"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(uri: str, name: str, run_dir: Path) -> str:
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:"):  # keep artifacts beside the store, by absolute path
        location = (Path(run_dir).resolve() / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def _find(client, exp_id: str, tags: Mapping[str, str], parent: str | None = None):
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    if parent:
        query += f" and tags.`mlflow.parentRunId` = '{parent}'"
    runs = client.search_runs([exp_id], filter_string=query, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


class Tracker:
    """Driver side: opens (or reopens) the pipeline's parent run and the stages' child runs."""

    def __init__(self, run_dir: Path, run_name: str, experiment: str | None = None, enabled: bool = True):
        self.enabled = enabled
        self.uri = tracking_uri(run_dir)
        self.run_dir = Path(run_dir)
        self.run_name = run_name
        self.experiment = experiment or f"aurora-{run_name}"
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.exp_id = ensure_experiment(self.uri, self.experiment, self.run_dir)

    def parent(self, pipeline: str, params: Mapping[str, Any] | None = None) -> str | None:
        """The pipeline's run: the unfinished one of a resumed pipeline, else a new one."""
        return self._open({PARENT_TAG: pipeline, RUN_TAG: self.run_name}, None, f"{self.run_name}:{pipeline}", params)

    def stage(self, parent_id: str | None, stage: str, params: Mapping[str, Any] | None = None) -> str | None:
        """The stage's child run: the unfinished one if the stage is being resumed, else a new one."""
        return self._open({STAGE_TAG: stage, RUN_TAG: self.run_name}, parent_id, f"{self.run_name}:{stage}", params)

    def _open(self, tags: dict[str, str], parent_id: str | None, name: str,
              params: Mapping[str, Any] | None) -> str | None:
        if not self.enabled:
            return None
        client = _client(self.uri)
        found = _find(client, self.exp_id, tags)
        if found is not None and found.info.status != "FINISHED":
            client.update_run(found.info.run_id, status="RUNNING")
            return found.info.run_id
        run_tags = dict(tags)
        if parent_id:
            run_tags["mlflow.parentRunId"] = parent_id
        run = client.create_run(self.exp_id, tags=run_tags, run_name=name)
        if params:
            _log_params(client, run.info.run_id, params)
        return run.info.run_id

    def finish(self, run_id: str | None, status: str = "FINISHED") -> None:
        if self.enabled and run_id:
            _client(self.uri).set_terminated(run_id, status=status)


def _log_params(client, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


class RunLogger:
    """Logs metrics and artifacts into one run; a no-op when run_id is None (tracking off, rank > 0)."""

    def __init__(self, uri: str | None, run_id: str | None):
        self.run_id = run_id
        self.client = _client(uri) if (uri and run_id) else None

    def __bool__(self) -> bool:
        return self.client is not None

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        if not self.client:
            return
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ms = [Metric(k, float(v), ts, step) for k, v in values.items() if v is not None]
        self.client.log_batch(self.run_id, metrics=ms)

    def text(self, text: str, name: str) -> None:
        if self.client:
            self.client.log_text(self.run_id, text, name)

    def json(self, obj: Any, name: str) -> None:
        self.text(json.dumps(obj, indent=1, default=str), name)

    def png(self, data: bytes, name: str) -> None:
        if not self.client:
            return
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / Path(name).name
            p.write_bytes(data)
            self.client.log_artifact(self.run_id, str(p), str(Path(name).parent) if "/" in name else None)

    def params(self, values: Mapping[str, Any]) -> None:
        if self.client:
            _log_params(self.client, self.run_id, values)

    def tag(self, key: str, value: str) -> None:
        if self.client:
            self.client.set_tag(self.run_id, key, value)


OVERLAY_FRAME_PX = 256  # each frame of an overlay is upscaled to this side (the tiny default's are 64 px)
PRED_RGB, GT_RGB = (255, 0, 255), (0, 255, 0)  # magenta and green: rare in the frames


def mask_overlay_png(frames, pred_logits, gt, *, expression: str = "", answer: str = "", iou: float | None = None,
                     max_frames: int = 5, threshold: float = 0.4, frame_px: int = OVERLAY_FRAME_PX) -> bytes:
    """A picture of a clip for MLflow: up to ``max_frames`` frames side by side, each upscaled to
    ``frame_px``, the predicted mask filled in magenta, the ground truth outlined in green, under a
    caption with the expression, the answer and the clip's IoU, and a legend.

    frames uint8 [T, 3, S, S]; pred_logits float [T, S, S]; gt {0,1} [T, S, S].
    """
    import textwrap

    import torch
    import torch.nn.functional as F
    from PIL import Image, ImageDraw, ImageFont

    t = frames.shape[0]
    idx = torch.linspace(0, t - 1, min(max_frames, t)).round().long()
    size = (frame_px, frame_px)
    f = F.interpolate(frames[idx].float(), size=size, mode="bilinear", align_corners=False)
    pred = F.interpolate((torch.sigmoid(pred_logits[idx].float()) > threshold).float()[:, None], size=size)
    g = F.interpolate(gt[idx].float()[:, None], size=size)  # nearest: masks stay binary
    k = max(3, frame_px // 64 * 2 + 1)  # outline width ~ frame_px / 64 px on each side of the edge
    def outline(m: torch.Tensor, width: int) -> torch.Tensor:  # dilated minus eroded
        return (F.max_pool2d(m, width, 1, width // 2) + F.max_pool2d(-m, width, 1, width // 2)).clamp(0, 1)

    p_rgb, g_rgb = (torch.tensor(c, dtype=torch.float32).view(1, 3, 1, 1) for c in (PRED_RGB, GT_RGB))
    img = f * (1 - 0.5 * pred) + p_rgb * 0.5 * pred
    p_edge = outline(pred, 3)
    img = img * (1 - p_edge) + p_rgb * p_edge
    edge = outline(g, k)
    img = img * (1 - edge) + g_rgb * edge
    strip = torch.cat(list(img), dim=2).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()

    font = ImageFont.load_default(size=max(12, frame_px // 16))
    line_h = int(font.size * 1.35)
    width = strip.shape[1]
    chars = max(20, int(width / (font.size * 0.55)))
    lines = (textwrap.wrap(f"expression: {expression or '-'}", chars)
             + textwrap.wrap(f"answer: {answer or '-'}", chars, max_lines=4, placeholder=" ...")
             + [f"IoU (J) {iou:.3f}" if iou is not None else "IoU (J) -"])
    band = line_h * (len(lines) + 1) + 8
    canvas = Image.new("RGB", (width, band + frame_px), "white")
    canvas.paste(Image.fromarray(strip), (0, band))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((6, 4 + i * line_h), line, fill="black", font=font)
    y, x = 4 + len(lines) * line_h, 6  # legend
    s = font.size
    draw.rectangle([x, y, x + s, y + s], fill=PRED_RGB)
    x += s + 6
    draw.text((x, y), "prediction", fill="black", font=font)
    x += int(draw.textlength("prediction", font=font)) + 18
    draw.rectangle([x, y, x + s, y + s], outline=GT_RGB, width=3)
    x += s + 6
    draw.text((x, y), "ground truth", fill="black", font=font)
    for j, fr in enumerate(idx.tolist()):
        draw.text((j * frame_px + 4, band + 2), f"frame {fr}", fill="white", font=font, stroke_width=2,
                  stroke_fill="black")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()
