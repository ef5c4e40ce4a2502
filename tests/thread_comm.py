"""P ranks simulated by P threads of one process, for tests: `run_ranks(P, fn)` calls fn(comm) in
P threads, where comm has the mpi4py methods minimoe uses (Get_rank, Get_size, Alltoall,
Alltoallv, Allreduce, Allgather, Gather, allgather, allreduce, Abort), implemented with a
shared table and a barrier. Each collective is written from its definition, so it checks
minimoe's use of MPI without MPI: the exchange, the expert-parallel layer, a whole training step.

comm.seen records the kind of every buffer handed to it ("numpy", or "cupy" for a device array),
so a test can tell host staging from device buffers (with tests/fake_cupy.py).
"""

from __future__ import annotations

import threading

import numpy as np


def _host(buf):
    """A buffer's numpy array (the fake CuPy's device arrays are read through their wrapper)."""
    return buf if isinstance(buf, np.ndarray) else buf._a


class ThreadComm:
    def __init__(self, rank: int, shared: dict):
        self.rank, self.shared = rank, shared
        self.size = shared["size"]
        self.seen = shared["seen"]

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def _exchange(self, item):
        """Every rank's item, in rank order (two barriers: all posted, then all read)."""
        table, barrier = self.shared["table"], self.shared["barrier"]
        table[self.rank] = item
        barrier.wait()
        items = list(table)
        barrier.wait()
        return items

    def _note(self, *bufs):
        for b in bufs:
            self.seen.add("numpy" if isinstance(b, np.ndarray) else type(b).__module__.split(".")[0])

    def Alltoallv(self, send, recv):
        (sbuf, (scounts, sdispls)), (rbuf, (rcounts, rdispls)) = send, recv
        self._note(sbuf, rbuf)
        posts = self._exchange((_host(sbuf).reshape(-1), np.asarray(scounts), np.asarray(sdispls)))
        out = _host(rbuf).reshape(-1)
        for s, (flat, counts, displs) in enumerate(posts):
            assert counts[self.rank] == rcounts[s], "the counts sent and expected disagree"
            a = displs[self.rank]
            out[rdispls[s] : rdispls[s] + rcounts[s]] = flat[a : a + counts[self.rank]]
        self._exchange(None)  # nobody leaves while others still read its send buffer

    def Alltoall(self, send, recv):
        self._note(send, recv)
        posts = self._exchange(_host(send).copy())
        _host(recv)[...] = np.stack([p[self.rank] for p in posts])

    def Allreduce(self, send, recv):
        self._note(send, recv)
        posts = self._exchange(_host(send).copy())
        _host(recv)[...] = sum(posts[1:], posts[0].copy())

    def Allgather(self, send, recv):
        posts = self._exchange(_host(send).copy())
        _host(recv)[...] = np.stack(posts)

    def Gather(self, send, recv, root=0):
        posts = self._exchange(np.asarray(send).copy())
        if self.rank == root:
            recv[...] = np.concatenate(posts).reshape(recv.shape)

    def allgather(self, obj):
        return self._exchange(obj)

    def allreduce(self, obj):
        return sum(self._exchange(obj))

    def Abort(self, code=1):
        raise SystemExit(f"Abort({code}) on rank {self.rank}")


def run_ranks(P: int, fn, seen: set | None = None):
    """[fn(comm_0), ..., fn(comm_{P-1})], each in its own thread; the first exception is re-raised."""
    shared = {
        "size": P,
        "table": [None] * P,
        "barrier": threading.Barrier(P, timeout=60),
        "seen": set() if seen is None else seen,
    }
    results, errors = [None] * P, []

    def body(r):
        try:
            results[r] = fn(ThreadComm(r, shared))
        except BaseException as e:  # noqa: BLE001 (re-raised in the caller)
            errors.append(e)
            shared["barrier"].abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(P)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    return results
