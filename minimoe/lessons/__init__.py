"""Lesson tooling: percent-format sources -> notebooks, student versions, and a CI check.

The source of every lesson is `lessons/NN_slug.py` in jupytext's "percent" format: a line
`# %%` starts a code cell, a line `# %% [markdown]` starts a markdown cell whose lines are
comments (`# text`, or a bare `#` for an empty line). The notebook `NN_slug.ipynb` beside it is
generated from it, with no outputs, and the bytes depend on the source only (so CI can check it).

    python -m minimoe.lessons build   [--lessons DIR]   # write every NN_slug.ipynb
    python -m minimoe.lessons student OUTDIR [--lessons DIR]   # hand-out versions (.ipynb + .py)
    python -m minimoe.lessons check   [--lessons DIR]   # exit 1 if a notebook is out of date

Classroom markers (nbgrader's convention): in a code cell, the lines between `### BEGIN SOLUTION`
and `### END SOLUTION` are the learner's piece. The student version replaces each region, markers
included, by `raise NotImplementedError("Lesson NN: your code here")` at the marker's indentation.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
LESSON_RE = re.compile(r"^(\d\d)_[A-Za-z0-9_]+\.py$")
_CELL_RE = re.compile(r"^# %%(?:\s+(.*))?$")
_KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}


class LessonError(ValueError):
    """A malformed lesson source or a bad command-line value (the message is one sentence)."""


# ---------------------------------------------------------------------------------------------
# percent format -> notebook
# ---------------------------------------------------------------------------------------------


def _strip_blank(lines: list[str]) -> list[str]:
    """Drop leading and trailing blank lines (the separators between cells in the .py file)."""
    lo, hi = 0, len(lines)
    while lo < hi and not lines[lo].strip():
        lo += 1
    while hi > lo and not lines[hi - 1].strip():
        hi -= 1
    return lines[lo:hi]


def split_cells(text: str, name: str = "<lesson>") -> list[tuple[str, str]]:
    """The (cell_type, source) pairs of a percent-format text, in order.

    Text before the first `# %%` line becomes a code cell if it is not blank. A markdown cell's
    lines must be comments; `# ` (or a bare `#`) is removed from each.
    """
    segments = [["code", 0, []]]  # [kind, line number of the marker (0: none), lines]
    for i, line in enumerate(text.splitlines(), start=1):
        m = _CELL_RE.match(line)
        if m is None:
            segments[-1][2].append(line)
            continue
        options = (m.group(1) or "").strip()
        kind = "markdown" if options.startswith(("[markdown]", "[md]")) else "code"
        segments.append([kind, i, []])
    if not any(s.strip() for s in segments[0][2]):
        segments.pop(0)  # nothing before the first marker
    cells = []
    for kind, marker, body in segments:
        if kind == "markdown":
            md = []
            for j, line in enumerate(body, start=marker + 1):
                if line.strip() and not line.startswith("#"):
                    raise LessonError(
                        f"{name}, line {j}: a markdown cell line must start with '# ', got {line!r}"
                    )
                md.append(line[2:] if line.startswith("# ") else line[1:])
            body = md
        cells.append((kind, "\n".join(_strip_blank(body))))
    return cells


def _source_lines(source: str) -> list[str]:
    """nbformat stores a cell's source as a list of lines, each but the last ending in a newline."""
    return source.splitlines(keepends=True) if source else []


def py_to_notebook(text: str, name: str = "<lesson>") -> dict:
    """An nbformat v4.5 notebook (a plain dict) from percent-format `text`: no outputs, and
    cell ids derived from the cell contents, so the same text always gives the same notebook."""
    cells, seen = [], set()
    for kind, source in split_cells(text, name):
        digest = hashlib.sha1(f"{kind}\n{source}".encode()).hexdigest()[:12]
        cell_id, n = digest, 1
        while cell_id in seen:  # two identical cells: keep ids unique within the notebook
            n += 1
            cell_id = f"{digest}-{n}"
        seen.add(cell_id)
        cell = {"cell_type": kind, "id": cell_id, "metadata": {}, "source": _source_lines(source)}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        cells.append(cell)
    return {
        "cells": cells,
        "metadata": {"kernelspec": dict(_KERNELSPEC), "language_info": {"name": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def notebook_text(nb: dict) -> str:
    """The notebook as JSON text, laid out the way Jupyter writes it (so saving it in Jupyter
    without running anything leaves the file unchanged)."""
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------------------------------------
# solution regions and student versions
# ---------------------------------------------------------------------------------------------


def solution_regions(text: str, name: str = "<lesson>") -> list[tuple[int, int]]:
    """(begin, end) 0-based line numbers of every solution region; raises LessonError when the
    markers are unbalanced, nested, split across cells, or when there is no region at all."""
    regions, begin = [], None
    for i, line in enumerate(text.splitlines()):
        s = line.strip()
        if s == BEGIN:
            if begin is not None:
                raise LessonError(
                    f"{name}, line {i + 1}: '{BEGIN}' inside the region opened on line {begin + 1}"
                )
            begin = i
        elif s == END:
            if begin is None:
                raise LessonError(f"{name}, line {i + 1}: '{END}' without a '{BEGIN}' before it")
            regions.append((begin, i))
            begin = None
        elif begin is not None and _CELL_RE.match(line):
            raise LessonError(
                f"{name}, line {begin + 1}: the solution region is not closed before the next cell"
            )
    if begin is not None:
        raise LessonError(f"{name}, line {begin + 1}: '{BEGIN}' is never closed by '{END}'")
    if not regions:
        raise LessonError(
            f"{name} has no '{BEGIN}' ... '{END}' region; every lesson needs one for the learner"
        )
    return regions


def make_student(text: str, lesson: str = "NN", name: str = "<lesson>") -> str:
    """The student version of a lesson source: every solution region (markers included) becomes
    `raise NotImplementedError("Lesson NN: your code here")` at the BEGIN marker's indentation."""
    lines = text.splitlines()
    out, pos = [], 0
    for begin, end in solution_regions(text, name):
        out.extend(lines[pos:begin])
        indent = lines[begin][: len(lines[begin]) - len(lines[begin].lstrip())]
        out.append(f'{indent}raise NotImplementedError("Lesson {lesson}: your code here")')
        pos = end + 1
    out.extend(lines[pos:])
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


def lesson_files(lessons_dir) -> list[Path]:
    """Every lessons_dir/NN_slug.py, sorted by name."""
    d = Path(lessons_dir)
    if not d.is_dir():
        raise LessonError(
            f"lessons directory '{d}' does not exist; run from the repository root or pass --lessons DIR"
        )
    return sorted(p for p in d.iterdir() if p.is_file() and LESSON_RE.match(p.name))


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _write_if_changed(path: Path, text: str) -> bool:
    if path.exists() and path.read_bytes() == text.encode("utf-8"):
        return False
    path.write_bytes(text.encode("utf-8"))
    return True


def expected_notebook(py_path) -> str:
    """The notebook text that `build` writes for one lesson source (validating its markers)."""
    py_path = Path(py_path)
    text = _read(py_path)
    solution_regions(text, str(py_path))
    return notebook_text(py_to_notebook(text, str(py_path)))


def build(lessons_dir="lessons") -> list[Path]:
    """Write NN_slug.ipynb for every NN_slug.py; returns the notebooks that changed."""
    changed = []
    for py in lesson_files(lessons_dir):
        ipynb = py.with_suffix(".ipynb")
        if _write_if_changed(ipynb, expected_notebook(py)):
            changed.append(ipynb)
    return changed


def stale(lessons_dir="lessons") -> list[str]:
    """One line per notebook that is missing, out of date, or has no source."""
    problems = []
    files = lesson_files(lessons_dir)
    for py in files:
        ipynb = py.with_suffix(".ipynb")
        if not ipynb.exists():
            problems.append(f"{ipynb} is missing (its source {py} exists)")
        elif ipynb.read_bytes() != expected_notebook(py).encode("utf-8"):
            problems.append(f"{ipynb} is out of date with {py}")
    sources = {p.stem for p in files}
    for nb in sorted(Path(lessons_dir).glob("[0-9][0-9]_*.ipynb")):
        if nb.stem not in sources:
            problems.append(f"{nb} has no source {nb.with_suffix('.py').name}")
    return problems


def write_student(outdir, lessons_dir="lessons") -> list[Path]:
    """Write the student version (NN_slug.py and NN_slug.ipynb) of every lesson into outdir."""
    files = lesson_files(lessons_dir)
    out = Path(outdir)
    if out.resolve() == Path(lessons_dir).resolve():
        raise LessonError(f"the student OUTDIR '{outdir}' is the lessons directory; pick another directory")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for py in files:
        text = make_student(_read(py), LESSON_RE.match(py.name).group(1), str(py))
        for path, content in (
            (out / py.name, text),
            (out / py.with_suffix(".ipynb").name, notebook_text(py_to_notebook(text, str(py)))),
        ):
            _write_if_changed(path, content)
            written.append(path)
    return written


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minimoe.lessons", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build", help="write every lessons/NN_slug.ipynb from its .py source")
    p_student = sub.add_parser("student", help="write student versions (solutions removed) into OUTDIR")
    p_student.add_argument("outdir", help="directory for the student .ipynb and .py files")
    p_check = sub.add_parser("check", help="exit 1 if any notebook is out of date with its .py source")
    for p in (p_build, p_student, p_check):
        p.add_argument("--lessons", default="lessons", help="the lessons directory (default: lessons)")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            changed = build(args.lessons)
            n = len(lesson_files(args.lessons))
            for path in changed:
                print(f"wrote {path}")
            print(f"{n} lesson notebook(s), {len(changed)} changed")
        elif args.command == "student":
            written = write_student(args.outdir, args.lessons)
            print(f"wrote {len(written) // 2} student lesson(s) to {args.outdir}")
        else:
            problems = stale(args.lessons)
            for line in problems:
                print(line)
            if problems:
                print("run `python -m minimoe.lessons build` and commit the notebooks")
                return 1
            print(f"{len(lesson_files(args.lessons))} lesson notebook(s) up to date")
    except LessonError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

