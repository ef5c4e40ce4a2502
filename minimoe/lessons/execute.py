"""Running a notebook top to bottom in a fresh kernel (nbclient + ipykernel, imported lazily).

The kernel imports the same minimoe as the process that starts it (its directory goes first on
PYTHONPATH) and runs BLAS on one thread: the lessons' matrices are tiny, and spinning OpenBLAS
threads only slow down a shared machine.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import NamedTuple, Optional

from minimoe.lessons.markup import LessonError

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the directory that holds minimoe/


class Run(NamedTuple):
    """The executed notebook, its wall time, {cell index: (error name, error value)} of the cells
    that raised, and why execution stopped early (None when every cell ran)."""

    nb: dict
    seconds: float
    errors: dict
    stopped: Optional[str]


def kernel_env(extra: Optional[dict] = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def _modules():
    try:
        import ipykernel  # noqa: F401  (the python3 kernel the lessons run on)
        import nbclient
        import nbformat
    except ImportError as e:
        raise LessonError(
            f"executing notebooks needs nbclient, nbformat and ipykernel ({e}); "
            "install them with pip install 'minimoe[lessons]'"
        ) from None
    return nbclient, nbformat


def cell_errors(nb: dict) -> dict:
    """{cell index: (ename, evalue)} for every code cell with an error output."""
    found = {}
    for i, cell in enumerate(nb["cells"]):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                found[i] = (out.get("ename", "Error"), out.get("evalue", ""))
                break
    return found


def run_notebook(nb: dict, workdir, timeout: int = 180, allow_errors: bool = False, env=None) -> Run:
    """Execute a copy of `nb` with its working directory at `workdir`.

    allow_errors=False stops at the first cell that raises; True runs every cell (a cell that runs
    past `timeout` seconds is interrupted and counts as raising KeyboardInterrupt). A kernel that
    dies, or a timeout, ends the run with `stopped` set.
    """
    nbclient, nbformat = _modules()
    node = nbformat.reads(json.dumps(nb), as_version=4)
    client = nbclient.NotebookClient(
        node,
        timeout=timeout,
        kernel_name="python3",
        allow_errors=allow_errors,
        interrupt_on_timeout=allow_errors,
        record_timing=False,
        resources={"metadata": {"path": str(workdir)}},
        # the kernel's own log: only errors (its warning that a local kernel talks over TCP
        # without encryption is about Jupyter's plumbing, not about the learner's notebook)
        extra_arguments=["--IPKernelApp.log_level=ERROR"],
    )
    stopped = None
    t0 = time.perf_counter()
    try:
        client.execute(env=env if env is not None else kernel_env())
    except nbclient.exceptions.CellExecutionError:
        pass  # the error is in that cell's outputs
    except (nbclient.exceptions.CellTimeoutError, nbclient.exceptions.DeadKernelError) as e:
        stopped = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    seconds = time.perf_counter() - t0
    out = json.loads(json.dumps(node))
    return Run(out, seconds, cell_errors(out), stopped)
