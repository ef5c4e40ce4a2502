"""Dialogues for supervised fine-tuning, and the token stream that trains on the assistant's turns only.

    --data chat-builtin     conversations generated here, deterministic, nothing downloaded
    --data FILE.jsonl       one conversation per line: {"messages": [{"role": "user", "content": "..."},
                            {"role": "assistant", "content": "..."}, ...]}  (roles: user, assistant)

chat-builtin mixes (weights in KINDS):
  * requests: the tasks of `--data synthetic` (minimoe.synthetic makes the operands and the
    answers) phrased as questions: "What is 37 plus 45?" -> "82", "Reverse the word abcd." -> "dcba";
  * questions about Python from the builtin corpus: a section's title -> its first sentence;
  * multi-turn follow-ups that need the earlier turns: "Add 5 to that.", "Now reverse it.";
  * a little small talk ("Hello!" -> "Hello! How can I help?").
The held-out split is disjoint by construction: a task example (its synthetic line) or a section
title belongs to the validation split when the CRC-32 of its text is 0 mod 10, so no held-out
question is ever trained on, in any phrasing.

Training data is a `MaskedTokens` stream: the conversations' tokens one after another, a loss mask
(1 on the assistant's tokens, see tokenizer.encode_chat) and the offsets where conversations start.
A training window always starts at a conversation's beginning (as a chat does) and runs on into
the next conversations; past the end of the stream it is padded with targets -1. The targets are
the next tokens, -1 where the next token is not the assistant's: the cross-entropy skips them, so
only the assistant's turns are learned (the masked loss).
"""

from __future__ import annotations

import functools
import json
import re
import zlib
from dataclasses import dataclass

import numpy as np

from minimoe.data import MAX_DATA_BYTES, DataError, read_text_file
from minimoe.synthetic import synthetic_examples
from minimoe.tokenizer import BPETokenizer, CharTokenizer, check_messages

CHAT_BUILTIN = "chat-builtin"
N_TRAIN, N_VAL = 6000, 500  # chat-builtin conversations per split

ARITH = ("What is {a} plus {b}?", "What is {a}+{b}?", "Add {a} and {b}.", "Compute {a} + {b}.",
         "How much is {a} plus {b}?")  # fmt: skip
COPY = ("Repeat the word {w}.", "Say {w}.", "Copy this: {w}", "Please repeat: {w}")
REVERSE = ("Reverse the word {w}.", "Spell {w} backwards.", "What is {w} reversed?", "Reverse this: {w}")
TOPIC = ("Tell me about {t}.", "What is {t}?", "Explain {t}.", "What does the reference say about {t}?")
FOLLOW_ARITH = ("And plus {c}?", "Add {c} to that.", "Now add {c}.")  # answer: previous + c
FOLLOW_WORD = (("Now reverse it.", -1), ("Reverse that.", -1), ("Say it again.", 1), ("Once more.", 1))
SMALL_TALK = (("Hello!", "Hello! How can I help?"), ("Hi", "Hi! Ask me a question."),
              ("Thank you!", "You are welcome."), ("Who are you?", "I am minimoe, a tiny model."),
              ("What can you do?", "I add numbers and copy or reverse words."))  # fmt: skip
KINDS = {"arith": 0.3, "copy": 0.13, "reverse": 0.13, "topic": 0.14, "follow-up": 0.25, "small-talk": 0.05}
EVAL_TASKS = ("arith", "copy", "reverse")


def is_chat_data(spec) -> bool:
    """Whether --data names dialogues (chat-builtin or a .jsonl file) rather than plain text."""
    return spec == CHAT_BUILTIN or str(spec).lower().endswith(".jsonl")


def split_of(key: str) -> str:
    """'val' for one key in ten (CRC-32 = 0 mod 10), else 'train': fixed by the text alone."""
    return "val" if zlib.crc32(key.encode("utf-8")) % 10 == 0 else "train"


# ------------------------------------------------------------------------------ the generators
@functools.lru_cache(maxsize=1)
def topic_pairs(max_chars: int = 90) -> tuple:
    """(title, first sentence) of the builtin corpus's sections (a title is a line underlined with
    * = or -), keeping sentences of 4+ words and at most max_chars characters, one per title."""
    try:
        from pydoc_data.topics import topics  # what data.builtin_corpus is made of
    except ImportError:  # some minimal Python builds strip pydoc_data
        raise DataError(
            "this Python installation lacks the pydoc_data module that chat-builtin's questions about "
            "Python come from; use --data FILE.jsonl instead"
        ) from None

    pairs = {}
    for key in sorted(topics):
        lines = topics[key].split("\n")
        for i in range(len(lines) - 2):
            title, rule = lines[i].strip(), lines[i + 1]
            if not title or lines[i][0] == " " or len(rule) != len(lines[i]) or not set(rule) <= set("*=-"):
                continue
            para = []
            for line in lines[i + 2 :]:
                if line.strip() and not line.startswith(" "):
                    para.append(line.strip())
                elif para:
                    break
            if not para or para[0].startswith(("New in", "Changed in", "Deprecated")):
                continue
            m = re.match(r"(.+?[.:])(\s|$)", " ".join(para))
            sentence = (m.group(1) if m else " ".join(para)).rstrip(":")
            sentence = sentence if sentence.endswith(".") else sentence + "."
            ok = len(sentence.split()) >= 4 and len(sentence) <= max_chars and not sentence.startswith("*")
            if ok and title not in pairs:
                pairs[title] = sentence
    return tuple(pairs.items())


def _request(task: str, line: str, rng) -> tuple[str, str]:
    """A synthetic line ("add 37+45=82", "copy abcd|abcd", "rev abcd|dcba") -> (question, answer)."""
    body = line.split(" ", 1)[1]
    if task == "arith":
        a, rest = body.split("+")
        b, answer = rest.split("=")
        return ARITH[rng.integers(len(ARITH))].format(a=a, b=b), answer
    word, answer = body.split("|")
    phrases = COPY if task == "copy" else REVERSE
    return phrases[rng.integers(len(phrases))].format(w=word), answer


def _turns(*pairs) -> list[dict]:
    return [
        m for q, a in pairs for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})
    ]


class _Pools:
    """The synthetic task lines of one split, by task, handed out in order (cycling)."""

    def __init__(self, split: str, n: int, seed: int):
        # at most one line per conversation is needed, and the val split keeps one line in ten
        lines = synthetic_examples(int(1.3 * n * (1 if split == "train" else 10)) + 300, seed, EVAL_TASKS)
        self.lines = {t: [x for k, x in lines if k == t and split_of(x) == split] for t in EVAL_TASKS}
        self.at = dict.fromkeys(EVAL_TASKS, 0)

    def next(self, task: str) -> str:
        lines, i = self.lines[task], self.at[task]
        self.at[task] = i + 1
        return lines[i % len(lines)]


def _conversation(kind: str, rng, pools: _Pools, topics: tuple) -> list[dict]:
    if kind in EVAL_TASKS:
        return _turns(_request(kind, pools.next(kind), rng))
    if kind == "topic":
        title, sentence = topics[rng.integers(len(topics))]
        t = title[0].lower() + title[1:] if title.startswith("The ") else title
        return _turns((TOPIC[rng.integers(len(TOPIC))].format(t=t), sentence))
    if kind == "small-talk":
        return _turns(SMALL_TALK[rng.integers(len(SMALL_TALK))])
    # follow-up: a request, then one or two follow-ups that need the previous answer
    task = EVAL_TASKS[rng.integers(3)]
    pairs = [_request(task, pools.next(task), rng)]
    for _ in range(1 + rng.integers(2)):
        last = pairs[-1][1]
        if task == "arith":
            c = int(rng.integers(1, 10))
            pairs.append((FOLLOW_ARITH[rng.integers(len(FOLLOW_ARITH))].format(c=c), str(int(last) + c)))
        else:
            q, step = FOLLOW_WORD[rng.integers(len(FOLLOW_WORD))]
            pairs.append((q, last[::step]))
    return _turns(*pairs)


def chat_builtin(split: str = "train", n: int | None = None, seed: int = 0) -> list[list[dict]]:
    """n conversations (default N_TRAIN / N_VAL) of the split, the same for the same seed."""
    if split not in ("train", "val"):
        raise DataError(f"split must be 'train' or 'val', got {split!r}")
    n = (N_TRAIN if split == "train" else N_VAL) if n is None else n
    rng = np.random.default_rng((seed, split == "val"))
    pools = _Pools(split, n, seed)
    topics = tuple(p for p in topic_pairs() if split_of(p[0]) == split)
    kinds, weights = list(KINDS), np.array(list(KINDS.values()))
    chosen = rng.choice(len(kinds), size=n, p=weights / weights.sum())
    return [_conversation(kinds[k], rng, pools, topics) for k in chosen]


def eval_questions(n: int = 200, seed: int = 0, split: str = "val") -> list[tuple[str, str, str]]:
    """n single-turn (task, question, answer) requests of the split (held out by default), the
    tasks taken in turn: arith, copy, reverse, arith, ..."""
    rng = np.random.default_rng((seed, 2))
    pools = _Pools(split, n, seed + 1)
    return [(t, *_request(t, pools.next(t), rng)) for t in (EVAL_TASKS[i % 3] for i in range(n))]


# ------------------------------------------------------------------------------ a JSONL file
def read_jsonl(path, max_bytes: int = MAX_DATA_BYTES) -> list[list[dict]]:
    """The conversations of a JSONL file (at most max_bytes, see data.read_text_file); a DataError
    naming the first bad line and what is wrong."""
    conversations = []
    for n, line in enumerate(read_text_file(path, max_bytes).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{str(path)!r} line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where} is not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
            raise DataError(f'{where} must be an object {{"messages": [...]}}, got {line.strip()[:40]!r}')
        try:
            roles = [role for role, _ in check_messages(obj["messages"])]
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
        if "assistant" not in roles:
            raise DataError(f"{where} has no assistant message, so it teaches nothing; add the reply")
        conversations.append(obj["messages"])
    if len(conversations) < 2:
        raise DataError(
            f"{str(path)!r} holds {len(conversations)} conversation(s); it needs at least 2 "
            "(the last tenth, at least one, is held out for validation)"
        )
    return conversations


# ------------------------------------------------------------------------------ the token stream
@dataclass
class MaskedTokens:
    """Conversations as one token stream: ids (n,), mask (n,) 1 = a token the model learns to write,
    starts (m,) where each conversation begins. `data.get_batch` hands batching to `get_batch`."""

    ids: np.ndarray
    mask: np.ndarray
    starts: np.ndarray
    pad_id: int = 0  # input id past the end of the stream (its targets are -1, so any id works)

    @classmethod
    def from_conversations(cls, tokenizer, conversations) -> MaskedTokens:
        ids, mask, starts = [], [], []
        for conv in conversations:
            starts.append(len(ids))
            i, m = tokenizer.encode_chat(conv)
            ids += i
            mask += m
        return cls(np.asarray(ids, np.int64), np.asarray(mask, np.int8), np.asarray(starts, np.int64))

    def __len__(self) -> int:
        return len(self.ids)

    def counted(self) -> np.ndarray:
        """The tokens the loss is measured on (the assistant's)."""
        return self.ids[self.mask == 1]

    def get_batch(self, batch_size: int, block_size: int, rng: np.random.Generator):
        """x, y (B, T) int64: B windows of T + 1 tokens, each from a random conversation start;
        y[b, t] = x's next token where the mask is 1, else -1 (see masked_targets)."""
        n = len(self.ids)
        pick = rng.integers(0, len(self.starts), size=batch_size)  # (B,)
        index = self.starts[pick][:, None] + np.arange(block_size + 1)[None, :]  # (B, T+1)
        inside = index < n
        index = np.minimum(index, n - 1)
        window = np.where(inside, self.ids[index], self.pad_id)
        return masked_targets(window, np.where(inside, self.mask[index], 0))


def masked_targets(ids, mask):
    """ids, mask (..., T+1) -> x (..., T) inputs, y (..., T) targets: y[t] = ids[t+1] where
    mask[t+1] = 1, else -1 (the cross-entropy's ignore_index: that position adds nothing)."""
    ids, mask = np.asarray(ids, np.int64), np.asarray(mask)
    return ids[..., :-1], np.where(mask[..., 1:] == 1, ids[..., 1:], -1)


def loss_tokens(ids):
    """The tokens a training loss is measured on: all of a plain stream, the assistant's of a chat."""
    return ids.counted() if isinstance(ids, MaskedTokens) else ids


def load_chat_data(
    spec, tokenizer=None, kind="char", vocab_size=512, val_fraction=0.1, max_bytes=MAX_DATA_BYTES
):
    """(tokenizer, train MaskedTokens, val MaskedTokens) of chat-builtin or a JSONL file.

    tokenizer None: a new `kind` tokenizer (char or bpe with vocab_size) built from the
    conversations, plus the chat tokens. A given tokenizer must have the chat tokens."""
    if spec == CHAT_BUILTIN:
        train, val = chat_builtin("train"), chat_builtin("val")
    else:
        convs = read_jsonl(spec, max_bytes)
        n_val = max(1, int(round(len(convs) * val_fraction)))
        train, val = convs[:-n_val], convs[-n_val:]
    if tokenizer is None:
        text = "\n".join(m["content"] for conv in train + val for m in conv)
        base = CharTokenizer.from_text(text) if kind == "char" else BPETokenizer.train(text, vocab_size)
        tokenizer = base.with_specials()
    elif not tokenizer.has_chat_format:
        raise DataError(
            f"--data {spec!r} is dialogue, but the checkpoint's tokenizer has no chat tokens; fine-tune a "
            "base model with --init-from CKPT (which adds them) instead of --resume"
        )
    parts = []
    for name, convs in (("training", train), ("validation", val)):
        try:
            stream = MaskedTokens.from_conversations(tokenizer, convs)
        except ValueError as e:
            raise DataError(
                f"the {name} conversations of {spec!r} cannot be encoded with the tokenizer ({e})"
            ) from None
        if not stream.mask.any():
            raise DataError(f"the {name} conversations of {spec!r} hold no assistant tokens to learn")
        parts.append(stream)
    return tokenizer, parts[0], parts[1]
