import pytest

from aurora_core import reasoning as R
from conftest import ROOT, load_script


def test_formats():
    assert R.prompt_text("the dog ") == \
        "The reference is: the dog Please segment the corresponding object in the images."
    assert R.direct_answer("dog") == "It is dog [SEG]."
    assert R.direct_answer("null") == "It is none [SEG]."
    cot = R.cot_answer("I see a dog", "I hear a bark.", "The reference asks for the dog", "The dog barks", "dog")
    assert cot == ("Step 1: I see a dog. Step 2: I hear a bark. Step 3: The reference asks for the dog. "
                   "Step 4: The dog barks. The target is dog. It is [SEG].")
    assert R.final_answer("null") == "The target is none. It is [SEG]."


@pytest.mark.parametrize("text,well,has_cls,cls", [
    ("Step 4: x. The target is dog. It is [SEG].", True, True, "dog"),
    ("the target is the emergency-car . it is [SEG] .", True, True, "emergency-car"),  # detokenised spacing
    ("THE TARGET IS DOG. IT IS [SEG].", True, True, "dog"),
    ("The target is none. It is [SEG].", True, True, "null"),
    ("It is dog [SEG].", False, False, "dog"),  # teacher's direct format
    ("The target is dog. It is [SEG]", False, True, "dog"),  # no final period: not the format
    ("The target is dog.", False, False, None),  # only one sentence: no second-to-last
    ("The target is dog. It is [SEG]. And more.", False, False, None),
    ("", False, False, None),
    ("[SEG][SEG][SEG]", False, False, None),
    ("It is [SEG]. It is [SEG].", True, False, None),
    ("step 1 : the target is", False, False, None),  # truncated
    ("\x00\uffff garbage ... . . ..", False, False, None),
])
def test_parser_cases(text, well, has_cls, cls):
    p = R.parse_answer(text)
    assert (p.well_formed, p.has_class_sentence, p.predicted_class) == (well, has_cls, cls)


def test_parser_counts_seg_and_reflection():
    wrong = "Step 4: it is left. The target is bell. It is [SEG]."
    text = R.reflective_answer(wrong, "Step 4: no. The target is drum. It is [SEG].")
    p = R.parse_answer(text)
    assert p.reflected and p.num_seg == 2 and p.predicted_class == "drum" and p.well_formed
    assert p.class_correct("drum") and not p.class_correct("bell")


@pytest.mark.parametrize("junk", [None, 17, 3.5, b"bytes", ["list"], object(), "x" * 100000, "[seg]" * 1000])
def test_parser_is_total(junk):
    p = R.parse_answer(junk)
    assert isinstance(p, R.ParsedAnswer)


def test_structure_rate_parser():
    good = R.cot_answer("I see a drum on the left and a bell on the right",
                                "I hear a drum from second 2 to second 5", "The reference asks for the drum",
                                "The referred object is the drum", "drum")
    assert R.parse_answer(good).structured
    # the template loop a model that learned only the words produces (seen in the demo before)
    loop = ("step 1 : in the frames i see a violin on the left and a violin on the right . step 2 : in the "
            "audio i hear the audio i hear the reference asks for the target is on the target is on the target "
            "is on it is [SEG] . it is [SEG] .")
    assert not R.parse_answer(loop).structured
    assert not R.parse_answer(good.replace("Step 3:", "Step 2:")).structured  # a step repeated
    swapped = good.replace("Step 1:", "Step X:").replace("Step 2:", "Step 1:").replace("Step X:", "Step 2:")
    assert not R.parse_answer(swapped).structured  # out of order
    assert not R.parse_answer(good.replace(" It is [SEG].", "")).structured  # no answer sentence
    assert not R.parse_answer("It is drum [SEG].").structured  # the teacher's direct answer
    twice = good.replace("Step 4:", "Step 3: I hear a drum from second 2 to second 5. Step 4:", 1)
    assert not R.parse_answer(twice).structured  # "Step 3" twice and a sentence said twice
    # a phrase looping inside otherwise ordered steps; and an answer naming one object in two steps is not a loop
    looping = good.replace("Step 2: I hear", "Step 2: I hear the drum and the drum and the drum and the drum and")
    assert not R.parse_answer(looping).structured and R.loops("a b c a b c a b c".split())
    assert not R.loops("a b c a b c x a b c".split())
    same = ("step 1 : in the frames i see a flute on the left and a flute on the right . step 2 : in the audio i "
            "hear the flute . step 3 : the reference asks for the flute . step 4 : there is a flute on the left . "
            "the target is flute . it is [SEG] .")
    assert R.parse_answer(same).structured
    # a reflective answer is judged by what it finally says
    assert R.parse_answer(R.reflective_answer("Step 1: nothing", good)).structured
    assert not R.parse_answer(R.reflective_answer(good, "Step 1: nothing")).structured


def test_reflective_targets_split_into_own_reasoning_and_correction():
    cot = R.cot_answer("a", "b", "c", "d", "drum")
    own = "Step 1: In the frames I see a bell. The target is bell."
    target = R.reflective_answer(own, cot)
    context, answer = R.split_reflective(target)
    assert context == own and answer == f" {R.REFLECT_TRIGGER} {cot}"
    assert context + answer == target
    assert R.split_reflective(cot) == ("", cot)  # a right answer: all of it is trained on
    assert R.parse_answer(context + answer).predicted_class == "drum"


def test_step_check_reads_the_check_from_step_1_3_and_4():
    """bench/step_check.py: "no" where Step 1 lacks Step 3's class is the check followed; a slot Step 1 gave
    the class (any of them when it names the class twice) is the same slot; other sentences are unparsed."""
    step_check = load_script(ROOT / "bench" / "step_check.py")
    head = "step 1 : in the frames i see on the left a horn and on the right a drum . step 2 : in the audio i hear the drum ."
    rows = [
        {"split": "test_s", "kind": "category",
         "answer": head + " step 3 : the reference asks for the horn . step 4 : there is a horn on the left ."},
        {"split": "test_s", "kind": "category",
         "answer": head + " step 3 : the reference asks for the drum . step 4 : there is a drum on the left ."},
        {"split": "test_s", "kind": "category",
         "answer": head + " step 3 : the reference asks for the object that sounds first . step 4 : the drum sounds first ."},
        {"split": "test_n", "kind": "null",
         "answer": head + " step 3 : the reference asks for the gong . step 4 : there is no gong in the video ."},
        {"split": "test_n", "kind": "null",
         "answer": head + " step 3 : the reference asks for the gong . step 4 : there is a gong on the right ."},
        {"split": "test_s", "kind": "position", "answer": head},  # not a check: not counted
    ]
    counts = step_check.check_counts(rows)
    assert counts["category"] == {"step1 lists it, says a": 2, "unparsed": 1}
    assert counts["null"] == {"step1 lacks it, says a": 1, "step1 lacks it, says no": 1}
    assert counts["slot"] == {"other slot": 1, "same slot": 1}


def test_ablation_bench_measures_whether_the_mask_follows_the_answer():
    """bench/ablations.py: of the test_s rows where the same weights on full and ablated inputs name different
    classes (neither none), how far the IoU moved, and how many rows it did not move."""
    ablations = load_script(ROOT / "bench" / "ablations.py")

    def row(key, split, cls, iou):
        return {"key": key, "split": split, "pred_class": cls, "iou": iou}

    full = [row("a", "test_s", "horn", 0.20), row("b", "test_s", "drum", 0.40), row("c", "test_s", "null", 0.0),
            row("d", "test_n", "gong", 0.5), row("e", "test_s", "bell", 0.30), row("f", "test_s", None, 0.1)]
    ablated = [row("a", "test_s", "violin", 0.205), row("b", "test_s", "horn", 0.10), row("c", "test_s", "flute", 0.3),
               row("d", "test_n", "drum", 0.0), row("e", "test_s", "bell", 0.9), row("f", "test_s", "horn", 0.5)]
    f = ablations.mask_follows_answer(full, ablated)
    assert f["rows"] == 2 and f["unmoved"] == 1  # a (moved 0.005) and b (0.30); c, f: no class; d: test_n; e: same
    assert abs(f["mean_abs_diou"] - 0.1525) < 1e-9
    assert ablations.mask_follows_answer(full[:1], [row("a", "test_s", "horn", 0.2)])["mean_abs_diou"] is None
    assert "-text" in ablations.render_follows({"-text": f})


def test_seg_prompt_probe_reads_a_class_only_where_the_states_carry_it():
    """bench/seg_prompt_probe.py: the linear class probe reads classes from states that carry them (and not
    from states that do not), ``class_share`` and ``standardiser`` measure and rescale such states, and
    ``moved`` tells the same masks (1.0) from disjoint ones (0.0)."""
    import torch

    probe = load_script(ROOT / "bench" / "seg_prompt_probe.py")
    g = torch.Generator().manual_seed(0)
    y_tr, y_te = torch.randint(0, 4, (200,), generator=g), torch.randint(0, 4, (50,), generator=g)
    centres = 3.0 * torch.randn(4, 16, generator=g)
    carry = lambda y: centres[y] + torch.randn(len(y), 16, generator=g)  # noqa: E731
    assert probe.class_probe(carry(y_tr), y_tr, carry(y_te), y_te, 4) == (1.0, 1.0)
    # part 2's standardised prompt reads (h - mean) / sd of the train rows: a large shared vector
    # plus a small per-row part (as the [SEG] states) comes out centred at unit scale per feature
    h = 13.0 + 0.1 * torch.randn(200, 16, generator=g)
    mu, sd = probe.standardiser(h)
    z = (h - mu) / sd
    assert z.mean(0).abs().max() < 1e-4 and (z.std(0) - 1.0).abs().max() < 1e-3
    assert probe.class_share(centres[y_tr], y_tr) > 0.999  # every row its class's mean
    assert probe.class_share(carry(y_tr), y_tr) > 0.8  # centres 3 x the noise: ~9/10 of the variance
    assert probe.class_share(torch.randn(200, 16, generator=g), y_tr) < 0.1  # 3/199 by chance
    _, test_acc = probe.class_probe(torch.randn(200, 16, generator=g), y_tr, torch.randn(50, 16, generator=g), y_te, 4)
    assert test_acc < 0.5  # chance is 0.25
    logits = torch.full((1, 8, 8), -10.0)
    logits[0, :4] = 10.0
    assert abs(probe.moved([logits], [logits]) - 1.0) < 1e-6  # mask_iou smooths by 1e-7
    assert probe.moved([logits], [-logits]) < 1e-6

