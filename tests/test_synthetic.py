"""The synthetic Ref-AVS generator: official layout, determinism, split properties, CoT targets."""

from __future__ import annotations

import csv
import hashlib
import json
import re

import numpy as np
import pytest
import soundfile as sf
from torchvision.io import decode_png, read_file

from aurora_core import reasoning
from aurora_core.config import load_config
from aurora_core.data import synthetic
from aurora_core.data.refavs import read_metadata
from conftest import SMALL_DATA


@pytest.fixture(scope="module")
def cfg():
    return load_config(None, SMALL_DATA)


@pytest.fixture(scope="module")
def raw(tmp_path_factory, cfg):
    out = tmp_path_factory.mktemp("syn") / "raw"
    synthetic.generate(out, cfg.data)
    return out


def tree_hash(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "synthetic.json":
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def rows(raw):
    with open(raw / "metadata.csv", newline="") as f:
        return list(csv.DictReader(f))


def cots(raw):
    return {d["uid"]: d["cot"] for d in map(json.loads, (raw / "cot.jsonl").read_text().splitlines())}


def test_official_layout(raw, cfg):
    assert (raw / "metadata.csv").read_text().splitlines()[0] == "vid,uid,split,fid,exp"
    meta, skipped = read_metadata(raw)
    assert not skipped and all(r.problem is None for r in meta)
    r = next(r for r in meta if r.split == "train" and r.cls != "null")
    T = cfg.data.num_frames
    assert [p.name for p in sorted((raw / "media" / r.vid / "frames").iterdir(), key=lambda p: int(p.stem))] == \
        [f"{t}.jpg" for t in range(T)]
    assert sorted(p.name for p in (raw / "gt_mask" / r.vid / f"fid_{r.fid}").iterdir()) == \
        [f"{t:05d}.png" for t in range(T)]
    info = sf.info(raw / "media" / r.vid / "audio.wav")
    assert info.format == "WAV" and info.samplerate == cfg.data.sample_rate
    assert info.frames == T * cfg.data.sample_rate  # one frame per 1-s snippet


def test_deterministic_per_seed(raw, cfg, tmp_path):
    again = tmp_path / "again"
    synthetic.generate(again, cfg.data)
    assert tree_hash(again) == tree_hash(raw)
    other = load_config(None, SMALL_DATA + ["data.synthetic.seed=1"])
    synthetic.generate(tmp_path / "other", other.data)
    assert tree_hash(tmp_path / "other") != tree_hash(raw)


def test_split_properties(raw):
    unseen = {c.name for c in synthetic.UNSEEN}
    seen = {c.name for c in synthetic.SEEN}
    meta, _ = read_metadata(raw)
    by_split: dict[str, list] = {}
    for r in meta:
        by_split.setdefault(r.split, []).append(r)
    assert set(by_split) == set(synthetic.SPLITS)
    for s in ("train", "val", "test_s"):
        assert {r.cls for r in by_split[s]} <= seen | {"null"}
    assert {r.cls for r in by_split["test_u"]} <= unseen
    for r in by_split["test_u"]:  # unseen classes are never named: cues that generalise
        assert not any(u in r.exp for u in unseen), r.exp
    assert {r.cls for r in by_split["test_n"]} == {"null"}
    for r in by_split["test_n"]:  # as released: uid null_c-<vid>_null_<k>, media in media/null_c-<vid>/
        assert re.fullmatch(r"null_c-\w+_null_\d+", r.uid) and r.folder == f"null_c-{r.vid}"
        assert (raw / "media" / r.folder / "audio.wav").is_file() and not (raw / "media" / r.vid).exists()
        assert not (raw / "gt_mask" / r.folder).exists()
        named = r.exp.removeprefix("the ")
        assert named in seen and f"a {named} " not in cots(raw)[r.key].split("Step 2")[0]  # absent
    train_videos = {r.vid for r in by_split["train"]}
    assert not train_videos & {r.vid for r in by_split["test_s"]}  # new clips
    assert any(r.cls == "null" for r in by_split["train"] + by_split["val"])


def test_duplicate_uids_as_in_the_release(raw):
    """train, test_s and test_u each repeat one uid: an exact copy and a row with another fid and
    expression; the later rows' CoTs are keyed by their row keys."""
    meta, _ = read_metadata(raw)
    c = cots(raw)
    for split in synthetic.DUPLICATE_SPLITS:
        dups = [r for r in meta if r.split == split and r.key != r.uid]
        assert len(dups) == 2 and dups[0].uid == dups[1].uid, dups
        first = next(r for r in meta if r.key == dups[0].uid)
        assert (dups[0].fid, dups[0].exp) == (first.fid, first.exp)  # exact copy
        assert dups[1].fid != first.fid and dups[1].exp != first.exp
        assert (raw / "gt_mask" / first.folder / f"fid_{dups[1].fid}").is_dir()
        assert all(d.key in c for d in dups)
    assert not [r for r in meta if r.split not in synthetic.DUPLICATE_SPLITS and r.key != r.uid]


def test_expression_kinds_cover_audio_and_vision(tmp_path):
    cfg = load_config(None, ["data.synthetic.train_clips=40"])
    out = tmp_path / "raw"
    synthetic.generate(out, cfg.data, cfg.data.synthetic)
    exps = [r["exp"] for r in rows(out) if r["split"] == "train"]
    assert any(e == "the object making a sound" for e in exps)  # sound
    assert any(e.startswith("the object on the") or e == "the object in the middle" for e in exps)  # position
    assert any("sounds first" in e or "sounds last" in e for e in exps)  # time
    assert any("starts sounding after" in e for e in exps)  # time + category
    assert any(e.startswith("the silent object") for e in exps)  # audio + position
    assert any(e in {f"the {c.name}" for c in synthetic.SEEN} for e in exps)  # category


def test_cot_targets_are_well_formed_and_in_vocabulary(raw):
    vocab = set(synthetic.VOCABULARY)
    c = cots(raw)
    for r in rows(raw):
        cot = c[r["uid"]]
        p = reasoning.parse_answer(cot)
        assert p.well_formed and p.has_class_sentence, cot
        assert p.predicted_class == r["uid"].split("_")[-2]
        assert [f"Step {i}:" in cot for i in (1, 2, 3, 4)] == [True] * 4
        words = re.findall(r"[a-z0-9\-]+", (cot + " " + r["exp"]).lower().replace("[seg]", ""))
        assert set(words) <= vocab, set(words) - vocab
    assert set(re.findall(r"[a-z]+", reasoning.prompt_text("x").lower())) - {"x"} <= vocab


def test_masks_follow_the_expression(raw):
    """Position expressions point at masks on that side; sound expressions at an object heard."""
    for r in rows(raw):
        if r["uid"].split("_")[-2] == "null":
            continue
        m = np.stack([decode_png(read_file(str(raw / "gt_mask" / r["vid"] / f"fid_{r['fid']}" / f"{t:05d}.png")))[0]
                      .numpy() > 0 for t in range(10)])
        assert m.any(axis=(1, 2)).all(), r["uid"]  # the target is visible in every frame
        xs = np.nonzero(m)[2].mean() / m.shape[2]
        if r["exp"] == "the object on the left":
            assert xs < 0.5
        if r["exp"] == "the object on the right":
            assert xs > 0.5


def test_audio_is_loud_only_when_something_sounds(raw, cfg):
    r = next(r for r in rows(raw) if r["exp"] == "the object making a sound")
    # the clip's scene, drawn again from its seed (the CoT names what sounds, not when)
    split, idx = r["split"], int(r["vid"][-5:])
    syn = cfg.data.synthetic
    rng = synthetic._clip_rng(syn.seed, split, idx)
    n = int(rng.integers(syn.min_objects, syn.max_objects + 1))
    objs = synthetic.make_scene(synthetic._pick_categories(split, n, rng), cfg.data.num_frames, syn.image_size, rng)
    (start, end), = [(o.start, o.end) for o in objs if o.start is not None]
    assert f"I hear the {next(o.cat.name for o in objs if o.start is not None)}." in cots(raw)[r["uid"]]
    wav, sr = sf.read(raw / "media" / r["vid"] / "audio.wav")
    rms = np.sqrt((wav.reshape(-1, sr) ** 2).mean(axis=1))
    on = rms[start:end].min()
    off = np.delete(rms, range(start, end))
    assert off.size == 0 or on > 5 * off.max()


def test_scale_multiplies_clips(tmp_path):
    cfg = load_config(None, SMALL_DATA + ["data.synthetic.scale=2"])
    counts = synthetic.generate(tmp_path / "big", cfg.data)
    small = load_config(None, SMALL_DATA)
    assert cfg.data.synthetic.clips("train") == 2 * small.data.synthetic.clips("train")
    assert counts["train"] > 0


def test_expression_kinds_are_recorded_for_the_breakdown(raw, cfg, tmp_path):
    import pyarrow.parquet as pq

    from aurora_core.data import shards

    kinds = {json.loads(x)["uid"]: json.loads(x)["kind"] for x in (raw / "cot.jsonl").read_text().splitlines()}
    assert set(kinds.values()) == {"category", "position", "sound", "time", "combo", "null"}
    shards.convert(raw, tmp_path / "shards", cfg.data, source="synthetic", progress=False)
    table = pq.read_table(shards.split_files(tmp_path / "shards", ["train", "test_n"]), columns=["key", "kind"])
    assert all(kinds[k] == v for k, v in zip(table["key"].to_pylist(), table["kind"].to_pylist()))
