"""Decoded clips -> model inputs: the Qwen2.5-Omni prompt layout, video patches, audio features, SAM pixels.

Sequence layout (``use_audio_in_video=False``: a video segment, then an audio segment)::

    <|im_start|>user <|vision_bos|><|VIDEO|>*nv<|vision_eos|><|audio_bos|><|AUDIO|>*na<|audio_eos|>
    The reference is: {exp} Please segment ... <|im_end|> <|im_start|>assistant {answer} <|im_end|>

The library processors do the pixel and audio work (Qwen2VLVideoProcessor, WhisperFeatureExtractor,
SamImageProcessor); this module adds the placeholder counts and the label masking, which
Qwen2_5OmniProcessor would do too but with a 30-s audio pad and a video size default that overrides
ours (both measured), so we call its parts directly.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, Qwen2VLVideoProcessor, SamImageProcessor, WhisperFeatureExtractor

from aurora_core.config import DataConfig, ModelConfig
from aurora_core.losses import IGNORE_INDEX
from aurora_core.model.tokenizer import CHAT_END, CHAT_START, MM_TOKENS, token_id
from aurora_core.reasoning import SEG_TOKEN, prompt_text

log = logging.getLogger(__name__)

WHISPER_SAMPLE_RATE = 16000
TEMPORAL_PATCH = 2  # Qwen2.5-Omni vision: frames per temporal patch
MERGE = 2  # spatial merge: 2x2 patches -> one token
PATCH = 14  # vision patch side in pixels
# Qwen2.5-Omni's preprocessor_config.json values our token counts and tower inputs are built on
# (a checkpoint that differs is an error, not silently re-typed)
FIXED = {"patch_size": PATCH, "merge_size": MERGE, "temporal_patch_size": TEMPORAL_PATCH, "feature_size": 128}


@dataclass(frozen=True)
class Preprocessing:
    """The processors' settings: the checkpoint's ``preprocessor_config.json`` where it has one
    (Qwen2.5-Omni ships one file for its Whisper features and its Qwen2-VL image processor), the
    Qwen2.5-Omni values for the tiny default."""

    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    n_fft: int = 400
    source: str = "Qwen2.5-Omni defaults (tiny model)"

    @classmethod
    def for_model(cls, m: ModelConfig, data: DataConfig) -> Preprocessing:
        """Read ``<llm_path>/preprocessor_config.json``; a value that contradicts our config (hop length,
        sample rate) or the constants the token counts rest on is an error naming both values."""
        if m.llm_path is None or not (Path(m.llm_path) / "preprocessor_config.json").is_file():
            return cls(n_fft=max(400, 2 * m.audio_hop_length))
        path = Path(m.llm_path) / "preprocessor_config.json"
        pc = json.loads(path.read_text())
        ours = {**FIXED, "hop_length": m.audio_hop_length, "sampling_rate": data.sample_rate}
        where = {"hop_length": "model.audio_hop_length", "sampling_rate": "data.sample_rate"}
        for k, v in ours.items():
            if k in pc and pc[k] != v:
                raise ValueError(f"{path}: {k}={pc[k]} but we use {v}"
                                 f"{f' ({where[k]})' if k in where else ''}; set it to the checkpoint's value")
        return cls(tuple(pc.get("image_mean", cls.image_mean)), tuple(pc.get("image_std", cls.image_std)),
                   int(pc.get("n_fft", 400)), str(path))


@dataclass
class ModelInputs:
    """A batch of tensors for AuroraModel; every field's first dim is the batch except the video patches."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    input_features: torch.Tensor  # [B, 128, F] Whisper log-mel
    feature_attention_mask: torch.Tensor  # [B, F]
    pixel_values_videos: torch.Tensor  # [B * patches_per_video, C*2*14*14] (per-video blocks)
    video_grid_thw: torch.Tensor  # [B, 3]
    video_second_per_grid: torch.Tensor  # [B]
    sam_pixel_values: torch.Tensor  # [B, T, 3, s, s]; [B, T, 0] when sam_image_embeddings are given
    labels: torch.Tensor | None = None  # [B, L], IGNORE_INDEX outside the answer
    prompt_length: int = 0  # for left-padded prompt batches: the answer starts here
    # [B, T, D, e, e] SAM image-encoder output read from the cache (data.cache_frozen_features), or None
    sam_image_embeddings: torch.Tensor | None = None
    # [B, na, H] / [B, nv, H] the audio / vision towers' outputs read from the cache (data.cache_towers),
    # or None; with them input_features and pixel_values_videos are empty ([B, 128, 0], [0, C*2*14*14])
    audio_features: torch.Tensor | None = None
    video_features: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    def answer_start(self) -> int:
        """The first column holding an answer label in any row (right-padded training batches)."""
        has = (self.labels != IGNORE_INDEX).any(0).nonzero()
        return int(has[0]) if len(has) else self.input_ids.shape[1]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ModelInputs:
        def move(k: str, v: Any) -> Any:
            if not isinstance(v, torch.Tensor):
                return v
            if dtype is not None and v.is_floating_point() and k != "video_second_per_grid":
                return v.to(device=device, dtype=dtype)
            return v.to(device)
        return replace(self, **{f.name: move(f.name, getattr(self, f.name)) for f in fields(self)})

    def repeat_interleave(self, g: int) -> ModelInputs:
        """Each sample repeated g times in place ([p0, p0, p1, p1, ...]), video patches block-wise."""
        b = self.batch_size
        pv = self.pixel_values_videos.reshape(b, -1, self.pixel_values_videos.shape[-1])
        rep = {f.name: getattr(self, f.name).repeat_interleave(g, 0) for f in fields(self)
               if isinstance(getattr(self, f.name), torch.Tensor) and f.name != "pixel_values_videos"}
        return replace(self, **rep, pixel_values_videos=pv.repeat_interleave(g, 0).flatten(0, 1))

    def rows(self, start: int, stop: int) -> ModelInputs:
        """Samples ``start:stop`` (video patches are per-sample blocks of equal size)."""
        b = self.batch_size
        per = self.pixel_values_videos.shape[0] // b
        kw = {f.name: getattr(self, f.name)[start:stop] for f in fields(self)
              if isinstance(getattr(self, f.name), torch.Tensor) and f.name != "pixel_values_videos"}
        return replace(self, **kw, pixel_values_videos=self.pixel_values_videos[start * per:min(stop, b) * per])

    def thinker_kwargs(self) -> dict[str, Any]:
        return dict(input_ids=self.input_ids, attention_mask=self.attention_mask,
                    input_features=self.input_features, feature_attention_mask=self.feature_attention_mask,
                    pixel_values_videos=self.pixel_values_videos, video_grid_thw=self.video_grid_thw,
                    video_second_per_grid=self.video_second_per_grid, use_audio_in_video=False)


class AuroraProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, model: ModelConfig, data: DataConfig):
        if data.sample_rate != WHISPER_SAMPLE_RATE:
            raise ValueError(f"the Qwen2.5-Omni audio tower takes {WHISPER_SAMPLE_RATE} Hz audio; "
                             f"set data.sample_rate={WHISPER_SAMPLE_RATE} (got {data.sample_rate})")
        self.tok = tokenizer
        self.max_answer_tokens = model.max_answer_tokens
        self.pre = pre = Preprocessing.for_model(model, data)
        px = model.video_size * model.video_size
        self.video = Qwen2VLVideoProcessor(size={"shortest_edge": px, "longest_edge": px},
                                           cap_pixels_per_frame=False, temporal_patch_size=TEMPORAL_PATCH,
                                           patch_size=PATCH, merge_size=MERGE, image_mean=list(pre.image_mean),
                                           image_std=list(pre.image_std))
        self.audio = WhisperFeatureExtractor(feature_size=FIXED["feature_size"], sampling_rate=WHISPER_SAMPLE_RATE,
                                             hop_length=model.audio_hop_length, n_fft=pre.n_fft)
        self.sam = sam_processor(model)
        self.second_per_grid = TEMPORAL_PATCH / model.video_fps
        self.num_frames = data.num_frames
        # the vision tower groups frames in pairs: an odd count (AVSBench's 5) gets its last frame
        # repeated (as Qwen2VLVideoProcessor pads a short temporal patch); SAM still sees each frame once
        grid = -(-data.num_frames // TEMPORAL_PATCH) * (model.video_size // PATCH) ** 2
        self.num_video_tokens = grid // MERGE**2
        frames = int(round(data.audio_seconds * WHISPER_SAMPLE_RATE)) // model.audio_hop_length
        self.num_audio_tokens = ((frames - 1) // 2 + 1 - 2) // 2 + 1
        # what the processors make of a clip's shape, for batches whose towers' outputs are cached
        # (the placeholders' 3-D rope positions and audio lengths still need them): one blank clip
        probe = self._processed({"frames": torch.zeros(1, data.num_frames, 3, data.frame_size, data.frame_size,
                                                       dtype=torch.uint8),
                                 "audio": [torch.zeros(int(round(data.audio_seconds * WHISPER_SAMPLE_RATE)))]})
        self.audio_frames = probe["feature_attention_mask"].shape[1]
        self.audio_mask_dtype = probe["feature_attention_mask"].dtype
        self.video_grid = probe["video_grid_thw"][0]
        self.video_patch_dim = probe["pixel_values_videos"].shape[-1]
        self.eos_id = token_id(tokenizer, CHAT_END)
        self.seg_id = token_id(tokenizer, SEG_TOKEN)
        self.pad_id = tokenizer.pad_token_id
        # Tokens a completion must never contain: a sampled placeholder breaks the teacher-forced
        # forward (feature/token count mismatch) and a sampled pad is indistinguishable from padding.
        self.suppress_ids = sorted({token_id(tokenizer, t) for t in MM_TOKENS.values()}
                                   | {token_id(tokenizer, CHAT_START), self.pad_id}
                                   | ({tokenizer.unk_token_id} if tokenizer.unk_token_id is not None else set()))

    # ------------------------------------------------------------------ text
    def prompt_ids(self, expression: str) -> list[int]:
        mm = (MM_TOKENS["vision_bos_token"] + MM_TOKENS["video_token"] * self.num_video_tokens
              + MM_TOKENS["vision_eos_token"] + MM_TOKENS["audio_bos_token"]
              + MM_TOKENS["audio_token"] * self.num_audio_tokens + MM_TOKENS["audio_eos_token"])
        text = f"{CHAT_START}user\n{mm}{prompt_text(expression)}{CHAT_END}\n{CHAT_START}assistant\n"
        return self.tok(text, add_special_tokens=False).input_ids

    def answer_ids(self, answer: str, uid: str = "?") -> list[int]:
        ids = self.tok(answer, add_special_tokens=False).input_ids
        if len(ids) + 1 > self.max_answer_tokens:
            log.warning("answer of %s has %d tokens; cut to model.max_answer_tokens=%d", uid, len(ids) + 1,
                        self.max_answer_tokens)
            ids = ids[: self.max_answer_tokens - 1]
        return ids + [self.eos_id]

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = [i for i in ids if i not in (self.pad_id, self.eos_id)]
        return self.tok.decode(ids, skip_special_tokens=False).replace(self.tok.pad_token or "\0", "").strip()

    # ------------------------------------------------------------------ batches
    def _processed(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The towers' inputs: Qwen2-VL video patches and Whisper log-mel features."""
        frames = batch["frames"]  # uint8 [B, T, 3, S, S]
        b, t = frames.shape[:2]
        video = frames if t % TEMPORAL_PATCH == 0 else torch.cat([frames, frames[:, -1:]], dim=1)
        v = self.video(videos=list(video), return_tensors="pt")
        a = self.audio([x.numpy() if isinstance(x, torch.Tensor) else x for x in batch["audio"]],
                       sampling_rate=WHISPER_SAMPLE_RATE, return_attention_mask=True, padding="longest",
                       return_tensors="pt")
        return dict(input_features=a["input_features"], feature_attention_mask=a["attention_mask"],
                    pixel_values_videos=v["pixel_values_videos"], video_grid_thw=v["video_grid_thw"])

    def _media(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        b, t = len(batch["exp"]), self.num_frames
        if "audio_features" in batch:  # the towers' outputs are cached: neither processor nor tower runs
            media = dict(input_features=torch.empty(b, FIXED["feature_size"], 0),
                         feature_attention_mask=torch.ones(b, self.audio_frames, dtype=self.audio_mask_dtype),
                         pixel_values_videos=torch.empty(0, self.video_patch_dim),
                         video_grid_thw=self.video_grid.repeat(b, 1),
                         audio_features=batch["audio_features"], video_features=batch["video_features"])
        else:
            media = self._processed(batch)
        media["video_second_per_grid"] = torch.full((b,), self.second_per_grid)
        if "sam_embeddings" in batch:  # cached: SAM's 1024-px pixels are neither made nor encoded
            return dict(media, sam_pixel_values=torch.empty(b, t, 0), sam_image_embeddings=batch["sam_embeddings"])
        sam = self.sam(images=list(batch["frames"].flatten(0, 1)), return_tensors="pt")["pixel_values"]
        return dict(media, sam_pixel_values=sam.reshape(b, t, *sam.shape[1:]))

    def prompt_batch(self, batch: dict[str, Any]) -> ModelInputs:
        """Left-padded prompts, for generation (the completion starts at column prompt_length)."""
        seqs = [self.prompt_ids(e) for e in batch["exp"]]
        n = max(map(len, seqs))
        ids = torch.tensor([[self.pad_id] * (n - len(s)) + s for s in seqs])
        att = torch.tensor([[0] * (n - len(s)) + [1] * len(s) for s in seqs])
        return ModelInputs(input_ids=ids, attention_mask=att, prompt_length=n, **self._media(batch))

    def train_batch(self, batch: dict[str, Any], answers: list[str], contexts: list[str] | None = None) -> ModelInputs:
        """Prompt + answer per row, right-padded, labels on the answer tokens (and its end token).
        ``contexts``: text the answer continues, between prompt and answer and not trained on (the
        reflect stage's own reasoning before its correction)."""
        rows, labels = [], []
        for i, (exp, ans, uid) in enumerate(zip(batch["exp"], answers, batch["uid"])):
            c = self.tok(contexts[i], add_special_tokens=False).input_ids if contexts and contexts[i] else []
            p, a = self.prompt_ids(exp) + c, self.answer_ids(ans, uid)
            rows.append(p + a)
            labels.append([IGNORE_INDEX] * len(p) + a)
        n = max(map(len, rows))
        ids = torch.tensor([r + [self.pad_id] * (n - len(r)) for r in rows])
        att = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])
        lab = torch.tensor([r + [IGNORE_INDEX] * (n - len(r)) for r in labels])
        return ModelInputs(input_ids=ids, attention_mask=att, labels=lab, **self._media(batch))


def sam_processor(m: ModelConfig) -> SamImageProcessor:
    """SAM's processor: the checkpoint's own (its mean/std, resize and pad) when it ships one, which
    must agree with ``model.sam_image_size``; built from that size for the tiny default."""
    s = m.sam_image_size
    if m.sam_path is not None and (Path(m.sam_path) / "preprocessor_config.json").is_file():
        proc = SamImageProcessor.from_pretrained(m.sam_path, local_files_only=True)
        size = proc.size.get("longest_edge") if isinstance(proc.size, dict) else getattr(proc.size, "longest_edge", None)
        if size != s:
            raise ValueError(f"{m.sam_path}/preprocessor_config.json resizes to longest_edge={size} but "
                             f"model.sam_image_size={s}; set it to the checkpoint's value")
        return proc
    return SamImageProcessor(size={"longest_edge": s}, pad_size={"height": s, "width": s})
