"""Grading a submitted lesson notebook without nbgrader.

The submission is matched to its lesson (notebook metadata, else file name) and rebuilt the way
nbgrader's autograde does it: every locked cell (prose, demos, the graded checks with their hidden
tests) comes from the official lesson notebook, only the learner's solution cells and any cells
they added come from the submission. It runs top to bottom in a scratch directory holding the
lesson's .npz, with every cell run even after an error. A check earns its points when its cell
raises nothing and the learner functions it exercises did not hand their work to the package's
own function of the same name (guard.py watches for that).
"""

from __future__ import annotations

import ast
import json
import shutil
import tempfile
from pathlib import Path

from minimoe.lessons.build import notebook_dirs
from minimoe.lessons.execute import run_notebook
from minimoe.lessons.guard import MARKER
from minimoe.lessons.markup import LESSON_RE, LessonError, defined_functions
from minimoe.lessons.notebook import cleared


def _read_notebook(path: Path) -> dict:
    if not path.is_file():
        raise LessonError(f"submission '{path}' does not exist or is not a file")
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise LessonError(
            f"'{path}' is not a Jupyter notebook: it is not JSON ({str(e).splitlines()[0]})"
        ) from None
    cells = nb.get("cells") if isinstance(nb, dict) else None
    if not isinstance(cells, list) or not all(isinstance(c, dict) and "cell_type" in c for c in cells):
        raise LessonError(f"'{path}' is not a Jupyter notebook: it has no list of cells")
    for c in cells:
        c["source"] = (
            "".join(c.get("source", [])) if isinstance(c.get("source"), list) else c.get("source", "")
        )
    return nb


def _meta(cell: dict) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def find_lesson(nb: dict, path: Path, lessons_dir=None) -> Path:
    """The official notebook of the lesson a submission belongs to."""
    stem = nb.get("metadata", {}).get("minimoe", {}).get("lesson") or path.stem
    dirs = [Path(lessons_dir)] if lessons_dir is not None else notebook_dirs()
    for d in dirs:
        if LESSON_RE.match(f"{stem}.py") and (d / f"{stem}.ipynb").is_file():
            return d / f"{stem}.ipynb"
    ids = {_meta(c).get("grade_id", "") for c in nb["cells"]}
    for d in dirs:  # a renamed file: match the lesson number in its grade ids
        for candidate in sorted(d.glob("[0-9][0-9]_*.ipynb")):
            if f"lesson{candidate.name[:2]}_setup" in ids:
                return candidate
    where = " or ".join(map(str, dirs)) or "the installed package (no lessons found)"
    raise LessonError(
        f"cannot tell which lesson '{path}' is: no lesson '{stem}' in {where}; pass --lessons DIR"
    )


def graded_notebook(official: dict, submission: dict) -> dict:
    """The official notebook with the learner's solution cells and added cells put in."""
    official_ids = {_meta(c).get("grade_id") for c in official["cells"]} - {None}
    learner, added, last = {}, {}, None
    for cell in submission["cells"]:
        gid = _meta(cell).get("grade_id")
        if gid in official_ids:
            last = gid
            learner[gid] = cell["source"]
        else:  # a cell the learner added (or one nbgrader did not know): keep it where it was
            n = sum(map(len, added.values()))
            added.setdefault(last, []).append(
                {"cell_type": cell["cell_type"], "id": f"added-{n}", "metadata": {}, "source": cell["source"]}
            )
    cells = list(added.get(None, []))
    for cell in official["cells"]:
        meta = _meta(cell)
        cell = dict(cell)
        if meta.get("solution"):
            cell["source"] = learner.get(
                meta["grade_id"], 'raise NotImplementedError("this cell is missing from the submission")'
            )
        cells.append(cell)
        cells.extend(added.get(meta.get("grade_id"), []))
    for cell in cells:
        if cell["cell_type"] == "code":
            cell.setdefault("outputs", [])
            cell.setdefault("execution_count", None)
    return dict(cleared(dict(official, cells=cells)))


def _code_cell(source: str, cell_id: str) -> dict:
    return {
        "cell_type": "code",
        "execution_count": None,
        "id": cell_id,
        "metadata": {},
        "outputs": [],
        "source": source,
    }


def learner_functions(nb: dict) -> list[str]:
    """The functions the learner writes: those defined in the notebook's solution cells."""
    cells = [c for c in nb["cells"] if _meta(c).get("solution")]
    return [f for c in cells for f in defined_functions("".join(c["source"]))]


def with_guard(nb: dict, functions) -> dict:
    """The notebook between two extra cells: guard.watch(functions) first, guard.report() last."""
    watch = f"from minimoe.lessons import guard\nguard.watch({list(functions)!r})"
    cells = [_code_cell(watch, "guard-watch"), *nb["cells"], _code_cell("guard.report()", "guard-report")]
    return dict(nb, cells=cells)


def guard_report(nb: dict) -> dict:
    """{learner function: package function it used} from an executed `with_guard` notebook."""
    for out in nb["cells"][-1].get("outputs", []):
        for line in "".join(out.get("text", "")).splitlines():
            if line.startswith(MARKER):
                return json.loads(line[len(MARKER) :])
    return {}


def _names(source: str) -> set:
    try:
        return {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name)}
    except SyntaxError:
        return set()


def _first_line(text: str) -> str:
    lines = [line for line in str(text).splitlines() if line.strip()]
    return lines[0].strip() if lines else ""


def grade(submission, lessons_dir=None, timeout: int = 300) -> dict:
    """Execute a submission and score it; returns the report as a dict (see format_report)."""
    path = Path(submission)
    nb = _read_notebook(path)
    official_path = find_lesson(nb, path, lessons_dir)
    official = _read_notebook(official_path)
    functions = learner_functions(official)
    graded = with_guard(graded_notebook(official, nb), functions)
    with tempfile.TemporaryDirectory(prefix="minimoe_grade_") as tmp:
        npz = official_path.with_suffix(".npz")
        if npz.exists():
            shutil.copy2(npz, Path(tmp) / npz.name)
        run = run_notebook(graded, tmp, timeout=timeout, allow_errors=True)
    used = guard_report(run.nb)
    checks, lesson_nn = [], official_path.name[:2]
    for i, cell in enumerate(run.nb["cells"]):
        meta = _meta(cell)
        if not meta.get("grade"):
            continue
        check_id = meta["grade_id"].removeprefix(f"lesson{lesson_nn}_")
        exercised = ({check_id} | _names(cell["source"])) & set(functions)
        cheats = sorted(f"{name} calls {used[name]}" for name in exercised if name in used)
        if cell.get("execution_count") is None:
            message = f"not run: {run.stopped or 'execution stopped before this cell'}"
        elif i in run.errors:
            ename, evalue = run.errors[i]
            message = _first_line(evalue) if ename == "CheckFailed" else f"{ename}: {_first_line(evalue)}"
        elif cheats:
            message = f"uses the package's own implementation ({'; '.join(cheats)}); write it yourself"
        else:
            message = ""
        passed = not message
        points = float(meta.get("points", 0))
        checks.append(
            {"id": check_id, "grade_id": meta["grade_id"], "passed": passed, "points": points if passed else 0.0,
             "max_points": points, "message": message, "uses_package": cheats}
        )  # fmt: skip
    return {
        "submission": str(path),
        "lesson": official_path.stem,
        "score": sum(c["points"] for c in checks),
        "max_score": sum(c["max_points"] for c in checks),
        "checks": checks,
        "seconds": round(run.seconds, 1),
        "stopped": run.stopped,
    }


def _num(x: float) -> str:
    return f"{x:g}"


def format_report(report: dict) -> str:
    """The report as text: one line per check, then the total."""
    lines = [f"{report['submission']}: lesson {report['lesson']}"]
    width = max((len(c["id"]) for c in report["checks"]), default=0)
    for c in report["checks"]:
        status = "pass" if c["passed"] else "FAIL"
        score = f"{_num(c['points'])}/{_num(c['max_points'])}"
        lines.append(f"  {status} {score:>7}  {c['id']:<{width}}  {c['message']}".rstrip())
    if report["stopped"]:
        lines.append(f"  execution stopped early: {report['stopped']}")
    lines.append(f"score {_num(report['score'])}/{_num(report['max_score'])}")
    return "\n".join(lines)
