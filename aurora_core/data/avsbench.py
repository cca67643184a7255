"""Reader for the AVSBench release (OpenNLPLab, ECCV 2022): unreferenced audio-visual segmentation,
subsets S4 (one sounding source) and MS3 (several). Rows become shard rows of the Ref-AVS schema.

Layout under the release root (``avsbench_data/`` of the official repository), as the official
loaders read it (``avs_scripts/avs_s4/dataloader.py``, ``avs_scripts/avs_ms3/dataloader.py``)::

    Single-source/s4_meta_data.csv        column 0 = video name, column 2 = category, a `split` column
    Single-source/s4_data/visual_frames/<split>/<category>/<name>/<name>_{1..5}.png
    Single-source/s4_data/audio_wav/<split>/<category>/<name>.wav
    Single-source/s4_data/gt_masks/<split>/<category>/<name>/<name>_{k}.png   train: k = 1 only; val/test: 1..5
    Multi-sources/ms3_meta_data.csv       column 0 = video name, a `split` column
    Multi-sources/ms3_data/visual_frames/<name>/<name>.mp4_{1..5}.png         (no split or category folder)
    Multi-sources/ms3_data/audio_wav/<split>/<name>.wav
    Multi-sources/ms3_data/gt_masks/<split>/<name>/<name>_{1..5}.png           palette PNGs

Splits ``train``, ``val``, ``test``; other values are skipped and counted. Five frames (one per
second) and 5 s of audio per clip.

Decisions:
- **one row per video**; its expression is the unreferenced prompt ``data.unref_expression``
  ("the objects making sounds."), so the prompt reads ``The reference is: the objects making sounds.
  Please segment ...``. The row key is the video name (``<name>#<line>`` for a repeated name).
- **class**: S4: the category, lower case, ``_`` -> ``-`` (``male_speech`` -> ``male-speech``: one
  token run the answer parser reads, as Ref-AVS's ``emergency-car``); MS3 has no category column, so
  every MS3 row has the fixed class :data:`MS3_CLASS` (``objects``: the answer says "The target is
  objects."); MS3 class accuracy only says whether a model learned that word.
- **frames without ground truth**: S4 train rows have the mask of frame 1 only. The shard stores an
  empty mask for frames 2..5 and ``gt_frames = [True, False, False, False, False]``; the mask losses,
  the IoU reward and the metrics use the frames with ground truth only.
- **masks**: foreground = palette index > 0 for palette PNGs (MS3), any channel > 0 otherwise. Read
  with Pillow because torchvision expands a palette to its colours, and the release defines the
  foreground by index. The S4 loader binarises with PIL's mode '1' (> 127); S4 masks are 0/255, so
  both agree there.
- **audio**: the WAVs (``audio_wav/``), resampled to ``data.sample_rate`` as for Ref-AVS. The release's
  ``audio_log_mel/*.pkl`` are pickled tensors: never opened (unpickling runs code).
- frames are stored as released (PNG bytes); a mask whose size differs from its frame is rejected.
- an optional ``cot.jsonl`` beside the CSV (``{"uid": <name or row key>, "cot": ...}``; our generator
  writes one) gives the CoT targets; without it, the generic template (``refavs.template_cot``).
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image

from aurora_core.config import AVSBENCH_FRAMES, AVSBENCH_SPLITS
from aurora_core.data.refavs import (BadRow, CotEntry, DatasetError, encode_audio, encode_mask, has_undecodable,
                                     read_csv_lines, read_release_file, row_key, template_cot)

MS3_CLASS = "objects"


@dataclass(frozen=True)
class SubsetLayout:
    folder: str  # under the release root
    csv: str
    data: str  # folder of frames, audio and masks inside ``folder``
    by_category: bool  # S4: <split>/<category>/ folders; MS3: none for frames, <split>/ for audio and masks

    def frame(self, split: str, category: str, name: str, k: int) -> tuple[str, ...]:
        if self.by_category:
            return (self.folder, self.data, "visual_frames", split, category, name, f"{name}_{k}.png")
        return (self.folder, self.data, "visual_frames", name, f"{name}.mp4_{k}.png")

    def audio(self, split: str, category: str, name: str) -> tuple[str, ...]:
        sub = (split, category) if self.by_category else (split,)
        return (self.folder, self.data, "audio_wav", *sub, f"{name}.wav")

    def mask(self, split: str, category: str, name: str, k: int) -> tuple[str, ...]:
        sub = (split, category) if self.by_category else (split,)
        return (self.folder, self.data, "gt_masks", *sub, name, f"{name}_{k}.png")

    def mask_frames(self, split: str) -> int:
        """Frames with a ground-truth mask (S4 train: the first only, as the official S4 loader reads)."""
        return 1 if self.by_category and split == "train" else AVSBENCH_FRAMES


LAYOUTS = {
    "s4": SubsetLayout("Single-source", "s4_meta_data.csv", "s4_data", by_category=True),
    "ms3": SubsetLayout("Multi-sources", "ms3_meta_data.csv", "ms3_data", by_category=False),
}


@dataclass(frozen=True)
class AVSRow:
    """One video of an AVSBench metadata CSV (the converter's row: key, uid, line, split, problem)."""

    line: int  # line in the CSV (header = 1)
    name: str  # video name, column 0
    category: str  # column 2 (S4); "" for MS3
    split: str
    problem: str | None = None  # found while reading the CSV; raised when the row is loaded
    key: str = ""  # unique row key: the name, or <name>#<line> for a repeated name

    @property
    def uid(self) -> str:
        return self.name

    def cls(self, subset: str) -> str:
        return MS3_CLASS if subset == "ms3" else self.category.strip().lower().replace("_", "-")


def metadata_path(root: Path, subset: str) -> Path:
    lay = LAYOUTS[subset]
    return Path(root) / lay.folder / lay.csv


def read_metadata(root: Path, subset: str) -> tuple[list[AVSRow], Counter[str]]:
    """Rows of train/val/test in file order, and the count of rows skipped per other split value."""
    if subset not in LAYOUTS:
        raise DatasetError(f"unknown AVSBench subset {subset!r}; subsets are {', '.join(LAYOUTS)}")
    path = metadata_path(root, subset)
    if not path.is_file():
        raise DatasetError(f"{path} not found: the AVSBench root must contain {LAYOUTS[subset].folder}/"
                           f"{LAYOUTS[subset].csv} (give the folder that holds Single-source/ and Multi-sources/)")
    need = 3 if subset == "s4" else 1  # the official loaders read columns 0 (and 2 for S4) by position
    header, lines = read_csv_lines(path, "a header with a 'split' column and one row per video")
    if "split" not in header or len(header) < need:
        raise DatasetError(f"{path}: columns are {','.join(header)}; the official {subset.upper()} loader needs "
                           f"a 'split' column" + (" and the category in column 2" if subset == "s4" else ""))
    split_col = header.index("split")
    rows: list[AVSRow] = []
    skipped: Counter[str] = Counter()
    seen: set[str] = set()
    for line_no, fields, problem in lines:
        split = fields[split_col].strip()
        if split not in AVSBENCH_SPLITS:
            skipped[split or "<empty>"] += 1
            continue
        name = fields[0].strip()
        category = fields[2].strip() if subset == "s4" else ""
        if problem is None and has_undecodable(name + category):
            problem = f"line {line_no}: bytes that are not UTF-8; re-save {path.name} as UTF-8"
            name = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        if problem is None and not name:
            problem = f"line {line_no}: empty video name (column 0)"
        if problem is None and subset == "s4" and not category:
            problem = f"line {line_no}: empty category (column 2)"
        rows.append(AVSRow(line_no, name, category, split, problem, row_key(name, line_no, name not in seen)))
        seen.add(name)
    if not rows and not skipped:
        raise DatasetError(f"{path} has a header but no rows")
    return rows, skipped


def cot_problems(rows: list[AVSRow], cot: dict[str, CotEntry]) -> list[AVSRow]:
    """Rows whose CoT is missing get that as their problem (a CoT is keyed by row key or name)."""
    import dataclasses

    return [r if r.problem or r.key in cot or r.name in cot
            else dataclasses.replace(r, problem=f"cot.jsonl has no CoT for video {r.name!r}") for r in rows]


class AVSRowLoader:
    """Reads and validates one AVSBench video's files into a shard row (a dict of Parquet columns)."""

    def __init__(self, root: Path, subset: str, sample_rate: int, expression: str,
                 cot: dict[str, CotEntry] | None):
        self.root = Path(root).resolve()
        self.subset = subset
        self.layout = LAYOUTS[subset]
        self.sample_rate = sample_rate
        self.expression = expression
        self.cot = cot
        self.num_frames = AVSBENCH_FRAMES

    def with_cot(self, cot: dict[str, CotEntry] | None) -> "AVSRowLoader":
        return AVSRowLoader(self.root, self.subset, self.sample_rate, self.expression, cot)

    def _read(self, row: AVSRow, what: str, parts: tuple[str, ...]) -> tuple[bytes, str]:
        hint = " (audio_log_mel/*.pkl are pickles and are never read: the WAVs are needed)" if what == "audio" else ""
        return read_release_file(self.root, row.key, what, parts, hint)

    def load(self, row: AVSRow) -> dict[str, Any]:
        lay, s = self.layout, row.split
        if row.problem:
            raise BadRow(row.key, lay.csv, row.problem)
        frames, sizes = [], []
        for k in range(1, AVSBENCH_FRAMES + 1):
            data, rel = self._read(row, "frame", lay.frame(s, row.category, row.name, k))
            try:
                img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            except RuntimeError as e:
                raise BadRow(row.key, rel, f"unreadable image ({str(e).split(', ')[-1]})") from None
            frames.append(data)
            sizes.append(tuple(img.shape[-2:]))
        audio_bytes, rel = self._read(row, "audio", lay.audio(s, row.category, row.name))
        audio = encode_audio(audio_bytes, row.key, rel, self.sample_rate)
        with_gt = lay.mask_frames(s)
        masks = [self._load_mask(row, k, sizes[k - 1]) for k in range(1, with_gt + 1)]
        masks += [encode_mask(np.zeros(sizes[k - 1], dtype=bool)) for k in range(with_gt + 1, AVSBENCH_FRAMES + 1)]
        cls = row.cls(self.subset)
        if self.cot is not None and row.key not in self.cot:  # chunk CoTs are resolved by row key
            raise BadRow(row.key, "cot.jsonl", f"no CoT target for video {row.name!r}")
        entry = self.cot[row.key] if self.cot is not None else CotEntry(template_cot(self.expression, cls), 0)
        return {
            "key": row.key, "line": row.line, "vid": row.name, "uid": row.name, "split": s, "fid": "",
            "class": cls, "exp": self.expression, "has_target": True, "frames": frames, "audio": audio,
            "sample_rate": self.sample_rate, "masks": masks,
            "gt_frames": [k <= with_gt for k in range(1, AVSBENCH_FRAMES + 1)],
            "cot": entry.cot, "kind": entry.kind or self.subset, "height": sizes[0][0], "width": sizes[0][1],
            "media_from_vid": 0,
        }

    def _load_mask(self, row: AVSRow, k: int, frame_size: tuple[int, int]) -> bytes:
        from PIL import Image, UnidentifiedImageError

        data, rel = self._read(row, "mask", self.layout.mask(row.split, row.category, row.name, k))
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise BadRow(row.key, rel, f"unreadable mask image ({e})") from None
        arr = np.asarray(img)
        if img.mode != "P" and arr.ndim == 3:  # colour: any colour channel, not the alpha one
            arr = arr[..., : 1 if img.mode in ("LA", "La") else 3].max(-1)
        if arr.shape[:2] != frame_size:
            raise BadRow(row.key, rel, f"mask is {arr.shape[0]}x{arr.shape[1]} but its frame is "
                                       f"{frame_size[0]}x{frame_size[1]}; masks must match their frame")
        return encode_mask(arr > 0)  # palette: index > 0
