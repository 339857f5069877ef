"""preprocess stage: resize (letterbox or centre crop), optional colour constancy and hair removal, CLAHE on L of LAB.

The pixel work is `tasks.core.images.process_image` (which checks each file's header against
`preprocess.max_pixels` and refuses damaged JPEGs before decoding); this module maps it over the split's
images with `tasks.core.parallel.parallel_map` and does the I/O in one thin `run()`.

Reruns reuse earlier work (`preprocess.cache`): the PNG of an input is cached under
`.cache/lesionflow/preprocess/` keyed by the sha256 of the input bytes, the params that change pixels or
bytes (`result_params`) and the code version (`cache_version`). A nightly run then decodes only new images and
writes the same bytes a cold run writes; deleting the cache changes no output.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import tasks.core.images as images_module
from tasks.core.cache import ResultCache, source_digest
from tasks.core.config import Params, Preprocess
from tasks.core.errors import InputError, RunError
from tasks.core.images import decode, encode_png, process_image, resize, sample_grid
from tasks.core.io import (
    KEY,
    Paths,
    image_relpath,
    prune_outputs,
    read_index,
    write_bytes,
    write_file_atomic,
    write_index,
    write_json,
    write_run_stats,
    write_table,
)
from tasks.core.parallel import parallel_map

log = logging.getLogger(__name__)

STAGE = "preprocess"
INPUT_STAGE = "split"
SAMPLE_COLUMNS = 8  # images in the before/after grid
# Bump by hand when the bytes written for the same input and params change (e.g. another PNG encoding).
# The key also holds the sha256 of tasks/core/images.py and the OpenCV / numpy versions.
CACHE_VERSION = "preprocess-1"
# Params that change nothing in an output file: the only ones left out of the cache key.
NOT_IN_RESULT = frozenset({"workers", "max_failed_fraction", "cache"})
CACHE_KEEP_OTHER = 2  # result sets of other params kept next to the current one (older ones are deleted)
POOL_MIN_IMAGES = 128  # fewer images to compute than this run in-process (~2 ms each vs ~0.3 s of pool)


# --------------------------------------------------------------------------- pure
def output_paths(df: pd.DataFrame, where: str = "data/split/index.parquet") -> list[str]:
    """data/preprocess/images/<source>/<shard>/<isic_id>.png per row; InputError if two rows share a file."""
    rel_out = [image_relpath(STAGE, s, i) for s, i in zip(df["source"], df["isic_id"], strict=True)]
    clash = pd.Series(rel_out).duplicated(keep=False)
    if clash.any():
        bad = df.loc[clash.to_numpy(), KEY].head(5).to_dict("records")
        raise InputError(f"{where}: ids that map to the same file name after sanitising: {bad}; rename them "
                         "at the source (ids may use letters, digits and . _ + -)")
    return rel_out


def result_params(cfg: Preprocess) -> dict[str, Any]:
    """The params that decide an output file's bytes (every key but NOT_IN_RESULT: a new key counts)."""
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in NOT_IN_RESULT}


def cache_version() -> str:
    """CACHE_VERSION + the pixel code's source hash + library versions: any of them changing is a new cache."""
    import cv2

    code = source_digest([images_module.__file__, __file__])[:16]
    return f"{CACHE_VERSION}/code-{code}/opencv-{cv2.__version__}/numpy-{np.__version__}"


def open_cache(cfg: Preprocess, paths: Paths) -> ResultCache | None:
    """This run's result set under .cache/lesionflow/preprocess (None when `preprocess.cache` is off)."""
    if not getattr(cfg, "cache", True):
        return None
    cache = ResultCache(paths.cache / STAGE, result_params(cfg), cache_version())
    try:
        cache.open()
        cache.prune_others(CACHE_KEEP_OTHER)
    except OSError as exc:  # a read-only or full disk costs speed, never the run
        log.warning("preprocess: cache %s unusable (%s); processing every image", cache.dir, exc)
        return None
    return cache


# --------------------------------------------------------------------------- one image, as a worker runs it
def _same_file(path: str, data: bytes) -> bool:
    """The file at `path` already holds exactly `data` (a rerun outside DVC: nothing to rewrite)."""
    try:
        if os.path.getsize(path) != len(data):
            return False
        with open(path, "rb") as fh:
            return fh.read() == data
    except OSError:
        return False


def _emit(cache: ResultCache | None, sha: str, png: bytes, dst: str) -> None:
    """Put the PNG at dst: a hard link to its cache entry when there is one (no second copy of the bytes),
    else an atomic write; nothing when dst already holds these bytes (a rerun over its own outputs)."""
    if cache is not None and cache.link(sha, dst):
        return
    if not _same_file(dst, png):
        write_file_atomic(dst, png)


def _process_one(ctx: tuple[Preprocess, ResultCache | None],
                 job: tuple[str, str]) -> tuple[int, str | None, str, str, str | None]:
    """(bytes written, None, cache status, input sha, PNG digest to commit) or (0, 'ErrorType: message',
    'failed', '', None); never raises. Status: 'miss' (computed and cached), 'off' (no cache).
    Failures are not cached: they are rare, and some (an unreadable file) are not a property of the bytes."""
    cfg, cache = ctx
    src, dst = job
    try:
        data = Path(src).read_bytes()
        png = encode_png(process_image(data, cfg), cfg.png_compression)
        if cache is None:
            _emit(None, "", png, dst)
            return len(png), None, "off", "", None
        sha = hashlib.sha256(data).hexdigest()
        digest = cache.put(sha, png)
        _emit(cache if digest else None, sha, png, dst)
        return len(png), None, "miss", sha, digest
    except Exception as exc:  # noqa: BLE001 - quarantined per image, reported in failed.csv
        return 0, f"{type(exc).__name__}: {exc}", "failed", "", None


def _reuse_one(cache: ResultCache, job: tuple[str, str]) -> tuple[int, str | None, str, str, str | None] | None:
    """A cache hit put at its output, or None (a miss or an unreadable input: the pool handles those);
    a corrupt entry (deleted here) is reported so the pool's recomputation is counted as such."""
    src, dst = job
    try:
        with open(src, "rb") as fh:
            sha = hashlib.sha256(fh.read()).hexdigest()
        status, png = cache.get(sha)
        if png is None:
            return None if status == "miss" else (0, None, status, sha, None)
        _emit(cache, sha, png, dst)
        return len(png), None, "hit", sha, None
    except OSError:
        return None


def reuse_cached(cache: ResultCache, jobs: list[tuple[str, str]], workers: int) -> list[tuple | None]:
    """The hit pass, in this process: a hit is ~0.1 ms of reading, hashing and linking, less than shipping it
    to a worker, so only misses go to the process pool. Threads over chunks (I/O and sha256 drop the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    spans = [jobs[k:k + 512] for k in range(0, len(jobs), 512)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return [r for part in pool.map(lambda js: [_reuse_one(cache, j) for j in js], spans) for r in part]


def _cfg_setup(cfg: Preprocess, cache: ResultCache | None = None) -> tuple[Preprocess, ResultCache | None]:
    return cfg, cache


def _samples(rows: pd.DataFrame, paths: Paths, cfg: Preprocess) -> np.ndarray | None:
    """Before (only resized) / after (the written output) pairs for up to SAMPLE_COLUMNS images."""
    if rows.empty:
        return None
    picks = np.linspace(0, len(rows) - 1, min(SAMPLE_COLUMNS, len(rows))).round().astype(int)
    columns = []
    for _, r in rows.iloc[np.unique(picks)].iterrows():
        try:
            raw = decode(paths.abs(r["path"]).read_bytes(), max_pixels=cfg.max_pixels)
            before = resize(raw, cfg.size, cfg.aspect, cfg.pad_mode, cfg.pad_value)
            after = decode(paths.abs(r["processed_path"]).read_bytes(), max_pixels=cfg.max_pixels)
        except (OSError, ValueError):
            continue  # a sample is only illustration; the image itself was already reported
        columns.append([before, after])
    return sample_grid(columns, cfg.size, labels=["input", "output"]) if columns else None


# --------------------------------------------------------------------------- the stage
def run(params: Params, paths: Paths) -> dict:
    """Process every image of data/split/index.parquet into data/preprocess (PNGs + index + failed.csv)."""
    cfg = params.preprocess
    t0 = time.perf_counter()
    df = read_index(paths, INPUT_STAGE)
    where = paths.index(INPUT_STAGE)
    missing = [c for c in ("path", *KEY) if c not in df.columns]
    if missing:
        raise InputError(f"{where}: column(s) {missing} missing (has {list(df.columns)}); "
                         "rerun `lesionflow stage split`")
    rel_out = output_paths(df, str(where))
    root = str(paths.root)
    # Plain strings, not Path objects: this list is built serially for every image (os.path.join keeps
    # absolute input paths as they are).
    jobs = [(os.path.join(root, p), os.path.join(root, o)) for p, o in zip(df["path"], rel_out, strict=True)]
    out_dir = paths.stage(STAGE)
    rerun = (out_dir / "images").exists()  # under `dvc repro` the out is removed first: nothing to prune

    cache = open_cache(cfg, paths)
    reused: list[tuple | None] = reuse_cached(cache, jobs, cfg.workers) if cache is not None else [None] * len(jobs)
    todo = [k for k, r in enumerate(reused) if r is None or r[2] == "corrupt"]
    # A pool costs ~0.3 s to start and stop: a nightly's few misses (the rest were hits) are cheaper here.
    workers = 1 if len(todo) < min(POOL_MIN_IMAGES, len(jobs)) else cfg.workers
    computed = parallel_map(_process_one, [jobs[k] for k in todo], workers, setup=_cfg_setup,
                            setup_args=(cfg, cache), desc=STAGE)
    results: list[tuple] = list(reused)
    for k, r in zip(todo, computed, strict=True):
        # a corrupt entry was deleted in the hit pass (the worker saw a miss): report it as corrupt
        was_corrupt = reused[k] is not None and r[2] == "miss"
        results[k] = (*r[:2], "corrupt", *r[3:]) if was_corrupt else r
    if cache is not None:
        try:
            cache.commit((r[3], r[4]) for r in results if r[4])
        except OSError as exc:  # the entries stay unindexed: misses next time, never wrong bytes
            log.warning("preprocess: could not update the cache index in %s (%s)", cache.dir, exc)

    errors = [r[1] for r in results]
    statuses = [r[2] for r in results]
    ok = np.array([e is None for e in errors], dtype=bool)
    failed = df.loc[~ok, [*KEY, "path"]].assign(error=[e for e in errors if e is not None])
    write_table(failed, out_dir / "failed.csv")
    n_failed = int((~ok).sum())
    if len(df) and n_failed / len(df) > cfg.max_failed_fraction:
        raise RunError(
            f"preprocess: {n_failed}/{len(df)} images failed (> max_failed_fraction={cfg.max_failed_fraction}); "
            f"see {out_dir / 'failed.csv'} (first: {failed['error'].iloc[0]!r}); are the paths in "
            f"{where} relative to --root {paths.root}?"
        )
    kept = df.loc[ok].assign(processed_path=[o for o, good in zip(rel_out, ok, strict=True) if good])
    good_dst = {j[1] for j, good in zip(jobs, ok, strict=True) if good}
    pruned = prune_outputs(out_dir / "images", good_dst) if rerun else 0
    write_index(kept, paths, STAGE)

    report_dir = paths.reports / STAGE
    grid = _samples(kept, paths, cfg)
    if grid is not None:
        write_bytes(report_dir / "samples.png", encode_png(grid))
    by_split = kept["split"].value_counts().sort_index().to_dict() if "split" in kept else {}
    metrics = {
        "images_in": int(len(df)),
        "processed": int(ok.sum()),
        "failed": n_failed,
        "by_split": {str(k): int(v) for k, v in by_split.items()},
        "bytes_written": int(sum(r[0] for r in results)),
    }
    write_json(report_dir / "metrics.json", metrics)
    seconds = time.perf_counter() - t0
    images_per_s = round(len(df) / seconds, 1) if seconds > 0 else None
    write_run_stats(paths, STAGE, {
        "seconds": round(seconds, 3),
        "images_per_s": images_per_s,
        "workers": min(cfg.workers, max(1, len(df))),
        "stale_files_removed": pruned,
        "cache": {"enabled": cache is not None, "hits": statuses.count("hit"),
                  "misses": statuses.count("miss"), "corrupt": statuses.count("corrupt"),
                  "dir": paths.rel(cache.dir) if cache is not None else None},
        "params": {"preprocess": cfg.model_dump(mode="json")},
    })
    log.info("preprocess: %d/%d images processed (%d failed, %d from the cache) in %.1f s", metrics["processed"],
             len(df), n_failed, statuses.count("hit"), seconds)
    return {**{k: metrics[k] for k in ("images_in", "processed", "failed")}, "seconds": round(seconds, 3),
            "images_per_s": images_per_s}
