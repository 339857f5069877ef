"""preprocess stage: resize (letterbox or centre crop), optional colour constancy and hair removal, CLAHE on L of LAB.

Pure array functions first (`resize`, `clahe_lab`, `remove_hair`, `shades_of_grey`, `process_image`), then a
small process-pool runner shared with the augment stage (`parallel_map`), then the thin `run()` doing I/O.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import re
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import cv2
import numpy as np
import pandas as pd

from tasks.config import Params, Preprocess
from tasks.io import KEY, Paths, progress, read_index, write_bytes, write_index, write_json, write_table

STAGE = "preprocess"
SAMPLE_COLUMNS = 8  # images in the before/after grid

# --------------------------------------------------------------------------- pure functions on arrays


def _interp(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> int:
    # INTER_AREA is the alias-free choice when shrinking; it is blocky when enlarging, where cubic is better.
    shrinking = dst_hw[0] * dst_hw[1] < src_hw[0] * src_hw[1]
    return cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC


def fit(img: np.ndarray, size: int, aspect: Literal["pad", "crop"] = "pad") -> np.ndarray:
    """The image content at output scale: long side = size (pad), or the centre square at size x size (crop)."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    h, w = img.shape[:2]
    if h < 1 or w < 1:
        raise ValueError(f"empty image of shape {img.shape}")
    if aspect == "crop":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        img = img[top : top + side, left : left + side]
        out_hw = (size, size)
    elif aspect == "pad":
        scale = size / max(h, w)
        out_hw = (max(1, min(size, round(h * scale))), max(1, min(size, round(w * scale))))
    else:
        raise ValueError(f"aspect must be 'pad' or 'crop', got {aspect!r}")
    if img.shape[:2] == out_hw:
        return np.ascontiguousarray(img)
    return cv2.resize(img, (out_hw[1], out_hw[0]), interpolation=_interp(img.shape[:2], out_hw))


def letterbox(img: np.ndarray, size: int, pad_mode: Literal["constant", "edge"] = "constant",
              pad_value: int = 0) -> np.ndarray:
    """Centre `img` (each side <= size) on a size x size canvas filled with a constant or the replicated edge."""
    h, w = img.shape[:2]
    if h > size or w > size:
        raise ValueError(f"image {w}x{h} does not fit a {size}x{size} canvas; call fit() first")
    top, left = (size - h) // 2, (size - w) // 2
    bottom, right = size - h - top, size - w - left
    if not (top or bottom or left or right):
        return img
    if pad_mode == "edge":
        return cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_REPLICATE)
    if pad_mode == "constant":
        value = (pad_value,) * (img.shape[2] if img.ndim == 3 else 1)
        return cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=value)
    raise ValueError(f"pad_mode must be 'constant' or 'edge', got {pad_mode!r}")


def resize(img: np.ndarray, size: int, aspect: Literal["pad", "crop"] = "pad",
           pad_mode: Literal["constant", "edge"] = "constant", pad_value: int = 0) -> np.ndarray:
    """Square size x size image: letterboxed (aspect='pad', nothing cut off) or centre-cropped (aspect='crop')."""
    return letterbox(fit(img, size, aspect), size, pad_mode, pad_value)


@lru_cache(maxsize=8)
def _clahe(clip_limit: float, tile_grid: int) -> Any:
    return cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(int(tile_grid), int(tile_grid)))


def clahe_lab(img: np.ndarray, clip_limit: float = 2.0, tile_grid: int = 8) -> np.ndarray:
    """CLAHE on the L channel of LAB only, so contrast rises without shifting hue (uint8 RGB in and out)."""
    if clip_limit <= 0 or tile_grid < 1:
        raise ValueError(f"clip_limit must be > 0 and tile_grid >= 1 (got {clip_limit}, {tile_grid})")
    lab = cv2.cvtColor(img, cv2.COLOR_RGB2LAB)
    l_chan, a_chan, b_chan = cv2.split(lab)
    l_chan = _clahe(float(clip_limit), int(tile_grid)).apply(l_chan)
    return cv2.cvtColor(cv2.merge((l_chan, a_chan, b_chan)), cv2.COLOR_LAB2RGB)


def hair_kernel_for(shape: Sequence[int]) -> int:
    """Auto black-hat kernel: ~1/32 of the long side, odd, >= 3 (hairs are a few px wide at 1024 px)."""
    k = max(3, round(max(shape[:2]) / 32))
    return k if k % 2 else k + 1


def hair_mask(img: np.ndarray, kernel: int = 0, threshold: int = 10) -> np.ndarray:
    """uint8 0/255 mask of thin dark structures (hairs): black-hat of the grey image above a threshold."""
    k = kernel or hair_kernel_for(img.shape)
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    # A cross element closes thin lines of any orientation at lower cost than a full square (DullRazor-style).
    blackhat = cv2.morphologyEx(grey, cv2.MORPH_BLACKHAT, cv2.getStructuringElement(cv2.MORPH_CROSS, (k, k)))
    _, mask = cv2.threshold(blackhat, threshold, 255, cv2.THRESH_BINARY)
    # Grow by one px: hair edges are anti-aliased and would otherwise leave a dark halo after inpainting.
    return cv2.dilate(mask, np.ones((3, 3), np.uint8))


def remove_hair(img: np.ndarray, kernel: int = 0, threshold: int = 10, radius: int = 3) -> np.ndarray:
    """Detect hairs (black-hat + threshold) and fill them from their surroundings (cv2.inpaint, Telea)."""
    mask = hair_mask(img, kernel, threshold)
    if not mask.any():
        return img
    return cv2.inpaint(img, mask, radius, cv2.INPAINT_TELEA)


def shades_of_grey(img: np.ndarray, p: float = 6.0) -> np.ndarray:
    """Shades-of-grey colour constancy (Finlayson & Trezzi 2004): equalise the channels' Minkowski p-norms."""
    if p < 1:
        raise ValueError(f"p must be >= 1, got {p}")
    x = img.astype(np.float32)
    # Normalise to [0, 1] before the power so p=6 cannot overflow float32 precision on bright pixels.
    illum = np.power(np.mean(np.power(x / 255.0, p), axis=(0, 1)), 1.0 / p)
    illum = illum / max(float(np.linalg.norm(illum)), 1e-12)
    gain = 1.0 / (np.maximum(illum, 1e-6) * np.sqrt(3.0))  # a neutral illuminant (1,1,1)/sqrt(3) gives gain 1
    return np.clip(x * gain.astype(np.float32) + 0.5, 0, 255).astype(np.uint8)


def as_rgb(img: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 RGB from grey, RGB or RGBA uint8 arrays (clear error otherwise)."""
    if img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {img.dtype}")
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.ndim == 3 and img.shape[2] == 3:
        return img
    if img.ndim == 3 and img.shape[2] == 4:
        return np.ascontiguousarray(img[:, :, :3])
    if img.ndim == 3 and img.shape[2] == 1:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    raise ValueError(f"expected HxW, HxWx3 or HxWx4, got shape {img.shape}")


def decode(data: bytes) -> np.ndarray:
    """Encoded image bytes (JPEG, PNG, ...) -> uint8 RGB; ValueError if OpenCV cannot decode them."""
    buf = np.frombuffer(data, dtype=np.uint8)
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if bgr is None:
        raise ValueError(f"cannot decode image ({len(data)} bytes; not an image OpenCV reads, or corrupt)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def png_params(compression: int = 1) -> list[int]:
    """imencode flags: SUB filter always; RLE strategy at level <= 1 (OpenCV's own fast default: ~1.6x faster
    than zlib's default strategy at level 1, files ~5% bigger); zlib's default strategy above, so a higher
    level really buys smaller files."""
    flags = [cv2.IMWRITE_PNG_COMPRESSION, int(compression), cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB]
    if compression <= 1:
        flags += [cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
    return flags


def encode_png(img: np.ndarray, compression: int = 1) -> bytes:
    """uint8 RGB -> PNG bytes (lossless; same pixels + same level give the same bytes)."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), png_params(compression))
    if not ok:
        raise ValueError(f"PNG encoding failed for an image of shape {img.shape}")
    return buf.tobytes()


def write_file_atomic(path: str, data: bytes) -> None:
    """Write via `<path>.<pid>.partial` + rename, into an existing folder (per-image hot path).

    tasks.io.write_bytes does the same plus mkdir + mkstemp on every call, which cost ~20% of the whole
    per-image time at 128 px; here one image has one writer, and a folder is made only when missing.
    """
    tmp = f"{path}.{os.getpid()}.partial"
    try:
        try:
            fh = open(tmp, "wb")
        except FileNotFoundError:  # first file of its shard: create the folder here, in parallel workers
            os.makedirs(os.path.dirname(tmp), exist_ok=True)
            fh = open(tmp, "wb")
        with fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def process_image(image: bytes | np.ndarray, cfg: Preprocess) -> np.ndarray:
    """Encoded bytes or an RGB array -> the processed size x size uint8 RGB image.

    Order: fit to size -> colour constancy -> hair removal -> CLAHE -> letterbox. Everything runs at output
    scale so cost per image is bounded whatever the input resolution; the pad comes last so the border never
    enters the colour estimate, the hair detector or the CLAHE histograms.
    """
    img = decode(image) if isinstance(image, (bytes, bytearray, memoryview)) else as_rgb(np.asarray(image))
    img = fit(img, cfg.size, cfg.aspect)
    if cfg.color_constancy:
        img = shades_of_grey(img, cfg.cc_power)
    if cfg.hair_removal:
        img = remove_hair(img, cfg.hair_kernel or hair_kernel_for((cfg.size, cfg.size)), cfg.hair_threshold)
    if cfg.clahe:
        img = clahe_lab(img, cfg.clip_limit, cfg.tile_grid)
    return letterbox(img, cfg.size, cfg.pad_mode, cfg.pad_value)


# --------------------------------------------------------------------------- output layout

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


def safe_name(text: str) -> str:
    """A file-system-safe path component (ids and source names come from metadata and params)."""
    name = _UNSAFE.sub("_", str(text)).lstrip(".")
    return name or "_"


def shard_of(isic_id: str) -> str:
    """Two hex chars of sha1(id): 256 sub-folders, ~400 files each at 100k images (fast listings)."""
    return hashlib.sha1(str(isic_id).encode()).hexdigest()[:2]


def image_relpath(stage: str, source: str, isic_id: str) -> str:
    """data/<stage>/images/<source>/<shard>/<isic_id>.png (relative to the project root)."""
    return f"data/{stage}/images/{safe_name(source)}/{shard_of(isic_id)}/{safe_name(isic_id)}.png"


# --------------------------------------------------------------------------- process pool (shared with augment)

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


# --------------------------------------------------------------------------- one image, as a worker runs it


def _process_one(cfg: Preprocess, job: tuple[str, str]) -> tuple[int, str | None]:
    """(bytes written, None) or (0, 'ErrorType: message'); never raises."""
    src, dst = job
    try:
        png = encode_png(process_image(Path(src).read_bytes(), cfg), cfg.png_compression)
        write_file_atomic(dst, png)
        return len(png), None
    except Exception as exc:  # noqa: BLE001 - quarantined per image, reported in failed.csv
        return 0, f"{type(exc).__name__}: {exc}"


def _cfg_setup(cfg: Preprocess) -> Preprocess:
    return cfg


# --------------------------------------------------------------------------- reports


def sample_grid(columns: Sequence[Sequence[np.ndarray]], size: int, labels: Sequence[str] = ()) -> np.ndarray:
    """Tile rows of equal-size RGB tiles into one image (rows = columns[i][row]); labels on the first column."""
    rows = max(len(c) for c in columns)
    gap = 2
    grid = np.full((rows * (size + gap) + gap, len(columns) * (size + gap) + gap, 3), 255, np.uint8)
    for ci, col in enumerate(columns):
        for ri, tile in enumerate(col):
            y, x = gap + ri * (size + gap), gap + ci * (size + gap)
            grid[y : y + size, x : x + size] = cv2.resize(tile, (size, size), interpolation=cv2.INTER_AREA)
    for ri, text in enumerate(labels):
        y = gap + ri * (size + gap) + 14
        cv2.putText(grid, text, (gap + 3, y), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(grid, text, (gap + 3, y), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return grid


def _samples(rows: pd.DataFrame, paths: Paths, cfg: Preprocess) -> np.ndarray | None:
    """Before (only resized) / after (the written output) pairs for up to SAMPLE_COLUMNS images."""
    if rows.empty:
        return None
    picks = np.linspace(0, len(rows) - 1, min(SAMPLE_COLUMNS, len(rows))).round().astype(int)
    columns = []
    for _, r in rows.iloc[np.unique(picks)].iterrows():
        try:
            before = resize(decode(paths.abs(r["path"]).read_bytes()), cfg.size, cfg.aspect, cfg.pad_mode,
                            cfg.pad_value)
            after = decode(paths.abs(r["processed_path"]).read_bytes())
        except (OSError, ValueError):
            continue  # a sample is only illustration; the image itself was already reported
        columns.append([before, after])
    return sample_grid(columns, cfg.size, labels=["input", "output"]) if columns else None


# --------------------------------------------------------------------------- the stage


def prune_outputs(images_dir: Path, keep: set[str]) -> int:
    """Delete files under images_dir that are not in `keep` (left by earlier runs), so the folder matches
    the index. Paths are compared normalised, so 'root/./x' and 'root/x' are the same file."""
    removed = 0
    if not images_dir.exists():
        return 0
    keep = {os.path.normpath(k) for k in keep}
    for folder, _, names in os.walk(images_dir):
        for name in names:
            f = os.path.normpath(os.path.join(folder, name))
            if f not in keep:
                os.unlink(f)
                removed += 1
    return removed


def run(params: Params, paths: Paths) -> dict:
    """Process every image of data/split/index.parquet into data/preprocess (PNGs + index + failed.csv)."""
    cfg = params.preprocess
    t0 = time.perf_counter()
    df = read_index(paths, "split")
    for col in ("path", *KEY):
        if col not in df.columns:
            raise ValueError(f"{paths.index('split')}: column {col!r} missing; rerun `lesionflow stage split`")

    rel_out = [image_relpath(STAGE, s, i) for s, i in zip(df["source"], df["isic_id"])]
    clash = pd.Series(rel_out).duplicated(keep=False)
    if clash.any():
        bad = df.loc[clash.to_numpy(), KEY].head(5).to_dict("records")
        raise ValueError(f"{paths.index('split')}: ids that map to the same file name after sanitising: {bad}")
    root = str(paths.root)
    # Plain strings, not Path objects: this list is built serially for every image (os.path.join keeps
    # absolute input paths as they are).
    jobs = [(os.path.join(root, p), os.path.join(root, o)) for p, o in zip(df["path"], rel_out)]
    out_dir = paths.stage(STAGE)
    rerun = (out_dir / "images").exists()  # under `dvc repro` the out is removed first: nothing to prune

    results = parallel_map(_process_one, jobs, cfg.workers, setup=_cfg_setup, setup_args=(cfg,), desc=STAGE)

    errors = [err for _, err in results]
    ok = np.array([e is None for e in errors], dtype=bool)
    failed = df.loc[~ok, [*KEY, "path"]].assign(error=[e for e in errors if e is not None])
    write_table(failed, out_dir / "failed.csv")
    n_failed = int((~ok).sum())
    if len(df) and n_failed / len(df) > cfg.max_failed_fraction:
        raise RuntimeError(
            f"preprocess: {n_failed}/{len(df)} images failed (> max_failed_fraction={cfg.max_failed_fraction}); "
            f"see {out_dir / 'failed.csv'} (first: {failed['error'].iloc[0]!r}); are the paths in "
            f"{paths.index('split')} relative to --root {paths.root}?"
        )
    kept = df.loc[ok].assign(processed_path=[o for o, good in zip(rel_out, ok) if good])
    pruned = prune_outputs(out_dir / "images", {j[1] for j, good in zip(jobs, ok) if good}) if rerun else 0
    write_index(kept, paths, STAGE)

    report_dir = paths.reports / STAGE
    grid = _samples(kept, paths, cfg)
    if grid is not None:
        write_bytes(report_dir / "samples.png", encode_png(grid))
    seconds = time.perf_counter() - t0
    by_split = kept["split"].value_counts().sort_index().to_dict() if "split" in kept else {}
    metrics = {
        "images_in": int(len(df)),
        "processed": int(ok.sum()),
        "failed": n_failed,
        "by_split": {str(k): int(v) for k, v in by_split.items()},
        "bytes_written": int(sum(b for b, _ in results)),
        "stale_files_removed": pruned,
        "seconds": round(seconds, 3),
        "images_per_s": round(len(df) / seconds, 1) if seconds > 0 else None,
        "workers": min(cfg.workers, max(1, len(df))),
        "config": cfg.model_dump(mode="json"),
    }
    write_json(report_dir / "metrics.json", metrics)
    return {k: metrics[k] for k in ("images_in", "processed", "failed", "seconds", "images_per_s")}
