"""Lessons: the converter, notebooks in sync with their sources, and every lesson run top to bottom.

Every lessons/NN_slug.py is picked up automatically. For each lesson:
  - the committed NN_slug.ipynb equals what `python -m minimoe.lessons build` writes, with no outputs;
  - the solution notebook executes without error (nbclient + ipykernel, MPLBACKEND=Agg);
  - the student notebook (solution regions replaced by stubs) fails with NotImplementedError.
Each lesson's wall time is printed at the end of the session and written to lesson_times.json in
pytest's base temp dir; it is reported, never asserted.
"""

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from minimoe import lessons as L

ROOT = Path(__file__).resolve().parent.parent
LESSONS = ROOT / "lessons"
LESSON_FILES = L.lesson_files(LESSONS) if LESSONS.is_dir() else []
STEMS = [p.stem for p in LESSON_FILES]
CELL_TIMEOUT = 180  # seconds per cell

SAMPLE = '''# %% [markdown]
# # Lesson 07 — Sample
#
# Some *prose* with $x^2$.

# %%
import numpy as np


# %%
def square(x):
    """x -> x**2."""
    ### BEGIN SOLUTION
    y = x * x
    ### END SOLUTION
    return y


# %% [markdown]
# ## Check

# %%
assert square(3) == 9
'''


# ---------------------------------------------------------------------------------------------
# the converter
# ---------------------------------------------------------------------------------------------


def test_split_cells_reads_markdown_and_code():
    cells = L.split_cells(SAMPLE)
    assert [kind for kind, _ in cells] == ["markdown", "code", "code", "markdown", "code"]
    assert cells[0][1] == "# Lesson 07 — Sample\n\nSome *prose* with $x^2$."
    assert cells[1][1] == "import numpy as np"  # blank separator lines dropped
    assert cells[2][1].startswith("def square(x):") and cells[2][1].endswith("return y")
    assert cells[3][1] == "## Check"


def test_text_before_the_first_marker_becomes_a_code_cell():
    assert L.split_cells("x = 1\n\n# %%\ny = 2\n") == [("code", "x = 1"), ("code", "y = 2")]
    assert L.split_cells("\n\n# %%\ny = 2\n") == [("code", "y = 2")]


def test_py_to_notebook_structure():
    nb = L.py_to_notebook(SAMPLE)
    assert nb["nbformat"] == 4 and nb["nbformat_minor"] == 5
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    md = [c for c in nb["cells"] if c["cell_type"] == "markdown"]
    assert len(code) == 3 and len(md) == 2
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    assert all("outputs" not in c for c in md)
    # nbformat's line convention: every line but the last ends in a newline
    src = md[0]["source"]
    assert src == ["# Lesson 07 — Sample\n", "\n", "Some *prose* with $x^2$."]
    ids = [c["id"] for c in nb["cells"]]
    assert len(set(ids)) == len(ids)
    assert L.py_to_notebook(SAMPLE) == nb  # deterministic, ids included


def test_identical_cells_get_distinct_ids():
    nb = L.py_to_notebook("# %%\nx = 1\n\n# %%\nx = 1\n")
    assert nb["cells"][0]["id"] != nb["cells"][1]["id"]


def test_notebook_is_valid_nbformat():
    nbformat = pytest.importorskip("nbformat", reason="nbformat validates the generated notebook")
    nbformat.validate(nbformat.reads(L.notebook_text(L.py_to_notebook(SAMPLE)), as_version=4))


def test_notebook_text_is_jupyter_layout():
    text = L.notebook_text(L.py_to_notebook(SAMPLE))
    assert text.endswith("}\n") and "—" in text  # trailing newline, non-ASCII kept as is
    assert json.loads(text) == L.py_to_notebook(SAMPLE)


def test_markdown_line_that_is_not_a_comment_is_an_error():
    with pytest.raises(L.LessonError, match=r"line 3: a markdown cell line must start with '# '"):
        L.split_cells("# %% [markdown]\n# fine\nnot a comment\n")


def test_student_version_replaces_regions_at_their_indentation():
    student = L.make_student(SAMPLE, "07")
    assert '    raise NotImplementedError("Lesson 07: your code here")\n    return y\n' in student
    assert "BEGIN SOLUTION" not in student and "END SOLUTION" not in student and "y = x * x" not in student
    # everything outside the region is unchanged
    assert student.replace(
        '    raise NotImplementedError("Lesson 07: your code here")\n', ""
    ) == SAMPLE.replace("    ### BEGIN SOLUTION\n    y = x * x\n    ### END SOLUTION\n", "")
    exec(compile(SAMPLE, "solution", "exec"), {})  # the check passes on the solution ...
    with pytest.raises(NotImplementedError, match="Lesson 07"):
        exec(compile(student, "student", "exec"), {})  # ... and fails on the stub


def test_two_regions_and_top_level_region():
    text = "\n".join(
        ["# %%", "### BEGIN SOLUTION", "a = 1", "### END SOLUTION", "", "# %%", "if True:",
         "  ### BEGIN SOLUTION", "  b = 2", "  ### END SOLUTION"]
    )  # fmt: skip
    student = L.make_student(text, "03")
    assert student.splitlines() == [
        "# %%",
        'raise NotImplementedError("Lesson 03: your code here")',
        "",
        "# %%",
        "if True:",
        '  raise NotImplementedError("Lesson 03: your code here")',
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ("# %%\n### BEGIN SOLUTION\nx = 1\n", r"line 2: '### BEGIN SOLUTION' is never closed"),
        ("# %%\nx = 1\n### END SOLUTION\n", r"line 3: '### END SOLUTION' without a '### BEGIN SOLUTION'"),
        ("# %%\n### BEGIN SOLUTION\n### BEGIN SOLUTION\n", r"line 3: '### BEGIN SOLUTION' inside the region"),
        ("# %%\n### BEGIN SOLUTION\n# %%\n### END SOLUTION\n", r"line 2: the solution region is not closed"),
        ("# %%\nx = 1\n", r"has no '### BEGIN SOLUTION' \.\.\. '### END SOLUTION' region"),
    ],
)
def test_marker_errors(text, message):
    with pytest.raises(L.LessonError, match=message):
        L.make_student(text, "01", "demo.py")


def _lesson_dir(tmp_path, text=SAMPLE, name="07_sample.py"):
    d = tmp_path / "lessons"
    d.mkdir()
    (d / name).write_text(text, encoding="utf-8")
    (d / "helper.py").write_text("x = 1\n")  # not a lesson: ignored
    return d


def test_build_is_deterministic_and_check_detects_drift(tmp_path, capsys):
    d = _lesson_dir(tmp_path)
    assert L.main(["check", "--lessons", str(d)]) == 1
    assert "07_sample.ipynb is missing" in capsys.readouterr().out
    assert L.main(["build", "--lessons", str(d)]) == 0
    nb = d / "07_sample.ipynb"
    first = nb.read_bytes()
    assert not (d / "helper.ipynb").exists()
    assert L.build(d) == []  # nothing changes on a second build
    assert nb.read_bytes() == first
    assert L.main(["check", "--lessons", str(d)]) == 0
    capsys.readouterr()
    (d / "07_sample.py").write_text(SAMPLE.replace("Some", "More"), encoding="utf-8")
    assert L.main(["check", "--lessons", str(d)]) == 1
    assert "07_sample.ipynb is out of date with" in capsys.readouterr().out
    (d / "07_sample.py").unlink()
    assert L.main(["check", "--lessons", str(d)]) == 1
    assert "has no source 07_sample.py" in capsys.readouterr().out


def test_student_command_writes_py_and_ipynb(tmp_path, capsys):
    d = _lesson_dir(tmp_path)
    out = tmp_path / "student"
    assert L.main(["student", str(out), "--lessons", str(d)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["07_sample.ipynb", "07_sample.py"]
    py = (out / "07_sample.py").read_text(encoding="utf-8")
    assert 'raise NotImplementedError("Lesson 07: your code here")' in py
    assert json.loads((out / "07_sample.ipynb").read_text(encoding="utf-8")) == L.py_to_notebook(py)
    assert L.main(["student", str(d), "--lessons", str(d)]) == 2  # refuses to overwrite the sources
    assert "is the lessons directory" in capsys.readouterr().err


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert L.main(["build", "--lessons", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: lessons directory") and err.count("\n") == 1
    d = _lesson_dir(tmp_path, "# %%\nx = 1\n", "01_bad.py")
    assert L.main(["build", "--lessons", str(d)]) == 2
    err = capsys.readouterr().err
    assert "01_bad.py has no '### BEGIN SOLUTION'" in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# the lessons in lessons/
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stem", STEMS)
def test_notebook_in_sync_with_source(stem):
    py = LESSONS / f"{stem}.py"
    ipynb = py.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} is missing; run `python -m minimoe.lessons build`"
    assert ipynb.read_bytes() == L.expected_notebook(py).encode("utf-8"), (
        f"{ipynb.name} is out of date with {py.name}; run `python -m minimoe.lessons build`"
    )
    nb = json.loads(ipynb.read_text(encoding="utf-8"))
    try:
        import nbformat
    except ImportError:  # optional: the byte comparison above is the real check
        pass
    else:
        nbformat.validate(nbformat.reads(ipynb.read_text(encoding="utf-8"), as_version=4))
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None


@pytest.mark.parametrize("stem", STEMS)
def test_lesson_format(stem):
    text = (LESSONS / f"{stem}.py").read_text(encoding="utf-8")
    cells = L.split_cells(text)
    number = stem[:2]
    assert cells[0][0] == "markdown" and cells[0][1].startswith(f"# Lesson {number} — "), (
        f"the first cell must be the title '# Lesson {number} — Title'"
    )
    assert any(kind == "markdown" and "Exercises" in src for kind, src in cells), "no Exercises section"
    compile(text, stem, "exec")
    compile(L.make_student(text, number, stem), f"{stem} (student)", "exec")


def _execute(nb_path: Path, workdir: Path):
    """Run a notebook top to bottom in workdir; returns (wall seconds, None or (ename, evalue))."""
    pytest.importorskip("ipykernel", reason="ipykernel provides the python3 kernel the lessons run on")
    nbclient = pytest.importorskip("nbclient", reason="nbclient executes the lesson notebooks")
    import nbformat

    nb = nbformat.read(str(nb_path), as_version=4)
    env = dict(os.environ, MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    # The lessons' matrices are tiny: one BLAS thread is as fast, and avoids OpenBLAS threads
    # spinning against each other when the tests share the CPU with other work.
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    )
    t0 = time.perf_counter()
    try:
        client.execute(env=env)
        error = None
    except nbclient.exceptions.CellExecutionError as e:
        error = (e.ename, e.evalue)
    return time.perf_counter() - t0, error


@pytest.fixture(scope="module")
def runs(tmp_path_factory, request):
    """Executes each lesson's solution and student notebooks at most once per session."""
    solution_dir = tmp_path_factory.mktemp("lessons_solution")
    student_dir = tmp_path_factory.mktemp("lessons_student")
    shutil.copytree(LESSONS, solution_dir, dirs_exist_ok=True)
    L.write_student(student_dir, LESSONS)
    results = {}

    def run(kind, stem):
        if (kind, stem) not in results:
            d = solution_dir if kind == "solution" else student_dir
            results[kind, stem] = _execute(d / f"{stem}.ipynb", d)
        return results[kind, stem]

    yield run
    if not results:
        return
    times = {
        f"{stem} ({kind})": round(t, 2) for (kind, stem), (t, _) in sorted(results.items(), key=_by_stem)
    }
    path = tmp_path_factory.getbasetemp() / "lesson_times.json"
    path.write_text(json.dumps(times, indent=1) + "\n")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # print past pytest's output capture
            reporter.write("\n")
            reporter.write_line(f"lesson wall times in seconds (also in {path}):")
            for name, t in times.items():
                reporter.write_line(f"  {name:34s} {t:6.1f}")


def _by_stem(item):
    (kind, stem), _ = item
    return stem, kind


@pytest.mark.parametrize("stem", STEMS)
def test_solution_notebook_runs(runs, stem):
    wall, error = runs("solution", stem)
    print(f"{stem}: {wall:.1f} s")
    assert error is None, f"{stem}.ipynb failed: {error[0]}: {error[1]}"


@pytest.mark.parametrize("stem", STEMS)
def test_student_notebook_fails_on_its_stubs(runs, stem):
    _, error = runs("solution", stem)
    assert error is None, f"the solution of {stem} must pass before its student version is meaningful"
    wall, error = runs("student", stem)
    print(f"{stem} (student): {wall:.1f} s")
    assert error is not None, (
        f"the student version of {stem} ran to the end: a check cell must call the stubs"
    )
    assert error[0] == "NotImplementedError", (
        f"the student version of {stem} failed with {error[0]}: {error[1]}"
    )
