"""augment stage: K offline augmented copies of every TRAIN image (never val/test), with the pipeline that train
also uses online (`tasks.core.augmentation`).

`run()` writes `offline_copies` copies per train image and an index that passes every input row through plus
one row per copy (source "<source>+aug<k>", same isic_id, `augmented_from` = the original source,
`aug_copy` = k). Pure functions first, the I/O in `run()` last.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.core.augmentation import augment_copy, build_augmenter, copy_seed
from tasks.core.config import Augment, Params
from tasks.core.errors import InputError
from tasks.core.images import decode, encode_png, sample_grid
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

STAGE = "augment"
INPUT_STAGE = "preprocess"
SAMPLE_AUGMENTATIONS = 8


# --------------------------------------------------------------------------- pure
def aug_source(source: str, k: int) -> str:
    """The source name of the k-th offline copy; (aug_source, isic_id) is its unique key."""
    return f"{source}+aug{k}"


def copy_rows(train: pd.DataFrame, n_k: int, seed: int) -> tuple[pd.DataFrame, list[int]]:
    """One row per offline copy (k = 0..n_k-1 of every train row, in order) and the seed of each copy.

    Copy rows repeat their train row (dtypes kept), then get their own key, image path and provenance."""
    copies = train.loc[train.index.repeat(n_k)].reset_index(drop=True)
    ks = np.tile(np.arange(n_k), len(train))
    copies["augmented_from"] = copies["source"].astype("string")
    copies["aug_copy"] = pd.array(ks, dtype="Int64")
    copies["source"] = [aug_source(s, int(k)) for s, k in zip(copies["augmented_from"], ks, strict=True)]
    keys = list(zip(copies["augmented_from"], copies["isic_id"], ks, strict=True))
    copies["processed_path"] = [image_relpath(STAGE, aug_source(s, int(k)), i) for s, i, k in keys]
    return copies, [copy_seed(seed, s, i, int(k)) for s, i, k in keys]


def with_copies(df: pd.DataFrame, copies: pd.DataFrame) -> pd.DataFrame:
    """The output index: every input row (augmented_from/aug_copy missing) followed by the written copies."""
    originals = df.assign(augmented_from=pd.Series(pd.NA, index=df.index, dtype="string"),
                          aug_copy=pd.Series(pd.NA, index=df.index, dtype="Int64"))
    return pd.concat([originals, copies], ignore_index=True) if len(copies) else originals


def augment_grid(image: np.ndarray, aug: Any, seed: int, size: int) -> np.ndarray:
    """3x3 grid: the input top-left, then SAMPLE_AUGMENTATIONS seeded augmentations of it."""
    tiles = [image] + [augment_copy(aug, image, seed + i) for i in range(SAMPLE_AUGMENTATIONS)]
    return sample_grid([tiles[c::3] for c in range(3)], size, labels=["input"])


# --------------------------------------------------------------------------- one image, as a worker runs it
def _setup(cfg: Augment, size: int) -> Any:
    return build_augmenter(cfg, size)


def _copies_one(aug: Any, job: tuple[str, list[tuple[int, int, str]], int, int]) -> list[tuple[int, str | None]]:
    """Write every copy of one image; [(bytes, error or None)] per copy, never raises."""
    src, copies, compression, max_pixels = job
    try:
        image = decode(Path(src).read_bytes(), max_pixels=max_pixels)
    except Exception as exc:  # noqa: BLE001 - reported in failed.csv
        return [(0, f"{type(exc).__name__}: {exc}")] * len(copies)
    out = []
    for _k, seed, dst in copies:
        try:
            png = encode_png(augment_copy(aug, image, seed), compression)
            write_file_atomic(dst, png)
            out.append((len(png), None))
        except Exception as exc:  # noqa: BLE001
            out.append((0, f"{type(exc).__name__}: {exc}"))
    return out


def _samples(df: pd.DataFrame, paths: Paths, cfg: Augment, size: int, max_pixels: int) -> np.ndarray | None:
    """The grid for the first readable train image (else any)."""
    ordered = df.sort_values("split", key=lambda s: s != "train", kind="stable")
    aug = build_augmenter(cfg, size)
    for rel in ordered["processed_path"].head(20):
        try:
            image = decode(paths.abs(rel).read_bytes(), max_pixels=max_pixels)
        except (OSError, ValueError):
            continue
        return augment_grid(image, aug, cfg.seed, size)
    return None


# --------------------------------------------------------------------------- the stage
def run(params: Params, paths: Paths) -> dict:
    """Index pass-through + K augmented copies of each train image; always a sample grid and metrics."""
    cfg, pre = params.augment, params.preprocess
    size, max_pixels = pre.size, pre.max_pixels
    t0 = time.perf_counter()
    df = read_index(paths, INPUT_STAGE)
    missing = [c for c in (*KEY, "processed_path", "split") if c not in df.columns]
    if missing:
        raise InputError(f"{paths.index(INPUT_STAGE)}: column(s) {missing} missing (has {list(df.columns)}); "
                         "rerun `lesionflow stage split` and `lesionflow stage preprocess`")

    out_dir = paths.stage(STAGE)
    train = df[df["split"] == "train"]
    n_k = cfg.offline_copies
    copies_df, seeds = copy_rows(train, n_k, cfg.seed)
    dsts = [str(paths.abs(p)) for p in copies_df["processed_path"]]
    for folder in {os.path.dirname(d) for d in dsts}:
        os.makedirs(folder, exist_ok=True)
    jobs = [
        (str(paths.abs(src)), [(k, seeds[j * n_k + k], dsts[j * n_k + k]) for k in range(n_k)],
         pre.png_compression, max_pixels)
        for j, src in enumerate(train["processed_path"])
    ] if n_k else []

    results = parallel_map(_copies_one, jobs, cfg.workers, setup=_setup, setup_args=(cfg, size), desc=STAGE)
    errors = [e for per_image in results for _, e in per_image]
    ok = np.array([e is None for e in errors], dtype=bool)
    failed = copies_df.loc[~ok, [*KEY, "augmented_from", "processed_path"]].assign(
        error=[e for e in errors if e is not None])
    write_table(failed, out_dir / "failed.csv")
    kept = copies_df.loc[ok]
    index = with_copies(df, kept)
    pruned = prune_outputs(out_dir / "images", {str(paths.abs(p)) for p in kept["processed_path"]})
    write_index(index, paths, STAGE)

    report_dir = paths.reports / STAGE
    grid = _samples(df, paths, cfg, size, max_pixels)
    if grid is not None:
        write_bytes(report_dir / "samples.png", encode_png(grid))
    metrics = {
        "rows_in": int(len(df)),
        "train_images": int(len(train)),
        "offline_copies": cfg.offline_copies,
        "copies_written": int(ok.sum()),
        "failed": int((~ok).sum()),
        "rows_out": int(len(index)),
    }
    write_json(report_dir / "metrics.json", metrics)
    seconds = time.perf_counter() - t0
    write_run_stats(paths, STAGE, {
        "seconds": round(seconds, 3),
        "copies_per_s": round(len(errors) / seconds, 1) if seconds > 0 else None,
        "workers": min(cfg.workers, max(1, len(jobs))),
        "stale_files_removed": pruned,
        "params": {"augment": cfg.model_dump(mode="json")},
    })
    log.info("augment: %d copies of %d train images (%d failed) in %.1f s", metrics["copies_written"],
             metrics["train_images"], metrics["failed"], seconds)
    return {**{k: metrics[k] for k in ("rows_in", "train_images", "copies_written", "failed", "rows_out")},
            "seconds": round(seconds, 3)}
