"""Run every benchmark script and write one JSON report (default reports/benchmarks.json).

    python benchmarks/run_all.py [--quick] [--out reports/benchmarks.json]

Each benchmark is its own process (so one's imports, threads and memory don't skew another's numbers) and
prints a JSON document on stdout; this collects them with the command, wall time and exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (full args, quick args): quick keeps the whole report to a few minutes on 2 cores.
BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "ingest": ([], ["--repeats", "1", "--per-stream", "30"]),
    "dedupe": ([], ["--sizes", "1000,10000", "--planted", "300", "--quick"]),
    "preprocess": ([], ["--n", "200", "--repeats", "1"]),
    "input_pipeline": ([], ["--n", "128", "--steps", "4", "--archs", "small_cnn"]),
    "incremental": ([], ["--quick"]),
    "scaling": ([], ["--images", "100"]),
}


def _last_json(text: str) -> object:
    """The JSON document a benchmark printed (the last top-level object/array on stdout)."""
    for start in (i for i in range(len(text)) if text[i] in "{[" and (i == 0 or text[i - 1] == "\n")):
        try:
            return json.loads(text[start:])
        except json.JSONDecodeError:
            continue
    raise ValueError("no JSON document on stdout")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (minutes, not tens of minutes)")
    ap.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), default=sorted(BENCHMARKS))
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "benchmarks.json")
    args = ap.parse_args(argv)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "NO_ALBUMENTATIONS_UPDATE": "1", "LESIONFLOW_PROGRESS": "0"}
    report = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                          "loadavg_start": os.getloadavg()}, "quick": args.quick, "benchmarks": {}}
    failed = 0
    for name in args.only:
        full, quick = BENCHMARKS[name]
        cmd = [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *(quick if args.quick else full)]
        print(f"== {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        entry: dict = {"cmd": cmd[1:], "seconds": round(time.perf_counter() - t0, 1), "returncode": r.returncode}
        try:
            entry["result"] = _last_json(r.stdout)
        except ValueError as exc:
            entry["error"] = f"{exc}; stderr tail: {r.stderr[-800:]}"
        failed += r.returncode != 0 or "error" in entry
        report["benchmarks"][name] = entry
    report["machine"]["loadavg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".partial")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    print(json.dumps(report, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
