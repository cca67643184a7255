"""Convert a real Ref-AVS ``metadata.csv`` end to end before the media is at hand: lay out stand-in
media in the official layout for every row it lists, convert in strict mode, print the summary.

    python bench/real_metadata_check.py --metadata /data/refavs/metadata.csv [--out /tmp/refavs-check]
        [--vid-folders]   # lay null rows' media under media/<vid>/ instead of media/null_c-<vid>/

What it shows: that every row of the file is kept in strict mode (duplicated uids under row keys),
per-split counts to compare with the paper, and which media folders the reader opens (the uid's,
``uid.rsplit('_', 2)[0]``, as the official loader; ``--vid-folders`` exercises the fallback).
Config: 10 frames of 16x16 px per folder, 1 s of 16 kHz audio, one 16x16 mask per frame and fid
(files of equal content are hard links, so 20k rows lay out in about a minute). Stand-in pixels
say nothing about a model: this checks the reader, not the data.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aurora_core.config import load_config  # noqa: E402
from aurora_core.data import shards  # noqa: E402
from aurora_core.data.refavs import SPLITS  # noqa: E402


def lay_out(metadata: Path, root: Path, vid_folders: bool, frames: int = 10) -> int:
    import numpy as np
    import soundfile as sf
    import torch
    from torchvision.io import encode_jpeg, encode_png

    proto = root / ".proto"
    proto.mkdir(parents=True)
    (proto / "f.jpg").write_bytes(encode_jpeg(torch.full((3, 16, 16), 90, dtype=torch.uint8)).numpy().tobytes())
    m = torch.zeros((1, 16, 16), dtype=torch.uint8)
    m[:, 4:12, 4:12] = 255
    (proto / "m.png").write_bytes(encode_png(m).numpy().tobytes())
    sf.write(proto / "a.wav", np.zeros(16000, dtype=np.float32), 16000, subtype="PCM_16")
    shutil.copy(metadata, root / "metadata.csv")
    done_media, done_masks = set(), set()
    links = {"f.jpg": 0, "m.png": 0, "a.wav": 0}

    def link(name: str, dst: Path) -> None:
        # a file system caps hard links per inode (ext4: 65,000): start a new copy before that
        if links[name] and links[name] % 60000 == 0:
            tmp = proto / f"{name}.new"
            shutil.copy(proto / name, tmp)
            os.replace(tmp, proto / name)
        links[name] += 1
        os.link(proto / name, dst)

    with open(metadata, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        uid = r["uid"]
        null = uid.split("_")[-2] == "null"
        folder = r["vid"] if (null and vid_folders) else uid.rsplit("_", 2)[0]
        if folder not in done_media:
            done_media.add(folder)
            (root / "media" / folder / "frames").mkdir(parents=True)
            for t in range(frames):
                link("f.jpg", root / "media" / folder / "frames" / f"{t}.jpg")
            link("a.wav", root / "media" / folder / "audio.wav")
        if not null and (folder, r["fid"]) not in done_masks:
            done_masks.add((folder, r["fid"]))
            d = root / "gt_mask" / folder / f"fid_{r['fid']}"
            d.mkdir(parents=True)
            for t in range(frames):
                link("m.png", d / f"{t:05d}.png")
    shutil.rmtree(proto)
    return len(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--metadata", required=True, type=Path)
    p.add_argument("--out", type=Path, help="where to lay out the stand-in dataset (default: a temp dir, removed)")
    p.add_argument("--vid-folders", action="store_true")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    tmp = None if args.out else tempfile.mkdtemp(prefix="refavs-check-")
    root = Path(args.out or tmp)
    try:
        t0 = time.time()
        n = lay_out(args.metadata, root / "raw", args.vid_folders)
        print(f"laid out stand-in media for {n} rows in {time.time() - t0:.0f}s under {root / 'raw'}")
        cfg = load_config(None, ["data.sample_rate=16000", "data.num_frames=10", "data.rows_per_shard=512",
                                 f"data.conversion_workers={args.workers}"])
        s = shards.convert(root / "raw", root / "shards", cfg.data, source="refavs", lenient=False, progress=False)
        print(s.render())
        print("per split: " + ", ".join(f"{k} {s.counts[k]}" for k in SPLITS)
              + (f"; skipped: {s.rows_skipped_by_split}" if s.rows_skipped_by_split else ""))
        print("(paper: train 14,117 / val 1,349 / test_s 2,288 / test_u 1,454 / test_n 1,028)")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
