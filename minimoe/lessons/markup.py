"""The lesson source markup: percent-format cells, solution and hidden-test regions, nbgrader roles.

A lesson source `lessons/NN_slug.py` is a Python script in jupytext's "percent" format. A header
line starts each cell:

    # %% [markdown]                         markdown; its lines are comments (`# text`, or `#`)
    # %%                                    code; a SOLUTION cell when it holds a solution region
    # %% check id=<grade_id> points=<int>   a graded check (an nbgrader autograded test cell)
    # %% references                         defines references() -> dict of arrays; never shown

Regions (nbgrader's markers, each on a line of its own):
`### BEGIN SOLUTION` ... `### END SOLUTION` in a code cell is the learner's piece (the handout
replaces it with `raise NotImplementedError(...)`); `### BEGIN HIDDEN TESTS` ... `### END HIDDEN
TESTS` in a check cell runs at grading only. nbgrader finds its markers anywhere in a line, so a
line that merely mentions one (e.g. in prose) is refused here rather than by nbgrader later.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import NamedTuple, Optional

from minimoe.errors import UserError

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
HIDDEN_BEGIN = "### BEGIN HIDDEN TESTS"
HIDDEN_END = "### END HIDDEN TESTS"
LESSON_RE = re.compile(r"^(\d\d)_[A-Za-z0-9_]+\.py$")
_CELL_RE = re.compile(r"^# %%(?:\s+(.*))?$")
_CHECK_ID_RE = re.compile(r"^[a-z0-9_]+$")
_DELIMITERS = ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS")
STUB = 'raise NotImplementedError("Lesson {lesson}: your code here")'


class LessonError(UserError, ValueError):
    """A malformed lesson source, notebook or command-line value (the message is one sentence)."""


class Cell(NamedTuple):
    """One cell of a lesson source.

    kind: "markdown" or "code"; role: "markdown", "code" (a locked demo cell), "solution",
    "check" or "references"; line: 1-based line of its header (0 for text before the first
    header); check_id and points only for a check cell.
    """

    kind: str
    role: str
    source: str
    line: int
    check_id: Optional[str] = None
    points: Optional[int] = None


def _strip_blank(lines: list[str]) -> list[str]:
    """Drop leading and trailing blank lines (the separators between cells in the .py file)."""
    lo, hi = 0, len(lines)
    while lo < hi and not lines[lo].strip():
        lo += 1
    while hi > lo and not lines[hi - 1].strip():
        hi -= 1
    return lines[lo:hi]


def _header(options: str, name: str, line: int) -> tuple[str, Optional[str], Optional[int]]:
    """(role, check_id, points) of a `# %% <options>` header."""
    if options in ("", "[markdown]", "[md]", "references"):
        return {"": "code", "references": "references"}.get(options, "markdown"), None, None
    words = options.split()
    if words[0] != "check":
        raise LessonError(
            f"{name}, line {line}: unknown cell header '# %% {options}'; valid: '# %%', '# %% [markdown]', "
            "'# %% check id=<id> points=<int>', '# %% references'"
        )
    fields = {}
    for word in words[1:]:
        key, eq, value = word.partition("=")
        if not eq or key not in ("id", "points") or key in fields:
            raise LessonError(
                f"{name}, line {line}: bad check header field {word!r}; write '# %% check id=<id> points=<int>'"
            )
        fields[key] = value
    check_id, points = fields.get("id", ""), fields.get("points", "")
    if not _CHECK_ID_RE.match(check_id):
        raise LessonError(
            f"{name}, line {line}: check id {check_id!r} must be lowercase letters, digits and underscores"
        )
    if not points.isdigit() or int(points) < 1:
        raise LessonError(
            f"{name}, line {line}: check points {points!r} must be a whole number of at least 1"
        )
    return "check", check_id, int(points)


def _regions(lines: list[str], first: int, begin: str, end: str, name: str) -> list[tuple[int, int]]:
    """(begin, end) indices into `lines` of the balanced begin/end marker pairs (first: the
    1-based line number of lines[0], for messages)."""
    found, opened = [], None
    for i, line in enumerate(lines):
        s = line.strip()
        if s == begin:
            if opened is not None:
                raise LessonError(
                    f"{name}, line {first + i}: '{begin}' inside the region opened on line {first + opened}"
                )
            opened = i
        elif s == end:
            if opened is None:
                raise LessonError(f"{name}, line {first + i}: '{end}' without a '{begin}' before it")
            found.append((opened, i))
            opened = None
    if opened is not None:
        raise LessonError(f"{name}, line {first + opened}: '{begin}' is not closed by '{end}' in its cell")
    return found


def parse_cells(text: str, name: str = "<lesson>") -> list[Cell]:
    """Every cell of a lesson source, references cell included, validated.

    Text before the first header becomes a code cell if it is not blank. A markdown cell's lines
    must be comments; `# ` (or a bare `#`) is removed from each.
    """
    segments = [["", 0, []]]  # [header options, line number of the header (0: none), lines]
    for i, line in enumerate(text.splitlines(), start=1):
        m = _CELL_RE.match(line)
        if m is None:
            segments[-1][2].append(line)
        else:
            segments.append([(m.group(1) or "").strip(), i, []])
    if not any(s.strip() for s in segments[0][2]):
        segments.pop(0)  # nothing before the first header
    cells, ids, references = [], set(), 0
    for options, header, body in segments:
        role, check_id, points = _header(options, name, header)
        first = header + 1
        for j, line in enumerate(body):
            marker = line.strip() in (BEGIN, END, HIDDEN_BEGIN, HIDDEN_END)
            if not marker and any(d in line for d in _DELIMITERS):
                raise LessonError(
                    f"{name}, line {first + j}: mentions a region marker outside a marker line; nbgrader "
                    "would take it for one, so reword it (e.g. 'BEGIN&nbsp;SOLUTION' in markdown)"
                )
        solutions = _regions(body, first, BEGIN, END, name)
        hidden = _regions(body, first, HIDDEN_BEGIN, HIDDEN_END, name)
        if role == "markdown":
            md = []
            for j, line in enumerate(body, start=first):
                if line.strip() and not line.startswith("#"):
                    raise LessonError(
                        f"{name}, line {j}: a markdown cell line must start with '# ', got {line!r}"
                    )
                md.append(line[2:] if line.startswith("# ") else line[1:])
            body = md
        if solutions and role != "code":
            raise LessonError(
                f"{name}, line {first + solutions[0][0]}: a solution region belongs in a plain code cell, "
                f"not a {role} cell"
            )
        if hidden and role != "check":
            raise LessonError(
                f"{name}, line {first + hidden[0][0]}: a hidden-test region belongs in a check cell, "
                f"not a {role} cell"
            )
        if role == "check":
            if check_id in ids:
                raise LessonError(f"{name}, line {header}: check id '{check_id}' is used twice")
            ids.add(check_id)
        references += role == "references"
        if references > 1:
            raise LessonError(f"{name}, line {header}: a lesson has at most one '# %% references' cell")
        role = "solution" if solutions else role
        cells.append(Cell("markdown" if role == "markdown" else "code", role, "\n".join(_strip_blank(body)),
                          header, check_id, points))  # fmt: skip
    return cells


def split_cells(text: str, name: str = "<lesson>") -> list[tuple[str, str]]:
    """The (cell_type, source) pairs of the notebook cells of a source (references excluded)."""
    return [(c.kind, c.source) for c in parse_cells(text, name) if c.role != "references"]


def solution_regions(text: str, name: str = "<lesson>") -> list[tuple[int, int]]:
    """(begin, end) 0-based line numbers of every solution region; raises LessonError when the
    markers are unbalanced, nested, split across cells, or when there is no region at all."""
    lines = text.splitlines()
    parse_cells(text, name)  # validates the markers cell by cell
    found, start = [], 0
    for i, line in enumerate(lines + ["# %%"]):
        if _CELL_RE.match(line) and i > 0:
            found += [
                (start + b, start + e) for b, e in _regions(lines[start:i], start + 1, BEGIN, END, name)
            ]
            start = i
    if not found:
        raise LessonError(
            f"{name} has no '{BEGIN}' ... '{END}' region; every lesson needs one for the learner"
        )
    return found


def defined_functions(source: str) -> list[str]:
    """Names of the top-level functions a code cell defines, in order."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    return [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def lesson_number(name: str) -> str:
    """'05' for '.../05_router.py' (or .ipynb); 'NN' when the file name has no number."""
    m = re.match(r"^(\d\d)_", Path(name).name)
    return m.group(1) if m else "NN"


def student_source(source: str, lesson: str = "NN") -> str:
    """One cell's handout text: solution regions stubbed, hidden-test regions removed (the
    cell's markers must already be valid, see parse_cells)."""
    out, skip = [], None
    for line in source.splitlines():
        s = line.strip()
        if skip is None and s == BEGIN:
            out.append(line[: len(line) - len(line.lstrip())] + STUB.format(lesson=lesson))
            skip = END
        elif skip is None and s == HIDDEN_BEGIN:
            skip = HIDDEN_END
        elif skip is None:
            out.append(line)
        elif s == skip:
            skip = None
    return "\n".join(out)


def make_student(text: str, lesson: str = "NN", name: str = "<lesson>") -> str:
    """The student version of a lesson source: every solution region (markers included) becomes
    `raise NotImplementedError("Lesson NN: your code here")` at the BEGIN marker's indentation,
    hidden-test regions and the references cell are removed."""
    lines = text.splitlines()
    drop = [False] * len(lines)
    stub_at = {}
    for begin, end in solution_regions(text, name):
        line = lines[begin]
        stub_at[begin] = line[: len(line) - len(line.lstrip())] + STUB.format(lesson=lesson)
        drop[begin : end + 1] = [True] * (end + 1 - begin)
    inside = None  # the kind of region or cell being dropped
    for i, line in enumerate(lines):
        header = _CELL_RE.match(line)
        if header:
            inside = "references" if (header.group(1) or "").strip() == "references" else None
        elif line.strip() == HIDDEN_BEGIN:
            inside = "hidden"
        if inside:
            drop[i] = True
        if line.strip() == HIDDEN_END:
            inside = None
    out = [stub_at.get(i, line) for i, line in enumerate(lines) if not drop[i] or i in stub_at]
    return "\n".join(out) + "\n"
