"""Lesson source -> notebook (a plain nbformat 4.5 dict) with nbgrader cell metadata.

Every cell carries nbgrader metadata (schema version 3) so `nbgrader generate_assignment` and
`autograde` accept the notebook as it is:

    cell                    solution  grade  locked  points  grade_id
    markdown, demo code     False     False  True    -       lessonNN_md_<cell id>, lessonNN_code_<cell id>
    solution (learner's)    True      False  False   -       lessonNN_solution_<first function it defines>
    check id=X points=P     False     True   True    P       lessonNN_X
    setup (generated)       False     False  True    -       lessonNN_setup

Cell ids are hashes of the cells' contents, so the same source always gives the same notebook.
The first code cell of every notebook is a generated setup cell (SETUP_SOURCE): it makes
`import minimoe` work in a notebook opened on its own and turns the inline figure backend on.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

from minimoe.lessons.markup import (
    LESSON_RE,
    LessonError,
    defined_functions,
    lesson_number,
    parse_cells,
    student_source,
)

_KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}

SETUP_SOURCE = """\
# Setup (written by `python -m minimoe.lessons build`): when minimoe is not importable, use the
# checkout this notebook sits in, or else install it from the package index (Colab, a fresh
# Jupyter). Figures are shown inline even if MPLBACKEND names a non-interactive backend.
import importlib.util
import pathlib
import subprocess
import sys

if importlib.util.find_spec("minimoe") is None:
    _here = pathlib.Path.cwd().resolve()
    _root = next((p for p in (_here, *_here.parents) if (p / "minimoe" / "__init__.py").is_file()), None)
    if _root is not None:
        sys.path.insert(0, str(_root))
    else:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "minimoe"], check=True)
        importlib.invalidate_caches()
try:
    get_ipython().run_line_magic("matplotlib", "inline")  # get_ipython exists in IPython only
except NameError:
    pass"""


def _source_lines(source: str) -> list[str]:
    """nbformat stores a cell's source as a list of lines, each but the last ending in a newline."""
    return source.splitlines(keepends=True) if source else []


def _nbgrader(grade_id: str, solution=False, grade=False, locked=True, points=None) -> dict:
    meta = {"grade": grade, "grade_id": grade_id, "locked": locked, "schema_version": 3}
    meta.update(solution=solution, task=False)
    if grade:
        meta["points"] = points
    return meta


def py_to_notebook(text: str, name: str = "<lesson>", setup: bool = True) -> dict:
    """The notebook of a lesson source: no outputs, nbgrader metadata on every cell, and cell ids
    derived from the cell contents. `setup` inserts the generated setup cell before the first
    code cell. Raises LessonError for malformed markup or clashing grade ids."""
    nn = lesson_number(name)
    cells, seen, grade_ids, solutions = [], set(), {}, 0
    parsed = [c for c in parse_cells(text, name) if c.role != "references"]
    first_code = next((i for i, c in enumerate(parsed) if c.kind == "code"), len(parsed))
    items = [(c.kind, c.role, c.source, c) for c in parsed]
    if setup:
        items.insert(first_code, ("code", "setup", SETUP_SOURCE, None))
    for kind, role, source, cell in items:
        digest = hashlib.sha1(f"{kind}\n{source}".encode()).hexdigest()[:12]
        cell_id, n = digest, 1
        while cell_id in seen:  # two identical cells: keep ids unique within the notebook
            n += 1
            cell_id = f"{digest}-{n}"
        seen.add(cell_id)
        if role == "check":
            meta = _nbgrader(f"lesson{nn}_{cell.check_id}", grade=True, points=cell.points)
        elif role == "solution":
            solutions += 1
            functions = defined_functions(source)
            meta = _nbgrader(f"lesson{nn}_solution_{functions[0] if functions else solutions}",
                             solution=True, locked=False)  # fmt: skip
        elif role == "setup":
            meta = _nbgrader(f"lesson{nn}_setup")
        else:
            meta = _nbgrader(f"lesson{nn}_{'md' if kind == 'markdown' else 'code'}_{cell_id}")
        where = f"line {cell.line}" if cell is not None else "the setup cell"
        if meta["grade_id"] in grade_ids:
            raise LessonError(
                f"{name}, {where}: grade id '{meta['grade_id']}' is also the id of the cell at "
                f"{grade_ids[meta['grade_id']]}; rename the check or the function"
            )
        grade_ids[meta["grade_id"]] = where
        nb_cell = {
            "cell_type": kind,
            "id": cell_id,
            "metadata": {"nbgrader": meta},
            "source": _source_lines(source),
        }
        if kind == "code":
            nb_cell.update(execution_count=None, outputs=[])
        cells.append(nb_cell)
    metadata = {"kernelspec": dict(_KERNELSPEC), "language_info": {"name": "python"}}
    if LESSON_RE.match(Path(name).name):
        metadata["minimoe"] = {"lesson": Path(name).stem}
    return {"cells": cells, "metadata": metadata, "nbformat": 4, "nbformat_minor": 5}


def _split(value):
    return value.splitlines(keepends=True) if isinstance(value, str) else value


def notebook_text(nb: dict) -> str:
    """The notebook as JSON text, laid out the way Jupyter writes it (text split into lines, keys
    sorted, one-space indent), so saving it in Jupyter without running anything changes nothing."""
    nb = copy.deepcopy(nb)
    for cell in nb["cells"]:
        cell["source"] = _split(cell["source"])
        for out in cell.get("outputs", []):
            if "text" in out:
                out["text"] = _split(out["text"])
            for key, value in out.get("data", {}).items():
                if key.startswith("text/"):
                    out["data"][key] = _split(value)
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def skeleton(nb: dict) -> dict:
    """The notebook without what execution adds: no outputs or execution counts, cell metadata
    reduced to nbgrader's, notebook metadata reduced to what `py_to_notebook` writes."""
    out = {k: copy.deepcopy(v) for k, v in nb.items() if k != "cells"}
    meta = nb.get("metadata", {})
    out["metadata"] = {"kernelspec": meta.get("kernelspec"), "language_info": {"name": "python"}}
    if "minimoe" in meta:
        out["metadata"]["minimoe"] = copy.deepcopy(meta["minimoe"])
    out["cells"] = []
    for cell in nb.get("cells", []):
        c = {
            k: copy.deepcopy(v)
            for k, v in cell.items()
            if k not in ("outputs", "execution_count", "metadata")
        }
        c["source"] = "".join(c["source"]) if isinstance(c.get("source"), list) else c.get("source", "")
        c["metadata"] = (
            {"nbgrader": copy.deepcopy(cell["metadata"]["nbgrader"])}
            if "nbgrader" in cell.get("metadata", {})
            else {}
        )
        if cell.get("cell_type") == "code":
            c.update(execution_count=None, outputs=[])
        out["cells"].append(c)
    return out


def handout(nb: dict) -> dict:
    """The student notebook of a (solution) notebook: solution regions stubbed, hidden tests
    removed, no outputs. Cell ids and nbgrader metadata stay, so a submission made from it
    matches its lesson cell by cell."""
    nb = cleared(nb)
    nn = lesson_number(nb.get("metadata", {}).get("minimoe", {}).get("lesson", "NN") + ".py")
    for cell in nb["cells"]:
        text = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        if cell["cell_type"] == "code":
            cell["source"] = _source_lines(student_source(text, nn))
    return nb


def cleared(nb: dict) -> dict:
    """A copy of the notebook with every output and execution count removed (a handout)."""
    nb = copy.deepcopy(nb)
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell.update(execution_count=None, outputs=[])
    return nb


def grade_cells(nb: dict) -> list[dict]:
    """The graded check cells of a notebook (nbgrader grade: true), in order."""
    return [c for c in nb["cells"] if c.get("metadata", {}).get("nbgrader", {}).get("grade")]
