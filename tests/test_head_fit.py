"""The head fit (aurora_core/train/head_fit.py): a seg_proj on [SEG] states standardised per feature
learns to pass the class on to SAM's decoder where the same head on the raw states does not. Its run
inside a stage (rank 0, the export step, the standardiser carried by later stages' exports):
tests/test_train_stages.py::test_each_stage_exports_and_checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aurora_core.config import ConfigError, StageConfig, load_config
from aurora_core.model.build import build_model
from aurora_core.train import head_fit
from conftest import NO_CACHE, ROOT, SMALL_DATA

STEPS = 300


def quadrant_rows(model, size: int, n: int = 96, classes: int = 4):
    """States as the tiny [SEG] states are (one large shared vector, the class a small part of the rest),
    SAM embeddings that say nothing (noise at the encoder's scale), a mask that is the class's quadrant:
    only a prompt that carries the class can segment it (one prompt for all: IoU 0.25 at best)."""
    g = torch.Generator().manual_seed(0)
    width = model.seg_norm.mean.shape[0]
    y = torch.randint(0, classes, (n,), generator=g)
    states = 13.0 + 0.3 * torch.randn(classes, width, generator=g)[y] + 0.1 * torch.randn(n, width, generator=g)
    with torch.no_grad():
        emb = model.image_embeddings(torch.rand(1, 1, 3, model.sam.config.vision_config.image_size,
                                                model.sam.config.vision_config.image_size, generator=g))
    masks = np.zeros((n, 2, size, size), np.uint8)
    for i, c in enumerate(y.tolist()):
        r, q = divmod(c, 2)
        masks[i, :, r * size // 2:(r + 1) * size // 2, q * size // 2:(q + 1) * size // 2] = 1
    sam = torch.randn(n, 2, *emb.shape[1:], generator=g) * emb.std() + emb.mean()
    rows = {"key": np.arange(n), "sam_embeddings": sam.half().numpy(), "masks": masks,
            "gt_frames": np.ones((n, 2), bool)}
    return states, rows


@pytest.mark.parametrize("standardised", [True, False])
def test_standardised_states_let_the_head_refer(standardised):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", SMALL_DATA + NO_CACHE)
    torch.manual_seed(0)
    model, _ = build_model(cfg.model, cfg.data)
    states, rows = quadrant_rows(model, cfg.data.frame_size)
    train = {k: v[:64] for k, v in rows.items()}
    test = {k: v[64:] for k, v in rows.items()}
    if standardised:  # what fit() measures: the train rows' per-feature mean and standard deviation
        with torch.no_grad():
            model.seg_norm.mean.copy_(states[:64].mean(0))
            model.seg_norm.scale.copy_(1.0 / (states[:64].std(0) + 1e-6))
        z = model.seg_norm(states[:64])
        assert z.mean(0).abs().max() < 1e-4 and (z.std(0) - 1.0).abs().max() < 1e-3
    prompts = lambda idx: model.seg_proj(model.seg_norm(states[idx]))  # noqa: E731
    before = head_fit.mean_iou(model, prompts(np.arange(64, 96)), test)[0]
    head_fit.train_head(model, prompts, list(model.seg_proj.parameters()), train, STEPS, lr=5e-3, params_lr=2e-3,
                        batch=16, frames=2, st=StageConfig(), seed=0)
    after = head_fit.mean_iou(model, prompts(np.arange(64, 96)), test)[0]
    # measured: standardised 0.25 -> 1.00 after 300 steps (0.35 after 150); raw 0.25 -> 0.10
    if standardised:
        assert after > 0.9, (before, after)
    else:
        assert after < 0.5, (before, after)


def test_the_head_fit_needs_the_frozen_feature_cache():
    with pytest.raises(ConfigError, match="sft.head_steps > 0: the head fit reads SAM's embeddings"):
        load_config(ROOT / "configs" / "tiny.yaml",
                    ["data.cache_frozen_features=false", "data.cache_towers=false", "teacher.head_steps=0"])
    with pytest.raises(ConfigError, match="reflect.head_steps must be 0"):
        load_config(ROOT / "configs" / "tiny.yaml", ["reflect.head_steps=10"])


def test_the_standardiser_keeps_fp32_statistics_in_a_bf16_model():
    """A [SEG] state of norm ~13 whose per-row part has sd ~0.05 a feature: bf16 statistics (3 significant
    digits) would shift each feature by up to half a standard deviation. model.to(bf16) and DeepSpeed's cast
    leave them fp32."""
    from aurora_core.model.aurora import Standardiser

    s = Standardiser(4)
    s.mean.fill_(13.1234)
    s.scale.fill_(20.0)
    m = torch.nn.Sequential(s).to(torch.bfloat16)
    assert m[0].mean.dtype == torch.float32 and m[0].mean[0].item() == pytest.approx(13.1234, abs=1e-5)
    m.half()
    assert m[0].scale.dtype == torch.float32
    h = torch.full((2, 4), 13.1734)
    assert torch.allclose(m(h), torch.ones(2, 4), atol=1e-4)  # fp32 in, fp32 statistics: exact
    assert m(h.bfloat16()).dtype == torch.bfloat16
