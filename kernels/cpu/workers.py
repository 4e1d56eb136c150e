"""Worker threads of the CPU tile path, and the rules that keep the process as it was.

Why threads of our own: the tile loops issue many small torch ops; when each of
them forks and joins 2 OpenMP threads, every barrier stalls on a shared 2-core
machine (cpu-mid forward 1.26 s with 2 OpenMP threads vs 0.38 s with 1, load ~6).
So each worker runs its share single-threaded inside torch (ops release the GIL)
and the workers meet once, at the end of a call.

Process state. ``torch.set_num_threads`` writes a per-thread OpenMP setting *and*
a process-wide default that threads started later inherit. The calling thread's
setting is never touched: it only waits. Each worker sets 1 for itself when it
starts; the process default is then put back (from a fresh thread, which is the
only place it can be read), all under one lock, once per pool. Concurrent calls
from several user threads share the pool; each waits for its own parts.

Fork. A forked child inherits the pool object but none of its threads, so the
pool is dropped in the child (``os.register_at_fork``) and rebuilt on first use.
"""
from __future__ import annotations

import os
import queue
import threading
from typing import Callable, Iterable, List, Optional

import torch


def _in_fresh_thread(fn: Callable):
    """Run ``fn()`` in a new thread and return its result (reads/writes the process default)."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn()), name="nuwa3dna-probe")
    t.start()
    t.join()
    return out[0]


class _Pool:
    """``n`` daemon threads, each single-threaded inside torch, running jobs ``fn()`` from a queue."""

    def __init__(self, n: int):
        self.n = n
        self.jobs: "queue.SimpleQueue" = queue.SimpleQueue()
        default = _in_fresh_thread(torch.get_num_threads)
        ready = threading.Barrier(n + 1)
        for i in range(n):
            threading.Thread(target=self._loop, args=(ready,), name=f"nuwa3dna-worker-{i}",
                             daemon=True).start()
        ready.wait()
        _in_fresh_thread(lambda: torch.set_num_threads(default))

    def _loop(self, ready: threading.Barrier) -> None:
        torch.set_num_threads(1)
        _LOCAL.in_pool = True
        ready.wait()
        while True:
            job = self.jobs.get()
            if job is None:
                return
            job()

    def close(self) -> None:
        for _ in range(self.n):
            self.jobs.put(None)


_POOL: Optional[_Pool] = None
_POOL_LOCK = threading.Lock()
_LOCAL = threading.local()


def _forget_pool_in_child() -> None:
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def _pool(n: int) -> _Pool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.n < n:
            if _POOL is not None:
                _POOL.close()
            _POOL = _Pool(n)
        return _POOL


def worker_count(device: torch.device, limit: Optional[int] = None) -> int:
    """Workers for one call: the caller's torch thread count (CPU only; other devices run inline)."""
    if device.type != "cpu":
        return 1
    n = torch.get_num_threads()
    return max(1, n if limit is None else min(n, limit))


def split(xs: list, n: int) -> List[list]:
    """``xs`` cut into at most ``n`` contiguous, non-empty, near-equal parts."""
    n = max(1, min(n, len(xs)))
    cuts = [len(xs) * i // n for i in range(n + 1)]
    return [xs[a:b] for a, b in zip(cuts, cuts[1:])]


def in_worker(fn: Callable, workers: int):
    """``fn()`` on a pool thread (the call's lead worker) when ``workers`` > 1, else inline.

    The calling thread then never runs a multi-threaded op of ours: a parent that
    only used this op leaves no OpenMP team behind to hang a forked child (GNU
    OpenMP's pool does not survive fork), and the caller's settings stay as they are.
    """
    if workers <= 1 or getattr(_LOCAL, "in_pool", False):
        return fn()
    box: "queue.SimpleQueue" = queue.SimpleQueue()

    def job():
        try:
            box.put((True, fn()))
        except BaseException as e:              # re-raised in the caller
            box.put((False, e))
    _pool(workers).jobs.put(job)
    ok, value = box.get()
    if not ok:
        raise value
    return value


def on_lead(body: Callable[[int], object], device: torch.device, max_workers: Optional[int]):
    """``body(workers)`` for one forward or backward call: on the lead worker (``in_worker``),
    outside inference mode (buffers made there stay usable later) and outside autograd."""
    workers = worker_count(device, max_workers)

    def lead():
        with torch.inference_mode(False), torch.no_grad():
            return body(workers)
    return in_worker(lead, workers)


class _Helpers:
    """Helper jobs of one ``run``: a job that starts after the lead has finished does
    nothing, so the lead waits only for jobs that started (no deadlock when every
    pool thread is some concurrent call's lead)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.started = 0
        self.closed = False
        self.done: "queue.SimpleQueue" = queue.SimpleQueue()

    def job(self, fn, items):
        def job():
            with self.lock:
                if self.closed:
                    return
                self.started += 1
            try:
                with torch.no_grad():           # grad mode is per thread; work is never recorded
                    fn(items)
            except BaseException as e:          # re-raised by the lead
                self.done.put(e)
            else:
                self.done.put(None)
        return job

    def close_and_wait(self) -> None:
        with self.lock:
            self.closed = True
            n = self.started
        errors = [e for e in (self.done.get() for _ in range(n)) if e is not None]
        if errors:
            raise errors[0]


def run(fn: Callable[[Iterable], None], parts: List[list], workers: int) -> None:
    """Run ``fn(items)`` over ``parts`` on up to ``workers`` threads.

    The threads pull parts from a shared queue until it is empty, so a thread the
    OS deschedules does not hold the others up (with static halves, one
    descheduled worker made the whole call wait for it). The lead (this thread,
    a pool thread inside ``in_worker``) pulls too; outside the pool it runs all
    parts inline.
    """
    parts = [p for p in parts if p]
    todo: "queue.SimpleQueue" = queue.SimpleQueue()
    for p in parts:
        todo.put(p)

    def pull():
        while True:
            try:
                p = todo.get_nowait()
            except queue.Empty:
                return
            yield from p

    nw = min(workers, len(parts))
    helpers = _Helpers()
    if nw > 1 and getattr(_LOCAL, "in_pool", False):
        pool = _pool(nw)
        for _ in range(nw - 1):
            pool.jobs.put(helpers.job(fn, pull()))
    try:
        with torch.no_grad():
            fn(pull())
    finally:
        helpers.close_and_wait()
