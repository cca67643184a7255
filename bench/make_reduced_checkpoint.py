"""Reduced-depth checkpoints at the real widths, in the layout the Hugging Face hub ships them.

No weights can be downloaded here, yet loading code must be right for the real files. This writes,
with random weights (seeded) and depth cut to ``--layers`` per tower:

    <out>/qwen2.5-omni-<size>/           the full-Omni layout (Qwen/Qwen2.5-Omni-3B|7B):
        config.json                      model_type qwen2_5_omni; thinker_config / talker_config /
                                         token2wav_config (talker and token2wav are never built by aurora,
                                         so only their configs are written)
        model.safetensors                the thinker's weights under the hub's keys: thinker.audio_tower.*,
                                         thinker.visual.*, thinker.model.*, thinker.lm_head.* (bf16)
        tokenizer.json, tokenizer_config.json   Qwen's special tokens at their real ids 151643..151656
        preprocessor_config.json         Qwen2.5-Omni's Whisper and image processor settings
    <out>/qwen2.5-omni-<size>-thinker/   the thinker alone (model_type qwen2_5_omni_thinker, unprefixed keys)
    <out>/sam-<vit-b|vit-h>/             SamModel at 1024 px (facebook/sam-vit-base|huge widths) and the
                                         repo's preprocessor_config.json (SamImageProcessor)

Widths are the released ones (the 3B text config: hidden 2048, 36 layers, 16 heads / 2 KV heads,
vocabulary 151,936; 7B: 3584, 28 layers, 28 / 4, 152,064; both towers 1280 wide, the audio tower
20 heads, the vision tower 16). The tokenizer is word-level (our synthetic benchmark's words, then
reserved fillers up to id 151642, then Qwen's specials): the real one is byte-level BPE, which
cannot be built offline, but every id the model code looks up is where the real one has it.

    python bench/make_reduced_checkpoint.py --out /tmp/ckpt --size 3b --layers 2 --sam vit-b
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Qwen2.5-Omni's special tokens and their ids (tokenizer_config.json of the released checkpoints)
QWEN_SPECIALS = {
    151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>", 151646: "<|AUDIO|>",
    151647: "<|audio_bos|>", 151648: "<|audio_eos|>", 151649: "<|box_end|>", 151650: "<|quad_start|>",
    151651: "<|quad_end|>", 151652: "<|vision_bos|>", 151653: "<|vision_eos|>", 151654: "<|vision_pad|>",
    151655: "<|IMAGE|>", 151656: "<|VIDEO|>",
}
TEXT = {  # thinker text config of the released checkpoints
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064),
}
SAM_VISION = {  # facebook/sam-vit-base | sam-vit-huge image encoders
    "vit-b": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_dim=3072),
    "vit-h": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, mlp_dim=5120),
}
PREPROCESSOR = {  # Qwen2.5-Omni's preprocessor_config.json (Whisper features + Qwen2-VL image processor)
    "processor_class": "Qwen2_5OmniProcessor", "feature_extractor_type": "WhisperFeatureExtractor",
    "feature_size": 128, "hop_length": 160, "n_fft": 400, "sampling_rate": 16000, "chunk_length": 300,
    "n_samples": 4800000, "nb_max_frames": 30000, "padding_side": "right", "padding_value": 0.0,
    "return_attention_mask": True, "dither": 0.0,
    "image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "do_rescale": True, "do_normalize": True,
    "do_convert_rgb": True, "rescale_factor": 0.00392156862745098,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2, "min_pixels": 3136, "max_pixels": 12845056,
}

SAM_PREPROCESSOR = {  # facebook/sam-vit-huge's preprocessor_config.json
    "image_processor_type": "SamImageProcessor", "processor_class": "SamProcessor", "do_convert_rgb": True,
    "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "pad_size": {"height": 1024, "width": 1024},
    "rescale_factor": 0.00392156862745098, "resample": 2, "size": {"longest_edge": 1024},
}


def thinker_config(size: str, layers: int, text_layers: int | None = None):
    """The released thinker config of ``size`` with ``layers`` per tower (``text_layers`` for the LLM)."""
    from transformers import Qwen2_5OmniThinkerConfig

    t = TEXT[size]
    head_dim = t["hidden_size"] // t["num_attention_heads"]  # 128 for both sizes
    return Qwen2_5OmniThinkerConfig(
        audio_config=dict(num_mel_bins=128, encoder_layers=layers, encoder_attention_heads=20, encoder_ffn_dim=5120,
                          d_model=1280, n_window=100, output_dim=t["hidden_size"], max_source_positions=1500),
        vision_config=dict(depth=layers, hidden_size=1280, intermediate_size=3420,
                           num_heads=16, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           out_hidden_size=t["hidden_size"], fullatt_block_indexes=[layers - 1], in_channels=3),
        text_config=dict(**{**t, "num_hidden_layers": text_layers or layers}, head_dim=head_dim, rms_norm_eps=1e-6,
                         max_position_embeddings=32768, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        audio_token_index=151646, image_token_index=151655, video_token_index=151656,
        audio_start_token_id=151647, audio_end_token_id=151648, vision_start_token_id=151652,
        vision_end_token_id=151653, user_token_id=872, position_id_per_seconds=25, seconds_per_chunk=2,
        pad_token_id=151643, bos_token_id=151644, eos_token_id=151645,
    )


def write_tokenizer(out: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from aurora_core.model.tokenizer import CHAT_WORDS, PUNCTUATION
    from aurora_core.data.synthetic import VOCABULARY

    words = sorted(set(CHAT_WORDS + PUNCTUATION + list(VOCABULARY))) + ["<unk>"]
    first = min(QWEN_SPECIALS)
    vocab = {w: i for i, w in enumerate(words)}
    vocab.update({f"<|reserved_{i}|>": i for i in range(len(words), first)})
    vocab.update({text: i for i, text in QWEN_SPECIALS.items()})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIALS.values()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>")
    fast.save_pretrained(out)


def build(out: Path, size: str, layers: int, sam: str, seed: int = 0, text_layers: int | None = None) -> dict[str, Path]:
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import (Qwen2_5OmniConfig, Qwen2_5OmniThinkerForConditionalGeneration, SamConfig,
                              SamModel)

    out = Path(out)
    full, thinker_dir, sam_dir = out / f"qwen2.5-omni-{size}", out / f"qwen2.5-omni-{size}-thinker", out / f"sam-{sam}"
    tcfg = thinker_config(size, layers, text_layers)
    torch.manual_seed(seed)
    t0 = time.time()
    thinker = Qwen2_5OmniThinkerForConditionalGeneration(tcfg).to(torch.bfloat16)
    print(f"thinker built in {time.time() - t0:.0f}s: {sum(p.numel() for p in thinker.parameters()) / 1e6:.0f} M params")
    # the full-Omni layout: the hub's config with all three sub-configs, the thinker's weights under thinker.*
    full.mkdir(parents=True, exist_ok=True)
    ocfg = Qwen2_5OmniConfig(thinker_config=tcfg.to_dict(), talker_config=dict(num_hidden_layers=layers),
                             enable_audio_output=True)
    ocfg.save_pretrained(full)
    # save_pretrained writes the checkpoint key names (audio_tower.*, visual.*, model.*, lm_head.*),
    # which transformers maps onto its module tree when loading; the full layout prefixes them
    thinker.save_pretrained(thinker_dir, safe_serialization=True)
    del thinker
    with safe_open(str(thinker_dir / "model.safetensors"), "pt") as f:
        save_file({f"thinker.{k}": f.get_tensor(k) for k in f.keys()}, str(full / "model.safetensors"),
                  metadata={"format": "pt"})
    for d in (full, thinker_dir):
        (d / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
        write_tokenizer(d)
    v = SAM_VISION[sam]
    n = min(layers, v["num_hidden_layers"])
    scfg = SamConfig(vision_config=dict(**{**v, "num_hidden_layers": n}, image_size=1024, patch_size=16,
                                        window_size=14, global_attn_indexes=[n - 1], output_channels=256))
    SamModel(scfg).save_pretrained(sam_dir, safe_serialization=True)
    (sam_dir / "preprocessor_config.json").write_text(json.dumps(SAM_PREPROCESSOR, indent=2))
    print(f"wrote {full}, {thinker_dir}, {sam_dir} in {time.time() - t0:.0f}s")
    return {"full": full, "thinker": thinker_dir, "sam": sam_dir}


def cpu_overrides(dirs: dict[str, Path], root: Path) -> list[str]:
    """Overrides of configs/qwen2.5-omni-7b.yaml for a run on a reduced checkpoint on CPUs (tests and
    bench/real_widths.py): only where the files are, the device, and sizes that keep a CPU run short
    differ (a few clips, 1-2 workers, 32-token answers: the weights are random, so every answer runs to
    the limit). Frames 256, video 224, SAM 1024, 10 frames, 10 s of audio stay as configured."""
    return [
        f"run.root={root}", "run.name=reduced", "data.source=synthetic", "data.root=null",
        "data.synthetic.train_clips=2", "data.synthetic.val_clips=1", "data.synthetic.test_s_clips=1",
        "data.synthetic.test_u_clips=1", "data.synthetic.test_n_clips=1", "data.synthetic.expressions_per_clip=1",
        "data.conversion_workers=1", "data.rows_per_shard=16",
        f"model.llm_path={dirs['full']}", f"model.sam_path={dirs['sam']}", "model.dtype=float32",
        "model.encoder_batch=2", "model.max_answer_tokens=32",
        "train.use_gpu=false", "train.num_workers=2", "train.cpus_per_worker=0.5", "train.overlay_clips=1",
        "teacher.batch_size=1", "teacher.grad_accum=1", "teacher.max_steps=1", "teacher.warmup_steps=0",
        "teacher.val_rows=1",
        "inference.gpus_per_actor=0", "inference.actors=1", "inference.batch_size=1", "inference.max_new_tokens=32",
        "inference.cpus_per_actor=2",  # also the SAM embedding cache's actor (one thread per CPU)
        "grpo.use_gpu=false", "grpo.gpus_per_actor=0", "grpo.steps=1", "grpo.prompts_per_step=1", "grpo.num_samples=2",
        "grpo.rollout_actors=1", "grpo.learner_workers=1", "grpo.learner_cpus=1", "grpo.cpus_per_actor=1",
        "grpo.micro_batch=2", "grpo.max_new_tokens=32", "grpo.checkpoint_every=1", "grpo.warmup_steps=0",
        "eval.gpus_per_actor=0", "eval.actors=1", "eval.batch_size=1", "eval.cpus_per_actor=1",
        "eval.max_new_tokens=32", "eval.overlays=0", "eval.splits=[test_n]", "unreferenced.subsets=[]",
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--size", choices=sorted(TEXT), default="3b")
    p.add_argument("--layers", type=int, default=2, help="layers per tower (text, audio, vision, SAM encoder)")
    p.add_argument("--sam", choices=sorted(SAM_VISION), default="vit-b")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-layers", type=int, help="LLM decoder layers (default: --layers)")
    a = p.parse_args()
    build(Path(a.out), a.size, a.layers, a.sam, a.seed, a.text_layers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
