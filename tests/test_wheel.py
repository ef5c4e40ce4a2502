"""The built package works on its own: installed from its wheel, away from the checkout.

One test, in the steps a user takes, offline:
1. `python -m build --no-isolation` on a copy of the checkout: an sdist, then the wheel built
   FROM that sdist (so both are complete); every subpackage of minimoe/ must be in the wheel.
2. A fresh venv in a temporary folder; `pip install --no-deps` of the wheel. Nothing is
   downloaded: numpy and the optional packages come from this interpreter's site-packages, added
   to the venv's path AFTER its own site-packages by a .pth line (so its minimoe is the wheel's).
3. From a temporary folder (not the checkout), with PYTHONPATH unset: `python -m minimoe train`,
   `info --preset mixtral` and `bench`, and a check that the minimoe they import is the
   installed one. .ci/run does the same with a venv that installs from the network.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP_IN_COPY = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "out",
    "runs",
)


def _run(cmd, cwd, env=None, timeout=600):
    res = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert res.returncode == 0, (
        f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    )
    return res.stdout


def _setuptools_builds_wheels() -> bool:
    """setuptools >= 70.1 builds wheels without the `wheel` package (pyproject.toml asks for it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = (int(x) for x in version("setuptools").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (70, 1)


def _subpackages() -> set:
    """Every package folder of minimoe/ in the checkout, as a path inside the wheel."""
    return {str(p.parent.relative_to(ROOT)) for p in (ROOT / "minimoe").rglob("__init__.py")}


def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    pytest.importorskip("build", reason="building the wheel needs the `build` package (the test extra)")
    if not _setuptools_builds_wheels():
        pytest.skip("building offline needs setuptools >= 70.1 in this environment")

    # 1. sdist and wheel, from a copy (an in-place build would write build/ into the checkout)
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=SKIP_IN_COPY)
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", tmp_path / "dist", src], cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("minimoe-*.whl")
    (sdist,) = (tmp_path / "dist").glob("minimoe-*.tar.gz")
    with zipfile.ZipFile(wheel) as z:
        files = set(z.namelist())
    folders = {os.path.dirname(f) for f in files}
    assert _subpackages() <= folders, f"subpackages missing from the wheel: {_subpackages() - folders}"
    assert "minimoe/bench/torch_twin.py" in files  # `bench --vs-torch` needs nothing from the checkout
    notebooks = sorted(p.name for p in (ROOT / "lessons").glob("*.ipynb"))
    assert all(f"minimoe/lessons/notebooks/{n}" in files for n in notebooks)  # lesson data

    # 2. a fresh venv that sees this interpreter's packages only after its own
    # PYTHONPATH unset throughout: pip would otherwise see the checkout's minimoe (an editable
    # install's metadata) as "already installed" and skip the wheel
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=tmp_path)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = _run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path
    ).strip()
    outer = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site, "outer_site_packages.pth").write_text("\n".join(sorted(outer)) + "\n")
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], cwd=tmp_path, env=env)

    # 3. run it from elsewhere, with nothing pointing at the checkout
    work = tmp_path / "work"
    work.mkdir()
    where = _run([python, "-c", "import minimoe; print(minimoe.__file__)"], cwd=work, env=env).strip()
    assert Path(where).resolve().is_relative_to(venv.resolve()), where
    assert not Path(where).resolve().is_relative_to(ROOT), where
    run = work / "run"
    out = _run(
        [
            python,
            "-m",
            "minimoe",
            "train",
            "--max-iters",
            20,
            "--eval-interval",
            10,
            "--sample-tokens",
            20,
            "--out",
            run,
        ],
        cwd=work,
        env=env,
    )
    assert "step 20" in out and (run / "ckpt.npz").is_file()
    assert "mixtral" in _run([python, "-m", "minimoe", "info", "--preset", "mixtral"], cwd=work, env=env)
    tiny = ["--n-layer", 1, "--n-embd", 16, "--n-head", 2, "--block-size", 8, "--batch-size", 2]
    bench = [
        python,
        "-m",
        "minimoe",
        "bench",
        *tiny,
        "--iters",
        1,
        "--warmup",
        0,
        "--no-memory",
        "--threads",
        1,
    ]
    assert "step ms" in _run(bench, cwd=work, env=env)
