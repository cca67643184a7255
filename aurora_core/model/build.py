"""Building AURORA models (tiny random or from local checkpoints) and saving/loading them.

Export directory (HF-style, no pickle anywhere)::

    aurora.json                 what to rebuild: model config, base paths, token ids, LoRA on/off
    tokenizer/                  tokenizer.save_pretrained
    base/                       thinker weights (safetensors) when the base is not a local checkpoint
                                (the tiny default's random weights); real runs reference llm_path
    adapter/                    peft save_pretrained: LoRA + lm_head/embed_tokens (safetensors)
    llm/                        full thinker weights instead of base/+adapter/ when LoRA is off
    sam/                        SamModel weights when SAM is tiny; real runs reference sam_path
    heads.safetensors           seg_proj.*, seg_norm.* (its input's standardiser) and sam.mask_decoder.*
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
    SamConfig,
    SamModel,
)

from aurora_core.config import DataConfig, ModelConfig
from aurora_core.data.atomic import staged_dir
from aurora_core.model import token_rows
from aurora_core.model.aurora import AuroraModel
from aurora_core.model.processor import AuroraProcessor
from aurora_core.model.tokenizer import CHAT_END, MM_TOKENS, build_tiny_tokenizer, load_tokenizer, token_id
from aurora_core.reasoning import SEG_TOKEN
from aurora_core.train.zero3 import gathered

log = logging.getLogger(__name__)
EXPORT_FORMAT = 1


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def tiny_thinker_config(m: ModelConfig, tok) -> Qwen2_5OmniThinkerConfig:
    t = m.tiny
    head_dim = t.hidden_size // t.num_heads
    hw = (head_dim // 2) * 3 // 8  # mrope (temporal, height, width) sections sum to head_dim / 2
    ids = {name: token_id(tok, text) for name, text in MM_TOKENS.items()}
    return Qwen2_5OmniThinkerConfig(
        audio_config=dict(num_mel_bins=128, encoder_layers=t.audio_layers, encoder_attention_heads=2,
                          encoder_ffn_dim=2 * t.audio_d_model, d_model=t.audio_d_model, n_window=100,
                          output_dim=t.hidden_size, initializer_range=t.tower_init_range),
        vision_config=dict(depth=t.vision_depth, hidden_size=t.vision_hidden, intermediate_size=2 * t.vision_hidden,
                           num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           out_hidden_size=t.hidden_size, fullatt_block_indexes=[t.vision_depth - 1],
                           initializer_range=t.tower_init_range),
        text_config=dict(vocab_size=len(tok), hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                         num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                         num_key_value_heads=t.num_kv_heads, pad_token_id=tok.pad_token_id,
                         eos_token_id=token_id(tok, CHAT_END),
                         rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta,
                                          "mrope_section": list(t.mrope_section) or [head_dim // 2 - 2 * hw, hw, hw]}),
        audio_token_index=ids["audio_token"], image_token_index=ids["image_token"],
        video_token_index=ids["video_token"], audio_start_token_id=ids["audio_bos_token"],
        audio_end_token_id=ids["audio_eos_token"], user_token_id=token_id(tok, "user"),
        # read by get_rope_index though not declared by the config class (real checkpoints carry them)
        vision_start_token_id=ids["vision_bos_token"], vision_end_token_id=ids["vision_eos_token"],
    )


def tiny_sam_config(m: ModelConfig) -> SamConfig:
    t, s = m.tiny, m.sam_image_size
    return SamConfig(
        vision_config=dict(hidden_size=t.sam_vision_hidden, output_channels=t.sam_hidden,
                           num_hidden_layers=t.sam_vision_layers, num_attention_heads=2, image_size=s, patch_size=t.sam_patch_size,
                           window_size=2, global_attn_indexes=[t.sam_vision_layers - 1],
                           num_pos_feats=t.sam_hidden // 2, mlp_dim=2 * t.sam_vision_hidden,
                           # SamVisionConfig defaults to initializer_range=1e-10 (pretrained weights are
                           # always loaded in practice): a random tiny encoder would output zeros
                           initializer_range=0.02),
        prompt_encoder_config=dict(hidden_size=t.sam_hidden, image_size=s, patch_size=t.sam_patch_size, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=t.sam_hidden, mlp_dim=2 * t.sam_hidden, num_hidden_layers=2,
                                 num_attention_heads=2, iou_head_hidden_dim=t.sam_hidden),
    )


def _lora(m: ModelConfig) -> Any:
    """LoRA on the LLM's attention; with ``model.trainable_tokens=full`` whole trainable copies of
    ``embed_tokens`` and ``lm_head`` too (``new``: aurora_core.model.token_rows, after wrapping)."""
    from peft import LoraConfig

    full = m.trainable_tokens == "full"
    return LoraConfig(r=m.lora.r, lora_alpha=m.lora.alpha, lora_dropout=m.lora.dropout,
                      target_modules=m.lora.target_modules,
                      modules_to_save=["lm_head", "embed_tokens"] if full else None)


def new_token_ids(tok) -> list[int]:
    """The tokens this project adds to the LLM's vocabulary: [SEG]."""
    return [token_id(tok, SEG_TOKEN)]


def _checkpoint_layers(thinker: torch.nn.Module, m: ModelConfig) -> None:
    """``model.gradient_checkpointing``: recompute the decoder layers' activations in backward (the
    towers run frozen, without activations kept). Non-reentrant: the variant ZeRO-3 and peft support."""
    if m.gradient_checkpointing:
        thinker.model.language_model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})


def _load_thinker(path: str | Path, dtype: torch.dtype) -> torch.nn.Module:
    """Thinker weights from a local directory: a full Qwen2.5-Omni checkpoint (as the hub ships it),
    a thinker-only one, or an export's base/llm.

    From a full checkpoint only the thinker is built, its ``thinker.*`` keys mapped onto it
    (transformers' ``key_mapping``); the talker and token2wav weights are skipped. Loading through
    Qwen2_5OmniForConditionalGeneration instead would demand the talker's ``spk_dict.pt`` (a torch
    pickle) although the talker is never used. Missing thinker weights are an error, not a silent
    random init."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    kw: dict[str, Any] = {}
    if getattr(cfg, "model_type", "") == "qwen2_5_omni":
        kw = dict(config=cfg.thinker_config, key_mapping={r"^thinker\.": ""})
    thinker, info = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
        str(path), local_files_only=True, dtype=dtype, use_safetensors=True, output_loading_info=True, **kw)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(f"{path}: the checkpoint lacks {len(missing)} thinker weights ({', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}); is it a Qwen2.5-Omni checkpoint?")
    skipped = [k for k in info["unexpected_keys"] if not k.startswith(("talker.", "token2wav."))]
    if skipped:
        log.warning("%s: %d weights not used by the thinker (%s ...)", path, len(skipped), ", ".join(skipped[:3]))
    return thinker


TOWER_PREFIXES = ("audio_tower.", "visual.")  # the thinker's frozen towers; the rest is the language model


def tiny_thinker(m: ModelConfig, tok) -> Qwen2_5OmniThinkerForConditionalGeneration:
    """The tiny thinker at its seeded random init (``model.tiny.init_seed``), in float32."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(m.tiny.init_seed)
        return Qwen2_5OmniThinkerForConditionalGeneration(tiny_thinker_config(m, tok))


def _load_language_weights(thinker: torch.nn.Module, path: str) -> None:
    """The tiny thinker's language model (model.*, lm_head.*) from ``path`` (text_pretrain's file);
    the towers keep their seeded random init. Every language weight must be there, at its shape."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"model.tiny.llm_weights={path}: no such file; leave it unset and set "
                                "text_pretrain.steps > 0 for the stages to write it (or unset it for a random LLM)")
    state = load_file(path)
    own = {k: v for k, v in thinker.state_dict().items() if not k.startswith(TOWER_PREFIXES)}
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shape = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or extra or shape:
        raise ValueError(f"model.tiny.llm_weights={path} does not fit this tiny LLM (model.tiny widths, layers, "
                         f"vocabulary): missing {missing[:3]}, unexpected {extra[:3]}, other shape {shape[:3]}; "
                         "pretrain again with this config (text_pretrain.steps > 0, model.tiny.llm_weights unset)")
    thinker.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)


def _fit_vocabulary(thinker: torch.nn.Module, tok) -> None:
    """Grow the embedding (and lm_head) when the tokenizer has more tokens than the checkpoint's
    rows ([SEG] added to a vocabulary without spare rows). Qwen's matrices carry spare rows."""
    w = thinker.get_input_embeddings().weight
    if len(tok) > getattr(w, "ds_shape", w.shape)[0]:  # ds_shape: the full shape of a partitioned weight
        thinker.resize_token_embeddings(len(tok))


def build_model(m: ModelConfig, data: DataConfig) -> tuple[AuroraModel, AuroraProcessor]:
    """A fresh model: tiny with seeded random weights, or the local checkpoints in the config."""
    dtype = torch_dtype(m.dtype)
    if m.is_tiny:
        tok = build_tiny_tokenizer()
        thinker = tiny_thinker(m, tok).to(dtype)
        if m.tiny.llm_weights:
            _load_language_weights(thinker, m.tiny.llm_weights)
    else:
        tok = load_tokenizer(m.llm_path)
        thinker = _load_thinker(m.llm_path, dtype)
        _fit_vocabulary(thinker, tok)
    if m.sam_path is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(m.tiny.init_seed + 1)
            sam = SamModel(tiny_sam_config(m)).to(dtype)
    else:
        sam = SamModel.from_pretrained(m.sam_path, local_files_only=True, dtype=dtype, use_safetensors=True)
    _checkpoint_layers(thinker, m)
    llm = thinker
    if m.lora.enabled:
        from peft import get_peft_model

        llm = get_peft_model(thinker, _lora(m))
        if m.trainable_tokens == "new":
            token_rows.wrap(thinker, new_token_ids(tok))
    proc = AuroraProcessor(tok, m, data)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(m.tiny.init_seed + 2)
        model = AuroraModel(llm, sam, proc.seg_id, data.frame_size, m.encoder_batch)
    model.seg_proj.to(dtype)
    return model, proc


def parameter_report(model: AuroraModel) -> dict[str, dict[str, int]]:
    th = model.thinker
    parts = {"llm.audio_tower": th.model.audio_tower, "llm.visual": th.model.visual,
             "llm.language_model": th.model.language_model, "llm.lm_head": th.lm_head,
             "seg_proj": model.seg_proj, "sam.vision_encoder": model.sam.vision_encoder,
             "sam.prompt_encoder": model.sam.prompt_encoder, "sam.mask_decoder": model.sam.mask_decoder}
    rep = {k: {"total": sum(p.numel() for p in v.parameters()),
               "trainable": sum(p.numel() for p in v.parameters() if p.requires_grad)} for k, v in parts.items()}
    rep["all"] = {"total": sum(p.numel() for p in model.parameters()),
                  "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    return rep


# --------------------------------------------------------------------------- save / load

def head_state(model: AuroraModel) -> dict[str, torch.Tensor]:
    sd = {f"seg_proj.{k}": v for k, v in model.seg_proj.state_dict().items()}
    sd.update({f"seg_norm.{k}": v for k, v in model.seg_norm.state_dict().items()})
    sd.update({f"sam.mask_decoder.{k}": v for k, v in model.sam.mask_decoder.state_dict().items()})
    sd.update(token_rows.row_state(model.thinker))
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def save_export(model: AuroraModel, proc: AuroraProcessor, m: ModelConfig, out: Path,
                extra: dict[str, Any] | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write an export directory atomically. ``state_dict``: full weights gathered from ZeRO-3 (keys of
    ``model.state_dict()``) to save instead of the module's own (partitioned) tensors."""
    out = Path(out)
    if state_dict is not None:
        _load_state(model, state_dict)
    with staged_dir(out) as tmp:
        proc.tok.save_pretrained(tmp / "tokenizer")
        if model.has_lora:
            model.llm.save_pretrained(tmp / "adapter", safe_serialization=True)
            if m.is_tiny:
                model.thinker.save_pretrained(tmp / "base", safe_serialization=True,
                                              state_dict=_base_state(model))
        else:
            model.thinker.save_pretrained(tmp / "llm", safe_serialization=True)
        if m.sam_path is None:
            model.sam.save_pretrained(tmp / "sam", safe_serialization=True)
        save_file(head_state(model), str(tmp / "heads.safetensors"))
        meta = {"format": EXPORT_FORMAT, "model": _model_cfg_dict(m), "lora": model.has_lora,
                "seg_token": SEG_TOKEN, "seg_token_id": proc.seg_id, "mask_size": model.mask_size,
                **(extra or {})}
        (tmp / "aurora.json").write_text(json.dumps(meta, indent=1))
    log.info("exported model to %s", out)
    return out


def _model_cfg_dict(m: ModelConfig) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(m))  # type: ignore[return-value]


def _base_state(model: AuroraModel) -> dict[str, torch.Tensor]:
    """The thinker's frozen base weights under their plain (non-peft) names."""
    out = {}
    for k, v in model.thinker.state_dict().items():
        if "lora_" in k or "modules_to_save" in k or k.endswith(".rows"):
            continue
        k = k.replace(".base_layer.", ".").replace(".original_module.", ".").replace(".frozen.", ".")
        out[k] = v.detach().cpu().contiguous()
    return out


def _load_state(model: AuroraModel, sd: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected:
        raise ValueError(f"state dict has keys the model lacks: {unexpected[:5]}")


def is_export(path: Path) -> bool:
    return (Path(path) / "aurora.json").is_file()


RUNTIME_SETTINGS = ("encoder_batch", "gradient_checkpointing")  # how a process runs the model, not what it is


def load_export(path: str | Path, data: DataConfig, trainable: bool = True, dtype: str | None = None,
                runtime: ModelConfig | None = None) -> tuple[AuroraModel, AuroraProcessor, ModelConfig]:
    """Rebuild a model from an export directory (safetensors only, never unpickling). ``dtype`` and
    the ``RUNTIME_SETTINGS`` of ``runtime`` (this process's config) override what the export recorded."""
    from omegaconf import OmegaConf

    path = Path(path)
    if not is_export(path):
        raise FileNotFoundError(f"{path} is not an aurora export (no aurora.json)")
    meta = json.loads((path / "aurora.json").read_text())
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path}: export format {meta.get('format')} but this code reads {EXPORT_FORMAT}")
    m: ModelConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), meta["model"]))
    if dtype:
        m.dtype = dtype
    for k in RUNTIME_SETTINGS if runtime is not None else ():
        setattr(m, k, getattr(runtime, k))
    tdt = torch_dtype(m.dtype)
    tok = load_tokenizer(path / "tokenizer")
    if meta["lora"]:
        from peft import PeftModel

        base_dir = path / "base" if (path / "base").is_dir() else m.llm_path
        thinker = _load_thinker(base_dir, tdt)
        _fit_vocabulary(thinker, tok)
        if trainable:
            _checkpoint_layers(thinker, m)
        llm = PeftModel.from_pretrained(thinker, str(path / "adapter"), is_trainable=trainable)
        if m.trainable_tokens == "new":
            token_rows.wrap(thinker, new_token_ids(tok))
    else:
        llm = _load_thinker(path / "llm", tdt)
        if trainable:
            _checkpoint_layers(llm, m)
    sam_dir = path / "sam" if (path / "sam").is_dir() else m.sam_path
    sam = SamModel.from_pretrained(str(sam_dir), local_files_only=True, dtype=tdt, use_safetensors=True)
    proc = AuroraProcessor(tok, m, data)
    model = AuroraModel(llm, sam, proc.seg_id, data.frame_size, m.encoder_batch)
    heads = load_file(str(path / "heads.safetensors"))
    model.seg_proj.load_state_dict({k[len("seg_proj."):]: v for k, v in heads.items() if k.startswith("seg_proj.")})
    norm = {k[len("seg_norm."):]: v for k, v in heads.items() if k.startswith("seg_norm.")}
    if norm:  # an export from before seg_norm: its seg_proj read the raw state (the identity stays)
        model.seg_norm.load_state_dict(norm)
    with gathered(model.sam.mask_decoder.parameters(), modifier_rank=0):  # partitioned under model.zero_init
        model.sam.mask_decoder.load_state_dict(
            {k[len("sam.mask_decoder."):]: v for k, v in heads.items() if k.startswith("sam.mask_decoder.")})
    if m.trainable_tokens == "new":
        token_rows.load_row_state(model.thinker, heads, str(path / "heads.safetensors"))
    model.to(tdt)
    if not trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    return model, proc, m


def export_with_weights(init: str | Path | None, m: ModelConfig, data: DataConfig, weights: dict[str, torch.Tensor],
                        out: Path, extra: dict[str, Any],
                        before_save: Callable[[AuroraModel, AuroraProcessor], dict[str, Any]] | None = None) -> Path:
    """Export = the starting model (an export, or a fresh one from ``m``) with the trained weights
    gathered from a ZeRO-3 engine (trainable parameters by name) copied in; ``before_save`` (the
    stage's head fit) then changes the plain model in place, and what it returns joins ``extra``."""
    if init:
        model, proc, m = load_export(init, data, trainable=True)
    else:
        model, proc = build_model(m, data)
    named = dict(model.named_parameters())
    unknown = set(weights) - set(named)
    if unknown:
        raise KeyError(f"trained weights for parameters the model lacks: {sorted(unknown)[:3]}")
    with torch.no_grad():
        for n, v in weights.items():
            named[n].copy_(v.to(named[n].dtype))
    if before_save is not None:
        extra = {**extra, **before_save(model, proc)}
    return save_export(model, proc, m, out, extra=extra)


def export_merged(path: str | Path, out: str | Path, data: DataConfig) -> Path:
    """Serving export: LoRA merged into the thinker (merge_and_unload), no peft needed to load it."""
    model, proc, m = load_export(path, data, trainable=False)
    if model.has_lora:
        model.llm = model.llm.merge_and_unload()
        token_rows.unwrap(model.llm)
    # no adapter left: every weight is the model's own (the [SEG] rows merged in)
    m_full = replace(m, lora=replace(m.lora, enabled=False), trainable_tokens="full")
    return save_export(model, proc, m_full, Path(out), extra={"merged_from": str(path)})
