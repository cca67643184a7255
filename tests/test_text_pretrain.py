"""The tiny LLM's text pretraining: its corpus, what it learns, and every model built from its file."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from aurora_core.config import ConfigError, load_config
from aurora_core.data import synthetic
from aurora_core.model.build import build_model
from aurora_core.model.tokenizer import build_tiny_tokenizer
from aurora_core.train import text_pretrain
from conftest import ROOT


def tiny(*extra: str):
    return load_config(ROOT / "configs" / "tiny.yaml", list(extra))


def test_corpus_is_seeded_and_draws_no_benchmark_scene():
    data = tiny().data
    a, b = synthetic.cot_corpus(24, 1, data), synthetic.cot_corpus(24, 1, data)
    assert a == b and a != synthetic.cot_corpus(24, 2, data)
    kinds = {cot.split("Step 4: ")[1].split()[0] for _, cot in a}
    assert {"There", "The"} <= kinds  # category / null checks and the other kinds' sentences
    assert any("There is no" in cot for _, cot in a) and any("There is a" in cot for _, cot in a)
    # the benchmark's train clips at the same seed are other scenes: their Step 1s, in order, differ
    syn = data.synthetic
    bench = []
    for idx in range(24):
        rng = synthetic._clip_rng(1, "train", idx)
        cats = synthetic._pick_categories("train", int(rng.integers(syn.min_objects, syn.max_objects + 1)), rng)
        bench.append(synthetic._describe_frames(synthetic.make_scene(cats, data.num_frames, syn.image_size, rng)))
    corpus_step1 = list(dict.fromkeys(cot.split(" Step 2:")[0] for _, cot in a))
    assert [s.removeprefix("Step 1: ") for s in corpus_step1][:10] != [s + "." for s in bench][:10]


def test_pretraining_lowers_the_loss_and_every_fresh_model_starts_from_it(tmp_path):
    cfg = tiny("text_pretrain.steps=30", "text_pretrain.scenes=64", "text_pretrain.check_scenes=16")
    out = tmp_path / "base" / "llm.safetensors"
    logged: list[tuple[dict, int]] = []
    r = text_pretrain.pretrain(cfg, out, lambda values, step: logged.append((values, step)))
    assert r.steps == 30 and r.rows > 64 and r.last_loss < r.first_loss - 1.0, r
    # the check measured on the held-out scenes' category and null rows at every log line
    assert r.check.present > 0 and r.check.absent > 0 and [s for _, s in logged][-1] == 30
    assert set(logged[0][0]) == {"lm", "check_present", "check_absent"}
    saved = load_file(str(out))
    assert saved and not any(k.startswith(text_pretrain.TOWER_PREFIXES) for k in saved)

    random_model, _ = build_model(cfg.model, cfg.data)
    cfg.model.tiny.llm_weights = str(out)
    model, _ = build_model(cfg.model, cfg.data)
    state, rand = model.thinker.state_dict(), random_model.thinker.state_dict()
    assert set(saved) == {k for k in state if not k.startswith(text_pretrain.TOWER_PREFIXES)}
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert not torch.equal(state["lm_head.weight"], rand["lm_head.weight"])
    # the frozen towers keep the seeded random init (the frozen-feature cache stays valid)
    assert all(torch.equal(v, rand[k]) for k, v in state.items() if k.startswith(text_pretrain.TOWER_PREFIXES))


def test_weights_that_do_not_fit_fail_naming_the_file(tmp_path):
    cfg = tiny()
    missing = tmp_path / "nowhere.safetensors"
    cfg.model.tiny.llm_weights = str(missing)
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors.*text_pretrain.steps"):
        build_model(cfg.model, cfg.data)

    other = tiny("text_pretrain.steps=1", "text_pretrain.scenes=4", "model.tiny.hidden_size=64",
                 "model.tiny.intermediate_size=128", "model.tiny.mrope_section=[2,3,3]")  # a half head of 8
    narrow = tmp_path / "narrow.safetensors"
    text_pretrain.pretrain(other, narrow)
    cfg.model.tiny.llm_weights = str(narrow)
    with pytest.raises(ValueError, match="narrow.safetensors does not fit.*other shape"):
        build_model(cfg.model, cfg.data)

    part = tmp_path / "part.safetensors"
    sd = load_file(str(narrow))
    save_file({k: torch.zeros(1) for k in list(sd)[:3]}, str(part))
    cfg.model.tiny.llm_weights = str(part)
    with pytest.raises(ValueError, match="missing"):
        build_model(cfg.model, cfg.data)


def test_a_real_checkpoint_is_not_text_pretrained(tmp_path):
    with pytest.raises(ConfigError, match="text_pretrain.steps=0"):
        load_config(ROOT / "configs" / "qwen2.5-omni-7b.yaml",
                    [f"model.llm_path={tmp_path}", f"model.sam_path={tmp_path}", "text_pretrain.steps=10"])
    assert load_config(ROOT / "configs" / "qwen2.5-omni-7b.yaml",
                       [f"model.llm_path={tmp_path}", f"model.sam_path={tmp_path}"]).text_pretrain.steps == 0


class _ReadsStep1(torch.nn.Module):
    """An oracle LM for the check's bookkeeping: at a row's last token it prefers "no" exactly when the
    class the expression asks for ("the <class>") is not in the text's Step 1 (``blind``: always "a");
    at every other position (padding too) it prefers the other answer."""

    def __init__(self, tok, blind: bool = False):
        super().__init__()
        self.tok, self.blind = tok, blind
        self.a, self.no = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("no")

    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, len(self.tok))
        for i, (ids, att) in enumerate(zip(input_ids, attention_mask)):
            text = self.tok.decode(ids[: int(att.sum())])  # lower case, punctuation apart: "step 1 : in ..."
            asked = text.split("step 3 : the reference asks for the ")[1].split()[0]
            absent = asked not in text.split("step 1 :")[1].split("step 2 :")[0].split() and not self.blind
            n = int(att.sum())  # the decision at the row's last token; every other position says the opposite
            logits[i, :, self.a if absent else self.no] = 1.0
            logits[i, n - 1] = 0.0
            logits[i, n - 1, self.no if absent else self.a] = 1.0
        return type("Out", (), {"logits": logits})


def test_the_step4_check_counts_each_kind_of_row():
    data, tok = tiny().data, build_tiny_tokenizer()
    rows = synthetic.cot_corpus(40, 3, data)
    present = sum("Step 4: There is a " in cot for _, cot in rows)
    absent = sum("Step 4: There is no " in cot for _, cot in rows)
    assert present and absent and present + absent < len(rows)  # position, sound ... rows have no such step
    for batch_size in (1, 7, 64):  # right padding: the decision is read at each row's own last token
        c = text_pretrain.step4_check(_ReadsStep1(tok), tok, rows, batch_size=batch_size)
        assert (c.present_right, c.present, c.absent_right, c.absent) == (present, present, absent, absent)
    blind = text_pretrain.step4_check(_ReadsStep1(tok, blind=True), tok, rows)
    assert (blind.present_right, blind.absent_right) == (present, 0) and blind.shares() == (1.0, 0.0)
