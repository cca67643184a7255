"""GRPO rewards (format, class, IoU; AURORA's model/LISA_grpo.py): pure functions of (answer text, mask logits, ground truth).

- format: 1 if the answer ends with ``It is [SEG].``
- class:  +1 if the second-to-last sentence reads ``the target is (the )?X``, +1 more if X is the true class
- IoU:    mean over frames of IoU at sigmoid > threshold; a frame with empty ground truth scores the
          fraction of its pixels correctly left background (so null clips reward empty masks)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aurora_core import reasoning
from aurora_core.metrics import mask_iou


@dataclass(frozen=True)
class RewardWeights:
    format: float = 1.0
    cls: float = 1.0
    iou: float = 1.0
    iou_threshold: float = 0.5


def format_reward(text: str) -> float:
    return 1.0 if reasoning.parse_answer(text).well_formed else 0.0


def class_reward(text: str, true_class: str) -> float:
    p = reasoning.parse_answer(text)
    if not p.has_class_sentence:
        return 0.0
    return 2.0 if p.class_correct(true_class) else 1.0


def iou_reward(mask_logits: torch.Tensor, gt: torch.Tensor, threshold: float = 0.5) -> float:
    """mask_logits [T, H, W] (before sigmoid), gt [T, H, W] in {0, 1}."""
    return mask_iou(mask_logits.float(), gt, threshold=threshold)


def score(text: str, mask_logits: torch.Tensor, gt: torch.Tensor, true_class: str, w: RewardWeights) -> dict[str, float]:
    """Each term unweighted, and the weighted total."""
    terms = {"format": format_reward(text), "class": class_reward(text, true_class),
             "iou": iou_reward(mask_logits, gt, w.iou_threshold)}
    terms["total"] = w.format * terms["format"] + w.cls * terms["class"] + w.iou * terms["iou"]
    return terms
