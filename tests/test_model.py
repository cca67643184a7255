"""The AURORA model on the tiny default: forward, gradients, masks, generation, save/load, learning."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from aurora_core import losses
from aurora_core.model.build import build_model, export_merged, load_export, parameter_report, save_export
from conftest import ROOT, decoded_rows


@pytest.fixture(scope="module")
def built(small_cfg):
    torch.manual_seed(0)
    return build_model(small_cfg.model, small_cfg.data)


@pytest.fixture(scope="module")
def batch(small_cfg, small_shards):
    return decoded_rows(small_shards, "train", 3, small_cfg.data)


def total_loss(model, proc, batch):
    inp = proc.train_batch(batch, batch["cot"])
    out = model(inp)
    return (losses.lm_loss(out.logits, inp.labels[:, out.logits_from:]) + 2.0 * losses.mask_bce(out.mask_logits, batch["masks"])
            + 0.5 * losses.dice_loss(out.mask_logits, batch["masks"]))


def test_forward_audio_video_text(built, batch, small_cfg):
    model, proc = built
    inp = proc.train_batch(batch, batch["cot"])
    ids = inp.input_ids[0].tolist()
    assert ids.count(model.thinker.config.video_token_index) == proc.num_video_tokens
    assert ids.count(model.thinker.config.audio_token_index) == proc.num_audio_tokens
    out = model(inp)
    T, S = small_cfg.data.num_frames, small_cfg.data.frame_size
    # logits from the position before the first answer token on: no loss reads a prompt's
    start = inp.answer_start()
    assert out.logits_from == start - 1 and start > proc.num_video_tokens + proc.num_audio_tokens
    assert out.logits.shape[:2] == (3, inp.input_ids.shape[1] - start + 1)
    full = model(inp, logits_from=0)
    assert torch.allclose(full.logits[:, start - 1:], out.logits, atol=1e-6)
    assert losses.lm_loss(full.logits, inp.labels).item() == pytest.approx(
        losses.lm_loss(out.logits, inp.labels[:, start - 1:]).item(), rel=1e-6)
    assert out.mask_logits.shape == (3, T, S, S) and out.has_seg.all()
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.mask_logits).all()
    # the audio and the frames matter: changing either changes the answer logits
    b2 = dict(batch, audio=batch["audio"].flip(-1), frames=batch["frames"].flip(-1))
    assert not torch.allclose(model(proc.train_batch(b2, batch["cot"])).logits, out.logits)


def test_gradients_reach_exactly_the_trainable_parts(built, batch):
    model, proc = built
    model.zero_grad(set_to_none=True)
    model.train()
    total_loss(model, proc, batch).backward()
    trainable = re.compile(r"(lora_[AB]|modules_to_save|^seg_proj\.|^sam\.mask_decoder\.)")
    for name, p in model.named_parameters():
        if trainable.search(name) and "iou_prediction_head" not in name:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    lora = [n for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(".language_model.layers." in n and re.search(r"\.(q_proj|v_proj)\.", n) for n in lora)
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "mask_decoder" in n)
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    rep = parameter_report(model)
    for frozen in ("llm.audio_tower", "llm.visual", "sam.vision_encoder", "sam.prompt_encoder"):
        assert rep[frozen]["trainable"] == 0 and rep[frozen]["total"] > 0
    model.zero_grad(set_to_none=True)


def test_llm_lr_splits_the_llm_from_the_segmentation_head(built):
    from aurora_core.train.zero3 import Optimization, param_groups

    model, _ = built
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    one = param_groups(model, Optimization(1, 1, 5e-3, 0.0, 0, 0.1, 10))
    assert len(one) == 1 and "lr" not in one[0] and {id(p) for p in one[0]["params"]} == set(trainable)
    head, llm = param_groups(model, Optimization(1, 1, 5e-3, 0.0, 0, 0.1, 10, llm_lr=1e-3))
    assert head["lr"] == 5e-3 and llm["lr"] == 1e-3
    head_names = {trainable[id(p)] for p in head["params"]}
    llm_names = {trainable[id(p)] for p in llm["params"]}
    assert not head_names & llm_names and head_names | llm_names == set(trainable.values())
    assert all(n.startswith(("seg_proj.", "sam.mask_decoder.")) for n in head_names), head_names
    assert any(n.startswith("seg_proj.") for n in head_names) and any("mask_decoder" in n for n in head_names)
    assert llm_names and all(n.startswith("llm.") for n in llm_names) and any("lora_" in n for n in llm_names)


def test_seg_embedding_drives_masks(built, batch):
    model, proc = built
    model.eval()
    inp = proc.train_batch(batch, batch["cot"])
    with torch.no_grad():
        out = model(inp)
        again = model.decode_masks(out.seg_embedding, inp.sam_pixel_values, out.has_seg)
        other = model.decode_masks(out.seg_embedding + 1.0, inp.sam_pixel_values, out.has_seg)
    assert torch.allclose(again, out.mask_logits, atol=1e-5)
    assert not torch.allclose(other, out.mask_logits)
    # an answer without [SEG] gives an empty mask
    no_seg = proc.train_batch(batch, ["Step 1: nothing."] * 3)
    with torch.no_grad():
        o = model(no_seg)
    assert not o.has_seg.any() and (torch.sigmoid(o.mask_logits) < 0.01).all()


def test_generate_with_masks_shapes_and_logprobs(built, batch, small_cfg):
    model, proc = built
    model.eval()
    G, B = 3, 3
    prompts = proc.prompt_batch(batch)
    torch.manual_seed(0)
    r = model.generate_with_masks(prompts, num_samples=G, temperature=1.0, top_p=0.9, max_new_tokens=24,
                                  eos_id=proc.eos_id, pad_id=proc.pad_id, suppress_ids=proc.suppress_ids,
                                  decode=proc.decode)
    C = r.completion_ids.shape[1]
    assert r.completion_ids.shape == r.completion_mask.shape == r.logprobs.shape == (B * G, C)
    assert r.mask_logits.shape == (B * G, small_cfg.data.num_frames, small_cfg.data.frame_size, small_cfg.data.frame_size)
    assert len(r.texts) == B * G and r.has_seg.shape == (B * G,)
    assert (r.logprobs <= 0).all() and (r.logprobs[r.completion_mask == 0] == 0).all()
    assert not torch.isin(r.completion_ids[r.completion_mask.bool()], torch.tensor(proc.suppress_ids)).any()
    # each sample's log-probs equal a separate, unpadded teacher-forced forward on the same tokens
    for row in (0, 4, 8):
        b = row // G
        keep = prompts.attention_mask[b].bool()
        prompt = prompts.input_ids[b][keep]
        comp = r.completion_ids[row][r.completion_mask[row].bool()]
        one = prompts.repeat_interleave(1)
        one.input_ids = torch.cat([prompt, comp])[None]
        one.attention_mask = torch.ones_like(one.input_ids)
        for k in ("input_features", "feature_attention_mask", "video_grid_thw", "video_second_per_grid", "sam_pixel_values"):
            setattr(one, k, getattr(prompts, k)[b:b + 1])
        n = prompts.pixel_values_videos.shape[0] // B
        one.pixel_values_videos = prompts.pixel_values_videos[b * n:(b + 1) * n]
        with torch.no_grad():
            logits = model.llm(**one.thinker_kwargs()).logits[0, len(prompt) - 1:-1]
        ref = torch.log_softmax(logits, -1).gather(-1, comp[:, None]).squeeze(-1)
        assert torch.allclose(ref, r.logprobs[row][: len(comp)], atol=1e-4), (ref - r.logprobs[row][: len(comp)]).abs().max()
        assert proc.decode(comp) == r.texts[row]


def test_save_load_round_trip_and_merged_export(built, batch, small_cfg, tmp_path):
    model, proc = built
    with torch.no_grad():  # make the trained parts non-trivial so the round trip means something
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
        model.seg_norm.mean.normal_()  # the head fit's standardiser: buffers that travel in heads.safetensors
        model.seg_norm.scale.uniform_(0.5, 2.0)
    model.eval()
    inp = proc.train_batch(batch, batch["cot"])
    with torch.no_grad():
        ref = model(inp)
    save_export(model, proc, small_cfg.model, tmp_path / "export")
    assert not list((tmp_path / "export").rglob("*.bin")) and not list((tmp_path / "export").rglob("*.pt"))
    loaded, proc2, _ = load_export(tmp_path / "export", small_cfg.data, trainable=False)
    loaded.eval()
    with torch.no_grad():
        got = loaded(proc2.train_batch(batch, batch["cot"]))
    assert torch.equal(proc2.train_batch(batch, batch["cot"]).input_ids, inp.input_ids)
    assert torch.allclose(got.logits, ref.logits, atol=1e-5)
    assert torch.allclose(got.mask_logits, ref.mask_logits, atol=1e-5)
    assert torch.equal(loaded.seg_norm.mean, model.seg_norm.mean) and torch.equal(loaded.seg_norm.scale, model.seg_norm.scale)
    # an export written before seg_norm existed: its seg_proj read the raw state, and loads so (the identity)
    heads = load_file(str(tmp_path / "export" / "heads.safetensors"))
    save_file({k: v for k, v in heads.items() if not k.startswith("seg_norm.")}, str(tmp_path / "export" / "heads.safetensors"))
    older, _, _ = load_export(tmp_path / "export", small_cfg.data, trainable=False)
    assert not older.seg_norm.mean.any() and bool((older.seg_norm.scale == 1).all())
    save_file(heads, str(tmp_path / "export" / "heads.safetensors"))
    export_merged(tmp_path / "export", tmp_path / "merged", small_cfg.data)
    merged, proc3, m3 = load_export(tmp_path / "merged", small_cfg.data, trainable=False)
    assert not merged.has_lora and not m3.lora.enabled
    with torch.no_grad():
        got = merged.eval()(proc3.train_batch(batch, batch["cot"]))
    assert torch.allclose(got.logits, ref.logits, atol=1e-4)
    assert torch.allclose(got.mask_logits, ref.mask_logits, atol=1e-4)


def test_a_few_steps_reduce_the_loss(small_cfg, batch):
    torch.manual_seed(0)
    model, proc = build_model(small_cfg.model, small_cfg.data)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(12):
        loss = total_loss(model, proc, batch)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first, (first, loss.item())


def test_inspect_model_command(small_cfg, small_shards):
    from conftest import SMALL_DATA, run_script

    r = run_script("pipelines/inspect_model.py", *SMALL_DATA, f"run.root={small_cfg.run.root}", "--samples", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    for needle in ("sam.mask_decoder", "llm.audio_tower", "forward: tokens", "generate_with_masks: 4 samples",
                   "peak RSS"):
        assert needle in r.stdout


def test_forced_seg_decodes_a_mask_where_the_answer_has_none(built, batch, small_cfg):
    """eval.no_seg=force: an answer without [SEG] gets "It is [SEG]." appended and its masks are
    decoded from that token, exactly as a teacher-forced forward of the extended answer would."""
    from aurora_core.model.aurora import NO_SEG_LOGIT, Rollouts

    model, proc = built
    model.eval()
    prompts = proc.prompt_batch(batch)
    with_seg = proc.answer_ids(batch["cot"][1])
    without = proc.answer_ids("Step 1: nothing.")
    c = max(len(with_seg), len(without))
    ids = torch.tensor([x + [proc.pad_id] * (c - len(x)) for x in (without, with_seg)])
    mask = torch.tensor([[1] * len(x) + [0] * (c - len(x)) for x in (without, with_seg)])
    two = prompts.rows(0, 2)
    with torch.no_grad():
        out, _ = model.forward_completions(two, ids, mask)
    r = Rollouts(["", ""], ids, mask, torch.zeros(2, c), out.mask_logits, out.has_seg, model.frozen_features(two))
    assert out.has_seg.tolist() == [False, True] and (out.mask_logits[0] == NO_SEG_LOGIT).all()
    suffix = proc.tok(" It is [SEG].", add_special_tokens=False).input_ids
    forced = model.masks_with_forced_seg(two, r, suffix, proc.eos_id)
    assert torch.equal(forced[1], out.mask_logits[1])  # answers with [SEG] are untouched
    full = torch.tensor([without[:-1] + suffix + [proc.eos_id]])
    with torch.no_grad():
        ref, _ = model.forward_completions(prompts.rows(0, 1), full, torch.ones_like(full))
    assert ref.has_seg.all() and torch.allclose(forced[0], ref.mask_logits[0], atol=1e-5)
    assert not (forced[0] == NO_SEG_LOGIT).all()


def test_an_answer_that_names_no_target_gets_an_empty_mask(built, batch):
    """model.empty_mask_on_none: the masks of an answer whose target is "none" are emptied, those of
    an answer naming a class (or without a class sentence) are the decoder's, untouched."""
    from aurora_core.config import ModelConfig
    from aurora_core.model.aurora import NO_SEG_LOGIT, empty_masks_where_none

    assert ModelConfig().empty_mask_on_none
    model, proc = built
    model.eval()
    texts = ["Step 1: In the frames I see a drum on the left. Step 2: In the audio I hear the drum. Step 3: The "
             "reference asks for the bell. Step 4: There is no bell in the video. The target is none. It is [SEG].",
             batch["cot"][1], "Step 1: nothing."]
    with torch.no_grad():
        masks = model(proc.train_batch(batch, [batch["cot"][1]] * len(batch["cot"]))).mask_logits[:3]
    assert not (masks == NO_SEG_LOGIT).all(dim=(1, 2, 3)).any()  # the decoder draws something for each
    out = empty_masks_where_none(masks, texts)
    assert (out[0] == NO_SEG_LOGIT).all()
    assert torch.equal(out[1:], masks[1:]) and not (masks[0] == NO_SEG_LOGIT).all()  # the input is left as it was
    assert empty_masks_where_none(masks, texts[1:] + ["x"]) is masks  # nothing to empty: no copy


def test_frozen_encoders_run_once_per_prompt_in_bounded_chunks(built, batch, small_cfg):
    """generate_with_masks of B prompts x G samples runs the SAM encoder on each of the B*T frames once
    and each tower on each clip once (the G samples share them, in generate and in the scoring
    forward), in calls of at most model.encoder_batch frames: memory does not grow with B*G*T."""
    model, proc = built
    model.eval()
    calls: list[int] = []
    hook = model.sam.vision_encoder.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    patches: list[int] = []
    audio: list[int] = []
    th = model.thinker.model
    hooks = [th.visual.register_forward_hook(lambda mod, args, out: patches.append(args[0].shape[0])),
             th.audio_tower.register_forward_pre_hook(
                 lambda mod, args, kw: audio.append(len(kw["feature_lens"])), with_kwargs=True)]
    B, G, T = 3, 3, small_cfg.data.num_frames
    prompts = proc.prompt_batch(batch)
    old = model.encoder_batch
    model.encoder_batch = 4
    try:
        torch.manual_seed(0)
        r = model.generate_with_masks(proc.prompt_batch(batch), num_samples=G, temperature=1.0, top_p=0.9,
                                      max_new_tokens=8, eos_id=proc.eos_id, pad_id=proc.pad_id,
                                      suppress_ids=proc.suppress_ids, decode=proc.decode)
    finally:
        for h in [hook, *hooks]:
            h.remove()
        model.encoder_batch = old
    assert sum(calls) == B * T and max(calls) <= 4, calls  # needed: B*T frames, not B*G*T
    assert sum(patches) == prompts.pixel_values_videos.shape[0], patches  # each clip's patches once
    assert sum(audio) == B and len(audio) == len(patches) == 3, audio  # chunks of 4 // T = 1 clip
    assert r.mask_logits.shape[:2] == (B * G, T)


def test_trainable_tokens_new_trains_only_the_seg_rows(small_cfg, batch, tmp_path):
    """model.trainable_tokens=new: of the embedding and lm_head only the [SEG] rows train, the rest of
    both matrices is the frozen base; the round trip through an export and the merged export keep the
    trained rows."""
    from dataclasses import replace

    m = replace(small_cfg.model, trainable_tokens="new")
    torch.manual_seed(0)
    model, proc = build_model(m, small_cfg.data)
    emb, head = model.thinker.get_input_embeddings(), model.thinker.lm_head
    base_emb, base_head = emb.frozen.weight.detach().clone(), head.frozen.weight.detach().clone()
    rows = {n: p for n, p in model.named_parameters() if p.requires_grad and n.endswith(".rows")}
    assert len(rows) == 2 and all(p.shape == (1, m.tiny.hidden_size) for p in rows.values()), rows
    assert not any("modules_to_save" in n for n, _ in model.named_parameters())
    assert not emb.frozen.weight.requires_grad and not head.frozen.weight.requires_grad
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    total_loss(model, proc, batch).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in rows.values())
    opt.step()
    model.eval()
    ids = torch.arange(len(proc.tok))
    h = torch.randn(5, m.tiny.hidden_size)
    with torch.no_grad():
        moved = (emb(ids[None])[0] - base_emb).abs().sum(-1).nonzero().flatten().tolist()
        moved_logits = (head(h) - h @ base_head.T).abs().sum(0).nonzero().flatten().tolist()
        ref = model(proc.train_batch(batch, batch["cot"]))
    assert moved == moved_logits == [proc.seg_id]  # the [SEG] rows trained, nothing else moved
    assert torch.equal(emb.frozen.weight, base_emb)
    save_export(model, proc, m, tmp_path / "export")
    loaded, proc2, m2 = load_export(tmp_path / "export", small_cfg.data, trainable=False)
    assert m2.trainable_tokens == "new"
    with torch.no_grad():
        got = loaded.eval()(proc2.train_batch(batch, batch["cot"]))
    assert torch.allclose(got.logits, ref.logits, atol=1e-5)
    export_merged(tmp_path / "export", tmp_path / "merged", small_cfg.data)
    merged, proc3, _ = load_export(tmp_path / "merged", small_cfg.data, trainable=False)
    with torch.no_grad():
        got = merged.eval()(proc3.train_batch(batch, batch["cot"]))
    assert torch.allclose(got.logits, ref.logits, atol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients(small_cfg, batch):
    """model.gradient_checkpointing recomputes the decoder layers in backward: same gradients."""
    from dataclasses import replace

    grads = []
    for gc in (False, True):
        torch.manual_seed(0)
        model, proc = build_model(replace(small_cfg.model, gradient_checkpointing=gc), small_cfg.data)
        model.train()
        for mod in model.modules():  # LoRA dropout off: both runs must see the same network
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
        total_loss(model, proc, batch).backward()
        layers = model.thinker.model.language_model.layers
        assert all(layer.gradient_checkpointing == gc for layer in layers)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-5), n


def test_ablated_prompts_take_away_one_input(built, batch):
    """eval.ablate (bench/ablations.py): silence, an empty expression, or blank frames for the thinker
    while SAM keeps the real ones; everything else stays as it is."""
    from aurora_core.infer import ablated_prompts

    _, proc = built
    real = proc.prompt_batch(batch)
    audio = ablated_prompts(proc, batch, "audio")
    assert not torch.equal(audio.input_features, real.input_features)
    assert torch.equal(audio.input_ids, real.input_ids) and torch.equal(audio.pixel_values_videos, real.pixel_values_videos)
    text = ablated_prompts(proc, batch, "text")
    assert text.input_ids.shape[1] < real.input_ids.shape[1] and torch.equal(text.input_features, real.input_features)
    video = ablated_prompts(proc, batch, "video")
    assert not torch.equal(video.pixel_values_videos, real.pixel_values_videos)
    assert torch.equal(video.sam_pixel_values, real.sam_pixel_values) and torch.equal(video.input_ids, real.input_ids)
    assert ablated_prompts(proc, batch, None).input_ids.equal(real.input_ids)


def test_a_reflective_context_is_read_but_not_trained_on(built, batch):
    """The reflect stage's own reasoning sits between prompt and answer with no labels."""
    from aurora_core import reasoning

    model, proc = built
    own = "Step 1: In the frames I see a bell. The target is bell."
    answers = [f" {reasoning.REFLECT_TRIGGER} {c}" for c in batch["cot"]]
    plain = proc.train_batch(batch, answers)
    ctx = proc.train_batch(batch, answers, [own] * len(answers))
    n_own = len(proc.tok(own, add_special_tokens=False).input_ids)
    assert ctx.input_ids.shape[1] == plain.input_ids.shape[1] + n_own
    assert (ctx.labels != losses.IGNORE_INDEX).sum() == (plain.labels != losses.IGNORE_INDEX).sum()
    first = int((ctx.labels[0] != losses.IGNORE_INDEX).nonzero()[0])
    assert proc.tok.decode(ctx.input_ids[0, first - n_own:first]) == proc.tok.decode(
        proc.tok(own, add_special_tokens=False).input_ids)


def test_masks_of_some_frames_only(built, batch, small_cfg):
    """StageConfig.mask_frames: the decoder runs on the drawn frames, the same masks as on all of them."""
    from dataclasses import replace

    from aurora_core.train.loop import mask_frames

    model, proc = built
    model.eval()
    st = replace(small_cfg.sft, mask_frames=3)
    n, t = len(batch["key"]), small_cfg.data.num_frames
    frames = mask_frames(st, (n, t), seed=0, rank=0, step=5)
    assert frames.shape == (n, 3) and (frames.diff(dim=1) > 0).all()
    assert torch.equal(frames, mask_frames(st, (n, t), seed=0, rank=0, step=5))  # a resumed run draws the same
    assert not torch.equal(frames, mask_frames(st, (n, t), seed=0, rank=1, step=5))
    assert mask_frames(replace(st, mask_frames=0), (n, t), 0, 0, 5) is None
    inp = proc.train_batch(batch, batch["cot"])
    with torch.no_grad():
        every = model(inp).mask_logits
        some = model(inp, mask_frames=frames).mask_logits
    assert some.shape == (n, 3, *every.shape[2:])
    torch.testing.assert_close(some, every[torch.arange(n)[:, None], frames], atol=1e-5, rtol=1e-5)


def test_the_rope_sections_reach_the_model(built, small_cfg):
    """model.tiny.mrope_section sets the multimodal RoPE's (temporal, height, width) sections; empty keeps
    Qwen2.5-Omni's proportions. The sections take the frequencies highest first, so at (1, 1, 14) the
    video tokens' width index (left 3, right 4 for 2x2 merged tokens) turns >= 0.5 rad a column where
    Qwen's proportions leave it under 0.06 rad at this head size."""
    def sections(model):
        lm = model.thinker.model.language_model
        return list(lm.config.rope_parameters["mrope_section"]), lm.rotary_emb.inv_freq

    wide, inv_freq = sections(built[0])  # configs/tiny.yaml
    assert wide == [1, 1, 14] and inv_freq[2] >= 0.5
    model_cfg = dataclasses.replace(small_cfg.model, tiny=dataclasses.replace(small_cfg.model.tiny, mrope_section=[]))
    qwen, inv_freq = sections(build_model(model_cfg, small_cfg.data)[0])
    assert qwen == [4, 6, 6] and inv_freq[sum(qwen[:2])] < 0.06


def test_mrope_sections_must_sum_to_half_the_head():
    from aurora_core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"mrope_section must be 3 sections summing to head_dim / 2 = 16"):
        load_config(ROOT / "configs" / "tiny.yaml", ["model.tiny.mrope_section=[2,2,11]"])
