"""Ugly-duckling scores: leave-one-out centroid maths, per-patient ranking, metrics, Keras embeddings, stage run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.core.outliers import loo_centroid_scores, rank_desc
from tasks.ugly_duckling import (
    score_patients,
    synthetic_patients,
    within_patient_metrics,
)


def test_loo_centroid_matches_hand_computation() -> None:
    emb = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]])
    s = loo_centroid_scores(emb)
    # row 0 vs mean of rows 1,2 = (1, 2) -> sqrt(5); row 1 vs (0, 2) -> sqrt(8); row 2 vs (1, 0) -> sqrt(17)
    assert s == pytest.approx([np.sqrt(5), np.sqrt(8), np.sqrt(17)])
    assert np.isnan(loo_centroid_scores(emb[:1])).all()


def test_photos_of_one_lesion_do_not_pull_their_own_centroid() -> None:
    # lesion A photographed 3 times: per-image LOO would make A look typical; per-lesion it stays odd.
    emb = np.array([[5.0, 0], [5.0, 0], [5.0, 0], [0, 1.0], [0, 1.1], [0, 0.9]])
    s = loo_centroid_scores(emb, ["A", "A", "A", "B", "C", "D"])
    assert s[0] == s[1] == s[2] and s[0] > s[3:].max()
    per_image = loo_centroid_scores(emb)
    assert per_image[0] < s[0]


def test_rank_desc_ties_and_nan() -> None:
    assert list(rank_desc(np.array([0.2, 0.9, np.nan, 0.9]))) == [3, 1, 4, 2]


def test_score_patients_ranks_the_planted_odd_lesion_and_skips_small_patients() -> None:
    rng = np.random.default_rng(0)
    rows, emb = [], []
    for p in range(5):
        odd = p % 4
        for i in range(4):
            rows.append({"patient_id": f"P{p}", "lesion_id": f"L{p}{i}", "target": int(i == odd)})
            emb.append(np.r_[rng.normal(0, 0.05, 8) + 1, 3.0 if i == odd else 0.0])
    rows += [{"patient_id": "SMALL", "lesion_id": f"S{i}", "target": 0} for i in range(2)]
    emb += [np.ones(9), np.ones(9)]
    rows.append({"patient_id": None, "lesion_id": "X", "target": 1})
    emb.append(np.ones(9))
    df = pd.DataFrame(rows)
    out = score_patients(df, np.array(emb), min_lesions=3)
    ranked = out[out["patient_id"].str.startswith("P", na=False)]
    assert (ranked.loc[ranked["target"] == 1, "ud_rank"] == 1).all()
    assert ranked["ud_score"].notna().all()
    small = out[out["patient_id"] == "SMALL"]
    assert small["ud_score"].isna().all() and small["ud_rank"].isna().all() and (small["ud_lesions"] == 2).all()
    assert out["ud_rank"].iloc[-1] is pd.NA
    m = within_patient_metrics(out)
    assert m["patients"] == 5 and m["auc_pooled"] == 1.0 and m["top1_hit_rate"] == 1.0
    assert m["top1_chance"] == pytest.approx(0.25)


def test_within_patient_metrics_hand_example() -> None:
    df = pd.DataFrame({"patient_id": ["a"] * 3 + ["b"] * 3, "lesion_id": list("123456"),
                       "target": [1, 0, 0, 1, 0, 0], "ud_score": [0.9, 0.5, 0.1, 0.2, 0.5, 0.3]})
    m = within_patient_metrics(df)
    # patient a: malignant above both benign (2/2); b: below both (0/2) -> pooled 2/4
    assert m["auc_pooled"] == 0.5 and m["auc_patient_mean"] == 0.5
    assert m["top1_hit_rate"] == 0.5 and m["pairs"] == 4 and m["patients_with_both_classes"] == 2


def test_synthetic_patients_plant_exactly_one_malignant() -> None:
    images, meta = synthetic_patients(3, 4, seed=1, size=48)
    assert len(images) == 12 and images[0].shape == (48, 48, 3)
    assert (meta.groupby("patient_id")["target"].sum() == 1).all()
    with pytest.raises(ValueError, match=">= 3"):
        synthetic_patients(1, 2, seed=0)


# --------------------------------------------------------------------------- Keras (one untrained tiny model)
@pytest.fixture(scope="module")
def tiny_bundle():
    from tasks.core.config import Preprocess
    from tasks.models.bundle import Bundle
    from tasks.models.classifier import build_small_cnn

    model = build_small_cnn(32, filters=(4, 8), name="m0")
    cfg = {"image_size": 32, "preprocess": Preprocess(size=32).model_dump(mode="json"), "threshold": 0.5,
           "tta": 0, "metadata": None}
    return Bundle(model=model, config=cfg, source="test")


def test_embedding_model_is_the_penultimate_layer(tiny_bundle) -> None:
    from tasks.models.bundle import Scorer, embedding_model
    from tasks.models.classifier import build_ensemble, build_small_cnn

    images, _ = synthetic_patients(1, 3, seed=0, size=40)
    scorer = Scorer(tiny_bundle)
    batch = scorer.prepare(images)
    assert batch.shape == (3, 32, 32, 3)
    emb = scorer.embeddings(batch)
    assert emb.shape == (3, 8)  # last conv block's 8 filters, globally pooled
    # same numbers as the layer inside the full model
    feats = embedding_model(tiny_bundle.model).predict_on_batch({"image": batch.astype("float32")})
    assert np.allclose(emb, feats, atol=1e-5)
    p = scorer.probabilities(batch)
    assert p.shape == (3,) and ((p >= 0) & (p <= 1)).all()
    other = build_small_cnn(32, filters=(4, 6), name="m1")
    ens = build_ensemble([tiny_bundle.model, other], [1.0, 1.0], 0.0, image_size=32)
    assert embedding_model(ens).output.shape[-1] == 14  # members concatenated


def test_stage_run_writes_scores_plot_and_metrics(tmp_path: Path, tiny_bundle) -> None:
    import cv2

    from tasks.core.config import parse_params
    from tasks.core.io import Paths, read_index, write_index
    from tasks.ugly_duckling import run

    paths = Paths(tmp_path)
    images, meta = synthetic_patients(4, 4, seed=2, size=48)
    rows = []
    for i, (img, m) in enumerate(zip(images, meta.to_dict("records"))):
        f = tmp_path / "raw" / f"ISIC_{i:07d}.png"
        f.parent.mkdir(exist_ok=True)
        cv2.imwrite(str(f), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        rows.append({"source": "t", "isic_id": f.stem, "path": f"raw/{f.name}", **m})
    rows.append({"source": "t", "isic_id": "ISIC_broken", "path": "raw/missing.png", "patient_id": "SP_0000",
                 "lesion_id": "extra", "target": 0})  # unreadable: quarantined, not a crash
    write_index(pd.DataFrame(rows), paths, "clean")
    params = parse_params({"ingest": {"sources": [{"kind": "synthetic"}]},
                           "ugly_duckling": {"mlflow": False, "synthetic_patients": 3, "synthetic_lesions": 3}})
    summary = run(params, paths, bundle=tiny_bundle)
    assert summary["images"] == 16 and summary["errors"] == 1 and summary["patients"] == 4
    scores = pd.read_csv(tmp_path / "data" / "ugly_duckling" / "scores.csv")
    assert {"probability_malignant", "ud_score", "ud_rank", "patient_id", "target"} <= set(scores.columns)
    assert scores.groupby("patient_id")["ud_rank"].min().eq(1).all()
    assert len(read_index(paths, "ugly_duckling")) == 16
    metrics = json.loads((tmp_path / "reports" / "ugly_duckling" / "metrics.json").read_text())
    assert metrics["real"]["patients_with_malignant"] == 4 and metrics["synthetic"]["patients"] == 3
    assert 0 <= metrics["real"]["auc_pooled"] <= 1
    assert (tmp_path / "reports" / "ugly_duckling" / "tsne.png").stat().st_size > 5000
