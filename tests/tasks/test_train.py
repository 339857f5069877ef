"""train: row selection, metadata encoding, stacking, deterministic augmentation, builders, weights, the stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks import train
from tasks.core.config import Params, parse_params
from tasks.core.io import Paths
from tasks.models import bundle, inputs


def _index() -> pd.DataFrame:
    rows = []
    for i, (split, target, aug, syn) in enumerate([
        ("train", 1, None, False), ("train", 0, None, False), ("train", 1, "src", False), ("train", 1, None, True),
        ("val", 0, None, False), ("val", 1, "src", False), ("val", 1, None, True), ("test", 1, None, False),
        ("test", None, None, False),
    ]):
        rows.append({"source": "src" if aug is None else "src+aug0", "isic_id": f"I{8 - i}", "split": split,
                     "target": target, "augmented_from": aug, "synthetic": syn, "processed_path": f"p{i}.png"})
    return pd.DataFrame(rows)


def test_select_rows_keeps_val_and_test_real_and_train_as_configured() -> None:
    idx = _index()
    val = inputs.select_rows(idx, "val")
    assert val["isic_id"].tolist() == ["I4"]  # the offline copy and the synthetic image never reach val
    assert inputs.select_rows(idx, "test")["isic_id"].tolist() == ["I1"]  # unlabelled row dropped
    all_train = inputs.select_rows(idx, "train")  # sorted by key: (src, I5/I7/I8), then (src+aug0, I6)
    assert all_train["isic_id"].tolist() == ["I5", "I7", "I8", "I6"]
    only_real = inputs.select_rows(idx, "train", include_offline_copies=False, include_synthetic=False)
    assert sorted(only_real["isic_id"]) == ["I7", "I8"]
    assert only_real["target"].dtype.kind == "i"


def test_cap_stratified_keeps_both_classes_and_is_seeded() -> None:
    df = pd.DataFrame({"source": "s", "isic_id": [f"{i:03d}" for i in range(100)], "target": [1] * 10 + [0] * 90})
    a = train.cap_stratified(df, 20, seed=1)
    assert len(a) == 20 and a["target"].sum() == 2
    assert a.equals(train.cap_stratified(df, 20, seed=1))
    assert not a.equals(train.cap_stratified(df, 20, seed=2))
    tiny = train.cap_stratified(df, 5, seed=0)
    assert set(tiny["target"]) == {0, 1}


def test_class_weights_balance_the_classes() -> None:
    w = train.class_weights(np.array([0, 0, 0, 1]))
    assert w[0] * 3 == pytest.approx(w[1] * 1)
    assert w == {0: pytest.approx(4 / 6), 1: pytest.approx(2.0)}


def test_metadata_encoding_learns_from_train_and_handles_unknowns() -> None:
    tr = pd.DataFrame({"age_approx": [40, 60, np.nan, 50], "sex": ["male", "female", None, "MALE"],
                       "anatom_site_1": ["back", "back", None, "leg"],
                       "anatom_site_general": [None, None, "back", "arm"]})
    spec = inputs.metadata_spec(tr, site_min_count=2)
    assert spec["sites"] == ["back"]  # leg seen once -> "other"; the legacy column fills anatom_site_1 gaps
    assert spec["age_mean"] == pytest.approx(50.0)
    x = inputs.encode_metadata(tr, spec)
    assert x.shape == (4, inputs.metadata_dim(spec)) and x.dtype == np.float32
    # columns: age_z, age_missing, male, female, sex_unknown, back, other, site_unknown
    np.testing.assert_array_equal(x[:, 1], [0, 0, 1, 0])
    np.testing.assert_array_equal(x[:, 2:5], [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]])
    np.testing.assert_array_equal(x[:, 5:8], [[1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0]])
    new = pd.DataFrame({"isic_id": ["x"]})  # no metadata at all (e.g. predict on bare files)
    np.testing.assert_array_equal(inputs.encode_metadata(new, spec)[0, 1:], [1, 0, 0, 1, 0, 0, 1])


def test_stacker_weights_the_informative_member_and_mean_mode() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    good = (y * 2 - 1) * 1.0 + rng.normal(0, 1, 2000)
    noise = rng.normal(0, 1, 2000)
    coef, bias = train.fit_stacker(np.stack([good, noise], axis=1), y)
    assert coef[0] > 1.0 and abs(coef[1]) < 0.2 * coef[0]
    assert train.fit_stacker(np.stack([good, noise], axis=1), y, "mean") == ([0.5, 0.5], 0.0)


def test_operating_point_reaches_target_sensitivity_on_val() -> None:
    from tasks.core.metrics import binary_metrics, threshold_for_sensitivity

    p = np.array([0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1, 0.05, 0.65])
    y = np.array([1, 1, 0, 1, 1, 0, 0, 1, 0, 0])
    t = threshold_for_sensitivity(p, y, 0.8)
    assert t == 0.4  # the 4th of 5 positives by score
    assert binary_metrics(p, y, t)["sensitivity"] == 0.8
    assert binary_metrics(p, y, np.nextafter(t, 1))["sensitivity"] < 0.8  # and it is the largest such threshold


def test_online_augmentation_depends_only_on_draw_index(lf_tiny_params: Params) -> None:
    """Parallel tf.data threads call the augmenter in any order; the output must not care."""
    aug = train.make_augment(lf_tiny_params.augment, 32, base_seed=7)
    img = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    forward = [aug(np.int64(k), img) for k in range(12)]
    with ThreadPoolExecutor(4) as pool:
        shuffled = list(pool.map(lambda k: (k, aug(np.int64(k), img)), [5, 3, 11, 0, 7, 1, 9, 2, 10, 4, 8, 6]))
    for k, out in shuffled:
        np.testing.assert_array_equal(out, forward[k])
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert len({o.tobytes() for o in forward}) > 6  # draws differ from each other
    other_seed = train.make_augment(lf_tiny_params.augment, 32, base_seed=8)
    assert not np.array_equal(other_seed(np.int64(0), img), forward[0])


def test_missing_imagenet_weights_give_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.models import classifier as C

    monkeypatch.setattr(C, "keras_home", lambda: tmp_path / "keras")  # Keras fixes its own at import time
    monkeypatch.setattr(C, "SHARED_WEIGHTS", tmp_path / "no-shared")
    with pytest.raises(C.WeightsMissingError) as err:
        C.build_member("mobilenet_v2", 32, input_size=224, weights="imagenet", alpha=0.35)
    msg = str(err.value)
    expected = tmp_path / "keras" / "models" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
    assert str(expected) in msg
    assert "download_weights" in msg and "weights: none" in msg
    with pytest.raises(ValueError, match="input_size"):
        C.build_member("mobilenet", 32, weights="imagenet", alpha=0.25)  # no 32 px weights exist


def test_shared_mobilenet_weights_are_seeded_and_loaded() -> None:
    from tasks.models import classifier as C

    if not (C.SHARED_WEIGHTS / "mobilenet_2_5_224_tf_no_top.h5").exists():
        pytest.skip("../shared/weights/keras not present")
    seeded = C.keras_home() / "models" / "mobilenet_2_5_224_tf_no_top.h5"
    m = C.build_member("mobilenet", 64, input_size=224, weights="imagenet", alpha=0.25, name="mn")
    assert seeded.exists() and seeded.stat().st_size == 2108140  # copied from ../shared (or already there)
    r = C.build_member("mobilenet", 64, input_size=224, weights="none", alpha=0.25, name="rand")
    w_loaded, w_random = m.get_layer("conv1").get_weights()[0], r.get_layer("conv1").get_weights()[0]
    assert w_loaded.shape == w_random.shape and not np.allclose(w_loaded, w_random)
    assert C.freeze_backbone(m, None) == 0
    n_top = C.freeze_backbone(m, 10)
    assert 0 < n_top < 10
    assert all(not lyr.trainable for lyr in C.backbone_layers(m) if type(lyr).__name__ == "BatchNormalization")
    assert C.last_conv_layer(m).name == "conv_pw_13_relu"


def test_dual_input_ensemble_saves_and_reloads(tmp_path: Path) -> None:
    from tasks.models import classifier as C

    a = C.build_member("small_cnn", 32, name="a", seed=0)
    b = C.build_member("small_cnn", 32, input_size=40, metadata_dim=4, name="b", seed=1)
    assert C.input_names(b) == ["image", "metadata"]
    ens = C.build_ensemble([a, b], [0.7, -0.2], 0.1, image_size=32, metadata_dim=4)
    rng = np.random.default_rng(0)
    x = {"image": rng.uniform(0, 255, (3, 32, 32, 3)).astype("float32"),
         "metadata": rng.normal(size=(3, 4)).astype("float32")}
    la = np.asarray(C.logit_model(a)({"image": x["image"]}, training=False)).ravel()
    lb = np.asarray(C.logit_model(b)(x, training=False)).ravel()
    expected = 1 / (1 + np.exp(-(0.7 * la - 0.2 * lb + 0.1)))
    got = ens.predict(x, verbose=0).ravel()
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    ens.save(tmp_path / "e.keras")
    again = C.load_keras(tmp_path / "e.keras")
    np.testing.assert_allclose(again.predict(x, verbose=0).ravel(), got, rtol=1e-6)
    assert [m.name for m in C.member_models(again)] == ["a", "b"]
    cams = C.gradcam(C.member_models(again)[1], x)
    assert cams.shape[0] == 3 and cams.min() >= 0 and cams.max() <= 1


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mobilenet", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
                                  "densenet121", "vgg16", "xception"])
def test_every_backbone_builds_without_weights(arch: str) -> None:
    from tasks.models import classifier as C

    size = 71 if arch == "xception" else 32  # Xception needs >= 71 px
    m = C.build_member(arch, size, weights="none", name=arch, metadata_dim=3)
    out = m.predict({"image": np.full((2, size, size, 3), 128, "float32"), "metadata": np.zeros((2, 3), "float32")},
                    verbose=0)
    assert out.shape == (2, 1) and np.all((out > 0) & (out < 1))
    assert len(C.backbone_layers(m)) > 10


def test_train_stage_writes_model_config_and_reports(lf_trained: Path, lf_tiny_params: Params) -> None:
    paths = Paths(lf_trained)
    cfg = inputs.load_config(paths.models)
    assert (paths.models / inputs.MODEL_FILE).stat().st_size > 10_000
    assert cfg["image_size"] == 32 and cfg["preprocess"] == lf_tiny_params.preprocess.model_dump(mode="json")
    assert cfg["metadata"]["sites"] == ["arm", "back", "leg"] and cfg["tta"] == 2
    assert 0 < cfg["threshold"] < 1 and len(cfg["stacker"]["coef"]) == 2
    metrics = json.loads((paths.reports / "train" / "metrics.json").read_text())
    assert metrics["n_train"] == 48 and metrics["n_val"] == 24
    assert metrics["val_at_threshold"]["sensitivity"] >= lf_tiny_params.train.target_sensitivity
    assert set(metrics["members"]) == {"cnn", "meta"}
    hist = pd.read_csv(paths.reports / "train" / "history.csv")
    assert list(hist["member"]) == ["cnn", "meta"] and {"loss", "val_auc", "val_loss"} <= set(hist.columns)

    # The saved model + stored threshold reproduce the reported val operating point.
    from tasks.models.classifier import load_keras

    idx = pd.read_parquet(paths.index(inputs.INPUT_STAGE))
    val = inputs.select_rows(idx, "val")
    imgs = inputs.load_images([str(paths.abs(p)) for p in val["processed_path"]], 32)
    p = bundle.predict_proba(load_keras(paths.models / inputs.MODEL_FILE), imgs,
                            inputs.encode_metadata(val, cfg["metadata"]), tta=cfg["tta"])
    tp = int(((p >= cfg["threshold"]) & (val["target"] == 1)).sum())
    assert tp == metrics["val_at_threshold"]["tp"]
    assert metrics["val_auc"] > 0.8  # the lesions are learnable: one epoch already separates them


@pytest.mark.slow
def test_train_rerun_in_process_gives_identical_weights_and_metrics(lf_trained: Path, lf_tiny_params: Params,
                                                                    tmp_path: Path) -> None:
    from tests.tasks.conftest import build_tiny_project

    root = build_tiny_project(tmp_path / "again", lf_tiny_params)
    train.run(lf_tiny_params, Paths(root))
    for rel in ("reports/train/metrics.json", "reports/train/history.csv", "models/classifier.json",
                "models/classifier.keras"):  # the .keras file too: no save timestamp inside
        assert (root / rel).read_bytes() == (lf_trained / rel).read_bytes(), rel
    _assert_same_weights(root / "models" / inputs.MODEL_FILE, lf_trained / "models" / inputs.MODEL_FILE)


def _assert_same_weights(a: Path, b: Path) -> None:
    from tasks.models.classifier import load_keras

    wa, wb = load_keras(a).get_weights(), load_keras(b).get_weights()
    assert len(wa) == len(wb)
    for x, y in zip(wa, wb):
        np.testing.assert_array_equal(x, y)


def test_train_refuses_a_split_without_malignant_images(lf_tiny_project: Path, lf_tiny_params: Params) -> None:
    paths = Paths(lf_tiny_project)
    idx = pd.read_parquet(paths.index(inputs.INPUT_STAGE))
    idx.loc[idx["split"] == "val", "target"] = 0
    idx.to_parquet(paths.index(inputs.INPUT_STAGE))
    with pytest.raises(ValueError, match="split 'val' needs benign and malignant"):
        train.run(lf_tiny_params, paths)


@pytest.mark.slow
def test_reruns_in_fresh_processes_are_bit_identical(lf_tiny_params: Params, tmp_path: Path) -> None:
    """The real thing: the stage twice, each in a new process without TF_ENABLE_ONEDNN_OPTS in its
    environment (run() must set it before TF loads), op determinism, parallel tf.data augmentation."""
    from tests.tasks.conftest import TINY, build_tiny_project

    code = ("import json, sys; from pathlib import Path; from tasks import train; from tasks.core.config import "
            "load_params; from tasks.core.io import Paths; "
            "print(json.dumps(train.run(load_params(sys.argv[1]), Paths(Path(sys.argv[2])))))")
    repo = Path(__file__).resolve().parents[2]
    roots = []
    for name in ("a", "b"):
        root = build_tiny_project(tmp_path / name, lf_tiny_params)
        env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
        res = subprocess.run([sys.executable, "-c", code, str(TINY), str(root)], env=env, capture_output=True,
                             text=True, timeout=600, cwd=repo)
        assert res.returncode == 0, res.stderr[-3000:]
        assert json.loads(res.stdout.strip().splitlines()[-1])["members"] == 2
        roots.append(root)
    a, b = roots
    for rel in ("reports/train/metrics.json", "reports/train/history.csv", "models/classifier.json",
                "models/classifier.keras"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    _assert_same_weights(a / "models" / inputs.MODEL_FILE, b / "models" / inputs.MODEL_FILE)


@pytest.mark.slow
def test_two_phase_transfer_learning_with_focal_loss(lf_tiny_project: Path, lf_tiny_params: Params) -> None:
    """MobileNet (random init so no weights are needed) trains phase 1 frozen, then fine-tunes the top layers."""
    data = lf_tiny_params.model_dump(mode="json")
    data["train"].update(epochs=1, fine_tune_epochs=1, fine_tune_layers=12, loss="focal", class_weight=False,
                         members=[{"name": "mn", "arch": "mobilenet", "alpha": 0.25, "weights": "none"}])
    params = parse_params(data)
    summary = train.run(params, Paths(lf_tiny_project))
    hist = pd.read_csv(lf_tiny_project / "reports" / "train" / "history.csv")
    assert list(hist["phase"]) == [1, 2] and list(hist["epoch"]) == [1, 2]
    assert hist["learning_rate"].iloc[1] == pytest.approx(params.train.fine_tune_lr)
    assert summary["members"] == 1
