"""One parallel map for per-image work: a local process pool by default, a Dask cluster when one is configured.

The engine is a deployment choice, not an experiment parameter (outputs are identical either way, so it must
not change a DVC params hash): `LESIONFLOW_DASK_SCHEDULER` (a scheduler address such as tcp://10.0.0.5:8786,
or the path of a scheduler file written by `dask scheduler --scheduler-file`) sends every parallel_map of the
process to that cluster; unset, the process pool sized by the stage's `workers` param is used (in-process with
one worker). `use_dask(address)` does the same for a block of code. Dask is imported only when it is used.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing as mp
import os
import sys
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import cv2

from tasks.core.errors import RunError
from tasks.core.io import progress

ENV_DASK_SCHEDULER = "LESIONFLOW_DASK_SCHEDULER"
_CONNECT_TIMEOUT_S = 20

_log = logging.getLogger(__name__)
_WORKER_STATE: dict[str, Any] = {}
_OVERRIDE: list[str | None] = []  # stack of use_dask() addresses ("" = process pool)



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



def dask_scheduler() -> str:
    """The Dask scheduler parallel_map uses now ("" = the local process pool)."""
    if _OVERRIDE:
        return _OVERRIDE[-1] or ""
    return os.environ.get(ENV_DASK_SCHEDULER, "").strip()


@contextlib.contextmanager
def use_dask(address: str | None) -> Iterator[None]:
    """Run the parallel_maps of this block on the Dask cluster at `address` (None or "": the process pool),
    whatever LESIONFLOW_DASK_SCHEDULER says."""
    _OVERRIDE.append(address or "")
    try:
        yield
    finally:
        _OVERRIDE.pop()


def parallel_map(fn: Callable[[Any, Any], Any], items: Sequence[Any], workers: int,
                 setup: Callable[..., Any] | None = None, setup_args: tuple = (), desc: str = "") -> list[Any]:
    """[fn(ctx, item) for item in items], order kept: in `workers` processes (in-process when 1), or on the
    configured Dask cluster (then the cluster's size is the parallelism and `workers` is not used).

    `setup(*setup_args)` builds a per-process context once (e.g. an augmenter; on Dask once per worker
    thread and call). `fn` must catch its own per-item errors: one bad image must never take the pool down.
    `fn`, `setup` and the items must be picklable module-level objects (the workers import them by name).
    """
    n = len(items)
    if n == 0:
        return []
    address = dask_scheduler()
    if address:
        return _dask_map(address, fn, items, setup, setup_args, desc)
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


# --------------------------------------------------------------------------- the Dask engine
_CLIENTS: dict[tuple[str, int], Any] = {}
_CLIENTS_LOCK = threading.Lock()
_DASK_LOCAL = threading.local()  # per worker thread: the contexts of the last few calls
_MAX_CONTEXTS = 4


def _dask_client(address: str) -> Any:
    """One client per (scheduler, process), reused by every later call (connecting costs ~0.1-1 s)."""
    from distributed import Client

    key = (address, os.getpid())
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is not None and client.status == "running":
            return client
        kw: dict[str, Any] = {"timeout": _CONNECT_TIMEOUT_S, "set_as_default": False}
        if address.endswith(".json") and "://" not in address:
            kw["scheduler_file"] = address
        else:
            kw["address"] = address
        try:
            client = Client(**kw)
        except (OSError, TimeoutError, ValueError) as exc:
            raise RunError(f"cannot reach the Dask scheduler {address!r} ({ENV_DASK_SCHEDULER}): {exc}; start it "
                           f"(`dask scheduler` + `dask worker <address>`) or unset {ENV_DASK_SCHEDULER} to use the "
                           f"local process pool") from exc
        _CLIENTS[key] = client
        return client


def _dask_chunk(token: str, fn: Callable[[Any, Any], Any], setup: Callable[..., Any] | None, setup_args: tuple,
                chunk: list[Any]) -> list[Any]:
    """Runs on a Dask worker: the call's context is built once per worker thread, then reused by its chunks."""
    if cv2.getNumThreads() != 1:  # the cluster is the parallelism (workers are spawned: no fork hazard here)
        cv2.setNumThreads(1)
    cache: OrderedDict[str, Any] | None = getattr(_DASK_LOCAL, "contexts", None)
    if cache is None:
        cache = _DASK_LOCAL.contexts = OrderedDict()
    if token not in cache:
        cache[token] = setup(*setup_args) if setup is not None else None
        while len(cache) > _MAX_CONTEXTS:
            cache.popitem(last=False)
    ctx = cache[token]
    return [fn(ctx, it) for it in chunk]


def _dask_map(address: str, fn: Callable[[Any, Any], Any], items: Sequence[Any],
              setup: Callable[..., Any] | None, setup_args: tuple, desc: str) -> list[Any]:
    from distributed import as_completed, get_worker, worker_client

    try:  # already on a worker (e.g. the stage itself runs as a Dask task): use that cluster, seceded
        get_worker()
        inner = worker_client()
    except ValueError:
        inner = contextlib.nullcontext(_dask_client(address))
    n = len(items)
    with inner as client:
        threads = sum(client.nthreads().values())
        if threads == 0:
            client.wait_for_workers(1, timeout=_CONNECT_TIMEOUT_S)
            threads = sum(client.nthreads().values())
        # ~4 chunks per worker thread: small enough to balance, large enough that a task (~1 ms scheduler
        # overhead) carries many images.
        size = max(1, min(256, math.ceil(n / (threads * 4))))
        chunks = [list(items[i:i + size]) for i in range(0, n, size)]
        token = uuid.uuid4().hex[:12]
        name = "".join(c if c.isalnum() or c in "-_" else "-" for c in (desc or "parallel_map"))
        # setup/fn go into every task by value: they are small (a config, a function reference).
        futures = [client.submit(_dask_chunk, token, fn, setup, setup_args, c, key=f"{name}-{token}-{k}",
                                 pure=False) for k, c in enumerate(chunks)]
        where = {f.key: k for k, f in enumerate(futures)}
        parts: list[list[Any] | None] = [None] * len(chunks)
        _log.info("%s: %d items in %d tasks on Dask %s (%d worker threads)", desc or "parallel_map", n,
                  len(chunks), address, threads)
        bar = progress(total=n, desc=desc)
        try:
            for fut, res in as_completed(futures, with_results=True, loop=client.loop):
                parts[where[fut.key]] = res
                bar.update(len(res))
        except BaseException:
            client.cancel(futures)
            raise
        finally:
            bar.close()
    return [r for part in parts for r in part]  # type: ignore[union-attr]
