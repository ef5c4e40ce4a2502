"""The lessons as an nbgrader course: the real `generate_assignment` and `autograde` (nbgrader's
Python API, in a throwaway course directory, no network).

Every committed lesson notebook becomes an assignment `lessonNN` (source/lessonNN/NN_slug.ipynb with
its .npz) and must release cleanly: no solution code, no hidden tests, the checks and the .npz
kept. Lesson 05 is then autograded for three students: the solutions (full marks), the untouched
release (zero: every point is on a code task), and the solutions with the gradient of one function
negated (everything but that function's checks).
"""

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import on_host_only

from minimoe import lessons as L

pytest.importorskip("nbgrader", reason="nbgrader is the optional [teach] extra; install it to run this test")
pytest.importorskip("ipykernel", reason="ipykernel runs the submissions during autograde")

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:Object of type"),
    on_host_only("the lessons are NumPy-only: nbgrader grades the lesson notebooks, which run on numpy"),
]

ROOT = Path(__file__).resolve().parent.parent
LESSONS = ROOT / "lessons"
STEMS = [p.stem for p in L.lesson_files(LESSONS)] if LESSONS.is_dir() else []
GRADED = "05_router"  # the lesson autograded for three students
WRONG = "softmax_topk_backward"  # its function that the third student gets wrong


def _meta(cell):
    return cell.get("metadata", {}).get("nbgrader", {})


def _src(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    from nbgrader.apps import NbGraderAPI
    from traitlets.config import Config

    root = tmp_path_factory.mktemp("nbgrader_course")
    for stem in STEMS:
        d = root / "source" / f"lesson{stem[:2]}"
        d.mkdir(parents=True)
        for suffix in (".ipynb", ".npz"):
            if (LESSONS / f"{stem}{suffix}").exists():
                shutil.copy2(LESSONS / f"{stem}{suffix}", d / f"{stem}{suffix}")
    config = Config()
    config.CourseDirectory.root = str(root)
    config.CourseDirectory.course_id = "minimoe"
    (root / "exchange").mkdir()
    config.Exchange.root = str(root / "exchange")
    config.Execute.timeout = 300
    cwd = os.getcwd()
    os.chdir(root)  # nbgrader resolves a few paths against the working directory
    env = {k: os.environ.get(k) for k in ("PYTHONPATH", "OPENBLAS_NUM_THREADS", "MPLBACKEND")}
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env["PYTHONPATH"]) if p)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    try:
        yield root, NbGraderAPI(config=config)
    finally:
        os.chdir(cwd)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def released(course):
    root, api = course
    results = {stem: api.generate_assignment(f"lesson{stem[:2]}") for stem in STEMS}
    return root, api, results


@pytest.mark.parametrize("stem", STEMS)
def test_generate_assignment_releases_every_lesson(released, stem):
    root, _, results = released
    result = results[stem]
    assert result["success"], f"nbgrader generate_assignment failed for {stem}:\n{result.get('error')}"
    source = json.loads((root / "source" / f"lesson{stem[:2]}" / f"{stem}.ipynb").read_text(encoding="utf-8"))
    release_dir = root / "release" / f"lesson{stem[:2]}"
    release = json.loads((release_dir / f"{stem}.ipynb").read_text(encoding="utf-8"))
    assert (release_dir / f"{stem}.npz").exists() == (LESSONS / f"{stem}.npz").exists()
    assert [_meta(c).get("grade_id") for c in release["cells"]] == [
        _meta(c).get("grade_id") for c in source["cells"]
    ]
    text = json.dumps(release)
    assert "BEGIN SOLUTION" not in text and "HIDDEN TESTS" not in text
    for cell, original in zip(release["cells"], source["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == []
        if _meta(cell).get("solution"):
            assert "raise NotImplementedError()" in _src(cell)
        elif _meta(cell).get("grade") and "### BEGIN HIDDEN TESTS" not in _src(original):
            assert _src(cell) == _src(original)  # the checks go out as they are
    assert sum(bool(_meta(c).get("grade")) for c in release["cells"]) >= 1


def _submit(root, student, nb):
    stem = GRADED
    d = root / "submitted" / student / f"lesson{stem[:2]}"
    d.mkdir(parents=True)
    shutil.copy2(root / "release" / f"lesson{stem[:2]}" / f"{stem}.npz", d / f"{stem}.npz")
    (d / f"{stem}.ipynb").write_text(json.dumps(nb), encoding="utf-8")


@pytest.fixture(scope="module")
def autograded(released):
    from nbgrader.api import Gradebook

    root, api, results = released
    assert results[GRADED]["success"], results[GRADED].get("error")
    nn = GRADED[:2]
    source = json.loads((root / "source" / f"lesson{nn}" / f"{GRADED}.ipynb").read_text(encoding="utf-8"))
    release = json.loads((root / "release" / f"lesson{nn}" / f"{GRADED}.ipynb").read_text(encoding="utf-8"))
    answers = {_meta(c)["grade_id"]: _src(c) for c in source["cells"] if _meta(c).get("solution")}
    full = json.loads(json.dumps(release))
    for cell in full["cells"]:
        if _meta(cell).get("solution"):
            cell["source"] = answers[_meta(cell)["grade_id"]]
    wrong = json.loads(json.dumps(full))
    cell = next(c for c in wrong["cells"] if _meta(c).get("grade_id") == f"lesson{nn}_solution_{WRONG}")
    cell["source"] += (
        f"\n\n\n_right_{WRONG} = {WRONG}\n\n\ndef {WRONG}(*args, **kwargs):\n"
        f"    return -_right_{WRONG}(*args, **kwargs)  # a sign error\n"
    )
    for student, nb in (("solution", full), ("handout", release), ("wrong", wrong)):
        _submit(root, student, nb)
        result = api.autograde(f"lesson{nn}", student)
        assert result["success"], f"nbgrader autograde failed for {student}:\n{result.get('error')}"
    scores = {}
    with Gradebook(f"sqlite:///{root / 'gradebook.db'}", course_id="minimoe") as gb:
        for student in ("solution", "handout", "wrong"):
            sub = gb.find_submission(f"lesson{nn}", student)
            grades = {g.cell.name: g.score for nb in sub.notebooks for g in nb.grades}
            scores[student] = (sub.score, sub.max_score, grades)
    points = {_meta(c)["grade_id"]: _meta(c)["points"] for c in source["cells"] if _meta(c).get("grade")}
    depends = {
        gid
        for gid in points
        if any(WRONG in _src(c) for c in source["cells"] if _meta(c).get("grade_id") == gid)
    }
    print(f"nbgrader scores for {GRADED}:", {s: f"{v[0]:g}/{v[1]:g}" for s, v in scores.items()})
    return root, scores, points, depends


def test_autograde_solution_gets_full_marks(autograded):
    _, scores, points, _ = autograded
    score, max_score, grades = scores["solution"]
    assert max_score == sum(points.values()) > 0
    assert score == max_score, grades


def test_autograde_untouched_handout_gets_zero(autograded):
    _, scores, _, _ = autograded
    score, max_score, grades = scores["handout"]
    assert score == 0 and max_score > 0, grades


def test_autograde_one_wrong_function_gets_the_rest(autograded):
    root, scores, points, depends = autograded
    score, max_score, grades = scores["wrong"]
    assert depends, f"no check of {GRADED} calls {WRONG}"
    assert 0 < score < max_score
    assert score == max_score - sum(points[g] for g in depends), grades
    assert all(grades[g] == 0 for g in depends)
    graded_nb = root / "autograded" / "wrong" / f"lesson{GRADED[:2]}" / f"{GRADED}.ipynb"
    nb = json.loads(graded_nb.read_text(encoding="utf-8"))
    errors = [
        o
        for c in nb["cells"]
        if _meta(c).get("grade_id") in depends
        for o in c["outputs"]
        if o["output_type"] == "error"
    ]
    assert errors and all(
        o["ename"] == "CheckFailed" and o["evalue"].startswith(f"{WRONG}, case ") for o in errors
    )
