"""A small AVSBench release in the exact official layout (S4 and MS3), built file by file for reader tests."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from PIL import Image
from torchvision.io import encode_png

SAMPLE_RATE = 16000
H, W = 24, 32
FG = (slice(4, 12), slice(8, 20))  # the foreground box of every mask

S4_ROWS = [  # name, source count, category, split (the release: column 0 name, column 2 category)
    ("-vidA_1", "1", "male_speech", "train"),
    ("vidB_2", "1", "dog_barking", "val"),
    ("vidC_0", "1", "playing_acoustic_guitar", "test"),
    ("vidD_5", "1", "dog_barking", "unlabelled"),
]
MS3_ROWS = [  # name, split
    ("msA", "train"),
    ("msB", "test"),
]
# palette of the MS3 masks: index 0 is drawn white, so only reading the *index* (not the colour)
# gets the background right
PALETTE = [255, 255, 255, 128, 0, 0] + [0, 0, 0] * 254


def write_frame(path: Path, size=(H, W)) -> None:
    img = torch.full((3, *size), 90, dtype=torch.uint8)
    img[:, : size[0] // 2] = 200
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(img).numpy().tobytes())


def write_mask(path: Path, size=(H, W), palette: bool = False) -> None:
    m = np.zeros(size, dtype=np.uint8)
    m[FG] = 1 if palette else 255
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette:
        im = Image.fromarray(m, mode="P")
        im.putpalette(PALETTE)
        im.save(path, format="PNG")
    else:
        path.write_bytes(encode_png(torch.from_numpy(m)[None]).numpy().tobytes())


def write_audio(path: Path, seconds: float = 5.0) -> None:
    t = np.arange(int(SAMPLE_RATE * seconds)) / SAMPLE_RATE
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, 0.3 * np.sin(2 * np.pi * 440 * t), SAMPLE_RATE, format="WAV", subtype="PCM_16")


def write_csv(path: Path, header, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def build(root: Path, s4_rows=S4_ROWS, ms3_rows=MS3_ROWS) -> Path:
    """S4 and MS3 as the official loaders read them: S4 train rows with mask 1 only, MS3 palette
    masks, and the release's pickled log-mel files (which must never be opened)."""
    s4 = root / "Single-source"
    write_csv(s4 / "s4_meta_data.csv", ["name", "sources", "category", "split"], s4_rows)
    for name, _, cat, split in s4_rows:
        for k in range(1, 6):
            write_frame(s4 / "s4_data" / "visual_frames" / split / cat / name / f"{name}_{k}.png")
        for k in range(1, (1 if split == "train" else 5) + 1):
            write_mask(s4 / "s4_data" / "gt_masks" / split / cat / name / f"{name}_{k}.png")
        write_audio(s4 / "s4_data" / "audio_wav" / split / cat / f"{name}.wav")
        pkl = s4 / "s4_data" / "audio_log_mel" / split / cat / f"{name}.pkl"
        pkl.parent.mkdir(parents=True, exist_ok=True)
        pkl.write_bytes(b"\x80\x04not a pickle anyone may open")
    ms3 = root / "Multi-sources"
    write_csv(ms3 / "ms3_meta_data.csv", ["name", "split"], ms3_rows)
    for name, split in ms3_rows:
        for k in range(1, 6):
            write_frame(ms3 / "ms3_data" / "visual_frames" / name / f"{name}.mp4_{k}.png")
            write_mask(ms3 / "ms3_data" / "gt_masks" / split / name / f"{name}_{k}.png", palette=True)
        write_audio(ms3 / "ms3_data" / "audio_wav" / split / f"{name}.wav")
    return root
