"""Synthetic Ref-AVS: a procedural benchmark written in the official Ref-AVS layout.

Each clip shows 1-4 objects of procedural categories. A category has a look (shape, colour, texture)
and a sound (tone, harmonics, noise bursts, chirp, ...). Objects drift inside their own horizontal
slot (left / middle / right / far-right), so positions are unambiguous; each object sounds during
one interval of seconds or stays silent, and the audio track is the mix. Expressions refer by
category, by sound, by position, by time and by combinations, so audio and vision are both needed.

Splits: ``train``/``val``/``test_s`` draw from the seen categories; ``test_u`` targets categories never
used in train/val and refers to them only by cues that generalise (sound, position, time);
``test_n`` names categories that are absent (class ``null``, empty masks). Every expression also gets
its ground-truth structured chain of thought and its kind (``cot.jsonl`` beside ``metadata.csv``:
``{"uid", "cot", "kind"}``), so that evaluation can break J down by what an expression asks.

The release's quirks are mirrored so that every consumer meets them: ``test_n`` clips live in
``media/null_c-<vid>/`` (their uids are ``null_c-<vid>_null_<k>``, their vid column the plain id), and
train, test_s and test_u each repeat one uid twice more: once as an exact copy, once with another
fid and expression (CoTs of the later rows keyed by their row key, ``<uid>#<line>``).

One frame per second (the first frame of each 1-s snippet, as in Ref-AVS). Deterministic per seed:
each clip draws from its own generator seeded by (seed, split, clip index).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torchvision.io import encode_jpeg, encode_png

from aurora_core import reasoning
from aurora_core.config import DataConfig, SyntheticConfig
from aurora_core.data.atomic import staged_dir
from aurora_core.data.refavs import row_key

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test_s", "test_u", "test_n")
DUPLICATE_SPLITS = ("train", "test_s", "test_u")  # splits that get one exact copy + one shared-uid row


@dataclass(frozen=True)
class Category:
    name: str
    shape: str
    colour: tuple[int, int, int]
    texture: str
    sound: str  # tone | harmonic | square | chirp | noise | pulse
    pitch: float  # base frequency in Hz


# Seen categories (train/val/test_s/test_n) and unseen ones (test_u only). Names are single words
# without "_" because the Ref-AVS uid encodes the class as uid.split("_")[-2].
SEEN = (
    Category("drum", "circle", (220, 40, 40), "solid", "noise", 180.0),
    Category("bell", "triangle", (240, 200, 30), "solid", "harmonic", 880.0),
    Category("horn", "square", (40, 90, 220), "stripes", "square", 330.0),
    Category("siren", "diamond", (230, 110, 20), "solid", "chirp", 600.0),
    Category("flute", "bar", (60, 200, 80), "solid", "tone", 1200.0),
    Category("gong", "ring", (170, 120, 40), "solid", "harmonic", 140.0),
    Category("whistle", "cross", (230, 230, 230), "solid", "tone", 2400.0),
    Category("buzzer", "square", (200, 40, 200), "checker", "square", 120.0),
    Category("chime", "circle", (80, 220, 220), "dots", "harmonic", 1500.0),
    Category("rattle", "diamond", (120, 70, 30), "stripes", "pulse", 400.0),
    Category("violin", "triangle", (150, 20, 60), "stripes", "harmonic", 440.0),
    Category("engine", "bar", (100, 100, 100), "checker", "noise", 60.0),
)
UNSEEN = (
    Category("tuba", "ring", (30, 60, 140), "dots", "square", 90.0),
    Category("cymbal", "cross", (250, 170, 170), "checker", "noise", 3000.0),
    Category("harp", "circle", (140, 230, 60), "stripes", "chirp", 900.0),
    Category("clock", "square", (250, 250, 120), "dots", "pulse", 800.0),
)
CATEGORIES = {c.name: c for c in SEEN + UNSEEN}
# Slot names by object count: each object drifts inside its own vertical band of the frame.
SLOT_NAMES = {1: ("middle",), 2: ("left", "right"), 3: ("left", "middle", "right")}

# Every word the generator can write (expressions, CoT, prompt): the tiny model's tokenizer is
# built from this list, so a word missing here would become [UNK] (tests check coverage).
VOCABULARY = sorted(
    set(
        """the a an object one that is making sound sounds first last starts sounding after stops
        silent on left right middle in video frames i see hear and then from second to nothing
        step reference asks for makes there no target none it wait let me reconsider please segment audio
        corresponding images which of are at while other only also objects all quiet""".split()
    )
    | {c.name for c in CATEGORIES.values()}
    | {str(i) for i in range(100)}
)


@dataclass
class SynthObject:
    cat: Category
    slot: int  # index into the clip's slot names
    start: int | None  # first sounding second, None if silent
    end: int | None  # one past the last sounding second
    path: np.ndarray  # [T, 2] centre (x, y) in pixels per frame
    radius: float


@dataclass
class SynthExpression:
    exp: str
    target: int | None  # index into the clip's objects; None = null (absent referent)
    cls: str
    cot: str
    kind: str = ""  # category | position | sound | time | combo | null (stored in the shards)


# --------------------------------------------------------------------------- rendering

def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return np.maximum(ax, ay) <= 0.85 * r
    if shape == "triangle":  # apex up
        return (dy >= -r) & (dy <= 0.8 * r) & (ax <= (dy + r) * 0.55)
    if shape == "diamond":
        return ax + ay <= r
    if shape == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.5 * r) ** 2)
    if shape == "cross":
        return ((ax <= r / 3) & (ay <= r)) | ((ay <= r / 3) & (ax <= r))
    if shape == "bar":
        return (ax <= r) & (ay <= r / 2.2)
    raise ValueError(f"unknown shape {shape!r}")


def _texture(texture: str, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """1 where the object's colour is drawn at full strength, 0 where a darker shade is."""
    if texture == "solid":
        return np.ones_like(xx, dtype=bool)
    if texture == "stripes":
        return (xx.astype(int) // 3) % 2 == 0
    if texture == "checker":
        return ((xx.astype(int) // 4) + (yy.astype(int) // 4)) % 2 == 0
    if texture == "dots":
        return ~(((xx.astype(int) % 5) < 2) & ((yy.astype(int) % 5) < 2))
    raise ValueError(f"unknown texture {texture!r}")


def render_clip(objects: list[SynthObject], size: int, num_frames: int, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray]:
    """Frames uint8 [T, H, W, 3] and the visible mask of each object, bool [K, T, H, W]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = rng.uniform(20, 70, size=3)
    grad = rng.uniform(-30, 30, size=3)
    frames = np.empty((num_frames, size, size, 3), dtype=np.float32)
    masks = np.zeros((len(objects), num_frames, size, size), dtype=bool)
    for t in range(num_frames):
        img = base + grad * (xx[..., None] / size) + rng.normal(0, 4, size=(size, size, 3))
        for k, obj in enumerate(objects):  # later objects are drawn on top: masks stay the visible part
            cx, cy = obj.path[t]
            m = _shape_mask(obj.cat.shape, xx - cx, yy - cy, obj.radius)
            col = np.array(obj.cat.colour, dtype=np.float32)
            shade = np.where(_texture(obj.cat.texture, xx, yy)[..., None], col, col * 0.45)
            img = np.where(m[..., None], shade, img)
            masks[:k, t] &= ~m
            masks[k, t] = m
        frames[t] = img
    return np.clip(frames, 0, 255).astype(np.uint8), masks


def synth_sound(cat: Category, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(n, dtype=np.float64) / sr
    f = cat.pitch
    if cat.sound == "tone":
        y = np.sin(2 * np.pi * f * t)
    elif cat.sound == "harmonic":
        y = sum(np.sin(2 * np.pi * f * h * t) / h for h in (1, 2, 3, 4))
    elif cat.sound == "square":
        y = np.sign(np.sin(2 * np.pi * f * t)) * 0.6
    elif cat.sound == "chirp":  # sweeps f -> 2f and back every second
        phase = 2 * np.pi * f * (t + 0.5 * np.sin(2 * np.pi * t) / (2 * np.pi))
        y = np.sin(phase)
    elif cat.sound == "noise":  # noise bursts, low-passed more for low pitches
        noise = rng.normal(0, 1, n)
        k = max(1, int(sr / (8 * f)))
        y = np.convolve(noise, np.ones(k) / np.sqrt(k), mode="same")
        y *= (np.sin(2 * np.pi * 4 * t) > 0)
    elif cat.sound == "pulse":  # clicks with a tonal body
        y = np.sin(2 * np.pi * f * t) * (np.mod(t * 6, 1.0) < 0.15)
    else:
        raise ValueError(f"unknown sound {cat.sound!r}")
    y = np.asarray(y, dtype=np.float64)
    return (y / (np.abs(y).max() + 1e-9)).astype(np.float32)


def mix_audio(objects: list[SynthObject], seconds: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    mix = rng.normal(0, 0.01, seconds * sr).astype(np.float32)  # a little room noise
    for obj in objects:
        if obj.start is None:
            continue
        a, b = obj.start * sr, obj.end * sr
        mix[a:b] += 0.5 * synth_sound(obj.cat, b - a, sr, rng)
    return np.clip(mix, -1.0, 1.0)


# --------------------------------------------------------------------------- scene and expressions

def make_scene(cats: list[Category], num_frames: int, size: int, rng: np.random.Generator,
               schedule: dict[int, tuple[int, int]] | None = None) -> list[SynthObject]:
    """Objects in their slots; ``schedule``: object index -> (first sounding second, one past the
    last), default: one sounding object, or two that sound one after the other."""
    n = len(cats)
    slot_w = size / n
    radius = min(slot_w * 0.4, size * 0.18)
    if schedule is None:
        schedule = _default_schedule(n, num_frames, rng)
    objects = []
    for i, cat in enumerate(cats):
        lo, hi = i * slot_w + radius, (i + 1) * slot_w - radius
        x0, x1 = rng.uniform(lo, max(lo, hi), size=2)
        y0, y1 = rng.uniform(radius, size - radius, size=2)
        s = np.linspace(0.0, 1.0, num_frames)[:, None]
        path = np.array([x0, y0]) * (1 - s) + np.array([x1, y1]) * s
        start, end = schedule.get(i, (None, None))
        objects.append(SynthObject(cat, i, start, end, path, radius))
    return objects


def _default_schedule(n: int, num_frames: int, rng: np.random.Generator) -> dict[int, tuple[int, int]]:
    # Sound schedule: exactly one sounding object, or two that sound one after the other.
    order = rng.permutation(n)
    schedule: dict[int, tuple[int, int]] = {}
    if n == 1 or rng.random() < 0.5:
        a = int(rng.integers(0, num_frames - 1))
        schedule[int(order[0])] = (a, int(rng.integers(a + 1, num_frames + 1)))
    else:
        a0 = int(rng.integers(0, num_frames // 2))
        a1 = int(rng.integers(a0 + 1, num_frames // 2 + 1))
        b0 = int(rng.integers(a1, num_frames))
        schedule[int(order[0])] = (a0, a1)
        schedule[int(order[1])] = (b0, int(rng.integers(b0 + 1, num_frames + 1)))
    return schedule


def _describe_frames(objs: list[SynthObject]) -> str:
    """Each slot, then what is in it (``on the left a drum``): the word just written says where to
    look for the next one."""
    names = SLOT_NAMES[len(objs)]
    parts = [f"on the {names[o.slot]} a {o.cat.name}" if names[o.slot] != "middle"
             else f"in the middle a {o.cat.name}" for o in objs]
    return "In the frames I see " + _join(parts)


def _describe_audio(objs: list[SynthObject]) -> str:
    """What sounds, in order. The seconds are left out: no expression asks for them (time expressions
    ask for the order), and spelling them out doubled the CoT's length (measured: 80 -> 45 tokens)."""
    sounding = sorted((o for o in objs if o.start is not None), key=lambda o: o.start)
    if not sounding:
        return "In the audio I hear nothing"
    return "In the audio I hear " + " and then ".join(f"the {o.cat.name}" for o in sounding)


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _cot(objs: list[SynthObject], asks: str, match: str, cls: str) -> str:
    return reasoning.cot_answer(_describe_frames(objs), _describe_audio(objs),
                                f"The reference asks for {asks}", match, cls)


def make_expressions(objs: list[SynthObject], split: str, absent: list[Category], k: int,
                     num_null: int, rng: np.random.Generator) -> list[SynthExpression]:
    """Candidate expressions of every kind that is unambiguous for this scene; draw k of them."""
    names = SLOT_NAMES[len(objs)]
    sounding = sorted((o for o in objs if o.start is not None), key=lambda o: o.start)
    silent = [o for o in objs if o.start is None]
    cands: list[tuple[str, str, SynthObject, str]] = []  # (kind, expression, target, what it asks)

    def where(o: SynthObject) -> str:
        return "in the middle" if names[o.slot] == "middle" else f"on the {names[o.slot]}"

    for o in objs:  # by category (test_u targets are never named: their names were never trained)
        cands.append(("category", f"the {o.cat.name}", o, f"the {o.cat.name}"))
        cands.append(("position", f"the object {where(o)}", o, f"the object {where(o)}"))
    if len(sounding) == 1:
        o = sounding[0]
        cands.append(("sound", "the object making a sound", o, "the object that makes a sound"))
        if len(silent) >= 2:
            for s in silent:
                cands.append(("combo", f"the silent object {where(s)}", s, f"the silent object {where(s)}"))
    if len(sounding) == 2:
        a, b = sounding
        cands.append(("time", "the object that sounds first", a, "the object that sounds first"))
        cands.append(("time", "the object that sounds last", b, "the object that sounds last"))
        cands.append(("combo", f"the one that starts sounding after the {a.cat.name} stops", b,
                      f"the one that starts sounding after the {a.cat.name} stops"))
    if split == "test_u":
        unseen = {c.name for c in UNSEEN}
        cands = [c for c in cands if c[2].cat.name in unseen and c[0] != "category"
                 and not (c[0] == "combo" and any(u in c[1] for u in unseen))]

    picked = [cands[i] for i in rng.permutation(len(cands))[:k]] if cands else []
    out: list[SynthExpression] = []
    for kind, exp, o, asks in picked:
        if kind == "sound":
            match = f"The {o.cat.name} makes a sound"
        elif kind == "time":
            match = f"The {o.cat.name} sounds {'first' if o is sounding[0] else 'last'}"
        elif kind == "combo" and o.start is not None:
            match = f"The {o.cat.name} starts sounding after the {sounding[0].cat.name} stops"
        elif kind == "combo":
            match = f"The {o.cat.name} is silent and is {where(o)}"
        elif kind == "position":
            match = f"The {o.cat.name} is {where(o)}"
        else:
            match = f"There is a {o.cat.name} {where(o)}"
        out.append(SynthExpression(exp, objs.index(o), o.cat.name, _cot(objs, asks, match, o.cat.name), kind))
    for _ in range(num_null):
        c = absent[int(rng.integers(len(absent)))]
        exp = f"the {c.name}"
        out.append(SynthExpression(exp, None, reasoning.NULL_CLASS,
                                   _cot(objs, exp, f"There is no {c.name} in the video", reasoning.NULL_CLASS),
                                   "null"))
    return out


CORPUS_STREAM = 1000  # the text corpus's rng stream: apart from every split's (SPLITS.index: 0..4)


def cot_corpus(scenes: int, seed: int, data: DataConfig, start: int = 0) -> list[tuple[str, str]]:
    """(expression, CoT) pairs of ``scenes`` synthetic train-like scenes that are never rendered: the
    tiny LLM's text pretraining corpus (aurora_core.train.text_pretrain). Drawn as the train split's
    scenes are (seen categories, ``data.synthetic``'s objects, expressions and null rate), from the
    rng stream ``[seed, CORPUS_STREAM, i]`` for i in ``start .. start + scenes - 1``, which no split of
    the benchmark uses (the pretraining holds out the scenes after its corpus's to measure it)."""
    syn = data.synthetic
    out: list[tuple[str, str]] = []
    for idx in range(start, start + scenes):
        rng = np.random.default_rng([seed, CORPUS_STREAM, idx])
        n = int(rng.integers(syn.min_objects, syn.max_objects + 1))
        cats = _pick_categories("train", n, rng)
        objs = make_scene(cats, data.num_frames, syn.image_size, rng)
        absent = [c for c in SEEN if c not in cats]
        num_null = int(rng.random() < syn.null_expressions_per_train_clip)
        out += [(e.exp, e.cot) for e in make_expressions(objs, "train", absent, syn.expressions_per_clip,
                                                         num_null, rng)]
    return out


# --------------------------------------------------------------------------- writer

def _clip_rng(seed: int, split: str, idx: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), idx])


def _pick_categories(split: str, n: int, rng: np.random.Generator) -> list[Category]:
    if split == "test_u":  # at least one unseen category, the rest may be seen ones
        u = [UNSEEN[int(rng.integers(len(UNSEEN)))]]
        rest = [SEEN[i] for i in rng.permutation(len(SEEN))[: n - 1]]
        cats = u + rest
        return [cats[i] for i in rng.permutation(n)]
    return [SEEN[i] for i in rng.permutation(len(SEEN))[:n]]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def generate(out: Path, data: DataConfig, syn: SyntheticConfig | None = None) -> dict[str, int]:
    """Write the benchmark to ``out`` (official layout + cot.jsonl), atomically; return rows per split."""
    syn = syn or data.synthetic
    with staged_dir(Path(out)) as tmp:
        counts = _write(tmp, data, syn)
    log.info("synthetic Ref-AVS written to %s: %s", out, counts)
    return counts


def _write(tmp: Path, data: DataConfig, syn: SyntheticConfig) -> dict[str, int]:
    (tmp / "media").mkdir()
    (tmp / "gt_mask").mkdir()
    T, sr, size = data.num_frames, data.sample_rate, syn.image_size
    counts = {s: 0 for s in SPLITS}
    rows: list[dict[str, str]] = []
    cots: list[dict[str, str]] = []
    seen_uids: set[str] = set()
    duplicated: set[str] = set()
    t0 = time.time()
    for split in SPLITS:
        for idx in range(syn.clips(split)):
            rng = _clip_rng(syn.seed, split, idx)
            n = int(rng.integers(syn.min_objects, syn.max_objects + 1))
            cats = _pick_categories(split, n, rng)
            objs = make_scene(cats, T, size, rng)
            present = {c.name for c in cats}
            absent = [c for c in SEEN if c.name not in present]
            if split == "test_n":
                k, num_null = 0, max(1, syn.expressions_per_clip // 2)
            else:
                k = syn.expressions_per_clip
                num_null = int(rng.random() < syn.null_expressions_per_train_clip) if split in ("train", "val") else 0
            exps = make_expressions(objs, split, absent, k, num_null, rng)
            if not exps:
                continue
            vid = f"syn{split.replace('_', '')}{idx:05d}"
            # as in the release: a null clip's uid (and so its media folder) is null_c-<vid>, while its
            # vid column names the ordinary video
            folder = f"null_c-{vid}" if split == "test_n" else vid
            frames, masks = render_clip(objs, size, T, rng)
            audio = mix_audio(objs, T, sr, rng)
            media = tmp / "media" / folder
            (media / "frames").mkdir(parents=True)
            for t in range(T):
                jpg = encode_jpeg(torch.from_numpy(frames[t]).permute(2, 0, 1).contiguous(), quality=92)
                (media / "frames" / f"{t}.jpg").write_bytes(jpg.numpy().tobytes())
            sf.write(media / "audio.wav", audio, sr, subtype="PCM_16", format="WAV")
            def add(uid: str, fid: str, e: SynthExpression) -> None:
                if e.target is not None and not (tmp / "gt_mask" / folder / f"fid_{fid}").is_dir():
                    mdir = tmp / "gt_mask" / folder / f"fid_{fid}"  # null rows have no mask files, as in the release
                    mdir.mkdir(parents=True)
                    for t in range(T):
                        m = torch.from_numpy(masks[e.target, t].astype(np.uint8) * 255)[None]
                        (mdir / f"{t:05d}.png").write_bytes(encode_png(m).numpy().tobytes())
                line = len(rows) + 2  # metadata.csv line (header = 1)
                rows.append({"vid": vid, "uid": uid, "split": split, "fid": fid, "exp": e.exp})
                cots.append({"uid": row_key(uid, line, uid not in seen_uids), "cot": e.cot, "kind": e.kind})
                seen_uids.add(uid)
                counts[split] += 1

            for j, e in enumerate(exps):
                add(f"{folder}_{e.cls}_{j}", str(j), e)
            if split in DUPLICATE_SPLITS and split not in duplicated and exps[0].target is not None:
                # the release repeats 11 uids: exact copies, and rows that share a uid but differ in
                # fid and expression; mirror both once per split so every consumer meets them
                duplicated.add(split)
                e0 = exps[0]
                add(f"{folder}_{e0.cls}_0", "0", e0)
                add(f"{folder}_{e0.cls}_0", str(len(exps)),
                    SynthExpression(f"{e0.exp.rstrip('.')} in the video", e0.target, e0.cls, e0.cot, e0.kind))
        log.info("synthetic %s: %d clips, %d expressions", split, syn.clips(split), counts[split])
    with open(tmp / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["vid", "uid", "split", "fid", "exp"])
        w.writeheader()
        w.writerows(rows)
    _write_jsonl(tmp / "cot.jsonl", cots)
    (tmp / "synthetic.json").write_text(json.dumps(
        {"seed": syn.seed, "counts": counts, "num_frames": T, "sample_rate": sr, "image_size": size,
         "seen": [c.name for c in SEEN], "unseen": [c.name for c in UNSEEN]}, indent=1))
    log.info("synthetic clips rendered in %.1fs", time.time() - t0)
    return counts


# --------------------------------------------------------------------------- unreferenced set (AVSBench layout)

AVS_SUBSETS = ("s4", "ms3")
AVS_SPLITS = ("train", "val", "test")
# A tripwire where the release has its pickled log-mel tensors: not a pickle, so anything that
# unpickled it would fail (the reader reads the WAVs and never opens audio_log_mel/).
PICKLE_TRIPWIRE = b"aurora: the release's audio_log_mel/*.pkl are pickles and are never read\n"


def _avs_schedule(subset: str, n: int, T: int, rng: np.random.Generator) -> dict[int, tuple[int, int]]:
    """S4: one object sounds through the whole clip. MS3: two objects sound, each for 2..T seconds
    at a random offset (they may overlap), so a frame's target is the union of what sounds then."""
    order = [int(i) for i in rng.permutation(n)]
    if subset == "s4":
        return {order[0]: (0, T)}
    out = {}
    for i in order[:2]:
        length = int(rng.integers(2, T + 1))
        start = int(rng.integers(0, T - length + 1))
        out[i] = (start, start + length)
    return out


def _write_png(path: Path, img: np.ndarray, palette: bool = False) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    if palette:  # as MS3's masks: palette PNG, index 0 background, 1 foreground
        im = Image.fromarray(img.astype(np.uint8), mode="P")
        im.putpalette([0, 0, 0, 128, 0, 0] + [0, 0, 0] * 254)
        im.save(path, format="PNG")
    else:
        path.write_bytes(encode_png(torch.from_numpy(np.ascontiguousarray(img))[None] if img.ndim == 2 else
                                    torch.from_numpy(img).permute(2, 0, 1).contiguous()).numpy().tobytes())


def generate_avsbench(out: Path, data: DataConfig, syn: SyntheticConfig | None = None) -> dict[str, dict[str, int]]:
    """Write the unreferenced set in the AVSBench release layout (``Single-source/`` S4 and
    ``Multi-sources/`` MS3, as aurora_core.data.avsbench reads it) to ``out``, atomically; 5 frames
    (one per second, PNG) and 5 s of audio per clip, seen categories only. S4 train rows have the
    mask of frame 1 only; MS3 masks are palette PNGs whose frame-t target is the union of the objects
    sounding during second t. A ``cot.jsonl`` beside each CSV holds the ground-truth CoT (kind = the
    subset). Returns rows per split per subset."""
    from aurora_core.config import AVSBENCH_FRAMES
    from aurora_core.data.avsbench import LAYOUTS, MS3_CLASS

    syn = syn or data.synthetic
    T, sr, size = AVSBENCH_FRAMES, data.sample_rate, syn.image_size
    counts: dict[str, dict[str, int]] = {}
    with staged_dir(Path(out)) as tmp:
        for si, subset in enumerate(AVS_SUBSETS):
            lay = LAYOUTS[subset]
            meta, cots = [], []
            counts[subset] = {}
            for split in AVS_SPLITS:
                n_clips = syn.avs_clips(split)
                for idx in range(n_clips):
                    rng = np.random.default_rng([syn.seed, 100 + si, AVS_SPLITS.index(split), idx])
                    lo = max(syn.min_objects, 2 if subset == "ms3" else 1)
                    n = int(rng.integers(lo, max(lo, syn.max_objects) + 1))
                    cats = [SEEN[i] for i in rng.permutation(len(SEEN))[:n]]
                    objs = make_scene(cats, T, size, rng, _avs_schedule(subset, n, T, rng))
                    frames, masks = render_clip(objs, size, T, rng)
                    audio = mix_audio(objs, T, sr, rng)
                    # release-like names: YouTube ids may start with '-' and hold '_'
                    name = f"-{subset}{split}{idx:04d}_{idx % 3}"
                    sounding = [k for k, o in enumerate(objs) if o.start is not None]
                    category = objs[sounding[0]].cat.name if subset == "s4" else ""
                    target = np.zeros((T, size, size), dtype=bool)
                    for k in sounding:
                        o = objs[k]
                        target[o.start:o.end] |= masks[k, o.start:o.end]
                    for t in range(T):
                        _write_png(tmp.joinpath(*lay.frame(split, category, name, t + 1)), frames[t])
                    wav_parts = lay.audio(split, category, name)
                    wav = tmp.joinpath(*wav_parts)
                    wav.parent.mkdir(parents=True, exist_ok=True)
                    sf.write(wav, audio, sr, subtype="PCM_16", format="WAV")
                    # audio_log_mel/ mirrors audio_wav/ in the release
                    pkl = tmp.joinpath(*wav_parts[:2], "audio_log_mel", *wav_parts[3:-1], f"{name}.pkl")
                    pkl.parent.mkdir(parents=True, exist_ok=True)
                    pkl.write_bytes(PICKLE_TRIPWIRE)
                    for t in range(lay.mask_frames(split)):
                        m = target[t].astype(np.uint8)
                        _write_png(tmp.joinpath(*lay.mask(split, category, name, t + 1)),
                                   m if subset == "ms3" else m * 255, palette=subset == "ms3")
                    meta.append((name, len(sounding), category, split) if subset == "s4" else (name, split))
                    by_start = sorted(sounding, key=lambda k: objs[k].start)
                    if subset == "s4":
                        match = f"The {objs[by_start[0]].cat.name} makes a sound"
                    else:  # Step 2 already says when each sounds
                        match = "The " + " and the ".join(objs[k].cat.name for k in by_start) + " are making sounds"
                    cls = category if subset == "s4" else MS3_CLASS
                    cots.append({"uid": name, "kind": subset,
                                 "cot": _cot(objs, data.unref_expression.rstrip("."), match, cls)})
                counts[subset][split] = n_clips
            root = tmp / lay.folder
            with open(root / lay.csv, "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["name", "sources", "category", "split"] if subset == "s4" else ["name", "split"])
                w.writerows(meta)
            _write_jsonl(root / "cot.jsonl", cots)
        (tmp / "synthetic.json").write_text(json.dumps(
            {"seed": syn.seed, "counts": counts, "num_frames": T, "sample_rate": sr, "image_size": size,
             "expression": data.unref_expression, "categories": [c.name for c in SEEN]}, indent=1))
    log.info("synthetic unreferenced set (AVSBench layout) written to %s: %s", out, counts)
    return counts

