"""Reader for the official Ref-AVS release layout (GeWu-Lab, ECCV 2024), also written by our generator.

Layout (the official release, GeWu-Lab/Ref-AVS, as its loader reads it)::

    <root>/metadata.csv                             columns exactly vid,uid,split,fid,exp
    <root>/media/<folder>/frames/{0..N-1}.jpg       first frame of each 1-s snippet
    <root>/media/<folder>/audio.wav
    <root>/gt_mask/<folder>/fid_<fid>/{00000..}.png foreground = any channel > 0
    <root>/cot.jsonl                                optional: {"uid", "cot"} structured CoT targets

``<folder>`` is ``uid.rsplit("_", 2)[0]``, as the official loader (``datasets/dataset_refavs.py``)
takes it, not the ``vid`` column: the two agree for every ordinary row of the release, but the
1,708 null rows have uids ``null_c-<vid>_null_<k>`` / ``null_m-<vid>_null_<k>`` and the release ships
their media in ``media/null_c-<vid>/`` (resp. ``null_m-``), while their ``vid`` column names the
ordinary video. Where that folder is missing but ``media/<vid>/`` exists, the row is read from the
``vid`` folder and counted ("media from the vid column").

The class of a row is ``uid.split("_")[-2]``. Rows of class ``null`` (all of test_n, some of train)
have empty masks whether or not mask files exist. Rows whose split is not one of :data:`SPLITS`
(the public CSV has ``TODO`` rows) are skipped and counted.

**Row keys.** The public ``metadata.csv`` (20,459 rows) holds 11 uids twice: some rows are exact
copies, some share a uid but differ in fid and expression. The official evaluation reads every row,
so every row is kept, in CSV order, under a *row key* that is unique and stable: the uid for its
first occurrence, ``<uid>#<csv line>`` for later ones (:func:`row_key`). The row key is what
identifies a row everywhere downstream (data position, teacher embeddings, reflect shards, GRPO,
evaluation outputs, quarantine); the uid stays a column (the class comes from it).

Decisions on inputs the release does not pin down:
- audio at another sample rate is resampled (scipy's polyphase filter) to ``data.sample_rate``;
  multi-channel audio is averaged to mono. Non-WAV containers are rejected.
- a mask whose size differs from its frame is rejected: a silently rescaled mask could be misaligned.
- without ``cot.jsonl`` (the public release has none) the CoT target is a generic four-step template
  built from the expression and class (:func:`template_cot`); supply the paper's CoT annotations as
  ``cot.jsonl`` for a faithful stage 1.

Errors: file-level problems (missing/empty CSV, wrong columns) raise :class:`DatasetError`; a bad
row raises :class:`BadRow` naming the uid, the file and what is wrong, which the converter either
stops on (strict) or quarantines (lenient).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, encode_png

from aurora_core import reasoning

COLUMNS = ("vid", "uid", "split", "fid", "exp")
SPLITS = ("train", "val", "test_s", "test_u", "test_n")


class DatasetError(ValueError):
    """The dataset as a whole cannot be read (the message names the file and the fix)."""


class BadRow(ValueError):
    """A row that cannot be used; ``key`` is its row key (= its uid unless the uid occurs twice)."""

    def __init__(self, key: str, file: str, reason: str, uid: str | None = None):
        super().__init__(f"row {key!r}: {file}: {reason}")
        self.key, self.uid, self.file, self.reason = key, uid or key, file, reason

    def as_quarantine(self) -> dict[str, str]:
        return {"key": self.key, "uid": self.uid, "file": self.file, "reason": self.reason}


@dataclass(frozen=True)
class MetaRow:
    line: int  # line number in metadata.csv (header = 1)
    vid: str
    uid: str
    split: str
    fid: str
    exp: str
    problem: str | None = None  # found while reading the CSV; raised when the row is loaded
    key: str = ""  # unique row key (row_key); "" only for rows built by hand, then = uid

    def __post_init__(self):
        if not self.key:
            object.__setattr__(self, "key", self.uid)

    @property
    def cls(self) -> str:
        parts = self.uid.split("_")
        return parts[-2] if len(parts) >= 3 else ""

    @property
    def folder(self) -> str:
        """The media / gt_mask folder the official loader reads: ``uid.rsplit('_', 2)[0]``."""
        return self.uid.rsplit("_", 2)[0]


def row_key(uid: str, line: int, first: bool) -> str:
    """The unique key of a metadata row: its uid on the uid's first occurrence, else ``<uid>#<line>``."""
    return uid if first else f"{uid}#{line}"


def has_undecodable(s: str) -> bool:
    # surrogateescape maps bytes that are not UTF-8 to lone surrogates U+DC80..U+DCFF
    return any("\udc80" <= ch <= "\udcff" for ch in s)


def read_csv_lines(path: Path, expected: str) -> tuple[list[str], list[tuple[int, list[str], str | None]]]:
    """A release's metadata CSV: its header (stripped, BOM removed) and, per non-blank line,
    (line number, fields padded/cut to the header's width, the field-count problem or None). Bytes
    that are not UTF-8 survive as lone surrogates (:func:`has_undecodable`) so the row can name them."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or not any(h.strip() for h in header):
            raise DatasetError(f"{path} is empty: expected {expected}")
        header = [h.strip().lstrip("\ufeff") for h in header]
        n = len(header)
        lines = []
        for line_no, fields in enumerate(reader, start=2):
            if not fields or all(not x.strip() for x in fields):
                continue  # blank line
            problem = None if len(fields) == n else f"line {line_no} has {len(fields)} fields, expected {n}"
            lines.append((line_no, (fields + [""] * n)[:n], problem))
    return header, lines


def read_metadata(root: Path) -> tuple[list[MetaRow], Counter[str]]:
    """Rows of the known splits, in file order, and the count of rows skipped per other split.
    A uid seen before is not an error: the row gets the key ``<uid>#<line>`` (see :func:`row_key`)."""
    path = Path(root) / "metadata.csv"
    if not path.is_file():
        raise DatasetError(f"{path} not found: the dataset root must contain metadata.csv")
    header, lines = read_csv_lines(path, f"the header {','.join(COLUMNS)} and one row per expression")
    if sorted(header) != sorted(COLUMNS):
        missing = [c for c in COLUMNS if c not in header]
        extra = [c for c in header if c not in COLUMNS]
        raise DatasetError(
            f"{path}: columns are {','.join(header)}; expected exactly {','.join(COLUMNS)}"
            + (f" (missing: {','.join(missing)})" if missing else "")
            + (f" (unexpected: {','.join(extra)})" if extra else ""))
    idx = {c: header.index(c) for c in COLUMNS}
    rows: list[MetaRow] = []
    skipped: Counter[str] = Counter()
    first_line: dict[str, int] = {}
    for line_no, fields, problem in lines:
        vals = {c: fields[idx[c]].strip() for c in COLUMNS}
        if vals["split"] not in SPLITS:
            skipped[vals["split"] or "<empty>"] += 1
            continue
        uid = vals["uid"]
        bad_cols = [c for c in COLUMNS if has_undecodable(vals[c])]
        if problem is None and bad_cols:
            problem = (f"line {line_no}: column {','.join(bad_cols)} holds bytes that are not UTF-8; "
                       "re-save metadata.csv as UTF-8")
            uid = uid.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        if problem is None and len(uid.split("_")) < 3:
            problem = f"line {line_no}: uid {uid!r} does not have the form <vid>_<class>_<n>"
        if problem is None and not vals["exp"]:
            problem = f"line {line_no}: empty expression"
        key = row_key(uid, line_no, uid not in first_line)
        first_line.setdefault(uid, line_no)
        rows.append(MetaRow(line_no, vals["vid"], uid, vals["split"], vals["fid"], vals["exp"], problem, key))
    if not rows and not skipped:
        raise DatasetError(f"{path} has a header but no rows")
    return rows, skipped


@dataclass(frozen=True)
class CotEntry:
    cot: str  # the structured CoT target
    line: int  # line in cot.jsonl
    kind: str = ""  # optional expression kind (our synthetic data: category, position, sound, time, combo, null)


def read_cot(root: Path) -> dict[str, CotEntry] | None:
    """``cot.jsonl`` if the dataset has one: key -> entry. A key is a uid or a row key
    (``<uid>#<csv line>``, for the later rows of a duplicated uid)."""
    path = Path(root) / "cot.jsonl"
    if not path.is_file():
        return None
    out: dict[str, CotEntry] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                key, cot, kind = str(obj["uid"]), str(obj["cot"]), str(obj.get("kind", ""))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise DatasetError(f"{path}:{n}: expected a JSON object with 'uid' and 'cot' ({e})") from None
            if key in out:
                raise DatasetError(f"{path}: {key!r} is on line {out[key].line} and on line {n}; keep one")
            out[key] = CotEntry(cot, n, kind)
    return out


def resolve_cot(rows: list[MetaRow], cot: dict[str, CotEntry]) -> list[MetaRow]:
    """Attach to each row the problem of its CoT lookup, if any (the rows are returned; the lookup
    itself is :func:`cot_for`). A CoT keyed by a bare uid that names several *different* rows
    (same uid, other fid or expression) is ambiguous unless those rows have row-keyed CoTs."""
    by_uid: dict[str, list[MetaRow]] = {}
    for r in rows:
        by_uid.setdefault(r.uid, []).append(r)
    out = []
    for r in rows:
        problem = r.problem
        if problem is None and r.key not in cot:
            if r.uid not in cot:
                problem = f"cot.jsonl has no CoT for uid {r.uid!r}" + (f" nor row key {r.key!r}" if r.key != r.uid else "")
            else:
                others = [o for o in by_uid[r.uid] if o is not r and (o.fid, o.exp) != (r.fid, r.exp)]
                if others:  # the uid's first row owns a uid-keyed CoT (its row key is the uid)
                    a, b = sorted([r, others[0]], key=lambda x: x.line)
                    problem = (f"cot.jsonl line {cot[r.uid].line} keys its CoT by uid {r.uid!r}, which names different "
                               f"rows on metadata.csv lines {a.line} and {b.line}; give the later row its own CoT "
                               f"under its row key {r.key!r}")
        out.append(r if problem == r.problem else dataclasses.replace(r, problem=problem))
    return out


def cot_for(row: MetaRow, cot: dict[str, CotEntry]) -> CotEntry:
    return cot.get(row.key) or cot[row.uid]


def template_cot(exp: str, cls: str) -> str:
    """Generic four-step CoT for datasets without CoT annotations (see the module docstring)."""
    name = reasoning.answer_name(cls)
    match = ("The referred object is not in the video" if cls == reasoning.NULL_CLASS
             else f"The referred object is the {name}")
    return reasoning.cot_answer("I look at the objects in the frames", "I listen to the sounds in the audio",
                                f"The reference asks for {exp.rstrip('.')}", match, cls)


def safe_path(root: Path, *parts: str) -> Path:
    """``root/parts...`` or ValueError if any part could leave ``root`` (.., absolute, separators, symlinks)."""
    for p in parts:
        if not p or p in (".", "..") or "\x00" in p or "/" in p or "\\" in p or os.path.isabs(p):
            raise ValueError(f"path component {p!r} is not a plain name inside the dataset root")
    root_r = Path(root).resolve()
    path = root_r.joinpath(*parts)
    if not path.resolve().is_relative_to(root_r):
        raise ValueError(f"{path} resolves to {path.resolve()}, outside the dataset root {root_r}")
    return path


def read_release_file(root: Path, key: str, what: str, parts: tuple[str, ...], hint: str = "") -> tuple[bytes, str]:
    """The bytes of ``root/parts...`` and its relative name, or BadRow (unsafe path, missing, zero bytes)."""
    rel = "/".join(parts)
    try:
        path = safe_path(root, *parts)
    except ValueError as e:
        raise BadRow(key, rel, f"unsafe path: {e}") from None
    if not path.is_file():
        raise BadRow(key, rel, f"missing {what}{hint}")
    data = path.read_bytes()
    if not data:
        raise BadRow(key, rel, f"zero-byte {what}")
    return data, rel


class RowLoader:
    """Reads and validates one metadata row's files into a shard row (a dict of Parquet columns)."""

    def __init__(self, root: Path, num_frames: int, sample_rate: int, cot: dict[str, CotEntry] | None):
        """``cot``: row key -> CoT entry, already resolved (:func:`resolve_cot`); None: template CoTs."""
        self.root = Path(root).resolve()
        self.num_frames = num_frames
        self.sample_rate = sample_rate
        self.cot = cot

    def with_cot(self, cot: dict[str, CotEntry] | None) -> "RowLoader":
        """The same loader with the CoT entries of one chunk of rows (what a conversion worker gets)."""
        return RowLoader(self.root, self.num_frames, self.sample_rate, cot)

    def _read(self, row: MetaRow, what: str, *parts: str) -> tuple[bytes, str]:
        return read_release_file(self.root, row.key, what, parts)

    def media_folder(self, row: MetaRow) -> tuple[str, bool]:
        """(folder under media/ and gt_mask/, whether it came from the vid column): the uid's folder
        as the official loader reads it, else the vid column's if only that one exists."""
        def exists(name: str) -> bool:
            try:
                return safe_path(self.root, "media", name).is_dir()
            except ValueError:
                return False  # an unsafe name is reported when its files are read

        if row.folder != row.vid and not exists(row.folder) and exists(row.vid):
            return row.vid, True
        return row.folder, False

    def load(self, row: MetaRow) -> dict[str, Any]:
        """The row's shard record; ``media_from_vid`` (not a shard column) says where its media came from."""
        if row.problem:
            raise BadRow(row.key, "metadata.csv", row.problem)
        cls = row.cls
        folder, from_vid = self.media_folder(row)
        frames, sizes = [], []
        for t in range(self.num_frames):
            data, rel = self._read(row, "frame", "media", folder, "frames", f"{t}.jpg")
            try:
                img = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            except RuntimeError as e:
                raise BadRow(row.key, rel, f"unreadable or truncated JPEG ({str(e).split(', ')[-1]})") from None
            frames.append(data)
            sizes.append(tuple(img.shape[-2:]))
        audio = self._load_audio(row, folder)
        if cls == reasoning.NULL_CLASS:
            masks = [encode_mask(np.zeros(s, dtype=bool)) for s in sizes]
        else:
            masks = [self._load_mask(row, folder, t, sizes[t]) for t in range(self.num_frames)]
        if self.cot is not None and row.key not in self.cot:
            raise BadRow(row.key, "cot.jsonl", f"no CoT target for row {row.key!r}")
        entry = self.cot[row.key] if self.cot is not None else CotEntry(template_cot(row.exp, cls), 0)
        return {
            "key": row.key, "line": row.line, "vid": row.vid, "uid": row.uid, "split": row.split, "fid": row.fid,
            "class": cls, "exp": row.exp, "has_target": cls != reasoning.NULL_CLASS, "frames": frames,
            "audio": audio, "sample_rate": self.sample_rate, "masks": masks, "gt_frames": [True] * self.num_frames,
            "cot": entry.cot, "kind": entry.kind, "height": sizes[0][0], "width": sizes[0][1], "media_from_vid": from_vid,
        }

    def _load_audio(self, row: MetaRow, folder: str) -> bytes:
        data, rel = self._read(row, "audio", "media", folder, "audio.wav")
        return encode_audio(data, row.key, rel, self.sample_rate)

    def _load_mask(self, row: MetaRow, folder: str, t: int, frame_size: tuple[int, int]) -> bytes:
        data, rel = self._read(row, "mask", "gt_mask", folder, f"fid_{row.fid}", f"{t:05d}.png")
        try:
            img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError as e:
            raise BadRow(row.key, rel, f"unreadable mask image ({str(e).split(', ')[-1]})") from None
        if tuple(img.shape[-2:]) != frame_size:
            raise BadRow(row.key, rel, f"mask is {img.shape[-2]}x{img.shape[-1]} but frame {t}.jpg is "
                                       f"{frame_size[0]}x{frame_size[1]}; masks must match their frame")
        return encode_mask((img.amax(dim=0) > 0).numpy())


def encode_audio(data: bytes, key: str, rel: str, sample_rate: int) -> bytes:
    """A released WAV file -> mono FLAC at ``sample_rate`` (the shard's audio), or BadRow naming ``rel``."""
    try:
        info = sf.info(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError) as e:
        raise BadRow(key, rel, f"not a readable WAV file ({e})") from None
    if info.format not in ("WAV", "WAVEX"):
        raise BadRow(key, rel, f"audio is {info.format}, expected WAV")
    if info.frames == 0:
        raise BadRow(key, rel, "audio has no samples")
    try:
        wav, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise BadRow(key, rel, f"unreadable WAV data ({e})") from None
    wav = wav.mean(axis=1)
    if sr != sample_rate:
        from scipy.signal import resample_poly  # well-tested anti-aliased polyphase resampler

        g = math.gcd(sr, sample_rate)
        wav = resample_poly(wav, sample_rate // g, sr // g).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, np.clip(wav, -1.0, 1.0), sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def encode_mask(mask: np.ndarray) -> bytes:
    """Binary mask -> 8-bit grey PNG with 0/255 (the same encoding whatever the source used)."""
    return encode_png(torch.from_numpy(mask.astype(np.uint8) * 255)[None]).numpy().tobytes()
