"""What tests/test_dist_mpi.py runs under `mpiexec -n P python tests/dist_worker.py COMMAND ...`.

    gradcheck OUT.json          the all-to-all pair's float64 gradient check across the ranks
    train SPEC.json             train() once per entry of SPEC's list of option dicts
    fault KIND RANK STEP SPEC   train(); on RANK after STEP: raise | kill | stop (SIGSTOP)
Every rank writes its pid to SPEC's directory (pid.RANK), so the test can check none is left.
Rank 0 writes the results; the others write nothing.
"""

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np

from minimoe import dist
from minimoe.gradcheck import numerical_gradient, rel_error
from minimoe.layers import exchange
from minimoe.train import train


def gradcheck(out):
    """L = sum over ranks of <W_r, all_to_all(x)_r>; every rank's every entry of x perturbed in
    turn (every rank evaluates L each time: it is a collective)."""
    w = dist.world()
    comm, P, r = w.comm, w.size, w.rank
    rng = np.random.default_rng(0)
    n = rng.integers(0, 4, (P, P))  # the same on every rank
    xs = [np.random.default_rng(10 + s).standard_normal((int(n[s].sum()), 3)) for s in range(P)]
    ws = [np.random.default_rng(20 + d).standard_normal((int(n[:, d].sum()), 3)) for d in range(P)]
    group = exchange.Group(comm)
    x = xs[r]

    def loss():
        y, _ = exchange.all_to_all_forward(x, n[r], n[:, r], group)
        return comm.allreduce(float((y * ws[r]).sum()))

    _, cache = exchange.all_to_all_forward(x, n[r], n[:, r], group)
    dx = exchange.all_to_all_backward(ws[r], cache)
    errors = []
    for owner in range(P):
        size = int(n[owner].sum()) * 3
        if r == owner:
            picks, num = numerical_gradient(loss, x)
            errors.append(rel_error(dx.reshape(-1)[picks], num))
        else:
            for _ in range(2 * size):  # the owner's two evaluations per entry
                loss()
    errors = comm.gather(errors)
    if r == 0:
        Path(out).write_text(json.dumps({"errors": sum(errors, []), "cuda_aware": dist.cuda_aware_mpi()}))


def run_train(spec, callback=None):
    runs = json.loads(Path(spec).read_text())
    for options in runs:
        train(options, quiet=True, callback=callback)


def fault(kind, bad_rank, bad_step, spec):
    def callback(it, model):
        if dist.world().rank == bad_rank and it == bad_step:
            if kind == "raise":
                raise RuntimeError(f"injected failure after step {it}")
            os.kill(os.getpid(), signal.SIGKILL if kind == "kill" else signal.SIGSTOP)

    run_train(spec, callback)


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    where = Path(args[-1]).parent
    (where / f"pid.{dist.launched()[1]}").write_text(str(os.getpid()))
    if command == "gradcheck":
        gradcheck(*args)
    elif command == "train":
        run_train(*args)
    elif command == "fault":
        fault(args[0], int(args[1]), int(args[2]), args[3])
    else:
        raise SystemExit(f"unknown command {command!r}")
