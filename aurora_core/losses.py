"""The training losses of AURORA: LM cross-entropy, mask BCE + Dice, [SEG] feature distillation.

Total (AURORA; LISA's weights): ``lm_weight * LM + bce_weight * BCE + dice_weight * Dice (+ distill_weight * MSE)``
with the paper's weights 1.0 / 2.0 / 0.5 as config defaults.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label of prompt and padding tokens: no LM loss there


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over the answer tokens only (labels == -100 elsewhere).

    ``logits`` [B, L, V] are the model's outputs for ``input_ids``; ``labels`` [B, L] are aligned with
    ``input_ids`` (the shift happens here). Mean over answer tokens of the whole batch.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    if not (shift_labels != IGNORE_INDEX).any():
        return shift_logits.sum() * 0.0  # keeps the graph (ZeRO-3 needs every rank to backward)
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def _mean_over_masks(per_mask: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-mask losses [...] over the masks with ground truth (``valid`` bool [...], None: all)."""
    if valid is None:
        return per_mask.mean()
    w = valid.to(per_mask.device, per_mask.dtype)
    return (per_mask * w).sum() / w.sum().clamp(min=1.0)  # no valid mask: 0, and the graph is kept


def mask_bce(logits: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel sigmoid BCE, averaged per mask then over masks. Shapes [..., H, W]; ``valid``
    [...] bool leaves out masks without ground truth (AVSBench S4 train: frames 2..5)."""
    x = logits.float().flatten(-2)
    y = gt.to(x.dtype).flatten(-2)
    return _mean_over_masks(F.binary_cross_entropy_with_logits(x, y, reduction="none").mean(-1), valid)


def dice_loss(logits: torch.Tensor, gt: torch.Tensor, smooth: float = 1.0,
              valid: torch.Tensor | None = None) -> torch.Tensor:
    """Soft Dice per mask, averaged over masks (those with ground truth if ``valid`` is given).
    Shapes [..., H, W].

    The +smooth in numerator and denominator makes an empty ground truth well defined: an empty
    prediction scores 0 loss and any predicted foreground is pushed down (1 - 1/(sum(p)+1)).
    """
    p = torch.sigmoid(logits.float()).flatten(-2)
    y = gt.to(p.dtype).flatten(-2)
    inter = (p * y).sum(-1)
    return _mean_over_masks(1.0 - (2.0 * inter + smooth) / (p.sum(-1) + y.sum(-1) + smooth), valid)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Segmentation feature distillation: MSE to the frozen teacher's projected [SEG] embedding
    ([B, D] each), over the rows where ``rows`` [B] is true (None: all; none: 0 with a gradient path)."""
    if rows is not None:
        student, teacher = student[rows], teacher[rows]
        if student.shape[0] == 0:
            return student.float().sum()
    return F.mse_loss(student.float(), teacher.detach().float())
