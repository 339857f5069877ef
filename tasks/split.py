"""split: stable, grouped train/val/test assignment; a group's split is a pure function of its id and the seed."""

from __future__ import annotations

import difflib
import hashlib
import logging
import re
from typing import Any

import numpy as np
import pandas as pd

from tasks.core.config import Params, Split
from tasks.core.errors import InputError
from tasks.core.io import Paths, read_index, write_index, write_json, write_table

log = logging.getLogger(__name__)

STAGE = "split"
INPUT_STAGE = "clean"
SPLITS = ("train", "val", "test")
REQUIRED = ["source", "isic_id", "target"]
# Grouping columns the pipeline itself knows: ingest/clean carry patient_id and lesion_id, dedupe adds
# dup_group, and some sources ship their own split unit `group_id`. A group_by name outside this set must be
# a column of the clean index (a typo such as `patient_ID` would otherwise silently disable grouping).
KNOWN_GROUP_COLUMNS = ("patient_id", "lesion_id", "dup_group", "group_id")
# The sources' own grouping columns: always leak-checked, whatever group_by says (the input's group_id is
# renamed source_group_id in the output).
SOURCE_GROUP_COLUMNS = ("patient_id", "lesion_id", "source_group_id")


class SplitError(InputError):
    """The clean index cannot be split (missing columns, bad targets) or the result leaks a group."""


# --------------------------------------------------------------------------- grouping
def _value_keys(s: pd.Series, col: str) -> pd.Series:
    """'col\\x1fvalue' per row (NaN when missing): values only join within their own column's namespace."""
    text = s.astype("string").str.strip()
    return (col + "\x1f" + text).where(text.notna() & text.ne(""))


def _link_pairs(linked: pd.Series, cols: set[str]) -> tuple[list[int], list[str]]:
    """(row position, key) pairs from clean's `linked_ids` ('patient_id=IP_1|lesion_id=IL_2')."""
    rows: list[int] = []
    keys: list[str] = []
    for pos, text in enumerate(linked.fillna("").astype(str)):
        for tok in filter(None, text.split("|")):
            col, _, val = tok.partition("=")
            if col in cols and val.strip():
                rows.append(pos)
                keys.append(f"{col}\x1f{val.strip()}")
    return rows, keys


def _has_column(df: pd.DataFrame, col: str) -> bool:
    """Is `col` a column of the input (directly, or as a `linked_ids` token carried from a dropped duplicate)?"""
    if col in df.columns:
        return True
    if "linked_ids" in df.columns:
        tokens = df["linked_ids"].fillna("").astype(str)
        return bool(tokens.str.contains(f"(?:^|\\|){re.escape(col)}=", regex=True).any())
    return False


def check_group_by(df: pd.DataFrame, group_by: list[str], where: str = "data/clean/index.parquet") -> None:
    """InputError naming every split.group_by column that no source has (and the columns there are).

    A pipeline-known name (KNOWN_GROUP_COLUMNS) may be absent (e.g. `group_id` when no source ships one)."""
    missing = [c for c in group_by if c not in KNOWN_GROUP_COLUMNS and not _has_column(df, c)]
    if not missing:
        return
    hints = []
    for c in missing:
        close = difflib.get_close_matches(c, list(df.columns), n=1, cutoff=0.6) or \
            difflib.get_close_matches(c.lower(), [x.lower() for x in df.columns], n=1, cutoff=0.6)
        if close:
            hints.append(f"{c!r} -> {close[0]!r}?")
    raise SplitError(
        f"params split.group_by names column(s) {missing} that no source has in {where}, so they could not "
        f"group anything and a patient/lesion could leak across splits. Available columns: "
        f"{sorted(map(str, df.columns))}." + (f" Did you mean: {', '.join(hints)}" if hints else "")
        + " Fix split.group_by in params.yaml.")


def connected_groups(df: pd.DataFrame, group_by: list[str]) -> np.ndarray:
    """Component number per row: union-find over rows sharing isic_id or any value of a group_by column."""
    n = len(df)
    cols = ["isic_id"] + [c for c in group_by if c in df.columns and c != "isic_id"]
    row_parts, key_parts = [], []
    for c in cols:
        k = _value_keys(df[c], c)
        ok = k.notna().to_numpy()
        row_parts.append(np.flatnonzero(ok))
        key_parts.append(k.to_numpy()[ok].astype(str))
    if "linked_ids" in df.columns:
        lr, lk = _link_pairs(df["linked_ids"], set(group_by))
        row_parts.append(np.asarray(lr, dtype=np.int64))
        key_parts.append(np.asarray(lk, dtype=str))
    rows = np.concatenate(row_parts) if row_parts else np.empty(0, np.int64)
    keys = np.concatenate(key_parts) if key_parts else np.empty(0, str)
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]  # path halving keeps trees shallow
            a = parent[a]
        return a

    if len(rows):
        codes, _ = pd.factorize(keys)
        order = np.lexsort((rows, codes))
        c_sorted, r_sorted = codes[order], rows[order]
        same = c_sorted[1:] == c_sorted[:-1]  # consecutive rows sharing a key value get unioned
        for a, b in zip(r_sorted[:-1][same].tolist(), r_sorted[1:][same].tolist(), strict=True):
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    roots = np.fromiter((find(i) for i in range(n)), dtype=np.int64, count=n)
    return pd.factorize(roots)[0]


def group_keys(df: pd.DataFrame, components: np.ndarray) -> pd.Series:
    """group_id = the smallest isic_id in the component.

    isic_ids never change and the archive assigns them in upload order, so a new image joining a group
    (a new photo of a known patient/lesion) almost always has a larger id and leaves the key, hence the
    split, unchanged. Caveats (README): a late arrival with a smaller id, or a merge of
    two old groups, re-keys the group, and the merged group takes the split of its smallest id.
    """
    ids = pd.Series(df["isic_id"].astype(str).to_numpy())
    return ids.groupby(components).transform("min").set_axis(df.index)


# --------------------------------------------------------------------------- assignment
def unit_hash(key: str, seed: int) -> float:
    """Uniform in [0, 1) from sha256(f"{seed}:{key}"): stable across runs, machines and Python versions."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2.0**64


def split_of(u: float, cfg: Split) -> str:
    """Thresholds laid out test | val | train on [0, 1): test membership depends on `test` alone."""
    if u < cfg.test:
        return "test"
    if u < cfg.test + cfg.val:
        return "val"
    return "train"


def assign_splits(df: pd.DataFrame, cfg: Split) -> pd.DataFrame:
    """Input + group_id + split (the input's own group_id, if any, is kept as source_group_id)."""
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise SplitError(f"data/clean/index.parquet: missing column(s) {missing}; rerun `lesionflow stage clean`")
    bad = ~df["target"].isin([0, 1])
    if bad.any():
        rows = df.loc[bad, ["source", "isic_id", "target"]].head(5).to_dict("records")
        raise SplitError(f"data/clean/index.parquet: column 'target' must be 0/1; {int(bad.sum())} row(s) are not, "
                         f"e.g. {rows}")
    check_group_by(df, list(cfg.group_by))
    out = df.reset_index(drop=True).copy()
    comp = connected_groups(out, cfg.group_by)
    if "group_id" in out.columns:
        out = out.rename(columns={"group_id": "source_group_id"})
    out["group_id"] = group_keys(out, comp) if len(out) else pd.Series(dtype="object")
    per_group = {g: split_of(unit_hash(g, cfg.seed), cfg) for g in out["group_id"].unique()}
    out["split"] = out["group_id"].map(per_group).astype("object")
    return out


def leaks(df: pd.DataFrame, cols: list[str]) -> dict[str, int]:
    """Per column: how many of its values occur in more than one split (must be 0 for every grouping column)."""
    res = {}
    for c in cols:
        if c not in df.columns:
            continue
        v = df[c].astype("string").str.strip()
        ok = v.notna() & v.ne("")
        res[c] = int((df.loc[ok].groupby(v[ok])["split"].nunique() > 1).sum())
    return res


def leak_columns(df: pd.DataFrame, group_by: list[str]) -> list[str]:
    """Columns whose values must each stay in one split: isic_id, the group_by columns, and the sources' own
    grouping columns whatever group_by says (group_id is the output's key, checked apart)."""
    cols = ["isic_id", *(c for c in group_by if c != "group_id")]
    if "group_id" in group_by:
        cols.append("source_group_id")
    cols += [c for c in SOURCE_GROUP_COLUMNS if c in df.columns]
    return [c for c in dict.fromkeys(cols) if c in df.columns]


# --------------------------------------------------------------------------- report
def _present(out: pd.DataFrame, col: str) -> bool:
    """Was a group_by column in the input? (the input's group_id is renamed source_group_id in the output)"""
    return "source_group_id" in out.columns if col == "group_id" else col in out.columns


def split_metrics(df: pd.DataFrame, cfg: Split) -> dict[str, Any]:
    """Counts per split x class x source, group counts, achieved malignant share, leak check, test hash."""
    overall = float(df["target"].mean()) if len(df) else 0.0
    per_split: dict[str, Any] = {}
    for s in SPLITS:
        g = df[df["split"] == s]
        share = float(g["target"].mean()) if len(g) else 0.0
        per_split[s] = {"rows": int(len(g)), "groups": int(g["group_id"].nunique()),
                        "row_fraction": round(len(g) / len(df), 4) if len(df) else 0.0,
                        "target_fraction": getattr(cfg, s),
                        "malignant": int(g["target"].sum()), "benign": int((g["target"] == 0).sum()),
                        "malignant_share": round(share, 4)}
    by_source: dict[str, Any] = {s: {} for s in SPLITS}
    for (s, src), g in df.groupby(["split", "source"]):
        by_source[str(s)][str(src)] = {"malignant": int(g["target"].sum()), "benign": int((g["target"] == 0).sum())}
    sizes = df.groupby("group_id").size() if len(df) else pd.Series(dtype=int)
    linked_cols = leak_columns(df, cfg.group_by)
    test = df[df["split"] == "test"].sort_values(["source", "isic_id"])
    manifest = "\n".join(test["source"].astype(str) + "," + test["isic_id"].astype(str))
    return {
        "rows": int(len(df)),
        "groups": int(df["group_id"].nunique()),
        "seed": cfg.seed,
        "group_by_used": [c for c in cfg.group_by if _present(df, c)],
        "group_by_absent": [c for c in cfg.group_by if not _present(df, c)],
        "group_size": {"max": int(sizes.max()) if len(sizes) else 0,
                       "mean": round(float(sizes.mean()), 3) if len(sizes) else 0.0,
                       "singletons": int((sizes == 1).sum())},
        "malignant_share_overall": round(overall, 4),
        "malignant_share_max_gap": round(max((abs(v["malignant_share"] - overall) for v in per_split.values()
                                              if v["rows"]), default=0.0), 4),
        "splits": per_split,
        "by_split_source": by_source,
        "leaks": leaks(df, [*linked_cols, "group_id"]),
        "test_manifest_sha256": hashlib.sha256(manifest.encode()).hexdigest(),
    }


def counts_table(df: pd.DataFrame) -> pd.DataFrame:
    """Long table split x source x class -> count (for `dvc plots`)."""
    if df.empty:
        return pd.DataFrame(columns=["split", "source", "class", "count"])
    t = df.assign(**{"class": np.where(df["target"] == 1, "malignant", "benign")})
    return t.groupby(["split", "source", "class"]).size().rename("count").reset_index()


# --------------------------------------------------------------------------- I/O
def run(params: Params, paths: Paths) -> dict[str, Any]:
    """Read data/clean/index.parquet; write data/split/{index.parquet,test_ids.csv} and reports/split/."""
    cfg = params.split
    df = assign_splits(read_index(paths, INPUT_STAGE), cfg)
    metrics = split_metrics(df, cfg)
    leaked = {c: n for c, n in metrics["leaks"].items() if n}
    if leaked:  # never write a leaking split
        outside = [c for c in leaked if c not in cfg.group_by and not (c == "source_group_id"
                                                                       and "group_id" in cfg.group_by)]
        advice = (f"add {['group_id' if c == 'source_group_id' else c for c in outside]} to split.group_by "
                  "in params.yaml" if outside else "this is a bug in tasks/split.py; please report it")
        raise SplitError(f"split would put one group into several splits (values per column: {leaked}); "
                         f"nothing was written; {advice}")
    out = paths.stage(STAGE)
    write_index(df, paths, STAGE)
    test_cols = [c for c in ("source", "isic_id", "group_id", "target", "sha256") if c in df.columns]
    write_table(df.loc[df["split"] == "test", test_cols].sort_values(["source", "isic_id"]), out / "test_ids.csv")
    rep = paths.reports / STAGE
    write_json(rep / "metrics.json", metrics)
    write_table(counts_table(df), rep / "counts.csv")
    return {"rows": metrics["rows"], "groups": metrics["groups"],
            **{s: metrics["splits"][s]["rows"] for s in SPLITS},
            "malignant_share": {s: metrics["splits"][s]["malignant_share"] for s in SPLITS},
            "test_manifest_sha256": metrics["test_manifest_sha256"]}
