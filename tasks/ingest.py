"""ingest: pull every configured source (ISIC API, local isic-cli folder, synthetic) into data/ingest/.

A run is a transaction. Listing, validation and downloads finish first, with new and changed files parked in
`data/ingest/.staging/<source>/`. Only a run that passed every check commits: staged files move into
`images/<source>/`, the index is written atomically, and only then do files that left a source move aside to
`data/ingest/.pruned/<run-id>/` (recoverable until the next successful run empties it). A failing run changes
nothing already ingested; its staged downloads are reused by the next run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.core.config import Ingest, IsicSource, LocalSource, Params, SyntheticSource
from tasks.core.errors import InputError, RunError
from tasks.core.io import (
    Paths,
    progress,
    sha256_file,
    show_progress,
    write_index,
    write_json,
    write_run_stats,
    write_table,
    write_text,
)

log = logging.getLogger(__name__)

STAGE = "ingest"
STAGING = ".staging"  # data/ingest/.staging/<source>/: files fetched by a run that has not committed yet
PRUNED = ".pruned"  # data/ingest/.pruned/<run-id>/<source>/...: what the last successful run moved aside
# Columns every index row has (NaN when a source lacks them), so later stages can rely on them.
STANDARD_COLUMNS = [
    "source", "isic_id", "path", "file_size", "sha256", "attribution", "copyright_license",
    "pixels_x", "pixels_y", "image_type", "age_approx", "sex", "anatom_site_1", "anatom_site_2",
    "anatom_site_general", "diagnosis_1", "diagnosis_2", "diagnosis_3", "benign_malignant",
    "diagnosis", "patient_id", "lesion_id",
]
NUMERIC_COLUMNS = ["file_size", "pixels_x", "pixels_y", "age_approx"]
RESERVED_COLUMNS = {"source", "path", "file_size", "sha256"}
FAILED_COLUMNS = ["source", "isic_id", "reason"]


@dataclass
class SourceResult:
    """What one source contributed: metadata rows (one per image) and failures.

    Each row carries `_file` (its final path under images/<source>/) and `_staged` (where the new bytes wait
    until the commit, or None when the final file is already current)."""

    name: str
    kind: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # isic_id -> reason
    downloaded: int = 0
    skipped: int = 0
    licenses: dict[str, str] = field(default_factory=dict)  # licence name -> text
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class PrunePlan:
    """Files to move aside at the commit, and per source how many of how many."""

    files: list[Path] = field(default_factory=list)
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # source -> (going, had)


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


def new_run_id() -> str:
    """A sortable, unique name for this run's folder of pruned files."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def child_dir(base: Path, name: str) -> Path:
    """`base/name` for a source name, refusing anything that would land outside `base` (defence in depth:
    params already allow only slugs). A symlinked `base/name` that points elsewhere is refused too."""
    bad = (not name or name in (".", "..") or name.startswith(".") or "\x00" in name
           or any(sep in name for sep in ("/", "\\", os.sep)))
    path = base / name
    if bad or path.resolve().parent != base.resolve():
        raise InputError(f"ingest.sources: source name {name!r} would write outside {base}; use a plain name "
                         "such as `isic-2024` (letters, digits, - and _)")
    return path


def _files_under(folder: Path) -> tuple[set[Path], set[Path]]:
    """(data files, temp files) below `folder`; names starting with '.' are temp files of interrupted writes.
    Symlinks are listed as entries, never followed."""
    data: set[Path] = set()
    temp: set[Path] = set()
    if not folder.is_dir() or folder.is_symlink():
        return data, temp
    for dirpath, dirnames, filenames in os.walk(folder):
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in filenames + links:
            (temp if name.startswith(".") else data).add(Path(dirpath) / name)
    return data, temp


def _is_current(dest: Path, size: int | None) -> bool:
    """A committed file that needs no new download: a regular file of the expected size (any size if unknown)."""
    try:
        return dest.is_file() and not dest.is_symlink() and (size is None or dest.stat().st_size == size)
    except OSError:
        return False


# --------------------------------------------------------------------------- sources
def _client_kwargs(cfg: Ingest) -> dict[str, Any]:
    from isic_client.retry import ISIC_RETRY

    return {
        "timeout": (cfg.timeout_connect, cfg.timeout_read),
        "retry": ISIC_RETRY.replace(max_retries=cfg.max_retries, backoff_cap=cfg.backoff_cap),
    }


def fetch_isic(name: str, base_url: str, query: str, collections: Iterable[int | str], limit: int | None,
               cfg: Ingest, image_dir: Path, staging_dir: Path, kind: str = "isic") -> SourceResult:
    """Search the API and download new or changed images (resumable, concurrent, atomic) into `staging_dir`."""
    from isic_client.client import IsicClient
    from isic_client.download import download_images, target_path
    from isic_client.retry import InsecureTokenError, IsicError

    where = f"ingest.sources[{name}] ({base_url})"
    kw = _client_kwargs(cfg)
    try:
        client = IsicClient.from_env(base_url, token_env=cfg.token_env, **kw)
        coll_ids = client.resolve_collections(list(collections)) if collections else []
        images = list(client.search(query=query, collections=coll_ids, limit=limit))
    except InsecureTokenError as exc:
        raise InputError(f"{where}: {exc}") from exc
    except IsicError as exc:
        raise RunError(f"{where}: {exc}. Nothing was changed; rerun when the server answers.") from exc
    except ValueError as exc:  # an unknown or ambiguous collection name
        raise InputError(f"{where}: {exc}") from exc
    res = SourceResult(name=name, kind=kind, detail={"base_url": base_url, "query": query,
                                                     "collections": coll_ids, "limit": limit,
                                                     "found": len(images)})
    unique: dict[str, Any] = {}
    for img in images:
        if img.isic_id in unique:
            res.detail["duplicates"] = res.detail.get("duplicates", 0) + 1
            continue
        unique[img.isic_id] = img
    if res.detail.get("duplicates"):
        log.warning("%s listed %d image(s) twice; the first record of each is kept", where, res.detail["duplicates"])
    wanted: dict[str, tuple[Any, Path]] = {}
    to_fetch = []
    for isic_id, img in unique.items():
        try:
            dest = target_path(img, image_dir)  # validates the id before any path is built
        except ValueError as exc:
            res.failed[str(isic_id)] = str(exc)
            continue
        wanted[isic_id] = (img, dest)
        if _is_current(dest, img.full_size):
            res.skipped += 1
        else:
            to_fetch.append(img)
    report = download_images(to_fetch, staging_dir, workers=cfg.workers, progress=show_progress(), **kw)
    res.failed.update(report.failed)
    res.downloaded, res.skipped = len(report.downloaded), res.skipped + len(report.skipped)
    fetched = set(report.downloaded) | set(report.skipped)
    for isic_id, (img, dest) in wanted.items():
        if isic_id in res.failed:
            continue
        staged = staging_dir / dest.name if isic_id in fetched else None
        res.rows.append({**img.flat_metadata(), "_file": dest, "_staged": staged})
    for lic in sorted({str(r.get("copyright_license")) for r in res.rows if r.get("copyright_license")}):
        try:
            res.licenses[lic] = client.license_text(lic)
        except Exception as exc:  # a missing licence text must not lose the images; it is reported
            res.detail.setdefault("license_errors", {})[lic] = str(exc)
    return res


def read_local_metadata(meta_path: Path) -> pd.DataFrame:
    """A local source's metadata.csv as text columns; InputError naming the file for anything unreadable."""
    if not meta_path.is_file():
        raise InputError(f"{meta_path} not found; a local source must be a folder with images and metadata.csv "
                         "(as `isic image download` writes it)")
    try:
        meta = pd.read_csv(meta_path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{meta_path} is not UTF-8 text (byte {exc.object[exc.start:exc.start + 1]!r} at "
                         f"offset {exc.start}); re-save it as UTF-8 (e.g. 'CSV UTF-8' in a spreadsheet)") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise InputError(f"{meta_path} is not a readable CSV table: {exc}") from None
    if "isic_id" not in meta.columns:
        raise InputError(f"{meta_path}: no `isic_id` column (columns: {', '.join(map(str, meta.columns[:10]))}...)")
    ids = meta["isic_id"].str.strip()
    dup = ids[ids.duplicated(keep=False) & (ids != "")]
    if len(dup):
        lines = ", ".join(f"{i} (lines {', '.join(str(n + 2) for n in dup.index[dup == i])})"
                          for i in sorted(set(dup))[:5])
        raise InputError(f"{meta_path}: {dup.nunique()} isic_id(s) have several rows, e.g. {lines}; keep one row "
                         "per image")
    return meta


def fetch_local(src: LocalSource, image_dir: Path, staging_dir: Path) -> SourceResult:
    """Stage a local isic-cli folder (images + metadata.csv): files whose size already matches are skipped.

    Entries named like images that are not regular files, symlinks leaving the folder, and ids with several
    image files are reported in failed.csv, never ingested."""
    from isic_client.models import validate_isic_id
    from tasks.fake.isic_folder import scan_images

    root = Path(src.path).expanduser()
    meta_path = root / "metadata.csv"
    meta = read_local_metadata(meta_path)
    scan = scan_images(root)
    res = SourceResult(name=src.name, kind="local", detail={"path": str(root.resolve()), "found": len(meta)})
    listed: set[str] = set()
    for rec in progress(meta.to_dict("records"), desc=f"ingest {src.name}", unit="img"):
        rec = {k: v for k, v in rec.items() if v != ""}
        raw_id = str(rec.get("isic_id", "")).strip()
        listed.add(raw_id)
        try:
            isic_id = validate_isic_id(raw_id)
        except ValueError as exc:
            res.failed[raw_id] = f"{meta_path}: {exc}"
            continue
        if isic_id in scan.problems:
            res.failed[isic_id] = scan.problems[isic_id]
            continue
        found = scan.files.get(isic_id)
        if found is None:
            res.failed[isic_id] = f"listed in {meta_path} but no image file {isic_id}.* in {root}"
            continue
        dest = image_dir / f"{isic_id}{found.suffix.lower()}"
        size = found.stat().st_size
        staged = staging_dir / dest.name
        if _is_current(dest, size):
            res.skipped += 1
            staged = None
        elif _is_current(staged, size):  # copied by an earlier run that did not commit
            res.skipped += 1
        else:
            staging_dir.mkdir(parents=True, exist_ok=True)
            tmp = staging_dir / f".{dest.name}.partial"
            shutil.copyfile(found, tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, staged)  # atomic: never a half-copied file under the final name
            res.downloaded += 1
        res.rows.append({**rec, "isic_id": isic_id, "_file": dest, "_staged": staged})
    for stem, why in scan.problems.items():  # named like an image but unusable, and not listed: still reported
        if stem not in listed:
            res.failed[stem] = why
    lic_dir = root / "licenses"
    for lic_file in sorted(lic_dir.glob("*.txt")) if lic_dir.is_dir() else []:
        if lic_file.is_file():
            res.licenses[lic_file.stem] = lic_file.read_text(encoding="utf-8", errors="replace")
    return res


def fetch_synthetic(src: SyntheticSource, cfg: Ingest, image_dir: Path, staging_dir: Path,
                    paths: Paths) -> SourceResult:
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
        res = fetch_isic(src.name, base_url, "", (), None, cfg, image_dir, staging_dir, kind="synthetic")
    res.detail.update({"n": src.n, "seed": src.seed, "malignant_fraction": src.malignant_fraction,
                       "image_size": src.image_size, "trouble": src.trouble,
                       "served_from": "local ISIC server (tasks.fake.isic_server)"})
    res.detail.pop("base_url", None)  # a random local port: keep the manifest deterministic
    return res


# --------------------------------------------------------------------------- validation (nothing changes yet)
def build_index(results: list[SourceResult], paths: Paths) -> pd.DataFrame:
    """The new index from the staged or current files; InputError on a repeated (source, isic_id)."""
    rows: list[dict[str, Any]] = []
    for res in results:
        for rec in res.rows:
            final: Path = rec["_file"]
            content: Path = rec["_staged"] or final
            # Our key/bookkeeping columns win; a source's own columns of the same name are kept renamed.
            meta = {(f"{k}_orig" if k in RESERVED_COLUMNS else k): v for k, v in rec.items() if not k.startswith("_")}
            rows.append({**meta, "source": res.name, "path": paths.rel(final),
                         "file_size": content.stat().st_size, "sha256": sha256_file(content)})
    df = normalise_index(rows)
    dup = df.duplicated(["source", "isic_id"], keep=False)
    if dup.any():
        ids = sorted(set(df.loc[dup, "source"] + "/" + df.loc[dup, "isic_id"]))[:5]
        raise InputError(f"ingest: several rows for the same image: {', '.join(ids)}; fix the source's metadata")
    return df


def failure_table(results: list[SourceResult]) -> pd.DataFrame:
    rows = [{"source": r.name, "isic_id": i, "reason": why} for r in results for i, why in sorted(r.failed.items())]
    return pd.DataFrame(rows, columns=FAILED_COLUMNS)


def check_failures(failed: pd.DataFrame, max_failures: int, listed_in: Path) -> None:
    """RunError when more images failed than `ingest.max_failures` allows."""
    if len(failed) <= max_failures:
        return
    listed = "; ".join(f"{f.source}/{f.isic_id}: {f.reason}" for f in failed.head(5).itertuples())
    raise RunError(f"{len(failed)} image(s) failed (ingest.max_failures={max_failures}), listed in {listed_in}: "
                   f"{listed}. Nothing already ingested was changed; fix the causes and rerun (finished downloads "
                   "are kept and reused), or raise ingest.max_failures to accept the losses.")


def plan_prune(image_root: Path, results: list[SourceResult], configured: list[str], max_fraction: float,
               force: bool) -> PrunePlan:
    """Files under `image_root` that the new index no longer has, checked against the safety limits.

    A configured source that lists none of its images, or would lose more than `max_fraction` of its files,
    stops the run (RunError naming the source, the counts and the override) unless `force`. Files of ids that
    failed this run are kept; folders of sources no longer in the params go entirely (the params say so)."""
    plan = PrunePlan()
    by_name = {r.name: r for r in results}
    for name in configured:
        res = by_name[name]
        had, _ = _files_under(image_root / name)
        keep = {r["_file"] for r in res.rows}
        going = sorted(f for f in had - keep if f.name.split(".", 1)[0] not in res.failed)
        plan.counts[name] = (len(going), len(had))
        if not going or force:
            plan.files += going
            continue
        if not res.rows:
            raise RunError(f"ingest.sources[{name}] listed no images this run, but {len(had)} file(s) from earlier "
                           f"runs are in {image_root / name}; refusing to remove them (a query that matches "
                           "nothing or a server answering an empty list looks the same). If that is really "
                           "wanted, set ingest.force_prune: true (or pass --force-prune) for one run.")
        if len(going) > max_fraction * len(had):
            raise RunError(f"ingest.sources[{name}]: {len(going)} of {len(had)} file(s) "
                           f"({len(going) / len(had):.0%}) would be removed because the source no longer lists "
                           f"them, more than ingest.max_prune_fraction={max_fraction:g}; e.g. "
                           f"{', '.join(f.name for f in going[:3])}. Nothing was changed. If the change is "
                           "intended, set ingest.force_prune: true (or pass --force-prune) for one run, or raise "
                           "ingest.max_prune_fraction.")
        plan.files += going
    if image_root.is_dir():
        for entry in sorted(image_root.iterdir()):
            if entry.name in configured or entry.name.startswith("."):
                continue
            gone, _ = _files_under(entry) if entry.is_dir() and not entry.is_symlink() else ({entry}, set())
            plan.counts[entry.name] = (len(gone), len(gone))
            plan.files += sorted(gone)
    return plan


# --------------------------------------------------------------------------- commit
def _move_aside(path: Path, out: Path, trash: Path) -> None:
    """Move `path` (below `out`) to the same relative place below `trash`."""
    target = trash / path.relative_to(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, target)


def _remove_empty_dirs(root: Path) -> None:
    if not root.is_dir():
        return
    for d in sorted((Path(p) for p, _, _ in os.walk(root)), key=lambda p: len(p.parts), reverse=True):
        if d != root and not any(d.iterdir()):
            d.rmdir()


def commit(out: Path, results: list[SourceResult], df: pd.DataFrame, plan: PrunePlan, paths: Paths,
           run_id: str) -> int:
    """Staged files into place, the index atomically, then pruned files aside; returns how many were pruned."""
    image_root = out / "images"
    trash = out / PRUNED / run_id
    for res in results:
        for rec in res.rows:
            staged, final = rec["_staged"], rec["_file"]
            if staged is None:
                continue
            if final.exists() or final.is_symlink():  # a changed file: the old bytes stay recoverable
                _move_aside(final, out, trash)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, final)
    write_index(df, paths, STAGE)  # the commit point: downstream stages read only what the index names
    for f in plan.files:
        _move_aside(f, out, trash)
    _, temp = _files_under(image_root)
    for f in temp:  # temp files of interrupted writes are not data: removed, not kept
        f.unlink()
    _remove_empty_dirs(image_root)
    shutil.rmtree(out / STAGING, ignore_errors=True)  # leftovers are downloads nobody lists any more
    for old in sorted((out / PRUNED).iterdir()) if (out / PRUNED).is_dir() else []:
        if old.name != run_id:  # what earlier runs set aside is dropped only now, after a successful run
            shutil.rmtree(old, ignore_errors=True)
    if plan.files:
        log.warning("ingest: moved %d file(s) that left their source to %s (kept until the next successful run)",
                    len(plan.files), trash)
    return len(plan.files)


def write_outputs(out: Path, results: list[SourceResult], df: pd.DataFrame, failed: pd.DataFrame,
                  configured: list[str]) -> dict[str, Any]:
    """failed.csv, licences, attribution.txt and manifest.json (deterministic: no timestamps); the manifest."""
    write_table(failed, out / "failed.csv")
    lic_root = out / "licenses"
    for res in results:
        for lic, text in res.licenses.items():
            write_text(child_dir(lic_root, res.name) / f"{lic}.txt", text)
    for d in sorted(lic_root.iterdir()) if lic_root.is_dir() else []:  # licences of sources no longer configured
        if d.is_dir() and d.name not in configured:
            shutil.rmtree(d)
        elif d.is_dir():
            wanted = {f"{lic}.txt" for r in results if r.name == d.name for lic in r.licenses}
            for f in d.iterdir():
                if f.name not in wanted and (f.is_file() or f.is_symlink()):
                    f.unlink()
    write_text(out / "attribution.txt", attribution_text(df))
    per_source = {
        r.name: {"kind": r.kind, "images": len(r.rows), "failed": len(r.failed), **r.detail,
                 "licenses": df.loc[df.source == r.name, "copyright_license"].value_counts().to_dict()}
        for r in results
    }
    manifest = {"sources": per_source, "images": len(df), "failed": len(failed),
                "licenses": df["copyright_license"].value_counts().to_dict()}
    write_json(out / "manifest.json", manifest)
    return manifest


# --------------------------------------------------------------------------- stage
def fetch_source(src: Any, cfg: Ingest, out: Path, paths: Paths) -> SourceResult:
    image_dir = child_dir(out / "images", src.name)
    staging_dir = child_dir(out / STAGING, src.name)
    if isinstance(src, LocalSource):
        return fetch_local(src, image_dir, staging_dir)
    if isinstance(src, SyntheticSource):
        return fetch_synthetic(src, cfg, image_dir, staging_dir, paths)
    assert isinstance(src, IsicSource)
    return fetch_isic(src.name, src.base_url, src.query, src.collections, src.limit, cfg, image_dir, staging_dir)


def run(params: Params, paths: Paths) -> dict[str, Any]:
    """Fetch all sources, validate, then commit into data/ingest: index, manifest, licences, failed.csv."""
    cfg = params.ingest
    out = paths.stage(STAGE)
    t0 = time.perf_counter()
    run_id = new_run_id()
    configured = [s.name for s in cfg.sources]
    results = [fetch_source(src, cfg, out, paths) for src in cfg.sources]
    failed = failure_table(results)
    write_table(failed, paths.reports / STAGE / "failed.csv")  # this run's failures, also when it stops here
    check_failures(failed, cfg.max_failures, paths.reports / STAGE / "failed.csv")
    df = build_index(results, paths)
    plan = plan_prune(out / "images", results, configured, cfg.max_prune_fraction, cfg.force_prune)
    pruned = commit(out, results, df, plan, paths, run_id)
    manifest = write_outputs(out, results, df, failed, configured)
    seconds = time.perf_counter() - t0
    metrics = {"images": len(df), "failed": len(failed),
               "per_source": {k: v["images"] for k, v in manifest["sources"].items()}}
    write_json(paths.reports / STAGE / "metrics.json", metrics)
    stats = {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(seconds, 2),
             "run_id": run_id, "downloaded": sum(r.downloaded for r in results),
             "skipped": sum(r.skipped for r in results), "pruned": pruned,
             "pruned_per_source": {k: v[0] for k, v in plan.counts.items() if v[0]}}
    write_run_stats(paths, STAGE, stats)  # wall-clock facts, outside data/ingest and not a metric
    return {**metrics, **{k: stats[k] for k in ("downloaded", "skipped", "pruned", "seconds")}}
