"""`python -m minimoe.lessons grade`: scores per check, partial credit, tampering, and a learner
function that hands its work to the package's own function of the same name.

A small lesson built in a temporary directory stands in for the real ones (the real lessons go
through nbgrader in test_nbgrader.py): its learner writes `rel_error`, which minimoe.gradcheck
also defines, and `double`, which the package does not.
"""

import copy
import json
from pathlib import Path

import pytest

from minimoe import lessons as L

pytest.importorskip("ipykernel", reason="ipykernel runs the submitted notebook")
pytest.importorskip("nbclient", reason="nbclient executes the submitted notebook")

LESSON = '''# %% [markdown]
# # Lesson 03 — Grading sample

# %%
import numpy as np

from minimoe.lessons.checks import CheckFailed, case, check_close, reference


# %%
def rel_error(a, b):
    """max|a - b| / max(max|a|, max|b|)."""
    ### BEGIN SOLUTION
    return float(np.abs(a - b).max() / max(np.abs(a).max(), np.abs(b).max()))
    ### END SOLUTION


# %%
def double(x):
    """x -> 2 x."""
    ### BEGIN SOLUTION
    return 2 * x
    ### END SOLUTION


# %% check id=rel_error points=2
with case("rel_error", "a=x b=x+0.1"):
    got = rel_error(reference("03", "x"), reference("03", "x") + 0.1)
check_close("rel_error", "a=x b=x+0.1", "error", got, reference("03", "err"), 1e-12)

# %% check id=double points=1
with case("double", "x=x"):
    got = double(reference("03", "x"))
check_close("double", "x=x", "2x", got, 2 * reference("03", "x"), 1e-12)
### BEGIN HIDDEN TESTS
with case("double", "x=-1"):
    if double(-1.0) != -2.0:
        raise CheckFailed("double, case x=-1: wrong for negative numbers")
### END HIDDEN TESTS

# %% [markdown]
# ## Exercises

# %% references
import numpy as np

from minimoe.gradcheck import rel_error


def references():
    x = np.linspace(1.0, 2.0, 5)
    return {"x": x, "err": np.array(rel_error(x, x + 0.1))}
'''


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    d = tmp_path_factory.mktemp("grade_lessons")
    (d / "03_sample.py").write_text(LESSON, encoding="utf-8")
    L.build(d, log=lambda line: None)
    L.write_student(d / "handout", d)
    return d


def _notebook(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _solution_cell(nb: dict, function: str) -> dict:
    gid = f"lesson03_solution_{function}"
    return next(c for c in nb["cells"] if c["metadata"].get("nbgrader", {}).get("grade_id") == gid)


def _submit(course, tmp_path, name: str, edit) -> Path:
    """A copy of the handout, changed by edit(nb), saved as tmp_path/name."""
    nb = copy.deepcopy(_notebook(course / "handout" / "03_sample.ipynb"))
    edit(nb)
    path = tmp_path / name
    path.write_text(json.dumps(nb), encoding="utf-8")
    return path


def _answer(nb, function, body):
    cell = _solution_cell(nb, function)
    src = "".join(cell["source"])
    cell["source"] = src.replace('    raise NotImplementedError("Lesson 03: your code here")', body)


RIGHT_REL = "    return float(np.abs(a - b).max() / max(np.abs(a).max(), np.abs(b).max()))"


def test_solution_gets_full_marks_and_text_report(course, capsys):
    assert L.main(["grade", str(course / "03_sample.ipynb"), "--lessons", str(course)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("03_sample.ipynb: lesson 03_sample")
    assert out[1].split() == ["pass", "2/2", "rel_error"]
    assert out[2].split() == ["pass", "1/1", "double"]
    assert out[-1] == "score 3/3"


def test_untouched_handout_scores_zero_and_exits_zero(course, capsys):
    assert (
        L.main(["grade", str(course / "handout" / "03_sample.ipynb"), "--lessons", str(course), "--json"])
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert (report["score"], report["max_score"], report["lesson"]) == (0, 3, "03_sample")
    assert [c["id"] for c in report["checks"]] == ["rel_error", "double"]
    assert [c["max_points"] for c in report["checks"]] == [2, 1]
    for c in report["checks"]:
        assert not c["passed"] and c["message"].startswith(f"{c['id']}, case ")
        assert "not written yet (NotImplementedError: Lesson 03: your code here)" in c["message"]


def test_one_wrong_function_gets_partial_credit(course, tmp_path):
    def edit(nb):
        _answer(nb, "rel_error", RIGHT_REL)
        _answer(nb, "double", "    return 2 * abs(x)")  # passes the visible check, not the hidden one

    report = L.grade(_submit(course, tmp_path, "wrong.ipynb", edit), lessons_dir=course)
    assert report["score"] == 2 and report["max_score"] == 3
    rel, dbl = report["checks"]
    assert rel["passed"] and rel["points"] == 2 and rel["message"] == ""
    assert not dbl["passed"] and dbl["points"] == 0
    assert dbl["message"] == "double, case x=-1: wrong for negative numbers"  # the hidden test ran


def test_calling_the_package_function_is_reported(course, tmp_path):
    def edit(nb):
        _answer(nb, "rel_error", "    from minimoe import gradcheck\n\n    return gradcheck.rel_error(a, b)")
        _answer(nb, "double", "    return 2 * x")

    report = L.grade(_submit(course, tmp_path, "cheat.ipynb", edit), lessons_dir=course)
    rel, dbl = report["checks"]
    assert not rel["passed"] and rel["points"] == 0
    assert rel["uses_package"] == ["rel_error calls minimoe.gradcheck.rel_error"]
    assert "uses the package's own implementation" in rel["message"] and "write it yourself" in rel["message"]
    assert dbl["passed"] and report["score"] == 1


def test_binding_the_package_function_is_reported(course, tmp_path):
    def edit(nb):
        cell = _solution_cell(nb, "rel_error")
        cell["source"] = "from minimoe.gradcheck import rel_error"  # the def is gone altogether
        _answer(nb, "double", "    return 2 * x")

    report = L.grade(_submit(course, tmp_path, "bound.ipynb", edit), lessons_dir=course)
    assert report["checks"][0]["uses_package"] == ["rel_error calls minimoe.gradcheck.rel_error"]
    assert report["score"] == 1


def test_locked_cells_come_from_the_lesson_and_added_cells_stay(course, tmp_path):
    """Editing a check cell changes nothing; a helper cell the learner added still runs."""

    def edit(nb):
        for cell in nb["cells"]:
            if cell["metadata"].get("nbgrader", {}).get("grade"):
                cell["source"] = "pass  # checks? what checks?"
        _answer(nb, "rel_error", "    return _mine(a, b)")
        _answer(nb, "double", "    return 2 * x")
        helper = {"cell_type": "code", "execution_count": None, "id": "mine", "metadata": {}, "outputs": []}
        nb["cells"].insert(
            2, dict(helper, source=RIGHT_REL.replace("    return", "def _mine(a, b):\n    return"))
        )
        del nb["cells"][-1]  # a deleted cell (the last markdown) is restored too

    report = L.grade(_submit(course, tmp_path, "tampered.ipynb", edit), lessons_dir=course)
    assert [c["passed"] for c in report["checks"]] == [True, True] and report["score"] == 3

    def break_double(nb):
        edit(nb)
        _solution_cell(nb, "double")["source"] = "def double(x):\n    return x"

    report = L.grade(_submit(course, tmp_path, "tampered2.ipynb", break_double), lessons_dir=course)
    assert report["score"] == 2 and "2x differs from the reference" in report["checks"][1]["message"]


def test_lesson_is_found_by_its_metadata_when_renamed(course, tmp_path):
    path = tmp_path / "my homework.ipynb"
    path.write_text((course / "03_sample.ipynb").read_text(encoding="utf-8"), encoding="utf-8")
    assert L.grade(path, lessons_dir=course)["score"] == 3


@pytest.mark.parametrize(
    "content, message",
    [
        ("just some text", "is not a Jupyter notebook: it is not JSON"),
        ('{"cells": 3}', "is not a Jupyter notebook: it has no list of cells"),
        (None, "does not exist or is not a file"),
    ],
)
def test_not_a_notebook_is_one_error_line(tmp_path, capsys, content, message):
    path = tmp_path / "sub.ipynb"
    if content is not None:
        path.write_text(content)
    assert L.main(["grade", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_unknown_lesson_is_one_error_line(course, tmp_path, capsys):
    path = tmp_path / "99_other.ipynb"
    path.write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    assert L.main(["grade", str(path), "--lessons", str(course)]) == 2
    assert "cannot tell which lesson" in capsys.readouterr().err


def test_a_learner_cell_that_never_ends_is_interrupted(course, tmp_path):
    def edit(nb):
        _answer(nb, "rel_error", RIGHT_REL)
        _solution_cell(nb, "double")["source"] = "while True:\n    pass"

    report = L.grade(_submit(course, tmp_path, "loop.ipynb", edit), lessons_dir=course, timeout=5)
    rel, dbl = report["checks"]
    assert rel["passed"] and not dbl["passed"] and report["score"] == 2
    assert dbl["message"] == "double, case x=x: raised NameError: name 'double' is not defined"
