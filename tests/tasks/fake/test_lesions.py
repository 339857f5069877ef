"""Synthetic lesions: ISIC-style folder, determinism, planted-trouble ground truth, learnable labels."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from tasks.core.labels import label_of
from tasks.fake.lesions import (
    BENIGN_DX,
    COLUMNS,
    CORRUPT_KINDS,
    INDETERMINATE_DX,
    MALIGNANT_DX,
    PLANTED_COLUMNS,
    PLANTED_KINDS,
    SITES,
    generate,
    trouble_counts,
)

N = 300


def _read(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    # keep_default_na=False + explicit "" -> NaN: ids and names are never parsed as numbers or "NA" strings.
    meta = pd.read_csv(folder / "metadata.csv", dtype=str, keep_default_na=False).replace("", np.nan)
    planted = pd.read_csv(folder / "planted.csv", dtype=str, keep_default_na=False).replace("", np.nan)
    return meta, planted


def _decode(path: Path, flags: int = cv2.IMREAD_COLOR) -> np.ndarray | None:
    return cv2.imdecode(np.fromfile(str(path), np.uint8), flags)


def _grey_thumb(path: Path, k: int) -> np.ndarray:
    img = _decode(path, cv2.IMREAD_GRAYSCALE)
    assert img is not None, path
    t = cv2.resize(img, (k, k), interpolation=cv2.INTER_AREA).astype(np.float64).ravel()
    return (t - t.mean()) / (t.std() + 1e-9)


def _corr(a: Path, b: Path, k: int) -> float:
    return float(_grey_thumb(a, k) @ _grey_thumb(b, k) / (k * k))


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """One default-sized set with planted trouble, shared by the read-only tests below."""
    out = tmp_path_factory.mktemp("synth") / "isic"
    generate(out, N, seed=7, malignant_fraction=0.3, image_size=128)
    return out


# --------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("kwargs,field", [
    ({"n": 0}, "n must be"), ({"n": -3}, "n must be"), ({"n": 2.5}, "n must be"), ({"n": True}, "n must be"),
    ({"n": 2_000_000}, "n must be <="),
    ({"malignant_fraction": -0.1}, "malignant_fraction"), ({"malignant_fraction": 1.5}, "malignant_fraction"),
    ({"malignant_fraction": float("nan")}, "malignant_fraction"),
    ({"image_size": 31}, "image_size"), ({"image_size": 64.0}, "image_size"),
])
def test_bad_arguments_fail_clearly_before_writing(tmp_path, kwargs, field):
    args = {"n": 50, **kwargs}
    with pytest.raises(ValueError, match=field):
        generate(tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- determinism
def test_same_args_give_byte_identical_folders_and_another_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(a, 60, seed=3)
    generate(b, 60, seed=3)
    generate(c, 60, seed=4)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert len([f for f in files if f.suffix == ".jpg"]) == 60
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / "metadata.csv").read_bytes() != (c / "metadata.csv").read_bytes()
    same = sum((a / f).read_bytes() == (c / f).read_bytes() for f in files if f.suffix == ".jpg")
    assert same == 0  # same ids, different pixels


# --------------------------------------------------------------------------- metadata
def test_metadata_is_an_isic_cli_table_with_current_api_vocabularies(synth):
    meta, _ = _read(synth)
    raw_header = (synth / "metadata.csv").read_text().splitlines()[0].split(",")
    assert raw_header == COLUMNS  # isic_id, attribution, copyright_license, then the sorted keys
    assert COLUMNS[3:] == sorted(COLUMNS[3:])
    assert len(meta) == N and meta["isic_id"].is_unique
    assert set(meta["isic_id"]) == {f"ISIC_{8_000_000 + i:07d}" for i in range(N)}
    assert sorted(p.stem for p in synth.glob("*.jpg")) == sorted(meta["isic_id"])
    assert meta["patient_id"].str.fullmatch(r"IP_\d{7}").all()
    assert meta["lesion_id"].str.fullmatch(r"IL_\d{7}").all()
    assert set(meta["copyright_license"]) <= {"CC-0", "CC-BY", "CC-BY-NC"}
    assert (meta["image_type"] == "dermoscopic").all()
    assert (meta["image_manipulation"] == "synthetic").all()

    age = pd.to_numeric(meta["age_approx"])
    assert age.isna().any() and age.notna().mean() > 0.85
    assert ((age.dropna() % 5 == 0) & age.dropna().between(0, 85)).all()
    assert not re.search(r",\d+\.0,", (synth / "metadata.csv").read_text())  # ints stay ints in the CSV
    assert meta["sex"].isna().any() and set(meta["sex"].dropna()) == {"male", "female"}
    assert set(meta["anatom_site_1"].dropna()) <= set(SITES) and meta["anatom_site_1"].isna().any()
    with_2 = meta.dropna(subset=["anatom_site_2"])
    pairs = zip(with_2["anatom_site_1"], with_2["anatom_site_2"], strict=True)
    assert len(with_2) > 0 and all(s2 in SITES[s1] for s1, s2 in pairs)

    hierarchy = {"Malignant": MALIGNANT_DX, "Benign": BENIGN_DX, "Indeterminate": INDETERMINATE_DX}
    assert set(meta["diagnosis_1"].dropna()) == set(hierarchy)
    for _, row in meta.dropna(subset=["diagnosis_1"]).iterrows():
        allowed = hierarchy[row["diagnosis_1"]]
        assert row["diagnosis_2"] in {d2 for d2, _, _ in allowed}
        pairs = {(d2, d3) for d2, d3, _ in allowed}
        assert pd.isna(row["diagnosis_3"]) or (row["diagnosis_2"], row["diagnosis_3"]) in pairs
        assert row["diagnosis_confirm_type"] in {"histopathology", "serial imaging showing no change",
                                                 "single image expert consensus"}
    # The project's own label mapping reads it as intended.
    labels = meta.apply(lambda r: label_of(r.to_dict())[0], axis=1)
    assert set(labels) == {"malignant", "benign", "indeterminate", "unknown"}
    assert (labels == "unknown").sum() == trouble_counts(N)["unlabeled"]


def test_patients_have_several_lesions_and_some_lesions_several_photos(synth):
    meta, planted = _read(synth)
    per_patient = meta.groupby("patient_id")["lesion_id"].nunique()
    assert per_patient.max() >= 4 and (per_patient >= 3).sum() >= 10
    per_lesion = meta.groupby("lesion_id").size()
    multi = per_lesion[per_lesion >= 2].index
    assert len(multi) >= 10
    # Photos of one lesion share the patient and the diagnosis; they are different photos, not files.
    for lid in multi:
        rows = meta[meta["lesion_id"] == lid]
        assert rows["patient_id"].nunique() == 1 and rows["diagnosis_1"].nunique(dropna=False) == 1
        blobs = {(synth / f"{i}.jpg").read_bytes() for i in rows["isic_id"]}
        assert len(blobs) == len(rows)
    # A planted copy comes from another cohort under new ids, so only pixels can reveal it.
    by_id = meta.set_index("isic_id")
    for _, p in planted.dropna(subset=["of_isic_id"]).iterrows():
        copy, src = by_id.loc[p["isic_id"]], by_id.loc[p["of_isic_id"]]
        assert copy["patient_id"] != src["patient_id"] and copy["lesion_id"] != src["lesion_id"]
        assert copy["copyright_license"] != src["copyright_license"]


def test_folder_carries_isic_cli_extras(synth):
    meta, _ = _read(synth)
    counts = meta["attribution"].value_counts()
    names = (synth / "attribution.txt").read_text().strip().split("\n\n")
    assert sorted(names) == sorted(counts.index)
    assert [counts[n] for n in names] == sorted(counts.values, reverse=True)
    assert sorted(p.stem for p in (synth / "licenses").glob("*.txt")) == sorted(meta["copyright_license"].unique())


# --------------------------------------------------------------------------- planted trouble
def test_planted_rows_point_at_real_files_in_the_documented_numbers(synth):
    meta, planted = _read(synth)
    assert list(planted.columns) == PLANTED_COLUMNS
    assert set(planted["kind"]) == set(PLANTED_KINDS)
    assert planted["kind"].value_counts().to_dict() == {k: v for k, v in trouble_counts(N).items() if v}
    assert planted["isic_id"].is_unique
    ids = set(meta["isic_id"])
    assert set(planted["isic_id"]) <= ids
    copies = planted.dropna(subset=["of_isic_id"])
    assert set(copies["kind"]) == {"exact_dup", "near_dup_resized", "near_dup_reencoded", "near_dup_recoloured",
                                   "near_dup_cropped", "conflicting_label"}
    assert set(copies["of_isic_id"]) <= ids and copies["of_isic_id"].is_unique
    assert not set(copies["of_isic_id"]) & set(planted["isic_id"])  # sources are clean originals


def test_exactly_the_corrupt_files_fail_to_decode(synth):
    meta, planted = _read(synth)
    corrupt = set(planted.loc[planted["kind"].isin(CORRUPT_KINDS), "isic_id"])
    assert len(corrupt) == sum(trouble_counts(N)[k] for k in CORRUPT_KINDS)
    for isic_id in meta["isic_id"]:
        path = synth / f"{isic_id}.jpg"
        decoded = _decode(path)
        if isic_id in corrupt:
            assert decoded is None and cv2.imread(str(path)) is None, isic_id
        else:
            assert decoded is not None, isic_id
            row = meta.set_index("isic_id").loc[isic_id]
            assert decoded.shape[:2] == (int(row["pixels_y"]), int(row["pixels_x"]))
    for isic_id in planted.loc[planted["kind"] == "corrupt_truncated", "isic_id"]:
        data = (synth / f"{isic_id}.jpg").read_bytes()
        assert data[:2] == b"\xff\xd8" and not data.endswith(b"\xff\xd9")  # a JPEG that stops early


def test_duplicates_are_exact_or_visually_near(synth):
    meta, planted = _read(synth)
    by_id = meta.set_index("isic_id")
    for _, p in planted.dropna(subset=["of_isic_id"]).iterrows():
        a, b = synth / f"{p['isic_id']}.jpg", synth / f"{p['of_isic_id']}.jpg"
        if p["kind"] == "exact_dup":
            assert a.read_bytes() == b.read_bytes()
            continue
        assert a.read_bytes() != b.read_bytes(), p["isic_id"]
        cropped = p["kind"] == "near_dup_cropped" or str(p["detail"]).startswith("cropped")
        if cropped:
            # A crop drops vignette corners, which dominate a whole-image thumbnail; what makes it the same
            # photo is that it sits inside the original: find it there.
            small, big = _decode(a, cv2.IMREAD_GRAYSCALE), _decode(b, cv2.IMREAD_GRAYSCALE)
            assert small.shape[0] < big.shape[0] and small.shape[1] < big.shape[1]
            best = cv2.matchTemplate(big, small, cv2.TM_CCOEFF_NORMED).max()
            assert best > 0.95, (p["kind"], p["detail"], best)
        else:
            assert _corr(a, b, 32) > 0.95, (p["kind"], p["detail"])
        wa, ha = int(by_id.loc[p["isic_id"], "pixels_x"]), int(by_id.loc[p["isic_id"], "pixels_y"])
        wb, hb = int(by_id.loc[p["of_isic_id"], "pixels_x"]), int(by_id.loc[p["of_isic_id"], "pixels_y"])
        if p["kind"] == "near_dup_resized":
            assert wa < wb and ha <= hb
        elif p["kind"] == "near_dup_cropped":
            assert 0.92 <= wa / wb < 1 and 0.92 <= ha / hb < 1
        elif p["kind"] in ("near_dup_reencoded", "near_dup_recoloured"):
            assert (wa, ha) == (wb, hb)
        if p["kind"] == "near_dup_recoloured":
            ia, ib = _decode(a).astype(float), _decode(b).astype(float)
            assert np.abs(ia - ib).mean() > 3  # colours really moved


def test_label_trouble_rows_say_what_they_claim(synth):
    meta, planted = _read(synth)
    by_id = meta.set_index("isic_id")
    for _, p in planted.iterrows():
        row = by_id.loc[p["isic_id"]]
        if p["kind"] == "unlabeled":
            assert row[["diagnosis_1", "diagnosis_2", "diagnosis_3"]].isna().all()
        elif p["kind"] == "indeterminate":
            assert row["diagnosis_1"] == "Indeterminate"
        elif p["kind"] == "conflicting_label":
            src = by_id.loc[p["of_isic_id"]]
            assert {row["diagnosis_1"], src["diagnosis_1"]} == {"Benign", "Malignant"}
        elif pd.notna(p["of_isic_id"]):
            assert row["diagnosis_1"] == by_id.loc[p["of_isic_id"], "diagnosis_1"]


def test_trouble_off_and_tiny_sets_plant_nothing(tmp_path):
    meta = generate(tmp_path / "clean", 45, seed=1, trouble=False)
    _, planted = _read(tmp_path / "clean")
    assert planted.empty and list(planted.columns) == PLANTED_COLUMNS
    assert set(meta["diagnosis_1"]) <= {"Benign", "Malignant"} and meta["diagnosis_1"].notna().all()
    assert all(_decode(tmp_path / "clean" / f"{i}.jpg") is not None for i in meta["isic_id"])
    assert sum(trouble_counts(39).values()) == 0 and sum(trouble_counts(40).values()) > 0


# --------------------------------------------------------------------------- labels and their look
def _labelled_share(meta: pd.DataFrame) -> float:
    d1 = meta["diagnosis_1"]
    return float((d1 == "Malignant").sum() / d1.isin(["Benign", "Malignant"]).sum())


def test_malignant_fraction_is_honoured(synth, tmp_path):
    meta, _ = _read(synth)
    assert abs(_labelled_share(meta) - 0.3) <= 0.05
    half = generate(tmp_path / "half", 100, seed=2, malignant_fraction=0.5, trouble=False)
    assert abs(_labelled_share(half) - 0.5) <= 0.06
    assert (generate(tmp_path / "none", 40, seed=2, malignant_fraction=0.0, trouble=False)["diagnosis_1"]
            == "Benign").all()
    assert (generate(tmp_path / "all", 40, seed=2, malignant_fraction=1.0, trouble=False)["diagnosis_1"]
            == "Malignant").all()


def _simple_features(path: Path) -> list[float]:
    """Coarse HSV histograms + dark-area share inside the central disc (the vignette ring stays outside)."""
    img = cv2.resize(_decode(path), (64, 64), interpolation=cv2.INTER_AREA)
    yy, xx = np.mgrid[:64, :64]
    disc = (yy - 31.5) ** 2 + (xx - 31.5) ** 2 < (0.42 * 64) ** 2
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)[disc].astype(float)
    v = hsv[:, 2]
    feats: list[float] = []
    for ch, bins, top in ((0, 6, 180), (1, 4, 256), (2, 4, 256)):
        hist, _ = np.histogram(hsv[:, ch], bins=bins, range=(0, top))
        feats += list(hist / len(v))
    skin = np.percentile(v, 95)  # the brightest part of the disc is skin, whatever the exposure
    return feats + [float((v < skin * f).mean()) for f in (0.45, 0.6, 0.75)]


def test_labels_are_learnable_but_not_trivially(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    meta = generate(tmp_path / "learn", 200, seed=11, trouble=False)
    X = np.array([_simple_features(tmp_path / "learn" / f"{i}.jpg") for i in meta["isic_id"]])
    y = (meta["diagnosis_1"] == "Malignant").to_numpy().astype(int)
    # Out-of-fold scores, folds grouped by lesion so two photos of one lesion never sit on both sides
    # (one 50/50 split of 200 images swings by +-0.1 AUC; 5 folds are stable).
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    cv = StratifiedGroupKFold(5, shuffle=True, random_state=0)
    p = cross_val_predict(clf, X, y, groups=meta["lesion_id"], cv=cv, method="predict_proba")[:, 1]
    auc = roc_auc_score(y, p)
    assert 0.75 < auc < 0.999, auc
    # The dark-area share alone (size and darkness, D and C) is informative but does not give it away.
    dark_auc = roc_auc_score(y, X[:, -1])
    assert 0.6 < dark_auc < 0.95, dark_auc


# --------------------------------------------------------------------------- reruns and the CLI
def test_rerun_with_fewer_images_removes_stale_files_only(tmp_path):
    out = tmp_path / "s"
    generate(out, 50, seed=0)
    (out / "notes.txt").write_text("mine")
    meta = generate(out, 42, seed=0)
    assert sorted(p.stem for p in out.glob("*.jpg")) == sorted(meta["isic_id"])
    assert (out / "notes.txt").read_text() == "mine"
    assert not list(out.glob(".*partial"))


def test_cli_synth_writes_the_folder(tmp_path, capsys):
    from flows.cli import main

    rc = main(["synth", "--out", str(tmp_path / "cli"), "--n", "41", "--seed", "5", "--size", "64",
               "--malignant-fraction", "0.4"])
    assert rc in (0, None)
    meta, planted = _read(tmp_path / "cli")
    assert len(meta) == 41 and len(planted) == sum(trouble_counts(41).values())
    assert "41" in capsys.readouterr().out
    assert int(pd.to_numeric(meta["pixels_x"]).max()) == 64
