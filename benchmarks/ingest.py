"""Download throughput (images/s) from the local ISIC server with injected latency, at several concurrencies.

Prints one JSON document: per concurrency the images/s, MB/s, speed-up over one stream and the efficiency
against linear scaling (rate_c / (c * rate_1)). The server runs in its own process (as the real API does),
so client and server threads do not share one GIL.

    python benchmarks/ingest.py                       # ../shared/data/isic-real if present, else a sample
    python benchmarks/ingest.py --root DIR --latency-ms 20 --concurrency 1,4,16 --per-stream 100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable from a checkout without installing

from isic_client import IsicClient, download_images  # noqa: E402
from tasks.fake.isic_folder import write_sample_folder  # noqa: E402
from tasks.fake.isic_server import running_server  # noqa: E402

DEFAULT_REAL = ROOT.parent / "shared" / "data" / "isic-real"


@contextmanager
def server_process(root: Path, latency_ms: float) -> Iterator[str]:
    """`serve_forever` in a child process on ephemeral ports; yields the API base URL."""
    code = ("import sys; from pathlib import Path; from tasks.fake.isic_server import serve_forever; "
            f"serve_forever(Path({str(root)!r}), host='127.0.0.1', port=0, latency_ms={latency_ms}, "
            "ready=lambda line: print(line, flush=True))")
    proc = subprocess.Popen([sys.executable, "-u", "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        m = re.search(r"at (http://\S+/api/v2/)", line)
        if not m:
            raise RuntimeError(f"server did not start: {line!r}")
        yield m.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def measure(api: str, concurrency: list[int], per_stream: int, workdir: Path, fsync: bool,
            repeats: int = 1) -> list[dict]:
    """Time download_images per concurrency on a fresh folder (median of `repeats`, levels interleaved so
    background load drifts hit every level alike); the search itself is not timed."""
    images = list(IsicClient(api).search())
    samples: dict[int, list[tuple[float, int, int]]] = {c: [] for c in concurrency}
    for _ in range(repeats):
        for c in concurrency:
            n = min(len(images), per_stream * c)
            out = workdir / f"c{c}"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            report = download_images(images[:n], out, workers=c, fsync=fsync)
            dt = time.perf_counter() - t0
            if report.failed:
                raise RuntimeError(f"{len(report.failed)} downloads failed, e.g. {next(iter(report.failed.items()))}")
            samples[c].append((dt, n, report.bytes))
            shutil.rmtree(out, ignore_errors=True)
    rows = []
    for c in concurrency:
        dt, n, nbytes = sorted(samples[c])[len(samples[c]) // 2]  # the median run
        rows.append({"concurrency": c, "images": n, "seconds": round(dt, 3), "images_per_s": round(n / dt, 1),
                     "mb_per_s": round(nbytes / dt / 1e6, 2),
                     "runs_images_per_s": [round(n_ / d_, 1) for d_, n_, _ in samples[c]]})
    base = rows[0]["images_per_s"] / rows[0]["concurrency"]
    for r in rows:
        r["speedup"] = round(r["images_per_s"] / rows[0]["images_per_s"], 2)
        r["efficiency_vs_linear"] = round(r["images_per_s"] / (r["concurrency"] * base), 3)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=None, help="ISIC-style folder to serve")
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--per-stream", type=int, default=100, help="images per worker at each level")
    ap.add_argument("--repeats", type=int, default=3, help="runs per level; the median is reported")
    ap.add_argument("--in-process", action="store_true", help="run the server in this process (shares the GIL)")
    ap.add_argument("--no-fsync", action="store_true", help="skip fsync per file (ingest fsyncs)")
    ap.add_argument("--workdir", type=Path, default=None, help="where files land (default: a temp dir)")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="lf-bench-"))
    try:
        root = args.root or (DEFAULT_REAL if (DEFAULT_REAL / "metadata.csv").exists() else None)
        if root is None:
            root = write_sample_folder(tmp / "sample", n=args.per_stream * max(levels), size=(96, 72))
        workdir = args.workdir or tmp / "out"
        workdir.mkdir(parents=True, exist_ok=True)
        serve = running_server(root, latency_ms=args.latency_ms) if args.in_process else server_process(
            root, args.latency_ms)
        with serve as api:
            rows = measure(api, levels, args.per_stream, workdir, fsync=not args.no_fsync, repeats=args.repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({
        "benchmark": "isic_client.download_images from the local ISIC server",
        "root": str(root), "latency_ms": args.latency_ms, "server": "in-process" if args.in_process else "subprocess",
        "fsync": not args.no_fsync, "repeats": args.repeats, "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "results": rows,
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
