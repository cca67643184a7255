"""AVSBench S4 / MS3: the official-layout reader on good data and every bad-input case, frames without
ground truth, 5-frame clips through the model, the synthetic unreferenced set, and the AVSBench metrics."""

from __future__ import annotations

import json
import pickle
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torchvision.io import decode_png

import avsbench_fixture as fx
from aurora_core import losses, reasoning
from aurora_core.config import ConfigError, load_config
from aurora_core.data import shards, synthetic
from aurora_core.data.avsbench import MS3_CLASS, read_metadata
from aurora_core.data.refavs import BadRow, DatasetError
from aurora_core.metrics import (AVS_COLUMNS, AVS_J_THRESHOLD, SplitMetrics, avsbench_table, format_table,
                                 protocol_from_rows)
from conftest import ROOT, SMALL_DATA, run_script

AVS = ["data.num_frames=5", "data.audio_seconds=5", "data.rows_per_shard=2", "data.conversion_workers=1"]


def data_cfg(subset: str, *extra: str):
    return load_config(None, AVS + [f"data.subset={subset}", "data.source=avsbench", *extra]).data


@pytest.fixture
def release(tmp_path):
    return fx.build(tmp_path / "avsbench_data")


def convert(root, tmp_path, subset, lenient=False):
    return shards.convert(root, tmp_path / f"shards-{subset}", data_cfg(subset), source="avsbench",
                          lenient=lenient, progress=False)


def rows_of(out):
    return {r["key"]: r for r in pq.read_table([str(p) for p in sorted(out.glob("*/*.parquet"))]).to_pylist()}


def decode(rows: list[dict], frame_size: int = 16) -> dict:
    raw = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    return shards.decode_batch(raw, frame_size, 5, fx.SAMPLE_RATE, 5.0)


def test_s4_converts_strictly(release, tmp_path):
    s = convert(release, tmp_path, "s4")
    assert (s.rows_read, s.rows_kept, s.rows_quarantined) == (4, 3, 0)
    assert s.rows_skipped_by_split == {"unlabelled": 1}
    assert s.counts == {"train": 1, "val": 1, "test": 1} and "rows per split: train 1, val 1, test 1" in s.render()
    rows = rows_of(tmp_path / "shards-s4")
    train, val = rows["-vidA_1"], rows["vidB_2"]
    assert train["class"] == "male-speech" and rows["vidC_0"]["class"] == "playing-acoustic-guitar"
    assert train["exp"] == "the objects making sounds." and train["kind"] == "s4" and train["has_target"]
    # train rows have the mask of frame 1 only (the official S4 loader reads mask_num = 1)
    assert train["gt_frames"] == [True, False, False, False, False] and val["gt_frames"] == [True] * 5
    assert reasoning.prompt_text(train["exp"]).startswith("The reference is: the objects making sounds. Please")
    assert "Step 4:" in train["cot"] and train["cot"].endswith("The target is male-speech. It is [SEG].")
    batch = decode([train, val])
    assert batch["frames"].shape == (2, 5, 3, 16, 16) and batch["gt_frames"].tolist()[0] == [True] + [False] * 4
    assert batch["masks"][0, 0].sum() > 0 and batch["masks"][0, 1:].sum() == 0 and batch["masks"][1].sum() > 0
    m = json.loads((tmp_path / "shards-s4" / "manifest.json").read_text())
    assert (m["benchmark"], m["subset"], m["splits"], m["num_frames"]) == ("avsbench", "s4", ["train", "val", "test"], 5)
    with pytest.raises(ValueError, match="has splits train, val, test"):
        shards.split_files(tmp_path / "shards-s4", ["test_s"])


def test_ms3_palette_masks_are_read_by_index(release, tmp_path):
    s = convert(release, tmp_path, "ms3")
    assert s.counts == {"train": 1, "val": 0, "test": 1}
    rows = rows_of(tmp_path / "shards-ms3")
    assert {r["class"] for r in rows.values()} == {MS3_CLASS} and rows["msA"]["gt_frames"] == [True] * 5
    m = decode_png(torch.frombuffer(bytearray(rows["msB"]["masks"][2]), dtype=torch.uint8))[0]
    expected = torch.zeros(fx.H, fx.W, dtype=torch.uint8)
    expected[fx.FG] = 255  # palette index 0 is drawn white: the colour would make every pixel foreground
    assert torch.equal(m, expected)


def test_pickled_log_mels_are_never_opened(release, tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("something unpickled a file of the release")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert convert(release, tmp_path, "s4").rows_kept == 3  # the .pkl files sit beside every clip
    (release / "Single-source/s4_data/audio_wav/val/dog_barking/vidB_2.wav").unlink()
    with pytest.raises(BadRow, match="missing audio.*pickles and are never read"):
        convert(release, tmp_path / "again", "s4")


S4_VAL = "Single-source/s4_data/{}/val/dog_barking/vidB_2"


def _garbage(path):
    path.write_bytes(b"\x89PNG\r\n\x1a\nnot really")


@pytest.mark.parametrize("subset,break_it,reason", [
    ("s4", lambda r: (r / S4_VAL.format("visual_frames") / "vidB_2_3.png").unlink(), "missing frame"),
    ("s4", lambda r: (r / S4_VAL.format("gt_masks") / "vidB_2_4.png").unlink(), "missing mask"),
    ("s4", lambda r: (r / "Single-source/s4_data/audio_wav/val/dog_barking/vidB_2.wav").write_bytes(b""),
     "zero-byte audio"),
    ("s4", lambda r: (r / "Single-source/s4_data/audio_wav/val/dog_barking/vidB_2.wav").write_bytes(b"RIFFxx"),
     "not a readable WAV"),
    ("s4", lambda r: _garbage(r / S4_VAL.format("gt_masks") / "vidB_2_2.png"), "unreadable mask image"),
    ("s4", lambda r: fx.write_mask(r / S4_VAL.format("gt_masks") / "vidB_2_5.png", size=(10, 10)),
     "masks must match their frame"),
    ("ms3", lambda r: _garbage(r / "Multi-sources/ms3_data/visual_frames/msB/msB.mp4_2.png"), "unreadable image"),
    ("ms3", lambda r: (r / "Multi-sources/ms3_data/gt_masks/test/msB/msB_5.png").unlink(), "missing mask"),
])
def test_bad_files_name_the_row_and_file(release, tmp_path, subset, break_it, reason):
    break_it(release)
    with pytest.raises(BadRow, match=reason) as e:
        convert(release, tmp_path, subset)
    assert e.value.key in ("vidB_2", "msB") and "line 3" in str(e.value)
    assert not (tmp_path / f"shards-{subset}").exists()  # strict: nothing written


@pytest.mark.parametrize("row,reason", [
    (("../../escape", "1", "dog_barking", "test"), "unsafe path"),
    (("vidE_0", "1", "dog/../../x", "test"), "unsafe path"),
    (("vidE_0", "1", "", "test"), "empty category"),
    (("", "1", "dog_barking", "test"), "empty video name"),
    (("vidE_0", "1", "dog_barking", "test", "extra"), "has 5 fields, expected 4"),
])
def test_bad_rows_are_errors_or_quarantined(release, tmp_path, row, reason):
    fx.write_csv(release / "Single-source/s4_meta_data.csv", ["name", "sources", "category", "split"],
                 fx.S4_ROWS + [row])
    with pytest.raises(BadRow, match=reason):
        convert(release, tmp_path, "s4")
    s = convert(release, tmp_path, "s4", lenient=True)
    assert s.rows_read == s.rows_kept + s.rows_quarantined + sum(s.rows_skipped_by_split.values())
    assert (s.rows_kept, s.rows_quarantined) == (3, 1)
    q = [json.loads(x) for x in (tmp_path / "shards-s4" / "quarantine.jsonl").read_text().splitlines()]
    assert len(q) == 1 and reason in q[0]["reason"] and q[0]["line"] == 6 and set(q[0]) >= {"key", "file", "uid"}


def test_cot_annotations_beside_the_csv(release, tmp_path):
    (release / "Single-source" / "cot.jsonl").write_text(
        json.dumps({"uid": "-vidA_1", "cot": "Step 1: a. Step 2: b. Step 3: c. Step 4: d. The target is male-speech. It is [SEG]."})
        + "\n" + json.dumps({"uid": "vidB_2", "cot": "x", "kind": "custom"}) + "\n")
    with pytest.raises(BadRow, match="cot.jsonl has no CoT for video 'vidC_0'"):
        convert(release, tmp_path, "s4")
    s = convert(release, tmp_path, "s4", lenient=True)
    rows = rows_of(tmp_path / "shards-s4")
    assert s.rows_quarantined == 1 and rows["-vidA_1"]["cot"].startswith("Step 1: a.") and rows["vidB_2"]["kind"] == "custom"


def test_release_level_errors(release, tmp_path):
    with pytest.raises(DatasetError, match="Multi-sources/ms3_meta_data.csv"):
        read_metadata(tmp_path / "nowhere", "ms3")
    fx.write_csv(release / "Multi-sources/ms3_meta_data.csv", ["name", "subset"], fx.MS3_ROWS)
    with pytest.raises(DatasetError, match="needs a 'split' column"):
        read_metadata(release, "ms3")
    fx.write_csv(release / "Single-source/s4_meta_data.csv", ["name", "split"], [("a", "test")])
    with pytest.raises(DatasetError, match="category in column 2"):
        read_metadata(release, "s4")


def test_repeated_names_are_kept_under_row_keys(release, tmp_path):
    fx.write_csv(release / "Single-source/s4_meta_data.csv", ["name", "sources", "category", "split"],
                 fx.S4_ROWS + [fx.S4_ROWS[2]])
    s = convert(release, tmp_path, "s4")
    assert s.duplicate_uids == ["vidC_0"] and s.counts["test"] == 2
    assert set(rows_of(tmp_path / "shards-s4")) == {"-vidA_1", "vidB_2", "vidC_0", "vidC_0#6"}


def test_config_rules_for_avsbench():
    with pytest.raises(ConfigError, match="needs data.subset"):
        load_config(None, ["data.source=avsbench"])
    with pytest.raises(ConfigError, match="data.num_frames=5"):
        load_config(None, ["data.subset=s4"])
    with pytest.raises(ConfigError, match="not splits of the avsbench benchmark"):
        load_config(None, AVS + ["data.subset=s4", "eval.splits=[test_s]"])
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["run.root=/tmp/r"])
    u = cfg.for_unreferenced("ms3")
    assert (u.data.subset, u.data.num_frames, u.data.audio_seconds, u.eval_splits) == ("ms3", 5, 5.0, ["test"])
    assert u.data.shards_dir(u.run).name == "shards-ms3" and u.data.raw_dir(u.run).name == "raw-avsbench"
    assert cfg.eval_splits == ["test_s", "test_u", "test_n"] and u.model == cfg.model


def test_prepare_data_command_converts_a_release(release, tmp_path):
    r = run_script("pipelines/prepare_data.py", "--source", "avsbench", "--root", str(release), "--subset", "ms3",
                   "--out", str(tmp_path / "out"), f"run.root={tmp_path}", "data.conversion_workers=1")
    assert r.returncode == 0, r.stderr
    assert "rows per split: train 1, val 0, test 1" in r.stdout
    r = run_script("pipelines/prepare_data.py", "--source", "avsbench", "--subset", "s4", f"run.root={tmp_path}")
    assert r.returncode == 2 and "needs --root" in r.stderr


# --------------------------------------------------------------------------- frames without ground truth

def test_mask_losses_use_only_frames_with_ground_truth():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 8, 8, requires_grad=True)
    gt = (torch.rand(2, 5, 8, 8) > 0.5).float()
    valid = torch.tensor([[True, False, False, False, False], [True] * 5])
    for fn in (losses.mask_bce, losses.dice_loss):
        loss = fn(logits, gt, valid=valid)
        # the mean over the 6 masks with ground truth, as if the others were not there
        kept = fn(torch.cat([logits[0, :1], logits[1]])[None], torch.cat([gt[0, :1], gt[1]])[None])
        assert loss.item() == pytest.approx(kept.item(), rel=1e-6)
        (g,) = torch.autograd.grad(loss, logits)
        assert g[0, 1:].abs().sum() == 0 and g[0, 0].abs().sum() > 0
        assert fn(logits, gt, valid=torch.ones(2, 5, dtype=torch.bool)).item() == pytest.approx(fn(logits, gt).item())


def test_s4_train_row_trains_its_first_frame_only(release, tmp_path):
    """A decoded S4 train row through the tiny model and the stage loss: frames 2..5 get no mask
    gradient, and their (empty stand-in) masks do not change the loss."""
    from aurora_core.model.build import build_model
    from aurora_core.train.loop import loss_terms

    convert(release, tmp_path, "s4")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", AVS + ["data.subset=s4", "data.source=avsbench"])
    batch = shards.collate(decode([rows_of(tmp_path / "shards-s4")["-vidA_1"]], cfg.data.frame_size))
    torch.manual_seed(0)
    model, proc = build_model(cfg.model, cfg.data)
    inp = proc.train_batch(batch, list(batch["cot"]))
    # the vision tower pairs frames: 5 frames become 3 temporal patches (the last frame repeated)
    assert inp.video_grid_thw.tolist() == [[3, cfg.model.video_size // 14, cfg.model.video_size // 14]]
    assert inp.sam_pixel_values.shape[1] == 5
    out = model(inp)
    assert out.mask_logits.shape[1] == 5
    logits = out.mask_logits.detach().requires_grad_(True)
    out.mask_logits = logits
    t = loss_terms(out, inp, batch["masks"], cfg.teacher, None, batch["gt_frames"])
    (g,) = torch.autograd.grad(t["bce"] + t["dice"], logits)
    assert g[0, 0].abs().sum() > 0 and g[0, 1:].abs().sum() == 0
    other = batch["masks"].clone()
    other[0, 1:] = 1  # whatever stands in for the missing masks
    assert loss_terms(out, inp, other, cfg.teacher, None, batch["gt_frames"])["bce"].item() == pytest.approx(t["bce"].item())


# --------------------------------------------------------------------------- synthetic unreferenced set

@pytest.fixture(scope="module")
def syn_avs(tmp_path_factory):
    cfg = load_config(None, SMALL_DATA + ["data.synthetic.avs_train_clips=3", "data.synthetic.avs_val_clips=2",
                                          "data.synthetic.avs_test_clips=4"])
    out = tmp_path_factory.mktemp("syn-avs") / "raw-avsbench"
    synthetic.generate_avsbench(out, cfg.data)
    return cfg, out


def test_synthetic_unreferenced_set_reads_as_the_release(syn_avs, tmp_path):
    cfg, raw = syn_avs
    assert len(list(raw.glob("Single-source/s4_data/audio_log_mel/*/*/*.pkl"))) == 9
    vocab = set(synthetic.VOCABULARY)
    for subset in ("s4", "ms3"):
        d = cfg.for_unreferenced(subset).data
        s = shards.convert(raw, tmp_path / subset, d, source="synthetic", progress=False)  # strict
        assert s.counts == {"train": 3, "val": 2, "test": 4}
        rows = list(rows_of(tmp_path / subset).values())
        batch = decode(rows, 64)
        for r, masks, valid in zip(rows, batch["masks"], batch["gt_frames"]):
            words = re.findall(r"[a-z0-9]+", (r["cot"] + " " + reasoning.prompt_text(r["exp"])).lower())
            assert set(words) - {"seg"} <= vocab, set(words) - vocab
            assert reasoning.parse_answer(r["cot"]).structured and r["kind"] == subset
            if subset == "s4":
                assert r["class"] in {c.name for c in synthetic.SEEN}
                assert valid.tolist() == ([True] + [False] * 4 if r["split"] == "train" else [True] * 5)
                assert masks[0].sum() > 0  # the one sounding object is visible and sounds from second 0
            else:
                assert r["class"] == MS3_CLASS and valid.all()
        if subset == "ms3":  # a frame's target is what sounds during that second: some frames have none
            assert (batch["masks"].reshape(len(rows) * 5, -1).sum(1) == 0).any()
            assert (batch["masks"].reshape(len(rows) * 5, -1).sum(1) > 0).any()


def test_synthetic_unreferenced_set_is_deterministic(syn_avs, tmp_path):
    import hashlib

    cfg, raw = syn_avs
    synthetic.generate_avsbench(tmp_path / "again", cfg.data)

    def digest(root):
        h = hashlib.sha256()
        for p in sorted(root.rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(root)).encode() + p.read_bytes())
        return h.hexdigest()

    assert digest(raw) == digest(tmp_path / "again")


# --------------------------------------------------------------------------- metrics

def _official_avsbench_loop(preds: list[torch.Tensor], gts: list[torch.Tensor], batch: int) -> tuple[float, float]:
    """The test loop of AVSBench avs_s4/test.py (utils/utility.py's mask_iou and Eval_Fmeasure),
    re-derived literally: per batch of clips, the frames concatenated, then the mean over batches."""
    ious, fs = [], []
    for i in range(0, len(preds), batch):
        pred, target = torch.cat(preds[i:i + batch]), torch.cat(gts[i:i + batch]).float()
        n, num_pixels = pred.size(0), pred.size(-1) * pred.size(-2)
        no_obj = target.sum(2).sum(1) == 0
        p = (torch.sigmoid(pred) > 0.5).int()
        inter = (p * target).sum(2).sum(1)
        union = torch.max(p, target).sum(2).sum(1)
        inter[no_obj] = ((1 - target) * (1 - p)).sum(2).sum(1)[no_obj]
        union[no_obj] = num_pixels
        ious.append((torch.sum(inter / (union + 1e-7)) / n).item())
        prob, avg_f, img_num, score = torch.sigmoid(pred), 0.0, 0, torch.zeros(255)
        for k in range(n):
            if torch.mean(target[k]) == 0.0:
                continue
            th = torch.linspace(0, 1 - 1e-10, 255)
            prec, rec = torch.zeros(255), torch.zeros(255)
            for j in range(255):
                y = (prob[k] >= th[j]).float()
                tp = (y * target[k]).sum()
                prec[j], rec[j] = tp / (y.sum() + 1e-20), tp / (target[k].sum() + 1e-20)
            f = 1.3 * prec * rec / (0.3 * prec + rec)
            f[f != f] = 0
            avg_f += f
            img_num += 1
            score = avg_f / img_num
        fs.append(score.max().item())
    return sum(ious) / len(ious), sum(fs) / len(fs)


def test_avsbench_protocol_matches_their_test_loop():
    g = torch.Generator().manual_seed(3)
    preds = [torch.randn(5, 12, 12, generator=g) * 3 for _ in range(7)]  # 7 clips: a short last batch
    gts = [(torch.rand(5, 12, 12, generator=g) > 0.6) for _ in range(7)]
    gts[2][:] = False  # a clip whose frames are all empty (MS3 has such frames)
    rows = []
    for p, t in zip(preds, gts):
        m = SplitMetrics(j_threshold=AVS_J_THRESHOLD)
        m.update(p, t)
        rows.append(m)
    ours = protocol_from_rows(rows, "test", "official", 4)
    miou, f = _official_avsbench_loop(preds, gts, 4)
    assert ours["J"] == pytest.approx(miou, abs=1e-6) and ours["F"] == pytest.approx(f, abs=1e-6)


def test_avsbench_iou_thresholds_at_one_half():
    logit = torch.logit(torch.tensor(0.45))  # foreground for Ref-AVS (> 0.4), background for AVSBench (> 0.5)
    pred = torch.full((1, 2, 2), float(logit))
    gt = torch.tensor([[[True, True], [False, False]]])
    m_avs, m_ref = SplitMetrics(j_threshold=AVS_J_THRESHOLD), SplitMetrics()
    m_avs.update(pred, gt)
    m_ref.update(pred, gt)
    assert m_avs.compute()["J"] == 0.0 and m_ref.compute()["J"] == pytest.approx(0.5)
    empty = SplitMetrics(j_threshold=AVS_J_THRESHOLD)  # empty ground truth: true-negative fraction
    empty.update(torch.tensor([[[5.0, -5.0], [-5.0, -5.0]]]), torch.zeros(1, 2, 2, dtype=torch.bool))
    assert empty.compute()["J"] == pytest.approx(0.75)
    row = avsbench_table({"s4": {"J": 0.5, "F": 0.6}})
    assert row == {"S4 mIoU": 0.5, "S4 F": 0.6, "MS3 mIoU": None, "MS3 F": None}
    text = format_table({"grpo": row}, "t", AVS_COLUMNS)
    assert text.splitlines()[1].split() == ["Model", "S4", "mIoU", "S4", "F", "MS3", "mIoU", "MS3", "F"]

