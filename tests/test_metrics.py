"""Ref-AVS metrics on hand-computed cases, against a per-threshold reference, and the table."""

from __future__ import annotations

import math

import pytest
import torch

from aurora_core import metrics
from aurora_core.metrics import (
    SplitMetrics,
    f_measure,
    format_table,
    mask_iou,
    null_s,
    refavs_table,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))]

P, N = 5.0, -5.0  # logits clearly above / below every threshold used here


def t(rows: list) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# ---------------------------------------------------------------- J


def test_iou_single_frame():
    # pred fg = left column, gt = top row: inter 1, union 3.
    pred = t([[[P, N], [P, N]]])
    gt = t([[[1, 1], [0, 0]]])
    assert mask_iou(pred, gt) == pytest.approx(1 / 3)


@pytest.mark.parametrize("device", DEVICES)
def test_iou_two_frames_with_empty_gt(device):
    pred = t([
        [[P, P, N], [P, P, N], [N, N, N]],  # 4 fg pixels
        [[P, N, N], [N, N, N], [N, N, P]],  # 2 fg pixels
    ]).to(device)
    gt = torch.tensor([
        [[0, 1, 1], [0, 1, 1], [0, 1, 1]],  # 6 gt pixels, overlap 2 -> 2 / (4 + 6 - 2)
        [[0, 0, 0], [0, 0, 0], [0, 0, 0]],  # empty gt -> TN fraction 7 / 9
    ], dtype=torch.uint8, device=device)
    assert mask_iou(pred, gt) == pytest.approx((2 / 8 + 7 / 9) / 2)


def test_iou_empty_gt_is_true_negative_fraction():
    pred = t([[[N, N], [N, P]]])
    gt = torch.zeros(1, 2, 2, dtype=torch.bool)
    assert mask_iou(pred, gt) == pytest.approx(3 / 4)


def test_iou_threshold_is_strict():
    # logit 0 -> sigmoid exactly 0.5: above the default 0.4, not above 0.5.
    pred = t([[[0.0, N]]])
    gt = t([[[1, 0]]])
    assert mask_iou(pred, gt) == pytest.approx(1.0)
    assert mask_iou(pred, gt, threshold=0.5) == pytest.approx(0.0)


# ---------------------------------------------------------------- F

# Frame A: sigmoid ~[0.95, 0.5, 0.05, 0.05], gt = first pixel. With thresholds [0, 0.5, 1.0]:
#   t=0:   4 predicted, TP 1 -> P=1/4, R=1 -> F = 1.3*0.25/(0.075+1) = 0.325/1.075
#   t=0.5: 2 predicted (0.5 >= 0.5), TP 1 -> P=1/2, R=1 -> F = 0.65/1.15 = 13/23
#   t=1:   nothing predicted -> 0/0 -> 0
FRAME_A = ([[3.0, 0.0], [-3.0, -3.0]], [[1, 0], [0, 0]])
CURVE_A = [0.325 / 1.075, 0.65 / 1.15, 0.0]
# Frame B: sigmoid ~[0.95, 0.95, 0.05, 0.05], gt = all four pixels:
#   t=0: P=1, R=1 -> 1;  t=0.5: P=1, R=1/2 -> 0.65/0.8;  t=1: 0
FRAME_B = ([[3.0, 3.0], [-3.0, -3.0]], [[1, 1], [1, 1]])
CURVE_B = [1.0, 0.65 / 0.8, 0.0]


def test_f_thresholds_are_inclusive():
    pred, gt = t([FRAME_A[0]]), t([FRAME_A[1]])
    # With a strict ">" at 0.5 the answer would be 1.0.
    assert f_measure(pred, gt, num_thresholds=3) == pytest.approx(13 / 23)


def test_f_is_max_of_frame_averaged_curve():
    pred = t([FRAME_A[0], FRAME_B[0], [[P, P], [P, P]]])
    gt = t([FRAME_A[1], FRAME_B[1], [[0, 0], [0, 0]]])  # third frame: empty gt, skipped
    expected = max((a + b) / 2 for a, b in zip(CURVE_A, CURVE_B))  # = (13/23 + 0.8125) / 2
    assert f_measure(pred, gt, num_thresholds=3) == pytest.approx(expected)
    # Not the mean of per-frame maxima ((13/23 + 1) / 2).
    assert expected != pytest.approx((13 / 23 + 1) / 2)


def test_f_default_thresholds_perfect_prediction():
    # Any threshold in (sigmoid(-5), sigmoid(5)] separates the mask exactly -> F = 1.
    assert f_measure(t([[[P, N]]]), t([[[1, 0]]])) == pytest.approx(1.0)


def test_f_all_empty_gt_is_zero():
    pred = t([[[P, N]], [[N, P]]])
    assert f_measure(pred, torch.zeros(2, 1, 2)) == 0.0


def _reference_f(pred: torch.Tensor, gt: torch.Tensor, num: int = 255) -> float:
    """Straight per-frame, per-threshold loop following the official definition."""
    thresholds = torch.linspace(0, 1 - 1e-10, num)
    curves = []
    for p, g in zip(torch.sigmoid(pred), gt.float()):
        if g.sum() == 0:
            continue
        curve = torch.zeros(num)
        for i, th in enumerate(thresholds):
            y = (p >= th).float()
            tp = (y * g).sum()
            prec, rec = tp / (y.sum() + 1e-20), tp / (g.sum() + 1e-20)
            f = 1.3 * prec * rec / (0.3 * prec + rec)
            curve[i] = 0.0 if torch.isnan(f) else f
        curves.append(curve)
    return torch.stack(curves).mean(0).max().item()


@pytest.mark.parametrize("device", DEVICES)
def test_f_matches_threshold_loop_across_chunks(monkeypatch, device):
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(7, 8, 8, generator=gen) * 3
    gt = torch.rand(7, 8, 8, generator=gen) > 0.6
    gt[2] = False  # an empty frame in the middle of a chunk
    expected = _reference_f(pred, gt)
    # Two frames per chunk, so chunk boundaries and a ragged last chunk are exercised.
    monkeypatch.setattr(metrics, "_CHUNK_PIXELS", 2 * 8 * 8)
    assert f_measure(pred.to(device), gt.to(device)) == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------- S


def test_null_s_threshold_is_strict():
    # sigmoid: ~0.73, 0.5, 0.5, ~0.27 -> only one pixel is > 0.5 -> sqrt(1/4).
    assert null_s(t([[[1.0, 0.0], [0.0, -1.0]]])) == pytest.approx(0.5)


def test_null_s_single_root_over_the_set():
    pred = t([[[P, P], [P, P]], [[N, N], [N, N]]])
    # 4 fg of 8 pixels -> sqrt(0.5); the mean of per-frame roots would be (1 + 0) / 2.
    assert null_s(pred) == pytest.approx(math.sqrt(0.5))
    assert null_s(pred) != pytest.approx(0.5)


# ---------------------------------------------------------------- accumulator


@pytest.mark.parametrize("device", DEVICES)
def test_split_metrics_equals_one_shot(device):
    gen = torch.Generator().manual_seed(1)
    preds = [torch.randn(n, 16, 16, generator=gen) * 2 for n in (3, 5, 1, 2)]
    gts = [torch.rand(p.shape, generator=gen) > 0.7 for p in preds]
    gts[1][0] = False
    gts[3][:] = False  # a whole batch without any non-empty gt
    acc = SplitMetrics()
    for p, g in zip(preds, gts):
        acc.update(p.to(device), g.to(device))
    pred, gt = torch.cat(preds), torch.cat(gts)
    got = acc.compute()
    assert acc.num_frames == 11
    assert got["J"] == pytest.approx(mask_iou(pred, gt), rel=1e-12)
    assert got["F"] == pytest.approx(f_measure(pred, gt), rel=1e-12)
    assert got["S"] == pytest.approx(null_s(pred), rel=1e-12)


def test_split_metrics_hand_values():
    acc = SplitMetrics(j_threshold=0.5)
    acc.update(t([FRAME_A[0]]), t([FRAME_A[1]]))
    acc.update(t([FRAME_B[0]]), t([FRAME_B[1]]))
    got = acc.compute()
    # J at 0.5: A predicts pixel 0 only -> 1/1; B predicts the top row -> 2/4.
    assert got["J"] == pytest.approx((1.0 + 0.5) / 2)
    # S at 0.5: 1 + 2 fg pixels out of 8.
    assert got["S"] == pytest.approx(math.sqrt(3 / 8))
    # 255 thresholds, for t in (0.5, sigmoid(3)]: A predicts pixel 0 only -> F=1, B the top
    # row -> P=1, R=1/2 -> 0.65/0.8; no other threshold range averages higher.
    assert got["F"] == pytest.approx((1.0 + 0.65 / 0.8) / 2)


def test_split_metrics_compute_before_update():
    with pytest.raises(ValueError, match="before any update"):
        SplitMetrics().compute()


# ---------------------------------------------------------------- table


def test_refavs_table():
    row = refavs_table({
        "test_s": {"J": 0.6, "F": 0.7, "S": 0.9},
        "test_u": {"J": 0.4, "F": 0.5},
        "test_n": {"J": 0.99, "F": 0.0, "S": 0.2},
    })
    assert row == pytest.approx({
        "Seen J": 0.6, "Seen F": 0.7, "Unseen J": 0.4, "Unseen F": 0.5,
        "Mix J": 0.5, "Mix F": 0.6, "Null S": 0.2,
    })


def test_refavs_table_missing_splits():
    row = refavs_table({"test_s": {"J": 0.6, "F": float("nan")}})
    assert row == {
        "Seen J": 0.6, "Seen F": None, "Unseen J": None, "Unseen F": None,
        "Mix J": None, "Mix F": None, "Null S": None,
    }


def test_format_table():
    rows = {
        "teacher": refavs_table({
            "test_s": {"J": 0.6, "F": 0.7}, "test_u": {"J": 0.4, "F": 0.5}, "test_n": {"S": 0.2},
        }),
        "sft-long-name": refavs_table({"test_s": {"J": 0.61234, "F": 0.75}}),
    }
    assert format_table(rows) == "\n".join([
        "Model          Seen J  Seen F  Unseen J  Unseen F  Mix J  Mix F  Null S",
        "-----------------------------------------------------------------------",
        "teacher         0.600   0.700     0.400     0.500  0.500  0.600   0.200",
        "sft-long-name   0.612   0.750         -         -      -      -       -",
    ])


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("fn", [mask_iou, f_measure])
@pytest.mark.parametrize("pred, gt, match", [
    (torch.zeros(2, 2), torch.zeros(2, 2), r"shape \[N, H, W\]"),
    (torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), r"shape \[N, H, W\]"),
    (torch.zeros(0, 2, 2), torch.zeros(0, 2, 2), "empty"),
    (torch.zeros(1, 2, 2), torch.zeros(1, 2, 3), "shapes differ"),
    (torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2), "float logits"),
    (torch.zeros(1, 2, 2), torch.full((1, 2, 2), 255, dtype=torch.uint8), "binary"),
])
def test_pair_validation(fn, pred, gt, match):
    with pytest.raises(ValueError, match=match):
        fn(pred, gt)
    with pytest.raises(ValueError, match=match):
        SplitMetrics().update(pred, gt)


@pytest.mark.parametrize("pred, match", [
    (torch.zeros(4), r"shape \[N, H, W\]"),
    (torch.zeros(1, 0, 2), "empty"),
])
def test_null_s_validation(pred, match):
    with pytest.raises(ValueError, match=match):
        null_s(pred)


# ---------------------------------------------------------------- the official protocol

def _row(fg: list, gt: list) -> tuple[torch.Tensor, torch.Tensor]:
    """One clip of one 2x2 frame: fg/gt as 4 booleans (row-major)."""
    return (torch.tensor([P if x else N for x in fg], dtype=torch.float32).view(1, 2, 2),
            torch.tensor(gt, dtype=torch.uint8).view(1, 2, 2))


def test_protocol_batches_in_order_with_a_short_last_batch():
    rows = [_row([1, 0, 0, 0], [1, 0, 0, 0]),  # J 1
            _row([1, 1, 0, 0], [1, 0, 0, 0]),  # J 1/2
            _row([0, 0, 0, 0], [1, 1, 0, 0]),  # J 0
            _row([1, 0, 0, 0], [0, 0, 0, 0]),  # empty gt: TN 3/4
            _row([1, 1, 1, 1], [1, 1, 1, 1])]  # J 1 (the short last batch)
    preds, gts = zip(*rows)
    got = metrics.refavs_protocol(list(preds), list(gts), "test_s", batch_clips=2)
    assert set(got) == {"J", "F"}
    assert got["J"] == pytest.approx(((1 + 0.5) / 2 + (0 + 0.75) / 2 + 1) / 3)
    # F per batch: max over thresholds of the mean curve of its non-empty frames. Logits +-5 give two
    # regimes: the lowest thresholds predict every pixel, the others exactly the P pixels.
    f = lambda p, r: 1.3 * p * r / (0.3 * p + r) if p + r else 0.0  # noqa: E731
    b1 = max((f(1, 1) + f(0.5, 1)) / 2, (f(0.25, 1) + f(0.25, 1)) / 2)
    b2 = max(f(0, 0), f(0.5, 1))  # row 3 only (row 4's gt is empty); all-predicted wins here
    assert got["F"] == pytest.approx((b1 + b2 + 1.0) / 3, abs=1e-6)
    # the order matters: the same rows in another order batch differently
    other = metrics.refavs_protocol([preds[i] for i in (0, 2, 1, 3, 4)], [gts[i] for i in (0, 2, 1, 3, 4)],
                                    "test_s", batch_clips=2)
    assert other["J"] == pytest.approx(((1 + 0) / 2 + (0.5 + 0.75) / 2 + 1) / 3)
    assert other["F"] != pytest.approx(got["F"])


def test_protocol_batch_without_foreground_adds_zero_f():
    rows = [_row([1, 0, 0, 0], [1, 0, 0, 0]), _row([0, 0, 0, 0], [1, 0, 0, 0]),
            _row([0, 0, 0, 0], [0, 0, 0, 0]), _row([0, 0, 0, 0], [0, 0, 0, 0])]
    got = metrics.refavs_protocol(*map(list, zip(*rows)), "test_u", batch_clips=2)
    f1 = (1.0 + 0.0) / 2
    assert got["F"] == pytest.approx((f1 + 0.0) / 2, abs=1e-6)  # the all-empty batch returns 0, as the official code
    assert got["J"] == pytest.approx(((1 + 0) / 2 + (1 + 1) / 2) / 2)
    split = metrics.protocol_from_rows([_acc(*r) for r in rows], "test_u", "split")
    assert split["F"] == pytest.approx(f1, abs=1e-6)  # split-wide: empty frames are simply left out


def _acc(p, g) -> SplitMetrics:
    m = SplitMetrics()
    m.update(p, g)
    return m


def test_protocol_null_split_is_mean_of_per_batch_roots():
    rows = [_row([1, 0, 0, 0], [0] * 4), _row([0, 0, 0, 0], [0] * 4), _row([1, 1, 1, 1], [0] * 4)]
    got = metrics.refavs_protocol(*map(list, zip(*rows)), "test_n", batch_clips=2)
    assert set(got) == {"S"}
    assert got["S"] == pytest.approx((math.sqrt(1 / 8) + math.sqrt(4 / 4)) / 2)
    split = metrics.protocol_from_rows([_acc(*r) for r in rows], "test_n", "split")
    assert split["S"] == pytest.approx(math.sqrt(5 / 12))  # one root over the split


def _official_loop(preds, gts, split, bs=4):
    """The benchmark's test loop re-derived from its code (Ref-AVS scripts/train.py test() and
    utils/metric/utility.py), literally per batch and per threshold, in float32."""
    js, fs, ss = [], [], []
    for start in range(0, len(preds), bs):
        p = torch.cat(preds[start:start + bs]).float()  # [frames of the batch, H, W]
        g = torch.cat(gts[start:start + bs]).float()
        if split == "test_n":
            ss.append(torch.sqrt((torch.sigmoid(p) > 0.5).int().sum() / p.numel()).item())
            continue
        n, hw = p.shape[0], p.shape[1] * p.shape[2]
        fg = (torch.sigmoid(p) > 0.4).int()
        inter = (fg * g).sum((1, 2))
        union = torch.max(fg, g.int()).sum((1, 2)).float()
        empty = g.sum((1, 2)) == 0
        inter[empty] = ((1 - g) * (1 - fg)).sum((1, 2))[empty]
        union[empty] = hw
        js.append((torch.sum(inter / (union + 1e-7)) / n).item())
        prob = torch.sigmoid(p)
        th = torch.linspace(0, 1 - 1e-10, 255)
        score, avg, num = torch.zeros(255), 0.0, 0
        for i in range(n):
            if torch.mean(g[i]) == 0.0:
                continue
            prec, rec = torch.zeros(255), torch.zeros(255)
            for k in range(255):
                y = (prob[i] >= th[k]).float()
                tp = (y * g[i]).sum()
                prec[k], rec[k] = tp / (y.sum() + 1e-20), tp / (g[i].sum() + 1e-20)
            fk = 1.3 * prec * rec / (0.3 * prec + rec)
            fk[fk != fk] = 0
            avg, num = avg + fk, num + 1
            score = avg / num
        fs.append(score.max().item())
    if split == "test_n":
        return {"S": sum(ss) / len(ss)}
    return {"J": sum(js) / len(js), "F": sum(fs) / len(fs)}


@pytest.mark.parametrize("split", ["test_s", "test_n"])
def test_protocol_matches_the_official_loop_on_random_logits(split):
    g = torch.Generator().manual_seed(3)
    preds, gts = [], []
    for r in range(11):  # 11 clips: batches of 4, 4, 3
        preds.append(torch.randn(3, 12, 10, generator=g) * 3)
        m = torch.rand(3, 12, 10, generator=g) < 0.3
        if r in (4, 5, 6, 7):  # a whole batch with empty ground truth
            m[:] = False
        gts.append(m.to(torch.uint8))
    got = metrics.refavs_protocol(preds, gts, split)
    want = _official_loop(preds, gts, split)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-6), k


def test_official_gt_resize_thresholds_like_cv2_rounding():
    m = torch.zeros(1, 4, 4, dtype=torch.uint8)
    m[0, 0, 0] = 255
    up = metrics.official_gt_resize(m, 8)  # a corner pixel: bilinear spreads it, rounding keeps the core
    assert up.dtype == torch.bool and up.shape == (1, 8, 8)
    assert up[0, :2, :2].all() and not up[0, 3:, 3:].any()
    assert torch.equal(metrics.official_gt_resize(m.bool(), 8), up)  # 0/1 masks stand for 0/255 PNGs
    same = torch.randint(0, 2, (2, 256, 256), dtype=torch.uint8)
    assert torch.equal(metrics.official_gt_resize(same), same.bool())


def test_format_table_extra_columns_when_present():
    row = refavs_table({"test_s": {"J": 0.6, "F": 0.7}})
    assert "Struct" not in format_table({"a": row})
    text = format_table({"a": {**row, "Struct": 0.9, "Class": 0.65}, "b": row})
    assert text.splitlines()[0].split()[-2:] == ["Struct", "Class"]
    assert text.splitlines()[2].split()[-2:] == ["0.900", "0.650"] and text.splitlines()[3].split()[-2:] == ["-", "-"]


def test_j_by_expression_kind():
    from aurora_core.evaluate import by_kind

    def acc(fg, gt):
        m = SplitMetrics()
        m.update(t([[fg]]), torch.tensor([[gt]], dtype=torch.uint8))
        return m

    rows = [{"kind": "sound"}, {"kind": "sound"}, {"kind": "position"}, {"kind": ""}]
    accs = [acc([P, N], [1, 0]), acc([P, P], [1, 0]), acc([N, N], [1, 0]), acc([P, N], [1, 0])]
    got = by_kind(rows, accs)
    assert got == {"position": {"J": pytest.approx(0.0), "rows": 1},
                   "sound": {"J": pytest.approx((1 + 0.5) / 2), "rows": 2}}  # rows without a kind: left out


def test_mask_overlay_is_upscaled_filled_outlined_and_captioned():
    """The MLflow overlay: frames at 256 px side by side, the prediction filled (magenta), the ground
    truth outlined (green), a caption band with expression, answer, IoU and legend above them."""
    import io

    import numpy as np
    from PIL import Image

    from aurora_core.tracking import GT_RGB, OVERLAY_FRAME_PX, mask_overlay_png

    t, s = 10, 64
    frames = torch.full((t, 3, s, s), 90, dtype=torch.uint8)
    gt = torch.zeros(t, s, s, dtype=torch.uint8)
    gt[:, 20:40, 20:40] = 1
    pred = torch.full((t, s, s), -10.0)
    pred[:, 0:10, 0:10] = 10.0
    png = mask_overlay_png(frames, pred, gt, expression="the horn", answer="The target is horn. It is [SEG].",
                           iou=0.25)
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    px = OVERLAY_FRAME_PX
    band = img.shape[0] - px
    assert img.shape[1] == 5 * px and band > 40  # 5 of the 10 frames, each 256 px, under the caption
    assert (img[:band] < 100).any() and (img[:band] == 255).all(axis=2).mean() > 0.5  # dark text on white
    frame = img[band:, :px]
    scale = px // s
    inside_pred, inside_gt = frame[5 * scale, 5 * scale], frame[30 * scale, 30 * scale]
    gt_edge = frame[20 * scale, 30 * scale]
    assert inside_pred[1] < 60 and inside_pred[0] > 150 and inside_pred[2] > 150  # magenta fill
    assert (inside_gt == 90).all()  # the ground truth is outlined, not filled
    assert tuple(gt_edge) == GT_RGB
