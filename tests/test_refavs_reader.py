"""The official-layout reader and converter on good data and on every bad-input case."""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

import refavs_fixture as fx
from aurora_core.config import load_config
from aurora_core.data import shards
from aurora_core.data.refavs import BadRow, DatasetError, read_metadata, safe_path
from conftest import ROOT, run_script


@pytest.fixture
def data_cfg():
    return load_config(None, [f"data.num_frames={fx.NUM_FRAMES}", f"data.sample_rate={fx.SAMPLE_RATE}",
                              "data.rows_per_shard=2", "data.conversion_workers=1"]).data


@pytest.fixture
def ds(tmp_path):
    return fx.build(tmp_path / "refavs")


def convert(ds, tmp_path, data_cfg, lenient=False):
    return shards.convert(ds, tmp_path / "shards", data_cfg, source="refavs", lenient=lenient, progress=False)


def read_all(out):
    return pq.read_table([str(p) for p in sorted(out.glob("*/*.parquet"))]).to_pylist()


def test_good_dataset_converts(ds, tmp_path, data_cfg):
    s = convert(ds, tmp_path, data_cfg)
    assert (s.rows_read, s.rows_kept, s.rows_quarantined) == (5, 4, 0)
    assert s.rows_skipped_by_split == {"TODO": 1}
    assert s.counts == {"train": 1, "val": 1, "test_s": 0, "test_u": 1, "test_n": 1}
    rows = {r["uid"]: r for r in read_all(tmp_path / "shards")}
    assert rows["vidB_emergency-car_0"]["class"] == "emergency-car"
    null = rows["null_c-vidC_null_0"]  # media folder starting with null_, no mask files: empty masks
    assert null["class"] == "null" and null["has_target"] is False and null["split"] == "test_n"
    batch = shards.decode_batch({k: np.array([r[k] for r in rows.values()], dtype=object)
                                 for k in rows["vidA_dog_0"]}, 16, fx.NUM_FRAMES, fx.SAMPLE_RATE, 1.0)
    by_uid = dict(zip(batch["uid"], range(len(batch["uid"]))))
    assert batch["masks"][by_uid["null_c-vidC_null_0"]].sum() == 0
    assert batch["masks"][by_uid["vidA_dog_0"]].sum() > 0  # value 1 in the PNG counts as foreground
    assert batch["frames"].shape == (4, fx.NUM_FRAMES, 3, 16, 16)
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["counts"]["test_n"] == 1 and manifest["source"] == "refavs"
    assert manifest["has_cot_annotations"] is False
    assert "Step 4:" in rows["vidA_dog_0"]["cot"] and rows["vidA_dog_0"]["cot"].endswith("It is [SEG].")


def test_header_only_and_empty_csv(ds, tmp_path, data_cfg):
    fx.write_metadata(ds, [])
    with pytest.raises(DatasetError, match="no rows"):
        convert(ds, tmp_path, data_cfg)
    (ds / "metadata.csv").write_bytes(b"")
    with pytest.raises(DatasetError, match="empty"):
        convert(ds, tmp_path, data_cfg)


@pytest.mark.parametrize("header,needle", [
    (("vid", "uid", "split", "exp"), "missing: fid"),
    (("vid", "uid", "split", "fid", "exp", "extra"), "unexpected: extra"),
])
def test_wrong_columns(ds, tmp_path, data_cfg, header, needle):
    fx.write_metadata(ds, [r[: len(header)] for r in fx.ROWS], header=header)
    with pytest.raises(DatasetError, match=needle):
        convert(ds, tmp_path, data_cfg)
    with pytest.raises(DatasetError):  # file-level problems stop lenient mode too: nothing is readable
        convert(ds, tmp_path, data_cfg, lenient=True)


def corrupt(ds, case):
    """Apply one bad-input case; return (uid, file fragment, reason fragment) the error must name."""
    a = ds / "media" / "vidA"
    if case == "missing_frame":
        (a / "frames" / "1.jpg").unlink()
        return "vidA_dog_0", "frames/1.jpg", "missing frame"
    if case == "truncated_jpeg":
        p = a / "frames" / "2.jpg"
        p.write_bytes(p.read_bytes()[:200])
        return "vidA_dog_0", "frames/2.jpg", "truncated JPEG"
    if case == "garbage_jpeg":
        (a / "frames" / "0.jpg").write_bytes(b"this is not a jpeg")
        return "vidA_dog_0", "frames/0.jpg", "unreadable"
    if case == "zero_byte_audio":
        (a / "audio.wav").write_bytes(b"")
        return "vidA_dog_0", "audio.wav", "zero-byte audio"
    if case == "non_wav_audio":
        buf = io.BytesIO()
        sf.write(buf, np.zeros(1600, dtype=np.float32), fx.SAMPLE_RATE, format="FLAC")
        (a / "audio.wav").write_bytes(buf.getvalue())
        return "vidA_dog_0", "audio.wav", "expected WAV"
    if case == "text_as_audio":
        (a / "audio.wav").write_text("RIFF but not really")
        return "vidA_dog_0", "audio.wav", "not a readable WAV"
    if case == "missing_mask":
        (ds / "gt_mask" / "vidA" / "fid_1" / "00002.png").unlink()
        return "vidA_dog_0", "fid_1/00002.png", "missing mask"
    if case == "mask_size":
        fx.write_mask(ds / "gt_mask" / "vidA" / "fid_1" / "00000.png", size=(12, 16))
        return "vidA_dog_0", "fid_1/00000.png", "masks must match their frame"
    if case == "uid_dotdot":  # the media folder comes from the uid, as the official loader takes it
        fx.write_metadata(ds, fx.ROWS + [("x", "../outside_dog_0", "train", "1", "escape")])
        return "../outside_dog_0", "media/../outside", "unsafe path"
    if case == "uid_absolute":
        fx.write_metadata(ds, fx.ROWS + [("y", "/etc_dog_0", "train", "1", "escape")])
        return "/etc_dog_0", "media//etc", "unsafe path"
    if case == "vid_fallback_absolute":  # the vid column, used when the uid's folder is missing, is checked too
        fx.write_metadata(ds, fx.ROWS + [("/etc", "null_c-nothere_null_0", "test_n", "0", "escape")])
        return "null_c-nothere_null_0", "media/null_c-nothere", "missing frame"
    if case == "fid_dotdot":
        fx.write_metadata(ds, fx.ROWS + [("vidA", "vidA_dog_9", "train", "../../media", "escape")])
        return "vidA_dog_9", "fid_../../media", "unsafe path"
    if case == "symlink_out":
        outside = ds.parent / "outside_media"
        shutil.copytree(a, outside)
        os.symlink(outside, ds / "media" / "vidS")
        fx.write_metadata(ds, fx.ROWS + [("vidS", "vidS_dog_0", "train", "1", "symlinked out")])
        return "vidS_dog_0", "media/vidS", "outside the dataset root"
    if case == "non_utf8_exp":
        fx.write_metadata(ds, fx.ROWS)
        with open(ds / "metadata.csv", "ab") as f:
            f.write(b"vidA,vidA_dog_7,train,1,the caf\xe9 dog\n")
        return "vidA_dog_7", "metadata.csv", "not UTF-8"
    if case == "bad_uid":
        fx.write_metadata(ds, fx.ROWS + [("vidA", "nounderscore", "train", "1", "x")])
        return "nounderscore", "metadata.csv", "<vid>_<class>_<n>"
    raise AssertionError(case)


BAD_CASES = ["missing_frame", "truncated_jpeg", "garbage_jpeg", "zero_byte_audio", "non_wav_audio",
             "text_as_audio", "missing_mask", "mask_size", "uid_dotdot", "uid_absolute", "vid_fallback_absolute",
             "fid_dotdot", "symlink_out", "non_utf8_exp", "bad_uid"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_strict_names_uid_file_reason(ds, tmp_path, data_cfg, case):
    uid, file, reason = corrupt(ds, case)
    out = tmp_path / "shards"
    with pytest.raises(BadRow) as e:
        convert(ds, tmp_path, data_cfg)
    assert e.value.uid == uid and file in e.value.file and reason in e.value.reason, str(e.value)
    assert uid in str(e.value)
    assert not out.exists() and not list(tmp_path.glob("shards.tmp-*"))  # nothing half-written


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_lenient_quarantines(ds, tmp_path, data_cfg, case):
    uid, file, reason = corrupt(ds, case)
    s = convert(ds, tmp_path, data_cfg, lenient=True)
    q = [json.loads(line) for line in (tmp_path / "shards" / "quarantine.jsonl").read_text().splitlines()]
    assert [x["uid"] for x in q] == [uid] and reason in q[0]["reason"] and file in q[0]["file"]
    assert [x["key"] for x in q] == [uid] and q[0]["line"] >= 2
    assert s.rows_read == s.rows_kept + s.rows_quarantined + sum(s.rows_skipped_by_split.values())
    assert s.rows_quarantined == 1
    kept = {r["uid"] for r in read_all(tmp_path / "shards")}
    assert uid not in kept


def test_null_rows_ignore_existing_masks(ds, tmp_path, data_cfg):
    for t in range(fx.NUM_FRAMES):  # a stray mask for a null row must not become a target
        fx.write_mask(ds / "gt_mask" / "null_c-vidC" / "fid_1" / f"{t:05d}.png")
    convert(ds, tmp_path, data_cfg)
    row = next(r for r in read_all(tmp_path / "shards") if r["uid"] == "null_c-vidC_null_0")
    b = shards.decode_batch({k: np.array([row[k]], dtype=object) for k in row}, 8, fx.NUM_FRAMES,
                            fx.SAMPLE_RATE, 1.0)
    assert b["masks"].sum() == 0


def test_audio_is_resampled_and_mixed_to_mono(ds, tmp_path, data_cfg):
    fx.write_audio(ds / "media" / "vidA" / "audio.wav", sr=22050, seconds=1.0, channels=2)
    convert(ds, tmp_path, data_cfg)
    row = next(r for r in read_all(tmp_path / "shards") if r["uid"] == "vidA_dog_0")
    wav, sr = sf.read(io.BytesIO(row["audio"]))
    assert sr == fx.SAMPLE_RATE and wav.ndim == 1 and abs(len(wav) - fx.SAMPLE_RATE) <= 1


def test_rerun_replaces_atomically(ds, tmp_path, data_cfg):
    convert(ds, tmp_path, data_cfg)
    first = (tmp_path / "shards" / "manifest.json").read_text()
    corrupt(ds, "missing_frame")
    with pytest.raises(BadRow):  # a failed rerun leaves the previous complete set in place
        convert(ds, tmp_path, data_cfg)
    assert (tmp_path / "shards" / "manifest.json").read_text() == first
    fx.build(ds)
    convert(ds, tmp_path, data_cfg)
    assert (tmp_path / "shards" / "manifest.json").is_file()


def test_process_pool_matches_inline(ds, tmp_path, data_cfg):
    inline = convert(ds, tmp_path, data_cfg)
    data_cfg.conversion_workers = 2
    pooled = shards.convert(ds, tmp_path / "pooled", data_cfg, source="refavs", progress=False)
    assert pooled.counts == inline.counts
    a = sorted(r["uid"] for r in read_all(tmp_path / "shards"))
    assert a == sorted(r["uid"] for r in read_all(tmp_path / "pooled"))


def test_safe_path_rejects_escapes(tmp_path):
    for bad in ("..", "../x", "/abs", "a/b", "", "a\\b"):
        with pytest.raises(ValueError):
            safe_path(tmp_path, bad)
    assert safe_path(tmp_path, "null_c-abc") == tmp_path.resolve() / "null_c-abc"


def test_metadata_rows_and_skips(ds):
    rows, skipped = read_metadata(ds)
    assert [r.uid for r in rows][:2] == ["vidA_dog_0", "vidD_guitar_1"]
    assert skipped == {"TODO": 1}


def test_cli_strict_fails_and_lenient_reports(ds, tmp_path):
    corrupt(ds, "truncated_jpeg")
    common = ["pipelines/prepare_data.py", "--source", "refavs", "--root", str(ds), "--out", str(tmp_path / "o"),
              f"data.num_frames={fx.NUM_FRAMES}", "data.conversion_workers=1"]
    r = run_script(*common)
    assert r.returncode == 1, r.stderr
    assert "vidA_dog_0" in r.stderr and "frames/2.jpg" in r.stderr and "truncated" in r.stderr
    r = run_script(*common, "--lenient")
    assert r.returncode == 0, r.stderr
    assert "rows read 5 = kept 3 + quarantined 1 + skipped by split 1" in r.stdout
    assert (tmp_path / "o" / "quarantine.jsonl").is_file()
    r = run_script("pipelines/prepare_data.py", "--source", "refavs", cwd=ROOT)
    assert r.returncode == 2 and "--root" in r.stderr


# ----------------------------------------------------------------- the real release's quirks

def dup_rows():
    """Both kinds of duplicate the public metadata.csv has (11 uids): an exact copy, and a row that
    shares a uid but has another fid and expression (e.g. MDyjY3uiWp0_297000_307000_saw_4)."""
    return fx.ROWS + [
        ("vidA", "vidA_dog_0", "train", "1", "the barking dog"),  # line 7: exact copy of line 2
        ("vidB", "vidB_emergency-car_0", "test_u", "2", "the loudest object"),  # line 8: same uid as line 4
    ]


def test_duplicate_uids_convert_strictly_and_keep_every_row(ds, tmp_path, data_cfg, caplog):
    rows = dup_rows()
    fx.build(ds, rows)
    s = convert(ds, tmp_path, data_cfg)
    assert (s.rows_read, s.rows_kept, s.rows_quarantined) == (7, 6, 0)
    assert s.duplicate_uid_rows == 2 and s.duplicate_uids == ["vidA_dog_0", "vidB_emergency-car_0"]
    assert "duplicate uids: 2 (2 later rows" in s.render()
    got = read_all(tmp_path / "shards")
    keys = sorted(r["key"] for r in got)
    assert keys == sorted(["vidA_dog_0", "vidA_dog_0#7", "vidD_guitar_1", "vidB_emergency-car_0",
                           "vidB_emergency-car_0#8", "null_c-vidC_null_0"])
    by_key = {r["key"]: r for r in got}
    assert by_key["vidB_emergency-car_0#8"]["uid"] == "vidB_emergency-car_0"  # the uid stays a column
    assert by_key["vidB_emergency-car_0#8"]["fid"] == "2" and by_key["vidB_emergency-car_0"]["fid"] == "1"
    assert by_key["vidB_emergency-car_0#8"]["class"] == "emergency-car" and by_key["vidA_dog_0#7"]["line"] == 7
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["duplicate_uid_rows"] == 2 and manifest["duplicate_uids"] == s.duplicate_uids
    assert any("2 uids occur more than once" in r.message and "vidA_dog_0" in r.message for r in caplog.records)


def test_duplicate_warning_names_the_first_five(ds, tmp_path, data_cfg, caplog):
    extra = [("vidA", f"vidA_dog_{k}", "train", "1", f"dog {k}") for k in range(7)]
    fx.build(ds, fx.ROWS + extra + extra)
    s = convert(ds, tmp_path, data_cfg)
    assert len(s.duplicate_uids) == 7 and s.rows_kept == 4 + 14
    msg = next(r.message for r in caplog.records if "occur more than once" in r.message)
    assert "vidA_dog_4" in msg and "vidA_dog_5" not in msg and "and 2 more" in msg


def test_null_rows_read_the_folder_their_uid_names(ds, tmp_path, data_cfg):
    # the release: vid column = the ordinary video, media of the null row in media/null_c-<vid>/
    fx.write_frame(ds / "media" / "null_c-vidC" / "frames" / "0.jpg", value=7)
    fx.write_frame(ds / "media" / "vidC" / "frames" / "0.jpg", value=250)  # the ordinary video: not read
    s = convert(ds, tmp_path, data_cfg)
    assert s.media_from_vid == 0 and "media from the vid column: 0" in s.render()
    row = next(r for r in read_all(tmp_path / "shards") if r["uid"] == "null_c-vidC_null_0")
    assert row["vid"] == "vidC" and row["frames"][0] == (ds / "media" / "null_c-vidC" / "frames" / "0.jpg").read_bytes()


def test_missing_uid_folder_falls_back_to_the_vid_column(ds, tmp_path, data_cfg, caplog):
    shutil.move(ds / "media" / "null_c-vidC", ds / "media" / "vidC")
    s = convert(ds, tmp_path, data_cfg)
    assert s.media_from_vid == 1 and s.rows_kept == 4 and "media from the vid column: 1" in s.render()
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text())["media_from_vid"] == 1
    warnings = [r.message for r in caplog.records if "media/<vid>" in r.message]
    assert len(warnings) == 1 and "1 rows" in warnings[0]


def write_cot(ds, entries):
    with open(ds / "cot.jsonl", "w") as f:
        for k, v in entries:
            f.write(json.dumps({"uid": k, "cot": v}) + "\n")


def test_cot_by_uid_or_row_key(ds, tmp_path, data_cfg):
    rows = dup_rows()
    fx.build(ds, rows)
    # an exact copy may share its uid's CoT; the shared-uid row with another expression has its own key
    write_cot(ds, [(r[1], f"cot of {r[1]}") for r in fx.ROWS] + [("vidB_emergency-car_0#8", "cot of line 8")])
    convert(ds, tmp_path, data_cfg)
    by_key = {r["key"]: r["cot"] for r in read_all(tmp_path / "shards")}
    assert by_key["vidA_dog_0#7"] == by_key["vidA_dog_0"] == "cot of vidA_dog_0"
    assert by_key["vidB_emergency-car_0#8"] == "cot of line 8"
    assert by_key["vidB_emergency-car_0"] == "cot of vidB_emergency-car_0"


def test_cot_ambiguous_for_a_shared_uid_names_both_lines(ds, tmp_path, data_cfg):
    fx.build(ds, dup_rows())
    write_cot(ds, [(r[1], "x") for r in fx.ROWS])
    with pytest.raises(BadRow) as e:
        convert(ds, tmp_path, data_cfg)
    msg = str(e.value)
    assert "vidB_emergency-car_0" in msg and "lines 4 and 8" in msg and "row key" in msg, msg
    write_cot(ds, [(r[1], "x") for r in fx.ROWS] + [("vidA_dog_0", "again")])
    with pytest.raises(DatasetError, match="on line 1 and on line 6"):
        convert(ds, tmp_path, data_cfg)


def test_decoded_rows_carry_key_and_line(ds, tmp_path, data_cfg):
    fx.build(ds, dup_rows())
    convert(ds, tmp_path, data_cfg)
    rows = read_all(tmp_path / "shards")
    b = shards.decode_batch({k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}, 16,
                            fx.NUM_FRAMES, fx.SAMPLE_RATE, 1.0, score_size=32)
    assert sorted(b["line"].tolist()) == [2, 3, 4, 5, 7, 8] and "vidA_dog_0#7" in b["key"].tolist()
    assert b["score_masks"].shape == (6, fx.NUM_FRAMES, 32, 32) and b["score_masks"].max() == 1
