"""data.cache_frozen_features: SAM image embeddings (and, with data.cache_towers, the audio and vision
towers' outputs) computed once per distinct clip by a Ray Data actor pool, stored beside the shards,
and read by the decoders instead of running the frozen encoders."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from aurora_core.config import ConfigError, load_config
from aurora_core.data import feature_cache, shards
from aurora_core.model.build import build_model, tiny_sam_config
from conftest import ROOT, SMALL_DATA, decoded_rows


@pytest.fixture(scope="module")
def sam_dir(tmp_path_factory, small_cfg):
    from transformers import SamModel

    torch.manual_seed(3)
    out = tmp_path_factory.mktemp("sam") / "sam-tiny"
    SamModel(tiny_sam_config(small_cfg.model)).save_pretrained(out, safe_serialization=True)
    return out


def _cfg(small_cfg, sam_dir, *extra):
    """A SAM checkpoint on disk, its embeddings cached (not the towers': the real configs' setting)."""
    return load_config(ROOT / "configs" / "tiny.yaml",
                       SMALL_DATA + [f"run.root={small_cfg.run.root}", f"model.sam_path={sam_dir}",
                                     "data.cache_frozen_features=true", "data.cache_towers=false", *extra])


def test_towers_are_cached_only_with_the_cache(tmp_path):
    with pytest.raises(ConfigError, match="data.cache_towers needs data.cache_frozen_features=true"):
        load_config(ROOT / "configs" / "tiny.yaml", ["data.cache_frozen_features=false"])


def test_each_clip_is_embedded_once_and_the_model_reads_the_cache(ray_session, small_cfg, small_shards, sam_dir):
    from aurora_core import stages

    cfg = _cfg(small_cfg, sam_dir)
    stages.require_shards(stages.RunLayout(cfg))
    root = cfg.data.frozen_features_dir
    assert root and str(small_shards.parent) in root
    rows = sum(pq.ParquetFile(f).metadata.num_rows
               for f in shards.split_files(small_shards, shards.load_manifest(small_shards)["splits"]))
    files = sorted(p.name for p in Path(root).glob("*/*.safetensors"))
    again = feature_cache.ensure(cfg, small_shards)  # a rerun embeds nothing
    assert (again.rows, again.cached_before, again.computed) == (rows, again.clips, 0)
    assert len(files) == again.clips <= rows

    # the stored embeddings are SAM's encoder on the decoded frames (fp16 storage)
    model, proc = build_model(cfg.model, cfg.data)
    model.eval()
    plain = decoded_rows(small_shards, "test_s", 2, cfg.data)
    cached = decoded_rows(small_shards, "test_s", 2, cfg.data, features_dir=root)
    assert cached["sam_embeddings"].dtype == torch.float16
    want = model.image_embeddings(proc.prompt_batch(plain).sam_pixel_values)
    torch.testing.assert_close(cached["sam_embeddings"].flatten(0, 1).float(), want, atol=2e-3, rtol=2e-3)

    # the model reads the cache: SAM's encoder never runs, and the outputs match within fp16 rounding
    calls = []
    model.sam.vision_encoder.register_forward_hook(lambda *a: calls.append(1))
    inp_c = proc.train_batch(cached, list(cached["cot"]))
    assert inp_c.sam_pixel_values.shape[2:] == (0,)  # no 1024-px pixels made
    out_c = model(inp_c)
    feats = model.frozen_features(proc.prompt_batch(cached))
    assert not calls
    out_p = model(proc.train_batch(plain, list(plain["cot"])))
    assert calls
    torch.testing.assert_close(out_c.mask_logits, out_p.mask_logits, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(feats.image_embeddings, cached["sam_embeddings"].float())
    # and a loss on them backpropagates into the trainable mask decoder
    out_c.mask_logits.sigmoid().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.sam.mask_decoder.parameters())

    # a Ray Data read of a split carries them too (the stages' decoders read data.features_dir)
    batch = shards.clip_dataset(small_shards, ["test_n"], cfg.data, batch_size=2).take_batch(2, batch_format="numpy")
    assert batch["sam_embeddings"].shape[:2] == (2, cfg.data.num_frames)


def test_a_cache_of_another_sam_is_refused_and_a_missing_clip_named(small_cfg, small_shards, sam_dir, tmp_path):
    from transformers import SamModel

    cfg = _cfg(small_cfg, sam_dir)
    fp = feature_cache.fingerprint(cfg)
    root = tmp_path / "cache"
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps({"fingerprint": fp}))
    torch.manual_seed(4)
    other = tmp_path / "sam-other"
    SamModel(tiny_sam_config(cfg.model)).save_pretrained(other, safe_serialization=True)
    cfg2 = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, sam_path=str(other)),
                               data=dataclasses.replace(cfg.data, frozen_features_dir=str(root)))
    assert feature_cache.cache_dir(cfg2) == root
    with pytest.raises(ValueError, match="made with other settings.*sam"):
        feature_cache.ensure(cfg2, small_shards)
    # a different SAM without a pinned directory gets its own directory
    assert feature_cache.cache_dir(dataclasses.replace(cfg2, data=cfg.data)) != feature_cache.cache_dir(cfg)

    table = pq.read_table(shards.split_files(small_shards, ["val"])).slice(0, 1)
    with pytest.raises(FileNotFoundError, match=f"row {table['key'][0]}: its clip has no frozen features"):
        feature_cache.read(root, table["clip"].to_pylist(), table["key"].to_pylist())
