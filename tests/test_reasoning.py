import pytest

from aurora_core import reasoning as R


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
