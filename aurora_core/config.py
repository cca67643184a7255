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
    synthetic = "synthetic"
    refavs = "refavs"


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

    def __post_init__(self) -> None:
        _check(self.scale > 0, f"data.synthetic.scale must be > 0, got {self.scale}")
        _check(1 <= self.min_objects <= self.max_objects <= 3,
               "data.synthetic needs 1 <= min_objects <= max_objects <= 3")
        _check(self.image_size >= 32, "data.synthetic.image_size must be >= 32")
        _check(self.expressions_per_clip >= 1, "data.synthetic.expressions_per_clip must be >= 1")

    def clips(self, split: str) -> int:
        return max(1, round(getattr(self, f"{split}_clips") * self.scale))


@dataclass
class DataConfig:
    source: Source = Source.synthetic
    root: Optional[str] = None  # dataset in the official layout; synthetic default: <run>/data/raw
    shards: Optional[str] = None  # Parquet shard set; default: <run>/data/shards
    num_frames: int = 10  # frames (and masks) per clip: {0..N-1}.jpg
    sample_rate: int = 16000  # audio is resampled to this rate when converted
    audio_seconds: float = 10.0  # decoded audio is padded/cut to this length
    frame_size: int = 64  # decoded frames and masks are resized to frame_size x frame_size
    rows_per_shard: int = 128
    conversion_workers: int = 2  # processes that read and validate rows in parallel
    lenient: bool = False  # quarantine bad rows instead of stopping at the first one
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        _check(self.num_frames >= 1, "data.num_frames must be >= 1")
        _check(self.sample_rate >= 1000, "data.sample_rate must be >= 1000")
        _check(self.frame_size >= 16, "data.frame_size must be >= 16")
        _check(self.rows_per_shard >= 1, "data.rows_per_shard must be >= 1")
        _check(self.conversion_workers >= 1, "data.conversion_workers must be >= 1")

    def raw_dir(self, run: RunConfig) -> Path:
        return Path(self.root).expanduser().resolve() if self.root else run.dir / "data" / "raw"

    def shards_dir(self, run: RunConfig) -> Path:
        return Path(self.shards).expanduser().resolve() if self.shards else run.dir / "data" / "shards"


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: join a cluster if RAY_ADDRESS is set, else start one locally
    num_cpus: Optional[int] = None  # logical CPUs of a locally started Ray (None: all)
    object_store_mb: Optional[int] = None


@dataclass
class AuroraConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ray: RayConfig = field(default_factory=RayConfig)


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
