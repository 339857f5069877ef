"""One parallel map for per-image work: a process pool sized from params (in-process with one worker)."""

from __future__ import annotations

import multiprocessing as mp
import sys
from collections.abc import Callable, Sequence
from typing import Any

import cv2

from tasks.core.io import progress

_WORKER_STATE: dict[str, Any] = {}



def _init_worker(setup: Callable[..., Any] | None, setup_args: tuple) -> None:
    # One OpenCV thread per process: the pool is the parallelism; nested threads only add contention.
    # Forked workers already inherit 1 (set in the parent); calling setNumThreads there again would tear
    # down an inherited thread pool whose threads do not exist in the child and hang in pthread_cond_destroy.
    if cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)
    _WORKER_STATE["ctx"] = setup(*setup_args) if setup is not None else None



def _call(job: tuple[Callable[..., Any], Any]) -> Any:
    fn, item = job
    return fn(_WORKER_STATE.get("ctx"), item)



def parallel_map(fn: Callable[[Any, Any], Any], items: Sequence[Any], workers: int,
                 setup: Callable[..., Any] | None = None, setup_args: tuple = (), desc: str = "") -> list[Any]:
    """[fn(ctx, item) for item in items] in `workers` processes (in-process when 1), order kept.

    `setup(*setup_args)` builds a per-process context once (e.g. an augmenter). `fn` must catch its own
    per-item errors: one bad image must never take the pool down.
    """
    n = len(items)
    workers = max(1, min(int(workers), n))
    if workers == 1:
        prev = cv2.getNumThreads()
        try:
            _init_worker(setup, setup_args)
            return [_call((fn, it)) for it in progress(items, total=n, desc=desc)]
        finally:
            cv2.setNumThreads(prev)
            _WORKER_STATE.clear()
    # fork is the cheapest start (no re-import); after TensorFlow is loaded its threads make fork unsafe,
    # so then the workers come from a clean forkserver instead.
    method = "forkserver" if "tensorflow" in sys.modules or sys.platform != "linux" else "fork"
    if sys.platform == "win32":
        method = "spawn"
    ctx = mp.get_context(method)
    # Chunks amortise IPC; ~8 chunks per worker keeps the tail short when images differ in cost.
    chunksize = max(1, min(64, n // (workers * 8)))
    # Shut OpenCV's own thread pool down in the parent before forking: a child inheriting a live pool
    # deadlocks on its first cv2.setNumThreads (measured: every run hung once the parent had used CLAHE).
    prev = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        with ctx.Pool(workers, initializer=_init_worker, initargs=(setup, setup_args)) as pool:
            jobs = ((fn, it) for it in items)
            return list(progress(pool.imap(_call, jobs, chunksize=chunksize), total=n, desc=desc))
    finally:
        cv2.setNumThreads(prev)

