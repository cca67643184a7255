"""A small dataset in the exact official Ref-AVS layout, built file by file for reader tests."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torchvision.io import encode_jpeg, encode_png

NUM_FRAMES = 3
SAMPLE_RATE = 16000
H, W = 24, 32

ROWS = [  # vid, uid, split, fid, exp
    ("vidA", "vidA_dog_0", "train", "1", "the barking dog"),
    ("vidD", "vidD_guitar_1", "val", "2", "the guitar on the right"),
    ("vidB", "vidB_emergency-car_0", "test_u", "1", "the car with the siren"),
    ("vidC", "null_c-vidC_null_0", "test_n", "1", "the piano"),  # as released: vid plain, folder from the uid
    ("vidB", "vidB_dog_1", "TODO", "3", "unlabelled row in the public csv"),
]


def write_frame(path: Path, value: int = 100, size=(H, W)) -> None:
    img = torch.full((3, *size), value, dtype=torch.uint8)
    img[:, : size[0] // 2] = 200
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_jpeg(img, quality=90).numpy().tobytes())


def write_mask(path: Path, size=(H, W), fg_value: int = 1) -> None:
    m = torch.zeros((1, *size), dtype=torch.uint8)
    m[:, 4:12, 8:20] = fg_value  # the official masks are not always 0/255: any value > 0 is foreground
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(m).numpy().tobytes())


def write_audio(path: Path, sr: int = SAMPLE_RATE, seconds: float = 1.0, channels: int = 1) -> None:
    t = np.arange(int(sr * seconds)) / sr
    y = np.stack([0.3 * np.sin(2 * np.pi * 440 * t)] * channels, axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, y, sr, format="WAV", subtype="PCM_16")


def write_metadata(root: Path, rows, header=("vid", "uid", "split", "fid", "exp")) -> None:
    with open(root / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def build(root: Path, rows=ROWS) -> Path:
    """Write the dataset in the folders the official loader reads (``uid.rsplit('_', 2)[0]``, which is
    ``null_c-<vid>`` for null rows); null rows get no mask files (as in the release)."""
    root.mkdir(parents=True, exist_ok=True)
    write_metadata(root, rows)
    for vid, uid, split, fid, _ in rows:
        folder = uid.rsplit("_", 2)[0]
        for t in range(NUM_FRAMES):
            write_frame(root / "media" / folder / "frames" / f"{t}.jpg")
        write_audio(root / "media" / folder / "audio.wav")
        if uid.split("_")[-2] != "null":
            for t in range(NUM_FRAMES):
                write_mask(root / "gt_mask" / folder / f"fid_{fid}" / f"{t:05d}.png")
    return root
