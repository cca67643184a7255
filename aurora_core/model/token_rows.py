"""Training only the rows of the tokens we add (``model.trainable_tokens=new``).

The whole ``embed_tokens`` and ``lm_head`` of Qwen2.5-Omni-7B are 2 x 152,064 x 3,584 = 1.09 B
parameters: trained whole (``full``, as AURORA and LISA do) they are 99 % of the "adapter", ~2.2 GB
per bf16 weight push and ~8.7 GB of Adam state. ``new`` keeps both matrices frozen and trains a
copy of the [SEG] row of each.

Why not peft's ``trainable_token_indices``: its layer builds a full copy of the matrix with the
trained rows written in (``index_copy``) on every forward, embedding and lm_head alike. At 3B widths
that is 2 x 1.2 GB of copying per decoded token: ``inspect_model.py --samples 3`` on the reduced 3B
checkpoint generated 4 tokens/s with it on this machine's CPU, 15 with these wrappers, which touch
only the rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NewTokenRows(nn.Module):
    """A frozen ``nn.Embedding`` or ``lm_head`` (``nn.Linear``) whose rows ``ids`` are replaced by the
    trainable ``rows`` [n, H] (initialised from the frozen ones)."""

    def __init__(self, frozen: nn.Embedding | nn.Linear, ids: list[int]):
        super().__init__()
        if not isinstance(frozen, (nn.Embedding, nn.Linear)) or getattr(frozen, "bias", None) is not None:
            raise TypeError(f"NewTokenRows wraps an embedding or a bias-free lm_head, not {type(frozen).__name__}")
        self.frozen = frozen
        frozen.weight.requires_grad_(False)
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        from aurora_core.train.zero3 import gathered

        with gathered([frozen.weight]):  # the rows of a matrix zero.Init partitioned (model.zero_init)
            self.rows = nn.Parameter(frozen.weight.detach()[self.ids].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.frozen(x)
        if isinstance(self.frozen, nn.Embedding):  # x: token ids [...]
            slot = x[..., None] == self.ids  # [..., n]
            new = F.embedding(slot.int().argmax(-1), self.rows)
            return torch.where(slot.any(-1, keepdim=True), new.to(out.dtype), out)
        # lm_head, x: hidden states [..., H] -> logits [..., V] with the rows' logits written in
        return out.index_copy(-1, self.ids, F.linear(x, self.rows.to(x.dtype)).to(out.dtype))

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The frozen module with the trained rows written into its weight (serving, full exports)."""
        self.frozen.weight[self.ids] = self.rows.to(self.frozen.weight.dtype)
        return self.frozen


def wrap(thinker: nn.Module, ids: list[int]) -> None:
    """Train only rows ``ids`` of the thinker's token embedding and lm_head."""
    lm = thinker.model.language_model
    lm.embed_tokens = NewTokenRows(lm.embed_tokens, ids)
    thinker.lm_head = NewTokenRows(thinker.lm_head, ids)


def unwrap(thinker: nn.Module) -> None:
    """Undo :func:`wrap`, keeping the trained rows (merged into the matrices)."""
    lm = thinker.model.language_model
    if isinstance(lm.embed_tokens, NewTokenRows):
        lm.embed_tokens = lm.embed_tokens.merged()
    if isinstance(thinker.lm_head, NewTokenRows):
        thinker.lm_head = thinker.lm_head.merged()


def _parts(thinker: nn.Module) -> dict[str, nn.Module]:
    return {"embed_tokens": thinker.model.language_model.embed_tokens, "lm_head": thinker.lm_head}


def row_state(thinker: nn.Module) -> dict[str, torch.Tensor]:
    """The trained rows by a stable name (for heads.safetensors); empty when not wrapped."""
    return {f"token_rows.{k}": m.rows.detach().cpu().contiguous() for k, m in _parts(thinker).items()
            if isinstance(m, NewTokenRows)}


def load_row_state(thinker: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    for k, m in _parts(thinker).items():
        key = f"token_rows.{k}"
        if key not in state:
            raise ValueError(f"{source}: no {key} (trained [SEG] rows) although model.trainable_tokens=new")
        with torch.no_grad():
            m.rows.copy_(state[key].to(m.rows.dtype))
