"""Plausible wrong answers, injected into the lessons' solutions, must fail their checks with a message
that teaches: a CheckFailed naming the function and the case, never a bare AssertionError or a raw
NumPy error, and never a pass.

The table is tests/wrong_answers.py. For each entry the solution source of the lesson is edited
(one exact snippet inside a `### BEGIN SOLUTION` region replaced), and its code cells are executed
in-process, in order, from the first solution cell up to and including the entry's check cell. The
cells before the first solution cell (imports, and the training runs some lessons start with) run
once per lesson; each entry starts from a shallow copy of that namespace. The unmodified solution
must pass every check cell, so that each failure below is caused by the injected mistake alone.
"""

import os
import re
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")  # before anything imports matplotlib

import pytest  # noqa: E402
from conftest import on_host_only  # noqa: E402
from wrong_answers import WRONG_ANSWERS  # noqa: E402

from minimoe.lessons.checks import CheckFailed  # noqa: E402

pytestmark = on_host_only(
    "the lessons are NumPy-only: their solution cells run in this process, numpy code on the package's arrays"
)

ROOT = Path(__file__).resolve().parent.parent
LESSONS = ROOT / "lessons"
_HEADER = re.compile(r"^# %%(.*)$")
_CHECK = re.compile(r"^check\s+id=([a-z0-9_]+)\s+points=(\d+)\s*$")


def lesson_path(number: str) -> Path:
    (path,) = sorted(LESSONS.glob(f"{number}_*.py"))
    return path


def cells(text: str) -> list[tuple[str, str, str]]:
    """(kind, check id or '', source) of every cell: kind is code, markdown, check or references."""
    out = []
    for line in text.splitlines(keepends=True):
        m = _HEADER.match(line.rstrip("\n"))
        if m:
            opts = m.group(1).strip()
            check = _CHECK.match(opts)
            if opts.startswith("[markdown]"):
                kind, cid = "markdown", ""
            elif check:
                kind, cid = "check", check.group(1)
            elif opts == "references":
                kind, cid = "references", ""
            else:
                kind, cid = "code", ""
            out.append([kind, cid, ""])
        elif out:
            out[-1][2] += line
        elif line.strip():
            out.append(["code", "", line])
    return [tuple(c) for c in out]


def first_solution(cs) -> int:
    return next(i for i, (_, _, src) in enumerate(cs) if "### BEGIN SOLUTION" in src)


def run_cells(cs, start, stop, ns, name):
    """Execute code and check cells start..stop (inclusive). Returns None, or (index, kind, exception)."""
    import matplotlib.pyplot as plt

    try:
        for i in range(start, stop + 1):
            kind, _, src = cs[i]
            if kind in ("markdown", "references"):
                continue
            try:
                exec(compile(src, f"{name} cell {i}", "exec"), ns)
            except Exception as e:
                return i, kind, e
    finally:
        plt.close("all")
    return None


_PREFIX: dict = {}


@pytest.fixture
def in_lessons(monkeypatch):
    monkeypatch.chdir(LESSONS)  # where reference() finds each lesson's .npz


def prefix_namespace(number: str) -> dict:
    """The namespace after the cells before the first solution cell (run once per lesson)."""
    if number not in _PREFIX:
        path = lesson_path(number)
        cs = cells(path.read_text(encoding="utf-8"))
        ns = {"__name__": "__lesson__"}
        failed = run_cells(cs, 0, first_solution(cs) - 1, ns, path.stem)
        assert failed is None, f"{path.name} cell {failed[0]} failed before any solution: {failed[2]!r}"
        _PREFIX[number] = ns
    return _PREFIX[number]


def solution_regions(text: str) -> list[tuple[int, int]]:
    """Character spans of the solution regions."""
    return [(m.start(), m.end()) for m in re.finditer(r"### BEGIN SOLUTION.*?### END SOLUTION", text, re.S)]


LESSON_NUMBERS = sorted({w.lesson for w in WRONG_ANSWERS})


def test_table_is_large_and_covers_every_lesson():
    assert len(WRONG_ANSWERS) >= 40
    assert {f"{n:02d}" for n in range(1, 13)} <= set(LESSON_NUMBERS), "every lesson 01-12 has entries"
    keys = [(w.lesson, w.function, w.snippet, w.replacement) for w in WRONG_ANSWERS]
    assert len(set(keys)) == len(keys), "duplicate entries"
    for w in WRONG_ANSWERS:
        assert w.what and w.what[0].isupper() and w.what.endswith("."), f"describe the mistake: {w}"


@pytest.mark.parametrize("number", LESSON_NUMBERS)
def test_solution_passes_every_check(number, in_lessons):
    path = lesson_path(number)
    cs = cells(path.read_text(encoding="utf-8"))
    checks = [i for i, c in enumerate(cs) if c[0] == "check"]
    assert checks, f"{path.name} has no graded check cell"
    ids = [cs[i][1] for i in checks]
    assert len(set(ids)) == len(ids), f"{path.name}: duplicate check ids {ids}"
    ns = dict(prefix_namespace(number))
    failed = run_cells(cs, first_solution(cs), checks[-1], ns, path.stem)
    assert failed is None, f"the solution of {path.name} fails in cell {failed[0]}: {failed[2]!r}"


def _id(w):
    return f"{w.lesson}-{w.function}-{WRONG_ANSWERS.index(w)}"


@pytest.mark.parametrize("w", WRONG_ANSWERS, ids=_id)
def test_wrong_answer_fails_with_a_named_check(w, in_lessons):
    path = lesson_path(w.lesson)
    text = path.read_text(encoding="utf-8")
    assert text.count(w.snippet) == 1, f"the snippet must occur exactly once in {path.name}: {w.snippet!r}"
    at = text.index(w.snippet)
    assert any(a <= at and at + len(w.snippet) <= b for a, b in solution_regions(text)), (
        f"the snippet is not inside a solution region of {path.name}: {w.snippet!r}"
    )
    cs = cells(text.replace(w.snippet, w.replacement))
    target = [i for i, c in enumerate(cs) if c[0] == "check" and c[1] == (w.check or w.function)]
    assert len(target) == 1, f"{path.name} has no check cell id={w.check or w.function}"
    ns = dict(prefix_namespace(w.lesson))
    failed = run_cells(cs, first_solution(cs), target[0], ns, path.stem)
    assert failed is not None, f"PASSED the checks: {w.what}"
    i, kind, e = failed
    assert isinstance(e, CheckFailed), f"cell {i} ({kind}) raised {type(e).__name__}: {e}"
    assert kind == "check", f"a CheckFailed from a {kind} cell {i}: {e}"
    msg = str(e)
    assert msg.startswith(f"{w.function}, case "), f"the message does not name {w.function}: {msg}"
    assert "\n" not in msg
    print(f"{w.lesson} {w.function}: {w.what}\n    -> {msg}")
