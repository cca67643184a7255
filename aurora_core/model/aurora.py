"""The AURORA model (LISA-style): omni LLM -> [SEG] hidden state -> MLP -> SAM mask decoder.

- ``llm``: a Qwen2.5-Omni thinker (video + audio + text), usually wrapped by peft LoRA.
- ``seg_proj``: MLP H -> H -> D (D = SAM prompt width, 256 for SAM ViT-H) on the last-layer hidden
  state at the answer's ``[SEG]`` token; its output is the sparse prompt of the mask decoder.
- ``sam``: transformers ``SamModel``; the image encoder (frozen, no grad) embeds each frame once,
  the mask decoder returns one mask per frame, upsampled to the data's frame size.

Trainable: LoRA, lm_head, token embeddings, seg_proj, the mask decoder (but its unused IoU head). Frozen: the LLM's base
weights, the audio and vision towers, SAM's image and prompt encoders.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from aurora_core.model.processor import ModelInputs

NO_SEG_LOGIT = -20.0  # mask logits of a sample whose answer has no [SEG]: an empty mask


@dataclass
class AuroraOutput:
    logits: torch.Tensor  # [B, L, V]
    seg_embedding: torch.Tensor  # [B, D] projected [SEG] state (zeros where no [SEG])
    has_seg: torch.Tensor  # [B] bool
    mask_logits: torch.Tensor | None  # [B, T, S, S]


@dataclass
class Rollouts:
    """G samples per prompt, rows ordered [p0s0, p0s1, ..., p1s0, ...]."""

    texts: list[str]
    completion_ids: torch.Tensor  # [B*G, C] (pad after the end token)
    completion_mask: torch.Tensor  # [B*G, C] 1 on generated tokens up to and including the end token
    logprobs: torch.Tensor  # [B*G, C] log p(token) under the sampling policy (logits / temperature)
    mask_logits: torch.Tensor  # [B*G, T, S, S]
    has_seg: torch.Tensor  # [B*G] bool


def _last_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: whether ``mask`` has a True, and the column of the last True (0 if none)."""
    cols = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, cols, torch.full_like(cols, -1)).max(dim=1).values
    return last >= 0, last.clamp(min=0)


class AuroraModel(nn.Module):
    def __init__(self, llm: nn.Module, sam: nn.Module, seg_token_id: int, mask_size: int, encoder_batch: int = 8):
        super().__init__()
        self.encoder_batch = encoder_batch  # frames per SAM image-encoder call (model.encoder_batch)
        self.llm = llm
        self.sam = sam
        hidden = llm.config.get_text_config().hidden_size
        prompt_dim = sam.config.mask_decoder_config.hidden_size
        self.seg_proj = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, prompt_dim))
        self.seg_token_id = seg_token_id
        self.mask_size = mask_size
        self.freeze()

    # ------------------------------------------------------------------ parameters
    def freeze(self) -> None:
        """requires_grad exactly on the trainable parts (see module docstring)."""
        for p in self.sam.parameters():
            p.requires_grad_(False)
        for p in self.sam.mask_decoder.parameters():
            p.requires_grad_(True)
        for p in self.sam.mask_decoder.iou_prediction_head.parameters():
            p.requires_grad_(False)  # mask-quality score: no loss uses it (as in LISA)
        for p in self.seg_proj.parameters():
            p.requires_grad_(True)
        thinker = self.thinker
        if not self.has_lora:  # full fine-tuning of the LLM: only the towers stay frozen
            for p in thinker.parameters():
                p.requires_grad_(True)
        for tower in (thinker.model.audio_tower, thinker.model.visual):
            for p in tower.parameters():
                p.requires_grad_(False)

    @property
    def has_lora(self) -> bool:
        return hasattr(self.llm, "peft_config")

    @property
    def thinker(self) -> nn.Module:
        """The Qwen2.5-Omni thinker under any peft wrapping."""
        return self.llm.get_base_model() if self.has_lora else self.llm

    # ------------------------------------------------------------------ forward
    def forward(self, inputs: ModelInputs, with_masks: bool = True, seg_from: int = 0,
                image_embeddings: torch.Tensor | None = None) -> AuroraOutput:
        """``image_embeddings`` [B*T, D, e, e]: the SAM encoder's output for ``inputs.sam_pixel_values``
        when already computed (it is frozen: G samples of one prompt share it)."""
        out = self.llm(**inputs.thinker_kwargs(), output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states[-1]  # post-norm last layer: what lm_head reads
        is_seg = inputs.input_ids == self.seg_token_id
        is_seg &= inputs.attention_mask.bool()
        if seg_from:
            is_seg[:, :seg_from] = False
        has_seg, pos = _last_index(is_seg)  # the answer's (last) [SEG]
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), pos]
        seg = self.seg_proj(h) * has_seg[:, None].to(h.dtype)
        masks = self.decode_masks(seg, inputs.sam_pixel_values, has_seg, image_embeddings) if with_masks else None
        return AuroraOutput(out.logits, seg, has_seg, masks)

    def image_embeddings(self, sam_pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, T, 3, s, s] -> [B*T, D, e, e], ``encoder_batch`` frames per encoder call."""
        frames = sam_pixel_values.flatten(0, 1)
        with torch.no_grad():  # frozen encoder: no activations kept for backward
            return torch.cat([self.sam.vision_encoder(frames[i:i + self.encoder_batch]).last_hidden_state
                              for i in range(0, frames.shape[0], self.encoder_batch)])

    def decode_masks(self, seg: torch.Tensor, sam_pixel_values: torch.Tensor, has_seg: torch.Tensor,
                     image_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """[B, D] prompts x [B, T, 3, s, s] frames -> mask logits [B, T, S, S] (S = mask_size)."""
        b, t = sam_pixel_values.shape[:2]
        emb = self.image_embeddings(sam_pixel_values) if image_embeddings is None else image_embeddings
        pe = self.sam.get_image_wide_positional_embeddings().to(emb.dtype).repeat(b * t, 1, 1, 1)
        with torch.no_grad():
            _, dense = self.sam.prompt_encoder(input_points=None, input_labels=None, input_boxes=None,
                                               input_masks=None)
        sparse = seg.to(emb.dtype).repeat_interleave(t, 0)[:, None, None, :]  # [B*T, 1, 1, D]
        low, _ = self.sam.mask_decoder(image_embeddings=emb, image_positional_embeddings=pe,
                                       sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense.to(emb.dtype),
                                       multimask_output=False)
        masks = F.interpolate(low[:, 0].float(), size=(self.mask_size, self.mask_size), mode="bilinear",
                              align_corners=False)[:, 0]
        masks = masks.reshape(b, t, self.mask_size, self.mask_size)
        # No [SEG] in the answer: no prompt, so the prediction is an empty mask (and no gradient).
        return torch.where(has_seg[:, None, None, None], masks, torch.full_like(masks, NO_SEG_LOGIT))

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_with_masks(self, prompts: ModelInputs, *, num_samples: int, temperature: float, top_p: float,
                            max_new_tokens: int, eos_id: int, pad_id: int, suppress_ids: list[int],
                            decode, do_sample: bool = True) -> Rollouts:
        """Sample G completions per prompt in one batched generate, then one teacher-forced forward
        for the log-probs (at the sampling temperature) and the masks at each completion's [SEG]."""
        g = num_samples
        gen_kwargs = dict(max_new_tokens=max_new_tokens, num_return_sequences=g, eos_token_id=eos_id,
                          pad_token_id=pad_id, suppress_tokens=suppress_ids or None, use_cache=True)
        if do_sample:
            gen_kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        else:
            gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        seqs = self.llm.generate(**prompts.thinker_kwargs(), **gen_kwargs)
        p = prompts.input_ids.shape[1]
        comp = seqs[:, p:]
        is_end = comp == eos_id
        comp_mask = ((is_end.long().cumsum(1) - is_end.long()) == 0).long()  # through the first end token
        comp = comp.masked_fill(comp_mask == 0, pad_id)
        # the frozen SAM encoder once per prompt's frames, shared by its g samples
        t = prompts.sam_pixel_values.shape[1]
        emb = self.image_embeddings(prompts.sam_pixel_values)
        emb = emb.unflatten(0, (-1, t)).repeat_interleave(g, 0).flatten(0, 1)
        out, logits = self.forward_completions(prompts.repeat_interleave(g), comp, comp_mask, image_embeddings=emb)
        logprobs = token_logprobs(logits, comp, temperature if do_sample else 1.0) * comp_mask
        texts = [decode(row[m.bool()]) for row, m in zip(comp, comp_mask)]
        return Rollouts(texts, comp, comp_mask, logprobs, out.mask_logits, out.has_seg)

    @torch.no_grad()
    def masks_with_forced_seg(self, prompts: ModelInputs, r: Rollouts, suffix_ids: list[int], eos_id: int,
                              num_samples: int = 1) -> torch.Tensor:
        """``r.mask_logits`` where every answer without ``[SEG]`` gets ``suffix_ids`` (``It is [SEG].``)
        appended and its masks decoded from that token, as AURORA's inference does (``eval.no_seg=force``).
        ``prompts`` [B] are those of the generate call that produced ``r`` (B x num_samples rows)."""
        masks = r.mask_logits.clone()
        for i in (~r.has_seg).nonzero().flatten().tolist():
            ids = r.completion_ids[i][r.completion_mask[i].bool()]
            ids = ids[ids != eos_id]
            full = torch.cat([ids, torch.tensor(suffix_ids + [eos_id], dtype=ids.dtype, device=ids.device)])[None]
            j = i // num_samples
            out, _ = self.forward_completions(prompts.rows(j, j + 1), full, torch.ones_like(full))
            masks[i] = out.mask_logits[0].to(masks.dtype)
        return masks

    def forward_completions(self, prompts: ModelInputs, completion_ids: torch.Tensor,
                            completion_mask: torch.Tensor, with_masks: bool = True,
                            image_embeddings: torch.Tensor | None = None) -> tuple[AuroraOutput, torch.Tensor]:
        """Teacher-forced forward of (left-padded) prompts + completions, one row each; returns the
        output and the logits that predict each completion token ([N, C, V])."""
        full = with_completions(prompts, completion_ids, completion_mask)
        p = prompts.input_ids.shape[1]
        out = self.forward(full, with_masks=with_masks, seg_from=p, image_embeddings=image_embeddings)
        return out, out.logits[:, p - 1:-1]


def with_completions(prompts: ModelInputs, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> ModelInputs:
    """Prompts (left-padded) followed by completions: the rows a teacher-forced forward reads. The
    answer's [SEG] is searched from column ``prompts.input_ids.shape[1]`` on (``seg_from``)."""
    return replace(prompts, input_ids=torch.cat([prompts.input_ids, completion_ids], 1),
                   attention_mask=torch.cat([prompts.attention_mask,
                                             completion_mask.to(prompts.attention_mask.dtype)], 1))


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(tokens) from logits aligned with them ([B, C, V], [B, C])."""
    return torch.log_softmax(logits.float() / temperature, -1).gather(-1, tokens[..., None]).squeeze(-1)
