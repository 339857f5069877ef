"""parallel_map on a real local Dask cluster (a scheduler + 2 worker processes on 127.0.0.1): order, per-worker
context, and the preprocess and dedupe stages giving the same bytes as on the local process pool."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from flows.stages import STAGES
from tasks.core import neardup
from tasks.core.config import Params, parse_params
from tasks.core.images import DEFAULT_MAX_PIXELS
from tasks.core.io import Paths, write_index
from tasks.core.parallel import ENV_DASK_SCHEDULER, parallel_map, use_dask
from tests.tasks.core.lesion_images import crop, lesion_image, recolour, write

distributed = pytest.importorskip("distributed")

TINY = Path(__file__).resolve().parents[3] / "params" / "tiny.yaml"


@pytest.fixture(scope="module")
def cluster() -> Any:
    """Scheduler + 2 single-threaded worker processes (spawned, like `dask worker --nworkers 2 --nthreads 1`)."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None, worker_dashboard_address=None) as lc:
        with distributed.Client(lc, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=60)
            yield lc, client


@pytest.fixture(autouse=True)
def _no_engine_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_DASK_SCHEDULER, raising=False)


def tiny(**sections: dict) -> Params:
    raw = yaml.safe_load(TINY.read_text())
    for name, values in sections.items():
        raw[name].update(values)
    return parse_params(raw, str(TINY))


def _ctx(offset: int) -> dict:
    return {"offset": offset, "pid": os.getpid(), "id": uuid.uuid4().hex}


def _add(ctx: dict, item: int) -> tuple[int, int, str]:
    return item + ctx["offset"], ctx["pid"], ctx["id"]


def _outputs(paths: Paths, stage: str) -> dict[str, bytes]:
    files = [*paths.stage(stage).rglob("*"), *(paths.reports / stage).rglob("*")]
    return {str(p.relative_to(paths.root)): p.read_bytes() for p in sorted(files)
            if p.is_file() and p.name != "run_stats.json"}


def _run_on(client: Any, address: str | None, fn: Any) -> tuple[Any, list[dict]]:
    """fn() with parallel_map on `address` (None: process pool); returns its result and the Dask tasks run."""
    with distributed.get_task_stream(client) as ts, use_dask(address):
        out = fn()
    return out, [t for t in ts.data if not str(t.get("key", "")).startswith("_")]


# --------------------------------------------------------------------------- parallel_map itself
def test_order_kept_and_context_built_once_per_worker(cluster: Any) -> None:
    lc, client = cluster
    items = list(range(300))
    out, tasks = _run_on(client, lc.scheduler_address,
                         lambda: parallel_map(_add, items, workers=1, setup=_ctx, setup_args=(1000,), desc="t add"))
    assert [v for v, _, _ in out] == [i + 1000 for i in items]
    pids = {pid for _, pid, _ in out}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    # one context per worker process for the whole call, however many chunks it ran
    assert len({(pid, cid) for _, pid, cid in out}) == len(pids)
    assert len(tasks) > 1 and all("t-add-" in str(t["key"]) for t in tasks)


def test_env_var_selects_the_cluster_and_empty_input_needs_none(cluster: Any,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    lc, _ = cluster
    monkeypatch.setenv(ENV_DASK_SCHEDULER, lc.scheduler_address)
    out = parallel_map(_add, [1, 2, 3], workers=4, setup=_ctx, setup_args=(0,))
    assert [v for v, _, _ in out] == [1, 2, 3] and os.getpid() not in {p for _, p, _ in out}
    assert parallel_map(_add, [], workers=4) == []
    with use_dask(None):  # an explicit "process pool" wins over the environment
        assert {p for _, p, _ in parallel_map(_add, [1, 2], workers=1, setup=_ctx, setup_args=(0,))} == {
            os.getpid()}


# --------------------------------------------------------------------------- preprocess
def _split_project(root: Path, n: int = 40) -> Paths:
    paths = Paths(root)
    img_dir = root / "data" / "ingest" / "images"
    img_dir.mkdir(parents=True)
    rows = []
    for i in range(n):
        p = write(img_dir / f"ISIC_{i:07d}.jpg", lesion_image(i, size=(120 + 4 * (i % 5), 90)), 90)
        rows.append({"source": "synthetic", "isic_id": f"ISIC_{i:07d}", "path": paths.rel(p),
                     "split": ["train", "val", "test"][i % 3], "target": i % 2})
    bad = img_dir / "ISIC_9999999.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    rows.append({"source": "synthetic", "isic_id": "ISIC_9999999", "path": paths.rel(bad), "split": "train",
                 "target": 0})
    write_index(pd.DataFrame(rows), paths, "split")
    return paths


def test_preprocess_on_dask_gives_the_process_pool_bytes(cluster: Any, tmp_path: Path) -> None:
    lc, client = cluster
    params = tiny(preprocess={"workers": 2, "hair_removal": True, "color_constancy": True})
    runs = {}
    for name, address in (("pool", None), ("dask", lc.scheduler_address)):
        paths = _split_project(tmp_path / name)
        summary, tasks = _run_on(client, address, lambda p=paths: STAGES["preprocess"].run(params, p))
        runs[name] = (summary, tasks, _outputs(paths, "preprocess"))
    (pool_summary, pool_tasks, pool_out), (dask_summary, dask_tasks, dask_out) = runs["pool"], runs["dask"]
    assert pool_summary["processed"] == dask_summary["processed"] == 40
    assert pool_summary["failed"] == dask_summary["failed"] == 1
    assert not pool_tasks and dask_tasks, "the pool run must not touch Dask; the Dask run must"
    assert len(pool_out) > 40 and dask_out == pool_out


# --------------------------------------------------------------------------- dedupe
def _ingest_project(root: Path) -> Paths:
    paths = Paths(root)
    img_dir = root / "data" / "ingest" / "images"
    img_dir.mkdir(parents=True)
    rows = []

    def add(iid: str, img: np.ndarray, quality: int = 95) -> None:
        p = write(img_dir / f"{iid}.jpg", img, quality)
        rows.append({"source": "a", "isic_id": iid, "path": paths.rel(p), "benign_malignant": "benign",
                     "copyright_license": "CC-0", "pixels_x": img.shape[1], "pixels_y": img.shape[0]})

    bases = {k: lesion_image(k) for k in range(10)}
    for k, img in bases.items():
        add(f"ISIC_000000{k}", img)
    add("ISIC_1000000", cv2.resize(bases[0], (100, 75), interpolation=cv2.INTER_AREA))
    add("ISIC_1000002", recolour(bases[2]))
    add("ISIC_1000003", crop(bases[3]))
    add("ISIC_1000004", bases[4], quality=40)
    add("ISIC_1000007", lesion_image(7, texture_seed=12345))  # look-alike: its own photo
    write_index(pd.DataFrame(rows), paths, "ingest")
    return paths


def _features_ctx(thumb_size: int, max_pixels: int) -> tuple[int, int]:
    return thumb_size, max_pixels


def _features_chunk(ctx: tuple[int, int], chunk: list[tuple[str, str]]) -> neardup.Features:
    return neardup._features_of_files(chunk, *ctx)


def compute_features_on_parallel_map(jobs: list[tuple[str, str]], thumb_size: int, workers: int = 1,
                                     chunk: int = 64, max_pixels: int = DEFAULT_MAX_PIXELS) -> neardup.Features:
    """neardup.compute_features routed through parallel_map (the change proposed for tasks/core/neardup.py):
    same chunks, same order, so the same Features on any engine."""
    chunks = [jobs[i:i + chunk] for i in range(0, len(jobs), chunk)]
    parts = parallel_map(_features_chunk, chunks, workers if len(jobs) >= neardup._POOL_MIN_JOBS else 1,
                         setup=_features_ctx, setup_args=(thumb_size, max_pixels), desc="dedupe: hashing")
    return neardup.Features.concat(parts, thumb_size)


def _dedupe_runs(client: Any, address: str, tmp_path: Path) -> tuple[dict, dict, list[dict]]:
    params = tiny()
    outs, dask_tasks = {}, []
    for name, where in (("pool", None), ("dask", address)):
        paths = _ingest_project(tmp_path / name)
        summary, tasks = _run_on(client, where, lambda p=paths: STAGES["dedupe"].run(params, p))
        outs[name] = _outputs(paths, "dedupe")
        assert summary["images"] == 15 and summary["groups"] == 4  # the four copied photos
        if where:
            dask_tasks = tasks
    return outs["pool"], outs["dask"], dask_tasks


def test_dedupe_with_features_on_parallel_map_gives_the_same_bytes_on_dask(
        cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lc, client = cluster
    from tasks import dedupe

    monkeypatch.setattr(dedupe, "compute_features", compute_features_on_parallel_map)
    pool_out, dask_out, tasks = _dedupe_runs(client, lc.scheduler_address, tmp_path)
    assert tasks, "dedupe features did not run on the Dask workers"
    assert len(pool_out) >= 4 and dask_out == pool_out


def test_dedupe_stage_on_dask_gives_the_process_pool_bytes(cluster: Any, tmp_path: Path) -> None:
    lc, client = cluster
    pool_out, dask_out, tasks = _dedupe_runs(client, lc.scheduler_address, tmp_path)
    assert len(pool_out) >= 4 and dask_out == pool_out
    if not tasks:
        pytest.xfail("tasks/core/neardup.py compute_features still runs its own process pool, not parallel_map "
                     "(the test above proves the parallel_map version)")
