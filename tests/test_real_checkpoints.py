"""Checkpoints laid out as the hub ships them (reduced depth, real widths, bench/make_reduced_checkpoint.py):
the thinker loads from the full-Omni directory (no talker, no speaker table) and from a thinker-only
one, with every weight taken from the file; the checkpoints' processor settings are read; and on the
3B-width checkpoint with the real-model config (frames 256, video 224, SAM 1024, 10 frames, 10 s of
audio, the whole 151,936-token vocabulary) inspect_model, a ZeRO-3 SFT step on 2 CPU workers, a GRPO
step and an evaluation batch run, reading SAM's embeddings from the feature cache."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file
from safetensors.torch import save_file

from aurora_core.model.build import _load_thinker
from aurora_core.model.tokenizer import MM_TOKENS, load_tokenizer
from conftest import ROOT, load_script, run_script

pytestmark = pytest.mark.slow


CHECKPOINT_BUILDER = ROOT / "bench" / "make_reduced_checkpoint.py"


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    """3.1 GB on disk (two 1.5 GB thinkers: the 151,936 x 2,048 embedding and lm_head dominate),
    removed when the module is done so that it does not stay on a CI disk for the session."""
    mod = load_script(CHECKPOINT_BUILDER)
    out = tmp_path_factory.mktemp("ckpt")
    yield mod, mod.build(out, "3b", 1, "vit-b")
    shutil.rmtree(out, ignore_errors=True)


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


def test_zero_init_builds_the_model_partitioned_with_the_files_weights(reduced, tmp_path):
    """model.zero_init: a ZeRO-3 worker (here a 1-rank gloo group in a fresh process, as in
    bench/construction_memory.py) builds the full-Omni checkpoint under deepspeed.zero.Init: the
    frozen weights are partitioned as they are constructed, and a decoder weight gathered from its
    partitions is the file's."""
    import sys

    import torch.multiprocessing as mp

    sys.path.insert(0, str(ROOT / "bench"))
    import construction_memory

    _, dirs = reduced
    out = tmp_path / "rank.json"
    overrides = load_script(CHECKPOINT_BUILDER).cpu_overrides(dirs, tmp_path / "runs")
    mp.start_processes(construction_memory.worker, nprocs=1, start_method="spawn",
                       args=(1, _free_port(), overrides, True, str(out)))
    (w,) = json.loads(out.read_text())
    assert w["weights_loaded"] == 1.0
    assert w["partitioned_params"] > 0.95 * w["local_params"], w  # all but what peft / token_rows / seg_proj add


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_checkpoint_missing_weights_is_an_error(reduced, tmp_path):
    """The thinker-only checkpoint without its audio conv1 and its two vocabulary matrices (left out
    too so that the copy is 0.3 GB, not another 1.5 GB): an error naming what is missing."""
    _, dirs = reduced
    bad = tmp_path / "bad"
    shutil.copytree(dirs["thinker"], bad, ignore=shutil.ignore_patterns("*.safetensors"))
    dropped = ("audio_tower.conv1.", "model.embed_tokens.", "lm_head.")
    with safe_open(str(dirs["thinker"] / "model.safetensors"), "pt") as f:
        kept = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(dropped)}
    save_file(kept, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 4 thinker weights \(lm_head\.weight, model\.audio_tower\.conv1\.bias, "
                                         r"model\.audio_tower\.conv1\.weight, model\.language_model\.embed_tokens\.weight\)"):
        _load_thinker(bad, torch.bfloat16)


def test_the_checkpoints_processor_settings_are_read_and_checked(reduced, tmp_path):
    """preprocessor_config.json (Qwen's Whisper + image settings, SAM's) is read, not re-typed; a
    value that contradicts our config is an error naming both."""
    from dataclasses import replace

    from aurora_core.config import load_config
    from aurora_core.model.processor import AuroraProcessor, Preprocessing

    mod, dirs = reduced
    cfg = real_cfg(dirs, tmp_path)
    proc = AuroraProcessor(load_tokenizer(dirs["full"]), cfg.model, cfg.data)
    pc = json.loads((dirs["full"] / "preprocessor_config.json").read_text())
    assert proc.pre.source.endswith("preprocessor_config.json")
    assert list(proc.video.image_mean) == pc["image_mean"] and list(proc.video.image_std) == pc["image_std"]
    assert proc.audio.n_fft == pc["n_fft"] and proc.audio.hop_length == pc["hop_length"] == cfg.model.audio_hop_length
    assert list(proc.sam.image_mean) == mod.SAM_PREPROCESSOR["image_mean"]
    bad = tmp_path / "omni"
    bad.mkdir()
    (bad / "preprocessor_config.json").write_text(json.dumps({**pc, "hop_length": 320}))
    with pytest.raises(ValueError, match=r"hop_length=320 but we use 160 \(model.audio_hop_length\)"):
        Preprocessing.for_model(replace(cfg.model, llm_path=str(bad)), cfg.data)
    (bad / "preprocessor_config.json").write_text(json.dumps({**pc, "merge_size": 3}))
    with pytest.raises(ValueError, match="merge_size=3 but we use 2"):
        Preprocessing.for_model(replace(cfg.model, llm_path=str(bad)), cfg.data)
    small = load_config(ROOT / "configs" / "tiny.yaml", [f"model.sam_path={dirs['sam']}"])
    with pytest.raises(ValueError, match="longest_edge=1024 but model.sam_image_size=64"):
        AuroraProcessor(load_tokenizer(dirs["full"]), small.model, small.data)


def real_overrides(dirs, root) -> list[str]:
    return load_script(CHECKPOINT_BUILDER).cpu_overrides(dirs, root)


def real_cfg(dirs, root):
    from aurora_core.config import load_config

    return load_config(ROOT / "configs" / "qwen2.5-omni-7b.yaml", real_overrides(dirs, root))


@pytest.fixture(scope="module")
def real_run(reduced, tmp_path_factory):
    from aurora_core import stages
    from aurora_core.config import load_config

    _, dirs = reduced
    root = tmp_path_factory.mktemp("reduced-run")
    # the stages read SAM's embeddings from the cache (built once, before the first stage): SAM's
    # 1024-px pixels are then never made, so an encoder call anywhere would raise
    cfg = load_config(ROOT / "configs" / "qwen2.5-omni-7b.yaml",
                      real_overrides(dirs, root) + ["data.cache_frozen_features=true"])
    stages.prepare(cfg)
    return dirs, root, cfg


def test_inspect_model_on_the_reduced_checkpoint(real_run):
    """inspect_model.py with the real-model config: 3 samples of 10 frames at SAM 1024 stay far under
    the machine's 24 GiB (the SAM encoder and the towers run in bounded chunks, once per prompt)."""
    dirs, root, _ = real_run
    r = run_script("pipelines/inspect_model.py", "--config", "configs/qwen2.5-omni-7b.yaml",
                   *real_overrides(dirs, root), "--rows", "1", "--samples", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    print(r.stdout)
    assert re.search(r"llm\.lm_head +311,166,976 +2,048\n", r.stdout)  # the [SEG] row trains, not the matrix
    assert "masks (1, 10, 256, 256)" in r.stdout and "masks (3, 10, 256, 256)" in r.stdout
    peak = float(r.stdout.split("peak RSS ")[1].split(" MiB")[0])
    assert peak < 16 * 1024, peak


def test_sft_grpo_and_eval_steps_on_the_reduced_checkpoint(ray_session, real_run):
    """A ZeRO-3 teacher step on 2 CPU workers, a GRPO step (rollout actor + learner, weights pushed)
    and an evaluation batch at 3B widths, with their peak memory logged."""
    from aurora_core import stages
    from aurora_core.model.build import load_export

    dirs, root, cfg = real_run
    tracker = stages.tracker_for(cfg)
    t = stages.teacher(cfg, tracker, None)
    cache = Path(cfg.data.frozen_features_dir)
    assert cache.parent == root / "reduced" / "data" / "frozen-features"
    emb = load_file(str(next(cache.glob("*/*.safetensors"))))["image_embeddings"]
    assert emb.shape == (10, 256, 64, 64) and emb.dtype == np.float16  # SAM ViT-B at 1024 px, 2 MiB a frame
    print(f"teacher step: {t['seconds']:.0f}s, peak RSS of the fullest worker {t['mem/peak_rss_mb']:.0f} MiB")
    assert t["train/loss"] > 0 and t["mem/peak_rss_mb"] < 12 * 1024
    teacher = stages.RunLayout(cfg).export("teacher")
    meta = json.loads((teacher / "aurora.json").read_text())
    assert meta["model"]["llm_path"] == str(dirs["full"]) and not (teacher / "base").exists()  # referenced
    model, _, m = load_export(teacher, cfg.data, trainable=False)
    assert m.trainable_tokens == "new" and model.thinker.lm_head.rows.shape == (1, 2048)
    del model
    g = stages.grpo(cfg, tracker, None, init=teacher)
    h = g["history"][-1]
    print(f"GRPO step: {g['seconds']:.0f}s, generate {h['time/generate_s']:.0f}s, learner {h['time/learner_s']:.0f}s, "
          f"sync {h['sync/payload_mb']:.1f} MB, learner peak RSS {h['learner_mem/peak_rss_mb']:.0f} MiB")
    assert h["optimizer_step"] == 1 and h["sync/payload_mb"] < 64
    e = stages.evaluate(cfg, tracker, None, stages.RunLayout(cfg).export("grpo"))
    print(f"eval: {e['seconds']:.0f}s")
    assert list(e["splits"]) == ["test_n"] and (root / "reduced" / "eval" / "grpo" / "results.json").is_file()


def test_gpu_check_config_composes_without_a_gpu(tmp_path):
    """bench/gpu_check.py's one-GPU config (learner and rollout actor on halves of one GPU, weights
    through the object store) is valid; the GPU parts themselves run only where a GPU is."""
    r = run_script("bench/gpu_check.py", "--config-only", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "GPU check config ok: bfloat16, SAM 1024 px, 10 frames, learner 0.5 GPU + 1 rollout actor x 0.5 GPU, " \
           "weights by object_store" in r.stdout
