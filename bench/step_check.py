"""Does each answer's Step 4 follow its own Step 1? Reads a run's evaluation answers.

    python bench/step_check.py --run runs/tiny [--stages sft reflect grpo] [--out check.json]

A category or null expression ("the horn") is answered right only by a check: Step 3 names the asked
class, and Step 4 says "there is a horn <slot>" if Step 1 listed a horn in that slot, "there is no
horn in the video" if it did not. This reads ``<run>/eval/<stage>/answers.jsonl`` (the answers to the
test_s category rows, whose object is there, and to the test_n rows, whose object is absent) and
counts, per stage:

- presence: answers saying "no" (``none``) by whether their own Step 1 lists the class their own
  Step 3 asks for, on each kind of row. A model that follows its check says "no" exactly where Step 1
  lacks the class; what Step 1 lists right or wrong is the eyes', not the check's;
- slot: of the category answers whose Step 1 and Step 4 both place the asked class, how many place it
  in the same slot;
- unparsed: answers whose Step 1 / 3 / 4 are not the check's sentences (Step 3 read another kind of
  expression, "the object that sounds first", or the text is free-form): counted, never dropped.

The sentences are the synthetic generator's (``aurora_core/data/synthetic.py``); on the real Ref-AVS
CoTs (free text) this counts every answer as unparsed. What it printed on the tiny default (seed 0)
is in the README's demo section ("Step 4 does not read Step 1").
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

SLOT = r"(on the left|in the middle|on the right)"
STEP1_OBJECT = re.compile(SLOT + r" an? ([a-z0-9\-]+)")
STEP3_ASKED = re.compile(r"step 3 : the reference asks for the ([a-z0-9\-]+) \.")
STEP4_DECISION = re.compile(r"step 4 : there is (no|an?) ([a-z0-9\-]+)(?: " + SLOT + r")?")


def check_counts(rows: list[dict]) -> dict[str, dict[str, int]]:
    """rows: answers.jsonl records. Returns {"category": counts, "null": counts, "slot": counts}."""
    out = {"category": collections.Counter(), "null": collections.Counter(), "slot": collections.Counter()}
    for r in rows:
        if (r["split"], r.get("kind")) not in (("test_s", "category"), ("test_n", "null")):
            continue
        kind = "category" if r["split"] == "test_s" else "null"
        text = r["answer"].lower()
        step1 = text.split("step 2 :")[0]
        asked, decision = STEP3_ASKED.search(text), STEP4_DECISION.search(text)
        if "step 1 :" not in step1 or asked is None or decision is None or decision.group(2) != asked.group(1):
            out[kind]["unparsed"] += 1
            continue
        slots = [slot for slot, obj in STEP1_OBJECT.findall(step1) if obj == asked.group(1)]
        says_no = decision.group(1) == "no"
        out[kind][f"step1 {'lists' if slots else 'lacks'} it, says {'no' if says_no else 'a'}"] += 1
        if kind == "category" and slots and not says_no and decision.group(3):
            out["slot"]["same slot" if decision.group(3) in slots else "other slot"] += 1
    return {k: dict(sorted(v.items())) for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, type=Path, help="a run directory (holds eval/<stage>/answers.jsonl)")
    ap.add_argument("--stages", nargs="+", default=["sft", "reflect", "grpo"])
    ap.add_argument("--out", type=Path, help="write the counts as JSON here")
    args = ap.parse_args(argv)
    result = {}
    for stage in args.stages:
        path = args.run / "eval" / stage / "answers.jsonl"
        if not path.is_file():
            print(f"error: {path} not found: evaluate the stage first (pipelines/all.py or pipelines/evaluate.py)",
                  file=sys.stderr)
            return 1
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        result[stage] = counts = check_counts(rows)
        print(f"[{stage}] {path}")
        for kind in ("category", "null", "slot"):
            print(f"  {kind:9s} " + ("; ".join(f"{k} {v}" for k, v in counts[kind].items()) or "none"))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
        print(f"counts: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
