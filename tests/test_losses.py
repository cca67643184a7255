import math

import pytest
import torch

from aurora_core import losses

BIG = 30.0  # sigmoid(30) == 1 within float32


def test_lm_loss_only_on_answer_tokens():
    logits = torch.zeros(1, 4, 3)
    logits[0, 1, 2] = 100.0  # predicts token 2 at position 2
    labels = torch.tensor([[-100, -100, 2, 0]])  # answer = positions 2 and 3
    # position 2: predicted from logits[1] (certain, loss 0); position 3 from logits[2] (uniform: log 3)
    assert losses.lm_loss(logits, labels).item() == pytest.approx(math.log(3) / 2, rel=1e-5)


def test_lm_loss_without_answer_is_zero_with_graph():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    loss = losses.lm_loss(logits, torch.full((2, 3), -100))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None


def test_bce_hand_case():
    logits = torch.tensor([[[0.0, BIG], [-BIG, 0.0]]])
    gt = torch.tensor([[[1, 1], [0, 0]]])
    # pixels: log2, 0, 0, log2 -> mean log2/2
    assert losses.mask_bce(logits, gt).item() == pytest.approx(math.log(2) / 2, rel=1e-5)


def test_dice_hand_cases_including_empty():
    gt = torch.tensor([[[1, 1], [0, 0]]])
    perfect = torch.tensor([[[BIG, BIG], [-BIG, -BIG]]])
    assert losses.dice_loss(perfect, gt).item() == pytest.approx(0.0, abs=1e-6)
    half = torch.tensor([[[BIG, -BIG], [-BIG, -BIG]]])  # inter 1, p 1, g 2: 1 - 3/4
    assert losses.dice_loss(half, gt).item() == pytest.approx(0.25, abs=1e-6)
    empty_gt = torch.zeros(1, 2, 2)
    assert losses.dice_loss(-BIG * torch.ones(1, 2, 2), empty_gt).item() == pytest.approx(0.0, abs=1e-6)
    # empty gt, 2 predicted pixels: 1 - 1/3, and the gradient pushes them down
    x = torch.tensor([[[BIG, BIG], [-BIG, -BIG]]])
    assert losses.dice_loss(x, empty_gt).item() == pytest.approx(2 / 3, abs=1e-6)
    y = torch.zeros(1, 2, 2, requires_grad=True)
    losses.dice_loss(y, empty_gt).backward()
    assert (y.grad > 0).all()  # descent lowers the logits


def test_losses_average_per_mask():
    gt = torch.zeros(2, 2, 2)
    gt[0] = 1
    logits = torch.full((2, 2, 2), -BIG)
    # mask 0 all wrong (BCE BIG per pixel), mask 1 all right (0): mean over masks BIG/2
    assert losses.mask_bce(logits, gt).item() == pytest.approx(BIG / 2, rel=1e-4)


def test_distill_is_mse_and_teacher_detached():
    s = torch.tensor([[1.0, 2.0]], requires_grad=True)
    t = torch.tensor([[0.0, 0.0]], requires_grad=True)
    loss = losses.distill_loss(s, t)
    loss.backward()
    assert loss.item() == pytest.approx(2.5) and t.grad is None and s.grad is not None


def test_distill_over_the_chosen_rows_only():
    """SFT against a teacher trained without null rows (teacher.null_rows=false) distils on the
    other rows only; a batch of null rows alone gives 0 with a gradient path."""
    s = torch.tensor([[1.0, 2.0], [5.0, 5.0]], requires_grad=True)
    t = torch.zeros(2, 2)
    assert losses.distill_loss(s, t, torch.tensor([True, False])).item() == pytest.approx(2.5)
    none = losses.distill_loss(s, t, torch.tensor([False, False]))
    none.backward()
    assert none.item() == 0.0 and torch.equal(s.grad, torch.zeros(2, 2))
