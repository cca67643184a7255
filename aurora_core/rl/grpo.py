"""The GRPO objective, in one place (CleanRL-style: the math is the code).

- advantages: per group of G samples of one prompt, ``(r - mean) / (std + eps)``; Dr.GRPO drops the
  std division (``scale_rewards=False``)
- per-token loss: clipped surrogate on ratios ``exp(logp - logp_old)``, clip range
  ``[1 - eps, 1 + eps_high]``, plus ``beta * KL`` to the reference (the policy GRPO started from),
  per token: k1 = log r, k2 = (log r)^2 / 2, k3 = r - 1 - log r with r = p_ref / p (Schulman's
  estimators, k3 unbiased, >= 0)
- aggregation (:func:`aggregate`): ``token_mean`` = sum over every completion token of the step's
  batch / its token count (DAPO, Dr.GRPO); ``seq_mean`` = mean over each completion's tokens, then
  over completions (the original GRPO, AURORA's code). Both divide by *global* counts, so the update
  does not depend on how the batch is split over learner ranks and micro-batches.
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


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_eps: float,
                      clip_eps_high: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token ``-min(r A, clip(r, 1 - eps, 1 + eps_high) A)``. logp/old_logp [N, C]; advantages [N].
    Returns (loss per token, ratio, was-clipped) all [N, C]."""
    hi = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None].to(logp.dtype)
    per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - clip_eps, 1.0 + hi) * adv)
    with torch.no_grad():
        was_clipped = ((ratio < 1.0 - clip_eps) & (adv < 0)) | ((ratio > 1.0 + hi) & (adv > 0))
    return per_token, ratio, was_clipped


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str = "token_mean", num_tokens: float | None = None,
              num_seqs: float | None = None) -> torch.Tensor:
    """Reduce a [N, C] per-token loss over ``mask``: ``token_mean`` sums and divides by ``num_tokens``
    (default: this batch's), ``seq_mean`` averages each row over its tokens and divides the sum of rows
    by ``num_seqs`` (default: N). Give the global counts when the batch is split."""
    mask = mask.to(per_token.dtype)
    if how == "token_mean":
        n = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=per_token.dtype)
        return (per_token * mask).sum() / n.clamp(min=1.0)
    if how == "seq_mean":
        per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        n = per_token.shape[0] if num_seqs is None else num_seqs
        return per_seq.sum() / max(1.0, float(n))
    raise ValueError(f"unknown loss aggregation {how!r}; token_mean or seq_mean")


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_eps: float, clip_eps_high: float | None = None, num_tokens: float | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-mean clipped surrogate (see :func:`clipped_surrogate`, :func:`aggregate`) and diagnostics."""
    per_token, ratio, clipped = clipped_surrogate(logp, old_logp, advantages, clip_eps, clip_eps_high)
    loss = aggregate(per_token, mask, "token_mean", num_tokens)
    m = mask.to(logp.dtype)
    stats = {"clip_frac_sum": (clipped.to(logp.dtype) * m).sum(), "tokens": m.sum(),
             "ratio_sum": (ratio.detach() * m).sum()}
    return loss, stats


def entropy_per_token(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)
