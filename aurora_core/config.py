"""Typed configuration: dataclass schemas, YAML files and dotted command-line overrides.

OmegaConf structured configs do the parsing, merging and type checking (unknown keys and wrong
types are rejected with the offending key named); this module only adds the schema, range checks
in ``__post_init__`` and the error wrapping that names the file or override at fault.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf  # noqa: F401  (MISSING re-exported for schemas)
from omegaconf.errors import OmegaConfBaseException

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "tiny.yaml"


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names which and why."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


class Source(str, Enum):
    synthetic = "synthetic"  # our generator, in the Ref-AVS layout (or the AVSBench one with data.subset)
    refavs = "refavs"  # the Ref-AVS release (GeWu-Lab) at data.root
    avsbench = "avsbench"  # the AVSBench release (OpenNLPLab) at data.root, subset data.subset


REFAVS_SPLITS = ("train", "val", "test_s", "test_u", "test_n")
AVSBENCH_SPLITS = ("train", "val", "test")
AVSBENCH_SUBSETS = ("s4", "ms3")
AVSBENCH_FRAMES = 5  # AVSBench clips: 5 frames (one per second), 5 s of audio


@dataclass
class RunConfig:
    name: str = "tiny"  # everything a run writes lives in <root>/<name>
    root: str = "runs"  # relative paths resolve against the working directory; give an absolute
    # path under `ray job submit`, whose working directory is a temporary copy.
    seed: int = 0

    @property
    def dir(self) -> Path:
        return (Path(self.root).expanduser() / self.name).resolve()


@dataclass
class SyntheticConfig:
    """Sizes of the synthetic Ref-AVS benchmark (see aurora_core.data.synthetic)."""

    seed: int = 0
    scale: float = 1.0  # multiplies every *_clips count: a quick way to a larger set
    train_clips: int = 96
    val_clips: int = 16
    test_s_clips: int = 16
    test_u_clips: int = 16
    test_n_clips: int = 16
    min_objects: int = 2
    max_objects: int = 3
    expressions_per_clip: int = 4
    null_expressions_per_train_clip: float = 0.25  # expected null rows per train clip
    image_size: int = 64  # raw frame resolution written to disk (frames per clip: data.num_frames)
    # the unreferenced set in the AVSBench layout (aurora_core.data.synthetic.generate_avsbench),
    # clips per split of each subset (S4: one sounding object, MS3: several)
    avs_train_clips: int = 24
    avs_val_clips: int = 8
    avs_test_clips: int = 16

    def __post_init__(self) -> None:
        _check(self.scale > 0, f"data.synthetic.scale must be > 0, got {self.scale}")
        _check(1 <= self.min_objects <= self.max_objects <= 3,
               "data.synthetic needs 1 <= min_objects <= max_objects <= 3")
        _check(self.image_size >= 32, "data.synthetic.image_size must be >= 32")
        _check(self.expressions_per_clip >= 1, "data.synthetic.expressions_per_clip must be >= 1")

    def clips(self, split: str) -> int:
        return max(1, round(getattr(self, f"{split}_clips") * self.scale))

    def avs_clips(self, split: str) -> int:
        return max(1, round(getattr(self, f"avs_{split}_clips") * self.scale))


@dataclass
class DataConfig:
    source: Source = Source.synthetic
    root: Optional[str] = None  # dataset in the official layout; synthetic default: <run>/data/raw
    shards: Optional[str] = None  # Parquet shard set; default: <run>/data/shards (AVSBench: shards-<subset>)
    # None: the Ref-AVS benchmark; s4 | ms3: an AVSBench subset (unreferenced: every row's
    # expression is data.unref_expression), from the release (source=avsbench) or synthetic
    subset: Optional[str] = None
    unref_expression: str = "the objects making sounds."
    num_frames: int = 10  # frames (and masks) per clip: {0..N-1}.jpg
    sample_rate: int = 16000  # audio is resampled to this rate when converted
    audio_seconds: float = 10.0  # decoded audio is padded/cut to this length
    frame_size: int = 64  # decoded frames and masks are resized to frame_size x frame_size
    rows_per_shard: int = 128
    conversion_workers: int = 2  # processes that read and validate rows in parallel
    lenient: bool = False  # quarantine bad rows instead of stopping at the first one
    # SAM image embeddings computed once per distinct clip (a Ray Data actor pool, inference.* sizes
    # it) and stored beside the shards; every stage then reads them instead of running SAM's
    # encoder (aurora_core.data.feature_cache). Disk: 2 MiB a frame at 1024 px.
    cache_frozen_features: bool = False
    # with cache_frozen_features: the audio and vision towers' outputs too, so that neither the
    # processors nor the towers run after the cache is built (the tiny default: they were ~40 % of a
    # step). Off for real widths: ~7 % of the frozen FLOPs at 7B, ~6 MiB a clip more on disk
    cache_towers: bool = False
    # the cache's directory; default <shards parent>/frozen-features/sam-<fingerprint of SAM and sizes>
    # (the stages fill it in when they build or check the cache)
    frozen_features_dir: Optional[str] = None
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        _check(self.num_frames >= 1, "data.num_frames must be >= 1")
        _check(self.sample_rate >= 1000, "data.sample_rate must be >= 1000")
        _check(self.frame_size >= 16, "data.frame_size must be >= 16")
        _check(self.rows_per_shard >= 1, "data.rows_per_shard must be >= 1")
        _check(self.conversion_workers >= 1, "data.conversion_workers must be >= 1")
        _check(self.subset in (None, *AVSBENCH_SUBSETS),
               f"data.subset must be null (Ref-AVS) or one of {', '.join(AVSBENCH_SUBSETS)}, got {self.subset!r}")
        _check(self.source != Source.avsbench or self.subset is not None,
               "data.source=avsbench needs data.subset=s4 or ms3")
        _check(not self.cache_towers or self.cache_frozen_features,
               "data.cache_towers needs data.cache_frozen_features=true (the towers' outputs live in that cache)")
        _check(self.source != Source.refavs or self.subset is None,
               "data.subset is for AVSBench; the Ref-AVS release (data.source=refavs) has none")
        _check(self.subset is None or self.num_frames == AVSBENCH_FRAMES,
               f"AVSBench clips have {AVSBENCH_FRAMES} frames: set data.num_frames={AVSBENCH_FRAMES} "
               f"(and data.audio_seconds=5) with data.subset={self.subset}")

    @property
    def benchmark(self) -> str:
        return "refavs" if self.subset is None else "avsbench"

    @property
    def features_dir(self) -> Optional[str]:
        """The SAM embedding cache the decoders read, None when the option is off."""
        if not self.cache_frozen_features:
            return None
        if self.frozen_features_dir is None:
            raise RuntimeError("data.cache_frozen_features is on but the cache was not prepared: the stages "
                               "build it first (aurora_core.stages.require_shards)")
        return self.frozen_features_dir

    @property
    def splits(self) -> tuple[str, ...]:
        return REFAVS_SPLITS if self.subset is None else AVSBENCH_SPLITS

    @property
    def test_splits(self) -> tuple[str, ...]:
        return REFAVS_SPLITS[2:] if self.subset is None else ("test",)

    def raw_dir(self, run: RunConfig) -> Path:
        """The dataset root: data.root, else where the generator writes (Ref-AVS: data/raw; AVSBench:
        data/raw-avsbench, holding Single-source/ and Multi-sources/ as the release does)."""
        if self.root:
            return Path(self.root).expanduser().resolve()
        return run.dir / "data" / ("raw" if self.subset is None else "raw-avsbench")

    def shards_dir(self, run: RunConfig) -> Path:
        if self.shards:
            return Path(self.shards).expanduser().resolve()
        return run.dir / "data" / ("shards" if self.subset is None else f"shards-{self.subset}")


@dataclass
class TinyModelConfig:
    """Sizes of the randomly initialised default (Qwen2.5-Omni thinker + SAM classes, ~1-3 M params)."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    audio_d_model: int = 32
    audio_layers: int = 2
    vision_hidden: int = 32
    vision_depth: int = 2
    sam_hidden: int = 32  # SAM prompt/decoder width (256 for SAM ViT-H)
    sam_vision_hidden: int = 32
    sam_vision_layers: int = 2
    # RoPE base of the LLM. Qwen2.5-Omni's 1e6 leaves a 32-dim head's height/width sections of the
    # multimodal RoPE (the lowest frequencies) turning < 1e-3 rad per patch row/column: a tiny model
    # then cannot tell left from right in the video tokens
    rope_theta: float = 1.0e6
    # the multimodal RoPE's (temporal, height, width) sections in frequencies, summing to head_dim / 2;
    # empty: Qwen2.5-Omni's proportions (16, 24, 24 of 64 -> 4, 6, 6 of 16). The sections take the
    # frequencies in that order, highest first, so the width section gets the lowest: at (4, 6, 6) and
    # base 100 the video tokens' left and right columns (w = 3, 4) differ by 0.013-0.056 rad. Measured
    # (pipelines/all.py, the tiny default otherwise): (1, 1, 14) named the two objects of two-object
    # test_s clips in their slots 77 % of the time after SFT at seed 0 (43 % at (4, 6, 6)), but 39 % at
    # run.seed=1, where SFT answered "none" to most test_s rows; (2, 2, 12) 44 %, (0, 0, 16) 52 %
    mrope_section: list[int] = field(default_factory=list)
    # weight init std of the frozen audio and vision towers (transformers' default 0.02 leaves a random
    # audio tower's output 99.6 % its positional embedding: the same for every clip)
    tower_init_range: float = 0.02
    sam_patch_size: int = 8  # SAM ViT patch (SAM uses 16; 8 gives the tiny 64-px input an 8x8 grid); image embeddings are sam_image_size / patch
    init_seed: int = 0  # same seed -> same random base weights, for every stage
    # the language model's weights (a safetensors file of the thinker's model.* and lm_head.*) loaded
    # over the random init: text_pretrain's output, set by the stages when text_pretrain.steps > 0
    llm_weights: Optional[str] = None


@dataclass
class TextPretrainConfig:
    """The tiny default's language pretraining (aurora_core.train.text_pretrain): what a real run gets
    from its pretrained LLM. Off (steps 0) unless a config turns it on; only with the tiny model."""

    steps: int = 0  # optimizer steps; 0: the LLM starts from its random init
    batch_size: int = 16
    lr: float = 1.0e-3
    scenes: int = 2048  # synthetic scenes (never rendered) whose expressions and CoTs are the corpus
    check_scenes: int = 256  # the stream's next scenes: held out, their category / null rows measure Step 4's check
    seed: int = 1  # the corpus and the row order

    def __post_init__(self) -> None:
        _check(self.steps >= 0 and self.batch_size >= 1 and self.scenes >= 1 and self.check_scenes >= 1 and self.lr > 0,
               "text_pretrain needs steps >= 0, batch_size >= 1, scenes >= 1, check_scenes >= 1 and lr > 0")


@dataclass
class LoraSettings:
    enabled: bool = True
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    # LLM attention only (the audio tower also has q_proj/v_proj: they stay frozen)
    target_modules: str = r".*language_model\.layers\.\d+\.self_attn\.(q_proj|v_proj)"


@dataclass
class ModelConfig:
    llm_path: Optional[str] = None  # local Qwen2.5-Omni checkpoint dir (thinker weights); None: tiny
    sam_path: Optional[str] = None  # local SAM checkpoint dir (e.g. sam-vit-huge); None: tiny
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    video_size: int = 56  # frames are resized to video_size^2 for the vision tower (multiple of 28)
    video_fps: float = 1.0  # frame rate of the clip frames (Ref-AVS: one frame per second)
    audio_hop_length: int = 640  # Whisper features; 160 for real Qwen2.5-Omni (640 = 4x fewer tokens)
    sam_image_size: int = 64  # SAM input size (1024 for SAM ViT-H)
    # frames per call of the frozen SAM image encoder: its global attention holds heads x 4096^2
    # scores per frame at 1024 px, so memory must not grow with batch x samples x frames
    encoder_batch: int = 8
    dtype: str = "float32"  # float32 | bfloat16 (bf16 on GPUs)
    max_answer_tokens: int = 160  # training targets are cut to this many tokens (with a warning)
    # Rows of the token embedding and lm_head that train (with LoRA): ``full`` = both whole matrices
    # (AURORA / LISA; 2 x 152,064 x 3,584 = 1.09 B parameters at 7B, ~2.2 GB per bf16 weight push),
    # ``new`` = only the rows of the tokens we add ([SEG]; aurora_core.model.token_rows).
    trainable_tokens: str = "full"
    # activation checkpointing of the LLM's decoder layers (recompute in backward): real widths
    gradient_checkpointing: bool = False
    # ZeRO-3 workers (SFT stages, GRPO learner) construct and load the model partitioned
    # (deepspeed.zero.Init through transformers' HfDeepSpeedConfig): no worker holds the whole model
    # in host RAM, only rank 0 reads the checkpoint's values. Real checkpoints only (the tiny model is
    # built from a config, and is small)
    zero_init: bool = False
    # an answer whose target is "none" gets an empty mask in evaluation and in GRPO's rollouts (their
    # rewards), whatever the mask decoder draws from its [SEG] (aurora_core.model.aurora.
    # empty_masks_where_none): the text decides that nothing is there, the mask follows. false: the
    # decoder's masks as they are (results.json records which)
    empty_mask_on_none: bool = True

    def __post_init__(self) -> None:
        _check(self.trainable_tokens in ("full", "new"),
               f"model.trainable_tokens must be full or new, got {self.trainable_tokens!r}")
        _check(self.trainable_tokens == "full" or self.lora.enabled,
               "model.trainable_tokens=new needs model.lora.enabled=true (without LoRA every weight trains)")
        _check(self.encoder_batch >= 1, "model.encoder_batch must be >= 1")
        _check(not self.zero_init or not self.is_tiny,
               "model.zero_init needs a real checkpoint (model.llm_path); the tiny model is built from a config")
        _check(not (self.zero_init and self.lora.enabled and self.trainable_tokens == "full"),
               "model.zero_init with LoRA needs model.trainable_tokens=new (peft's modules_to_save copies "
               "the whole embed_tokens/lm_head, which zero.Init has partitioned)")
        _check(self.video_size % 28 == 0, f"model.video_size must be a multiple of 28, got {self.video_size}")
        _check(self.dtype in ("float32", "bfloat16"), f"model.dtype must be float32 or bfloat16, got {self.dtype}")
        _check(self.tiny.hidden_size % self.tiny.num_heads == 0, "model.tiny.hidden_size must divide by num_heads")
        _check((self.tiny.hidden_size // self.tiny.num_heads) % 8 == 0,
               "model.tiny head dim (hidden_size / num_heads) must be a multiple of 8 (mrope sections)")
        half, sections = self.tiny.hidden_size // self.tiny.num_heads // 2, list(self.tiny.mrope_section)
        _check(not sections or (len(sections) == 3 and sum(sections) == half),
               f"model.tiny.mrope_section must be 3 sections summing to head_dim / 2 = {half}, got {sections}")

    @property
    def is_tiny(self) -> bool:
        return self.llm_path is None


@dataclass
class TrainConfig:
    """Shared by the teacher, SFT and reflect stages (Ray Train + DeepSpeed)."""

    num_workers: int = 2
    use_gpu: bool = False  # GPUs: NCCL + bf16; CPUs: gloo + fp32
    cpus_per_worker: float = 0.5  # fractional on small machines: Ray Data read tasks need CPUs too
    deepspeed_config: str = "configs/deepspeed/zero3.json"  # relative to the repo root or absolute
    checkpoint_every_steps: int = 0  # 0: at the end of each epoch only
    num_to_keep: int = 2
    max_failures: int = 1  # worker-group restarts from the last checkpoint (Ray FailureConfig)
    log_every_steps: int = 1  # MLflow metrics every N optimizer steps
    print_every_steps: int = 0  # a console line every N optimizer steps too (0: one line per epoch)
    sample_log: bool = True  # record the row keys of every step (audits exactly-once resumption)
    overlay_clips: int = 2  # validation clips drawn as mask overlays into MLflow each epoch
    # Each epoch shuffles the order of its blocks (shard files) and then rows within a window of this
    # many batches on each worker (Ray Data's local shuffle buffer; a full random_shuffle is an
    # all-to-all exchange). Rows held in memory: this x batch_size per worker
    shuffle_buffer_batches: int = 8

    def __post_init__(self) -> None:
        _check(self.num_workers >= 1, "train.num_workers must be >= 1")
        _check(self.cpus_per_worker > 0, "train.cpus_per_worker must be > 0")
        _check(self.max_failures >= 0, "train.max_failures must be >= 0")
        _check(self.shuffle_buffer_batches >= 1, "train.shuffle_buffer_batches must be >= 1")


@dataclass
class StageConfig:
    """Optimisation and loss settings of one supervised stage."""

    epochs: int = 2
    batch_size: int = 4  # per worker micro-batch
    grad_accum: int = 1
    lr: float = 1e-3
    # > 0: the LLM's trainable weights (LoRA or the whole thinker) learn at this LR and the segmentation
    # head (seg_proj, SAM's mask decoder) at ``lr``; 0: every part at ``lr``. The head learns from
    # scratch and the LLM's text is easily unlearnt, so they may want different rates (measured for
    # the tiny default in configs/tiny.yaml)
    llm_lr: float = 0.0
    weight_decay: float = 0.0
    warmup_steps: int = 5
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    lm_weight: float = 1.0
    bce_weight: float = 2.0
    dice_weight: float = 0.5
    distill_weight: float = 0.0  # SFT: [SEG] feature distillation against the stage-0 teacher
    # train on the rows whose referent is absent (class null: "none" and an empty mask). false for a
    # teacher that is a segmentation anchor only: SFT then distils its [SEG] on the other rows alone
    null_rows: bool = True
    max_steps: int = 0  # >0: stop after this many optimizer steps (smoke runs)
    # >0: the mask losses of a training step on this many frames of each clip (a seeded draw per step)
    # instead of all of them: SAM's decoder is half of a tiny step (validation decodes every frame)
    mask_frames: int = 0
    val_rows: int = 0  # >0: validate on at most this many rows
    val_every_epochs: int = 1  # validation (and its overlays) every N epochs and after the last step
    # >0: after the last step, this many steps of seg_proj (afresh, at head_lr, on the [SEG] states
    # standardised per feature) and the mask decoder (at lr) alone, on the frozen final states of the
    # train rows with a referent (aurora_core/train/head_fit.py: why, and what it holds in memory).
    # Needs data.cache_frozen_features
    head_steps: int = 0
    head_lr: float = 5e-4

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "epochs must be >= 1")
        _check(self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1")
        _check(self.lr > 0, "lr must be > 0")
        _check(self.llm_lr >= 0, "llm_lr must be >= 0 (0: the LLM at lr as well)")
        _check(self.mask_frames >= 0, "mask_frames must be >= 0 (0: every frame)")
        _check(self.head_steps >= 0 and self.head_lr > 0, "head_steps must be >= 0 and head_lr > 0")
        _check(min(self.lm_weight, self.bce_weight, self.dice_weight, self.distill_weight) >= 0,
               "loss weights must be >= 0")


@dataclass
class ReflectStageConfig(StageConfig):
    """Stage 2: training (as every stage) plus which answers of the stage-1 model count as wrong."""

    iou_threshold: float = 0.5  # an answer whose masks have IoU below this is corrected
    # > 0: the stage-1 model answers this many train rows (a seeded choice) and the stage trains on
    # them; 0: every train row (the paper). Answering is generation: the dearest part of the stage
    rows: int = 0
    # the LM loss of a corrected row on the model's own (wrong) reasoning as well; false: only on the
    # trigger and the correct CoT after it, the own reasoning being the context the correction follows
    # (trained on, the tiny model learnt to say its mistakes again: structure rate 0.94 -> 0.16)
    train_own_reasoning: bool = False


@dataclass
class InferenceConfig:
    """The batch-inference pool inside the stages (a Ray Data actor pool over an export): the
    teacher's [SEG] embeddings for SFT's distillation, the stage-1 model's answers for reflect."""

    batch_size: int = 8
    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    max_new_tokens: int = 160
    temperature: float = 0.0  # 0: greedy (the model's most likely answer)


@dataclass
class GRPOConfig:
    """Stage 3: GRPO with format + class + IoU rewards on a rollout pool and a ZeRO-3 learner."""

    init: Optional[str] = None  # export to start from; default: <run>/exports/reflect
    steps: int = 20
    prompts_per_step: int = 4
    num_samples: int = 3  # G completions per prompt
    temperature: float = 1.0
    top_p: float = 0.9
    max_new_tokens: int = 160  # >= model.max_answer_tokens, validated
    # optimisation
    lr: float = 5e-4
    # > 0: the LLM's trainable weights at this LR and the segmentation head (trained by the mask loss
    # below) at ``lr``; 0: every part at ``lr`` (as StageConfig.llm_lr)
    llm_lr: float = 0.0
    weight_decay: float = 0.0
    warmup_steps: int = 2
    num_iterations: int = 1  # passes (optimizer steps) over each batch of rollouts
    micro_batch: int = 6  # samples per learner forward/backward
    clip_eps: float = 0.2
    clip_eps_high: Optional[float] = None  # asymmetric upper clip (DAPO "clip-higher"); None: = clip_eps
    scale_rewards: bool = True  # divide advantages by the group std; false: Dr.GRPO
    adv_eps: float = 1e-4
    kl_coef: float = 0.0  # the paper's code declares beta=0.04 but leaves KL off
    kl_estimator: str = "k3"  # k1 | k2 | k3, against the reference = the export GRPO starts from
    mask_loss_weight: float = 1.0  # x (bce_weight * BCE + dice_weight * Dice) on the rollouts, as the paper's code adds
    bce_weight: float = 2.0
    dice_weight: float = 0.5
    # token_mean: policy (+KL) loss over every completion token of the step (DAPO); seq_mean: mean
    # over each completion's tokens, then over completions (the original GRPO, AURORA's code)
    loss_agg: str = "token_mean"
    # completions cut by max_new_tokens before an end token: keep = scored and trained on like any
    # other (they get format 0 and an empty mask); mask = left out of the policy/KL loss (DAPO's
    # overlong filtering). Either way their fraction is logged (truncated_frac).
    overlong: str = "keep"
    # max_new_tokens below model.max_answer_tokens cuts rollouts before "It is [SEG]." and is
    # rejected unless this is set (short smoke runs and tests only)
    allow_truncation: bool = False
    # rewards
    reward_format: float = 1.0
    reward_class: float = 1.0
    reward_iou: float = 1.0
    iou_threshold: float = 0.5  # sigmoid threshold of the IoU reward
    # sampling options
    shuffle_buffer: int = 64  # rows mixed (seeded) when drawing prompts; 0: shard order within blocks
    dynamic_sampling: bool = False  # drop groups whose rewards do not vary and draw more prompts
    max_refill_rounds: int = 4
    async_rollouts: bool = False  # one-step off-policy: rollouts for step t+1 overlap learning step t
    # distribution
    rollout_actors: int = 2
    rollout_chunk: int = 1  # prompts per rollout task (small chunks keep every actor busy)
    cpus_per_actor: float = 0.5
    gpus_per_actor: float = 0.0
    learner_workers: int = 1
    learner_cpus: float = 0.5
    # GPUs per learner worker with grpo.use_gpu (a fraction shares one GPU with rollout actors: one-GPU
    # machines, bench/gpu_check.py; NCCL broadcast sync then needs grpo.weight_sync=object_store)
    learner_gpus: float = 1.0
    use_gpu: bool = False  # learner on GPUs (NCCL + bf16)
    # the learner's frozen-encoder features (SAM image embeddings, tower outputs): "ship" = the rollout
    # actor that computed them puts them in the object store, once per prompt (recomputed only when
    # lost: a dead actor, a resumed queue); "recompute" = the learner runs the frozen encoders again
    # once per prompt per step. Measured by bench/real_widths.py: shipping is ~80x cheaper on CPU
    learner_features: str = "ship"
    deepspeed_config: str = "configs/deepspeed/zero3.json"
    checkpoint_every: int = 5
    num_to_keep: int = 2
    max_learner_restarts: int = 1  # a failed learner group is rebuilt from the last checkpoint
    # weight sync after each step: "broadcast" = a collective from learner rank 0 to every rollout
    # actor (NCCL when the learner and the actors have GPUs, gloo otherwise); "object_store" = one
    # ray.put read by every actor; "auto" = broadcast on GPUs, object_store on CPUs
    weight_sync: str = "auto"
    sync_timeout_s: int = 300  # a broadcast member that does not answer in time fails the step loudly

    def __post_init__(self) -> None:
        _check(self.steps >= 1 and self.prompts_per_step >= 1, "grpo.steps and prompts_per_step must be >= 1")
        _check(self.num_samples >= 2, "grpo.num_samples must be >= 2 (advantages are relative within a group)")
        _check(self.lr > 0 and self.llm_lr >= 0, "grpo.lr must be > 0 and grpo.llm_lr >= 0 (0: the LLM at lr as well)")
        _check(self.kl_estimator in ("k1", "k2", "k3"), f"grpo.kl_estimator must be k1, k2 or k3, got {self.kl_estimator}")
        _check(self.prompts_per_step % self.learner_workers == 0,
               "grpo.prompts_per_step must be a multiple of grpo.learner_workers")
        per_worker = self.prompts_per_step // self.learner_workers * self.num_samples
        _check(per_worker % self.micro_batch == 0,
               f"grpo: each learner gets {per_worker} samples, which must be a multiple of grpo.micro_batch "
               f"({self.micro_batch})")
        _check(self.rollout_actors >= 1 and self.rollout_chunk >= 1, "grpo.rollout_actors/rollout_chunk must be >= 1")
        _check(self.learner_features in ("ship", "recompute"),
               f"grpo.learner_features must be ship|recompute, not {self.learner_features!r}")
        _check(0 < self.clip_eps < 1, "grpo.clip_eps must be in (0, 1)")
        _check(self.num_iterations >= 1, "grpo.num_iterations must be >= 1")
        _check(self.weight_sync in ("auto", "broadcast", "object_store"),
               f"grpo.weight_sync must be auto, broadcast or object_store, got {self.weight_sync!r}")
        _check(self.sync_timeout_s >= 1, "grpo.sync_timeout_s must be >= 1")
        _check(self.shuffle_buffer >= 0, "grpo.shuffle_buffer must be >= 0")
        _check(self.loss_agg in ("token_mean", "seq_mean"), f"grpo.loss_agg must be token_mean or seq_mean, got {self.loss_agg!r}")
        _check(self.overlong in ("keep", "mask"), f"grpo.overlong must be keep or mask, got {self.overlong!r}")
        _check(self.warmup_steps >= 0, "grpo.warmup_steps must be >= 0")
        _check(0 < self.learner_gpus <= 1, f"grpo.learner_gpus must be in (0, 1], got {self.learner_gpus}")


ABLATIONS = ("audio", "video", "text")  # eval.ablate: the inputs an evaluation can take away


@dataclass
class EvalConfig:
    splits: Optional[list[str]] = None  # None: the benchmark's test splits (Ref-AVS test_s/u/n, AVSBench test)
    batch_size: int = 8
    actors: int = 2
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    max_new_tokens: int = 160
    overlays: int = 2  # mask overlays of the best and of the worst clips per split
    # The table shown: "official" = the Ref-AVS test loop (per-batch metrics of protocol_batch_clips
    # clips in metadata order, averaged over batches; published numbers use it), "split" = every
    # frame of a split at once. results.json and MLflow always get both.
    protocol: str = "official"
    protocol_batch_clips: int = 4  # the official loop's DataLoader(batch_size=4)
    score_size: int = 256  # masks are scored at score_size^2 (the official loader resizes to 256)
    # an answer without [SEG]: empty = no prompt for the mask decoder, an empty mask (lowers J,
    # flatters Null S); force = append "It is [SEG]." and decode the mask from that token, as
    # AURORA's inference does. results.json counts such answers per split either way (no_seg_frac).
    no_seg: str = "empty"
    # several exports evaluated at once (pipelines/all.py: every stage) share one pass over the data,
    # each predictor actor holding all of them: one actor start and one Ray Data pass instead of one
    # per export. For small models (the tiny default); at real widths an actor holds one export.
    together: bool = False
    # evaluate with one input taken away (bench/ablations.py): audio = silence, video = blank frames
    # for the thinker (SAM keeps the real ones, or no mask could be drawn at all), text = an empty
    # expression; None: the inputs as they are
    ablate: Optional[str] = None

    def __post_init__(self) -> None:
        _check(self.ablate in (None, *ABLATIONS), f"eval.ablate must be null or one of {', '.join(ABLATIONS)}, "
                                                  f"got {self.ablate!r}")
        bad = [s for s in self.splits or () if s not in REFAVS_SPLITS + AVSBENCH_SPLITS]
        _check(not bad, f"eval.splits: unknown split(s) {bad}")
        _check(self.protocol in ("official", "split"), f"eval.protocol must be official or split, got {self.protocol!r}")
        _check(self.protocol_batch_clips >= 1, "eval.protocol_batch_clips must be >= 1")
        _check(self.score_size >= 16, "eval.score_size must be >= 16")
        _check(self.no_seg in ("empty", "force"), f"eval.no_seg must be empty or force, got {self.no_seg!r}")


@dataclass
class UnreferencedConfig:
    """Zero-shot unreferenced segmentation (AVSBench S4 / MS3): pipelines/all.py evaluates every
    stage's export on the test split of each subset, after the Ref-AVS table."""

    subsets: list[str] = field(default_factory=lambda: ["s4", "ms3"])  # []: no unreferenced table
    source: Source = Source.synthetic  # synthetic (generated in the AVSBench layout) or avsbench (the release)
    root: Optional[str] = None  # the AVSBench release: the folder holding Single-source/ and Multi-sources/
    audio_seconds: float = 5.0
    # the frozen-feature cache for these test clips: None = as data.cache_frozen_features. Caching a
    # few clips that are read once costs an encoding job of its own (~15 s on the tiny default)
    cache_frozen_features: Optional[bool] = None

    def __post_init__(self) -> None:
        bad = [s for s in self.subsets if s not in AVSBENCH_SUBSETS]
        _check(not bad, f"unreferenced.subsets: unknown subset(s) {bad}; subsets are {', '.join(AVSBENCH_SUBSETS)}")
        _check(self.source in (Source.synthetic, Source.avsbench),
               f"unreferenced.source must be synthetic or avsbench, got {self.source.value}")
        _check(self.source != Source.avsbench or self.root is not None,
               "unreferenced.source=avsbench needs unreferenced.root (the AVSBench release folder)")


@dataclass
class TrackingConfig:
    experiment: Optional[str] = None  # default: aurora-<run.name>
    enabled: bool = True


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: join a cluster if RAY_ADDRESS is set, else start one locally
    num_cpus: Optional[int] = None  # logical CPUs of a locally started Ray (None: all)
    object_store_mb: Optional[int] = None


@dataclass
class AuroraConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    text_pretrain: TextPretrainConfig = field(default_factory=TextPretrainConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher: StageConfig = field(default_factory=StageConfig)
    sft: StageConfig = field(default_factory=lambda: StageConfig(distill_weight=1.0))
    reflect: ReflectStageConfig = field(default_factory=ReflectStageConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    unreferenced: UnreferencedConfig = field(default_factory=UnreferencedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        g, m = self.grpo, self.model
        _check(g.max_new_tokens >= m.max_answer_tokens or g.allow_truncation,
               f"grpo.max_new_tokens={g.max_new_tokens} is below model.max_answer_tokens={m.max_answer_tokens}: "
               "rollouts would be cut before 'It is [SEG].' (format 0, empty masks); raise grpo.max_new_tokens "
               "or set grpo.allow_truncation=true for a smoke run")
        _check(self.text_pretrain.steps == 0 or m.is_tiny,
               "text_pretrain.steps > 0 pretrains the tiny model's random LLM; a real checkpoint "
               f"(model.llm_path={m.llm_path}) is pretrained already: set text_pretrain.steps=0")
        _check(not self.reflect.head_steps, "reflect.head_steps must be 0: the reflect stage trains on the stage-1 "
               "model's answers and keeps the head that SFT's fit left (set sft.head_steps)")
        fits = [s for s in ("teacher", "sft") if getattr(self, s).head_steps]
        _check(not fits or self.data.cache_frozen_features,
               f"{', '.join(f'{s}.head_steps' for s in fits)} > 0: the head fit reads SAM's embeddings from the "
               "frozen-feature cache; set data.cache_frozen_features=true or the head_steps to 0")
        bad = [s for s in self.eval.splits or () if s not in self.data.splits]
        _check(not bad, f"eval.splits {bad} are not splits of the {self.data.benchmark} benchmark "
                        f"({', '.join(self.data.splits)})")

    @property
    def eval_splits(self) -> list[str]:
        return list(self.eval.splits or self.data.test_splits)

    def for_unreferenced(self, subset: str) -> "AuroraConfig":
        """This run's config with the data swapped for an AVSBench subset (zero-shot evaluation):
        5 frames, the unreferenced source and root, its own shard set; everything else unchanged."""
        import dataclasses

        u = self.unreferenced
        # frozen_features_dir: the AVSBench clips (5 frames, 5 s) have a cache of their own beside their shards
        cache = self.data.cache_frozen_features if u.cache_frozen_features is None else u.cache_frozen_features
        data = dataclasses.replace(self.data, source=u.source, root=u.root, shards=None, subset=subset,
                                   num_frames=AVSBENCH_FRAMES, audio_seconds=u.audio_seconds,
                                   frozen_features_dir=None, cache_frozen_features=cache,
                                   cache_towers=cache and self.data.cache_towers)
        # evaluation only: no stage trains, so no head fit reads a cache
        return dataclasses.replace(self, data=data, eval=dataclasses.replace(self.eval, splits=None),
                                   teacher=dataclasses.replace(self.teacher, head_steps=0),
                                   sft=dataclasses.replace(self.sft, head_steps=0))


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> AuroraConfig:
    """Schema defaults <- YAML file <- ``key=value`` overrides, type-checked at each merge."""
    merged = OmegaConf.structured(AuroraConfig)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        except OmegaConfBaseException as e:
            raise ConfigError(f"{path}: {_describe(e)}") from None
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {item!r}: {_describe(e)}") from None
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(_describe(e)) from None
    assert isinstance(cfg, AuroraConfig)
    return cfg


def _describe(e: OmegaConfBaseException) -> str:
    # OmegaConf appends a multi-line "full_key/object_type" trailer; keep the first line and key.
    first = str(e).splitlines()[0]
    key = getattr(e, "full_key", None)
    return f"{first} (key: {key})" if key and key not in first else first


def to_dict(cfg: AuroraConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)  # type: ignore[return-value]


def to_yaml(cfg: AuroraConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_from_dict(d: dict[str, Any]) -> AuroraConfig:
    """Rebuild a config shipped as a plain dict (e.g. to Ray workers), validated like a file."""
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(AuroraConfig), d))
    except OmegaConfBaseException as e:
        raise ConfigError(_describe(e)) from None
    assert isinstance(cfg, AuroraConfig)
    return cfg
