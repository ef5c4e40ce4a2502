"""Talking to a fine-tuned model: a conversation kept in the KV cache, and the `minimoe chat` loop.

    conv = Conversation(model, tokenizer)
    ids = conv.reply("What is 2 plus 3?", temperature=0)        # the reply's ids, without <|end|>

The context is the conversation so far in the chat format (tokenizer.encode_chat):
    <|user|> q1 <|end|> <|assistant|> a1 <|end|> <|user|> q2 <|end|> <|assistant|> a2 ...
Each turn feeds the model only what its cache lacks: the previous reply's <|end|> (sampled, never
fed), the new user turn and <|assistant|>, in one forward whose keys and values join the cache.
The reply is then decoded one token per forward until the model writes <|end|>, max_new_tokens
is reached, or the context is full (block_size positions; the reply is then cut and closed); the
turn markers <|user|> and <|assistant|> are never sampled inside a reply.
Positions are absolute (RoPE angles, learned position rows), so a full cache cannot slide: before
a turn that would not fit with `reply_room` tokens left for the answer, the oldest EXCHANGES (a
user turn and its reply, whole) are dropped and the cache is refilled from what remains (one
prefill). use_cache=False recomputes the whole context for every token: the reference a test
holds the cache to (the same tokens).
"""

from __future__ import annotations

import sys

import numpy as np

from minimoe import analysis, backend
from minimoe.data import default_cache_dir
from minimoe.errors import UserError
from minimoe.layers.attention import make_kv_cache
from minimoe.options import check_number
from minimoe.sample import StreamDecoder, sample_next
from minimoe.tokenizer import ASSISTANT, END, USER

HELP = (
    "commands: /reset forgets the conversation, /temperature X (0 = greedy), /help, /quit; Ctrl-D leaves too"
)


class ChatError(UserError):
    """A model that cannot chat, or a message that cannot be sent."""


class Conversation:
    """The exchanges so far (token ids), and the KV cache holding the ones the model has seen."""

    def __init__(self, model, tokenizer, use_cache: bool = True, reply_room: int | None = None):
        if not tokenizer.has_chat_format:
            raise ChatError(
                "this model's tokenizer has no chat tokens; fine-tune it first: "
                "minimoe train --init-from CKPT --data chat-builtin --out DIR"
            )
        self.model, self.tokenizer, self.use_cache = model, tokenizer, use_cache
        self.T = model.config.block_size
        self.end = tokenizer.special_id(END)
        # a reply never contains a turn marker (none does in the training data): those two tokens
        # get logit -inf while the assistant speaks, so a weak model cannot open a turn mid-reply
        self.markers = [tokenizer.special_id(USER), tokenizer.special_id(ASSISTANT)]
        self.reply_room = max(1, self.T // 4) if reply_room is None else reply_room
        self.exchanges: list[list[int]] = []  # each: <|user|> .. <|end|> <|assistant|> .. <|end|>
        self.cache = None
        self.fed = 0  # context tokens whose keys and values the cache holds (= cache.pos)
        self.dropped = 0  # exchanges dropped to make room for the last message

    @property
    def context(self) -> list[int]:
        return [i for ex in self.exchanges for i in ex]

    def reset(self):
        self.exchanges, self.fed = [], 0

    def _make_room(self, n_new: int) -> int:
        """Drop the oldest exchanges until n_new + reply_room tokens fit after the context; how many."""
        if n_new + 1 > self.T:
            raise ChatError(
                f"the message takes {n_new} tokens with its chat tokens, but this model's context holds "
                f"{self.T}, including at least one token of reply; send a shorter message"
            )
        dropped = 0
        while self.exchanges and len(self.context) + n_new + self.reply_room > self.T:
            self.exchanges.pop(0)
            dropped += 1
        if dropped:
            self.fed = 0  # every position moved: the cache is refilled from the start
        return dropped

    def _next_logits(self, context: list[int]):
        """(V,) host logits of the token after `context`; the cache is fed only the tokens it lacks.
        The ids go to the model as host arrays: it range-checks them there and moves them once."""
        xp = self.model.xp
        if not self.use_cache:
            logits, _ = self.model.forward(np.asarray([context], dtype=np.int64))
        else:
            if self.fed == 0:
                self.cache = make_kv_cache(self.model.config, 1, self.T, xp=xp, dtype=self.model.dtype)
            new = context[self.fed :]
            logits, _ = self.model.forward(np.asarray([new], dtype=np.int64), kv_cache=self.cache)
            self.fed = len(context)
        return backend.to_numpy(logits[0, -1]).astype(np.float64)  # a copy, on the host

    def reply(self, text: str, max_new_tokens: int = 200, temperature: float = 0.8, top_k=None, rng=None,
              on_token=None) -> list[int]:  # fmt: skip
        """Send the user message `text`; returns the reply's ids (without <|end|>), calling
        on_token(id) as each is chosen. `self.dropped` tells how many old exchanges made room."""
        try:
            turn, _ = self.tokenizer.encode_chat(
                [{"role": "user", "content": text}], add_generation_prompt=True
            )
        except ValueError as e:  # a character the tokenizer has never seen
            raise ChatError(f"the message cannot be encoded: {e}") from None
        self.dropped = self._make_room(len(turn))
        exchange = list(turn)
        self.exchanges.append(exchange)
        context = self.context
        rng = np.random.default_rng() if rng is None else rng
        was_training = self.model.training
        self.model.eval()
        out = []
        try:
            while len(out) < max_new_tokens and len(context) < self.T:
                logits = self._next_logits(context)
                logits[self.markers] = -np.inf
                token = sample_next(logits, temperature, top_k, rng)
                exchange.append(token)
                context.append(token)
                if token == self.end:
                    break
                out.append(token)
                if on_token is not None:
                    on_token(token)
        finally:
            if was_training:
                self.model.train()
        if exchange[-1] != self.end:
            exchange.append(self.end)  # a cut reply is closed, so the next turn starts cleanly
        return out


# ------------------------------------------------------------------------------ measuring a chat model
def exact_match(model, tokenizer, questions, max_new_tokens: int = 16) -> dict:
    """Greedy replies to (task, question, answer) triples, each in a fresh conversation: the
    fraction answered exactly (the whole reply equals the answer), overall and per task."""
    hits: dict = {}
    for task, question, answer in questions:
        reply = Conversation(model, tokenizer).reply(question, max_new_tokens, temperature=0.0)
        hits.setdefault(task, []).append(tokenizer.decode(reply).strip() == answer)
    out = {task: float(np.mean(h)) for task, h in hits.items()}
    out["all"] = float(np.mean([x for h in hits.values() for x in h]))
    return out


def routing_by_role(model, tokenizer, conversations) -> list[dict]:
    """Which experts the assistant's tokens and the other tokens (user turns, markers) go to:
    per MoE layer {"layer", "assistant": (Na, K), "other": (No, K)} chosen experts, first choice
    first, over the conversations (each routed on its own, cut to block_size)."""
    per_layer: dict = {}
    for conv in conversations:
        ids, mask = tokenizer.encode_chat(conv)
        ids, mask = ids[: model.config.block_size], np.asarray(mask[: model.config.block_size]) == 1
        for r in analysis.route_tokens(model, ids):
            entry = per_layer.setdefault(r["layer"], {"layer": r["layer"], "assistant": [], "other": []})
            entry["assistant"].append(r["expert_idx"][mask])
            entry["other"].append(r["expert_idx"][~mask])
    return [{k: (np.concatenate(v) if k != "layer" else v) for k, v in e.items()} for e in per_layer.values()]


def _terminal_lines(prompt: str, out):
    """Lines typed at a terminal (with readline editing and history when available) until Ctrl-D."""
    history = default_cache_dir() / "chat_history"
    try:
        import readline  # optional: absent on some platforms
    except ImportError:
        readline = None
    try:
        if readline is not None:
            readline.read_history_file(history)
    except OSError:  # no history yet
        pass
    try:
        while True:
            try:
                yield input(prompt)
            except EOFError:
                out.write("\n")
                return
    finally:
        if readline is not None:
            try:
                history.parent.mkdir(parents=True, exist_ok=True)
                readline.write_history_file(history)
            except OSError:
                pass


def _command(line: str, conv: Conversation, settings: dict, note) -> bool:
    """Carry out a /command; False when it asks to leave."""
    name, _, arg = line.partition(" ")
    if name in ("/quit", "/exit"):
        return False
    if name == "/reset":
        conv.reset()
        note("(the conversation is forgotten)")
    elif name == "/temperature":
        try:
            value = float(arg) if arg.strip() else settings["temperature"]
            check_number("temperature", value, lo=0.0)
            settings["temperature"] = value
            note(f"(temperature {value:g})")
        except (ValueError, UserError):
            note(f"(/temperature needs a number >= 0, 0 = greedy; got {arg.strip()!r}; it stays "
                 f"{settings['temperature']:g})")  # fmt: skip
    else:
        note(f"({HELP})" if name == "/help" else f"(unknown command {name!r}; {HELP})")
    return True


def _handle(text: str, conv: Conversation, settings: dict, note, stdout, interactive: bool, sampling) -> bool:
    """One line of input: a /command, or a message whose reply is streamed; False to leave."""
    if not text:
        return True
    if text.startswith("/"):
        return _command(text, conv, settings, note)
    max_new_tokens, top_k, rng = sampling
    if interactive:
        stdout.write("minimoe> ")
    dec = StreamDecoder(conv.tokenizer)

    def on_token(i):
        stdout.write(dec.push(i))
        stdout.flush()

    try:
        conv.reply(text, max_new_tokens, settings["temperature"], top_k, rng, on_token)
    except ChatError as e:
        stdout.write("\n" if interactive else "")
        note(f"({e})")
        return True
    stdout.write(dec.flush() + "\n")
    stdout.flush()
    if conv.dropped:
        note(f"(the oldest {conv.dropped} exchange(s) were dropped to fit the context of {conv.T} tokens)")
    return True


def run_chat(model, tokenizer, stdin=None, stdout=None, stderr=None, temperature: float = 0.6, top_k=None,
             max_new_tokens: int = 200, seed=None, use_cache: bool = True, interactive=None) -> int:  # fmt: skip
    """The `minimoe chat` loop: one user message per line, each reply streamed to stdout.

    At a terminal (interactive): prompts, readline history (kept in the cache directory), Ctrl-D
    leaves. Otherwise (e.g. `echo "What is 2 plus 3?" | minimoe chat`) each line of stdin is a
    message and each reply one line of stdout. Lines starting with / are commands (HELP); notes
    (a reset, trimmed turns, a message that cannot be sent) go to stderr. Returns 0.
    """
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    conv = Conversation(model, tokenizer, use_cache)
    rng = np.random.default_rng(seed)
    settings = {"temperature": temperature}
    interactive = stdin.isatty() if interactive is None else interactive

    def note(text):
        stdout.flush()
        print(text, file=stderr, flush=True)

    if interactive:
        note(f"chatting with a {model.config.n_layer}-layer model of {conv.T} tokens of context; {HELP}")
        lines = _terminal_lines("you> ", stdout)
    else:
        lines = (line.rstrip("\n") for line in stdin)
    try:
        for line in lines:
            if not _handle(
                line.strip(), conv, settings, note, stdout, interactive, (max_new_tokens, top_k, rng)
            ):
                break
    finally:
        if interactive:
            lines.close()  # the generator writes the readline history as it closes
    return 0
