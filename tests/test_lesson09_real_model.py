"""Lesson 09's real-model cell: it skips without a checkpoint folder and, given one, prints a real
(here: tiny, random, written on the spot) Granite-MoE model's routing statistics. Nothing is downloaded."""

import re
from pathlib import Path

import numpy as np
import pytest

from minimoe import GPT, Config, hf
from minimoe.lessons.markup import parse_cells

LESSON = Path(__file__).resolve().parent.parent / "lessons" / "09_what_experts_learned.py"


def real_model_cell() -> str:
    (cell,) = [c.source for c in parse_cells(LESSON.read_text(encoding="utf-8")) if "MINIMOE_HF_MODEL" in c.source
               and c.kind == "code"]  # fmt: skip
    return cell


def run_cell(capsys) -> str:
    exec(compile(real_model_cell(), f"{LESSON.name} real-model cell", "exec"), {})
    return capsys.readouterr().out


def test_without_a_checkpoint_the_cell_says_so_and_skips(monkeypatch, capsys):
    monkeypatch.delenv("MINIMOE_HF_MODEL", raising=False)
    out = run_cell(capsys)
    assert "No local checkpoint" in out and "Skipped" in out and out.count("\n") == 1


def write_tiny_granite(path, tokenizers) -> Config:
    """A random 3-layer Granite-MoE folder (config.json, model.safetensors, tokenizer.json)."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from minimoe.data import builtin_corpus

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([builtin_corpus()[:20_000]], trainer)
    tok.save(str(path / "tokenizer.json"))
    c = Config(flavour="llama", vocab_size=tok.get_vocab_size(), block_size=256, n_layer=3, n_head=4,
               n_kv_head=2, n_embd=16, n_experts=8, top_k=2, expert_hidden=8, tie_embeddings=True,
               embedding_multiplier=2.0, attention_multiplier=0.2, residual_multiplier=0.5,
               logits_scaling=1.5, init_std=0.3)  # fmt: skip
    hf.save_pretrained(GPT(c, seed=0), str(path), model_type="granitemoe")
    return c


def test_with_a_checkpoint_the_cell_prints_its_routing(tmp_path, monkeypatch, capsys):
    tokenizers = pytest.importorskip(
        "tokenizers", reason="the optional tokenizers package reads tokenizer.json"
    )
    c = write_tiny_granite(tmp_path, tokenizers)
    monkeypatch.setenv("MINIMOE_HF_MODEL", str(tmp_path))
    out = run_cell(capsys)
    assert "3 MoE layers of 3, top-2 of 8 experts, 1024 tokens" in out, out
    rows = re.findall(r"^\s+(\d)\s+([\d.]+)\s+(\d+)\s+([\d.]+)%\s+([\d.]+)%$", out, re.M)
    assert [int(r[0]) for r in rows] == [0, 1, 2], out
    busiest = np.array([float(r[1]) for r in rows])
    assert ((busiest >= 1.0) & (busiest <= c.n_experts / c.top_k)).all()
    assert "chance" in out and "12.5%" in out and "46.4%" in out  # E = 8, K = 2 baselines
    table = out.split("\n\n", 1)[1].splitlines()
    assert table[0].split() == ["pos", "token", "layer", "0", "layer", "1", "layer", "2"]
    assert len(table) == 25  # a header and the first 24 tokens
