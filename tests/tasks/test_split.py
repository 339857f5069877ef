"""split: no group in two splits, stability under growth/removal, fractions, determinism, seeds, real data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.core.config import Clean, Split, parse_params
from tasks.core.io import Paths, write_index
from tasks.split import assign_splits, connected_groups, leaks, run, split_metrics, unit_hash

GROUP_COLS = ["patient_id", "lesion_id", "dup_group"]


def random_index(rng: np.random.Generator, n: int, start: int = 0, pools: tuple[int, int, int] = (60, 120, 300),
                 source: str = "s", tag: str = "") -> pd.DataFrame:
    """Rows whose patient/lesion/dup ids are drawn from small pools (many collisions -> chains of links)."""
    def ids(prefix: str, pool: int, p_missing: float) -> list:
        v = rng.integers(0, pool, n)
        return [None if rng.random() < p_missing else f"{prefix}{tag}{x}" for x in v]

    return pd.DataFrame({
        "source": source,
        "isic_id": [f"ISIC_{start + i:07d}" for i in range(n)],
        "target": rng.integers(0, 2, n),
        "patient_id": ids("IP_", pools[0], 0.6),
        "lesion_id": ids("IL_", pools[1], 0.5),
        "dup_group": ids("D", pools[2], 0.7),
    }).assign(dup_group=lambda d: d["dup_group"].fillna(d["isic_id"]))


def components_by_bfs(df: pd.DataFrame, cols: list[str]) -> list[set[str]]:
    """Independent reference: connected components via BFS over shared values (slow but obviously right)."""
    by_val: dict[tuple[str, str], list[int]] = {}
    for c in ["isic_id", *cols]:
        for i, v in enumerate(df[c]):
            if v is not None and not (isinstance(v, float) and np.isnan(v)):
                by_val.setdefault((c, str(v)), []).append(i)
    row_vals: dict[int, list[tuple[str, str]]] = {}
    for k, rows in by_val.items():
        for r in rows:
            row_vals.setdefault(r, []).append(k)
    seen: set[int] = set()
    comps = []
    for s in range(len(df)):
        if s in seen:
            continue
        stack, comp = [s], set()
        seen.add(s)
        while stack:
            r = stack.pop()
            comp.add(df["isic_id"].iloc[r])
            for k in row_vals.get(r, []):
                for r2 in by_val[k]:
                    if r2 not in seen:
                        seen.add(r2)
                        stack.append(r2)
        comps.append(comp)
    return comps


# --------------------------------------------------------------------------- grouping
@pytest.mark.parametrize("seed", range(25))
def test_no_group_in_two_splits_property(seed):
    rng = np.random.default_rng(seed)
    df = random_index(rng, int(rng.integers(50, 400)), pools=tuple(int(x) for x in rng.integers(5, 200, 3)))
    out = assign_splits(df, Split(seed=seed))
    assert leaks(out, ["group_id", *GROUP_COLS]) == {c: 0 for c in ["group_id", *GROUP_COLS]}
    # group_id is exactly the connected component (checked against a BFS), keyed by its smallest isic_id
    comps = components_by_bfs(df, GROUP_COLS)
    gid = out.set_index("isic_id")["group_id"]
    for comp in comps:
        assert {gid[i] for i in comp} == {min(comp)}
    assert out["group_id"].nunique() == len(comps)


def test_linked_ids_and_source_group_id_join_groups():
    df = pd.DataFrame({
        "source": "s", "isic_id": ["ISIC_0000001", "ISIC_0000002", "ISIC_0000003", "ISIC_0000004"],
        "target": [0, 1, 0, 1], "patient_id": [None, "IP_1", None, None], "lesion_id": None,
        "dup_group": ["ISIC_0000001", "ISIC_0000002", "ISIC_0000003", "ISIC_0000004"],
        "linked_ids": ["patient_id=IP_1", "", "", ""],   # clean: a dropped duplicate of row 1 belonged to IP_1
        "group_id": ["A", "B", "C", "C"],                   # a source-provided split unit (isic-real metadata)
    })
    out = assign_splits(df, Split())
    assert out["group_id"].tolist() == ["ISIC_0000001", "ISIC_0000001", "ISIC_0000003", "ISIC_0000003"]
    assert out["source_group_id"].tolist() == ["A", "B", "C", "C"]  # input column kept under a new name
    without = assign_splits(df, Split(group_by=["patient_id", "lesion_id", "dup_group"]))
    assert without["group_id"].nunique() == 3  # linked_ids still join rows 1+2; the source's C is ignored


def test_union_find_scales():
    rng = np.random.default_rng(0)
    df = random_index(rng, 20000, pools=(3000, 8000, 15000))
    comp = connected_groups(df, GROUP_COLS)
    assert len(comp) == 20000 and comp.max() + 1 < 20000


# --------------------------------------------------------------------------- stability
def test_adding_rows_never_moves_existing_rows():
    rng = np.random.default_rng(1)
    old = random_index(rng, 1500)
    before = assign_splits(old, Split()).set_index("isic_id")["split"]
    # Nightly growth: new ids (larger, as the archive assigns them) and some new photos of known
    # patients/lesions, each joining at most one existing group (a merge is the documented caveat).
    new = random_index(rng, 600, start=5000, tag="new")  # ids never seen before, except the joins below
    old_groups = assign_splits(old, Split()).groupby("group_id")
    picks = rng.choice(list(old_groups.groups), size=200, replace=False)
    for i, g in enumerate(picks):
        member = old.set_index("isic_id").loc[old_groups.get_group(g)["isic_id"].iloc[0]]
        col = "patient_id" if pd.notna(member["patient_id"]) else "lesion_id"
        if pd.isna(member[col]):
            col = "dup_group"
        # only the one shared id: two joiners sharing a fresh id would merge their old groups
        new.loc[i, ["patient_id", "lesion_id", "dup_group"]] = [None, None, new.loc[i, "isic_id"]]
        new.loc[i, col] = member[col]
    after = assign_splits(pd.concat([old, new], ignore_index=True), Split()).set_index("isic_id")
    assert (after.loc[before.index, "split"] == before).all()
    assert after.loc[new["isic_id"][:200], "group_id"].isin(set(picks)).all()  # they did join old groups


def test_removing_unrelated_rows_never_moves_the_rest():
    rng = np.random.default_rng(2)
    df = random_index(rng, 1500)
    full = assign_splits(df, Split()).set_index("isic_id")
    gone = set(rng.choice(full["group_id"].unique(), size=300, replace=False))
    keep = full[~full["group_id"].isin(gone)].index
    sub = assign_splits(df[df["isic_id"].isin(keep)], Split()).set_index("isic_id")
    assert (sub["split"] == full.loc[sub.index, "split"]).all()


def test_merge_of_two_old_groups_takes_the_split_of_the_smaller_id():
    df = pd.DataFrame({"source": "s", "isic_id": [f"ISIC_{i:07d}" for i in range(400)], "target": 0,
                       "patient_id": [f"IP_{i}" for i in range(400)]})
    base = assign_splits(df, Split()).set_index("isic_id")["split"]
    a, b = next((x, y) for x in base.index for y in base.index if base[x] == "test" and base[y] == "train" and x < y)
    bridge = pd.DataFrame({"source": "s", "isic_id": ["ISIC_0099999", "ISIC_0099998"], "target": 0,
                           "patient_id": [f"IP_{int(a[5:])}", f"IP_{int(b[5:])}"], "lesion_id": ["IL_x", "IL_x"]})
    merged = assign_splits(pd.concat([df, bridge], ignore_index=True), Split()).set_index("isic_id")
    assert merged.loc[a, "split"] == merged.loc[b, "split"] == "test"  # test keeps its images; b moves


# --------------------------------------------------------------------------- fractions, determinism, seeds
def test_fractions_on_2000_groups():
    df = pd.DataFrame({"source": "s", "isic_id": [f"ISIC_{i:07d}" for i in range(2000)],
                       "target": np.arange(2000) % 3 == 0}).astype({"target": int})
    for cfg in (Split(), Split(train=0.8, val=0.1, test=0.1, seed=7)):
        frac = assign_splits(df, cfg)["split"].value_counts(normalize=True)
        for s in ("train", "val", "test"):
            assert abs(frac[s] - getattr(cfg, s)) < 0.03, (s, frac[s])


def test_deterministic_and_independent_of_row_order():
    rng = np.random.default_rng(3)
    df = random_index(rng, 800)
    a = assign_splits(df, Split()).set_index("isic_id")[["split", "group_id"]]
    b = assign_splits(df.sample(frac=1, random_state=5), Split()).set_index("isic_id")[["split", "group_id"]]
    pd.testing.assert_frame_equal(a.sort_index(), b.sort_index())
    assert unit_hash("ISIC_0000001", 42) == unit_hash("ISIC_0000001", 42) != unit_hash("ISIC_0000001", 43)


def test_different_seed_different_assignment():
    df = pd.DataFrame({"source": "s", "isic_id": [f"ISIC_{i:07d}" for i in range(1000)], "target": 0})
    a = assign_splits(df, Split(seed=1))["split"]
    b = assign_splits(df, Split(seed=2))["split"]
    assert (a != b).mean() > 0.3  # independent assignments differ for ~46% of rows


def test_growing_test_fraction_only_adds_to_test():
    df = pd.DataFrame({"source": "s", "isic_id": [f"ISIC_{i:07d}" for i in range(1000)], "target": 0})
    small = assign_splits(df, Split(train=0.7, val=0.15, test=0.15))["split"]
    large = assign_splits(df, Split(train=0.6, val=0.15, test=0.25))["split"]
    assert (large[small == "test"] == "test").all()


def test_bad_target_is_a_clear_error():
    df = pd.DataFrame({"source": "s", "isic_id": ["ISIC_0000001"], "target": [2]})
    with pytest.raises(ValueError, match="column 'target' must be 0/1"):
        assign_splits(df, Split())


def test_run_writes_outputs(tmp_path):
    rng = np.random.default_rng(4)
    paths = Paths(tmp_path)
    write_index(random_index(rng, 300), paths, "clean")
    summary = run(parse_params({"ingest": {"sources": [{"kind": "synthetic"}]}}), paths)
    out = pd.read_parquet(paths.index("split"))
    assert summary["train"] + summary["val"] + summary["test"] == 300 == len(out)
    test_ids = pd.read_csv(paths.stage("split") / "test_ids.csv")
    assert sorted(test_ids["isic_id"]) == sorted(out.loc[out.split == "test", "isic_id"])
    m = json.loads((paths.reports / "split" / "metrics.json").read_text())
    assert set(m["leaks"].values()) == {0} and m["group_by_absent"] == ["group_id"]
    assert sum(v["malignant"] + v["benign"] for s in m["by_split_source"].values() for v in s.values()) == 300
    assert pd.read_csv(paths.reports / "split" / "counts.csv")["count"].sum() == 300


# --------------------------------------------------------------------------- real data
@pytest.mark.realdata
def test_clean_and_split_on_isic_real(isic_real: Path, tmp_path: Path):
    from tasks.clean import clean_index

    meta = pd.read_csv(isic_real / "metadata.csv", dtype=str, keep_default_na=False).replace("", None)
    # metadata's own `source` (repo@commit:path) would collide with the index key column
    df = meta.rename(columns={"source": "origin"}).assign(
        source="isic-real", path=[str((isic_real / f"{i}.jpg").resolve()) for i in meta["isic_id"]],
        dup_group=meta["isic_id"], keep=True, dup_reason=None)
    res = clean_index(df, Paths(tmp_path), Clean())
    assert res.dropped.empty and res.quarantine.empty
    assert len(res.index) == 2467 and int(res.index["target"].sum()) == 740
    assert res.metrics["metadata"]["sites"]["unmapped_legacy"] == {}
    assert set(res.index["anatom_site_1"].dropna()) <= {"Head and neck", "Trunk", "Upper extremity",
                                                        "Lower extremity", "Anogenital region"}
    out = assign_splits(res.index, Split())
    assert leaks(out, ["group_id", "source_group_id", "patient_id", "lesion_id"]) == {
        "group_id": 0, "source_group_id": 0, "patient_id": 0, "lesion_id": 0}
    by_meta = out["isic_id"].map(meta.set_index("isic_id")["group_id"])  # the metadata's own split unit
    assert (out.groupby(by_meta)["split"].nunique() == 1).all()
    m = split_metrics(out, Split())
    for s in ("train", "val", "test"):
        assert abs(m["splits"][s]["row_fraction"] - getattr(Split(), s)) < 0.05
        assert abs(m["splits"][s]["malignant_share"] - 0.30) < 0.05


@pytest.mark.realdata
def test_two_real_sources_merged_keep_their_groups(isic_real: Path, isic_dupes: Path, tmp_path: Path):
    """isic-real + isic-dupes with pairs.csv as a perfect dedupe, keeping the *dupes* copy of each pair (worst
    case: the dropped isic-real copy held the lesion/group ids): no isic-real group may straddle splits."""
    from tasks.clean import clean_index

    def load(folder: Path, name: str) -> pd.DataFrame:
        m = pd.read_csv(folder / "metadata.csv", dtype=str, keep_default_na=False).replace("", None)
        return m.rename(columns={"source": "origin"}).assign(
            source=name, path=[str((folder / f"{i}.jpg").resolve()) for i in m["isic_id"]])

    real, dupes = load(isic_real, "isic-real"), load(isic_dupes, "isic-dupes")
    pairs = pd.read_csv(isic_dupes / "pairs.csv")
    partner = dict(zip(pairs["id_in_isic_dupes"], pairs["id_in_isic_real"], strict=True))
    real = real.assign(dup_group=real["isic_id"], keep=~real["isic_id"].isin(set(partner.values())),
                       dup_reason=lambda d: np.where(d["keep"], None, "ground-truth pair: isic-dupes copy kept"))
    dupes = dupes.assign(dup_group=dupes["isic_id"].map(partner).fillna(dupes["isic_id"]), keep=True, dup_reason=None)
    res = clean_index(pd.concat([real, dupes], ignore_index=True), Paths(tmp_path), Clean())
    assert res.quarantine.empty
    assert len(res.index) == 2467 - len(set(partner.values())) + 310
    assert res.dropped["reason"].eq("duplicate").sum() == len(set(partner.values()))
    # the dropped isic-real copy's group_id survives on the kept copy wherever the two differ
    real_group = real.set_index("isic_id")["group_id"]
    kept = res.index[res.index["source"].eq("isic-dupes") & res.index["isic_id"].isin(set(partner))]
    differs = kept[kept["isic_id"].map(partner).map(real_group) != kept["group_id"]]
    assert len(differs) > 0
    assert all(f"group_id={real_group[partner[i]]}" in link.split("|")
               for i, link in zip(differs["isic_id"], differs["linked_ids"], strict=True))
    out = assign_splits(res.index, Split())
    unit = np.where(out["source"] == "isic-real", out["isic_id"].map(real_group),
                    out["isic_id"].map(partner).map(real_group))
    unit = pd.Series(unit, index=out.index).fillna("dupes:" + out["isic_id"])  # distractors: their own
    assert (out.groupby(unit)["split"].nunique() == 1).all()
    assert set(split_metrics(out, Split())["leaks"].values()) == {0}


# --------------------------------------------------------------------------- group_by checked against the columns
def test_misspelt_group_by_is_an_input_error_naming_columns():
    """Regression: [patient_ID, lesionid] used to disable grouping silently and leak patients across splits."""
    from tasks.core.errors import InputError

    df = random_index(np.random.default_rng(0), 50)
    with pytest.raises(InputError) as err:
        assign_splits(df, Split(group_by=["patient_ID", "lesionid", "dup_group"]))
    msg = str(err.value)
    assert "['patient_ID', 'lesionid']" in msg and "split.group_by" in msg
    assert "Available columns: ['dup_group', 'isic_id', 'lesion_id', 'patient_id', 'source', 'target']" in msg
    assert "'patient_ID' -> 'patient_id'?" in msg


def test_group_by_column_present_only_in_linked_ids_is_accepted():
    df = pd.DataFrame({"source": "s", "isic_id": ["ISIC_0000001", "ISIC_0000002"], "target": [0, 1],
                       "linked_ids": ["site_group=X", ""]})
    out = assign_splits(df, Split(group_by=["site_group"]))
    assert out["group_id"].nunique() == 2


def test_source_group_columns_are_leak_checked_whatever_group_by_says(tmp_path):
    """Regression: with group_by not naming patient_id, one patient could land in two splits unnoticed."""
    from tasks.core.errors import InputError

    rng = np.random.default_rng(4)
    df = random_index(rng, 300)
    paths = Paths(tmp_path)
    write_index(df, paths, "clean")
    p = parse_params({"ingest": {"sources": [{"kind": "synthetic"}]}, "split": {"group_by": ["dup_group"]}})
    with pytest.raises(InputError, match=r"patient_id.*add \[.*'patient_id'.*\] to split.group_by"):
        run(p, paths)
    assert not paths.index("split").exists()
    out = assign_splits(df, Split(group_by=["dup_group"]))
    assert split_metrics(out, Split(group_by=["dup_group"]))["leaks"]["patient_id"] > 0
