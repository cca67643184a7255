"""The typed records one GRPO step carries between processes (after torchtune's ``GRPOTrajectory`` and
OpenRLHF's ``Experience``): the rollout worker writes a :class:`RolloutGroup` per prompt, the driver
collects them into a :class:`StepBatch`, the learner reads both.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class RolloutGroup:
    """G sampled completions of one prompt, scored. Arrays are numpy (they cross Ray boundaries)."""

    key: str  # row key of the prompt's clip
    version: int  # policy version that sampled the completions
    completion_ids: np.ndarray  # [G, C] int32, pad_id after the end token
    completion_mask: np.ndarray  # [G, C] int8, 1 on generated tokens up to and including the end token
    logprobs: np.ndarray  # [G, C] float32, log p(token) under the sampling policy (logits / temperature)
    rewards: dict[str, np.ndarray]  # reward term (format, class, iou, total) -> [G] float32
    j: np.ndarray  # [G] float32, mask IoU (J) of each completion's masks
    truncated: np.ndarray  # [G] bool, cut by grpo.max_new_tokens before an end token
    has_seg: np.ndarray  # [G] bool, the completion holds a [SEG] (else its masks are empty)
    pred_class: list[str]  # [G] the class each answer names ("" if none)
    texts: list[str]  # [G] decoded completions
    gen_tokens: int  # generated tokens of the G completions
    gen_time: float = 0.0  # seconds of generate, this group's share of its call
    reward_time: float = 0.0  # seconds of scoring, this group's share
    ref_logprobs: np.ndarray | None = None  # [G, C] float32 under the reference policy (KL only)
    # ObjectRef of this prompt's FrozenFeatures [1, ...] (CPU, the rollout's dtype), put by the
    # rollout actor with grpo.learner_features=ship; None (recompute, restored from a checkpoint):
    # the learner runs the frozen encoders itself
    features: object = field(default=None, repr=False)

    @property
    def num_samples(self) -> int:
        return int(self.completion_ids.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        """The array fields by name (for safetensors checkpoints)."""
        out = {k: getattr(self, k) for k in ("completion_ids", "completion_mask", "logprobs", "j")}
        out.update(truncated=self.truncated.astype(np.uint8), has_seg=self.has_seg.astype(np.uint8))
        out.update({f"rewards/{k}": v for k, v in self.rewards.items()})
        if self.ref_logprobs is not None:
            out["ref_logprobs"] = self.ref_logprobs
        return out

    def meta(self) -> dict:
        """The scalar and text fields (JSON)."""
        return {"key": self.key, "version": self.version, "pred_class": list(self.pred_class),
                "texts": list(self.texts), "gen_tokens": self.gen_tokens, "gen_time": self.gen_time,
                "reward_time": self.reward_time}

    @classmethod
    def restore(cls, meta: dict, arrays: dict[str, np.ndarray]) -> "RolloutGroup":
        rewards = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("rewards/")}
        return cls(**meta, rewards=rewards, ref_logprobs=arrays.get("ref_logprobs"),
                   **{k: arrays[k].astype(bool) if k in ("truncated", "has_seg") else arrays[k]
                      for k in ("completion_ids", "completion_mask", "logprobs", "j", "truncated", "has_seg")})


@dataclass
class StepBatch:
    """One step's prompts and their groups, aligned: ``groups[i]`` belongs to row ``i`` of ``clips``."""

    clips: dict[str, np.ndarray]  # P decoded clips (shards.decode_batch columns), [P, ...] each
    groups: list[RolloutGroup]  # P groups
    drawn: int  # prompts drawn for it (dynamic sampling draws more)
    zero_var: int  # drawn groups without reward variance
    gen_time: float  # wall time in the rollout pool
    gen_tokens: int
    ref_time: float = 0.0  # seconds the KL reference worker took for this batch
    clips_ref: object = field(default=None, repr=False)  # the clips in the object store, if already put
    fetch_time: float = 0.0  # seconds taking its prompts from the stream (what prefetch did not cover)
    put_time: float = 0.0  # seconds putting its clips into the object store


def shipped_features(refs: list, device, dtype, who: str):
    """The FrozenFeatures the rollout actors shipped (``RolloutGroup.features``, one ObjectRef per
    prompt) concatenated on ``device``, or None when any is absent or was lost with the actor that
    owned it: the caller then runs the frozen encoders itself."""
    import ray

    from aurora_core.model.aurora import FrozenFeatures

    if not refs or any(r is None for r in refs):
        return None
    try:
        return FrozenFeatures.cat(ray.get(list(refs))).to(device, dtype)
    except ray.exceptions.ObjectLostError as e:  # its owner (a rollout actor) died
        log.warning("%s: shipped frozen features lost (%s); recomputing them", who, type(e).__name__)
        return None
