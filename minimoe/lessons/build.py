"""Building the lessons: reference values (.npz), executed notebooks, handouts, and the CI check.

For every lessons/NN_slug.py:
  - NN_slug.npz holds what the source's `# %% references` cell returns (the values the checks
    compare with, computed by the package's own functions); it is rewritten only when its
    contents change (np.savez stamps the time into the bytes, so contents are compared);
  - NN_slug.ipynb is the notebook of the source (notebook.py), executed, so it carries its
    printed numbers and figures. Outputs may differ run to run; the cells may not.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from minimoe.lessons.execute import run_notebook
from minimoe.lessons.markup import LESSON_RE, LessonError, lesson_number, make_student, parse_cells
from minimoe.lessons.notebook import handout, notebook_text, py_to_notebook, skeleton

PACKAGED = Path(__file__).resolve().parent / "notebooks"  # the lessons inside an installed wheel
CHECKOUT = Path(__file__).resolve().parents[2] / "lessons"  # the lessons of a source checkout


def lesson_files(lessons_dir) -> list[Path]:
    """Every lessons_dir/NN_slug.py, sorted by name."""
    d = Path(lessons_dir)
    if not d.is_dir():
        raise LessonError(
            f"lessons directory '{d}' does not exist; run from the repository root or pass --lessons DIR"
        )
    return sorted(p for p in d.iterdir() if p.is_file() and LESSON_RE.match(p.name))


def notebook_dirs() -> list[Path]:
    """Where built lesson notebooks can be found: the installed package data, else the checkout."""
    return [d for d in (PACKAGED, CHECKOUT) if any(d.glob("[0-9][0-9]_*.ipynb"))]


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _write_if_changed(path: Path, text: str) -> bool:
    if path.exists() and path.read_bytes() == text.encode("utf-8"):
        return False
    path.write_bytes(text.encode("utf-8"))
    return True


def expected_notebook(py_path) -> dict:
    """The notebook `build` writes for one source, before execution (validates the markup)."""
    py_path = Path(py_path)
    text = _read(py_path)
    make_student(text, lesson_number(py_path.name), str(py_path))  # every region must make a handout
    return py_to_notebook(text, str(py_path))


# ---------------------------------------------------------------------------------------------
# reference values
# ---------------------------------------------------------------------------------------------


def references(py_path) -> dict | None:
    """{key: array} from running the source's references cell, or None if it has none."""
    py_path = Path(py_path)
    cells = [c for c in parse_cells(_read(py_path), str(py_path)) if c.role == "references"]
    if not cells:
        return None
    where = f"{py_path}, line {cells[0].line}"
    namespace = {"__name__": f"minimoe_references_{py_path.stem}"}
    exec(compile(cells[0].source, f"{py_path} (references cell)", "exec"), namespace)
    if not callable(namespace.get("references")):
        raise LessonError(f"{where}: the references cell must define a function references()")
    values = namespace["references"]()
    if not isinstance(values, dict) or not values:
        raise LessonError(
            f"{where}: references() must return a non-empty dict of arrays, got {type(values).__name__}"
        )
    arrays = {}
    for key, value in values.items():
        array = np.asarray(value)
        if not isinstance(key, str) or not key.replace("_", "").replace(".", "").isalnum():
            raise LessonError(f"{where}: reference key {key!r} must be letters, digits, '_' or '.'")
        if array.dtype.kind not in "biufcU":
            raise LessonError(
                f"{where}: reference {key!r} has dtype {array.dtype}, which needs pickle to store"
            )
        arrays[key] = array
    return arrays


def load_npz(path) -> dict:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def npz_difference(path, arrays: dict) -> str | None:
    """Why the file at path does not hold `arrays` (None when it does, up to a few float ulps:
    BLAS may round the last bits differently on another machine)."""
    path = Path(path)
    if not path.exists():
        return f"{path} is missing"
    stored = load_npz(path)
    if set(stored) != set(arrays):
        return f"{path} has keys {sorted(stored)}, the references cell gives {sorted(arrays)}"
    for key, new in arrays.items():
        old = stored[key]
        if old.dtype != new.dtype or old.shape != new.shape:
            return (
                f"{path}: '{key}' is {old.dtype}{old.shape}, the references cell gives {new.dtype}{new.shape}"
            )
        if new.dtype.kind in "fc":
            eps = 64 * np.finfo(new.dtype).eps
            scale = float(np.abs(new).max()) if new.size else 0.0
            same = np.allclose(old, new, rtol=eps, atol=eps * max(scale, 1.0), equal_nan=True)
        else:
            same = np.array_equal(old, new)
        if not same:
            return f"{path}: '{key}' differs from what the references cell gives"
    return None


# ---------------------------------------------------------------------------------------------
# build and check
# ---------------------------------------------------------------------------------------------


def _is_executed(nb: dict) -> bool:
    return all(c["execution_count"] is not None for c in nb["cells"] if c["cell_type"] == "code")


def execute_lesson(nb: dict, py_path: Path, timeout: int = 180):
    """Run a lesson notebook in a scratch directory that holds its .npz; raises LessonError
    naming the cell that failed. Returns the nbclient Run."""
    with tempfile.TemporaryDirectory(prefix="minimoe_lesson_") as tmp:
        npz = py_path.with_suffix(".npz")
        if npz.exists():
            shutil.copy2(npz, Path(tmp) / npz.name)
        run = run_notebook(nb, tmp, timeout=timeout)
    if run.errors or run.stopped:
        index, (ename, evalue) = next(iter(run.errors.items()), (None, ("", "")))
        lines = "".join(nb["cells"][index]["source"]).splitlines() if index is not None else []
        what = f"cell {index} ({lines[0][:60] if lines else 'empty'!r}) raised {ename}: {evalue}"
        raise LessonError(f"{py_path} does not run: {run.stopped or what}")
    return run


def build(lessons_dir="lessons", execute=True, force=False, log=print) -> list[Path]:
    """Write NN_slug.npz and NN_slug.ipynb for every NN_slug.py; returns the files that changed.

    A notebook whose cells already match its source, that was executed, and whose .npz did not
    change is left alone unless `force`; `execute=False` writes notebooks without outputs."""
    changed = []
    for py in lesson_files(lessons_dir):
        nb = expected_notebook(py)
        arrays, npz = references(py), py.with_suffix(".npz")
        if arrays is not None and npz_difference(npz, arrays):
            np.savez(npz, **arrays)
            changed.append(npz)
        elif arrays is None and npz.exists():
            npz.unlink()
            changed.append(npz)
        ipynb = py.with_suffix(".ipynb")
        current = _load_json(ipynb)
        fresh = (
            current is not None
            and skeleton(current) == skeleton(nb)
            and (_is_executed(current) or not execute)
        )
        if fresh and not force and npz not in changed:
            continue
        if execute:
            run = execute_lesson(nb, py)
            log(f"executed {py.name} in {run.seconds:.1f} s")
            nb = _normalized(run.nb, nb)
        if _write_if_changed(ipynb, notebook_text(nb)):
            changed.append(ipynb)
    return changed


def _load_json(path: Path):
    try:
        return json.loads(_read(path)) if path.exists() else None
    except ValueError:
        return None


def _normalized(executed: dict, expected: dict) -> dict:
    """The executed notebook with the cell and notebook metadata of `expected` (nbclient adds the
    kernel's language_info, which differs between Python versions)."""
    out = dict(executed, metadata=expected["metadata"])
    out["cells"] = [dict(c, metadata=e["metadata"]) for c, e in zip(executed["cells"], expected["cells"])]
    return out


def stale(lessons_dir="lessons") -> list[str]:
    """One line per notebook or .npz that is missing, out of date, unexecuted, or has no source."""
    problems = []
    files = lesson_files(lessons_dir)
    for py in files:
        ipynb, npz = py.with_suffix(".ipynb"), py.with_suffix(".npz")
        current = _load_json(ipynb)
        if current is None:
            problems.append(f"{ipynb} is missing or not JSON (its source {py} exists)")
        elif skeleton(current) != skeleton(expected_notebook(py)):
            problems.append(f"{ipynb} is out of date with {py}")
        elif not _is_executed(current):
            problems.append(f"{ipynb} was built without executing it (its outputs are missing)")
        arrays = references(py)
        if arrays is not None and npz_difference(npz, arrays):
            problems.append(npz_difference(npz, arrays))
        elif arrays is None and npz.exists():
            problems.append(f"{npz} exists but {py} has no '# %% references' cell")
    sources = {p.stem for p in files}
    for path in sorted(
        [*Path(lessons_dir).glob("[0-9][0-9]_*.ipynb"), *Path(lessons_dir).glob("[0-9][0-9]_*.npz")]
    ):
        if path.stem not in sources:
            problems.append(f"{path} has no source {path.stem}.py")
    return problems


# ---------------------------------------------------------------------------------------------
# handouts and copies
# ---------------------------------------------------------------------------------------------


def write_student(outdir, lessons_dir="lessons") -> list[Path]:
    """Write the handout of every lesson into outdir: NN_slug.py and NN_slug.ipynb with solution
    regions stubbed, hidden tests and references removed, no outputs; NN_slug.npz beside them."""
    files = lesson_files(lessons_dir)
    out = Path(outdir)
    if out.resolve() == Path(lessons_dir).resolve():
        raise LessonError(f"the student OUTDIR '{outdir}' is the lessons directory; pick another directory")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for py in files:
        text = make_student(_read(py), lesson_number(py.name), str(py))
        nb = handout(py_to_notebook(_read(py), str(py)))
        for path, content in ((out / py.name, text), (out / f"{py.stem}.ipynb", notebook_text(nb))):
            _write_if_changed(path, content)
            written.append(path)
        if py.with_suffix(".npz").exists():
            shutil.copy2(py.with_suffix(".npz"), out / f"{py.stem}.npz")
            written.append(out / f"{py.stem}.npz")
    return written


def copy_lessons(outdir, source=None, force=False) -> list[Path]:
    """Copy the built lesson notebooks, their .npz files and README into outdir (from the
    installed package data, else the checkout). Refuses to overwrite a file that differs."""
    dirs = [Path(source)] if source is not None else notebook_dirs()
    if not dirs or not any(dirs[0].glob("[0-9][0-9]_*.ipynb")):
        raise LessonError(
            f"no lesson notebooks found in {source or ' or '.join(map(str, (PACKAGED, CHECKOUT)))}; "
            "reinstall minimoe or pass --lessons DIR"
        )
    src, out = dirs[0], Path(outdir)
    names = [
        p for p in sorted(src.iterdir()) if LESSON_RE.match(p.stem + ".py") and p.suffix in (".ipynb", ".npz")
    ]
    names += [p for p in (src / "README.md", src / "TEACHING.md") if p.is_file()]
    for p in names:
        target = out / p.name
        if target.exists() and not force and target.read_bytes() != p.read_bytes():
            raise LessonError(f"{target} exists and differs from the lesson; pass --force to overwrite it")
    out.mkdir(parents=True, exist_ok=True)
    for p in names:
        shutil.copy2(p, out / p.name)
    return [out / p.name for p in names]
