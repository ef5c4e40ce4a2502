"""From language model to assistant (#18): the chat format and its loss mask, dialogue data and its
errors, fine-tuning from a base checkpoint (--init-from) with the loss on the assistant's tokens
only, and `minimoe chat` (KV cache across turns, trimming by whole exchanges, stdin driven)."""

import hashlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import DEVICE, GRAD_TOL, asarray, tiny_model, to_numpy

from minimoe import GPT, Config, checkpoint, cli
from minimoe import train as train_module
from minimoe.chat import ChatError, Conversation, run_chat
from minimoe.chat_data import (
    MaskedTokens,
    chat_builtin,
    eval_questions,
    load_chat_data,
    masked_targets,
    read_jsonl,
    split_of,
    topic_pairs,
)
from minimoe.errors import DataError, OptionError
from minimoe.finetune import extend_vocab
from minimoe.gradcheck import check_model, numerical_gradient, rel_error
from minimoe.ops.loss import cross_entropy_backward, cross_entropy_forward
from minimoe.tokenizer import (
    ASSISTANT,
    CHAT_SPECIALS,
    END,
    USER,
    BPETokenizer,
    CharTokenizer,
    tokenizer_from_dict,
)

ROOT = Path(__file__).resolve().parents[1]
CONV = [
    {"role": "user", "content": "ab"},
    {"role": "assistant", "content": "ba"},
    {"role": "user", "content": "c"},
    {"role": "assistant", "content": "cc"},
]


def chat_tokenizer():
    return CharTokenizer.from_text("abc xyz?0123456789").with_specials()


def check_targets(tok, xb, yb):
    """Every row starts a conversation, and y[t] is counted (not -1) exactly when token t+1 is the
    assistant's (its content or its <|end|>), i.e. while the assistant is speaking at t:
    speaking_t = (speaking_t-1 or x_t = <|assistant|>) and x_t != <|end|>; then y[t] = x[t+1]."""
    user, end, assistant = (tok.special_id(s) for s in (USER, END, ASSISTANT))
    counted = 0
    for row_x, row_y in zip(xb, yb):
        assert row_x[0] == user, tok.decode(row_x)
        speaking = False
        for t in range(len(row_x)):
            speaking = (speaking or row_x[t] == assistant) and row_x[t] != end
            assert (row_y[t] != -1) == speaking, (t, tok.decode(row_x))
            assert t + 1 == len(row_x) or row_y[t] in (-1, row_x[t + 1])
            counted += speaking
    assert counted > 0


# ------------------------------------------------------------------------------ the chat format
@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_encode_chat_masks_the_assistant_tokens_and_their_end_only(kind):
    base = CharTokenizer.from_text("abc") if kind == "char" else BPETokenizer.train("ab ba abc " * 20, 262)
    tok = base.with_specials()
    V = base.vocab_size
    assert tok.vocab_size == V + 3 and [tok.special_id(s) for s in CHAT_SPECIALS] == [V, V + 1, V + 2]
    assert tok.encode("abc") == base.encode("abc")  # every existing id keeps its meaning
    ids, mask = tok.encode_chat(CONV)
    u, a, e = (tok.special_id(s) for s in (USER, ASSISTANT, END))
    expect_ids = [
        u,
        *tok.encode("ab"),
        e,
        a,
        *tok.encode("ba"),
        e,
        u,
        *tok.encode("c"),
        e,
        a,
        *tok.encode("cc"),
        e,
    ]
    assert ids == expect_ids
    # mask 1 exactly on an assistant's content and its <|end|>; never on <|assistant|> or the user's turn
    n_ba, n_cc = len(tok.encode("ba")), len(tok.encode("cc"))
    n_ab, n_c = len(tok.encode("ab")), len(tok.encode("c"))
    expect = [0] * (n_ab + 3) + [1] * (n_ba + 1) + [0] * (n_c + 3) + [1] * (n_cc + 1)
    assert mask == expect
    assert tok.decode(ids) == "<|user|>ab<|end|><|assistant|>ba<|end|><|user|>c<|end|><|assistant|>cc<|end|>"
    ids2, mask2 = tok.encode_chat(CONV[:1], add_generation_prompt=True)
    assert ids2[-1] == a and mask2 == [0] * len(ids2)
    # the specials are saved with the tokenizer and come back with the same ids
    again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again.specials == list(CHAT_SPECIALS) and again.encode_chat(CONV) == (ids, mask)
    assert "specials" not in base.to_dict()  # a tokenizer without specials saves as before


def test_text_never_becomes_a_special_token_and_bad_conversations_are_refused():
    tok = CharTokenizer.from_text("<|>usera ").with_specials()
    ids = tok.encode("<|user|>")
    assert len(ids) == 8 and max(ids) < tok.base_vocab_size  # typed text cannot forge a turn
    with pytest.raises(ValueError, match="no chat tokens"):
        CharTokenizer.from_text("ab").encode_chat(CONV)
    for bad, match in [([], "non-empty list"), ([{"role": "bot", "content": "a"}], "message 1 has role 'bot'"),
                       ([{"role": "user", "content": 3}], "must be a string"), (["hi"], "message 1 must be")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            tok.encode_chat(bad)
    assert tok.with_specials().specials == list(CHAT_SPECIALS)  # adding them twice adds nothing


def test_checkpoint_keeps_the_tokenizer_specials(tmp_path):
    tok = chat_tokenizer()
    model = GPT(Config(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=8, ffn_hidden=8))
    checkpoint.save_checkpoint(tmp_path, model, tokenizer=tok)
    again = checkpoint.load_tokenizer(checkpoint.load_checkpoint(tmp_path))
    assert again.has_chat_format and again.encode_chat(CONV) == tok.encode_chat(CONV)


# ------------------------------------------------------------------------------ the data
def test_chat_builtin_is_deterministic_correct_and_its_split_held_out():
    train, val = chat_builtin("train", 400), chat_builtin("val", 100)
    assert train == chat_builtin("train", 400) and train != chat_builtin("train", 400, seed=1)
    assert len(train) == 400 and len(val) == 100
    assert any(len(c) >= 4 for c in train)  # multi-turn follow-ups
    for conv in train + val:
        assert [m["role"] for m in conv] == ["user", "assistant"] * (len(conv) // 2)
    questions = eval_questions(90)
    assert {t for t, _, _ in questions} == {"arith", "copy", "reverse"}
    for task, q, a in questions:
        words = re.sub(r"[.?+:]", " ", q).split()
        if task == "arith":
            x, y = (int(n) for n in words if n.isdigit())
            assert int(a) == x + y
        else:
            assert (a if task == "copy" else a[::-1]) in words
    # a held-out question is never trained on: its operands (the synthetic line) are in the val split
    trained = {c[0]["content"] for c in chat_builtin("train")}
    assert not trained & {q for _, q, _ in questions}
    assert len(topic_pairs()) > 20 and {split_of(t) for t, _ in topic_pairs()} == {"train", "val"}


def _write(tmp_path, lines, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps({"messages": CONV})


@pytest.mark.parametrize("bad,match", [
    ("{not json", "line 2 is not valid JSON"),
    ('{"msgs": []}', 'line 2 must be an object {"messages": [...]}'),
    ('{"messages": [{"role": "system", "content": "x"}]}', "line 2: message 1 has role 'system'; valid roles"),
    ('{"messages": [{"role": "user"}]}', 'line 2: message 1 must be an object with "role" and "content"'),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "line 2 has no assistant message"),
])  # fmt: skip
def test_jsonl_errors_name_the_line(tmp_path, bad, match, capsys):
    path = _write(tmp_path, [GOOD, bad, GOOD])
    with pytest.raises(DataError, match=re.escape(match)):
        read_jsonl(path)
    rc = cli.main(["train", "--data", str(path), "--out", str(tmp_path / "o"), "--max-iters", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "line 2" in err


def test_jsonl_loads_into_masked_streams(tmp_path):
    path = _write(tmp_path, [GOOD, "", GOOD, json.dumps({"messages": CONV[:2]})])
    tok, train, val = load_chat_data(str(path), kind="char")
    assert tok.has_chat_format and len(train.starts) == 2 and len(val.starts) == 1
    with pytest.raises(DataError, match="at least 2"):
        read_jsonl(_write(tmp_path, [GOOD], "one.jsonl"))
    with pytest.raises(DataError, match="no chat tokens"):
        load_chat_data(str(path), tokenizer=CharTokenizer.from_text("abc"))


def test_masked_batches_start_at_a_conversation_and_learn_only_assistant_tokens():
    tok = chat_tokenizer()
    convs = [CONV, CONV[:2], [{"role": "user", "content": "xyz"}, {"role": "assistant", "content": "zyx"}]]
    stream = MaskedTokens.from_conversations(tok, convs)
    x, y = stream.get_batch(64, 12, np.random.default_rng(0))
    assert x.shape == y.shape == (64, 12) and x.dtype == y.dtype == np.int64
    check_targets(tok, x, y)  # also over the padding past the end of the stream (targets -1)
    assert (x[:, 0] == tok.special_id(USER)).all() and {tok.decode([o]) for o in x[:, 1]} == {"a", "x"}
    # the whole stream through masked_targets: the targets are the next tokens where mask is 1
    xs, ys = masked_targets(stream.ids, stream.mask)
    assert (ys[stream.mask[1:] == 1] == stream.ids[1:][stream.mask[1:] == 1]).all()
    assert (ys[stream.mask[1:] == 0] == -1).all() and len(stream.counted()) == stream.mask.sum()


# ------------------------------------------------------------------------------ the masked loss
def test_masked_positions_contribute_nothing_float64_gradient_check():
    rng = np.random.default_rng(0)
    model = tiny_model("llama", vocab_size=11, n_experts=4, top_k=2, expert_hidden=6)
    ids = rng.integers(0, 11, (2, 9))
    mask = (rng.random((2, 9)) < 0.5).astype(int)
    mask[:, 1] = 1
    x, y = masked_targets(ids, mask)
    assert (y == -1).any() and (y != -1).any()
    # the whole model's gradient of the masked loss is right (float64 central differences)
    errors = check_model(model, x, y, max_entries=30)
    assert max(errors.values()) < GRAD_TOL, errors
    # the loss is the mean NLL over the unmasked positions only
    logits, _ = model.eval().forward(x)
    loss, cache = cross_entropy_forward(logits, asarray(y))
    dlogits = to_numpy(cross_entropy_backward(1.0, cache))
    z = logits.copy()
    _, num = numerical_gradient(lambda: float(cross_entropy_forward(z, asarray(y))[0]), z)
    logits = to_numpy(logits)  # the reference, on the host
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    keep = y != -1
    nll = -logp[keep, y[keep]]
    assert abs(float(loss) - nll.mean()) < 1e-12
    # d loss / d logits is exactly 0 at masked positions, analytically and numerically
    assert (dlogits[~keep] == 0).all() and np.abs(dlogits[keep]).sum() > 0
    assert np.abs(num.reshape(z.shape)[~keep]).max() == 0.0
    assert rel_error(dlogits, num.reshape(z.shape)) < GRAD_TOL


@pytest.mark.parametrize("flavour,tie", [("gpt2", True), ("llama", False)])
def test_extend_vocab_keeps_the_base_and_adds_mean_rows(flavour, tie):
    model = tiny_model(flavour, tie_embeddings=tie)
    before = {k: v.copy() for k, v in model.params.items()}
    big = extend_vocab(model, 14, seed=3)
    assert big.config.vocab_size == 14 and model.config.vocab_size == 11
    assert all((model.params[k] == before[k]).all() for k in before)  # the base is untouched
    assert (big.params["wte"][:11] == before["wte"]).all()
    new = to_numpy(big.params["wte"][11:])
    assert abs(new.mean(0) - to_numpy(before["wte"]).mean(0)).max() < 3 * model.config.init_std
    assert len({tuple(r) for r in new}) == 3  # distinguishable
    if not tie:
        assert (big.params["lm_head"][:, :11] == before["lm_head"]).all() and big.params["lm_head"].shape[
            1
        ] == 14
    ids = np.array([[1, 2, 3, 4]])
    assert np.allclose(
        to_numpy(big.forward(ids)[0][..., :11]), to_numpy(model.forward(ids)[0])
    )  # same logits on old ids


# ------------------------------------------------------------------------------ fine-tuning
TINY = dict(preset="mixtral", n_layer=1, n_embd=32, n_head=2, n_experts=4, top_k=2, block_size=32,
            batch_size=4, eval_iters=2, sample_tokens=0, log_interval=1, lr=1e-2, warmup_iters=1,
            device=DEVICE)  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    train_module.train(dict(TINY, data="builtin", out=str(out), max_iters=3, eval_interval=3), quiet=True)
    return out


@pytest.fixture(scope="module")
def finetuned(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("chat")
    digest = hashlib.sha256((base / "ckpt.npz").read_bytes()).hexdigest()
    batches = []
    real_step = train_module.train_step

    def spy(model, optimizer, xb, yb, *args, **kwargs):
        batches.append((xb.copy(), yb.copy()))
        return real_step(model, optimizer, xb, yb, *args, **kwargs)

    train_module.train_step = spy
    try:
        summary = train_module.train(
            dict(init_from=str(base), data="chat-builtin", out=str(out), max_iters=4, eval_interval=2,
                 batch_size=4, eval_iters=2, sample_tokens=0), quiet=True)  # fmt: skip
    finally:
        train_module.train_step = real_step
    return out, summary, batches, digest


def test_finetune_starts_from_the_base_and_never_touches_it(base, finetuned):
    out, summary, batches, digest = finetuned
    assert hashlib.sha256((base / "ckpt.npz").read_bytes()).hexdigest() == digest
    b, f = checkpoint.load_checkpoint(base), checkpoint.load_checkpoint(out)
    assert f.config.vocab_size == b.config.vocab_size + 3 and f.train_state["iteration"] == 4
    assert f.train_state["options"]["preset"] == "mixtral" and f.train_state["options"]["n_layer"] == 1
    tok = checkpoint.load_tokenizer(f)
    assert tok.has_chat_format and tok.chars == checkpoint.load_tokenizer(b).chars
    assert summary["val_loss"] > 0
    # the weights start from the base's (4 warmup steps at lr <= 4e-5 barely move them), which
    # 3 steps at lr 1e-2 moved well away from a fresh initialisation
    fresh = GPT(b.config, seed=0).params
    for key in ("blocks.0.attn.wqkv", "blocks.0.moe.experts.w1"):
        assert np.abs(f.params[key] - b.params[key]).max() < 2e-3 < np.abs(b.params[key] - fresh[key]).max()
    assert np.abs(f.params["wte"][: b.config.vocab_size] - b.params["wte"]).max() < 2e-3
    # every batch: targets on the assistant's tokens (and their <|end|>), -1 everywhere else
    assert len(batches) == 4
    for xb, yb in batches:
        check_targets(tok, xb, yb)


def test_finetune_refuses_to_overwrite_the_base_or_change_its_model(base, tmp_path):
    with pytest.raises(OptionError, match="would overwrite it"):
        train_module.train(dict(init_from=str(base), data="chat-builtin", out=str(base)), quiet=True)
    with pytest.raises(OptionError, match="--n-layer cannot be combined with --init-from"):
        train_module.train(
            dict(init_from=str(base), data="chat-builtin", out=str(tmp_path), n_layer=2), quiet=True
        )
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint exists"):
        train_module.train(
            dict(init_from=str(tmp_path / "nope"), data="chat-builtin", out=str(tmp_path)), quiet=True
        )


# ------------------------------------------------------------------------------ minimoe chat
MLA = dict(
    attention="mla", q_lora_rank=6, kv_lora_rank=5, qk_nope_head_dim=3, qk_rope_head_dim=4, v_head_dim=2
)


def chat_model(block_size=24, seed=0, **overrides):
    tok = chat_tokenizer()
    kw = dict(flavour="llama", vocab_size=tok.vocab_size, block_size=block_size, n_layer=2, n_head=2,
              n_embd=16, n_experts=4, top_k=2, expert_hidden=8, init_std=0.3)  # fmt: skip
    return GPT(Config(**{**kw, **overrides}), seed=seed, dtype="float64"), tok


@pytest.mark.parametrize("attention", ["mha", "mla"])
def test_kv_cache_across_turns_gives_the_replies_of_recomputation(attention):
    model, tok = chat_model(**(MLA if attention == "mla" else {}))
    cached, full = Conversation(model, tok), Conversation(model, tok, use_cache=False)
    messages = ["ab", "c 12", "xyz?", "0", "abc abc", "9"]
    for k, text in enumerate(messages):
        for conv in (cached, full):
            conv.reply(
                text, max_new_tokens=5, temperature=0.0 if k % 2 else 0.9, rng=np.random.default_rng(k)
            )
        assert cached.context == full.context and cached.dropped == full.dropped
    assert cached.fed <= len(cached.context) <= model.config.block_size + 1
    assert type(cached.cache).__name__ == ("LatentKVCache" if attention == "mla" else "KVCache")


def test_each_turn_feeds_only_the_new_tokens_and_trims_whole_exchanges():
    model, tok = chat_model(block_size=24)
    conv = Conversation(model, tok, reply_room=4)
    fed = []
    forward = model.forward

    def spy(idx, targets=None, kv_cache=None):
        fed.append(idx.shape[1])
        return forward(idx, targets, kv_cache)

    model.forward = spy
    user = tok.special_id(USER)
    reply = conv.reply("ab", max_new_tokens=3, temperature=0.0)
    # prefill <|user|> a b <|end|> <|assistant|>, then one token per forward
    assert fed[0] == 5 and set(fed[1:]) <= {1} and len(fed) in (len(reply), len(reply) + 1)
    drops = []
    for text in ["c", "xyz", "0123", "ab", "9"]:
        fed.clear()
        kept, cached = list(conv.exchanges), conv.fed
        conv.reply(text, max_new_tokens=3, temperature=0.0)
        new_turn = len(text) + 3
        if conv.dropped == 0:  # only what the cache lacks: the last reply's unfed tail, the new turn
            assert conv.exchanges[:-1] == kept and fed[0] == sum(map(len, kept)) - cached + new_turn
            assert sum(map(len, kept)) - cached in (1, 2)
        else:  # the oldest whole exchanges went; the cache is refilled with all that is kept
            assert conv.exchanges[:-1] == kept[conv.dropped :]
            assert fed[0] == sum(map(len, conv.exchanges[:-1])) + new_turn
        assert set(fed[1:]) <= {1} and conv.context[0] == user and len(conv.context) <= 24 + 1
        drops.append(conv.dropped)
    assert sum(drops) >= 2 and drops[0] == 0
    assert sum(1 for t in conv.context if t == user) == len(conv.exchanges) >= 1
    with pytest.raises(ChatError, match="send a shorter message"):
        conv.reply("a" * 30)


def test_a_reply_never_contains_a_turn_marker():
    model, tok = chat_model()
    markers = [tok.special_id(USER), tok.special_id(ASSISTANT)]
    forward = model.forward

    def biased(idx, targets=None, kv_cache=None):  # a model that would rather open a new turn
        logits, loss = forward(idx, targets, kv_cache)
        logits[..., markers] += 50.0
        return logits, loss

    model.forward = biased
    for temperature in (0.0, 1.0):
        reply = Conversation(model, tok).reply("ab", max_new_tokens=6, temperature=temperature)
        assert reply and not set(reply) & set(markers)


def test_run_chat_commands_and_notes():
    model, tok = chat_model()
    stdin = io.StringIO("ab\n/temperature 0\n\nxy\n/temperature hot\n/reset\n/bogus\n/help\nzz\n")
    out, err = io.StringIO(), io.StringIO()
    assert (
        run_chat(model, tok, stdin, out, err, temperature=0.5, max_new_tokens=4, seed=0, interactive=False)
        == 0
    )
    replies = out.getvalue().split("\n")
    assert len(replies) == 4 and replies[-1] == ""  # one line per message
    notes = err.getvalue()
    assert "(temperature 0)" in notes and "it stays 0" in notes and "forgotten" in notes
    assert "unknown command '/bogus'" in notes and notes.count("/reset forgets") == 2
    with pytest.raises(ChatError, match="no chat tokens"):
        Conversation(model, CharTokenizer.from_text("abc"))


def test_run_chat_at_a_terminal_prompts_streams_and_keeps_history(monkeypatch, tmp_path):
    model, tok = chat_model()
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path))
    typed = iter(["ab", "/quit", "never read"])
    prompts = []

    def fake_input(prompt):
        prompts.append(prompt)
        return next(typed)

    monkeypatch.setattr("builtins.input", fake_input)
    out, err = io.StringIO(), io.StringIO()
    assert run_chat(model, tok, io.StringIO(), out, err, max_new_tokens=3, seed=0, interactive=True) == 0
    assert prompts == ["you> ", "you> "] and out.getvalue().startswith("minimoe> ")
    assert "chatting with" in err.getvalue() and "/reset" in err.getvalue()
    try:
        import readline  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "chat_history").is_file()


def run_module(*argv, stdin=""):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "minimoe", *map(str, argv)], input=stdin, capture_output=True,
                          text=True, env=env, timeout=120, cwd=ROOT)  # fmt: skip


def test_minimoe_chat_through_stdin(finetuned, base):
    out = finetuned[0]
    msgs = "What is 2 plus 3?\n/temperature 0\nReverse the word abc.\n/reset\nHi\n"
    a = run_module("chat", "--ckpt", out, "--max-new-tokens", 8, "--seed", 1, stdin=msgs)
    assert a.returncode == 0, a.stderr
    assert len(a.stdout.split("\n")) == 4 and "Traceback" not in a.stderr
    assert "(temperature 0)" in a.stderr and "forgotten" in a.stderr
    greedy = ["chat", "--ckpt", out, "--max-new-tokens", 8, "--temperature", 0]
    b = run_module(*greedy, stdin="Say abc.\nNow reverse it.\n")
    assert (
        b.returncode == 0
        and b.stdout == run_module(*greedy, "--no-cache", stdin="Say abc.\nNow reverse it.\n").stdout
    )
    for bad in (["--temperature", -1], ["--max-new-tokens", 0], ["--top-k", 0], ["--bogus"]):
        r = run_module("chat", "--ckpt", out, *bad)
        assert (
            r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
        )
    r = run_module("chat", "--ckpt", base, stdin="hi\n")
    assert r.returncode == 2 and "no chat tokens" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_train_on_chat_builtin_from_scratch_builds_a_chat_tokenizer(tmp_path):
    summary = train_module.train(dict(TINY, data="chat-builtin", out=str(tmp_path), max_iters=2, eval_interval=2),
                                 quiet=True)  # fmt: skip
    tok = checkpoint.load_tokenizer(checkpoint.load_checkpoint(tmp_path))
    assert tok.has_chat_format and summary["iterations"] == 2 and summary["val_loss"] > 0
