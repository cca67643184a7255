"""The AURORA model (LISA-style): omni LLM -> [SEG] hidden state -> MLP -> SAM mask decoder.

- ``llm``: a Qwen2.5-Omni thinker (video + audio + text), usually wrapped by peft LoRA.
- ``seg_proj``: MLP H -> H -> D (D = SAM prompt width, 256 for SAM ViT-H) on the last-layer hidden
  state at the answer's ``[SEG]`` token; its output is the sparse prompt of the mask decoder.
- ``seg_norm``: that state standardised per feature before ``seg_proj``, with statistics a stage's
  head fit measured (``<stage>.head_steps``, aurora_core/train/head_fit.py); the identity until then.
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

from aurora_core import reasoning
from aurora_core.model.processor import ModelInputs

NO_SEG_LOGIT = -20.0  # mask logits of a sample whose answer has no [SEG]: an empty mask


@dataclass
class AuroraOutput:
    logits: torch.Tensor  # [B, L - logits_from, V] logits of positions logits_from..L-1
    seg_embedding: torch.Tensor  # [B, D] projected [SEG] state (zeros where no [SEG])
    has_seg: torch.Tensor  # [B] bool
    mask_logits: torch.Tensor | None  # [B, T, S, S]
    logits_from: int = 0  # the column of input_ids that logits[:, 0] belongs to


@dataclass
class FrozenFeatures:
    """What the frozen encoders make of a batch of clips, computed once and shared by every forward
    that reads the same clips (the G samples of a prompt, the scoring forward, the learner's
    micro-batches and iterations). Rows follow the clips of the ModelInputs they came from."""

    audio: torch.Tensor  # [B, na, H] audio-tower output per clip (LLM width), one per <|AUDIO|> token
    video: torch.Tensor  # [B, nv, H] vision-tower output per clip (merged patches), one per <|VIDEO|> token
    image_embeddings: torch.Tensor  # [B, T, D, e, e] SAM image-encoder output per frame

    def repeat_interleave(self, g: int) -> FrozenFeatures:
        return FrozenFeatures(*(x.repeat_interleave(g, 0) for x in (self.audio, self.video, self.image_embeddings)))

    def rows(self, start: int, stop: int) -> FrozenFeatures:
        return FrozenFeatures(self.audio[start:stop], self.video[start:stop], self.image_embeddings[start:stop])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> FrozenFeatures:
        return FrozenFeatures(*(x.to(device, dtype) for x in (self.audio, self.video, self.image_embeddings)))

    @classmethod
    def cat(cls, parts: list[FrozenFeatures]) -> FrozenFeatures:
        return cls(*(torch.cat([getattr(f, k) for f in parts]) for k in ("audio", "video", "image_embeddings")))


@dataclass
class Rollouts:
    """G samples per prompt, rows ordered [p0s0, p0s1, ..., p1s0, ...]."""

    texts: list[str]
    completion_ids: torch.Tensor  # [B*G, C] (pad after the end token)
    completion_mask: torch.Tensor  # [B*G, C] 1 on generated tokens up to and including the end token
    logprobs: torch.Tensor  # [B*G, C] log p(token) under the sampling policy (logits / temperature)
    mask_logits: torch.Tensor  # [B*G, T, S, S]
    has_seg: torch.Tensor  # [B*G] bool
    features: FrozenFeatures  # [B] the frozen encoders' outputs per prompt (in-process only)


def _last_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: whether ``mask`` has a True, and the column of the last True (0 if none)."""
    cols = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, cols, torch.full_like(cols, -1)).max(dim=1).values
    return last >= 0, last.clamp(min=0)


class Standardiser(nn.Module):
    """``(h - mean) * scale`` per feature. Buffers, not parameters: the statistics are measured (by a
    head fit), never trained, and travel with the export's heads.safetensors. The identity at build."""

    def __init__(self, width: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(width))  # [H]
        self.register_buffer("scale", torch.ones(width))  # [H] 1 / standard deviation

    def _apply(self, fn, recurse=True):
        # the statistics stay fp32 under model.to(bf16) (and DeepSpeed's bf16 cast): a state of norm ~13
        # with features of sd ~0.05 loses its per-row part to bf16's 3 significant digits
        def keep_fp32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)  # where the module goes (device); the fp32 values move there as they are
            return t.to(out.device, torch.float32) if t.is_floating_point() else out

        return super()._apply(keep_fp32, recurse)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return ((h.float() - self.mean) * self.scale).to(h.dtype)


class AuroraModel(nn.Module):
    def __init__(self, llm: nn.Module, sam: nn.Module, seg_token_id: int, mask_size: int, encoder_batch: int = 8):
        super().__init__()
        self.encoder_batch = encoder_batch  # frames per SAM image-encoder call (model.encoder_batch)
        self.llm = llm
        self.sam = sam
        hidden = llm.config.get_text_config().hidden_size
        prompt_dim = sam.config.mask_decoder_config.hidden_size
        self.seg_norm = Standardiser(hidden)
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
                features: FrozenFeatures | None = None, logits_from: int | None = None,
                mask_frames: torch.Tensor | None = None) -> AuroraOutput:
        """``features``: the frozen encoders' outputs for these rows' clips when already computed
        (:meth:`frozen_features`); without them the towers and the SAM encoder run here.

        ``mask_frames`` [B, k]: decode the masks of these frames of each row only (the supervised
        stages' ``mask_frames``): mask_logits is then [B, k, S, S].

        ``logits_from``: logits only for positions from this column on (default: the position before
        the first answer label, or all without labels). The lm_head over a 150k-token vocabulary is
        the largest matmul of a real-width step and its logits the largest tensor (a 1,000-token
        prompt: 0.6 GB of fp32 logits per row), and no loss reads a prompt position's logits."""
        if features is None and inputs.audio_features is not None:  # the batch carries them (data.cache_towers)
            features = self.frozen_features(inputs)
        if logits_from is None:
            logits_from = inputs.answer_start() - 1 if inputs.labels is not None else 0
        logits_from = max(0, logits_from)
        # the thinker's decoder, then its lm_head on the positions that need logits (the thinker's
        # own forward has no logits_to_keep); peft's LoRA layers sit inside, the head may be wrapped
        hidden = self.thinker.model(**self.thinker_inputs(inputs, features), use_cache=False).last_hidden_state
        logits = self.thinker.lm_head(hidden[:, logits_from:])
        is_seg = inputs.input_ids == self.seg_token_id
        is_seg &= inputs.attention_mask.bool()
        if seg_from:
            is_seg[:, :seg_from] = False
        has_seg, pos = _last_index(is_seg)  # the answer's (last) [SEG]
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), pos]
        seg = self.seg_proj(self.seg_norm(h)) * has_seg[:, None].to(h.dtype)
        emb = features.image_embeddings if features is not None else inputs.sam_image_embeddings
        pixels = inputs.sam_pixel_values
        if mask_frames is not None:
            rows = torch.arange(mask_frames.shape[0], device=mask_frames.device)[:, None]
            emb = None if emb is None else emb[rows, mask_frames]
            pixels = pixels[rows, mask_frames]
        emb = None if emb is None else emb.flatten(0, 1).to(self.seg_proj[0].weight.dtype)
        masks = self.decode_masks(seg, pixels, has_seg, emb) if with_masks else None
        return AuroraOutput(logits, seg, has_seg, masks, logits_from)

    def thinker_inputs(self, inputs: ModelInputs, features: FrozenFeatures | None = None) -> dict:
        """The thinker's keyword arguments: raw media (its towers run inside), or, given ``features``,
        the token embeddings with the tower outputs scattered onto the placeholders, as the thinker
        does itself (``input_ids`` stays: the 3-D rope positions are computed from it)."""
        if features is None:
            return inputs.thinker_kwargs()
        cfg = self.thinker.config
        emb = self.thinker.get_input_embeddings()(inputs.input_ids)
        for token, feats in ((cfg.audio_token_id, features.audio), (cfg.video_token_id, features.video)):
            where = (inputs.input_ids == token)[..., None]
            if int(where.sum()) != feats.shape[0] * feats.shape[1]:
                raise ValueError(f"{int(where.sum())} placeholder tokens {token} but features for "
                                 f"{feats.shape[0]} x {feats.shape[1]}: features of other clips?")
            emb = emb.masked_scatter(where, feats.to(emb.dtype))
        kw = inputs.thinker_kwargs()
        for k in ("input_features", "pixel_values_videos"):
            del kw[k]
        return dict(kw, inputs_embeds=emb)

    @torch.no_grad()
    def frozen_features(self, inputs: ModelInputs) -> FrozenFeatures:
        """The audio tower, the vision tower and the SAM image encoder (or the cached embeddings the
        batch carries) on each clip of ``inputs`` once, without activations kept (they are frozen),
        in chunks of at most ``encoder_batch`` frames (at least one clip) so memory does not grow
        with the batch. A batch read from the frozen-feature cache (``data.cache_towers``) carries
        all three: nothing runs."""
        dtype = self.seg_proj[0].weight.dtype
        if inputs.audio_features is not None:
            return FrozenFeatures(inputs.audio_features.to(dtype), inputs.video_features.to(dtype),
                                  inputs.sam_image_embeddings.to(dtype))
        b, t = inputs.sam_pixel_values.shape[:2]
        per = max(1, self.encoder_batch // t)
        th = self.thinker.model
        audio, video = [], []
        for i in range(0, b, per):
            part = inputs.rows(i, min(b, i + per))
            a = th.get_audio_features(part.input_features, part.feature_attention_mask).last_hidden_state
            audio.append(a.reshape(part.batch_size, -1, a.shape[-1]))  # equal lengths: fixed-length clips
            v = th.get_video_features(part.pixel_values_videos, part.video_grid_thw).pooler_output
            video.append(torch.stack(list(v)))
        emb = inputs.sam_image_embeddings  # read from the cache (data.cache_frozen_features), stored in fp16
        if emb is None:
            emb = self.image_embeddings(inputs.sam_pixel_values).unflatten(0, (b, t))
        return FrozenFeatures(torch.cat(audio), torch.cat(video), emb.to(dtype))

    def image_embeddings(self, sam_pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, T, 3, s, s] -> [B*T, D, e, e], ``encoder_batch`` frames per encoder call."""
        frames = sam_pixel_values.flatten(0, 1)
        if frames.dim() != 4:
            raise ValueError(f"SAM pixels of shape {tuple(sam_pixel_values.shape)}: a batch read from the SAM "
                             "embedding cache carries sam_image_embeddings instead; pass them on")
        with torch.no_grad():  # frozen encoder: no activations kept for backward
            return torch.cat([self.sam.vision_encoder(frames[i:i + self.encoder_batch]).last_hidden_state
                              for i in range(0, frames.shape[0], self.encoder_batch)])

    def decode_masks(self, seg: torch.Tensor, sam_pixel_values: torch.Tensor, has_seg: torch.Tensor,
                     image_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """[B, D] prompts x [B, T, 3, s, s] frames -> mask logits [B, T, S, S] (S = mask_size);
        ``image_embeddings`` [B*T, D, e, e] when already computed."""
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
        for the log-probs (at the sampling temperature) and the masks at each completion's [SEG].
        The frozen encoders run once per prompt; its G samples share their outputs in both."""
        g = num_samples
        gen_kwargs = dict(max_new_tokens=max_new_tokens, num_return_sequences=g, eos_token_id=eos_id,
                          pad_token_id=pad_id, suppress_tokens=suppress_ids or None, use_cache=True)
        if do_sample:
            gen_kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        else:
            gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        feats = self.frozen_features(prompts)
        seqs = self.llm.generate(**self.thinker_inputs(prompts, feats), **gen_kwargs)
        p = prompts.input_ids.shape[1]
        comp = seqs[:, p:]
        is_end = comp == eos_id
        comp_mask = ((is_end.long().cumsum(1) - is_end.long()) == 0).long()  # through the first end token
        comp = comp.masked_fill(comp_mask == 0, pad_id)
        out, logits = self.forward_completions(prompts.repeat_interleave(g), comp, comp_mask,
                                               features=feats.repeat_interleave(g))
        logprobs = token_logprobs(logits, comp, temperature if do_sample else 1.0) * comp_mask
        texts = [decode(row[m.bool()]) for row, m in zip(comp, comp_mask)]
        return Rollouts(texts, comp, comp_mask, logprobs, out.mask_logits, out.has_seg, feats)

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
            out, _ = self.forward_completions(prompts.rows(j, j + 1), full, torch.ones_like(full),
                                              features=r.features.rows(j, j + 1))
            masks[i] = out.mask_logits[0].to(masks.dtype)
        return masks

    def forward_completions(self, prompts: ModelInputs, completion_ids: torch.Tensor,
                            completion_mask: torch.Tensor, with_masks: bool = True,
                            features: FrozenFeatures | None = None) -> tuple[AuroraOutput, torch.Tensor]:
        """Teacher-forced forward of (left-padded) prompts + completions, one row each; returns the
        output and the logits that predict each completion token ([N, C, V])."""
        full = with_completions(prompts, completion_ids, completion_mask)
        p = prompts.input_ids.shape[1]
        out = self.forward(full, with_masks=with_masks, seg_from=p, features=features, logits_from=p - 1)
        return out, out.logits[:, :-1]


def empty_masks_where_none(mask_logits: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """``mask_logits`` [N, T, S, S] with the masks of every answer whose target is ``none`` emptied
    (``model.empty_mask_on_none``): the answer is the model's decision that the referent is absent,
    and its mask follows it (GSVA's [REJ] token does the same) instead of whatever the decoder draws
    from that answer's [SEG]. Null expressions must produce empty masks (Ref-AVS ``test_n``, Null S)."""
    none = [i for i, t in enumerate(texts) if reasoning.parse_answer(t).predicted_class == reasoning.NULL_CLASS]
    if not none:
        return mask_logits
    out = mask_logits.clone()
    out[none] = NO_SEG_LOGIT
    return out


def with_completions(prompts: ModelInputs, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> ModelInputs:
    """Prompts (left-padded) followed by completions: the rows a teacher-forced forward reads. The
    answer's [SEG] is searched from column ``prompts.input_ids.shape[1]`` on (``seg_from``)."""
    return replace(prompts, input_ids=torch.cat([prompts.input_ids, completion_ids], 1),
                   attention_mask=torch.cat([prompts.attention_mask,
                                             completion_mask.to(prompts.attention_mask.dtype)], 1))


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(tokens) from logits aligned with them ([B, C, V], [B, C])."""
    return torch.log_softmax(logits.float() / temperature, -1).gather(-1, tokens[..., None]).squeeze(-1)
