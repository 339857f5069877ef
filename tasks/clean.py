"""clean: binary target, normalised metadata, schema check, image quarantine; every dropped row listed with why."""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.core.config import Clean, Params
from tasks.core.errors import InputError
from tasks.core.images import DEFAULT_MAX_PIXELS, ImageRejected, decode, probe_size, truncation
from tasks.core.io import Paths, atomic_path, read_index, write_index, write_json, write_run_stats, write_table
from tasks.core.labels import label_of, target_of
from tasks.core.parallel import parallel_map

log = logging.getLogger(__name__)

STAGE = "clean"
INPUT_STAGE = "dedupe"
ISIC_ID_RE = r"^ISIC_\d{7}$"
REQUIRED_INPUT = ["source", "isic_id", "path", "dup_group", "keep"]
# Columns that tie images to a split unit; ids carried by rows dropped as duplicates are kept in `linked_ids`
# so split still groups the surviving copy with that patient/lesion (otherwise the link would vanish here).
LINK_COLUMNS = ["patient_id", "lesion_id", "group_id"]
# diagnosis_1..5: the hierarchy levels (a deeper level decides when a row lacks diagnosis_1); then legacy columns.
LABEL_COLUMNS = ["diagnosis_1", "diagnosis_2", "diagnosis_3", "diagnosis_4", "diagnosis_5", "benign_malignant",
                 "diagnosis", "dx"]
SITE_COLUMNS = ["anatom_site_1", "anatom_site_2", "anatom_site_3", "anatom_site_special"]
SITE_LEVEL1 = ["Head and neck", "Trunk", "Upper extremity", "Lower extremity", "Anogenital region"]

# Legacy `anatom_site_general` (ISIC <= 2026-05) and HAM10000 `localization` words -> current hierarchy
# (anatom_site_1, anatom_site_2, anatom_site_3, anatom_site_special); names from isic-metadata
# anatom_site_hierarchical.py. Palms/soles and oral/genital span two level-1 sites, so only the
# `anatom_site_special` flag can be set for them without inventing a level-1 site.
_N = None
LEGACY_SITES: dict[str, tuple[str | None, str | None, str | None, str | None]] = {
    "head/neck": ("Head and neck", _N, _N, _N),
    "head and neck": ("Head and neck", _N, _N, _N),
    "face": ("Head and neck", "Head", "Face", _N),
    "scalp": ("Head and neck", "Head", "Scalp", _N),
    "ear": ("Head and neck", "Head", "Ear", _N),
    "neck": ("Head and neck", "Neck", _N, _N),
    "upper extremity": ("Upper extremity", _N, _N, _N),
    "hand": ("Upper extremity", "Hand", _N, _N),
    "lower extremity": ("Lower extremity", _N, _N, _N),
    "foot": ("Lower extremity", "Foot", _N, _N),
    "torso": ("Trunk", _N, _N, _N),
    "trunk": ("Trunk", _N, _N, _N),
    "anterior torso": ("Trunk", "Anterior trunk", _N, _N),
    "posterior torso": ("Trunk", "Posterior trunk", _N, _N),
    "lateral torso": ("Trunk", "Lateral trunk", _N, _N),
    "chest": ("Trunk", "Anterior trunk", "Anterior chest", _N),
    "abdomen": ("Trunk", "Anterior trunk", "Anterior abdomen", _N),
    "back": ("Trunk", "Posterior trunk", _N, _N),
    "genital": ("Anogenital region", "Genital region", _N, _N),
    "palms/soles": (_N, _N, _N, "acral palms or soles"),
    "acral": (_N, _N, _N, "acral NOS"),
    "oral/genital": (_N, _N, _N, "oral or genital"),
}
_MISSING_WORDS = {"", "nan", "none", "null", "na", "n/a", "unknown", "unk", "?", "-"}
SEX_MAP = {"male": "male", "m": "male", "man": "male", "female": "female", "f": "female", "woman": "female"}

QUARANTINE_REASONS = ("missing_file", "unreadable", "empty_file", "checksum_mismatch", "truncated",
                      "undecodable", "corrupt", "too_large", "too_small", "size_mismatch")
# tasks.core.images.ImageRejected reasons -> clean's quarantine reasons (names kept from earlier releases).
_REJECTED_AS = {"unreadable": "undecodable", "corrupt": "corrupt", "too_large": "too_large",
                "too_small": "too_small", "not_a_file": "missing_file"}


class SchemaError(InputError):
    """The input/output table breaks the index contract; the message names the column and the rows."""


# --------------------------------------------------------------------------- schema
def _blank(s: pd.Series) -> pd.Series:
    """True where a cell is missing or an empty/whitespace string."""
    return s.isna() | s.astype("string").str.strip().fillna("").eq("")


def _rows(df: pd.DataFrame, mask: pd.Series, col: str, limit: int = 5) -> str:
    bad = df.loc[mask]
    shown = []
    for idx, rec in bad.head(limit).iterrows():
        ident = f"source={rec.get('source')!r}, isic_id={rec.get('isic_id')!r}"
        shown.append(f"row {idx} ({ident}): {col}={rec.get(col)!r}")
    more = f" (+{len(bad) - limit} more)" if len(bad) > limit else ""
    return "; ".join(shown) + more


def check_input_schema(df: pd.DataFrame, where: str = "data/dedupe/index.parquet") -> None:
    """Raise SchemaError naming the column and offending rows if the dedupe index breaks the contract."""
    missing = [c for c in REQUIRED_INPUT if c not in df.columns]
    if missing:
        raise SchemaError(f"{where}: missing required column(s) {missing}; got {list(df.columns)}. "
                          "Rerun `lesionflow stage dedupe` (clean needs its dup_group/keep columns).")
    problems = []
    for col in ("source", "isic_id", "path", "dup_group"):
        mask = _blank(df[col])
        if mask.any():
            problems.append(f"column {col!r} is empty in {int(mask.sum())} row(s): {_rows(df, mask, col)}")
    ids = df["isic_id"].astype("string")
    mask = ~ids.str.fullmatch(ISIC_ID_RE).fillna(False).astype(bool) & ~_blank(df["isic_id"])
    if mask.any():
        problems.append(f"column 'isic_id' does not match {ISIC_ID_RE} (ISIC_ + 7 digits) in "
                        f"{int(mask.sum())} row(s): {_rows(df, mask, 'isic_id')}")
    keep = df["keep"]
    ok_keep = keep.map(lambda v: isinstance(v, (bool, np.bool_)) or (isinstance(v, (int, np.integer)) and v in (0, 1)))
    if not ok_keep.all():
        mask = ~ok_keep
        problems.append(f"column 'keep' must be boolean in {int(mask.sum())} row(s): {_rows(df, mask, 'keep')}")
    dup = df.duplicated(["source", "isic_id"], keep=False)
    if dup.any():
        problems.append(f"key (source, isic_id) is not unique in {int(dup.sum())} row(s): "
                        f"{_rows(df, dup, 'isic_id')}")
    if problems:
        raise SchemaError(f"{where}: {len(problems)} schema problem(s):\n  " + "\n  ".join(problems))


def check_output_schema(df: pd.DataFrame, where: str = "data/clean/index.parquet") -> None:
    """Post-condition on what clean writes: a bug here must fail the stage, not poison split/train."""
    problems = []
    checks: list[tuple[str, pd.Series, str]] = [
        ("target", ~df["target"].isin([0, 1]), "must be 0 or 1"),
        ("label", ~df["label"].isin(["malignant", "benign", "indeterminate"]), "must be a known label"),
        ("sex", ~(df["sex"].isna() | df["sex"].isin(["male", "female"])), "must be male/female/missing"),
        ("age_approx", ~(df["age_approx"].isna() | df["age_approx"].between(0, 120)), "must be 0..120 or missing"),
        ("image_width", ~(df["image_width"] > 0), "must be a positive decoded width"),
    ]
    for col, mask, what in checks:
        if mask.any():
            problems.append(f"column {col!r} {what} in {int(mask.sum())} row(s): {_rows(df, mask, col)}")
    if problems:
        raise SchemaError(f"{where}: {len(problems)} schema problem(s):\n  " + "\n  ".join(problems))


# --------------------------------------------------------------------------- metadata
def normalise_age(s: pd.Series) -> tuple[pd.Series, int]:
    """age_approx as float (NaN if missing/garbage/outside 0..120); also how many non-empty values were garbage."""
    text = s.astype("string").str.strip().str.rstrip("+")  # "85+" is how some CSVs write the top bucket
    num = pd.to_numeric(text, errors="coerce").astype("float64")
    num = num.where(num.between(0, 120))
    given = ~_blank(s) & ~text.str.lower().isin(_MISSING_WORDS).fillna(False).astype(bool)
    return num, int((given & num.isna()).sum())


def normalise_sex(s: pd.Series) -> tuple[pd.Series, dict[str, int]]:
    """male/female/NaN; returns the unmapped raw values with counts (missing-words are not unmapped)."""
    key = s.astype("string").str.strip().str.lower()
    out = key.map(SEX_MAP).astype("object")
    out = out.where(out.notna(), np.nan)
    unmapped = key[out.isna() & key.notna() & ~key.isin(_MISSING_WORDS)]
    return out, {str(k): int(v) for k, v in unmapped.value_counts().items()}


def normalise_sites(df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Fill anatom_site_1/2/3/special from legacy anatom_site_general where the row has no current site."""
    out = pd.DataFrame(index=df.index)
    for col in SITE_COLUMNS:
        out[col] = df[col].astype("object") if col in df.columns else pd.Series(np.nan, index=df.index, dtype="object")
        out[col] = out[col].where(~_blank(out[col]), np.nan)
    # Current level-1 values in a canonical spelling (sources differ in case).
    canon = {v.lower(): v for v in SITE_LEVEL1}
    lvl1 = out["anatom_site_1"].astype("string").str.strip().str.lower().map(canon)
    unknown_current = out["anatom_site_1"].notna() & lvl1.isna()
    out["anatom_site_1"] = lvl1.astype("object").where(lvl1.notna(), out["anatom_site_1"])
    stats: dict[str, Any] = {"from_legacy": 0, "unmapped_legacy": {},
                             "unknown_current": int(unknown_current.sum())}
    if "anatom_site_general" not in df.columns:
        return out, stats
    legacy = df["anatom_site_general"].astype("string").str.strip().str.lower().str.replace("_", " ")
    has_current = out["anatom_site_1"].notna() | out["anatom_site_special"].notna()
    todo = ~has_current & legacy.notna() & ~legacy.isin(_MISSING_WORDS)
    mapped = legacy[todo].map(LEGACY_SITES)
    ok = mapped.notna()
    for i, col in enumerate(SITE_COLUMNS):
        vals = mapped[ok].map(lambda t, i=i: t[i])
        out.loc[vals.index, col] = vals.where(vals.notna(), np.nan).astype("object")
    stats["from_legacy"] = int(ok.sum())
    stats["unmapped_legacy"] = {str(k): int(v) for k, v in legacy[todo][~ok].value_counts().items()}
    return out, stats


def normalise_metadata(df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Age numeric, sex vocabulary, current anatomical-site columns; returns counts of what was changed/unmapped."""
    df = df.copy()
    age_src = df["age_approx"] if "age_approx" in df.columns else pd.Series(np.nan, index=df.index)
    sex_src = df["sex"] if "sex" in df.columns else pd.Series(np.nan, index=df.index, dtype="object")
    df["age_approx"], bad_age = normalise_age(age_src)
    df["sex"], bad_sex = normalise_sex(sex_src)
    sites, site_stats = normalise_sites(df)
    for col in SITE_COLUMNS:
        df[col] = sites[col]
    return df, {"age_garbage": bad_age, "sex_unmapped": bad_sex, "sites": site_stats}


# --------------------------------------------------------------------------- labels
def assign_labels(df: pd.DataFrame, indeterminate: str) -> pd.DataFrame:
    """label, label_column (which column decided it) and target (0/1, <NA> when the row must be dropped)."""
    cols = [c for c in LABEL_COLUMNS if c in df.columns]
    res = [label_of(r) for r in df[cols].to_dict("records")] if len(df) else []
    out = pd.DataFrame(res, columns=["label", "label_column"], index=df.index)
    out["target"] = pd.array([target_of(lab, indeterminate) for lab in out["label"]], dtype="Int64")  # type: ignore[arg-type]
    return out


# --------------------------------------------------------------------------- images
@dataclass(frozen=True)
class ImageCheck:
    """Outcome of reading one image: reason None means usable."""

    reason: str | None
    detail: str = ""
    width: int = 0
    height: int = 0


def check_image_bytes(data: bytes, min_side: int, expected: tuple[float, float] | None = None,
                      sha256: str | None = None, file_size: float | None = None,
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageCheck:
    """Decode check of one image's bytes: checksum, completeness, header size cap, damaged scan data,
    decodability, size (pure, no I/O). The pixel cap is checked on the header, before any pixel is decoded."""
    if not data:
        return ImageCheck("empty_file", "0 bytes")
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        return ImageCheck("checksum_mismatch", "content differs from the sha256 recorded at ingest")
    if not sha256 and file_size is not None and not np.isnan(file_size) and int(file_size) != len(data):
        return ImageCheck("checksum_mismatch", f"{len(data)} bytes, ingest recorded {int(file_size)}")
    cut = truncation(data)
    if cut:
        return ImageCheck("truncated", cut)
    # The stored raster is checked (EXIF orientation ignored): rotation would swap w/h against pixels_x/y.
    try:
        img = decode(data, max_pixels=max_pixels, min_side=min_side, apply_orientation=False)
    except ImageRejected as exc:
        size = probe_size(data) if exc.reason == "too_small" else None
        w, h = size if size else (0, 0)
        return ImageCheck(_REJECTED_AS[exc.reason], str(exc), w, h)
    h, w = img.shape[:2]
    if expected is not None:
        ex, ey = expected
        if not (np.isnan(ex) or np.isnan(ey)) and (int(ex), int(ey)) not in ((w, h), (h, w)):
            return ImageCheck("size_mismatch", f"decoded {w}x{h}, metadata says {int(ex)}x{int(ey)}", w, h)
    return ImageCheck(None, "", w, h)


def check_image_file(path: Path, min_side: int, expected: tuple[float, float] | None = None,
                     sha256: str | None = None, file_size: float | None = None,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageCheck:
    """Read and check one file; never raises (an unreadable file is a quarantine reason, not a crash)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ImageCheck("missing_file", f"{path} does not exist")
    except OSError as exc:
        return ImageCheck("unreadable", f"{path}: {exc.strerror or exc}")
    try:
        return check_image_bytes(data, min_side, expected, sha256, file_size, max_pixels)
    except Exception as exc:  # noqa: BLE001 - a decoder bug on one file must not stop the stage
        return ImageCheck("undecodable", f"{type(exc).__name__}: {exc}")


def _check_one(_ctx: None, job: tuple) -> ImageCheck:
    path, *rest = job
    return check_image_file(Path(path), *rest)


def check_images(df: pd.DataFrame, paths: Paths, cfg: Clean) -> pd.DataFrame:
    """Check every row's image in `cfg.workers` processes (JPEG decoding captures the process's stderr to see
    libjpeg's corruption warnings, so threads in one process would take turns); one row per input."""
    cols = {c: df[c] if c in df.columns else pd.Series(np.nan, index=df.index) for c in
            ("pixels_x", "pixels_y", "sha256", "file_size")}
    px = pd.to_numeric(cols["pixels_x"], errors="coerce")
    py = pd.to_numeric(cols["pixels_y"], errors="coerce")
    fs = pd.to_numeric(cols["file_size"], errors="coerce")
    sha = cols["sha256"].astype("string").str.strip().str.lower()
    max_pixels = cfg.max_pixels
    jobs = []
    for i, idx in enumerate(df.index):
        expected = (float(px.iloc[i]), float(py.iloc[i])) if cfg.check_declared_size else None
        digest = sha.iloc[i] if cfg.verify_checksum and pd.notna(sha.iloc[i]) and sha.iloc[i] else None
        size = float(fs.iloc[i]) if cfg.verify_checksum else None
        jobs.append((str(paths.abs(str(df.at[idx, "path"]))), cfg.min_side, expected, digest, size, max_pixels))
    results = parallel_map(_check_one, jobs, cfg.workers, desc="clean: decode") if jobs else []
    return pd.DataFrame(
        {"reason": [r.reason for r in results], "detail": [r.detail for r in results],
         "image_width": [r.width for r in results], "image_height": [r.height for r in results]},
        index=df.index,
    )


# --------------------------------------------------------------------------- the stage as pure functions
def linked_ids(df: pd.DataFrame, dropped_dups: pd.DataFrame) -> pd.Series:
    """Per kept row: 'col=value|...' ids carried only by rows dropped as its duplicates (same dup_group)."""
    out = pd.Series("", index=df.index, dtype="object")
    cols = [c for c in LINK_COLUMNS if c in dropped_dups.columns]
    if dropped_dups.empty or not cols:
        return out
    tokens: dict[str, set[str]] = {}
    for rec in dropped_dups[["dup_group", *cols]].to_dict("records"):
        for c in cols:
            v = rec[c]
            if v is not None and not (isinstance(v, float) and np.isnan(v)) and str(v).strip():
                tokens.setdefault(str(rec["dup_group"]), set()).add(f"{c}={str(v).strip()}")
    groups = df["dup_group"].astype(str)
    for idx, grp in groups[groups.isin(list(tokens))].items():  # only rows that lost a sibling
        own = {f"{c}={str(df.at[idx, c]).strip()}" for c in cols if c in df.columns and pd.notna(df.at[idx, c])}
        extra = tokens.get(grp, set()) - own
        if extra:
            out.at[idx] = "|".join(sorted(extra))
    return out


@dataclass
class CleanResult:
    """What clean decided: the kept index, every dropped row, the quarantined subset and report numbers."""

    index: pd.DataFrame
    dropped: pd.DataFrame
    quarantine: pd.DataFrame
    metrics: dict[str, Any]
    run_stats: dict[str, Any]


DROPPED_COLUMNS = ["source", "isic_id", "reason", "detail", "dup_group", "path"]


def _drop_rows(df: pd.DataFrame, mask: pd.Series, reason: str | pd.Series, detail: str | pd.Series) -> pd.DataFrame:
    part = df.loc[mask, ["source", "isic_id", "dup_group", "path"]].copy()
    part["reason"] = reason[mask] if isinstance(reason, pd.Series) else reason
    part["detail"] = detail[mask] if isinstance(detail, pd.Series) else detail
    return part[DROPPED_COLUMNS]


def clean_index(df: pd.DataFrame, paths: Paths, cfg: Clean) -> CleanResult:
    """The whole stage on a DataFrame: dedupe drops, labels, metadata, images; no files written."""
    t0 = time.perf_counter()
    check_input_schema(df)
    df = df.reset_index(drop=True)
    n_in = len(df)
    keep = df["keep"].astype(bool)
    dropped = [_drop_rows(df, ~keep, "duplicate",
                          df["dup_reason"].fillna("duplicate").astype(str) if "dup_reason" in df else "duplicate")]
    link = linked_ids(df.loc[keep], df.loc[~keep])
    work = df.loc[keep].copy()
    work["linked_ids"] = link

    labels = assign_labels(work, cfg.indeterminate)
    work = work.join(labels)
    no_target = work["target"].isna()
    why = np.where(work["label"].eq("indeterminate"), "indeterminate", "unlabeled")
    why_s = pd.Series(why, index=work.index)
    det = ("label from " + work["label_column"] + ": " + work["label"]).where(
        work["label_column"].ne(""), "no diagnosis_1 / benign_malignant / diagnosis / dx value")
    dropped.append(_drop_rows(work, no_target, why_s, det))
    work = work.loc[~no_target].copy()

    work, meta_stats = normalise_metadata(work)

    t_img = time.perf_counter()
    checks = check_images(work, paths, cfg)
    img_s = time.perf_counter() - t_img
    bad = checks["reason"].notna()
    quarantine = work.loc[bad, ["source", "isic_id", "path"]].copy()
    quarantine["reason"] = checks.loc[bad, "reason"]
    quarantine["detail"] = checks.loc[bad, "detail"]
    dropped.append(_drop_rows(work, bad, checks["reason"], checks["detail"]))
    work = work.join(checks[["image_width", "image_height"]])
    work = work.loc[~bad].copy()
    work["target"] = work["target"].astype("int64")
    work = work.sort_values(["source", "isic_id"], kind="stable").reset_index(drop=True)
    check_output_schema(work)

    dropped_df = pd.concat([d for d in dropped if len(d)] or [pd.DataFrame(columns=DROPPED_COLUMNS)],
                           ignore_index=True)
    dropped_df = dropped_df.sort_values(["source", "isic_id"], kind="stable").reset_index(drop=True)
    quarantine = quarantine.sort_values(["source", "isic_id"], kind="stable").reset_index(drop=True)
    metrics = clean_metrics(n_in, work, dropped_df, meta_stats)
    stats = {"images_checked": int(len(checks)), "image_check_s": round(img_s, 3),
             "images_per_s": round(len(checks) / img_s, 1) if img_s > 0 else None,
             "workers": min(cfg.workers, max(1, len(checks))), "total_s": round(time.perf_counter() - t0, 3)}
    return CleanResult(work, dropped_df, quarantine, metrics, stats)


def class_balance(index: pd.DataFrame) -> pd.DataFrame:
    """One row per source: benign, malignant, total, malignant_share (the table behind the plot)."""
    cols = ["source", "benign", "malignant", "total", "malignant_share"]
    if index.empty:
        return pd.DataFrame(columns=cols)
    tab = index.groupby(["source", "target"]).size().unstack(fill_value=0).reindex(columns=[0, 1], fill_value=0)
    out = pd.DataFrame({"source": tab.index.astype(str), "benign": tab[0].to_numpy(), "malignant": tab[1].to_numpy()})
    out["total"] = out["benign"] + out["malignant"]
    out["malignant_share"] = (out["malignant"] / out["total"]).round(4)
    return out[cols].reset_index(drop=True)


def clean_metrics(n_in: int, index: pd.DataFrame, dropped: pd.DataFrame, meta_stats: dict[str, Any]) -> dict[str, Any]:
    """Rows in/out, dropped by reason (and dedupe's own reasons), class balance per source."""
    per_source = {r["source"]: {"benign": int(r["benign"]), "malignant": int(r["malignant"]),
                                "malignant_share": float(r["malignant_share"])}
                  for r in class_balance(index).to_dict("records")}
    dups = dropped.loc[dropped["reason"].eq("duplicate"), "detail"].value_counts()
    return {
        "rows_in": int(n_in),
        "rows_out": int(len(index)),
        "dropped": int(len(dropped)),
        "dropped_by_reason": {str(k): int(v) for k, v in dropped["reason"].value_counts().sort_index().items()},
        "duplicate_reasons": {str(k): int(v) for k, v in dups.sort_index().items()},
        "quarantined": int(dropped["reason"].isin(QUARANTINE_REASONS).sum()),
        "classes": {"benign": int((index["target"] == 0).sum()), "malignant": int((index["target"] == 1).sum()),
                    "malignant_share": round(float(index["target"].mean()), 4) if len(index) else 0.0},
        "class_balance_per_source": per_source,
        "label_columns": {str(k): int(v) for k, v in index["label_column"].value_counts().sort_index().items()},
        "rows_with_linked_ids": int(index["linked_ids"].ne("").sum()),
        "metadata": meta_stats,
    }


def plot_class_balance(bal: pd.DataFrame, out: Path) -> None:
    """Stacked benign/malignant bars per source (PNG, Agg canvas: no display, no pyplot global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sources = bal["source"].tolist()
    fig = Figure(figsize=(max(4.0, 1.2 * len(sources) + 2), 3.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if sources:
        ben, mal = bal["benign"].astype(int).tolist(), bal["malignant"].astype(int).tolist()
        x = np.arange(len(sources))
        ax.bar(x, ben, label="benign (0)", color="#7aa6c2")
        ax.bar(x, mal, bottom=ben, label="malignant (1)", color="#c0504d")
        for xi, b, m in zip(x, ben, mal, strict=True):
            ax.text(xi, b + m, f"{m / (b + m):.0%} mal." if b + m else "", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, sources, rotation=20, ha="right")
        # headroom for the legend and labels
        ax.set_ylim(0, max(b + m for b, m in zip(ben, mal, strict=True)) * 1.25 or 1)
        ax.legend(fontsize=8, loc="upper right", ncols=2)
    else:
        ax.text(0.5, 0.5, "no rows kept", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("images kept")
    ax.set_title("clean: class balance per source")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")


# --------------------------------------------------------------------------- I/O
def run(params: Params, paths: Paths) -> dict[str, Any]:
    """Read data/dedupe/index.parquet, write data/clean/{index.parquet,dropped.csv,quarantine.csv} + reports/clean/."""
    cfg = params.clean
    df = read_index(paths, INPUT_STAGE)
    res = clean_index(df, paths, cfg)
    out = paths.stage(STAGE)
    write_index(res.index, paths, STAGE)
    write_table(res.dropped, out / "dropped.csv")
    write_table(res.quarantine, out / "quarantine.csv")
    rep = paths.reports / STAGE
    bal = class_balance(res.index)
    write_table(bal, rep / "class_balance.csv")
    plot_class_balance(bal, rep / "class_balance.png")
    write_json(rep / "metrics.json", res.metrics)
    write_run_stats(paths, STAGE, res.run_stats)
    m = res.metrics
    log.info("clean: %d rows in, %d out, dropped %s", m["rows_in"], m["rows_out"], m["dropped_by_reason"])
    return {"rows_in": m["rows_in"], "rows_out": m["rows_out"], "dropped_by_reason": m["dropped_by_reason"],
            "malignant": m["classes"]["malignant"], "benign": m["classes"]["benign"],
            "outputs": [paths.rel(paths.index(STAGE)), paths.rel(out / "dropped.csv"),
                        paths.rel(out / "quarantine.csv"), paths.rel(rep / "metrics.json")]}
