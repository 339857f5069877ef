"""parallel_map: order kept, a per-process context built once, in-process with one worker; the engine switch
(the Dask cluster itself: test_parallel_dask.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from tasks.core import parallel as P
from tasks.core.errors import RunError
from tasks.core.parallel import parallel_map


@pytest.fixture(autouse=True)
def _process_pool_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(P.ENV_DASK_SCHEDULER, raising=False)


def _ctx(offset: int) -> dict:
    return {"offset": offset, "pid": os.getpid()}


def _add(ctx: dict, item: int) -> tuple[int, int]:
    return item + ctx["offset"], ctx["pid"]


def test_order_and_context_with_processes() -> None:
    out = parallel_map(_add, list(range(50)), workers=2, setup=_ctx, setup_args=(100,))
    assert [v for v, _ in out] == list(range(100, 150))
    assert os.getpid() not in {pid for _, pid in out}


def test_one_worker_runs_in_process_without_setup() -> None:
    out = parallel_map(lambda ctx, x: (x * 2, ctx), [1, 2, 3], workers=1)
    assert out == [(2, None), (4, None), (6, None)]
    assert parallel_map(_add, [], workers=4, setup=_ctx, setup_args=(0,)) == []


def test_process_pool_is_the_default_and_use_dask_none_overrides_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(P.ENV_DASK_SCHEDULER, raising=False)
    assert P.dask_scheduler() == ""
    monkeypatch.setenv(P.ENV_DASK_SCHEDULER, "tcp://127.0.0.1:1")
    assert P.dask_scheduler() == "tcp://127.0.0.1:1"
    with P.use_dask(None):
        assert P.dask_scheduler() == ""
        assert parallel_map(_add, [1, 2], workers=1, setup=_ctx, setup_args=(0,)) == [(1, os.getpid()),
                                                                                      (2, os.getpid())]


def test_core_does_not_import_dask_at_load() -> None:
    code = "import sys, tasks.core.parallel; sys.exit('distributed' in sys.modules or 'dask' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_unreachable_scheduler_is_a_run_error_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("distributed")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(P, "_CONNECT_TIMEOUT_S", 1)
    monkeypatch.setenv(P.ENV_DASK_SCHEDULER, f"tcp://127.0.0.1:{port}")
    with pytest.raises(RunError, match=P.ENV_DASK_SCHEDULER):
        parallel_map(_add, [1], workers=1, setup=_ctx, setup_args=(0,))
