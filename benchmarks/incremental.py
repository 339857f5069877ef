"""Incremental data stages: a cold run and a nightly run with 2 % new images, for dedupe and preprocess.

    .venv/bin/python benchmarks/incremental.py [--real DIR] [--copies 3] [--new 0.02] [--workers 2]
    .venv/bin/python benchmarks/incremental.py --quick          # only the base set (~2.5k images)

Two data sets:
- base: isic-real (2,467 JPEGs) when it is there, else synthetic lesions from `tasks.fake.lesions`;
- x4:   base plus three transformed copies of each image (resize + JPEG, recolour, 2 % crop + JPEG, made by
        benchmarks/dedupe.py's `plant`, stored as JPEG q95): ~10^4 images, 6 true duplicate pairs per photo.

For each set and each stage (dedupe, preprocess), in fresh project folders:
1. `cold`: the whole set with an empty cache (what a first run, or a run after `rm -rf .cache`, costs);
2. `yesterday`: the set minus a random `--new` fraction of its rows, with an empty cache (fills the cache);
3. `nightly`: the whole set again in the project of step 2, so only the new rows miss the cache; the stage's
   output folder is removed first, as `dvc repro` does (`--keep-outputs`: rerun over it, as `lesionflow stage`).
Outputs of `nightly` and `cold` are compared byte for byte (every output file and the index).
Prints one JSON document: seconds per run, cache hits, speed-up cold / nightly, identical outputs.
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("LESIONFLOW_PROGRESS", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from flows import stages  # noqa: E402
from tasks.core.config import parse_params  # noqa: E402
from tasks.core.io import Paths, read_json, sha256_file, write_index  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
COPY_FAMILIES = ("resize_jpeg", "recolour", "crop2")  # the ~10^4 set of the scaling measurement


def _bench_dedupe() -> Any:
    """benchmarks/dedupe.py as a module (its `plant` transforms and `local_index`)."""
    spec = importlib.util.spec_from_file_location("bench_dedupe", ROOT / "benchmarks" / "dedupe.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------- data sets
def base_index(real: Path, work: Path, synthetic_n: int) -> tuple[pd.DataFrame, str]:
    """The base set as an ingest-like index with absolute paths: isic-real, else synthetic lesions."""
    if (real / "metadata.csv").exists():
        m = _bench_dedupe().local_index(real, "isic-real")
        m["sha256"] = [sha256_file(p) for p in m["path"]]  # as ingest records it (dedupe trusts it)
        return m, f"isic-real ({real})"
    from tasks.fake.lesions import generate

    folder = work / "synthetic"
    if not (folder / "metadata.csv").exists():
        generate(folder, synthetic_n, seed=0)
    m = pd.read_csv(folder / "metadata.csv", dtype=str, keep_default_na=False)
    m.insert(0, "source", "synthetic")
    m["path"] = [str(folder / f"{i}.jpg") for i in m["isic_id"]]
    m = m[[Path(p).exists() for p in m["path"]]].reset_index(drop=True)
    m["sha256"] = [sha256_file(p) for p in m["path"]]
    return m, f"synthetic n={synthetic_n} seed 0"


def with_copies(base: pd.DataFrame, work: Path, families: tuple[str, ...], seed: int = 20240522) -> pd.DataFrame:
    """base + one transformed copy per image and family, as JPEG q95 under work/copies (reused when present).

    JPEG like everything the archive serves: stored as PNG, a copy costs 5x a JPEG to decode (1.3 vs 0.25 ms
    at 256x192), and the x4 set would then measure the codec rather than how dedupe scales."""
    import cv2

    plant = _bench_dedupe().plant
    folder = work / "copies"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for rec in base.to_dict("records"):
        img = None
        for fam in families:
            cid = f"{rec['isic_id']}_{fam}"
            out = folder / f"{cid}.jpg"
            if not out.exists():
                if img is None:
                    img = cv2.imread(rec["path"], cv2.IMREAD_COLOR)
                ok, buf = cv2.imencode(".jpg", plant(img, fam, rng), [cv2.IMWRITE_JPEG_QUALITY, 95])
                tmp = out.with_suffix(".partial")
                tmp.write_bytes(buf.tobytes())
                tmp.replace(out)
            rows.append({**rec, "sha256": sha256_file(out), "source": "copies", "isic_id": cid, "path": str(out),
                         "planted_from": rec["isic_id"], "family": fam})
    return pd.concat([base, pd.DataFrame(rows)], ignore_index=True)


def split_index(index: pd.DataFrame) -> pd.DataFrame:
    """What preprocess reads (data/split/index.parquet): the rows with a split and a target."""
    rng = np.random.default_rng(0)
    return index.assign(split=rng.choice(["train", "val", "test"], len(index), p=[0.7, 0.15, 0.15]),
                        target=0)


# --------------------------------------------------------------------------- runs
STAGE_INPUT = {"dedupe": "ingest", "preprocess": "split"}


def run_stage(stage: str, index: pd.DataFrame, project: Path, workers: int) -> dict[str, Any]:
    """Write the stage's input index into `project` and run the stage as `lesionflow stage` does."""
    paths = Paths(project)
    write_index(index, paths, STAGE_INPUT[stage])
    params = parse_params({"ingest": {"sources": [{"kind": "synthetic"}]}, stage: {"workers": workers}})
    c0, t0 = os.times(), time.perf_counter()
    stages.get(stage).run(params, paths)
    wall, c1 = time.perf_counter() - t0, os.times()
    cpu = (c1.user + c1.system + c1.children_user + c1.children_system
           - c0.user - c0.system - c0.children_user - c0.children_system)
    stats = read_json(paths.reports / stage / "run_stats.json")
    return {"images": len(index), "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "cache": stats.get("cache"),
            "timings_s": stats.get("timings_s")}


def copy_quality(out: pd.DataFrame, real: Path) -> dict[str, Any] | None:
    """Recall over true pairs (a photo and its copies) and false merges, scored as benchmarks/dedupe.py does
    (isic-real pairs its authors grouped are 'ambiguous', the known re-issued pair counts as the same photo)."""
    if "planted_from" not in out or not (real / "metadata.csv").exists():
        return None
    bd = _bench_dedupe()
    meta = pd.read_csv(real / "metadata.csv", dtype=str, keep_default_na=False)
    photo = np.array([p if isinstance(p, str) and p else i
                      for p, i in zip(out["planted_from"], out["isic_id"], strict=True)], object)
    group = meta.set_index("isic_id")["group_id"].to_dict()
    rgroup = np.array([group.get(p, f"nogroup:{p}") for p in photo], object)
    q = bd.score(out, bd.corrected(photo), rgroup)
    return {k: q[k] for k in ("recall", "precision", "true_pairs", "false_pairs", "false_pair_examples",
                              "ambiguous_same_group_pairs", "recall_by_family")}


def outputs_identical(a: Path, b: Path, stage: str) -> dict[str, Any]:
    """Every file under data/<stage> of project a equals the one of project b, byte for byte (and same set)."""
    da, db = Paths(a).stage(stage), Paths(b).stage(stage)
    fa = sorted(p.relative_to(da).as_posix() for p in da.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(db).as_posix() for p in db.rglob("*") if p.is_file())
    same_set = fa == fb
    differ = [f for f in fa if f in set(fb) and not filecmp.cmp(da / f, db / f, shallow=False)]
    return {"files": len(fa), "same_file_set": same_set, "differing_files": differ[:5],
            "identical": same_set and not differ}


def measure(name: str, index: pd.DataFrame, work: Path, new_fraction: float, workers: int,
            stages_: list[str], real: Path | None = None, keep_outputs: bool = False) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    new = np.zeros(len(index), bool)
    new[rng.choice(len(index), max(1, round(new_fraction * len(index))), replace=False)] = True
    out: dict[str, Any] = {"images": len(index), "new_images": int(new.sum())}
    for stage in stages_:
        inp = split_index(index) if stage == "preprocess" else index
        cold_dir, inc_dir = work / f"{name}-{stage}-cold", work / f"{name}-{stage}-inc"
        for d in (cold_dir, inc_dir):
            shutil.rmtree(d, ignore_errors=True)
        cold = run_stage(stage, inp, cold_dir, workers)
        if stage == "dedupe" and real is not None:
            cold["quality"] = copy_quality(pd.read_parquet(Paths(cold_dir).index(stage)), real)
        yesterday = run_stage(stage, inp[~new].reset_index(drop=True), inc_dir, workers)
        if not keep_outputs:  # as `dvc repro` does: the stage's out is removed before the stage runs
            shutil.rmtree(Paths(inc_dir).stage(stage))
        nightly = run_stage(stage, inp, inc_dir, workers)
        out[stage] = {"cold": cold, "yesterday": yesterday, "nightly": nightly,
                      "speedup_cold_over_nightly": round(cold["wall_s"] / max(nightly["wall_s"], 1e-9), 1),
                      "nightly_share_of_cold": round(nightly["wall_s"] / max(cold["wall_s"], 1e-9), 3),
                      "outputs": outputs_identical(cold_dir, inc_dir, stage)}
        for d in (cold_dir, inc_dir):
            shutil.rmtree(d, ignore_errors=True)
    if len(stages_) > 1:
        cold_s = sum(out[s]["cold"]["wall_s"] for s in stages_)
        night_s = sum(out[s]["nightly"]["wall_s"] for s in stages_)
        out["both_stages"] = {"cold_s": round(cold_s, 2), "nightly_s": round(night_s, 2),
                              "nightly_share_of_cold": round(night_s / max(cold_s, 1e-9), 3)}
    return out


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", type=Path, default=SHARED / "isic-real")
    ap.add_argument("--synthetic-n", type=int, default=2500, help="base set size when --real is absent")
    ap.add_argument("--copies", type=int, default=len(COPY_FAMILIES), help="transformed copies per image (x4 set)")
    ap.add_argument("--new", type=float, default=0.02, help="fraction of rows that are new in the nightly run")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--stages", default="dedupe,preprocess")
    ap.add_argument("--quick", action="store_true", help="only the base set")
    ap.add_argument("--keep-outputs", action="store_true",
                    help="nightly over yesterday's outputs (`lesionflow stage`), not after removing them (`dvc repro`)")
    ap.add_argument("--work", type=Path, default=None, help="keep generated data here (reused on the next run)")
    args = ap.parse_args(argv)
    stages_ = [s for s in args.stages.split(",") if s]
    work = args.work or Path(tempfile.mkdtemp(prefix="lf-bench-incr-"))
    work.mkdir(parents=True, exist_ok=True)
    import cv2

    report: dict[str, Any] = {
        "commit": _commit(), "date": time.strftime("%Y-%m-%d"),
        "conditions": {"python": platform.python_version(), "opencv": cv2.__version__, "cpu_count": os.cpu_count(),
                       "loadavg_before": [round(x, 2) for x in os.getloadavg()], "workers": args.workers},
    }
    t0 = time.perf_counter()
    try:
        base, origin = base_index(args.real, work, args.synthetic_n)
        report["data"] = {"base": origin, "copy_families": list(COPY_FAMILIES[:args.copies]),
                          "nightly": "over yesterday's outputs" if args.keep_outputs else "outputs removed first"}
        report["base"] = measure("base", base, work, args.new, args.workers, stages_, args.real,
                                 args.keep_outputs)
        if not args.quick and args.copies:
            big = with_copies(base, work, COPY_FAMILIES[:args.copies])
            report[f"x{1 + args.copies}"] = measure(f"x{1 + args.copies}", big, work, args.new, args.workers,
                                                    stages_, args.real, args.keep_outputs)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report["conditions"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
