"""dedupe stage: exact and near-duplicate photos across sources, a keep-policy, and the duplicate groups.

The similarity engine (features, pHash candidate search, pixel verification) is `tasks.core.neardup`; this
module adds what is specific to the stage (pure functions first, `run()` last):
1. content sha256 per row and features per distinct content, cached under `.cache/lesionflow/dedupe/`;
2. candidates: same bytes, same decoded pixels, same `isic_id` in two sources, and pHash neighbours within
   `phash_max_distance`; every non-exact candidate is verified on pixels;
3. union-find of the accepted pairs, keep-policy per group, label-conflict groups dropped entirely.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.core.config import Dedupe, Params
from tasks.core.errors import InputError, RunError
from tasks.core.images import DEFAULT_MAX_PIXELS
from tasks.core.io import (
    KEY,
    Paths,
    read_index,
    sha256_file,
    write_index,
    write_json,
    write_run_stats,
    write_table,
)
from tasks.core.labels import label_of
from tasks.core.neardup import (
    FeatureCache,
    Features,
    VerdictCache,
    components,
    compute_features,
    hamming,
    near_pairs,
    star_edges,
    verify_cached,
)

log = logging.getLogger(__name__)

STAGE = "dedupe"
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")

OUTPUT_COLUMNS = ["dup_group", "keep", "dup_reason", "dup_kind", "dup_size", "content_sha256", "phash",
                  "decoded_x", "decoded_y", "readable"]


# --------------------------------------------------------------------------- grouping and keep policy (pure)
def license_rank(value: Any) -> int:
    """0 = CC-0 (public domain) < 1 = CC-BY < 2 = CC-BY-NC < 3 = anything else or unknown."""
    s = re.sub(r"[^a-z0-9]", "", str(value or "").lower())
    if s.startswith("cc0") or s in ("publicdomain", "pd"):
        return 0
    if s.startswith("ccbync"):
        return 2
    if s.startswith("ccby") and "nd" not in s[4:6]:
        return 1
    return 3


def _license_col(df: pd.DataFrame) -> pd.Series:
    """The licence per row: `copyright_license` (ISIC API), else a local CSV's own `license` column."""
    out = pd.Series([None] * len(df), index=df.index, dtype=object)
    for col in ("copyright_license", "license"):
        if col in df:
            vals = df[col].where(df[col].notna() & (df[col].astype(str).str.strip() != ""))
            out = out.where(out.notna(), vals)
    return out


def _pixels(df: pd.DataFrame) -> pd.Series:
    """Pixel count from the decoded size, falling back on the declared pixels_x/pixels_y."""
    dec = df["decoded_x"].astype("float64") * df["decoded_y"].astype("float64")
    if "pixels_x" in df and "pixels_y" in df:
        decl = pd.to_numeric(df["pixels_x"], errors="coerce") * pd.to_numeric(df["pixels_y"], errors="coerce")
        dec = dec.where(dec > 0, decl)
    return dec.fillna(0)


def rank_members(df: pd.DataFrame, policy: Sequence[str]) -> pd.DataFrame:
    """Sort key columns, best first: readable, then the policy criteria in order, then (source, isic_id)."""
    keys = pd.DataFrame(index=df.index)
    keys["_unreadable"] = ~df["readable"].astype(bool)
    for crit in policy:
        if crit == "labelled":
            keys["_unlabelled"] = df["label"].eq("unknown")
        elif crit == "larger":
            keys["_neg_pixels"] = -_pixels(df)
        elif crit == "license":
            keys["_license"] = _license_col(df).map(license_rank)
        else:  # config validation should have caught it; fail loudly rather than ignore a policy
            raise InputError(f"params dedupe.keep_policy: unknown criterion {crit!r}; use labelled, larger, license")
    keys["_source"] = df["source"].astype(str)
    keys["_isic_id"] = df["isic_id"].astype(str)
    return keys


def _conflict(labels: Iterable[str]) -> bool:
    """Malignant and benign in one group; indeterminate and unknown conflict with nothing."""
    s = set(labels)
    return "malignant" in s and "benign" in s


def assign_groups(df: pd.DataFrame, edges: pd.DataFrame, policy: Sequence[str]) -> pd.DataFrame:
    """Add dup_group, dup_size, keep, dup_reason, dup_kind to `df` (positions 0..n-1).

    `edges` holds accepted pairs (i, j, kind) with kind 'exact' or 'near'. `df` must already carry the
    columns label, readable, read_error, decoded_x, decoded_y, content_sha256, pixhash."""
    df = df.reset_index(drop=True).copy()
    n = len(df)
    comp = components(n, edges["i"].to_numpy(), edges["j"].to_numpy())
    src, iid = df["source"].astype(str).to_numpy(), df["isic_id"].astype(str).to_numpy()
    # Stable group id: the smallest (isic_id, source) of the members; re-issued ids are the larger ones, so
    # the group keeps its id when a re-issue or another source's copy joins it.
    order = np.lexsort((src, iid))
    first = pd.Series(order, index=comp[order]).groupby(level=0).first()  # comp -> row with the smallest key
    df["dup_group"] = [f"{iid[r]}@{src[r]}" for r in first.reindex(comp).to_numpy()]
    size = np.bincount(comp, minlength=comp.max() + 1 if n else 0)[comp] if n else np.zeros(0, int)
    df["dup_size"] = size.astype(int)

    keys = rank_members(df, policy)
    ranked = keys.sort_values(list(keys.columns), kind="stable").index.to_numpy()
    best = pd.Series(ranked, index=comp[ranked]).groupby(level=0).first().reindex(comp).to_numpy()
    labels_by_comp = df.groupby(comp)["label"].agg(lambda s: sorted(set(s)))
    conflict_labels = labels_by_comp[labels_by_comp.map(_conflict)]
    in_conflict = np.isin(comp, conflict_labels.index.to_numpy())
    near_comps = np.unique(comp[edges.loc[edges["kind"] == "near", "i"].to_numpy()]) if len(edges) else []
    readable = df["readable"].to_numpy(bool)

    kind = np.where(size == 1, np.where(readable, "unique", "unreadable"),
                    np.where(np.isin(comp, near_comps), "near", "exact")).astype(object)
    keep = (size == 1) | ((np.arange(n) == best) & ~in_conflict)
    sha, pix = df["content_sha256"].to_numpy(), df["pixhash"].to_numpy()
    identical = (sha == sha[best]) | ((pix == pix[best]) & (pix != ""))
    reason = np.empty(n, object)
    for r in range(n):
        if size[r] == 1:
            reason[r] = "unique" if readable[r] else f"unreadable: {df['read_error'].iat[r]}"
        elif in_conflict[r]:
            reason[r] = f"label conflict in group ({' vs '.join(conflict_labels[comp[r]])})"
        elif keep[r]:
            reason[r] = f"kept: best of {size[r]} by {' > '.join(policy) or 'key'}"
        else:
            b = best[r]
            what = "exact duplicate" if identical[r] else "near duplicate"
            reason[r] = f"{what} of {src[b]}:{iid[b]}"
    df["keep"] = keep.astype(bool)
    df["dup_reason"] = reason.astype(str)
    df["dup_kind"] = kind.astype(str)
    return df


# --------------------------------------------------------------------------- the table-level stage (pure)
@dataclass
class DedupeResult:
    index: pd.DataFrame  # input rows + OUTPUT_COLUMNS
    pairs: pd.DataFrame  # every exact pair and every verified candidate, with scores and verdict
    groups: pd.DataFrame  # one row per group with > 1 member
    metrics: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    verify_stats: dict[str, int] = field(default_factory=dict)  # verified_new, verdict_cache_hits


PAIR_COLUMNS = ["a", "b", "kind", "why", "hamming", "corr", "detail", "aligned", "accepted", "group"]


def dedupe_table(index: pd.DataFrame, feats: Features, sha_per_row: Sequence[str], cfg: Dedupe,
                 verdicts: VerdictCache | None = None) -> DedupeResult:
    """Dedupe an index table given features per content hash (`sha_per_row[r]` names row r's content).

    With `verdicts`, a candidate pair whose two contents were verified before (same params, same code) takes
    the cached verdict; the result is the same as without it."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    df = index.reset_index(drop=True).copy()
    n = len(df)
    pos = pd.Series(np.arange(len(feats)), index=feats.sha)
    fi = pos.reindex(np.asarray(sha_per_row, dtype=str)).to_numpy()
    if np.isnan(fi.astype(float)).any():
        raise RunError(f"dedupe: features missing for {int(np.isnan(fi.astype(float)).sum())} row(s) "
                       "(a bug: every row's content must have been hashed)")
    fi = fi.astype(np.int64)
    ok = feats.ok[fi]
    df["content_sha256"] = np.asarray(sha_per_row, dtype=object)
    df["pixhash"] = np.where(ok, feats.pixhash[fi], "")
    df["phash"] = [("".join(f"{int(w):016x}" for w in h) if o else "")
                   for h, o in zip(feats.phash[fi], ok, strict=True)]
    df["decoded_x"] = np.where(ok, feats.width[fi], 0).astype(int)
    df["decoded_y"] = np.where(ok, feats.height[fi], 0).astype(int)
    df["readable"] = ok
    df["read_error"] = np.where(ok, "", feats.error[fi].astype(str))
    df["label"] = [label_of(rec)[0] for rec in df.to_dict("records")]

    # 1) exact: same bytes, or the same decoded pixels (re-saved with other metadata / encoder settings).
    ei1, ej1 = star_edges(df["content_sha256"].to_numpy())
    ei2, ej2 = star_edges(df["pixhash"].to_numpy(), ok)
    exact = pd.DataFrame({"i": np.concatenate([ei1, ei2]), "j": np.concatenate([ej1, ej2]),
                          "why": ["same bytes"] * len(ei1) + ["same pixels"] * len(ei2)})
    exact = exact.drop_duplicates(["i", "j"]).reset_index(drop=True)
    exact_comp = components(n, exact["i"].to_numpy(), exact["j"].to_numpy())
    timings["exact_s"] = time.perf_counter() - t0

    # 2) near candidates among one representative per exact component (its members share the pixels).
    t1 = time.perf_counter()
    readable_rows = np.nonzero(ok)[0]
    reps = pd.Series(readable_rows).groupby(exact_comp[readable_rows]).first().to_numpy()
    found = near_pairs(feats.phash[fi[reps]], cfg.phash_max_distance, recall=cfg.search_recall, seed=cfg.seed,
                       brute_force_max=cfg.brute_force_max)
    cand = pd.DataFrame({"i": reps[found["i"].to_numpy()], "j": reps[found["j"].to_numpy()], "why": "phash"})
    # Same isic_id from two sources is always a candidate (ISIC re-serves ids), but still checked on pixels.
    rep_of_comp = pd.Series(reps, index=exact_comp[reps])
    rep_row = np.full(n, -1, np.int64)
    rep_row[readable_rows] = rep_of_comp.reindex(exact_comp[readable_rows]).to_numpy()
    ids = df["isic_id"].astype(str).to_numpy()
    si, sj = star_edges(ids, ok)
    si, sj = rep_row[si], rep_row[sj]
    keep_same = si != sj
    same = pd.DataFrame({"i": np.minimum(si, sj)[keep_same], "j": np.maximum(si, sj)[keep_same],
                         "why": "same isic_id"})
    cand = pd.concat([cand, same], ignore_index=True)
    cand = (cand.groupby(["i", "j"], as_index=False, sort=True)["why"]
            .agg(lambda w: "+".join(sorted(set(w)))))
    cand["hamming"] = hamming(feats.phash[fi[cand["i"].to_numpy()]], feats.phash[fi[cand["j"].to_numpy()]])
    timings["search_s"] = time.perf_counter() - t1

    # 3) verification on pixels (thumbnails).
    t2 = time.perf_counter()
    ver, verify_stats = verify_cached(
        feats.thumb, feats.sha, cand.assign(i=fi[cand["i"].to_numpy()], j=fi[cand["j"].to_numpy()]),
        cfg.verify_corr_min, cfg.verify_detail_min, cfg.workers, verdicts)
    ver[["i", "j"]] = cand[["i", "j"]].to_numpy()
    timings["verify_s"] = time.perf_counter() - t2

    # 4) groups and keep policy.
    t3 = time.perf_counter()
    acc = ver[ver["accepted"]]
    edges = pd.concat([exact.assign(kind="exact")[["i", "j", "kind"]], acc.assign(kind="near")[["i", "j", "kind"]]],
                      ignore_index=True)
    out = assign_groups(df, edges, list(cfg.keep_policy))
    timings["group_s"] = time.perf_counter() - t3

    pairs = pd.concat([exact.assign(kind="exact", hamming=0, corr=1.0, detail=1.0, aligned=False, accepted=True),
                       ver.assign(kind="near")], ignore_index=True)
    keyname = df["source"].astype(str).to_numpy() + ":" + ids
    pi, pj = pairs["i"].to_numpy(np.int64), pairs["j"].to_numpy(np.int64)
    pairs = pairs.assign(a=keyname[pi], b=keyname[pj], group=out["dup_group"].to_numpy()[pi])[PAIR_COLUMNS]
    groups = summarize_groups(out, pairs)
    metrics = dedupe_metrics(out, pairs, groups)
    timings["total_s"] = time.perf_counter() - t0
    result_cols = list(index.columns) + [c for c in OUTPUT_COLUMNS if c not in index.columns]
    return DedupeResult(out[result_cols], pairs, groups, metrics, timings, verify_stats)


def summarize_groups(out: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """One row per duplicate group (> 1 member): members, kept one, kind, conflict, score range.

    Whole-table group-bys, no loop over groups: at 10^4 images with a copy or three per photo there are
    thousands of groups, and a per-group pandas loop cost more than the rest of the stage together."""
    multi = out[out["dup_size"] > 1]
    cols = ["group", "size", "kind", "members", "kept", "labels", "conflict", "min_corr", "min_detail",
            "max_hamming"]
    if multi.empty:
        return pd.DataFrame(columns=cols)
    frame = pd.DataFrame({
        "group": multi["dup_group"].astype(str).to_numpy(object),
        "key": (multi["source"].astype(str) + ":" + multi["isic_id"].astype(str)).to_numpy(object),
        "keep": multi["keep"].to_numpy(bool),
        "label": multi["label"].astype(str).to_numpy(object),
        "kind": multi["dup_kind"].astype(str).to_numpy(object),
    })
    by = frame.groupby("group", sort=True)
    members = frame.sort_values(["group", "key"], kind="stable").groupby("group", sort=True)["key"].agg(";".join)
    kept = frame[frame["keep"]].groupby("group", sort=True)["key"].agg(";".join)  # row order, as kept
    label_sets = (frame.drop_duplicates(["group", "label"]).sort_values(["group", "label"], kind="stable")
                  .groupby("group", sort=True)["label"].agg(list))
    groups = pd.DataFrame({"size": by.size().astype(int), "kind": by["kind"].first(), "members": members,
                           "kept": kept.reindex(members.index, fill_value=""),
                           "labels": label_sets.map(";".join), "conflict": label_sets.map(_conflict).astype(bool)})
    groups.index.name = "group"
    acc = pairs[pairs["accepted"]]
    score = acc.groupby("group").agg(min_corr=("corr", "min"), min_detail=("detail", "min"),
                                     max_hamming=("hamming", "max"))
    groups = groups.join(score).reset_index()
    return groups[cols]


def dedupe_metrics(out: pd.DataFrame, pairs: pd.DataFrame, groups: pd.DataFrame) -> dict[str, Any]:
    """Numbers for DVC metrics: images, groups, pairs by kind, kept / dropped by reason, conflicts."""
    dropped = out[~out["keep"]]
    reason = dropped["dup_reason"].str.extract(r"^(exact duplicate|near duplicate|label conflict)")[0]
    acc = pairs[pairs["accepted"]]
    return {
        "images": int(len(out)),
        "unreadable": int((~out["readable"]).sum()),
        "groups": int(len(groups)),
        "images_in_groups": int(groups["size"].sum()) if len(groups) else 0,
        "largest_group": int(groups["size"].max()) if len(groups) else 1,
        "exact_pairs": int((acc["kind"] == "exact").sum()),
        "near_pairs": int((acc["kind"] == "near").sum()),
        "same_id_pairs": int(acc["why"].str.contains("same isic_id").sum()),
        "candidates_verified": int((pairs["kind"] == "near").sum()),
        "candidates_rejected": int((~pairs["accepted"]).sum()),
        "same_id_rejected": int((~pairs["accepted"] & pairs["why"].str.contains("same isic_id")).sum()),
        "kept": int(out["keep"].sum()),
        "dropped": int(len(dropped)),
        "dropped_by_reason": {k: int(v) for k, v in reason.fillna("other").value_counts().sort_index().items()},
        "conflict_groups": int(groups["conflict"].sum()) if len(groups) else 0,
        "distinct_photos": int(out["dup_group"].nunique()),
    }


# --------------------------------------------------------------------------- I/O: content hashes, cache, run
def _missing_sha(path: Path) -> str:
    """A stable stand-in content key for a file that cannot be read (it still needs a features row)."""
    return "missing-" + hashlib.sha256(str(path).encode()).hexdigest()[:56]


def content_hashes(index: pd.DataFrame, paths: Paths, trust_ingest: bool, workers: int) -> list[str]:
    """sha256 per row: ingest's `sha256` column when trusted and well-formed, else computed from the file."""
    files = [paths.abs(p) for p in index["path"].astype(str)]
    given = [""] * len(files)
    if "sha256" in index and trust_ingest:
        given = index["sha256"].astype(str).str.lower().tolist()

    def one(k: int) -> str:
        if _SHA_RE.match(given[k] or "") and files[k].is_file():
            return given[k]
        try:
            return sha256_file(files[k])
        except OSError:
            return _missing_sha(files[k])

    spans = [range(k, min(k + 256, len(files))) for k in range(0, len(files), 256)]  # not one future per row
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # hashlib releases the GIL
        return [sha for part in pool.map(lambda r: [one(k) for k in r], spans) for sha in part]


def _cacheable(feats: Features) -> np.ndarray:
    """Rows worth caching: a missing file is not content (it may appear by the next run), and a file refused
    for its header size must be looked at again if the pixel cap is raised."""
    return np.array([not s.startswith("missing-") and not e.startswith("too_large")
                     for s, e in zip(feats.sha, feats.error, strict=True)], bool)


def features_for(index: pd.DataFrame, shas: list[str], paths: Paths, cfg: Dedupe,
                 cache: FeatureCache | None) -> tuple[Features, dict[str, int]]:
    """Features for every distinct content of the index: cached ones loaded, the rest computed and cached."""
    cached = cache.load() if cache is not None else Features.empty(cfg.thumb_size)
    have = set(cached.sha.tolist())
    todo: dict[str, str] = {}
    for sha, p in zip(shas, index["path"].astype(str), strict=True):
        if sha not in have and sha not in todo:
            todo[sha] = str(paths.abs(p))
    new = compute_features(list(todo.items()), cfg.thumb_size, cfg.workers,
                           max_pixels=DEFAULT_MAX_PIXELS)
    if cache is not None:
        cache.add(new.take(np.nonzero(_cacheable(new))[0]))
    needed = set(shas)
    keep_cached = np.array([s in needed for s in cached.sha], bool)
    feats = Features.concat([cached.take(np.nonzero(keep_cached)[0]), new], cfg.thumb_size)
    stats = {"distinct_contents": len(needed), "hashed_new": len(new), "cache_hits": int(keep_cached.sum())}
    return feats, stats


def run(params: Params, paths: Paths) -> dict[str, Any]:
    """Read data/ingest/index.parquet; write data/dedupe/{index.parquet,groups.csv,pairs.csv} and
    reports/dedupe/{metrics.json (results), summary.json (results), run_stats.json (timings, cache)}."""
    cfg = params.dedupe
    t0 = time.perf_counter()
    index = read_index(paths, "ingest")
    missing = [c for c in [*KEY, "path"] if c not in index.columns]
    if missing:
        raise InputError(f"{paths.index('ingest')}: missing column(s) {missing} (has {list(index.columns)}); "
                         "rerun `lesionflow stage ingest`")
    shas = content_hashes(index, paths, cfg.trust_ingest_sha256, cfg.workers)
    t_sha = time.perf_counter() - t0
    t1 = time.perf_counter()
    feats, cache_stats = features_for(index, shas, paths, cfg, FeatureCache(paths.cache / STAGE, cfg.thumb_size))
    t_feat = time.perf_counter() - t1
    verdicts = VerdictCache(paths.cache / STAGE, cfg.verify_corr_min, cfg.verify_detail_min, cfg.thumb_size)
    res = dedupe_table(index, feats, shas, cfg, verdicts)
    cache_stats = {**cache_stats, **res.verify_stats}

    out_dir = paths.stage(STAGE)
    write_index(res.index, paths, STAGE)
    write_table(res.groups, out_dir / "groups.csv")
    write_table(res.pairs, out_dir / "pairs.csv")
    rep = paths.reports / STAGE
    metrics = res.metrics
    write_json(rep / "metrics.json", metrics)
    summary = {
        "metrics": metrics,
        "params": cfg.model_dump(mode="json"),
        "conflicts": res.groups.loc[res.groups["conflict"].astype(bool), ["group", "members", "labels"]]
        .to_dict("records") if len(res.groups) else [],
        "same_id_rejected": res.pairs.loc[~res.pairs["accepted"] & res.pairs["why"].str.contains("same isic_id"),
                                          ["a", "b", "corr", "detail"]].to_dict("records"),
        "outputs": [paths.rel(paths.index(STAGE)), paths.rel(out_dir / "groups.csv"),
                    paths.rel(out_dir / "pairs.csv")],
    }
    write_json(rep / "summary.json", summary)
    timings = {"content_sha_s": t_sha, "features_s": t_feat, **res.timings, "stage_s": time.perf_counter() - t0}
    write_run_stats(paths, STAGE, {"cache": cache_stats, "workers": cfg.workers,
                                   "timings_s": {k: round(v, 3) for k, v in timings.items()}})
    log.info("dedupe: %d images, %d groups, %d dropped, %d hashed (%d cached), %d pairs verified (%d cached) "
             "in %.1f s", metrics["images"], metrics["groups"], metrics["dropped"], cache_stats["hashed_new"],
             cache_stats["cache_hits"], cache_stats["verified_new"], cache_stats["verdict_cache_hits"],
             timings["stage_s"])
    return {"images": metrics["images"], "groups": metrics["groups"], "kept": metrics["kept"],
            "dropped": metrics["dropped"], "conflict_groups": metrics["conflict_groups"],
            "unreadable": metrics["unreadable"], "hashed_new": cache_stats["hashed_new"],
            "seconds": round(timings["stage_s"], 2)}
