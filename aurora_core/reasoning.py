"""The answer formats of AURORA and a total parser for them.

Formats (the AURORA paper's answer structure):
- prompt:        ``The reference is: {exp} Please segment the corresponding object in the images.``
- structured CoT (stages 1-3): ``Step 1: <frames> Step 2: <audio> Step 3: <reference> Step 4: <match>
  The target is <class>. It is [SEG].`` (null: ``The target is none. It is [SEG].``)
- direct answer (stage-0 teacher): ``It is <class> [SEG].``
- reflective target (stage 2): ``<own reasoning> Wait, let me reconsider. <correct CoT>``

The parser never raises: any string gives a :class:`ParsedAnswer`; rewards and the reflective stage
rely on that.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SEG_TOKEN = "[SEG]"
NULL_CLASS = "null"  # the class of a referent that is absent (Ref-AVS `test_n`, `null_*` uids)
NULL_ANSWER = "none"  # how the answer names it
REFLECT_TRIGGER = "Wait, let me reconsider."
ANSWER_SUFFIX = "It is [SEG]."


def prompt_text(expression: str) -> str:
    return f"The reference is: {expression.strip()} Please segment the corresponding object in the images."


def answer_name(cls: str) -> str:
    return NULL_ANSWER if cls == NULL_CLASS else cls


def final_answer(cls: str) -> str:
    return f"The target is {answer_name(cls)}. {ANSWER_SUFFIX}"


def direct_answer(cls: str) -> str:
    """The stage-0 teacher's target: no reasoning, the class and the [SEG] token."""
    return f"It is {answer_name(cls)} {SEG_TOKEN}."


def cot_answer(frames: str, audio: str, reference: str, match: str, cls: str) -> str:
    """The four-step structured chain of thought ending in the final answer."""
    steps = (frames, audio, reference, match)
    body = " ".join(f"Step {i}: {_sentence(s)}" for i, s in enumerate(steps, start=1))
    return f"{body} {final_answer(cls)}"


def reflective_answer(own_reasoning: str, correct_cot: str) -> str:
    """Stage-2 target for a wrong answer: what the model said, the trigger, then the right CoT."""
    return f"{own_reasoning.strip()} {REFLECT_TRIGGER} {correct_cot.strip()}"


def split_reflective(target: str) -> tuple[str, str]:
    """(the model's own reasoning, `` <trigger> <correct CoT>``) of a reflective target; ("", target)
    for a target without the trigger. The second part keeps its leading space: a BPE tokenizer
    reads `` Wait`` as the model writes it after its reasoning."""
    i = target.find(REFLECT_TRIGGER)
    if i <= 0:
        return "", target
    return target[:i].rstrip(), " " + target[i:]


def _sentence(s: str) -> str:
    s = s.strip()
    return s if s.endswith((".", "!", "?")) else s + "."


@dataclass(frozen=True)
class ParsedAnswer:
    well_formed: bool  # the text ends with "It is [SEG]." (format reward)
    has_class_sentence: bool  # the second-to-last sentence reads "the target is (the )?X"
    predicted_class: str | None  # X mapped back to a class name ("none" -> "null"); None if absent
    num_seg: int  # how many [SEG] tokens appear
    reflected: bool  # the self-correction trigger appears
    final_text: str  # the text after the last trigger (what the answer finally says)
    structured: bool = False  # the final text is Step 1..4 in order, each once, then the answer; no loop

    def class_correct(self, true_class: str) -> bool:
        return self.predicted_class is not None and self.predicted_class == true_class.lower()


_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:!?])")
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+")
_TARGET_IS = re.compile(r"^the target is (?:the )?(?P<cls>[a-z0-9][a-z0-9 \-]*?)\s*[.!?]?$")
_DIRECT = re.compile(r"\bit is (?:the )?(?P<cls>[a-z0-9][a-z0-9 \-]*?)\s*\[seg\]\s*\.?\s*$")
_ENDS_WITH_ANSWER = re.compile(r"\bit is \[seg\]\s*\.$")


_STEP = re.compile(r"\bstep (\d+)\s*:")
LOOP_MAX_WORDS, LOOP_REPEATS = 8, 3  # a phrase of up to 8 words said 3 times back to back is a loop


def loops(words: list[str]) -> bool:
    """A phrase of 1..LOOP_MAX_WORDS words repeated LOOP_REPEATS times in a row ("the target is on the
    target is on the target is on"), which a template-only model produces. Counting a 4-word phrase
    anywhere in the answer instead also flagged answers that name one object in two steps ("a flute on
    the left and a flute on the right ... there is a flute on the left")."""
    for n in range(1, LOOP_MAX_WORDS + 1):
        for i in range(len(words) - LOOP_REPEATS * n + 1):
            if all(words[i + k * n:i + (k + 1) * n] == words[i:i + n] for k in range(1, LOOP_REPEATS)):
                return True
    return False


def is_structured(final_low: str, well_formed: bool, has_class_sentence: bool) -> bool:
    """The structured CoT as the paper prescribes it: the markers ``Step 1:`` .. ``Step 4:`` in order and
    each once, the answer sentences after them, no sentence said twice, and no phrase looping."""
    if not (well_formed and has_class_sentence):
        return False
    if [m.group(1) for m in _STEP.finditer(final_low)] != ["1", "2", "3", "4"]:
        return False
    if not final_low.lstrip().startswith("step 1"):
        return False
    sentences = [x.strip() for x in _SENTENCE_SPLIT.split(final_low) if x.strip()]
    if len(set(sentences)) != len(sentences):
        return False
    return not loops(re.findall(r"[a-z0-9\-\[\]]+", final_low))


def normalize(text: str) -> str:
    """Whitespace collapsed, no space before punctuation (word-level detokenisation leaves some)."""
    text = " ".join(str(text).split())
    return _SPACE_BEFORE_PUNCT.sub(r"\1", text)


def parse_answer(text: object) -> ParsedAnswer:
    """Parse any model output; total (never raises)."""
    try:
        raw = normalize(text if isinstance(text, str) else ("" if text is None else str(text)))
    except Exception:  # pragma: no cover - str() of an exotic object failing
        raw = ""
    low = raw.lower()
    trig = REFLECT_TRIGGER.lower()
    reflected = trig in low
    final = raw[low.rfind(trig) + len(trig):].strip() if reflected else raw
    final_low = final.lower()

    well_formed = bool(_ENDS_WITH_ANSWER.search(final_low))
    sentences = [s for s in _SENTENCE_SPLIT.split(final_low) if s]
    cls: str | None = None
    has_class_sentence = False
    if len(sentences) >= 2:
        m = _TARGET_IS.match(sentences[-2].strip())
        if m:
            has_class_sentence = True
            cls = m.group("cls").strip()
    if cls is None:
        m = _DIRECT.search(final_low)
        if m and m.group("cls").strip() != "[seg]":
            cls = m.group("cls").strip()
    if cls == NULL_ANSWER:
        cls = NULL_CLASS
    return ParsedAnswer(
        well_formed=well_formed,
        has_class_sentence=has_class_sentence,
        predicted_class=cls,
        num_seg=low.count(SEG_TOKEN.lower()),
        reflected=reflected,
        final_text=final,
        structured=is_structured(final_low, well_formed, has_class_sentence),
    )
