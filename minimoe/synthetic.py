"""A deterministic multi-task toy corpus: each line is one tagged example of a small task.

    add 37+45=82          arithmetic            copy abcd|abcd        copy a word
    rev abcd|dcba         reverse a word        brk (()[])|ok         are the brackets balanced?
    gram the cat sees a dog .                   a tiny English grammar with number agreement

Lesson 09 trains on it to see whether experts specialise by task; `--data synthetic` trains on it.
"""

from __future__ import annotations

import numpy as np

from minimoe.errors import DataError

# task name -> short tag that starts every line of that task
TASK_TAGS = {"arith": "add", "copy": "copy", "reverse": "rev", "brackets": "brk", "grammar": "gram"}
TASKS = tuple(TASK_TAGS)

_LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))
_PAIRS = {")": "(", "]": "["}

# A tiny English grammar with number agreement:
#   S  -> NP VP .        NP -> Det [Adj] Noun      VP -> Vt NP | Vi
# Singular subjects take "sees"/"sleeps", plural ones take "see"/"sleep".
_NOUNS = [("cat", "cats"), ("dog", "dogs"), ("bird", "birds"), ("fox", "foxes"), ("child", "children")]
_ADJS = ["big", "small", "red", "old", "happy"]
_VT = [("sees", "see"), ("chases", "chase"), ("likes", "like"), ("follows", "follow")]
_VI = [("sleeps", "sleep"), ("runs", "run"), ("sings", "sing")]
_DETS = (["the", "a", "one"], ["the", "some", "two"])  # (singular, plural)


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _noun_phrase(rng: np.random.Generator) -> tuple[str, bool]:
    plural = bool(rng.integers(2))
    words = [_pick(rng, _DETS[plural])]
    if rng.random() < 0.4:
        words.append(_pick(rng, _ADJS))
    words.append(_pick(rng, _NOUNS)[plural])
    return " ".join(words), plural


def _sentence(rng: np.random.Generator) -> str:
    subject, plural = _noun_phrase(rng)
    if rng.random() < 0.7:
        verb = _pick(rng, _VT)[plural]
        return f"{subject} {verb} {_noun_phrase(rng)[0]} ."
    return f"{subject} {_pick(rng, _VI)[plural]} ."


def _balanced(rng: np.random.Generator, n_pairs: int) -> str:
    """A random well-nested string of ``n_pairs`` bracket pairs."""
    out, stack = [], []
    opened = 0
    while opened < n_pairs or stack:
        if opened < n_pairs and (not stack or rng.random() < 0.5):
            ch = "(" if rng.random() < 0.5 else "["
            out.append(ch)
            stack.append(ch)
            opened += 1
        else:
            out.append(")" if stack.pop() == "(" else "]")
    return "".join(out)


def _is_balanced(s: str) -> bool:
    stack = []
    for ch in s:
        if ch in "([":
            stack.append(ch)
        elif not stack or stack.pop() != _PAIRS[ch]:
            return False
    return not stack


def _example(task: str, rng: np.random.Generator) -> str:
    """One line (without newline) of the given task."""
    tag = TASK_TAGS[task]
    if task == "arith":
        a, b = (int(v) for v in rng.integers(0, 100, size=2))
        return f"{tag} {a}+{b}={a + b}"
    if task in ("copy", "reverse"):
        word = "".join(rng.choice(_LETTERS, size=int(rng.integers(3, 9))))
        return f"{tag} {word}|{word if task == 'copy' else word[::-1]}"
    if task == "brackets":
        s = _balanced(rng, int(rng.integers(1, 6)))
        if rng.random() < 0.5:  # corrupt one position; the label is recomputed below
            i = int(rng.integers(len(s)))
            s = s[:i] + _pick(rng, [c for c in "()[]" if c != s[i]]) + s[i + 1 :]
        return f"{tag} {s}|{'ok' if _is_balanced(s) else 'bad'}"
    return f"{tag} {_sentence(rng)}"  # grammar


def _check_tasks(tasks) -> tuple[str, ...]:
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",")]
    tasks = tuple(tasks)
    bad = [t for t in tasks if t not in TASK_TAGS]
    if bad or not tasks:
        raise DataError(
            f"unknown synthetic task(s) {bad or list(tasks)!r}; valid tasks are {', '.join(TASKS)}"
        )
    return tasks


def synthetic_examples(n_lines: int = 20000, seed: int = 0, tasks=TASKS) -> list[tuple[str, str]]:
    """Return ``n_lines`` (task, line) pairs; each line's task is drawn uniformly.

    Deterministic: the same ``seed`` always gives the same examples.
    """
    tasks = _check_tasks(tasks)
    if not isinstance(n_lines, (int, np.integer)) or n_lines < 1:
        raise DataError(f"n_lines must be a positive integer, got {n_lines!r}")
    rng = np.random.default_rng(seed)
    chosen = rng.integers(len(tasks), size=int(n_lines))
    return [(tasks[k], _example(tasks[k], rng)) for k in chosen]


def synthetic_corpus(n_lines: int = 20000, seed: int = 0, tasks=TASKS) -> str:
    """A deterministic multi-task text corpus, one tagged example per line.

    Example lines: ``add 37+45=82``, ``copy abcd|abcd``, ``rev abcd|dcba``,
    ``brk (()[])|ok``, ``brk (]|bad``, ``gram the cat sees a dog .``
    """
    return "\n".join(line for _, line in synthetic_examples(n_lines, seed, tasks)) + "\n"
