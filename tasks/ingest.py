"""ingest: pull every configured source (ISIC API, local isic-cli folder, synthetic) into data/ingest/."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from tasks.core.config import Ingest, IsicSource, LocalSource, Params, SyntheticSource
from tasks.core.io import Paths, progress, sha256_file, show_progress, write_index, write_json, write_table, write_text

STAGE = "ingest"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
# Columns every index row has (NaN when a source lacks them), so later stages can rely on them.
STANDARD_COLUMNS = [
    "source", "isic_id", "path", "file_size", "sha256", "attribution", "copyright_license",
    "pixels_x", "pixels_y", "image_type", "age_approx", "sex", "anatom_site_1", "anatom_site_2",
    "anatom_site_general", "diagnosis_1", "diagnosis_2", "diagnosis_3", "benign_malignant",
    "diagnosis", "patient_id", "lesion_id",
]
NUMERIC_COLUMNS = ["file_size", "pixels_x", "pixels_y", "age_approx"]
RESERVED_COLUMNS = {"source", "path", "file_size", "sha256"}


class IngestError(RuntimeError):
    """A source could not be ingested; the message names the source and what to do."""


@dataclass
class SourceResult:
    """What one source contributed: metadata rows (one per image on disk) and failures."""

    name: str
    kind: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # isic_id -> reason
    downloaded: int = 0
    skipped: int = 0
    licenses: dict[str, str] = field(default_factory=dict)  # licence name -> text
    detail: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- pure helpers
def normalise_index(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One typed table: standard columns first, numbers numeric, everything else str or missing."""
    df = pd.DataFrame(rows)
    for col in STANDARD_COLUMNS:
        if col not in df.columns:
            df[col] = np.nan
    extra = sorted(c for c in df.columns if c not in STANDARD_COLUMNS)
    df = df[STANDARD_COLUMNS + extra]
    for col in df.columns:
        if col in NUMERIC_COLUMNS:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
        else:
            # Parquet needs one type per column; sources mix bools, ints and strings in metadata.
            df[col] = df[col].map(lambda v: None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))
            df[col] = df[col].astype("object")
    return df.sort_values(["source", "isic_id"], kind="stable").reset_index(drop=True)


def attribution_text(df: pd.DataFrame) -> str:
    """Attributions as isic-cli writes them: by image count desc, then name; 'Anonymous' last."""
    if df.empty or "attribution" not in df:
        return ""
    counts = df["attribution"].dropna().value_counts()
    items = sorted(counts.items(), key=lambda kv: (kv[0] == "Anonymous", -kv[1], kv[0]))
    return "\n\n".join(name for name, _ in items) + ("\n" if items else "")


def synthetic_cache_key(src: SyntheticSource) -> str:
    """Cache key of a generated synthetic folder: its options and the generator's code."""
    import tasks.fake.lesions as synthetic

    code = Path(synthetic.__file__).read_bytes()
    spec = f"{src.n}:{src.seed}:{src.malignant_fraction}:{src.image_size}:{src.trouble}".encode()
    return hashlib.sha256(spec + code).hexdigest()[:16]


# --------------------------------------------------------------------------- sources
def _client_kwargs(cfg: Ingest) -> dict[str, Any]:
    from dataclasses import replace

    from isic_client.retry import ISIC_RETRY

    return {
        "timeout": (cfg.timeout_connect, cfg.timeout_read),
        "retry": replace(ISIC_RETRY, max_retries=cfg.max_retries, backoff_cap=cfg.backoff_cap),
    }


def fetch_isic(name: str, base_url: str, query: str, collections: Iterable[int | str], limit: int | None,
               cfg: Ingest, image_dir: Path, kind: str = "isic") -> SourceResult:
    """Search the API, download images (resumable, concurrent, atomic) and collect their metadata."""
    from isic_client.client import IsicClient
    from isic_client.download import download_images, target_path

    kw = _client_kwargs(cfg)
    client = IsicClient.from_env(base_url, token_env=cfg.token_env, **kw)
    coll_ids = client.resolve_collections(list(collections)) if collections else []
    images = list(client.search(query=query, collections=coll_ids, limit=limit))
    res = SourceResult(name=name, kind=kind, detail={"base_url": base_url, "query": query,
                                                     "collections": coll_ids, "limit": limit,
                                                     "found": len(images)})
    report = download_images(images, image_dir, workers=cfg.workers, progress=show_progress(), **kw)
    res.failed.update(report.failed)
    res.downloaded, res.skipped = len(report.downloaded), len(report.skipped)
    for img in images:
        if img.isic_id in res.failed:  # includes ids the downloader refused (e.g. `../x`)
            continue
        res.rows.append({**img.flat_metadata(), "_file": target_path(img, image_dir)})
    for lic in sorted({str(r.get("copyright_license")) for r in res.rows if r.get("copyright_license")}):
        try:
            res.licenses[lic] = client.license_text(lic)
        except Exception as exc:  # a missing licence text must not lose the images; it is reported
            res.detail.setdefault("license_errors", {})[lic] = str(exc)
    return res


def fetch_local(src: LocalSource, image_dir: Path) -> SourceResult:
    """Copy a local isic-cli folder (images + metadata.csv) into the stage, skipping finished files."""
    from isic_client.models import validate_isic_id

    root = Path(src.path).expanduser()
    meta_path = root / "metadata.csv"
    if not meta_path.exists():
        raise IngestError(f"ingest.sources[{src.name}]: {meta_path} not found; a local source must be a folder "
                          "with images and metadata.csv (as `isic image download` writes it)")
    meta = pd.read_csv(meta_path, dtype=str, keep_default_na=False)
    if "isic_id" not in meta.columns:
        raise IngestError(f"{meta_path}: no `isic_id` column (columns: {', '.join(meta.columns[:10])}...)")
    files = {p.stem: p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTS}
    res = SourceResult(name=src.name, kind="local", detail={"path": str(root.resolve()), "found": len(meta)})
    image_dir.mkdir(parents=True, exist_ok=True)
    for rec in progress(meta.to_dict("records"), desc=f"ingest {src.name}", unit="img"):
        rec = {k: v for k, v in rec.items() if v != ""}
        raw_id = str(rec.get("isic_id", ""))
        try:
            isic_id = validate_isic_id(raw_id)
        except ValueError as exc:
            res.failed[raw_id] = f"invalid isic_id: {exc}"
            continue
        found = files.get(isic_id)
        if found is None:
            res.failed[isic_id] = f"listed in {meta_path} but no image file {isic_id}.* in {root}"
            continue
        dest = image_dir / f"{isic_id}{found.suffix.lower()}"
        if dest.exists() and dest.stat().st_size == found.stat().st_size:
            res.skipped += 1
        else:
            tmp = dest.with_name(f".{dest.name}.partial")
            shutil.copyfile(found, tmp)
            os.replace(tmp, dest)  # atomic: never a half-copied file under the final name
            res.downloaded += 1
        res.rows.append({**rec, "isic_id": isic_id, "_file": dest})
    for lic_file in sorted((root / "licenses").glob("*.txt")) if (root / "licenses").is_dir() else []:
        res.licenses[lic_file.stem] = lic_file.read_text()
    return res


def fetch_synthetic(src: SyntheticSource, cfg: Ingest, image_dir: Path, paths: Paths) -> SourceResult:
    """Generate (cached) synthetic lesions, serve them with the local ISIC server, fetch via the real client."""
    from tasks.fake.isic_server import running_server
    from tasks.fake.lesions import generate

    folder = paths.cache / "synthetic" / f"{src.name}-{synthetic_cache_key(src)}"
    if not (folder / "metadata.csv").exists():
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        generate(tmp, n=src.n, seed=src.seed, malignant_fraction=src.malignant_fraction,
                 image_size=src.image_size, trouble=src.trouble)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    with running_server(folder) as base_url:
        res = fetch_isic(src.name, base_url, "", (), None, cfg, image_dir, kind="synthetic")
    res.detail.update({"n": src.n, "seed": src.seed, "malignant_fraction": src.malignant_fraction,
                       "image_size": src.image_size, "trouble": src.trouble, "served_from": "local ISIC server (tasks.fake.isic_server)"})
    res.detail.pop("base_url", None)  # a random local port: keep the manifest deterministic
    return res


# --------------------------------------------------------------------------- stage
def _prune(image_root: Path, keep: set[Path]) -> int:
    """Remove images of sources/ids no longer configured, and stale temp files, so the output equals the params."""
    removed = 0
    if not image_root.exists():
        return 0
    for p in image_root.rglob("*"):
        if p.is_file() and p.resolve() not in keep:
            p.unlink()
            removed += 1
    for d in sorted((d for d in image_root.rglob("*") if d.is_dir()), reverse=True):
        if not any(d.iterdir()):
            d.rmdir()
    return removed


def run(params: Params, paths: Paths) -> dict[str, Any]:
    """Fetch all sources into data/ingest (incrementally), write the index, manifest and licences."""
    cfg = params.ingest
    out = paths.stage(STAGE)
    image_root = out / "images"
    t0 = time.perf_counter()
    results: list[SourceResult] = []
    for src in cfg.sources:
        image_dir = image_root / src.name
        if isinstance(src, LocalSource):
            res = fetch_local(src, image_dir)
        elif isinstance(src, SyntheticSource):
            res = fetch_synthetic(src, cfg, image_dir, paths)
        else:
            assert isinstance(src, IsicSource)
            res = fetch_isic(src.name, src.base_url, src.query, src.collections, src.limit, cfg, image_dir)
        results.append(res)

    rows: list[dict[str, Any]] = []
    keep: set[Path] = set()
    for res in results:
        for rec in res.rows:
            f: Path = rec.pop("_file")
            keep.add(f.resolve())
            # Our key/bookkeeping columns win; a source's own columns of the same name are kept renamed.
            rec = {(f"{k}_orig" if k in RESERVED_COLUMNS else k): v for k, v in rec.items()}
            rows.append({**rec, "source": res.name, "path": paths.rel(f), "file_size": f.stat().st_size,
                         "sha256": sha256_file(f)})
    df = normalise_index(rows)
    pruned = _prune(image_root, keep)
    write_index(df, paths, STAGE)

    failed = [{"source": r.name, "isic_id": i, "reason": why} for r in results for i, why in sorted(r.failed.items())]
    write_table(pd.DataFrame(failed, columns=["source", "isic_id", "reason"]), out / "failed.csv")
    for res in results:
        for lic, text in res.licenses.items():
            write_text(out / "licenses" / res.name / f"{lic}.txt", text)
    write_text(out / "attribution.txt", attribution_text(df))
    per_source = {
        r.name: {"kind": r.kind, "images": len(r.rows), "failed": len(r.failed), **r.detail,
                 "licenses": df.loc[df.source == r.name, "copyright_license"].value_counts().to_dict()}
        for r in results
    }
    manifest = {"sources": per_source, "images": len(df), "failed": len(failed),
                "licenses": df["copyright_license"].value_counts().to_dict()}
    write_json(out / "manifest.json", manifest)  # deterministic: no timestamps, so no-op reruns stay no-ops
    seconds = time.perf_counter() - t0
    metrics = {"images": len(df), "failed": len(failed), "pruned": pruned,
               "downloaded": sum(r.downloaded for r in results), "skipped": sum(r.skipped for r in results),
               "per_source": {k: v["images"] for k, v in per_source.items()}}
    write_json(paths.reports / STAGE / "metrics.json", metrics)
    # Wall-clock facts live beside the metrics, outside data/ingest, so they never invalidate downstream stages.
    write_json(paths.reports / STAGE / "fetch_log.json",
               {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(seconds, 2),
                "downloaded": metrics["downloaded"], "skipped": metrics["skipped"]})
    if len(failed) > cfg.max_failures:
        listed = "; ".join(f"{f['source']}/{f['isic_id']}: {f['reason']}" for f in failed[:5])
        raise IngestError(f"{len(failed)} image(s) failed (ingest.max_failures={cfg.max_failures}), listed in "
                          f"{out / 'failed.csv'}: {listed}. Rerun to resume; finished files are kept.")
    return {**metrics, "seconds": round(seconds, 2)}
