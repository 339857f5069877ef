"""parallel_map: order kept, a per-process context built once, in-process with one worker."""

from __future__ import annotations

import os

from tasks.core.parallel import parallel_map


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
