"""Throughput of the preprocess stage's run() vs a bare OpenCV loop doing the same work; prints a JSON table.

    .venv/bin/python benchmarks/preprocess.py [--data DIR_OF_JPEGS] [--n 500] [--repeats 3] [--full]

Both sides read the same JPEGs, do the same ops (fit -> [shades of grey] -> [hair removal] -> CLAHE on L ->
letterbox), encode the same PNGs and write them; the bare loop skips everything else the stage does (index
read/write, atomic writes, error capture, failed.csv, metrics, sample grid). Outputs are compared pixel for
pixel, so the two really do the same work. 1 worker runs pinned to one core; 2 workers to two cores.
`decode_checks` is the cost of tasks.core.images.decode's checks (header size cap, truncation, libjpeg
corruption warnings captured from stderr) over a plain cv2.imdecode, and whether the pixels are identical.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LESIONFLOW_PROGRESS", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from flows import stages  # noqa: E402
from tasks.core.config import parse_params  # noqa: E402
from tasks.core.images import decode  # noqa: E402
from tasks.core.io import Paths  # noqa: E402


def run(params, paths: Paths) -> dict:  # noqa: ANN001
    """The stage as `lesionflow stage preprocess` runs it."""
    return stages.get("preprocess").run(params, paths)


def decode_checks(files: list[Path], repeats: int) -> dict:
    """Per-image microseconds of decode() (with its checks) vs plain imdecode + BGR->RGB, one core."""
    blobs = [f.read_bytes() for f in files]

    def plain(b: bytes) -> np.ndarray:
        return cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)

    identical = all(np.array_equal(decode(b), plain(b)) for b in blobs)
    best: dict[str, float] = {}
    for name, fn in (("plain_us", plain), ("checked_us", decode)):
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for b in blobs:
                fn(b)
            ts.append(time.perf_counter() - t0)
        best[name] = round(1e6 * min(ts) / len(blobs), 1)
    return {**best, "overhead": round(best["checked_us"] / best["plain_us"] - 1, 3), "identical": identical}


def bare_loop(files: list[Path], out_dir: Path, size: int, clip: float, tile: int, hair: bool, cc: bool,
              compression: int) -> None:
    """The same per-image work as the stage, written as a plain OpenCV loop (no pool, no bookkeeping)."""
    clahe = cv2.createCLAHE(clipLimit=clip, tileGridSize=(tile, tile))
    k = max(3, round(size / 32))
    k += 1 - k % 2
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (k, k))
    grow = np.ones((3, 3), np.uint8)
    png = [cv2.IMWRITE_PNG_COMPRESSION, compression, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB,
           cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
    for f in files:
        img = cv2.cvtColor(cv2.imdecode(np.frombuffer(f.read_bytes(), np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        h, w = img.shape[:2]
        s = size / max(h, w)
        nh, nw = max(1, min(size, round(h * s))), max(1, min(size, round(w * s)))
        if (nh, nw) != (h, w):
            img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if nh * nw < h * w else cv2.INTER_CUBIC)
        if cc:
            x = img.astype(np.float32)
            e = np.power(np.mean(np.power(x / 255.0, 6.0), axis=(0, 1)), 1 / 6.0)
            e = e / max(float(np.linalg.norm(e)), 1e-12)
            gain = (1.0 / (np.maximum(e, 1e-6) * np.sqrt(3.0))).astype(np.float32)
            img = np.clip(x * gain + 0.5, 0, 255).astype(np.uint8)
        if hair:
            bh = cv2.morphologyEx(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.MORPH_BLACKHAT, cross)
            mask = cv2.dilate(cv2.threshold(bh, 10, 255, cv2.THRESH_BINARY)[1], grow)
            if mask.any():
                img = cv2.inpaint(img, mask, 3, cv2.INPAINT_TELEA)
        lab = cv2.cvtColor(img, cv2.COLOR_RGB2LAB)
        lab[:, :, 0] = clahe.apply(np.ascontiguousarray(lab[:, :, 0]))
        img = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
        top, left = (size - nh) // 2, (size - nw) // 2
        img = cv2.copyMakeBorder(img, top, size - nh - top, left, size - nw - left, cv2.BORDER_CONSTANT,
                                 value=(0, 0, 0))
        ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), png)
        (out_dir / (f.stem + ".png")).write_bytes(buf.tobytes())


def _project(base: Path, files: list[Path]) -> Paths:
    paths = Paths(base)
    paths.stage("split").mkdir(parents=True)
    pd.DataFrame({"source": "isic-real", "isic_id": [f.stem for f in files], "path": [str(f) for f in files],
                  "split": "train", "target": 0}).to_parquet(paths.index("split"), index=False)
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "isic-real"),
                    help="a folder of *.jpg (default: the isic-real sample next to the checkout)")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--full", action="store_true", help="also hair removal + colour constancy (default: CLAHE only)")
    args = ap.parse_args()

    load_before = [round(x, 2) for x in os.getloadavg()]
    files = sorted(Path(args.data).glob("*.jpg"))[: args.n]
    if not files:
        raise SystemExit(f"no *.jpg under {args.data}")
    for f in files:  # warm the page cache so neither side pays the first read
        f.read_bytes()
    pre = {"size": args.size, "hair_removal": args.full, "color_constancy": args.full}
    cores = sorted(os.sched_getaffinity(0))
    rows: dict[str, dict] = {}
    tmp = Path(tempfile.mkdtemp(prefix="lf-bench-pre-"))
    try:
        bare_dir = tmp / "bare"
        times: dict[str, list[float]] = {"bare_1": [], "stage_1": [], "stage_2": []}
        cores_used: dict[str, list[float]] = {"stage_1": [], "stage_2": []}
        for rep in range(args.repeats):
            os.sched_setaffinity(0, {cores[0]})
            cv2.setNumThreads(1)
            shutil.rmtree(bare_dir, ignore_errors=True)
            bare_dir.mkdir()
            t0 = time.perf_counter()
            bare_loop(files, bare_dir, args.size, 2.0, 8, args.full, args.full, 1)
            times["bare_1"].append(time.perf_counter() - t0)
            for workers in (1, 2):
                os.sched_setaffinity(0, set(cores[:workers]))
                paths = _project(tmp / f"stage{workers}_{rep}", files)
                params = parse_params({"ingest": {"sources": [{"kind": "synthetic"}]},
                                       "preprocess": {**pre, "workers": workers}})
                c0, t0 = os.times(), time.perf_counter()
                summary = run(params, paths)
                wall, c1 = time.perf_counter() - t0, os.times()
                times[f"stage_{workers}"].append(wall)
                # CPU seconds of this process + its pool workers over wall time = cores the run really got;
                # well under `workers` means other jobs on the shared machine took the rest.
                cpu = (c1.user + c1.system + c1.children_user + c1.children_system
                       - c0.user - c0.system - c0.children_user - c0.children_system)
                cores_used[f"stage_{workers}"].append(cpu / wall)
                assert summary["processed"] == len(files), summary
        os.sched_setaffinity(0, set(cores))
        # Same work: every stage output equals the bare loop's output pixel for pixel.
        idx = pd.read_parquet(Paths(tmp / "stage2_0").index("preprocess"))
        identical = all(
            np.array_equal(cv2.imread(str(bare_dir / f"{i}.png")), cv2.imread(str(tmp / "stage2_0" / p)))
            for i, p in zip(idx["isic_id"], idx["processed_path"], strict=True)
        )
        for name, ts in times.items():
            rows[name] = {"best_s": round(min(ts), 3), "median_s": round(statistics.median(ts), 3),
                          "images_per_s_best": round(len(files) / min(ts), 1),
                          "images_per_s_median": round(len(files) / statistics.median(ts), 1)}
            if name in cores_used:
                best_run = ts.index(min(ts))
                rows[name]["cores_used_best_run"] = round(cores_used[name][best_run], 2)
                rows[name]["cores_used_median"] = round(statistics.median(cores_used[name]), 2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    os.sched_setaffinity(0, {cores[0]})
    checks = decode_checks(files, args.repeats)
    os.sched_setaffinity(0, set(cores))
    best = {k: v["images_per_s_best"] for k, v in rows.items()}
    med = {k: v["images_per_s_median"] for k, v in rows.items()}
    report = {
        "images": len(files),
        "source": str(args.data),
        "input_shapes": sorted({f"{w}x{h}" for h, w in (cv2.imread(str(f)).shape[:2] for f in files[:50])})[:5],
        "ops": ["fit", *(["shades_of_grey", "hair_removal"] if args.full else []), "clahe_lab", "letterbox", "png"],
        "size": args.size,
        "repeats": args.repeats,
        "identical_outputs": identical,
        "decode_checks": checks,
        "runs": rows,
        "stage1_vs_bare": {"best": round(best["stage_1"] / best["bare_1"], 2),
                           "median": round(med["stage_1"] / med["bare_1"], 2)},
        "speedup_2_workers": {"best": round(best["stage_2"] / best["stage_1"], 2),
                              "median": round(med["stage_2"] / med["stage_1"], 2)},
        "conditions": {"cpu_count": os.cpu_count(), "cores_allowed": len(cores),
                       "loadavg_before": load_before, "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                       "opencv": cv2.__version__, "python": sys.version.split()[0]},
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
