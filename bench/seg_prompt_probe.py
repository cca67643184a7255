"""Does the mask decoder read the referent from the ``[SEG]`` prompt? One export of a run.

    python bench/seg_prompt_probe.py [--config configs/tiny.yaml] [--stage sft] [--steps 400] [--out probe.json] \
        [key=value ...]        # run.root=... run.name=... as the pipelines (default: runs/tiny)

The masks of LISA-style models come from SAM's decoder prompted with ``seg_proj`` of the LLM's last
hidden state at ``[SEG]``: they can segment the object a sentence refers to only if that prompt
carries the referent and the decoder uses it. This reads the run's shards, its frozen-feature cache
and ``exports/<stage>``, every row teacher-forced on the answer its stage trains on (the teacher:
``It is <class> [SEG].``; the others: the row's ground-truth CoT), so the class is in the text.

1. **The export as trained**, on the test_s rows with a referent: the prompt's mean norm and its
   spread (the norm of the per-dimension standard deviation over rows); the ``[SEG]`` hidden
   state's mean norm, spread and the class's share of its variance over the train rows; a linear
   probe's class accuracy from the ``[SEG]`` hidden state (fit on the train rows); the masks' IoU
   with their own prompt, another row's, a zero one and a random one of the same norm, and how far
   each moved from the own prompt's masks (the IoU of their foregrounds). Masks that stay put under
   another row's prompt do not depend on the referent.
2. **Can the decoder refer?** From the export's decoder, ``--steps`` steps of 16 train rows (3
   frames each, AdamW at 5e-3, 2 x BCE + 0.5 x Dice as the stages) on the frozen SAM embeddings,
   with four prompts: one learned vector for every row (a prior: the best mask without a
   referent), one learned vector per target class (an oracle that names the class), the export's
   ``seg_proj`` on the frozen ``[SEG]`` hidden states, through its ``seg_norm`` (the identity unless
   the stage ended with a head fit, aurora_core/train/head_fit.py: what the model can pass on), and a fresh
   ``seg_proj`` on the same states standardised per feature with the train rows' mean and standard
   deviation, at 5e-4 (the states are one large shared vector plus a small per-row part; the class is
   13 % of that part's variance on the tiny default). test_s IoU of each, also at every quarter of
   the steps: a prompt that learns to refer does so late (on the tiny default, ``--steps 2500``,
   standardised: 0.35 at 625 steps, 0.43 at 1,250, 0.49 at 2,500; the export's ``seg_proj`` on the
   raw states: 0.34 at 2,500; the oracle 0.70).

It holds the train split's SAM embeddings in memory (the tiny default's: ~42 MiB; SAM ViT-H's are 2
MiB a frame, ~20 GiB for Ref-AVS's train split): a probe of the small models, not of a 7B run.

What it divides by: IoU is per row (the mean over its frames with a ground-truth mask, sigmoid >
0.4, at the decoder's mask size), averaged over the test_s rows with a referent. Part 2 holds the
row draws fixed across the four prompts (seed 0). What it printed on the tiny default is in the
README's demo section ("The masks do not follow the reference").
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aurora_core import cli, reasoning, stages  # noqa: E402
from aurora_core.config import StageConfig, load_config  # noqa: E402
from aurora_core.metrics import J_THRESHOLD, mask_iou  # noqa: E402
from aurora_core.train import head_fit  # noqa: E402
from aurora_core.model.build import load_export  # noqa: E402

ROWS, FRAMES, LR = 16, 3, 5e-3  # a step of part 2, as the supervised stages
# the fresh seg_proj on standardised states (tiny default: 0.34 after 400 steps at 5e-3, 0.35 and 0.38
# after 900 at 2e-3 and 1e-3; at 5e-4 0.43 after 1,250)
STANDARDISED_LR = 5e-4


def moved(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Mean over rows of the IoU between two predictions' foregrounds (1.0: the same masks)."""
    return float(np.mean([mask_iou(x, (torch.sigmoid(y) > J_THRESHOLD).float(), J_THRESHOLD) for x, y in zip(a, b)]))


def standardiser(h_train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[H] per-feature mean and standard deviation of the train rows' states: (h - mean) / sd."""
    return h_train.mean(0), h_train.std(0) + 1e-6


def class_share(h: torch.Tensor, y: torch.Tensor) -> float:
    """The share of the rows' variance (about their mean) that their class means explain: 1.0 when
    every row is its class's mean, ~0 when the class says nothing about the state."""
    mu = h.mean(0)
    between = sum(float((y == c).sum()) * float(((h[y == c].mean(0) - mu) ** 2).sum()) for c in y.unique())
    return between / float(((h - mu) ** 2).sum())


def class_probe(h_train: torch.Tensor, y_train: torch.Tensor, h_test: torch.Tensor, y_test: torch.Tensor,
                n_classes: int, steps: int = 500) -> tuple[float, float]:
    """A linear classifier on standardised hidden states, full-batch Adam: train and test accuracy."""
    torch.manual_seed(0)
    mu, sd = standardiser(h_train)
    lin = torch.nn.Linear(h_train.shape[1], n_classes)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(lin((h_train - mu) / sd), y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = lambda h, y: float((lin((h - mu) / sd).argmax(1) == y).float().mean())  # noqa: E731
        return acc(h_train, y_train), acc(h_test, y_test)


def train_decoder(model, prompt_of, params: list[torch.nn.Parameter], tr: dict[str, np.ndarray], steps: int,
                  label: str, te: dict[str, np.ndarray], test_prompts, params_lr: float = LR) -> None:
    """``steps`` steps of the decoder (at LR) and ``params`` (at ``params_lr``) on train rows, the row
    and frame draws of seed 0 for every prompt (head_fit.train_head, as the stages' head fit);
    ``prompt_of(idx)`` -> [B, D]; the loss and the test_s IoU (``test_prompts()``) every quarter."""
    t0 = time.time()

    def report(step: int, loss: float) -> None:
        with torch.no_grad():
            iou = head_fit.mean_iou(model, test_prompts(), te)[0]
        print(f"  [{label}] step {step}/{steps}: loss {loss:.4f}, test_s IoU {iou:.4f} ({time.time() - t0:.0f}s)",
              flush=True)

    head_fit.train_head(model, prompt_of, params, tr, steps, lr=LR, params_lr=params_lr, batch=ROWS, frames=FRAMES,
                        st=StageConfig(), seed=0, report=report)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(cli.DEFAULT_CONFIG))
    ap.add_argument("--stage", default="sft", help="the export to read: teacher | sft | reflect | grpo")
    ap.add_argument("--steps", type=int, default=400, help="decoder steps of part 2 per prompt (0: part 1 only)")
    ap.add_argument("--out", type=Path, help="write the numbers as JSON here")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if not cfg.data.cache_frozen_features:
        print("error: the probe reads SAM's embeddings from the frozen-feature cache: data.cache_frozen_features=true",
              file=sys.stderr)
        return 2
    layout = stages.RunLayout(cfg)
    export = stages.require_export(layout, args.stage, args.stage)
    base = layout.dir / "base" / "llm.safetensors"
    if cfg.text_pretrain.steps and not cfg.model.tiny.llm_weights and base.is_file():
        cfg.model.tiny.llm_weights = str(base)  # the run's pretrained LLM (the export overwrites what it trained)
    stages.require_shards(layout)
    torch.manual_seed(0)
    tr, te = (head_fit.read_rows(layout.shards, split, cfg.data) for split in ("train", "test_s"))
    model, proc, _ = load_export(export, cfg.data, trainable=False, runtime=cfg.model)
    model.eval()
    print(f"[probe] {export}: {len(tr['key'])} train and {len(te['key'])} test_s rows with a referent", flush=True)

    # 1. the export as trained
    t0 = time.time()
    answers = (lambda b: (None, [reasoning.direct_answer(c) for c in b["class"]])) if args.stage == "teacher" else (
        lambda b: (None, list(b["cot"])))
    h_tr, h_te = (head_fit.seg_states(model, proc, rows, answers) for rows in (tr, te))
    classes = sorted(set(tr["class"]) | set(te["class"]))
    y = lambda rows: torch.tensor([classes.index(c) for c in rows["class"]])  # noqa: E731
    probe_train, probe_test = class_probe(h_tr, y(tr), h_te, y(te), len(classes))
    with torch.no_grad():
        seg = model.seg_proj(model.seg_norm(h_te.to(model.seg_proj[0].weight.dtype))).float()
    own_iou, own = head_fit.mean_iou(model, seg, te)
    g = torch.Generator().manual_seed(0)
    rand = torch.randn(seg.shape, generator=g)
    swaps = {"another row's": seg.roll(1, 0), "zero": torch.zeros_like(seg),
             "random, same norm": rand / rand.norm(dim=1, keepdim=True) * seg.norm(dim=1, keepdim=True)}
    part1 = {"prompt_norm": float(seg.norm(dim=1).mean()), "prompt_spread": float(seg.std(0).norm()),
             "state_norm": float(h_tr.norm(dim=1).mean()), "state_spread": float(h_tr.std(0).norm()),
             "state_class_share": class_share(h_tr, y(tr)),
             "class_probe_train": probe_train, "class_probe_test": probe_test,
             "iou": {"own": own_iou}, "same_masks_as_own": {}}
    for name, s in swaps.items():
        part1["iou"][name], logits = head_fit.mean_iou(model, s, te)
        part1["same_masks_as_own"][name] = moved(logits, own)
    print(f"[probe] 1. {args.stage} as trained ({time.time() - t0:.0f}s): [SEG] prompt norm "
          f"{part1['prompt_norm']:.2f}, spread over rows {part1['prompt_spread']:.2f}; the [SEG] hidden state "
          f"on train rows: norm "
          f"{part1['state_norm']:.2f}, spread {part1['state_spread']:.2f}, the class's share of its variance "
          f"{part1['state_class_share']:.3f}; class from the [SEG] hidden state (linear probe) "
          f"train {probe_train:.3f}, test_s {probe_test:.3f}")
    print(f"{'prompt':<20}{'test_s IoU':>12}{'same masks as own':>19}")
    print(f"{'own':<20}{own_iou:>12.4f}{1.0:>19.4f}")
    for name in swaps:
        print(f"{name:<20}{part1['iou'][name]:>12.4f}{part1['same_masks_as_own'][name]:>19.4f}")

    # 2. can the decoder refer?
    part2: dict[str, float] = {}
    if args.steps:
        decoder0 = copy.deepcopy(model.sam.mask_decoder.state_dict())
        proj0 = copy.deepcopy(model.seg_proj.state_dict())
        width = seg.shape[1]
        cls_tr, cls_te = y(tr), y(te)
        mu, sd = standardiser(h_tr)
        for name in ("one prompt (prior)", "a prompt per class (oracle)", "seg_proj([SEG] state)",
                     "fresh seg_proj(standardised)"):
            torch.manual_seed(0)
            params_lr = LR
            model.sam.mask_decoder.load_state_dict(decoder0)
            model.seg_proj.load_state_dict(proj0)
            for p in [*model.sam.mask_decoder.parameters(), *model.seg_proj.parameters()]:
                p.requires_grad_(True)
            if name.startswith("seg_proj"):
                params = list(model.seg_proj.parameters())
                prompt_of = lambda idx: model.seg_proj(model.seg_norm(h_tr[idx]))  # noqa: E731
                test_prompts = lambda: model.seg_proj(model.seg_norm(h_te))  # noqa: E731
            elif name.startswith("fresh"):
                proj = copy.deepcopy(model.seg_proj)
                head_fit.reset_projection(proj, 0)  # the seed the loop set: the same init as before
                params, params_lr = list(proj.parameters()), STANDARDISED_LR
                prompt_of = lambda idx, f=proj: f((h_tr[idx] - mu) / sd)  # noqa: E731
                test_prompts = lambda f=proj: f((h_te - mu) / sd)  # noqa: E731
            else:
                table = torch.nn.Embedding(len(classes) if "class" in name else 1, width)
                params = list(table.parameters())
                pick = (lambda c: c) if "class" in name else (lambda c: torch.zeros_like(c))
                prompt_of = lambda idx, t=table, p=pick: t(p(cls_tr[idx]))  # noqa: E731
                test_prompts = lambda t=table, p=pick: t(p(cls_te))  # noqa: E731
            train_decoder(model, prompt_of, params, tr, args.steps, name, te, test_prompts, params_lr)
            with torch.no_grad():
                part2[name] = head_fit.mean_iou(model, test_prompts(), te)[0]
        print(f"[probe] 2. the {args.stage} decoder trained {args.steps} steps of {ROWS} rows per prompt:")
        for name, v in part2.items():
            print(f"{name:<30} test_s IoU {v:.4f}")
    if args.out:
        args.out.write_text(json.dumps({"stage": args.stage, "export": str(export), "steps": args.steps,
                                        "as_trained": part1, "decoder_trained": part2}, indent=1))
        print(f"[probe] {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
