"""clean: labels, indeterminate policy, dropped-row accounting, schema errors, image quarantine, normalisation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from tasks.clean import (
    SchemaError,
    check_image_bytes,
    check_input_schema,
    clean_index,
    normalise_metadata,
    run,
)
from tasks.core.config import Clean, parse_params
from tasks.core.images import truncation
from tasks.core.io import Paths, write_index


def jpeg(w: int = 64, h: int = 48, seed: int = 0, **flags: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), (5, 5), 0)
    params = [int(v) for kv in flags.items() for v in (getattr(cv2, kv[0]), kv[1])]
    ok, buf = cv2.imencode(".jpg", img, params)
    assert ok
    return buf.tobytes()


def png(w: int = 64, h: int = 48) -> bytes:
    ok, buf = cv2.imencode(".png", np.full((h, w, 3), 128, np.uint8))
    assert ok
    return buf.tobytes()


class Builder:
    """A tiny dedupe-like index whose images live under tmp_path (paths stored relative to the root)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.rows: list[dict] = []

    def add(self, n: int, data: bytes | None = None, **cols) -> dict:
        isic_id = f"ISIC_{n:07d}"
        rel = f"data/ingest/images/{isic_id}.jpg"
        if data is not None:
            (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.root / rel).write_bytes(data)
        row = {"source": "s1", "isic_id": isic_id, "path": rel, "dup_group": isic_id, "keep": True,
               "dup_reason": None, "diagnosis_1": "Benign", **cols}
        self.rows.append(row)
        return row

    def df(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)


@pytest.fixture
def b(tmp_path: Path) -> Builder:
    return Builder(tmp_path)


def clean(b: Builder, **cfg) -> object:
    return clean_index(b.df(), Paths(b.root), Clean(**cfg))


# --------------------------------------------------------------------------- labels
def test_labels_from_current_and_legacy_columns(b):
    b.add(1, jpeg(), diagnosis_1="Malignant")
    b.add(2, jpeg(), diagnosis_1="Benign")
    b.add(3, jpeg(), diagnosis_1=None, benign_malignant="malignant")
    b.add(4, jpeg(), diagnosis_1=None, diagnosis="nv")
    b.add(5, jpeg(), diagnosis_1=None, diagnosis="unknown", benign_malignant="benign")  # ISIC 2020 style
    b.add(6, jpeg(), diagnosis_1=None, dx="mel")
    b.add(7, jpeg(), diagnosis_1="Benign", benign_malignant="malignant")  # hierarchy wins
    out = clean(b).index.set_index("isic_id")
    assert out["target"].to_dict() == {"ISIC_0000001": 1, "ISIC_0000002": 0, "ISIC_0000003": 1, "ISIC_0000004": 0,
                                       "ISIC_0000005": 0, "ISIC_0000006": 1, "ISIC_0000007": 0}
    assert out.loc["ISIC_0000003", "label_column"] == "benign_malignant"
    assert out.loc["ISIC_0000006", "label_column"] == "dx"
    assert out.loc["ISIC_0000007", "label_column"] == "diagnosis_1"
    assert out["target"].dtype == np.int64


@pytest.mark.parametrize("policy,target", [("drop", None), ("benign", 0), ("malignant", 1)])
def test_indeterminate_policy(b, policy, target):
    b.add(1, jpeg(), diagnosis_1="Indeterminate")
    b.add(2, jpeg(), diagnosis_1=None, benign_malignant="indeterminate/malignant")
    b.add(3, jpeg(), diagnosis_1=None, diagnosis="actinic keratosis")
    res = clean(b, indeterminate=policy)
    if target is None:
        assert res.index.empty
        assert res.dropped["reason"].tolist() == ["indeterminate"] * 3
    else:
        assert res.index["target"].tolist() == [target] * 3
        assert res.index["label"].eq("indeterminate").all()


def test_every_dropped_row_listed_with_reason(b):
    b.add(1, jpeg(), diagnosis_1="Malignant")
    b.add(2, jpeg(), keep=False, dup_group="ISIC_0000001", dup_reason="near duplicate of s1/ISIC_0000001")
    b.add(3, jpeg(), keep=False, dup_group="ISIC_0000003", dup_reason="label conflict in duplicate group")
    b.add(4, jpeg(), diagnosis_1=None)  # unlabeled
    b.add(5, jpeg(), diagnosis_1="Indeterminate")
    b.add(6, jpeg()[:1200])  # truncated inside the scan
    b.add(7, None)  # file never written
    b.add(8, jpeg(seed=8))
    df = b.df()
    res = clean_index(df, Paths(b.root), Clean())
    kept = set(res.index["isic_id"])
    dropped = res.dropped.set_index("isic_id")
    assert kept == {"ISIC_0000001", "ISIC_0000008"}
    assert kept.isdisjoint(dropped.index) and kept | set(dropped.index) == set(df["isic_id"])
    assert dropped["reason"].to_dict() == {
        "ISIC_0000002": "duplicate", "ISIC_0000003": "duplicate", "ISIC_0000004": "unlabeled",
        "ISIC_0000005": "indeterminate", "ISIC_0000006": "truncated", "ISIC_0000007": "missing_file"}
    assert dropped.loc["ISIC_0000002", "detail"] == "near duplicate of s1/ISIC_0000001"
    assert set(res.quarantine["isic_id"]) == {"ISIC_0000006", "ISIC_0000007"}
    m = res.metrics
    assert m["rows_in"] == 8 and m["rows_out"] == 2 and m["dropped"] == 6 and m["quarantined"] == 2
    assert m["dropped_by_reason"]["duplicate"] == 2
    assert m["duplicate_reasons"] == {"label conflict in duplicate group": 1, "near duplicate of s1/ISIC_0000001": 1}
    assert m["class_balance_per_source"] == {"s1": {"benign": 1, "malignant": 1, "malignant_share": 0.5}}


def test_ids_of_dropped_duplicates_are_linked_to_the_kept_copy(b):
    b.add(1, jpeg(), patient_id=None, lesion_id="IL_1")
    b.add(2, jpeg(), keep=False, dup_group="ISIC_0000001", dup_reason="dup", patient_id="IP_9", lesion_id="IL_1")
    out = clean(b).index
    assert out["linked_ids"].tolist() == ["patient_id=IP_9"]  # IL_1 is already the kept row's own


# --------------------------------------------------------------------------- schema
def test_schema_error_names_column_and_rows(b):
    for n in range(4):
        b.add(n, None)
    df = b.df()
    df.loc[2, "isic_id"] = "ISIC_12"
    with pytest.raises(SchemaError) as err:
        check_input_schema(df)
    msg = str(err.value)
    assert "'isic_id'" in msg and "row 2" in msg and "'ISIC_12'" in msg and "1 row(s)" in msg


@pytest.mark.parametrize(
    "mutate,expect",
    [
        (lambda d: d.drop(columns=["keep"]), "missing required column(s) ['keep']"),
        (lambda d: d.assign(keep=["yes", True, True]), "column 'keep' must be boolean in 1 row(s): row 0"),
        (lambda d: d.assign(keep=pd.array([True, None, False], dtype="boolean")), "boolean in 1 row(s): row 1"),
        (lambda d: d.assign(path=["a", None, "c"]), "column 'path' is empty in 1 row(s): row 1"),
        (lambda d: d.assign(isic_id="ISIC_0000001"), "not unique in 3 row(s)"),
    ],
)
def test_schema_errors(b, mutate, expect):
    for n in range(3):
        b.add(n, None)
    with pytest.raises(SchemaError) as err:
        clean_index(mutate(b.df()), Paths(b.root), Clean())
    assert expect in str(err.value)


# --------------------------------------------------------------------------- images
def test_bad_images_are_quarantined_not_crashed(b):
    good = jpeg(80, 60)
    b.add(1, good, pixels_x=80, pixels_y=60, sha256=hashlib.sha256(good).hexdigest(), file_size=len(good))
    b.add(2, good[: len(good) // 2])  # truncated mid-scan
    b.add(3, jpeg(80, 60, IMWRITE_JPEG_PROGRESSIVE=1)[:-400])  # truncated progressive JPEG
    b.add(4, b"this is not an image at all")
    b.add(5, b"")
    b.add(6, None)
    b.add(7, jpeg(20, 200))  # shorter side 20 < 32
    b.add(8, png()[:-12])  # PNG without IEND
    b.add(9, good, pixels_x=1024, pixels_y=768)  # not the image the metadata describes
    b.add(10, good, sha256="0" * 64)  # bytes changed since ingest
    b.add(11, good, pixels_x=60, pixels_y=80)  # transposed (EXIF-rotated metadata) is accepted
    b.add(12, png())
    b.add(13, good + b"\x00" * 16 + b"trailer")  # junk after EOI is tolerated
    b.add(14, good[:400])  # cut inside the headers (before any scan): the decoder rejects it
    b.add(15, b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8)  # JPEG signature + noise
    b.add(16, None)["path"] = "data"  # a directory where a file should be
    res = clean(b)
    reasons = res.quarantine.set_index("isic_id")["reason"].to_dict()
    assert reasons == {"ISIC_0000002": "truncated", "ISIC_0000003": "truncated", "ISIC_0000004": "undecodable",
                       "ISIC_0000005": "empty_file", "ISIC_0000006": "missing_file", "ISIC_0000007": "too_small",
                       "ISIC_0000008": "truncated", "ISIC_0000009": "size_mismatch",
                       "ISIC_0000010": "checksum_mismatch", "ISIC_0000014": "undecodable",
                       "ISIC_0000015": "undecodable", "ISIC_0000016": "unreadable"}
    assert sorted(res.index["isic_id"]) == ["ISIC_0000001", "ISIC_0000011", "ISIC_0000012", "ISIC_0000013"]
    assert res.index.set_index("isic_id").loc["ISIC_0000001", ["image_width", "image_height"]].tolist() == [80, 60]
    assert (res.quarantine["detail"].str.len() > 0).all()


@pytest.mark.parametrize("frac", [0.3, 0.66, 0.99])
def test_truncated_jpeg_detected_by_marker_whatever_opencv_does(frac):
    data = jpeg(64, 64)
    cut = data[: int(len(data) * frac)]  # OpenCV 4.x decodes this grey-filled; 5.0 returns None
    assert truncation(cut) and not truncation(data)
    assert check_image_bytes(cut, 32).reason == "truncated"
    assert check_image_bytes(data, 32).reason is None


def test_checks_can_be_switched_off(b):
    good = jpeg(80, 60)
    b.add(1, good, pixels_x=1, pixels_y=1, sha256="0" * 64)
    assert len(clean(b, check_declared_size=False, verify_checksum=False).index) == 1
    assert len(clean(b, min_side=100, check_declared_size=False, verify_checksum=False).index) == 0


# --------------------------------------------------------------------------- metadata
def test_normalise_age_sex():
    df = pd.DataFrame({"age_approx": ["55", 40.0, "85+", "unknown", "abc", -5, None, "200"],
                       "sex": ["M", "f", "female", "unknown", "Male ", None, "x", "FEMALE"]})
    out, stats = normalise_metadata(df)
    assert out["age_approx"].tolist()[:3] == [55.0, 40.0, 85.0]
    assert out["age_approx"].iloc[3:].isna().all() and out["age_approx"].dtype == np.float64
    assert stats["age_garbage"] == 3  # "abc", -5, "200"; "unknown" and None are just missing
    assert out["sex"].tolist()[:3] == ["male", "female", "female"]
    assert out["sex"].iloc[4] == "male" and out["sex"].iloc[7] == "female"
    assert out["sex"].iloc[[3, 5, 6]].isna().all()
    assert stats["sex_unmapped"] == {"x": 1}


def test_legacy_sites_mapped_to_current_names():
    legacy = ["head/neck", "anterior torso", "posterior torso", "lateral torso", "upper extremity",
              "lower extremity", "palms/soles", "oral/genital", "torso", "unknown", "martian", "back"]
    df = pd.DataFrame({"anatom_site_general": legacy + ["posterior torso"],
                       "anatom_site_1": [None] * len(legacy) + ["Lower extremity"],
                       "anatom_site_2": [None] * len(legacy) + ["Thigh"]})
    out, stats = normalise_metadata(df)
    got = list(zip(out["anatom_site_1"], out["anatom_site_2"], out["anatom_site_special"], strict=True))
    nan = float("nan")
    expected = [("Head and neck", nan, nan), ("Trunk", "Anterior trunk", nan), ("Trunk", "Posterior trunk", nan),
                ("Trunk", "Lateral trunk", nan), ("Upper extremity", nan, nan), ("Lower extremity", nan, nan),
                (nan, nan, "acral palms or soles"), (nan, nan, "oral or genital"), ("Trunk", nan, nan),
                (nan, nan, nan), (nan, nan, nan), ("Trunk", "Posterior trunk", nan),
                ("Lower extremity", "Thigh", nan)]  # a current site is never overwritten by the legacy one
    norm = [tuple("nan" if pd.isna(v) else v for v in t) for t in got]
    assert norm == [tuple("nan" if isinstance(v, float) else v for v in t) for t in expected]
    assert stats["sites"]["from_legacy"] == 10 and stats["sites"]["unmapped_legacy"] == {"martian": 1}
    assert out["anatom_site_general"].tolist() == df["anatom_site_general"].tolist()  # input column kept


# --------------------------------------------------------------------------- the stage
def test_run_writes_every_output(b):
    b.add(1, jpeg(), diagnosis_1="Malignant", sex="F", age_approx="45")
    b.add(2, jpeg(seed=2))
    b.add(3, b"broken")
    b.add(4, jpeg(), diagnosis_1=None)
    paths = Paths(b.root)
    write_index(b.df(), paths, "dedupe")
    params = parse_params({"ingest": {"sources": [{"kind": "synthetic"}]}})
    summary = run(params, paths)
    assert summary["rows_out"] == 2 and summary["dropped_by_reason"] == {"undecodable": 1, "unlabeled": 1}
    idx = pd.read_parquet(paths.index("clean"))
    assert {"target", "label", "label_column", "linked_ids", "image_width", "dup_group", "keep"} <= set(idx.columns)
    assert idx.loc[idx.isic_id == "ISIC_0000001", "sex"].item() == "female"
    dropped = pd.read_csv(paths.stage("clean") / "dropped.csv")
    assert list(dropped.columns[:4]) == ["source", "isic_id", "reason", "detail"] and len(dropped) == 2
    assert pd.read_csv(paths.stage("clean") / "quarantine.csv")["reason"].tolist() == ["undecodable"]
    metrics = json.loads((paths.reports / "clean" / "metrics.json").read_text())
    assert metrics["rows_in"] == 4 and metrics["classes"] == {"benign": 1, "malignant": 1, "malignant_share": 0.5}
    assert (paths.reports / "clean" / "class_balance.png").read_bytes()[:4] == b"\x89PNG"
    bal = pd.read_csv(paths.reports / "clean" / "class_balance.csv")
    assert bal.to_dict("records") == [{"source": "s1", "benign": 1, "malignant": 1, "total": 2,
                                       "malignant_share": 0.5}]


def test_empty_input_does_not_crash(b):
    b.add(1, None, diagnosis_1=None)
    res = clean(b)
    assert res.index.empty and res.dropped["reason"].tolist() == ["unlabeled"]


# --------------------------------------------------------------------------- hardening
def test_bomb_damaged_and_truncated_jpegs_are_quarantined_with_their_reason(b):
    """Regression: a header claiming 20000x20000 was decoded (1.2 GB), and a JPEG with garbage in its scan data
    decoded to garbled pixels that were kept (libjpeg only warned on stderr)."""
    from tests.tasks.core.image_fixtures import bomb_jpeg, garbage_scan_jpeg, truncated_jpeg, valid_jpeg

    b.add(1, valid_jpeg(80, 60))
    b.add(2, bomb_jpeg())
    b.add(3, garbage_scan_jpeg())
    b.add(4, truncated_jpeg())
    res = clean(b, workers=1)
    q = res.quarantine.set_index("isic_id")
    assert q["reason"].to_dict() == {"ISIC_0000002": "too_large", "ISIC_0000003": "corrupt",
                                     "ISIC_0000004": "truncated"}
    assert "20000x20000" in q.at["ISIC_0000002", "detail"] and "Corrupt JPEG data" in q.at["ISIC_0000003", "detail"]
    assert res.index["isic_id"].tolist() == ["ISIC_0000001"]
    assert res.metrics["quarantined"] == 3


def test_pixel_cap_is_checked_before_decoding(monkeypatch):
    from tasks.core import images
    from tests.tasks.core.image_fixtures import valid_jpeg

    data = valid_jpeg(100, 50)
    assert check_image_bytes(data, 32, max_pixels=5000).reason is None
    monkeypatch.setattr(images.cv2, "imdecode", lambda *a: (_ for _ in ()).throw(AssertionError("decoded")))
    check = check_image_bytes(data, 32, max_pixels=4999)
    assert check.reason == "too_large" and "over the cap of 4,999 px" in check.detail


def test_too_small_keeps_its_size():
    c = check_image_bytes(jpeg(20, 200), 32)
    assert (c.reason, c.width, c.height) == ("too_small", 20, 200)


def test_forced_rerun_is_byte_identical_and_timings_are_not_metrics(b):
    b.add(1, jpeg(), diagnosis_1="Malignant")
    b.add(2, jpeg(seed=2))
    b.add(3, b"broken")
    paths = Paths(b.root)
    write_index(b.df(), paths, "dedupe")
    params = parse_params({"ingest": {"sources": [{"kind": "synthetic"}]}})

    def outputs() -> dict[str, bytes]:
        files = [*paths.stage("clean").rglob("*"), *(paths.reports / "clean").rglob("*")]
        return {str(p): p.read_bytes() for p in files if p.is_file() and p.name != "run_stats.json"}

    run(params, paths)
    first = outputs()
    run(params, paths)
    assert outputs() == first
    metrics = json.loads((paths.reports / "clean" / "metrics.json").read_text())
    stats = json.loads((paths.reports / "clean" / "run_stats.json").read_text())
    assert "timing" not in metrics and stats["images_checked"] == 3 and "image_check_s" in stats


def test_schema_error_is_an_input_error():
    from tasks.core.errors import InputError

    assert issubclass(SchemaError, InputError)
