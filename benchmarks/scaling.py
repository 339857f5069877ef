"""Preprocess throughput on the local process pool and on a local Dask cluster of 1 and 2 worker processes.

    .venv/bin/python benchmarks/scaling.py [--images 400] [--size 128] [--side 512]

Prints one JSON object: per engine the wall time of parallel_map over the preprocess per-image function (the
stage's hot path: read, decode, resize, CLAHE, PNG encode, write) and images/s. The cluster start-up is not
timed (a team's cluster is already running); one warm-up pass per engine imports the code on the workers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

def make_images(folder: Path, n: int, side: int) -> list[tuple[str, str]]:
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    jobs = []
    for i in range(n):
        img = (rng.normal(150, 30, (side, int(side * 0.75), 3))).clip(0, 255).astype("uint8")
        cv2.circle(img, (side // 3, side // 3), side // 6, (60, 40, 30), -1)
        src = folder / "in" / f"{i:05d}.jpg"
        src.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(src), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        jobs.append((str(src), str(folder / "out" / f"{i // 100:03d}" / f"{i:05d}.png")))
    return jobs



def timed(jobs: list, cfg: object, workers: int, address: str | None) -> float:
    from tasks.core.parallel import parallel_map, use_dask
    from tasks.preprocess import _cfg_setup, _process_one

    with use_dask(address):
        parallel_map(_process_one, jobs[: max(8, len(jobs) // 20)], workers, _cfg_setup, (cfg,))  # warm-up
        t = time.perf_counter()
        out = parallel_map(_process_one, jobs, workers, _cfg_setup, (cfg,))
        seconds = time.perf_counter() - t
    failed = [r[1] for r in out if r[1]]
    if failed:
        raise SystemExit(f"{len(failed)} images failed: {failed[0]}")
    return seconds

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--size", type=int, default=128, help="preprocess.size (output side, px)")
    ap.add_argument("--side", type=int, default=512, help="input image height, px")
    args = ap.parse_args()

    from distributed import LocalCluster

    from tasks.core.config import Preprocess

    cfg = Preprocess(size=args.size)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    rows = []
    with tempfile.TemporaryDirectory(prefix="lf-scaling-") as tmp:
        jobs = make_images(Path(tmp), args.images, args.side)
        for workers in (1, 2):
            s = timed(jobs, cfg, workers, None)
            rows.append({"engine": "process pool" if workers > 1 else "in-process", "workers": workers,
                         "seconds": round(s, 2), "images_per_s": round(len(jobs) / s, 1)})
        for workers in (1, 2):
            with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                              dashboard_address=None, worker_dashboard_address=None) as cluster:
                s = timed(jobs, cfg, workers, cluster.scheduler_address)
            rows.append({"engine": "dask", "workers": workers, "seconds": round(s, 2),
                         "images_per_s": round(len(jobs) / s, 1)})
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "commit": commit, "cpus": os.cpu_count(),
                      "python": platform.python_version(), "images": args.images, "input_side": args.side,
                      "size": args.size, "results": rows}, indent=2))

if __name__ == "__main__":
    main()
