"""The lessons from an installed wheel, far from any checkout.

Builds the wheel from a copy of the sources, installs it (`pip install --no-deps`, offline) into a
fresh virtual environment, and from a directory outside the checkout runs
`python -m minimoe.lessons copy DIR`; lesson 00 then executes in DIR on a kernel of that
environment, importing minimoe from the wheel (never from the checkout).
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import on_host_only

pytest.importorskip("build", reason="the `build` package makes the wheel (pip install build)")
pytest.importorskip("ipykernel", reason="ipykernel runs lesson 00 from the installed wheel")
pytest.importorskip("nbclient", reason="nbclient executes lesson 00 from the installed wheel")

pytestmark = on_host_only("the lessons are NumPy-only: lesson 00 runs from the installed wheel, on numpy")

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("minimoe", "lessons", "setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "LICENSE")

RUN_LESSON = """
import json, sys
import nbclient, nbformat
nb = nbformat.read(sys.argv[1], as_version=4)
nb.cells.append(nbformat.v4.new_code_cell("import minimoe\\nprint('MINIMOE_FROM', minimoe.__file__)"))
nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", record_timing=False,
                        resources={"metadata": {"path": sys.argv[2]}}).execute()
nbformat.write(nb, sys.argv[3])
"""


def _run(cmd, cwd, env):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (
        f"{' '.join(map(str, cmd))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python of a fresh venv with the wheel installed, environment for it, a work directory)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:  # a copy: building writes build/ and *.egg-info next to setup.py
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif path.exists():
            shutil.copy2(path, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(OPENBLAS_NUM_THREADS="1", MPLBACKEND="Agg")
    # offline: no isolated build environment to download setuptools into; use the one we have
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--skip-dependency-check",
          "--outdir", str(tmp / "dist"), str(src)], tmp, env)  # fmt: skip
    (wheel,) = (tmp / "dist").glob("minimoe-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], tmp, env)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp, env
        ).strip()
    )
    if sys.prefix != sys.base_prefix:  # we run in a venv: --system-site-packages does not reach it
        paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
        (purelib / "outer_env.pth").write_text("\n".join(sorted(paths)) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)], tmp, env)  # fmt: skip
    # a python3 kernel that is this venv's python (not whatever kernel Jupyter knows elsewhere)
    kernel = tmp / "jupyter" / "kernels" / "python3"
    kernel.mkdir(parents=True)
    argv = [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (kernel / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "wheel", "language": "python"})
    )
    env["JUPYTER_PATH"] = str(tmp / "jupyter")
    work = tmp / "elsewhere"
    work.mkdir()
    return python, env, work, purelib


def test_wheel_ships_the_lesson_notebooks(installed):
    python, env, work, purelib = installed
    out = _run([str(python), "-c", "import minimoe; print(minimoe.__file__)"], work, env)
    assert Path(out.strip()).resolve().is_relative_to(purelib.resolve()), out  # the wheel, not the checkout
    data = purelib / "minimoe" / "lessons" / "notebooks"
    for nb in sorted((ROOT / "lessons").glob("[0-9][0-9]_*.ipynb")):
        assert (data / nb.name).read_bytes() == nb.read_bytes()
    for npz in sorted((ROOT / "lessons").glob("[0-9][0-9]_*.npz")):
        assert (data / npz.name).read_bytes() == npz.read_bytes()
    assert (data / "README.md").exists()


def test_copy_and_run_lesson_00_outside_the_checkout(installed):
    python, env, work, purelib = installed
    out = _run([str(python), "-m", "minimoe.lessons", "copy", "mine"], work, env)
    mine = work / "mine"
    names = sorted(p.name for p in mine.iterdir())
    expected = sorted(p.name for p in (ROOT / "lessons").iterdir() if p.suffix in (".ipynb", ".npz"))
    assert set(expected) <= set(names) and "README.md" in names, names
    assert f"copied {sum(n.endswith('.ipynb') for n in expected)} lesson notebook(s)" in out
    (lesson00,) = mine.glob("00_*.ipynb")
    script = work / "run_lesson.py"
    script.write_text(RUN_LESSON)
    executed = work / "executed.ipynb"
    _run([str(python), str(script), str(lesson00), str(mine), str(executed)], work, env)
    nb = json.loads(executed.read_text(encoding="utf-8"))
    errors = [
        o
        for c in nb["cells"]
        if c["cell_type"] == "code"
        for o in c["outputs"]
        if o["output_type"] == "error"
    ]
    assert not errors, errors[0]
    last = "".join("".join(o.get("text", "")) for o in nb["cells"][-1]["outputs"])
    assert last.startswith("MINIMOE_FROM") and Path(last.split()[1]).resolve().is_relative_to(
        purelib.resolve()
    )


def test_student_handouts_from_the_installed_sources(installed):
    python, env, work, _ = installed
    out = _run([str(python), "-m", "minimoe.lessons", "student", "handout"], work, env)
    sources = sorted((ROOT / "lessons").glob("[0-9][0-9]_*.py"))
    assert f"wrote {len(sources)} handout(s)" in out
    for py in sources:
        text = (work / "handout" / py.name).read_text(encoding="utf-8")
        assert "### BEGIN SOLUTION" not in text and "raise NotImplementedError" in text
        assert (work / "handout" / f"{py.stem}.ipynb").exists()
