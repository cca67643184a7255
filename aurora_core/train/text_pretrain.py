"""The tiny default's language pretraining: what a real run gets from Qwen2.5-Omni's pretrained LLM.

A real run starts from a pretrained LLM that already reads and copies text; the tiny default's LLM
is random. Before any stage, it learns the language of the synthetic benchmark from text alone:
prompts and structured CoTs of synthetic scenes that are never rendered (a seeded stream apart from
the benchmark's clips, so no train, validation or test clip is read), next-token loss on the
answer, the towers and SAM untouched. Why: Step 4 of a category or null expression ("there is a /
no <class>") is right only when the model checks Step 3's class against the objects Step 1 lists.
A random 3-layer LLM learns that check in about 1,300 steps of 16 rows; SFT's 528 steps (with the
media in the context) were not enough, and its Step 4 then did not follow its own Step 1.

The weights go to one safetensors file (the thinker's ``model.*`` and ``lm_head.*``), which
``model.tiny.llm_weights`` loads over the seeded random init in every process that builds the
model. Runs in the calling process: ~1M parameters, text of ~80 tokens a row.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from aurora_core.config import AuroraConfig
from aurora_core.data import synthetic
from aurora_core.model.build import TOWER_PREFIXES, tiny_thinker  # the towers: not pretrained, not saved
from aurora_core.model.tokenizer import CHAT_END, CHAT_START
from aurora_core.reasoning import prompt_text

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class TextPretrainResult:
    path: str  # the safetensors file written
    rows: int  # corpus rows (expression + CoT pairs)
    steps: int  # optimizer steps
    first_loss: float  # mean next-token loss per answer token over the first 10 % of steps
    last_loss: float  # the same over the last 10 %
    seconds: float


def encode(tok, rows: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, labels (the answer and its end token; -100 elsewhere) and the attention mask.
    The prompt is the pipeline's chat prompt without the media placeholders."""
    seqs = []
    for exp, cot in rows:
        p = tok(f"{CHAT_START}user\n{prompt_text(exp)}{CHAT_END}\n{CHAT_START}assistant\n",
                add_special_tokens=False).input_ids
        a = tok(cot + CHAT_END, add_special_tokens=False).input_ids
        seqs.append((p + a, [-100] * len(p) + a))
    n = max(len(s) for s, _ in seqs)
    ids = torch.full((len(rows), n), tok.pad_token_id)
    labels = torch.full((len(rows), n), -100)
    att = torch.zeros((len(rows), n), dtype=torch.long)
    for i, (s, lab) in enumerate(seqs):
        ids[i, : len(s)], labels[i, : len(s)], att[i, : len(s)] = torch.tensor(s), torch.tensor(lab), 1
    return ids, labels, att


def pretrain(cfg: AuroraConfig, out: Path) -> TextPretrainResult:
    """Train the tiny thinker's language model on the synthetic CoT corpus; write ``out`` atomically."""
    from safetensors.torch import save_file

    from aurora_core.model.tokenizer import build_tiny_tokenizer

    p = cfg.text_pretrain  # the config refuses it for a real checkpoint (model.llm_path)
    t0 = time.time()
    corpus = synthetic.cot_corpus(p.scenes, p.seed, cfg.data)
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
            msg = (f"[text] step {step}/{p.steps}: lm {sum(recent) / len(recent):.3f} | "
                   f"{step * p.batch_size / (time.time() - t0):.0f} rows/s")
            log.info(msg)  # the console shows aurora's INFO lines (cli.setup_logging)
    tenth = max(1, len(losses) // 10)
    state = {k: v.detach().contiguous() for k, v in thinker.state_dict().items() if not k.startswith(TOWER_PREFIXES)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"format": "aurora-tiny-llm", "steps": str(p.steps), "seed": str(p.seed)})
    tmp.replace(out)
    return TextPretrainResult(path=str(out), rows=len(corpus), steps=p.steps,
                              first_loss=sum(losses[:tenth]) / tenth, last_loss=sum(losses[-tenth:]) / tenth,
                              seconds=time.time() - t0)
