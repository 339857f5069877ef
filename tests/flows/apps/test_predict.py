"""predict: model discovery, input collection, error rows, and that it preprocesses exactly like training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.apps import predict as P
from tasks.models.inputs import INPUT_STAGE


def test_collect_inputs_walks_folders_and_keeps_missing_files(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    for rel in ("a/2.jpg", "a/b/1.PNG", "a/notes.txt", "a/b/.hidden.csv"):
        (tmp_path / rel).write_bytes(b"x")
    got = P.collect_inputs([tmp_path / "a", tmp_path / "missing.jpg"])
    assert got == [tmp_path / "a" / "2.jpg", tmp_path / "a" / "b" / "1.PNG", tmp_path / "missing.jpg"]


def test_is_uri() -> None:
    assert P.is_uri("models:/lesionflow-classifier@champion") and P.is_uri("runs:/abc/model")
    assert not P.is_uri("models") and not P.is_uri("C:/models") and not P.is_uri("/abs/models")


def test_load_bundle_explains_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no classifier.keras here"):
        P.load_bundle(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        P.load_bundle(tmp_path / "nothing.txt")
    (tmp_path / "m.keras").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="m.json not found"):
        P.load_bundle(tmp_path / "m.keras")


def test_predict_scores_folders_and_reports_bad_files(lf_trained: Path, tmp_path: Path) -> None:
    raw = lf_trained / "data" / "ingest" / "images"
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    tiny = tmp_path / "tiny.png"  # below the minimum side: an error row, not a score
    import cv2

    cv2.imwrite(str(tiny), np.full((8, 8, 3), 128, np.uint8))
    out = tmp_path / "preds.csv"
    summary = P.predict(lf_trained / "models", [raw, bad, tmp_path / "gone.png", tiny], out, root=lf_trained)
    df = pd.read_csv(out)
    assert list(df.columns) == P.OUTPUT_COLUMNS and len(df) == 96 + 3 and summary["errors"] == 3
    errors = df[df["error"].notna()]
    assert errors["isic_id"].tolist() == ["broken", "gone", "tiny"]
    assert "cannot decode" in errors["error"].iloc[0] and "FileNotFoundError" in errors["error"].iloc[1]
    assert "min_side" in errors["error"].iloc[2] or "small" in errors["error"].iloc[2]
    assert errors["probability_malignant"].isna().all() and errors["prediction"].isna().all()
    ok = df[df["error"].isna()]
    threshold = json.loads((lf_trained / "models" / "classifier.json").read_text())["threshold"]
    assert (ok["prediction"] == (ok["probability_malignant"] >= threshold).astype(int)).all()
    assert ok["isic_id"].iloc[0] == "ISIC_0000000"

    # Same preprocessing as training: raw file -> stored config == the processed PNG the model trained on.
    from tasks.models.bundle import predict_proba
    from tasks.models.classifier import load_keras
    from tasks.models.inputs import encode_metadata, load_config
    from tasks.models.inputs import load_images as load_val_images

    cfg = load_config(lf_trained / "models")
    ids = ok["isic_id"].head(8).tolist()
    processed = load_val_images([str(lf_trained / "data" / INPUT_STAGE / "images" / f"{i}.png") for i in ids], 32)
    meta = encode_metadata(pd.DataFrame(index=range(len(ids))), cfg["metadata"])  # files carry no metadata
    expected = predict_proba(load_keras(lf_trained / "models" / "classifier.keras"), processed, meta, tta=cfg["tta"])
    np.testing.assert_allclose(ok["probability_malignant"].head(8), expected, atol=1e-6)

    # Malignant lesions score higher than benign ones (labels of the fixture: every 5th pattern).
    index = pd.read_parquet(lf_trained / "data" / INPUT_STAGE / "index.parquet")
    merged = ok.merge(index[["isic_id", "target"]], on="isic_id")
    assert merged.groupby("target")["probability_malignant"].mean().diff().iloc[-1] > 0


def test_bundle_accepts_bytes_and_metadata(lf_trained: Path) -> None:
    bundle = P.load_bundle(lf_trained / "models" / "classifier.keras")
    files = sorted((lf_trained / "data" / "ingest" / "images").glob("*.png"))[:4]
    meta = {"age_approx": [35.0, np.nan, 70.0, 50.0], "sex": ["female", None, "male", "male"],
            "anatom_site_1": ["back", "leg", None, "scalp"]}
    by_path = bundle.predict_frame(pd.DataFrame({"path": [str(f) for f in files], **meta}))
    by_bytes = bundle.predict_frame(pd.DataFrame({"image": [f.read_bytes() for f in files], **meta}))
    np.testing.assert_array_equal(by_path["probability_malignant"], by_bytes["probability_malignant"])
    no_meta = bundle.predict_frame(pd.DataFrame({"path": [str(f) for f in files]}))
    assert not np.allclose(no_meta["probability_malignant"], by_path["probability_malignant"])  # metadata is used
    with pytest.raises(ValueError, match="`path` column"):
        bundle.predict_frame(pd.DataFrame({"x": [1]}))


def test_oversized_image_is_an_error_row_and_the_batch_goes_on(lf_trained: Path, tmp_path: Path) -> None:
    """Issue 10: a photo over the pixel cap is refused per row; the cap comes from --max-pixels or the model."""
    files = sorted((lf_trained / "data" / "ingest" / "images").glob("*.png"))[:3]  # 64 x 48 = 3072 px each
    out = tmp_path / "capped.csv"
    summary = P.predict(lf_trained / "models", files, out, max_pixels=1000)
    df = pd.read_csv(out)
    assert summary["errors"] == 3 and summary["max_pixels"] == 1000 and df["probability_malignant"].isna().all()
    assert df["error"].str.contains("large|max_pixels|pixels", case=False).all()
    bundle = P.load_bundle(lf_trained / "models")
    assert bundle.pixel_cap == bundle.config["preprocess"].get("max_pixels", 50_000_000)
    ok = bundle.predict_frame(pd.DataFrame({"path": [str(f) for f in files]}))
    assert ok["error"].isna().all()
