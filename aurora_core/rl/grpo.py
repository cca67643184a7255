"""The GRPO objective, in one place (CleanRL-style: the math is the code).

- advantages: per group of G samples of one prompt, ``(r - mean) / (std + eps)``; Dr.GRPO drops the
  std division (``scale_rewards=False``)
- policy loss: clipped surrogate on per-token ratios ``exp(logp - logp_old)``, clip range
  ``[1 - eps, 1 + eps_high]``, token-mean over every completion token of the batch
- KL to the reference (the policy with its LoRA adapter disabled), per token: k1 = log r,
  k2 = (log r)^2 / 2, k3 = r - 1 - log r with r = p_ref / p (Schulman's estimators, k3 unbiased, >= 0)
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """rewards [B, G] -> advantages [B, G]. The std is the unbiased sample std (torch default), as in TRL."""
    mean = rewards.mean(dim=1, keepdim=True)
    adv = rewards - mean
    if scale:
        adv = adv / (rewards.std(dim=1, keepdim=True) + eps)
    return adv


def zero_variance_groups(rewards: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """[B] bool: groups whose samples all got the same reward (no learning signal)."""
    return (rewards.max(dim=1).values - rewards.min(dim=1).values) <= tol


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    log_ratio = ref_logp - logp  # log(p_ref / p) on tokens sampled from p
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.exp(log_ratio) - 1.0 - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}")


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_eps: float, clip_eps_high: float | None = None, num_tokens: float | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate. logp/old_logp/mask [N, C]; advantages [N] (one per sequence).

    Returns the loss summed over tokens / ``num_tokens`` (default: this batch's token count; give the
    global count when the batch is split across micro-batches or workers) and diagnostics.
    """
    hi = clip_eps if clip_eps_high is None else clip_eps_high
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None].to(logp.dtype)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + hi) * adv
    per_token = -torch.minimum(unclipped, clipped)
    n = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=logp.dtype)
    loss = (per_token * mask).sum() / n.clamp(min=1.0)
    with torch.no_grad():
        was_clipped = ((ratio < 1.0 - clip_eps) & (adv < 0)) | ((ratio > 1.0 + hi) & (adv > 0))
        stats = {"clip_frac_sum": (was_clipped.to(logp.dtype) * mask).sum(), "tokens": mask.sum(),
                 "ratio_sum": (ratio * mask).sum()}
    return loss, stats


def entropy_per_token(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)
