"""Expert parallelism's all-to-all: every token-slot travels to the rank that holds its expert,
and its result travels back.

Legend: P ranks, r this rank, C channels, E experts (E_l = E/P of them on each rank: expert e
lives on rank e // E_l), M slot rows this rank sends, R slot rows it receives.

    rank s holds x_s (M_s, C), its rows grouped by destination: block s->d has n[s, d] rows
    all_to_all:  rank d receives y_d = concat over s of block s->d        (R_d, C), by source

Lay every rank's blocks out in a P x P grid (row s the sender, column d the receiver): the
exchange is a BLOCK TRANSPOSE, block (s, d) moves to (d, s). It only moves rows, so its backward
moves the gradient rows back where they came from: the block transpose of the gradients, which
is the same all-to-all with the roles of sender and receiver swapped,
    dx_s = concat over d of (the rows of dy_d that came from s).

The communicator is any object with mpi4py's methods (Get_rank, Get_size, Alltoall, Alltoallv,
Allreduce, Allgather): this module never imports mpi4py; minimoe.dist creates the Group.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, NamedTuple

import numpy

from minimoe import backend
from minimoe.ops import experts


class Group:
    """The P ranks that train one model together, as the layers see them.

    comm: an mpi4py communicator (or a stand-in with its methods).
    expert_parallel: each MoE layer's experts are split over the ranks (else data parallel:
        every rank holds every expert, and only the routing statistics are summed).
    device_buffers: hand device (CuPy) arrays to MPI directly (a CUDA-aware MPI); otherwise
        they are copied to the host before and back after each exchange.
    `bytes_sent`, `seconds`, `calls` count the traffic by kind ("all_to_all", "counts",
    "allreduce"): the bytes this rank sent to OTHER ranks, and the wall time inside MPI
    (host staging copies included).
    """

    def __init__(self, comm, expert_parallel: bool = False, device_buffers: bool = False):
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.expert_parallel = expert_parallel
        self.device_buffers = device_buffers
        self.bytes_sent, self.seconds, self.calls = Counter(), Counter(), Counter()

    def reset_traffic(self):
        self.bytes_sent.clear()
        self.seconds.clear()
        self.calls.clear()

    def _count(self, kind, nbytes, t0):
        self.bytes_sent[kind] += int(nbytes)
        self.seconds[kind] += time.perf_counter() - t0
        self.calls[kind] += 1

    def _to_mpi(self, a):
        """The buffer MPI reads: the array itself (host, or device with device_buffers), else an
        explicit copy to the host."""
        a = backend.xp_of(a).ascontiguousarray(a)
        if not backend.is_cupy_array(a):
            return a
        if self.device_buffers:
            backend.synchronize(a)  # MPI reads the memory behind CuPy's back: finish the kernels first
            return a
        return backend.to_numpy(a)

    def _empty(self, like, shape):
        """A receive buffer beside `like`'s MPI buffer (host, or device with device_buffers)."""
        return backend.xp_of(like).empty(shape, dtype=like.dtype)

    def _back(self, buf, xp):
        return buf if backend.xp_of(buf) is xp else backend.to_device(buf, xp)

    def local_rows(self, a):
        """a (B, ...) the same on every rank -> this rank's share, rows [r B/P, (r+1) B/P)."""
        B = a.shape[0]
        if B % self.size:
            raise ValueError(f"a batch of {B} rows cannot be split evenly over {self.size} ranks")
        n = B // self.size
        return a[self.rank * n : (self.rank + 1) * n]

    def allreduce_sum(self, a):
        """The elementwise sum over the ranks of a (any shape), on a's backend."""
        xp, t0 = backend.xp_of(a), time.perf_counter()
        send = self._to_mpi(a)
        out = self._empty(send, send.shape)
        self.comm.Allreduce(send, out)  # mpi4py's default op is SUM
        out = self._back(out, xp)
        self._count("allreduce", send.nbytes * (self.size > 1), t0)
        return out

    def allgather(self, a):
        """(k,) host array from each rank -> (P, k) on every rank."""
        a = numpy.ascontiguousarray(a)
        out = numpy.empty((self.size, *a.shape), dtype=a.dtype)
        self.comm.Allgather(a, out)
        return out

    def alltoall_counts(self, counts):
        """counts (P, k) host integers, row d for rank d -> (P, k): row s is what rank s sent here."""
        t0 = time.perf_counter()
        send = numpy.ascontiguousarray(counts, dtype=numpy.int64)
        recv = numpy.empty_like(send)
        self.comm.Alltoall(send, recv)
        self._count("counts", send[numpy.arange(self.size) != self.rank].nbytes, t0)
        return recv

    def alltoallv(self, x, send_rows, recv_rows):
        """x (M, C) rows grouped by destination (send_rows[d] for rank d) -> (R, C) grouped by source."""
        xp, t0 = backend.xp_of(x), time.perf_counter()
        C = x.shape[1]
        send = self._to_mpi(x)
        recv = self._empty(send, (int(sum(recv_rows)), C))
        s = numpy.asarray(send_rows, dtype=numpy.int64) * C
        r = numpy.asarray(recv_rows, dtype=numpy.int64) * C
        s_at = numpy.concatenate([[0], numpy.cumsum(s)[:-1]])
        r_at = numpy.concatenate([[0], numpy.cumsum(r)[:-1]])
        self.comm.Alltoallv([send, (s, s_at)], [recv, (r, r_at)])
        y = self._back(recv, xp)
        self._count("all_to_all", (s.sum() - s[self.rank]) * x.dtype.itemsize, t0)
        return y


# ---------------------------------------------------------------------------------------------
# The all-to-all as a forward/backward pair
# ---------------------------------------------------------------------------------------------


def all_to_all_forward_reference(xs: list, counts) -> list:
    """The exchange seen from above, every rank's array in one process (the plain twin of
    all_to_all_forward, which each rank runs on its own part): xs[s] (M_s, C) with its rows grouped
    by destination, counts[s, d] rows for rank d -> ys[d] = concat over s of block s->d of xs[s]."""
    P = len(xs)
    at = [numpy.concatenate([[0], numpy.cumsum(counts[s])]) for s in range(P)]
    xp = backend.xp_of(xs[0])
    return [xp.concatenate([xs[s][at[s][d] : at[s][d + 1]] for s in range(P)]) for d in range(P)]


def all_to_all_backward_reference(dys: list, counts) -> list:
    """dys[d] (R_d, C) -> dxs[s] (M_s, C): the block transpose back. ys[d] holds counts[s, d] rows
    from each s in order, i.e. it is grouped by destination s with counts.T[d, s] rows: the
    backward is the forward with the counts transposed."""
    return all_to_all_forward_reference(dys, numpy.asarray(counts).T)


class ExchangeCache(NamedTuple):
    send_rows: tuple  # (P,) rows this rank sent to each rank
    recv_rows: tuple  # (P,) rows it received from each rank
    group: Group


def all_to_all_forward(x, send_rows, recv_rows, group: Group):
    """x (M, C) -> y (R, C), cache: the block transpose over the ranks.

    x's rows are grouped by destination, send_rows[d] rows for rank d in rank order; y's rows are
    grouped by source, recv_rows[s] rows from rank s. M = sum(send_rows), R = sum(recv_rows), and
    recv_rows on rank d must equal send_rows[d] of every sender (exchange the counts first).
        y_d = concat_s x_s[rows for d]
    """
    send_rows, recv_rows = tuple(int(n) for n in send_rows), tuple(int(n) for n in recv_rows)
    if x.shape[0] != sum(send_rows):
        raise ValueError(f"x has {x.shape[0]} rows but send_rows {send_rows} add up to {sum(send_rows)}")
    return group.alltoallv(x, send_rows, recv_rows), ExchangeCache(send_rows, recv_rows, group)


def all_to_all_backward(dy, cache: ExchangeCache):
    """dy (R, C) -> dx (M, C): the gradient of a block transpose is the block transpose back.
    Rank d returns the rows it received from s to s, so the exchange runs in the opposite
    direction: send_rows and recv_rows swap roles.    dx_s = concat_d dy_d[rows from s]"""
    return cache.group.alltoallv(dy, cache.recv_rows, cache.send_rows)


# ---------------------------------------------------------------------------------------------
# The experts of a MoE layer spread over the ranks
# ---------------------------------------------------------------------------------------------


def expert_major(counts):
    """counts (P, E_l) host: n[s, j] rows from rank s for local expert j, stored source-major
    -> (R,) host permutation that lists the same rows expert-major (by j, then by s)."""
    counts = numpy.asarray(counts, dtype=numpy.int64)
    start = (numpy.cumsum(counts.reshape(-1)) - counts.reshape(-1)).reshape(counts.shape)
    P, El = counts.shape
    blocks = [numpy.arange(start[s, j], start[s, j] + counts[s, j]) for j in range(El) for s in range(P)]
    return numpy.concatenate(blocks) if blocks else numpy.zeros(0, dtype=numpy.int64)


class ExpertParallelCache(NamedTuple):
    to_experts: ExchangeCache  # the slots' trip to their experts' ranks
    perm: Any  # (R,) received rows in expert-major order (device index array)
    experts: experts.ExpertsCache  # the local experts' FFN caches
    back: ExchangeCache  # the results' trip back


def experts_parallel_forward(x_sorted, offsets, w_local: dict, activation: str, group: Group):
    """x_sorted (M, C), offsets (E+1,) host -> y_sorted (M, C), cache.

    The same numbers as `ops.experts.experts_forward(x_sorted, offsets, w_all)`, with the E
    experts spread over the ranks: w_local holds this rank's E_l = E/P experts (E_l, C, F), ...
        1. counts: n[r, d, j] = slots of rank r for expert d*E_l + j; exchanged (P*E_l ints)
        2. all-to-all: each slot row to the rank of its expert (x_sorted is sorted by expert,
           so the rows for rank d are one contiguous block)
        3. the local experts on what arrived, regrouped expert-major (the layout of today's
           sorted dispatch: expert j's rows from rank 0, then from rank 1, ...)
        4. all-to-all back: every result row to the rank (and row) its slot came from
    """
    xp = backend.xp_of(x_sorted)
    P, E = group.size, len(offsets) - 1
    El = E // P
    sent = numpy.diff(numpy.asarray(offsets, dtype=numpy.int64)).reshape(P, El)  # to rank d, expert j
    got = group.alltoall_counts(sent)  # got[s, j]: rows from rank s for my expert j
    x_recv, to_experts = all_to_all_forward(x_sorted, sent.sum(axis=1), got.sum(axis=1), group)
    perm = backend.to_device(expert_major(got), xp)
    local_offsets = [0] + numpy.cumsum(got.sum(axis=0)).tolist()
    y_local, c_exp = experts.experts_forward(x_recv[perm], local_offsets, w_local, activation)
    y_recv = xp.empty_like(y_local)
    y_recv[perm] = y_local  # back to source-major order
    y_sorted, back = all_to_all_forward(y_recv, got.sum(axis=1), sent.sum(axis=1), group)
    return y_sorted, ExpertParallelCache(to_experts, perm, c_exp, back)


def experts_parallel_backward(dy_sorted, cache: ExpertParallelCache):
    """dy_sorted (M, C) -> dx_sorted (M, C), dict of this rank's expert gradients (E_l, ., .).
    The forward in reverse: the gradients travel to the experts (the backward of the return trip),
    through the local experts, and back (the backward of the first trip). Expert gradients stay
    on the expert's rank: no other rank holds those weights."""
    xp = backend.xp_of(dy_sorted)
    dy_recv = all_to_all_backward(dy_sorted, cache.back)
    dx_local, dw = experts.experts_backward(dy_recv[cache.perm], cache.experts)
    dx_recv = xp.empty_like(dx_local)
    dx_recv[cache.perm] = dx_local
    return all_to_all_backward(dx_recv, cache.to_experts), dw


# ---------------------------------------------------------------------------------------------
# Sums over the global batch
# ---------------------------------------------------------------------------------------------


def global_mean(value, count, group: Group):
    """A mean over this rank's `count` items -> (the mean over every rank's items, this rank's
    share count / total count, the weight of its local mean in the global one). 0-d arrays."""
    xp = backend.xp_of(value)
    tot = group.allreduce_sum(xp.stack([value * count, count]).astype(xp.float64))
    total = xp.maximum(tot[1], 1.0)
    return (tot[0] / total).astype(value.dtype), (count / total).astype(value.dtype)


class ShardedRng:
    """The random stream of one process, cut by rank: each draw of shape (n, ...) makes the draw
    of shape (P n, ...) one process would make for the whole batch and returns this rank's rows
    (dropout masks, router noise), so P ranks see the numbers one process sees. Every rank
    draws the same global array: P times the random numbers, for identical results."""

    def __init__(self, rng, group: Group):
        self.rng, self.group = rng, group

    @property
    def bit_generator(self):  # what checkpoints save and restore
        return self.rng.bit_generator

    def _cut(self, draw, shape, **kw):
        shape = tuple(shape)
        return self.group.local_rows(draw((shape[0] * self.group.size, *shape[1:]), **kw))

    def random(self, shape, **kw):
        return self._cut(self.rng.random, shape, **kw)

    def standard_normal(self, shape, **kw):
        return self._cut(self.rng.standard_normal, shape, **kw)
