"""Ref-AVS evaluation metrics: J (mask IoU), F (max F-measure) and S (foreground on the null set).

The per-frame definitions follow the official GeWu-Lab/Ref-AVS code (``utils/metric/utility.py``):

* J: ``sigmoid(logit) > 0.4`` against the ground truth, intersection / (union + 1e-7); a frame
  with an empty ground truth scores its true-negative pixels / all its pixels.
* F: for frames with a non-empty ground truth, precision and recall of ``sigmoid(logit) >= t`` for
  ``t in linspace(0, 1 - 1e-10, 255)`` (float32, so the last threshold is exactly 1.0),
  F = 1.3 P R / (0.3 P + R) with NaN -> 0, averaged over frames; the score is the curve's maximum.
* S (``test_n`` only): sqrt(foreground pixels / all pixels) with ``sigmoid(logit) > 0.5``.

Two aggregations of these per-frame values are offered, and an evaluation reports both:

* ``official`` (:func:`refavs_protocol`, the default table): the benchmark's own test loop
  (``scripts/train.py: test()`` with ``DataLoader(batch_size=4, shuffle=False)`` in ``run_refavs.py``)
  runs a split in metadata order, computes J, F and S on each batch of 4 clips (40 frames), and
  reports the plain mean over batches. F is then the mean of per-batch maxima (a batch with no
  non-empty ground truth adds 0.0, as the official function returns there) and S the mean of
  per-batch square roots. Published Ref-AVS tables use this protocol.
* ``split``: every metric over all frames of the split at once (J the frame mean, F the maximum of
  the split-wide mean curve, S one square root over the split): independent of batch size and
  order. S split-wide is >= the mean of per-batch roots, F split-wide <= the mean of per-batch maxima.

Ground truth for scoring is prepared as the official loader does (:func:`official_gt_resize`): the
8-bit mask resized to 256 x 256 bilinearly, then ``> 0``; predictions are scored at 256 x 256.

**AVSBench** (S4 / MS3, OpenNLPLab ``avs_scripts/avs_s4|avs_ms3``): the same per-frame J and F
(``utils/utility.py: mask_iou, Eval_Fmeasure``) except that J thresholds at ``sigmoid > 0.5``
(:data:`AVS_J_THRESHOLD`); no S. Their ``test.py`` runs the test split in CSV order
(``shuffle=False``) with ``--test_batch_size 4`` (their ``test.sh``; the argparse default is 1 and
``config.py``'s ``BATCH_SIZE = 4`` is the training batch), computes mIoU and F per batch of 4 clips
x 5 frames and reports the plain mean over batches (``AverageMeter``): the ``official`` protocol
with 4 clips. Masks are scored at the size they are loaded, no resize (the release's 224 x 224;
:data:`AVS_SCORE_SIZE`). Frames without ground truth (S4 train) are left out of every metric.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

J_THRESHOLD = 0.4
S_THRESHOLD = 0.5
F_BETA2 = 0.3
F_NUM_THRESHOLDS = 255

_IOU_EPS = 1e-7
_PR_EPS = 1e-20
# Pixels processed per chunk: bounds the temporaries (sigmoid, bucket codes) for long splits.
_CHUNK_PIXELS = 1 << 22

OFFICIAL_BATCH_CLIPS = 4  # Ref-AVS run_refavs.py: DataLoader(batch_size=4, shuffle=False)
OFFICIAL_SIZE = 256  # Ref-AVS datasets/dataset_refavs.py: cv2.resize(mask, (256, 256))
PROTOCOLS = ("official", "split")

AVS_J_THRESHOLD = 0.5  # AVSBench utils/utility.py: mask_iou, (sigmoid(pred) > 0.5)
AVS_BATCH_CLIPS = 4  # AVSBench avs_s4|avs_ms3/test.sh: --test_batch_size 4, shuffle=False
AVS_SCORE_SIZE = 224  # AVSBench release frames and masks (scored as loaded, no resize)

TABLE_COLUMNS = ("Seen J", "Seen F", "Unseen J", "Unseen F", "Mix J", "Mix F", "Null S")
# shown after the Ref-AVS columns when a row has them: test_s structure rate and class accuracy, and
# the share of test_n answers that say the target is none (the null split's class accuracy)
EXTRA_COLUMNS = ("Struct", "Class", "None")


def _check_pred(pred: torch.Tensor) -> None:
    if not isinstance(pred, torch.Tensor):
        raise ValueError(f"pred must be a torch.Tensor, got {type(pred).__name__}")
    if pred.ndim != 3:
        raise ValueError(f"pred must have shape [N, H, W], got {tuple(pred.shape)}")
    if pred.numel() == 0:
        raise ValueError(f"pred is empty: shape {tuple(pred.shape)}")
    if not pred.is_floating_point():
        raise ValueError(f"pred must hold float logits, got dtype {pred.dtype}")


def _check_pair(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Validate a (logits, ground truth) pair; return the ground truth as bool on pred's device."""
    _check_pred(pred)
    if not isinstance(gt, torch.Tensor):
        raise ValueError(f"gt must be a torch.Tensor, got {type(gt).__name__}")
    if gt.shape != pred.shape:
        raise ValueError(f"pred and gt shapes differ: {tuple(pred.shape)} vs {tuple(gt.shape)}")
    gt = gt.to(pred.device)
    # The official code multiplies by the mask, so e.g. a 0/255 mask would silently give garbage.
    if gt.dtype != torch.bool and ((gt != 0) & (gt != 1)).any():
        raise ValueError("gt must be binary (values 0 and 1 only)")
    return gt.bool()


def _chunks(pred: torch.Tensor) -> Iterator[slice]:
    n, h, w = pred.shape
    step = max(1, _CHUNK_PIXELS // (h * w))
    for start in range(0, n, step):
        yield slice(start, start + step)


def _probs(pred: torch.Tensor) -> torch.Tensor:
    # float32 like the official code, so threshold comparisons round the same way.
    return torch.sigmoid(pred.float()).flatten(1)


def _iou_sum(pred: torch.Tensor, gt: torch.Tensor, threshold: float) -> float:
    """Sum over frames of the per-frame J."""
    num_pixels = pred.shape[1] * pred.shape[2]
    total = torch.zeros((), dtype=torch.float64, device=pred.device)
    for sl in _chunks(pred):
        fg = _probs(pred[sl]) > threshold
        g = gt[sl].flatten(1)
        inter = (fg & g).sum(1)
        union = (fg | g).sum(1)
        empty = ~g.any(1)
        inter = torch.where(empty, (~fg & ~g).sum(1), inter)
        union = torch.where(empty, torch.full_like(union, num_pixels), union)
        total += (inter.double() / (union.double() + _IOU_EPS)).sum()
    return total.item()


def _f_curve_sum(
    pred: torch.Tensor, gt: torch.Tensor, beta2: float, num_thresholds: int
) -> tuple[torch.Tensor, int]:
    """Sum of per-frame F curves (float64, CPU) over frames with non-empty gt, and their count."""
    thresholds = torch.linspace(0, 1 - 1e-10, num_thresholds).to(pred.device)
    buckets = num_thresholds + 1
    total = torch.zeros(num_thresholds, dtype=torch.float64, device=pred.device)
    count = 0
    for sl in _chunks(pred):
        g = gt[sl].flatten(1)
        keep = g.any(1)
        # Filtering per chunk avoids copying the whole split just to drop empty-gt frames.
        p, g = _probs(pred[sl])[keep], g[keep]
        c = p.shape[0]
        if c == 0:
            continue
        count += c
        # bucket[k] = number of thresholds <= p, so a pixel is predicted at threshold i iff i < k.
        # One histogram per (frame, gt value) replaces a [frames, thresholds, pixels] comparison.
        bucket = torch.searchsorted(thresholds, p, right=True)
        frame = torch.arange(c, device=p.device).unsqueeze(1)
        codes = bucket + buckets * g.long() + 2 * buckets * frame
        hist = torch.bincount(codes.flatten(), minlength=2 * buckets * c).view(c, 2, buckets)
        at_or_above = hist.flip(-1).cumsum(-1).flip(-1)[..., 1:]  # [c, gt value, threshold]
        tp = at_or_above[:, 1].float()
        n_pred = at_or_above.sum(1).float()
        n_gt = g.sum(1, keepdim=True).float()
        # float32 arithmetic in the official order; only the cross-frame sum is float64.
        prec = tp / (n_pred + _PR_EPS)
        rec = tp / (n_gt + _PR_EPS)
        f = (1 + beta2) * prec * rec / (beta2 * prec + rec)
        f = torch.where(torch.isnan(f), torch.zeros_like(f), f)
        total += f.double().sum(0)
    return total.cpu(), count


def _fg_count(pred: torch.Tensor, threshold: float) -> int:
    return sum(int((_probs(pred[sl]) > threshold).sum().item()) for sl in _chunks(pred))


def mask_iou(pred: torch.Tensor, gt: torch.Tensor, threshold: float = J_THRESHOLD) -> float:
    """J: frame-mean IoU of ``sigmoid(pred) > threshold``; empty-gt frames score the TN fraction."""
    gt = _check_pair(pred, gt)
    return _iou_sum(pred, gt, threshold) / pred.shape[0]


def f_measure(
    pred: torch.Tensor,
    gt: torch.Tensor,
    beta2: float = F_BETA2,
    num_thresholds: int = F_NUM_THRESHOLDS,
) -> float:
    """F: maximum of the F curve averaged over frames with non-empty gt (0.0 if there are none)."""
    gt = _check_pair(pred, gt)
    curve_sum, count = _f_curve_sum(pred, gt, beta2, num_thresholds)
    return (curve_sum / count).max().item() if count else 0.0


def null_s(pred: torch.Tensor, threshold: float = S_THRESHOLD) -> float:
    """S: sqrt(foreground pixels / all pixels) over the whole set, ``sigmoid(pred) > threshold``."""
    _check_pred(pred)
    return math.sqrt(_fg_count(pred, threshold) / pred.numel())


class SplitMetrics:
    """Accumulates J, F and S over batches without keeping masks; equals the one-shot functions."""

    def __init__(
        self,
        j_threshold: float = J_THRESHOLD,
        s_threshold: float = S_THRESHOLD,
        beta2: float = F_BETA2,
        num_thresholds: int = F_NUM_THRESHOLDS,
    ) -> None:
        self.j_threshold = j_threshold
        self.s_threshold = s_threshold
        self.beta2 = beta2
        self.num_thresholds = num_thresholds
        self.num_frames = 0
        self._iou_sum = 0.0
        self._f_sum = torch.zeros(num_thresholds, dtype=torch.float64)
        self._f_frames = 0
        self._fg_pixels = 0
        self._pixels = 0

    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        """Add a batch of logits [N, H, W] and binary ground truth [N, H, W]."""
        gt = _check_pair(pred, gt)
        self.num_frames += pred.shape[0]
        self._iou_sum += _iou_sum(pred, gt, self.j_threshold)
        f_sum, f_frames = _f_curve_sum(pred, gt, self.beta2, self.num_thresholds)
        self._f_sum += f_sum
        self._f_frames += f_frames
        self._fg_pixels += _fg_count(pred, self.s_threshold)
        self._pixels += pred.numel()

    def merge(self, other: "SplitMetrics") -> "SplitMetrics":
        """Add another accumulator's counts (e.g. gathered from other workers); returns self."""
        if (other.j_threshold, other.s_threshold, other.beta2, other.num_thresholds) != (
                self.j_threshold, self.s_threshold, self.beta2, self.num_thresholds):
            raise ValueError("cannot merge SplitMetrics with different thresholds")
        self.num_frames += other.num_frames
        self._iou_sum += other._iou_sum
        self._f_sum += other._f_sum
        self._f_frames += other._f_frames
        self._fg_pixels += other._fg_pixels
        self._pixels += other._pixels
        return self

    def to_state(self) -> dict:
        """Plain counts (JSON-able), e.g. to ship per-row accumulators out of Ray Data workers."""
        return {"thresholds": [self.j_threshold, self.s_threshold, self.beta2, self.num_thresholds],
                "num_frames": self.num_frames, "iou_sum": self._iou_sum, "f_sum": self._f_sum.tolist(),
                "f_frames": self._f_frames, "fg_pixels": self._fg_pixels, "pixels": self._pixels}

    @classmethod
    def from_state(cls, state: dict) -> "SplitMetrics":
        j, s, b, n = state["thresholds"]
        m = cls(j, s, b, int(n))
        m.num_frames, m._iou_sum = state["num_frames"], state["iou_sum"]
        m._f_sum = torch.tensor(state["f_sum"], dtype=torch.float64)
        m._f_frames, m._fg_pixels, m._pixels = state["f_frames"], state["fg_pixels"], state["pixels"]
        return m

    def compute(self) -> dict[str, float]:
        """Return ``{"J": ..., "F": ..., "S": ...}`` over everything added so far."""
        if self.num_frames == 0:
            raise ValueError("SplitMetrics.compute() called before any update()")
        f = (self._f_sum / self._f_frames).max().item() if self._f_frames else 0.0
        return {
            "J": self._iou_sum / self.num_frames,
            "F": f,
            "S": math.sqrt(self._fg_pixels / self._pixels),
        }


def official_gt_resize(masks: torch.Tensor, size: int = OFFICIAL_SIZE) -> torch.Tensor:
    """Ground-truth masks [T, H, W] (0/255 or 0/1 uint8, or bool) -> bool [T, size, size], as the
    official loader prepares them: ``cv2.resize(mask, (256, 256))`` (INTER_LINEAR on the 8-bit PNG)
    then ``> 0``.

    Same arithmetic, not cv2 itself (not a dependency): bilinear with half-pixel centres and no
    antialiasing is what cv2's INTER_LINEAR computes; cv2 then rounds to uint8, so a pixel is
    foreground iff the interpolated 0..255 value is >= 0.5. Measured against opencv-python-headless
    5.0.0 on 2,000 random 0/255 masks of 24..720 x 24..1280 px (``bench/official_gt_resize.py``):
    0 of 131,072,000 pixels differ (a plain ``> 0`` on the float interpolation: 3,235 differ).
    Our shards store masks as 0/255 (any channel > 0 of the released PNG), which is what the
    release's 0/255 masks hold; a release mask with another foreground value (e.g. 1) would resize
    differently in the official loader.
    """
    m = masks.to(torch.uint8)
    if int(m.max()) <= 1:
        m = m * 255  # our shards store 0/255; a 0/1 mask is read as the 0/255 PNG it stands for
    if tuple(m.shape[-2:]) == (size, size):
        return m > 0
    v = F.interpolate(m[:, None].float(), size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return v[:, 0] >= 0.5


def score_logits(logits: torch.Tensor, size: int = OFFICIAL_SIZE) -> torch.Tensor:
    """Mask logits [T, h, w] at the model's resolution -> [T, size, size] for scoring (bilinear,
    as LISA/AURORA upsample the SAM decoder's low-resolution logits)."""
    if tuple(logits.shape[-2:]) == (size, size):
        return logits
    return F.interpolate(logits[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def _split_keys(split: str) -> tuple[str, ...]:
    return ("S",) if split == "test_n" else ("J", "F")


def protocol_from_rows(rows: Sequence[SplitMetrics], split: str, protocol: str = "official",
                       batch_clips: int = OFFICIAL_BATCH_CLIPS) -> dict[str, float]:
    """J/F (or S for ``test_n``) from per-row accumulators given **in metadata order**.

    ``official``: consecutive batches of ``batch_clips`` rows (the last may be short), the metrics of
    each batch's frames, the plain mean over batches. ``split``: all rows' frames at once.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; one of {', '.join(PROTOCOLS)}")
    if not rows:
        raise ValueError(f"no rows to score for split {split}")
    keys = _split_keys(split)
    step = len(rows) if protocol == "split" else batch_clips
    if step < 1:
        raise ValueError(f"batch_clips must be >= 1, got {batch_clips}")
    per_batch = []
    for start in range(0, len(rows), step):
        acc = SplitMetrics(rows[start].j_threshold, rows[start].s_threshold, rows[start].beta2,
                           rows[start].num_thresholds)
        for r in rows[start:start + step]:
            acc.merge(r)
        per_batch.append(acc.compute())
    return {k: sum(b[k] for b in per_batch) / len(per_batch) for k in keys}


def refavs_protocol(pred_logits: Sequence[torch.Tensor], gts: Sequence[torch.Tensor], split: str,
                    batch_clips: int = OFFICIAL_BATCH_CLIPS) -> dict[str, float]:
    """The official Ref-AVS test protocol. ``pred_logits`` / ``gts``: one ``[T, H, W]`` tensor per row
    **in metadata order** (logits before sigmoid / binary ground truth). Returns ``{"J", "F"}``, or
    ``{"S"}`` for ``test_n``; see the module docstring."""
    if len(pred_logits) != len(gts):
        raise ValueError(f"{len(pred_logits)} predictions but {len(gts)} ground truths")
    rows = []
    for p, g in zip(pred_logits, gts):
        m = SplitMetrics()
        m.update(p, g)
        rows.append(m)
    return protocol_from_rows(rows, split, "official", batch_clips)


def _metric(results: Mapping[str, Mapping[str, float]], split: str, key: str) -> float | None:
    value = (results.get(split) or {}).get(key)
    return None if value is None or math.isnan(value) else float(value)


def refavs_table(results: Mapping[str, Mapping[str, float]]) -> dict[str, float | None]:
    """Build one Ref-AVS table row from per-split ``{"J", "F", "S"}`` dicts keyed by split name.

    Seen from ``test_s``, Unseen from ``test_u``, Mix = mean of the two, Null S from ``test_n``;
    anything missing is None.
    """
    row: dict[str, float | None] = {
        "Seen J": _metric(results, "test_s", "J"),
        "Seen F": _metric(results, "test_s", "F"),
        "Unseen J": _metric(results, "test_u", "J"),
        "Unseen F": _metric(results, "test_u", "F"),
    }
    for m in ("J", "F"):
        seen, unseen = row[f"Seen {m}"], row[f"Unseen {m}"]
        row[f"Mix {m}"] = None if seen is None or unseen is None else (seen + unseen) / 2
    row["Null S"] = _metric(results, "test_n", "S")
    return row


def avsbench_table(results: Mapping[str, Mapping[str, float]]) -> dict[str, float | None]:
    """One AVSBench table row from ``{subset: {"J", "F"}}`` (the test split of each subset):
    ``S4 mIoU``, ``S4 F``, ``MS3 mIoU``, ``MS3 F``; anything missing is None."""
    row: dict[str, float | None] = {}
    for subset in ("s4", "ms3"):
        row[f"{subset.upper()} mIoU"] = _metric(results, subset, "J")
        row[f"{subset.upper()} F"] = _metric(results, subset, "F")
    return row


AVS_COLUMNS = ("S4 mIoU", "S4 F", "MS3 mIoU", "MS3 F")


def _cell(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"


def format_table(rows: Mapping[str, Mapping[str, float | None]], title: str | None = None,
                 columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """Render rows from :func:`refavs_table` (or :func:`avsbench_table` with ``columns=AVS_COLUMNS``),
    keyed by model/stage name, as a fixed-width table under ``title`` if given (say which protocol
    it shows)."""
    name_width = max([len("Model"), *(len(name) for name in rows)])
    columns = tuple(columns) + tuple(c for c in EXTRA_COLUMNS if any(r.get(c) is not None for r in rows.values()))
    widths = [max(len(col), 5) for col in columns]

    def line(name: str, cells: list[str]) -> str:
        return "  ".join([name.ljust(name_width), *(c.rjust(w) for c, w in zip(cells, widths))])

    header = line("Model", list(columns))
    lines = ([title] if title else []) + [header, "-" * len(header)]
    for name, row in rows.items():
        lines.append(line(name, [_cell(row.get(col)) for col in columns]))
    return "\n".join(lines)
