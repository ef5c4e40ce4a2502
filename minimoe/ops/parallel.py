"""Independent pieces of one op run side by side on a few threads (the experts of an MoE layer).

NumPy lets go of Python's global lock inside its matrix products and elementwise loops, so two
Python threads that each work on their own arrays really do run on two cores. The experts of an
MoE layer are such pieces: expert e reads and writes only its own rows offsets[e]:offsets[e+1]
and its own weight slices, so running them in any order, or at once, gives the same numbers,
bit for bit (each expert's arithmetic is exactly what one thread would do).

    parallel.set_workers(2)             # minimoe.threads does this; 1 (the default) = in order
    parallel.run([lambda: f(0), lambda: f(1)])     # results in the order of the tasks

Why not let the BLAS library use both cores? Its threads split ONE matrix product and then
wait, spinning, for each other at its end: with the laptop-size experts' small products (192
rows) that costs more than it gains, and when another program takes a core, every product waits
for the scheduler to hand it back (see minimoe/threads.py). Here a task is a whole expert, and a
thread waiting for another sleeps instead of spinning.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

_state = {"workers": 1, "pool": None, "pool_threads": 0}
_lock = threading.Lock()


def set_workers(n: int) -> None:
    """Run up to n tasks at once from now on (n = 1: every task in the caller's thread, in order)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"workers must be an integer >= 1, got {n!r}")
    _state["workers"] = n


def workers() -> int:
    """How many tasks run at once."""
    return _state["workers"]


def _pool(threads: int) -> ThreadPoolExecutor:
    """A pool of at least `threads` threads, kept for the life of the process (a smaller one is
    replaced; lowering the workers keeps it, idle threads cost nothing)."""
    with _lock:
        if _state["pool_threads"] < threads:
            if _state["pool"] is not None:
                _state["pool"].shutdown(wait=True)
            _state["pool"] = ThreadPoolExecutor(threads, thread_name_prefix="minimoe")
            _state["pool_threads"] = threads
        return _state["pool"]


def run(tasks: list) -> list:
    """Call every task (a function of no arguments); return their results in the tasks' order.
    The caller's thread runs the first task itself while the pool runs the others."""
    n = _state["workers"]
    if n == 1 or len(tasks) < 2 or threading.current_thread().name.startswith("minimoe"):
        return [task() for task in tasks]  # one worker, one task, or already inside a task
    pool = _pool(n - 1)
    # at most n tasks at once: the caller runs every n-th task, the pool the others
    futures = {i: pool.submit(task) for i, task in enumerate(tasks) if i % n}
    mine = {i: task() for i, task in enumerate(tasks) if i % n == 0}
    return [mine[i] if i in mine else futures[i].result() for i in range(len(tasks))]


def split(sizes: list, parts: int) -> list:
    """Contiguous groups of indices 0..len(sizes)-1 with about equal sums of sizes, at most `parts`
    groups, none empty: how the experts' rows (sizes) are shared out among the workers."""
    total = sum(sizes)
    groups, group, done = [], [], 0
    for i, s in enumerate(sizes):
        group.append(i)
        done += s
        # close the group once it reaches its share of the total (the last group takes the rest)
        if len(groups) < parts - 1 and done >= total * (len(groups) + 1) / parts:
            groups.append(group)
            group = []
    if group:
        groups.append(group)
    return groups
