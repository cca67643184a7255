"""Checkpoints laid out as the hub ships them (reduced depth, real widths, bench/make_reduced_checkpoint.py):
the thinker loads from the full-Omni directory (no talker, no speaker table) and from a thinker-only
one, with every weight taken from the file."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from aurora_core.model.build import _load_thinker
from aurora_core.model.tokenizer import MM_TOKENS, load_tokenizer
from conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("make_reduced_checkpoint", ROOT / "bench" / "make_reduced_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, mod.build(tmp_path_factory.mktemp("ckpt"), "3b", 1, "vit-b")


def test_hub_layout(reduced):
    mod, dirs = reduced
    cfg = json.loads((dirs["full"] / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_5_omni" and {"thinker_config", "talker_config", "token2wav_config"} <= set(cfg)
    assert cfg["thinker_config"]["text_config"]["vocab_size"] == 151936
    with safe_open(str(dirs["full"] / "model.safetensors"), "pt") as f:
        prefixes = {".".join(k.split(".")[:2]) for k in f.keys()}
    assert prefixes == {"thinker.audio_tower", "thinker.visual", "thinker.model", "thinker.lm_head"}
    assert not (dirs["full"] / "spk_dict.pt").exists()
    tok = load_tokenizer(dirs["full"])
    assert {i: tok.convert_ids_to_tokens(i) for i in mod.QWEN_SPECIALS} == mod.QWEN_SPECIALS
    assert tok.convert_tokens_to_ids(MM_TOKENS["video_token"]) == cfg["thinker_config"]["video_token_index"]


@pytest.mark.parametrize("which,prefix", [("full", "thinker."), ("thinker", "")])
def test_thinker_weights_come_from_the_file(reduced, which, prefix):
    _, dirs = reduced
    th = _load_thinker(dirs[which], torch.bfloat16)
    assert not hasattr(th, "talker")
    with safe_open(str(dirs[which] / "model.safetensors"), "pt") as f:
        for key, tensor in (("model.embed_tokens.weight", th.get_input_embeddings().weight),
                            ("lm_head.weight", th.lm_head.weight),
                            ("model.layers.0.self_attn.q_proj.weight", th.model.language_model.layers[0].self_attn.q_proj.weight),
                            ("audio_tower.conv1.weight", th.model.audio_tower.conv1.weight),
                            ("visual.blocks.0.attn.q.weight", th.model.visual.blocks[0].attn.q.weight)):
            assert torch.equal(f.get_tensor(prefix + key), tensor), key
    assert th.get_input_embeddings().weight.shape == (151936, 2048)


def test_a_checkpoint_missing_weights_is_an_error(reduced, tmp_path):
    _, dirs = reduced
    bad = tmp_path / "bad"
    shutil.copytree(dirs["thinker"], bad)
    with safe_open(str(bad / "model.safetensors"), "pt") as f:
        kept = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("audio_tower.conv1.")}
    save_file(kept, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks 2 thinker weights .*conv1"):
        _load_thinker(bad, torch.bfloat16)
