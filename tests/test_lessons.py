"""Lessons: the markup and builder, notebooks in sync with their sources, every lesson run top to bottom.

Every lessons/NN_slug.py is picked up automatically. For each lesson:
  - the cells of the committed NN_slug.ipynb equal what `python -m minimoe.lessons build` makes of
    the source (outputs may differ run to run), the notebook was executed, and every cell that
    calls plt.show() carries its figure as an inline PNG;
  - the solution notebook executes without error (nbclient + ipykernel, MPLBACKEND=Agg);
  - in the handout (run up to its last check, every cell even after an error) every graded check
    fails with CheckFailed naming its function, "not written yet" (never a bare
    NotImplementedError traceback);
  - the solution never calls the package's own function of the same name as a learner function
    (the grader's guard watches the solution run).
Each lesson's wall time is printed at the end of the session and written to lesson_times.json in
pytest's base temp dir; it is reported, never asserted.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import on_host_only

from minimoe import lessons as L
from minimoe.lessons.execute import run_notebook
from minimoe.lessons.grade import guard_report, learner_functions, with_guard
from minimoe.lessons.markup import defined_functions

# the lessons' cells and checks run in this process too, where a learner's numpy code meets the
# package's arrays
pytestmark = on_host_only(
    "the lessons are NumPy-only: their cells and checks run learner numpy code in this process"
)

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

from minimoe.lessons.checks import CheckFailed, case, check_close, reference


# %%
def square(x):
    """x -> x**2."""
    ### BEGIN SOLUTION
    y = x * x
    ### END SOLUTION
    return y


# %% [markdown]
# ## Check

# %% check id=square points=2
with case("square", "x=0..3"):
    got = square(np.arange(4.0))
check_close("square", "x=0..3", "squares", got, reference("07", "squares"), 1e-12)
### BEGIN HIDDEN TESTS
with case("square", "x=-2"):
    if square(-2.0) != 4.0:
        raise CheckFailed("square, case x=-2: wrong sign handling")
### END HIDDEN TESTS

# %% references
import numpy as np


def references():
    return {"squares": np.arange(4.0) ** 2}
'''


def _meta(cell):
    return cell["metadata"]["nbgrader"]


# ---------------------------------------------------------------------------------------------
# the markup
# ---------------------------------------------------------------------------------------------


def test_split_cells_reads_markdown_and_code_without_references():
    cells = L.split_cells(SAMPLE)
    assert [kind for kind, _ in cells] == ["markdown", "code", "code", "markdown", "code"]
    assert cells[0][1] == "# Lesson 07 — Sample\n\nSome *prose* with $x^2$."
    assert cells[1][1].startswith("import numpy as np\n\nfrom minimoe")  # blank separator lines dropped
    assert cells[2][1].startswith("def square(x):") and cells[2][1].endswith("return y")
    assert cells[3][1] == "## Check"
    assert "def references" not in "".join(src for _, src in cells)


def test_parse_cells_gives_roles_ids_and_points():
    cells = L.parse_cells(SAMPLE)
    assert [c.role for c in cells] == ["markdown", "code", "solution", "markdown", "check", "references"]
    check = cells[4]
    assert (check.check_id, check.points, check.line) == ("square", 2, 24)
    assert cells[5].source.endswith('return {"squares": np.arange(4.0) ** 2}')


def test_text_before_the_first_marker_becomes_a_code_cell():
    assert L.split_cells("x = 1\n\n# %%\ny = 2\n") == [("code", "x = 1"), ("code", "y = 2")]
    assert L.split_cells("\n\n# %%\ny = 2\n") == [("code", "y = 2")]


def test_notebook_has_setup_cell_and_nbgrader_metadata():
    nb = L.py_to_notebook(SAMPLE, "lessons/07_sample.py")
    assert nb["nbformat"] == 4 and nb["nbformat_minor"] == 5
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    assert nb["metadata"]["minimoe"] == {"lesson": "07_sample"}
    kinds = [c["cell_type"] for c in nb["cells"]]
    assert kinds == ["markdown", "code", "code", "code", "markdown", "code"]  # setup cell inserted
    assert "".join(nb["cells"][1]["source"]) == L.SETUP_SOURCE
    metas = [_meta(c) for c in nb["cells"]]
    assert all(m["schema_version"] == 3 and m["task"] is False for m in metas)
    setup, solution, check = metas[1], metas[3], metas[5]
    assert setup == {"grade": False, "grade_id": "lesson07_setup", "locked": True, "schema_version": 3,
                     "solution": False, "task": False}  # fmt: skip
    assert solution["solution"] and not solution["locked"] and not solution["grade"]
    assert solution["grade_id"] == "lesson07_solution_square"
    assert check["grade"] and check["locked"] and not check["solution"]
    assert (check["grade_id"], check["points"]) == ("lesson07_square", 2)
    assert metas[0]["locked"] and metas[0]["grade_id"].startswith("lesson07_md_")
    assert metas[2]["locked"] and metas[2]["grade_id"].startswith("lesson07_code_")
    assert len({m["grade_id"] for m in metas}) == len(metas)
    assert "### BEGIN HIDDEN TESTS" in "".join(nb["cells"][5]["source"])  # the solution notebook keeps them
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    assert nb["cells"][0]["source"] == ["# Lesson 07 — Sample\n", "\n", "Some *prose* with $x^2$."]
    assert L.py_to_notebook(SAMPLE, "lessons/07_sample.py") == nb  # deterministic, ids included


def test_nbgrader_accepts_the_metadata():
    pytest.importorskip("nbgrader", reason="nbgrader's own validator checks the cell metadata")
    import nbformat
    from nbgrader.nbgraderformat import MetadataValidator

    nb = nbformat.reads(L.notebook_text(L.py_to_notebook(SAMPLE, "07_sample.py")), as_version=4)
    MetadataValidator().validate_nb(nb)


def test_identical_cells_get_distinct_ids():
    nb = L.py_to_notebook("# %%\nx = 1\n\n# %%\nx = 1\n", setup=False)
    assert nb["cells"][0]["id"] != nb["cells"][1]["id"]
    assert _meta(nb["cells"][0])["grade_id"] != _meta(nb["cells"][1])["grade_id"]


def test_notebook_is_valid_nbformat():
    nbformat = pytest.importorskip("nbformat", reason="nbformat validates the generated notebook")
    nbformat.validate(nbformat.reads(L.notebook_text(L.py_to_notebook(SAMPLE)), as_version=4))


def test_notebook_text_is_jupyter_layout():
    text = L.notebook_text(L.py_to_notebook(SAMPLE))
    assert text.endswith("}\n") and "—" in text  # trailing newline, non-ASCII kept as is
    assert json.loads(text) == L.py_to_notebook(SAMPLE)
    nb = L.py_to_notebook(SAMPLE)
    nb["cells"][1]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "a\nb\n"}]
    assert json.loads(L.notebook_text(nb))["cells"][1]["outputs"][0]["text"] == ["a\n", "b\n"]
    assert L.skeleton(json.loads(L.notebook_text(nb))) == L.skeleton(L.py_to_notebook(SAMPLE))


def test_markdown_line_that_is_not_a_comment_is_an_error():
    with pytest.raises(L.LessonError, match=r"line 3: a markdown cell line must start with '# '"):
        L.split_cells("# %% [markdown]\n# fine\nnot a comment\n")


def test_student_version_stubs_solutions_drops_hidden_tests_and_references():
    student = L.make_student(SAMPLE, "07")
    assert '    raise NotImplementedError("Lesson 07: your code here")\n    return y\n' in student
    for gone in (
        "BEGIN SOLUTION",
        "END SOLUTION",
        "y = x * x",
        "HIDDEN TESTS",
        "square(-2.0)",
        "def references",
    ):
        assert gone not in student
    assert "# %% check id=square points=2\n" in student and "check_close(" in student
    assert [c.role for c in L.parse_cells(student)] == ["markdown", "code", "code", "markdown", "check"]
    # the student notebook keeps the grade ids of the solution notebook
    solution_nb = L.py_to_notebook(SAMPLE, "07_sample.py")
    handout = L.handout(solution_nb)
    assert [_meta(c) for c in handout["cells"]] == [_meta(c) for c in solution_nb["cells"]]
    assert [c["id"] for c in handout["cells"]] == [c["id"] for c in solution_nb["cells"]]
    assert "".join(handout["cells"][3]["source"]) == L.split_cells(student)[2][1]
    assert "".join(handout["cells"][5]["source"]) == L.split_cells(student)[4][1]


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
    ids = [_meta(c)["grade_id"] for c in L.py_to_notebook(text, "03_x.py", setup=False)["cells"]]
    assert ids == ["lesson03_solution_1", "lesson03_solution_2"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("# %%\n### BEGIN SOLUTION\nx = 1\n", r"line 2: '### BEGIN SOLUTION' is not closed"),
        ("# %%\nx = 1\n### END SOLUTION\n", r"line 3: '### END SOLUTION' without a '### BEGIN SOLUTION'"),
        ("# %%\n### BEGIN SOLUTION\n### BEGIN SOLUTION\n", r"line 3: '### BEGIN SOLUTION' inside the region"),
        ("# %%\n### BEGIN SOLUTION\n# %%\n### END SOLUTION\n", r"line 2: '### BEGIN SOLUTION' is not closed"),
        ("# %%\nx = 1\n", r"has no '### BEGIN SOLUTION' \.\.\. '### END SOLUTION' region"),
        ("# %% chek id=a points=1\n", r"line 1: unknown cell header '# %% chek id=a points=1'"),
        ("# %% check id=A points=1\n", r"line 1: check id 'A' must be lowercase"),
        ("# %% check id=a points=0\n", r"line 1: check points '0' must be a whole number of at least 1"),
        ("# %% check id=a\n", r"line 1: check points '' must be"),
        ("# %% check id=a points=1 weight=2\n", r"line 1: bad check header field 'weight=2'"),
        ("# %% check id=a points=1\n\n# %% check id=a points=2\n", r"line 3: check id 'a' is used twice"),
        (
            "# %% check id=a points=1\n### BEGIN SOLUTION\n### END SOLUTION\n",
            r"line 2: a solution region belongs",
        ),
        (
            "# %%\n### BEGIN HIDDEN TESTS\n### END HIDDEN TESTS\n",
            r"line 2: a hidden-test region belongs in a check",
        ),
        ("# %% [markdown]\n# write `### BEGIN SOLUTION` here\n", r"line 2: mentions a region marker"),
        ("# %% references\n\n# %% references\n", r"line 3: a lesson has at most one"),
    ],
)
def test_markup_errors(text, message):
    with pytest.raises(L.LessonError, match=message):
        L.make_student(text, "01", "demo.py")


def test_grade_id_clash_is_an_error():
    text = "# %%\ndef f():\n    ### BEGIN SOLUTION\n    pass\n    ### END SOLUTION\n\n# %% check id=solution_f points=1\nf()\n"
    with pytest.raises(
        L.LessonError, match=r"grade id 'lesson01_solution_f' is also the id of the cell at line 1"
    ):
        L.py_to_notebook(text, "01_x.py")


# ---------------------------------------------------------------------------------------------
# the commands, on a throwaway lessons directory
# ---------------------------------------------------------------------------------------------


def _lesson_dir(tmp_path, text=SAMPLE, name="07_sample.py"):
    d = tmp_path / "lessons"
    d.mkdir()
    (d / name).write_text(text, encoding="utf-8")
    (d / "helper.py").write_text("x = 1\n")  # not a lesson: ignored
    return d


def test_build_without_executing_and_check_detects_drift(tmp_path, capsys):
    d = _lesson_dir(tmp_path)
    assert L.main(["check", "--lessons", str(d)]) == 1
    out = capsys.readouterr().out
    assert "07_sample.ipynb is missing" in out and "07_sample.npz is missing" in out
    assert L.main(["build", "--no-execute", "--lessons", str(d)]) == 0
    nb, npz = d / "07_sample.ipynb", d / "07_sample.npz"
    with np.load(npz, allow_pickle=False) as data:
        assert data.files == ["squares"] and data["squares"].tolist() == [0.0, 1.0, 4.0, 9.0]
    first = nb.read_bytes()
    assert not (d / "helper.ipynb").exists()
    assert L.build(d, execute=False) == []  # nothing changes on a second build, npz included
    assert nb.read_bytes() == first
    capsys.readouterr()
    assert L.main(["check", "--lessons", str(d)]) == 1  # never executed
    assert "was built without executing it" in capsys.readouterr().out
    (d / "07_sample.py").write_text(SAMPLE.replace("Some", "More"), encoding="utf-8")
    assert L.main(["check", "--lessons", str(d)]) == 1
    assert "07_sample.ipynb is out of date with" in capsys.readouterr().out
    (d / "07_sample.py").write_text(SAMPLE.replace("** 2}", "** 3}"), encoding="utf-8")
    assert L.main(["check", "--lessons", str(d)]) == 1
    assert "'squares' differs from what the references cell gives" in capsys.readouterr().out
    (d / "07_sample.py").unlink()
    assert L.main(["check", "--lessons", str(d)]) == 1
    out = capsys.readouterr().out
    assert "07_sample.ipynb has no source 07_sample.py" in out and "07_sample.npz has no source" in out


def test_build_executes_and_embeds_figures_under_agg(tmp_path, monkeypatch):
    pytest.importorskip("ipykernel", reason="ipykernel runs the notebook")
    pytest.importorskip("nbclient", reason="nbclient executes the notebook")
    pytest.importorskip("matplotlib", reason="the sample draws a figure")
    monkeypatch.setenv("MPLBACKEND", "Agg")  # what CI sets: the setup cell must still embed figures
    plot = "\n# %%\nimport matplotlib.pyplot as plt\n\nplt.plot([0, 1], [1, 0])\nplt.show()\nprint('drawn')\n"
    d = _lesson_dir(tmp_path, SAMPLE + plot)
    changed = L.build(d, log=lambda line: None)
    assert sorted(p.name for p in changed) == ["07_sample.ipynb", "07_sample.npz"]
    nb = json.loads((d / "07_sample.ipynb").read_text(encoding="utf-8"))
    assert L.skeleton(nb) == L.skeleton(L.expected_notebook(d / "07_sample.py"))
    assert nb["metadata"] == L.expected_notebook(d / "07_sample.py")["metadata"]  # no kernel details
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c["execution_count"] is not None for c in code)
    last = code[-1]["outputs"]
    assert any("image/png" in o.get("data", {}) for o in last), last
    assert any(o.get("text") == ["drawn\n"] for o in last)
    assert L.main(["check", "--lessons", str(d)]) == 0
    assert L.build(d) == []  # up to date: not executed again


def test_build_names_the_failing_cell(tmp_path, capsys):
    pytest.importorskip("nbclient", reason="nbclient executes the notebook")
    d = _lesson_dir(tmp_path, SAMPLE.replace("y = x * x", "y = x + x"))
    assert L.main(["build", "--lessons", str(d)]) == 2
    err = capsys.readouterr().err
    assert "07_sample.py does not run: cell 5" in err and "raised CheckFailed: square, case x=0..3" in err


def test_student_command_writes_handouts_with_npz(tmp_path, capsys):
    d = _lesson_dir(tmp_path)
    L.build(d, execute=False)
    out = tmp_path / "student"
    assert L.main(["student", str(out), "--lessons", str(d)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["07_sample.ipynb", "07_sample.npz", "07_sample.py"]
    py = (out / "07_sample.py").read_text(encoding="utf-8")
    assert 'raise NotImplementedError("Lesson 07: your code here")' in py and "HIDDEN" not in py
    nb = json.loads((out / "07_sample.ipynb").read_text(encoding="utf-8"))
    assert nb == L.handout(L.py_to_notebook(SAMPLE, "07_sample.py"))
    assert (out / "07_sample.npz").read_bytes() == (d / "07_sample.npz").read_bytes()
    assert L.main(["student", str(d), "--lessons", str(d)]) == 2  # refuses to overwrite the sources
    assert "is the lessons directory" in capsys.readouterr().err


def test_copy_command(tmp_path, capsys):
    d = _lesson_dir(tmp_path)
    L.build(d, execute=False)
    (d / "README.md").write_text("read me\n")
    out = tmp_path / "mine"
    assert L.main(["copy", str(out), "--lessons", str(d)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["07_sample.ipynb", "07_sample.npz", "README.md"]
    assert L.main(["copy", str(out), "--lessons", str(d)]) == 0  # same files: fine
    (out / "07_sample.ipynb").write_text("my work")
    assert L.main(["copy", str(out), "--lessons", str(d)]) == 2
    assert "07_sample.ipynb exists and differs" in capsys.readouterr().err
    assert (out / "07_sample.ipynb").read_text() == "my work"
    assert L.main(["copy", str(out), "--force", "--lessons", str(d)]) == 0
    assert (out / "07_sample.ipynb").read_bytes() == (d / "07_sample.ipynb").read_bytes()
    assert L.main(["copy", str(out), "--lessons", str(tmp_path / "empty")]) == 2
    assert "no lesson notebooks found in" in capsys.readouterr().err


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


def _committed(stem):
    return json.loads((LESSONS / f"{stem}.ipynb").read_text(encoding="utf-8"))


@pytest.mark.parametrize("stem", STEMS)
def test_notebook_in_sync_with_source(stem):
    py = LESSONS / f"{stem}.py"
    ipynb = py.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} is missing; run `python -m minimoe.lessons build`"
    nb = _committed(stem)
    assert L.skeleton(nb) == L.skeleton(L.expected_notebook(py)), (
        f"the cells of {ipynb.name} differ from {py.name}; run `python -m minimoe.lessons build`"
    )
    assert all(c["execution_count"] is not None for c in nb["cells"] if c["cell_type"] == "code"), (
        f"{ipynb.name} was not executed; run `python -m minimoe.lessons build`"
    )
    arrays = L.references(py)
    assert arrays is not None, f"{py.name} has no '# %% references' cell for its checks"
    from minimoe.lessons.build import npz_difference

    assert npz_difference(py.with_suffix(".npz"), arrays) is None
    nbformat = pytest.importorskip("nbformat", reason="nbformat validates the committed notebook")
    nbformat.validate(nbformat.reads(ipynb.read_text(encoding="utf-8"), as_version=4))


@pytest.mark.parametrize("stem", STEMS)
def test_committed_notebook_shows_its_figures(stem):
    """Every cell that calls plt.show() carries a PNG, and a static HTML render shows them all."""
    nb = _committed(stem)
    pngs = 0
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        n = sum("image/png" in o.get("data", {}) for o in cell["outputs"])
        if "plt.show()" in "".join(cell["source"]):
            assert n >= 1, (
                f"{stem}: a cell calling plt.show() has no figure: {''.join(cell['source'])[:80]!r}"
            )
        pngs += n
    nbconvert = pytest.importorskip("nbconvert", reason="nbconvert renders the notebook to HTML")
    import nbformat

    html, _ = nbconvert.HTMLExporter().from_notebook_node(nbformat.reads(json.dumps(nb), as_version=4))
    assert html.count('src="data:image/png;base64,') == pngs


@pytest.mark.parametrize("stem", STEMS)
def test_lesson_format(stem):
    text = (LESSONS / f"{stem}.py").read_text(encoding="utf-8")
    cells = L.parse_cells(text)
    number = stem[:2]
    assert cells[0].kind == "markdown" and cells[0].source.startswith(f"# Lesson {number} — "), (
        f"the first cell must be the title '# Lesson {number} — Title'"
    )
    assert any(c.kind == "markdown" and "Exercises" in c.source for c in cells), "no Exercises section"
    assert any(c.role == "check" for c in cells), f"{stem} has no graded '# %% check' cell"
    compile(text, stem, "exec")
    compile(L.make_student(text, number, stem), f"{stem} (student)", "exec")


def _execute(nb_path: Path, workdir: Path, allow_errors: bool):
    pytest.importorskip("ipykernel", reason="ipykernel provides the python3 kernel the lessons run on")
    pytest.importorskip("nbclient", reason="nbclient executes the lesson notebooks")
    nb = json.loads(nb_path.read_text(encoding="utf-8"))
    env = dict(os.environ, MPLBACKEND="Agg")
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return run_notebook(nb, workdir, timeout=CELL_TIMEOUT, allow_errors=allow_errors, env=env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, request):
    """Executes each lesson's solution and student notebooks at most once per session."""
    solution_dir = tmp_path_factory.mktemp("lessons_solution")
    student_dir = tmp_path_factory.mktemp("lessons_student")
    for p in LESSONS.glob("[0-9][0-9]_*.npz"):
        shutil.copy2(p, solution_dir / p.name)
    for py in LESSON_FILES:  # the solution notebooks without outputs, watched by the grader's guard
        nb = L.expected_notebook(py)
        nb = with_guard(nb, learner_functions(nb))
        (solution_dir / f"{py.stem}.ipynb").write_text(L.notebook_text(nb), encoding="utf-8")
    L.write_student(student_dir, LESSONS)
    for py in LESSON_FILES:  # the handout up to its last check: what follows is not graded
        path = student_dir / f"{py.stem}.ipynb"
        nb = json.loads(path.read_text(encoding="utf-8"))
        last = max(
            (i for i, c in enumerate(nb["cells"]) if _meta_or_empty(c).get("grade")), default=len(nb["cells"])
        )
        path.write_text(L.notebook_text(dict(nb, cells=nb["cells"][: last + 1])), encoding="utf-8")
    results = {}

    def run(kind, stem):
        if (kind, stem) not in results:
            d = solution_dir if kind == "solution" else student_dir
            results[kind, stem] = _execute(d / f"{stem}.ipynb", d, allow_errors=kind == "student")
        return results[kind, stem]

    yield run
    if not results:
        return
    times = {
        f"{stem} ({kind})": round(r.seconds, 2) for (kind, stem), r in sorted(results.items(), key=_by_stem)
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
    r = runs("solution", stem)
    print(f"{stem}: {r.seconds:.1f} s")
    assert r.stopped is None and not r.errors, f"{stem}.ipynb failed: {r.stopped or r.errors}"
    used = guard_report(r.nb)  # what the grader would flag: a solution calling the package's own version
    assert used == {}, f"{stem}: learner functions that call the package function of the same name: {used}"


@pytest.mark.parametrize("stem", STEMS)
def test_student_checks_fail_naming_their_function(runs, stem):
    r = runs("solution", stem)
    assert r.stopped is None and not r.errors, (
        f"the solution of {stem} must pass before its handout is meaningful"
    )
    r = runs("student", stem)
    print(f"{stem} (student): {r.seconds:.1f} s")
    assert r.stopped is None, f"the handout of {stem} did not finish: {r.stopped}"
    learner = {
        f
        for c in r.nb["cells"]
        if _meta_or_empty(c).get("solution")
        for f in defined_functions("".join(c["source"]))
    }
    checks = [i for i, c in enumerate(r.nb["cells"]) if _meta_or_empty(c).get("grade")]
    assert checks, f"{stem} has no graded check cell"
    for i in checks:
        grade_id = _meta(r.nb["cells"][i])["grade_id"]
        assert i in r.errors, f"{stem}: check {grade_id} passed on the untouched handout"
        ename, evalue = r.errors[i]
        assert ename == "CheckFailed", f"{stem}: check {grade_id} failed with {ename}: {evalue}"
        named, _, rest = evalue.partition(", case ")
        # "<function>, case <case>: not written yet (...)"; an integration check may name the
        # composite it runs ("gpt_forward and gpt_backward with your block"), which uses a stub
        assert named and rest and "not written yet" in rest, f"{stem}: check {grade_id} says {evalue!r}"
        check_id = grade_id.removeprefix(f"lesson{stem[:2]}_")
        if check_id in learner:  # the check of a learner function names that function
            assert named == check_id, f"{stem}: check {grade_id} names {named!r}: {evalue!r}"


def _meta_or_empty(cell):
    return cell.get("metadata", {}).get("nbgrader", {})


def test_setup_cell_finds_the_surrounding_checkout_and_is_quiet(tmp_path):
    """Run as plain Python (no IPython) from lessons/ with minimoe not importable: the setup cell
    puts the checkout on sys.path, prints nothing, and does not fail outside IPython."""
    import subprocess
    import sys

    code = L.SETUP_SOURCE + "\nimport minimoe\nprint(minimoe.__file__)\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-I", "-c", code], cwd=LESSONS, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr == "" and Path(out.stdout.strip()) == ROOT / "minimoe" / "__init__.py"


def test_teaching_notes_list_every_graded_check_with_its_points():
    """lessons/TEACHING.md's table of lessons gives each lesson's checks and points as built."""
    import re

    rows = {}
    for line in (LESSONS / "TEACHING.md").read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\| (\d\d) \|[^|]*\|([^|]*)\|\s*(\d+) \|", line)
        if m:
            rows[m.group(1)] = (dict(re.findall(r"`(\w+)` \((\d+)\)", m.group(2))), int(m.group(3)))
    for py in LESSON_FILES:
        checks = {
            c.check_id: str(c.points)
            for c in L.parse_cells(py.read_text(encoding="utf-8"))
            if c.role == "check"
        }
        assert rows.get(py.stem[:2]) == (checks, sum(map(int, checks.values()))), (
            f"TEACHING.md's row for {py.stem}"
        )
