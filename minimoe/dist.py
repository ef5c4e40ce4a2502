"""One model trained by P processes over MPI (mpi4py): data parallelism and expert parallelism.

    pip install -e ".[dist]"                               # mpi4py and the mpich wheel
    mpiexec -n 4 python -m minimoe train --preset mixtral  # 4 ranks, 2 of the 8 experts each

Every rank runs the same program with the same options. Without an MPI launcher, without
mpi4py, or with P = 1, nothing changes. With P > 1 ranks:
  data    each rank holds the whole model and computes rows [r B/P, (r+1) B/P) of the SAME global
          batch the one-process run draws (every rank draws it with the same generator). The loss
          and the routing statistics are those of the global batch (all-reduced in the forward),
          and each rank's backward gives d(global loss)/d(its activations), so summing the
          gradients of the replicated parameters over the ranks (`reduce_gradients`) gives the
          one-process gradient, no 1/P to apply. Clipping uses the global norm; the identical
          AdamW step on every rank keeps the replicas identical.
  expert  as data, except that each MoE layer's experts are split: rank r holds experts
          [r E/P, (r+1) E/P), their weights and AdamW moments only there; tokens travel to their
          experts and back by all-to-all (layers/exchange.py); expert gradients stay local.
Rank 0 alone prints, writes metrics and checkpoints: the experts are gathered to it, so a
checkpoint has the one-process format and resumes under any P.

Failures (minimoe/dist_failures.py): a set-up error on any rank stops every rank with it
(`together`); an exception in training aborts every rank (`guard`); the launcher ends the others
when one is killed; a rank waiting over MINIMOE_DIST_TIMEOUT seconds (default 600) for a peer
aborts them all (`Watchdog`).
"""

from __future__ import annotations

import ctypes
import os
import sys
import traceback
from types import SimpleNamespace
from typing import Optional

import numpy as np

from minimoe import backend
from minimoe.dist_failures import DistError, NoMetrics, Watchdog, error_line, guard, together
from minimoe.errors import OptionError, UserError
from minimoe.layers import exchange
from minimoe.model import GPT

__all__ = ["DistError", "NoMetrics", "Watchdog", "World", "check_layout", "choose_mode", "cuda_aware_mpi",
           "guard", "is_rank0", "launched", "together", "world"]  # fmt: skip

# (size, rank) variables that MPI launchers set: Open MPI's mpirun; MPICH's and Intel MPI's
# hydra mpiexec (and srun --mpi=pmi2); MVAPICH. MINIMOE_MPI=1 forces MPI on, 0 off.
LAUNCHER_ENV = (
    ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
    ("PMI_SIZE", "PMI_RANK"),
    ("MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK"),
)


def launched(env=None) -> tuple[int, int]:
    """(P, rank) from an MPI launcher's environment variables; (1, 0) when none started us."""
    env = os.environ if env is None else env
    for size, rank in LAUNCHER_ENV:
        if env.get(size, "").isdigit():
            return int(env[size]), int(env.get(rank, "0") or 0)
    return 1, 0


def is_rank0() -> bool:
    """Whether this process may print: rank 0 of a launch, or a plain process (no MPI needed)."""
    return launched()[1] == 0


_WORLD: dict = {}


def world() -> Optional[World]:
    """This process's MPI world when it was launched as one of P > 1 ranks, else None.
    mpi4py is imported here, only then; DistError when it is missing."""
    if "world" in _WORLD:
        return _WORLD["world"]
    size, rank = launched()
    force = os.environ.get("MINIMOE_MPI", "")
    if force == "0" or (size <= 1 and force != "1"):
        _WORLD["world"] = None
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        raise DistError(
            f"minimoe was started by an MPI launcher as {size} ranks, but mpi4py is not installed: "
            "pip install 'minimoe[dist]' (mpi4py and MPICH), or run without mpiexec"
        ) from None
    comm = MPI.COMM_WORLD
    words = [w for w in MPI.Get_library_version().splitlines()[0].split() if w != "Version:"]
    library = " ".join(words[:3]).rstrip(",")  # e.g. "MPICH 5.0.2", "Open MPI v4.1.5"
    _WORLD["world"] = World(comm, library) if comm.Get_size() > 1 else None
    return _WORLD["world"]


def cuda_aware_mpi() -> bool:
    """Whether the MPI library takes device memory (MINIMOE_CUDA_AWARE_MPI=1/0 decides when set;
    else asked of the loaded library: Open MPI's MPIX_Query_cuda_support or MPICH's
    MPIX_GPU_query_support). False when it cannot tell."""
    force = os.environ.get("MINIMOE_CUDA_AWARE_MPI", "")
    if force in ("0", "1"):
        return force == "1"
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            libs = sorted({line.split()[-1] for line in f if "libmpi" in line.split()[-1]})
        for path in libs:
            lib = ctypes.CDLL(path)
            if hasattr(lib, "MPIX_Query_cuda_support"):
                return bool(lib.MPIX_Query_cuda_support())
            if hasattr(lib, "MPIX_GPU_query_support"):
                out = ctypes.c_int(0)
                return lib.MPIX_GPU_query_support(0, ctypes.byref(out)) == 0 and bool(out.value)  # 0: CUDA
    except OSError:
        pass
    return False


def choose_mode(config, size: int, requested: Optional[str]) -> str:
    """--parallel: 'auto' (or None) is 'expert' for a MoE model whose experts split evenly over
    the ranks, else 'data'; OptionError for an expert layout that cannot work."""
    E = config.n_experts
    if requested in (None, "auto"):
        return "expert" if E and E % size == 0 else "data"
    if requested == "expert" and not E:
        raise OptionError("--parallel expert needs a MoE model, but this one is dense; use --parallel data")
    if requested == "expert" and E % size:
        divisors = [p for p in range(2, E + 1) if E % p == 0]
        raise OptionError(
            f"--parallel expert splits the {E} experts of each MoE layer over the ranks, but {E} is not "
            f"divisible by {size} ranks: launch {' or '.join(map(str, divisors))} ranks, or use --parallel data"
        )
    return requested


def check_layout(batch_size: int, size: int) -> None:
    """OptionError unless the global batch splits evenly over the ranks."""
    if batch_size % size:
        raise OptionError(
            f"--batch-size = {batch_size} cannot be split over {size} ranks: each rank takes B/P rows of "
            f"the global batch, so it must be a multiple of {size}"
        )


class World:
    """The P ranks of this launch (rank 0 prints and saves) and, once `attach`ed, the group that
    trains the model."""

    def __init__(self, comm, library: str = "MPI"):
        self.comm, self.library = comm, library
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.group: Optional[exchange.Group] = None
        self.mode: Optional[str] = None
        self.sharded: list = []  # the parameter names split over the ranks

    @property
    def root(self) -> bool:
        return self.rank == 0

    def attach(self, model: GPT, optimizer, mode: str) -> None:
        """Make model (and its AdamW) this rank's part of the P-rank model: it computes its rows
        of every batch, draws random numbers as one process does, and with mode 'expert' keeps
        only its experts [r E/P, (r+1) E/P) (weights and moments; load a checkpoint first)."""
        device = backend.is_cupy_array(next(iter(model.params.values())))
        self.mode = mode
        self.group = exchange.Group(self.comm, mode == "expert", device and cuda_aware_mpi())
        model.group = self.group
        model.rng = exchange.ShardedRng(model.rng, self.group)
        # the routed experts' stacked weights (E, ., .) are split over the ranks
        self.sharded = [n for n in model.params if ".moe.experts." in n] if mode == "expert" else []
        for n in self.sharded:
            El = model.params[n].shape[0] // self.size
            part = slice(self.rank * El, (self.rank + 1) * El)
            model.params[n] = model.params[n][part].copy()
            optimizer.m[n], optimizer.v[n] = optimizer.m[n][part].copy(), optimizer.v[n][part].copy()

    def describe(self, model: GPT) -> str:
        c, g = model.config, self.group
        if self.mode == "expert":
            how = f"expert parallel: {c.n_experts // self.size} of the {c.n_experts} experts of each MoE layer per rank"
        else:
            how = "data parallel: every rank holds the whole model"
        where = "host arrays"  # numpy: MPI reads the arrays themselves
        if backend.is_cupy_array(next(iter(model.params.values()))):
            where = (
                "device buffers (CUDA-aware MPI)"
                if g.device_buffers
                else "host buffers (MPI is not CUDA-aware)"
            )
        return (
            f"distributed over {self.size} ranks ({self.library}), {how}; batch rows split {self.size} ways; "
            f"MPI exchanges {where}"
        )

    # ------------------------------------------------------------------ one training step
    def reduce_gradients(self, grads: dict) -> None:
        """Sum the gradients of the replicated parameters over the ranks (one all-reduce of
        them all, packed in one buffer); the experts' stay local."""
        names = [n for n in grads if n not in self.sharded and grads[n] is not None]
        if not names:
            return
        xp = backend.xp_of(grads[names[0]])
        flat = self.group.allreduce_sum(xp.concatenate([grads[n].reshape(-1) for n in names]))
        at = 0
        for n in names:
            size = grads[n].size
            grads[n] = flat[at : at + size].reshape(grads[n].shape)
            at += size

    def grad_norm(self, grads: dict):
        """The global L2 norm of the P-rank model's gradients (0-d float64, the same on every
        rank): the replicated gradients (the same on every rank) and the all-reduced expert shards."""
        xp = backend.xp_of(next(iter(grads.values())))
        sq = {n: (g.astype(xp.float64) ** 2).sum() for n, g in grads.items() if g is not None}
        total = sum(v for n, v in sq.items() if n not in self.sharded)
        if self.sharded:  # this rank's experts, summed over the ranks
            total = total + self.group.allreduce_sum(xp.stack([sum(sq[n] for n in self.sharded)]))[0]
        return xp.sqrt(total)

    def clip_grad_norm(self, grads: dict, max_norm: float):
        """optim.clip_grad_norm for the whole P-rank model, by its global norm (`grad_norm`)."""
        total = self.grad_norm(grads)
        xp = backend.xp_of(total)
        scale = xp.minimum(1.0, max_norm / (total + 1e-6))
        for g in grads.values():
            if g is not None:
                g *= scale.astype(g.dtype)
        return total

    def abort(self, e: BaseException) -> None:
        """Print this rank's error (with its traceback for a bug) and end every rank with MPI_Abort:
        the launcher kills the other ranks, and every exit status is non-zero."""
        sys.stdout.flush()
        if not isinstance(e, (UserError, KeyboardInterrupt)):
            traceback.print_exception(type(e), e, e.__traceback__)
        print(error_line(self.rank, e) + "; stopping every rank", file=sys.stderr, flush=True)
        self.comm.Abort(130 if isinstance(e, KeyboardInterrupt) else 2 if isinstance(e, UserError) else 1)

    def any(self, flag: bool) -> bool:
        """Whether any rank's flag is set (e.g. a stop request): the same answer on every rank."""
        return bool(self.comm.allreduce(int(bool(flag))))

    # ------------------------------------------------------------------ checkpoints
    def gather(self, arrays: dict) -> Optional[dict]:
        """{name: array}: the expert shards of every rank joined on rank 0 (host arrays), the
        others as they are; None on the other ranks."""
        out = {}
        for n, a in arrays.items():
            a = backend.to_numpy(a)
            if n in self.sharded:
                a = np.ascontiguousarray(a)
                full = np.empty((self.size * a.shape[0], *a.shape[1:]), dtype=a.dtype) if self.root else None
                self.comm.Gather(a, full, root=0)
                a = full
            out[n] = a
        return out if self.root else None

    def full_state(self, model: GPT, optimizer):
        """(model, optimizer) as one process holds them, on rank 0 (stand-ins with the whole
        experts, in the form save_checkpoint reads); (None, None) on the others."""
        params = self.gather(model.params)
        state = optimizer.state_dict()
        m, v = self.gather(state["m"]), self.gather(state["v"])
        if not self.root:
            return None, None
        full = SimpleNamespace(config=model.config, params=params, buffers=model.buffers)
        opt = SimpleNamespace(state_dict=lambda: {"t": state["t"], "m": m, "v": v})
        return full, opt

    def standalone_model(self, model: GPT, seed: int = 0) -> Optional[GPT]:
        """On rank 0, a one-process GPT equal to the P-rank model (e.g. to sample from); None elsewhere."""
        params = self.gather(model.params)
        if not self.root:
            return None
        one = GPT(model.config, seed=seed, dtype=model.dtype)
        for n, a in params.items():
            one.params[n] = backend.to_device(a, one.xp, one.dtype)
        for n, a in model.buffers.items():
            one.buffers[n][...] = a
        return one.eval()
