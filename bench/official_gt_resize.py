"""How closely ``aurora_core.metrics.official_gt_resize`` reproduces the official Ref-AVS loader's
ground-truth preparation (``cv2.imread`` -> ``cv2.resize(mask, (256, 256))`` -> gray -> ``> 0``).

    pip install opencv-python-headless   # only for this bench; aurora does not depend on cv2
    python bench/official_gt_resize.py [--masks 2000] [--seed 0]

Config: ``--masks`` random masks, each 1..3 ellipses and rectangles on a random size from 24x24 to
720x1280 (Ref-AVS videos are mostly 360p-720p), values 0/255. Prints, over all masks: the pixels
(of 256x256 each) where ours and cv2's differ, divided by all pixels scored, and the worst mask; the
same for the naive ``> 0`` threshold on the float interpolation, to show why we threshold at 0.5.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from aurora_core.metrics import OFFICIAL_SIZE, official_gt_resize  # noqa: E402


def random_mask(rng: np.random.Generator) -> np.ndarray:
    h, w = int(rng.integers(24, 721)), int(rng.integers(24, 1281))
    yy, xx = np.mgrid[:h, :w]
    m = np.zeros((h, w), bool)
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(2, h / 2), rng.uniform(2, w / 2)
        if rng.random() < 0.5:
            m |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        else:
            m |= (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
    return m.astype(np.uint8) * 255


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--masks", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    try:
        import cv2
    except ImportError:
        print("cv2 is not installed: pip install opencv-python-headless (for this bench only)")
        return 2
    rng = np.random.default_rng(args.seed)
    diff = diff_naive = total = 0
    worst = (0, None)
    for _ in range(args.masks):
        m = random_mask(rng)
        bgr = np.repeat(m[:, :, None], 3, axis=2)  # cv2.imread of a grey PNG gives 3 equal channels
        ref = cv2.cvtColor(cv2.resize(bgr, (OFFICIAL_SIZE, OFFICIAL_SIZE)), cv2.COLOR_BGR2GRAY) > 0
        ours = official_gt_resize(torch.from_numpy(m)[None])[0].numpy()
        v = torch.nn.functional.interpolate(torch.from_numpy(m)[None, None].float(), size=(OFFICIAL_SIZE,) * 2,
                                            mode="bilinear", align_corners=False)[0, 0].numpy()
        d = int((ours != ref).sum())
        diff += d
        diff_naive += int(((v > 0) != ref).sum())
        total += ref.size
        if d > worst[0]:
            worst = (d, m.shape)
    print(f"config: {args.masks} random 0/255 masks, sizes 24..720 x 24..1280, scored at {OFFICIAL_SIZE}x{OFFICIAL_SIZE}; "
          f"opencv {cv2.__version__}")
    print(f"official_gt_resize vs cv2: {diff} of {total} pixels differ ({diff / total:.2e}); "
          f"worst mask {worst[1]}: {worst[0]} pixels")
    print(f"naive float bilinear > 0 vs cv2: {diff_naive} pixels differ ({diff_naive / total:.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
