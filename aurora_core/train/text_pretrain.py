"""The tiny default's language pretraining: what a real run gets from Qwen2.5-Omni's pretrained LLM.

A real run starts from a pretrained LLM that already reads and copies text; the tiny default's LLM
is random. Before any stage, it learns the language of the synthetic benchmark from text alone:
prompts and structured CoTs of synthetic scenes that are never rendered (a seeded stream apart from
the benchmark's clips, so no train, validation or test clip is read), next-token loss on the
answer, the towers and SAM untouched. Why: Step 4 of a category or null expression ("there is a /
no <class>") is right only when the model checks Step 3's class against the objects Step 1 lists.
A random 3-layer LLM learns that check in about 1,300 steps of 16 rows; SFT's 528 steps (with the
media in the context) were not enough, and its Step 4 then did not follow its own Step 1.

Whether it learnt the check is measured, not assumed: at every log line the Step 4 decision ("a" or
"no" after the ground-truth CoT up to "Step 4: There is") on the category / null rows of
``text_pretrain.check_scenes`` held-out scenes (the corpus stream's next scenes), printed and logged
to MLflow; a run that ends without it says so in a warning. The check appears late and suddenly
(measured, 2,500 steps at 1e-3, corpus seed 2: all-"a" or all-"no" until ~1,500 steps, then right
for 433 of 436 held-out rows from 1,750; corpus seed 1: a bias until 1,750, 367 of 444 at 2,500).

The weights go to one safetensors file (the thinker's ``model.*`` and ``lm_head.*``), which
``model.tiny.llm_weights`` loads over the seeded random init in every process that builds the
model. Runs in the calling process: ~1M parameters, text of ~80 tokens a row.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from aurora_core.config import AuroraConfig
from aurora_core.data import synthetic
from aurora_core.model.build import TOWER_PREFIXES, tiny_thinker  # the towers: not pretrained, not saved
from aurora_core.model.tokenizer import CHAT_END, CHAT_START
from aurora_core.reasoning import prompt_text

log = logging.getLogger(__name__)

# a category or null row's Step 4 goes on "a <class> <slot>" (Step 1 lists the asked class) or "no
# <class> in the video" (it does not): the check the pretraining is for
DECISION = "Step 4: There is"
LEARNT = 0.9  # the check counts as learnt when this share of each kind of held-out row is right


@dataclass(frozen=True)
class CheckCount:
    """The Step 4 decision on rows whose ground-truth CoT has one (other kinds of expression skipped)."""

    present_right: int  # rows whose Step 4 says "There is a" that the model continues with "a"
    present: int
    absent_right: int  # rows whose Step 4 says "There is no" that it continues with "no"
    absent: int

    def shares(self) -> tuple[float, float]:
        return self.present_right / max(1, self.present), self.absent_right / max(1, self.absent)

    def __str__(self) -> str:
        return f'"a" {self.present_right}/{self.present}, "no" {self.absent_right}/{self.absent}'


@dataclass(frozen=True)
class TextPretrainResult:
    path: str  # the safetensors file written
    rows: int  # corpus rows (expression + CoT pairs)
    steps: int  # optimizer steps
    first_loss: float  # mean next-token loss per answer token over the first 10 % of steps
    last_loss: float  # the same over the last 10 %
    check: CheckCount  # the Step 4 decision on the held-out scenes' rows after the last step
    seconds: float


def _prompt_ids(tok, exp: str) -> list[int]:
    """The pipeline's chat prompt without the media placeholders, up to the answer."""
    return tok(f"{CHAT_START}user\n{prompt_text(exp)}{CHAT_END}\n{CHAT_START}assistant\n",
               add_special_tokens=False).input_ids


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    out = torch.full((len(seqs), max(len(s) for s in seqs)), value)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s)
    return out


def encode(tok, rows: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, labels (the answer and its end token; -100 elsewhere) and the attention mask."""
    prompts = [_prompt_ids(tok, exp) for exp, _ in rows]
    answers = [tok(cot + CHAT_END, add_special_tokens=False).input_ids for _, cot in rows]
    seqs = [p + a for p, a in zip(prompts, answers)]
    return (_pad(seqs, tok.pad_token_id), _pad([[-100] * len(p) + a for p, a in zip(prompts, answers)], -100),
            _pad([[1] * len(s) for s in seqs], 0))


@torch.no_grad()
def step4_check(lm: torch.nn.Module, tok, rows: list[tuple[str, str]], batch_size: int = 64) -> CheckCount:
    """Does ``lm`` (a thinker or a text-only causal LM) continue each row's ground-truth CoT, cut after
    "Step 4: There is", with "a" where Step 1 lists the asked class and "no" where it does not? The
    larger of the two logits decides; Step 1 is right there, so only the check can get both kinds."""
    a_id, no_id = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("no")
    cut = []  # (expression, the CoT up to the decision, whether the asked class is absent)
    for exp, cot in rows:
        if DECISION in cot:
            i = cot.index(DECISION) + len(DECISION)
            cut.append((exp, cot[:i], cot[i:].startswith(" no ")))
    counts = [0, 0, 0, 0]  # present right, present, absent right, absent
    was_training = lm.training
    lm.eval()
    for b in range(0, len(cut), batch_size):
        part = cut[b: b + batch_size]
        seqs = [_prompt_ids(tok, exp) + tok(prefix, add_special_tokens=False).input_ids for exp, prefix, _ in part]
        logits = lm(input_ids=_pad(seqs, tok.pad_token_id), attention_mask=_pad([[1] * len(s) for s in seqs], 0)).logits
        last = logits[torch.arange(len(seqs)), torch.tensor([len(s) - 1 for s in seqs])]
        says_no = (last[:, no_id] > last[:, a_id]).tolist()
        for (_, _, absent), no in zip(part, says_no):
            counts[2 if absent else 0] += int(no == absent)
            counts[3 if absent else 1] += 1
    lm.train(was_training)
    return CheckCount(*counts)


def pretrain(cfg: AuroraConfig, out: Path,
             log_metrics: Callable[[dict[str, float], int], None] | None = None) -> TextPretrainResult:
    """Train the tiny thinker's language model on the synthetic CoT corpus; write ``out`` atomically.
    ``log_metrics(values, step)`` gets the LM loss and the Step 4 check at every log line (MLflow)."""
    from safetensors.torch import save_file

    from aurora_core.model.tokenizer import build_tiny_tokenizer

    p = cfg.text_pretrain  # the config refuses it for a real checkpoint (model.llm_path)
    t0 = time.time()
    corpus = synthetic.cot_corpus(p.scenes, p.seed, cfg.data)
    held_out = synthetic.cot_corpus(p.check_scenes, p.seed, cfg.data, start=p.scenes)
    tok = build_tiny_tokenizer()
    thinker = tiny_thinker(cfg.model, tok)  # the random init build_model starts from
    params = [w for k, w in thinker.named_parameters() if not k.startswith(TOWER_PREFIXES)]
    opt = torch.optim.AdamW(params, lr=p.lr, weight_decay=0.0)
    # 5-step warm-up, cosine to 0: the schedule the stages use
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 5) * 0.5 * (1 + math.cos(math.pi * min(s, p.steps) / p.steps)))
    gen = torch.Generator().manual_seed(p.seed)
    order: list[int] = []
    losses: list[float] = []
    every = max(1, p.steps // 8)
    log.info("text pretraining: %d steps of %d rows from %d rows (%d synthetic scenes, never rendered), lr %g",
             p.steps, p.batch_size, len(corpus), p.scenes, p.lr)
    thinker.train()
    for step in range(1, p.steps + 1):
        if len(order) < p.batch_size:
            order += torch.randperm(len(corpus), generator=gen).tolist()
        batch, order = [corpus[i] for i in order[: p.batch_size]], order[p.batch_size:]
        ids, labels, att = encode(tok, batch)
        loss = thinker(input_ids=ids, attention_mask=att, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % every == 0 or step == p.steps:
            recent = losses[-every:]
            check = step4_check(thinker, tok, held_out)
            msg = (f"[text] step {step}/{p.steps}: lm {sum(recent) / len(recent):.3f} | Step 4 check on held-out "
                   f"rows: {check} | {step * p.batch_size / (time.time() - t0):.0f} rows/s")
            log.info(msg)  # the console shows aurora's INFO lines (cli.setup_logging)
            if log_metrics:
                present, absent = check.shares()
                log_metrics({"lm": sum(recent) / len(recent), "check_present": present, "check_absent": absent}, step)
    if min(check.shares()) < LEARNT:
        log.warning("text pretraining ended without the Step 4 check (%s on held-out rows, < %.0f %% of a kind): "
                    "Step 4 of category / null answers will not follow Step 1; pretrain longer (text_pretrain.steps) "
                    "or from another corpus draw (text_pretrain.seed)", check, 100 * LEARNT)
    tenth = max(1, len(losses) // 10)
    state = {k: v.detach().contiguous() for k, v in thinker.state_dict().items() if not k.startswith(TOWER_PREFIXES)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"format": "aurora-tiny-llm", "steps": str(p.steps), "seed": str(p.seed)})
    tmp.replace(out)
    return TextPretrainResult(path=str(out), rows=len(corpus), steps=p.steps,
                              first_loss=sum(losses[:tenth]) / tenth, last_loss=sum(losses[-tenth:]) / tenth,
                              check=check, seconds=time.time() - t0)
