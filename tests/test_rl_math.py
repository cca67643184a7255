"""GRPO rewards, advantages, the clipped objective and the KL estimators on hand-computed cases."""

import math

import pytest
import torch

from aurora_core.rl import grpo
from aurora_core.rl.rewards import RewardWeights, class_reward, format_reward, iou_reward, score

GOOD = "Step 1: I see a drum. Step 4: The drum sounds. The target is drum. It is [SEG]."


def test_format_reward():
    assert format_reward(GOOD) == 1.0
    assert format_reward("the target is drum . it is [SEG] .") == 1.0  # detokenised spacing
    assert format_reward("The target is drum. It is [SEG]") == 0.0
    assert format_reward("It is drum [SEG].") == 0.0
    assert format_reward("") == 0.0


def test_class_reward():
    assert class_reward(GOOD, "drum") == 2.0
    assert class_reward(GOOD, "bell") == 1.0  # well-formed class sentence, wrong class
    assert class_reward("The target is the drum. It is [SEG].", "drum") == 2.0
    assert class_reward("The target is none. It is [SEG].", "null") == 2.0
    assert class_reward("It is drum [SEG].", "drum") == 0.0  # no "the target is" sentence
    assert class_reward("garbage", "drum") == 0.0


def test_iou_reward_cases():
    gt = torch.zeros(2, 2, 2)
    gt[0, 0, :] = 1  # frame 0: top row; frame 1: empty
    pred = torch.full((2, 2, 2), -10.0)
    pred[0, 0, 0] = 10.0  # frame 0: one of two target pixels -> IoU 1/2
    pred[1, 1, 1] = 10.0  # frame 1 (empty gt): 3 of 4 pixels correctly background -> 3/4
    assert iou_reward(pred, gt) == pytest.approx((0.5 + 0.75) / 2, abs=1e-6)
    assert iou_reward(torch.full((1, 2, 2), -10.0), torch.zeros(1, 2, 2)) == pytest.approx(1.0)
    # threshold: sigmoid(0) = 0.5 is not > 0.5 -> background
    assert iou_reward(torch.zeros(1, 2, 2), torch.ones(1, 2, 2)) == pytest.approx(0.0, abs=1e-6)


def test_score_weights():
    gt = torch.ones(1, 2, 2)
    terms = score(GOOD, torch.full((1, 2, 2), 10.0), gt, "drum", RewardWeights(format=0.5, cls=2.0, iou=3.0))
    assert terms["format"] == 1.0 and terms["class"] == 2.0 and terms["iou"] == pytest.approx(1.0)
    assert terms["total"] == pytest.approx(0.5 * 1 + 2.0 * 2 + 3.0 * 1)


def test_group_advantages():
    r = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    adv = grpo.group_advantages(r, scale=True, eps=1e-4)
    assert adv[0].tolist() == pytest.approx([-1 / 1.0001, 0.0, 1 / 1.0001])  # unbiased std = 1
    assert adv[1].tolist() == [0.0, 0.0, 0.0]
    assert grpo.group_advantages(r, scale=False)[0].tolist() == [-1.0, 0.0, 1.0]  # Dr.GRPO
    assert grpo.zero_variance_groups(r).tolist() == [False, True]


def test_clipped_surrogate_hand_case():
    old = torch.zeros(2, 1)
    logp = torch.log(torch.tensor([[1.5], [0.5]]))
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 1)
    loss, stats = grpo.policy_loss(logp, old, adv, mask, clip_eps=0.2)
    # token 1: min(1.5*1, 1.2*1) = 1.2; token 2: min(0.5*-1, 0.8*-1) = -0.8; loss = -(1.2 - 0.8)/2
    assert loss.item() == pytest.approx(-0.2, abs=1e-6)
    assert stats["clip_frac_sum"].item() == 2.0 and stats["tokens"].item() == 2.0
    loss_hi, stats_hi = grpo.policy_loss(logp, old, adv, mask, clip_eps=0.2, clip_eps_high=0.5)
    assert loss_hi.item() == pytest.approx(-(1.5 - 0.8) / 2, abs=1e-6)  # clip-higher lets 1.5 through
    assert stats_hi["clip_frac_sum"].item() == 1.0


def test_policy_loss_masks_tokens_and_uses_given_token_count():
    old = torch.zeros(1, 3)
    logp = torch.zeros(1, 3)  # ratio 1 everywhere: loss = -A per token
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, _ = grpo.policy_loss(logp, old, torch.tensor([2.0]), mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(-2.0)
    loss, _ = grpo.policy_loss(logp, old, torch.tensor([2.0]), mask, clip_eps=0.2, num_tokens=8)
    assert loss.item() == pytest.approx(-2.0 * 2 / 8)  # token mean over the global batch


def test_policy_gradient_direction():
    logp = torch.zeros(1, 1, requires_grad=True)
    loss, _ = grpo.policy_loss(logp, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1), clip_eps=0.2)
    loss.backward()
    assert logp.grad.item() < 0  # descending raises the log-prob of a positive-advantage token


def test_kl_estimators():
    logp, ref = torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25]))
    lr = math.log(0.5)  # log(p_ref / p)
    assert grpo.kl_per_token(logp, ref, "k1").item() == pytest.approx(-lr)
    assert grpo.kl_per_token(logp, ref, "k2").item() == pytest.approx(0.5 * lr**2)
    assert grpo.kl_per_token(logp, ref, "k3").item() == pytest.approx(0.5 - 1 - lr)
    same = grpo.kl_per_token(logp, logp, "k3")
    assert same.item() == 0.0
    with pytest.raises(ValueError):
        grpo.kl_per_token(logp, ref, "k4")


def test_entropy():
    assert grpo.entropy_per_token(torch.zeros(1, 4)).item() == pytest.approx(math.log(4))


def test_loss_aggregation_token_and_sequence_mean_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    # token mean: (1 + 2 + 3 + 4) / 4 tokens; with a global count of 8 tokens, / 8
    assert grpo.aggregate(per_token, mask, "token_mean").item() == pytest.approx(10 / 4)
    assert grpo.aggregate(per_token, mask, "token_mean", num_tokens=8).item() == pytest.approx(10 / 8)
    # sequence mean: (mean(1, 2, 3) + mean(4)) / 2 sequences; with 4 global sequences, / 4
    assert grpo.aggregate(per_token, mask, "seq_mean").item() == pytest.approx((2 + 4) / 2)
    assert grpo.aggregate(per_token, mask, "seq_mean", num_seqs=4).item() == pytest.approx((2 + 4) / 4)
    with pytest.raises(ValueError, match="token_mean or seq_mean"):
        grpo.aggregate(per_token, mask, "sum")


def test_split_batches_aggregate_to_the_whole():
    """Global counts make the sum of per-part losses equal the loss of the whole batch."""
    g = torch.Generator().manual_seed(0)
    per_token = torch.randn(6, 5, generator=g)
    mask = (torch.rand(6, 5, generator=g) > 0.3).long()
    mask[:, 0] = 1
    for how in ("token_mean", "seq_mean"):
        whole = grpo.aggregate(per_token, mask, how)
        parts = sum(grpo.aggregate(per_token[i:i + 2], mask[i:i + 2], how, float(mask.sum()), 6.0) for i in (0, 2, 4))
        assert parts.item() == pytest.approx(whole.item(), rel=1e-6), how


def test_lr_schedule_no_warmup_trains_from_the_first_step():
    from aurora_core.train.zero3 import Optimization

    flat = Optimization(1, 1, 1e-3, 0.0, warmup_steps=0, min_lr_ratio=1.0, total_steps=8)
    assert flat.lr_factor(0) == 1.0 and flat.lr_factor(7) == 1.0
    warm = Optimization(1, 1, 1e-3, 0.0, warmup_steps=2, min_lr_ratio=0.1, total_steps=12)
    assert [warm.lr_factor(n) for n in (0, 1, 2)] == [0.5, 1.0, 1.0]  # the first update trains
    assert warm.lr_factor(12) == pytest.approx(0.1) and 0.1 < warm.lr_factor(7) < 1.0
