"""Upsample: ratio arithmetic, source choice, no-leak guarantees, pass-through, quality signal, the stage."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks import upsample as up
from tasks.core.config import parse_params
from tasks.core.io import KEY, Paths, read_index
from tests.tasks.gan_fixture import make_preprocess


def params(**upsample):
    return parse_params({"ingest": {"sources": [{"kind": "synthetic"}]}, "preprocess": {"size": 24},
                         "upsample": {"mlflow": False, "kid_subset_size": 4, "kid_subsets": 5, **upsample}})


# --------------------------------------------------------------------------- how many
@pytest.mark.parametrize("malignant,benign,ratio,expected", [
    (10, 90, 0.0, 0),     # 0 disables
    (10, 90, 0.5, 80),    # 90 / 180
    (50, 50, 0.5, 0),     # exactly at target
    (60, 40, 0.5, 0),     # already above target: never removes or adds
    (30, 70, 0.3, 0),     # 0.3 is exactly 3/10, not the float just below it
    (29, 71, 0.3, 2),     # 30/101 < 0.3 <= 31/102
    (0, 10, 0.5, 10),     # no malignant image at all
    (0, 0, 0.5, 0),       # empty train split
    (1, 0, 0.9, 0),
    (10, 90, 0.99, 8900),
])
def test_n_to_generate_table(malignant, benign, ratio, expected):
    assert up.n_to_generate(malignant, benign, ratio) == expected


def test_n_to_generate_is_the_smallest_k_reaching_the_target():
    rng = np.random.default_rng(0)
    for _ in range(300):
        m, b = (int(x) for x in rng.integers(0, 500, 2))
        r = round(float(rng.uniform(0.01, 0.95)), 3)
        k = up.n_to_generate(m, b, r)
        total = m + b
        if total == 0:
            continue
        assert (m + k) / (total + k) >= r - 1e-12
        if k > 0:
            assert (m + k - 1) / (total + k - 1) < r


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_n_to_generate_rejects_impossible_ratios(ratio):
    with pytest.raises(ValueError, match="target_ratio"):
        up.n_to_generate(1, 1, ratio)


# --------------------------------------------------------------------------- from which
def _benign(n: int) -> pd.DataFrame:
    return pd.DataFrame({"source": "s", "isic_id": [f"id{i:03d}" for i in range(n)], "split": "train",
                         "target": 0, "processed_path": [f"p{i}" for i in range(n)]})


def test_candidate_sources_are_seeded_and_independent_of_row_order():
    benign = _benign(20)
    a = up.candidate_sources(benign, seed=1, max_per_source=1)
    b = up.candidate_sources(benign.sample(frac=1, random_state=5), seed=1, max_per_source=1)
    c = up.candidate_sources(benign, seed=2, max_per_source=1)
    assert a["isic_id"].tolist() == b["isic_id"].tolist()
    assert a["isic_id"].tolist() != c["isic_id"].tolist()
    assert sorted(a["isic_id"]) == sorted(benign["isic_id"])  # a permutation: each image once per variant


def test_extra_variants_come_after_every_image_was_used_once():
    cand = up.candidate_sources(_benign(5), seed=0, max_per_source=3)
    assert cand["variant"].tolist() == [0] * 5 + [1] * 5 + [2] * 5
    keys = {up.synthetic_key(s, i, v) for s, i, v in zip(cand["source"], cand["isic_id"], cand["variant"])}
    assert len(keys) == 15 and all(k[0] == "s+cyclegan" for k in keys)


# --------------------------------------------------------------------------- no leaks (pure guard)
def _index() -> pd.DataFrame:
    return pd.DataFrame({
        "source": "s", "isic_id": ["a", "b", "c", "d", "e"], "split": ["train", "train", "val", "test", "train"],
        "target": [0, 1, 0, 0, 0], "group_id": ["g1", "g2", "g3", "g4", "g1"], "processed_path": list("abcde"),
        "diagnosis_1": ["Benign", "Malignant", "Benign", "Benign", "Benign"],
    })


def _synthetic_from(index: pd.DataFrame, ids: list[str]) -> pd.DataFrame:
    src = index.set_index("isic_id").loc[ids].reset_index().assign(variant=0)
    files = [{"sha256": "x", "file_size": 1, "width": 24, "height": 24}] * len(ids)
    return up.synthetic_rows(src, files)


def test_synthetic_rows_keep_group_and_metadata_and_clear_source_labels():
    index = _index()
    syn = _synthetic_from(index, ["a", "e"])
    assert syn[KEY].values.tolist() == [["s+cyclegan", "a-cg0"], ["s+cyclegan", "e-cg0"]]
    assert syn["group_id"].tolist() == ["g1", "g1"]  # grouping stays honest
    assert (syn["target"] == 1).all() and (syn["split"] == "train").all() and syn["synthetic"].all()
    assert syn["source_isic_id"].tolist() == ["a", "e"] and syn["diagnosis_1"].isna().all()
    out = up.combine(index, syn)
    assert len(out) == 7 and out["synthetic"].sum() == 2 and not out.duplicated(KEY).any()
    up.check_no_leak(out, index)  # a valid output passes


def test_leak_guard_rejects_val_or_test_sources_and_non_train_rows():
    index = _index()
    with pytest.raises(up.LeakError, match="not benign train"):
        up.check_no_leak(up.combine(index, _synthetic_from(index, ["c"])), index)  # made from a val image
    with pytest.raises(up.LeakError, match="not benign train"):
        up.check_no_leak(up.combine(index, _synthetic_from(index, ["b"])), index)  # from a malignant image
    moved = _synthetic_from(index, ["a"]).assign(split="test")
    with pytest.raises(up.LeakError, match="outside the train split"):
        up.check_no_leak(up.combine(index, moved), index)
    regrouped = _synthetic_from(index, ["a"]).assign(group_id="g4")
    with pytest.raises(up.LeakError, match="group_id"):
        up.check_no_leak(up.combine(index, regrouped), index)


# --------------------------------------------------------------------------- images and quality
def test_upscale_modes():
    rng = np.random.default_rng(0)
    hi = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    lo = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    assert np.array_equal(up.upscale(hi, lo, lo, "residual"), hi)  # GAN changed nothing: source exactly
    assert up.upscale(hi, lo, 255 - lo, "resize").shape == (24, 24, 3)
    same = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    assert np.array_equal(up.upscale(hi, hi, same, "residual"), same)  # equal sizes: the translation itself
    with pytest.raises(ValueError, match="upscale"):
        up.upscale(hi, lo, lo, "bogus")


def test_kid_is_near_zero_for_one_distribution_and_positive_for_a_shift():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 8)), rng.normal(size=(200, 8))
    same, _ = up.kid(x, y, n_subsets=10, subset_size=100)
    shifted, _ = up.kid(x, y + 1.0, n_subsets=10, subset_size=100)
    assert abs(same) < 0.05 < shifted
    assert math.isnan(up.kid(x[:1], y[:1])[0])


# --------------------------------------------------------------------------- the stage
@pytest.fixture
def project(tmp_path: Path) -> Path:
    """Fixture data + an (untrained) 16 px generator: the stage's guarantees do not depend on GAN quality."""
    import keras

    from tasks.models.gan import GENERATOR_FILE, build_generator
    from tasks.models.saving import save_keras

    make_preprocess(tmp_path, size=24)
    keras.utils.set_random_seed(0)
    save_keras(build_generator(16, base_filters=4, n_res_blocks=1), tmp_path / "models/cyclegan" / GENERATOR_FILE)
    return tmp_path


def test_stage_upsamples_train_only_from_benign_train_images(project: Path):
    paths = Paths(project)
    before = read_index(paths, "augment")
    out = up.run(params(target_ratio=0.5), paths)
    index = read_index(paths, "upsample")

    real, syn = index.loc[~index["synthetic"]], index.loc[index["synthetic"]]
    # every input row, unchanged
    pd.testing.assert_frame_equal(real[before.columns].reset_index(drop=True), before, check_dtype=False)
    # train: 6 benign + 2 malignant real -> 4 synthetic gives 6/12 = 0.5
    assert out["generated"] == len(syn) == 4 and out["ratio_after"] == 0.5
    assert (syn["split"] == "train").all() and (syn["target"] == 1).all()
    val_test = before.loc[before["split"] != "train"]
    assert len(index.loc[index["split"] != "train"]) == len(val_test)  # nothing new in val/test
    benign_train = before.loc[(before["split"] == "train") & (before["target"] == 0) & before["augmented_from"].isna()]
    assert set(syn["source_isic_id"]) <= set(benign_train["isic_id"])
    assert not set(syn["source_isic_id"]) & set(val_test["isic_id"])
    groups = before.set_index("isic_id")["group_id"]
    assert syn["group_id"].tolist() == groups.loc[syn["source_isic_id"]].tolist()
    assert not index.duplicated(KEY).any()
    import cv2

    for rel, sha in zip(syn["processed_path"], syn["sha256"]):
        data = (project / rel).read_bytes()
        assert rel.startswith("data/upsample/images/") and hashlib.sha256(data).hexdigest() == sha
        assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape == (24, 24, 3)  # preprocess size

    metrics = json.loads((project / "reports/upsample/metrics.json").read_text())
    assert 0 <= metrics["synthetic_called_malignant"] <= 1 and np.isfinite(metrics["kid_synthetic_vs_malignant"])
    assert metrics["gan_image_size"] == 16 and (project / "reports/upsample/quality.png").stat().st_size > 0

    # Deterministic: a rerun writes the same index and the same image bytes.
    up.run(params(target_ratio=0.5), paths)
    again = read_index(paths, "upsample")
    pd.testing.assert_frame_equal(again, index)
    assert all(hashlib.sha256((project / r).read_bytes()).hexdigest() == h
               for r, h in zip(syn["processed_path"], syn["sha256"]))  # rewritten, not pruned


def test_ratio_zero_passes_everything_through_without_a_generator(project: Path):
    paths = Paths(project)
    up.run(params(target_ratio=0.5, quality=False), paths)  # leaves images that the next run must remove
    (project / "models/cyclegan/generator_b2m.keras").unlink()  # not needed when nothing is generated
    out = up.run(params(target_ratio=0.0), paths)
    index = read_index(paths, "upsample")
    assert out["generated"] == 0 and not index["synthetic"].any()
    assert len(index) == len(read_index(paths, "augment"))
    assert not list((project / "data/upsample").rglob("*.png"))


def test_max_per_source_adds_turned_variants_and_reports_shortfall(project: Path):
    paths = Paths(project)
    out = up.run(params(target_ratio=0.6, max_per_source=2, quality=False), paths)
    syn = read_index(paths, "upsample").query("synthetic")
    assert out["requested"] == 7 and out["generated"] == 7  # 6 benign sources once, one of them twice
    assert sorted(syn["synthetic_variant"].value_counts().tolist()) == [1, 6]
    assert syn["sha256"].is_unique  # the second variant is a different image
    short = up.run(params(target_ratio=0.9, max_per_source=1, quality=False), paths)
    assert short["generated"] == 6 and json.loads((project / "reports/upsample/metrics.json").read_text())[
        "shortfall"] == short["requested"] - 6
