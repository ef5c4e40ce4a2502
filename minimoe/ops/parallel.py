"""Independent pieces of one op run side by side on a few threads (the experts of an MoE layer,
the attention core's batch rows, AdamW's parameter groups).

NumPy lets go of Python's global lock inside its matrix products and elementwise loops, so two
Python threads that each work on their own arrays really do run on two cores. The experts of an
MoE layer are such pieces: expert e reads and writes only its own rows offsets[e]:offsets[e+1]
and its own weight slices, so running them in any order, or at once, gives the same numbers,
bit for bit (each expert's arithmetic is exactly what one thread would do).

    parallel.set_workers(2)             # minimoe.threads does this; 1 (the default) = in order
    parallel.run([lambda: f(0), lambda: f(1), lambda: f(2)])   # results in the order of the tasks

How: the caller and up to workers - 1 helper threads take the next task not yet taken, until
none is left; the caller then waits only for the tasks still running on a helper. A helper that
the scheduler has not started yet (another program has its core) simply finds nothing left: the
caller never waits for a thread that is not running, and the worst case is the caller doing
everything itself, as with one worker.

Why not let the BLAS library use both cores? Its threads split ONE matrix product and then
wait, spinning, for each other at its end: with the laptop-size experts' small products (192
rows) that gains little, and when another program takes a core, every product waits for the
scheduler to hand it back (see minimoe/threads.py). Here a task is a whole expert.
"""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

_state = {"workers": 1, "pool": None, "pool_threads": 0}
_lock = threading.Lock()
_local = threading.local()  # .busy: this thread is running a task (a nested run goes in order)


def set_workers(n: int) -> None:
    """Run up to n tasks at once from now on (n = 1: every task in the caller's thread, in order)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"workers must be an integer >= 1, got {n!r}")
    _state["workers"] = n


def workers() -> int:
    """How many tasks run at once."""
    return _state["workers"]


def _pool(threads: int) -> ThreadPoolExecutor:
    """A pool of at least `threads` helper threads, kept for the life of the process (a smaller
    one is replaced; lowering the workers keeps it: idle threads cost nothing)."""
    with _lock:
        if _state["pool_threads"] < threads:
            if _state["pool"] is not None:
                _state["pool"].shutdown(wait=True)
            _state["pool"] = ThreadPoolExecutor(threads, thread_name_prefix="minimoe")
            _state["pool_threads"] = threads
        return _state["pool"]


def run(tasks: list) -> list:
    """Call every task (a function of no arguments); return their results in the tasks' order.
    A task's exception is raised here, after every task has finished."""
    n, todo = _state["workers"], len(tasks)
    if n == 1 or todo < 2 or getattr(_local, "busy", False):
        return [task() for task in tasks]
    taken = itertools.count()  # next(taken) hands each task index out once (atomic under the GIL)
    results, errors = [None] * todo, []
    finished = threading.Semaphore(0)  # released once per finished task

    def drain():
        _local.busy = True
        try:
            while (i := next(taken)) < todo:
                try:
                    results[i] = tasks[i]()
                except BaseException as e:  # noqa: BLE001  (handed to the caller below)
                    errors.append(e)
                finally:
                    finished.release()
        finally:
            _local.busy = False

    pool = _pool(n - 1)
    for _ in range(min(n, todo) - 1):
        pool.submit(drain)
    drain()  # the caller works too
    for _ in range(todo):
        finished.acquire()
    if errors:
        raise errors[0]
    return results
