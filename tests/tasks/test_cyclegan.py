"""CycleGAN: builders, one training step, the pure training helpers, the stage (outputs, resume, determinism)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks import cyclegan as cg
from tasks.core.config import Cyclegan, ParamsError, parse_params
from tasks.core.images import dihedral
from tasks.core.io import Paths
from tasks.models.gan import (
    GENERATOR_FILE,
    GanConfig,
    linear_decay_lr,
    patchgan_downsamples,
    patchgan_receptive_field,
    to_uint8,
    to_unit,
)
from tasks.models.inputs import train_domains
from tests.tasks.gan_fixture import make_preprocess

TINY = dict(image_size=16, base_filters=4, n_res_blocks=1, disc_filters=4, pool_size=3)


def tiny_params(**cyclegan):
    knobs = {**TINY, "epochs": 1, "steps_per_epoch": 2, "decay_epochs": 0, "samples": 2, "mlflow": False,
             **cyclegan}
    return parse_params({"ingest": {"sources": [{"kind": "synthetic"}]}, "preprocess": {"size": 24},
                         "cyclegan": knobs})


# --------------------------------------------------------------------------- pure helpers (no TensorFlow)
def test_patchgan_field_is_the_papers_70px_at_256_and_scales_down():
    assert patchgan_receptive_field(3) == 70  # the "70x70 PatchGAN"
    assert [patchgan_receptive_field(n) for n in (1, 2)] == [16, 34]
    assert patchgan_downsamples(256) == 3
    assert patchgan_downsamples(128) == 2  # 34 px field ~ 70/256 of 128 px
    assert patchgan_downsamples(32) == 1
    assert patchgan_downsamples(16) == 1


@pytest.mark.parametrize("step,expected", [(0, 2e-4), (5, 2e-4), (6, 2e-4), (7, 1.5e-4), (9, 0.5e-4)])
def test_linear_decay_keeps_lr_then_decays_linearly(step, expected):
    assert linear_decay_lr(step, total_steps=10, decay_steps=4, base_lr=2e-4) == pytest.approx(expected)


def test_no_decay_means_constant_lr():
    assert {linear_decay_lr(s, 10, 0, 1e-3) for s in range(10)} == {1e-3}


def test_unit_range_round_trip_is_exact():
    img = np.arange(256, dtype=np.uint8).reshape(4, 4, 16)[..., :3]
    assert np.array_equal(to_uint8(to_unit(img)), img)
    assert to_unit(img).min() == -1.0 and to_unit(img).max() <= 1.0


def test_dihedral_gives_eight_distinct_orientations_and_batches():
    img = np.arange(27, dtype=np.uint8).reshape(3, 3, 3)
    outs = {dihedral(img, k).tobytes() for k in range(8)}
    assert len(outs) == 8
    batch = np.stack([img, img])
    got = dihedral(batch, np.array([0, 5]))
    assert np.array_equal(got[0], img) and np.array_equal(got[1], dihedral(img, 5))


def test_batch_plan_depends_only_on_seed_and_step():
    a = cg.batch_plan(0, 7, n_a=10, n_b=3, batch=4, pool_size=50, flip=True)
    b = cg.batch_plan(0, 7, n_a=10, n_b=3, batch=4, pool_size=50, flip=True)
    c = cg.batch_plan(0, 8, n_a=10, n_b=3, batch=4, pool_size=50, flip=True)
    for key in ("idx_a", "idx_b", "k_a", "k_b"):
        assert np.array_equal(a[key], b[key])
    assert not all(np.array_equal(a[k], c[k]) for k in ("idx_a", "idx_b", "k_a", "k_b"))
    assert a["idx_a"].max() < 10 and a["idx_b"].max() < 3
    assert len(set(a["pool_a"][1].tolist())) == 4  # distinct pool slots: vectorised writes never collide
    assert not cg.batch_plan(0, 7, 10, 3, 4, 50, flip=False)["k_a"].any()


def test_train_domains_use_real_train_images_only():
    rows = pd.DataFrame({
        "source": ["s"] * 7, "isic_id": ["e", "d", "c", "b", "a", "f", "g"],
        "split": ["train", "train", "val", "test", "train", "train", "train"],
        "target": [0, 1, 0, 1, 0, 1, 0], "processed_path": list("1234567"),
        "synthetic": [False, False, False, False, False, True, False],
        "augmented_from": [None, None, None, None, None, None, "s"],
    })
    benign, malignant = train_domains(rows)
    assert benign["isic_id"].tolist() == ["a", "e"]  # sorted; val/test and the augmented copy g excluded
    assert malignant["isic_id"].tolist() == ["d"]  # the synthetic f excluded
    with pytest.raises(ValueError, match="processed_path"):
        train_domains(rows.drop(columns=["processed_path"]), "idx.parquet")


def test_fingerprint_ignores_run_length_but_not_architecture_or_data():
    base = Cyclegan(**TINY)
    fp = cg.config_fingerprint(base, "data1")
    assert cg.config_fingerprint(base.model_copy(update={"epochs": 50, "samples": 9}), "data1") == fp
    assert cg.config_fingerprint(base.model_copy(update={"base_filters": 8}), "data1") != fp
    assert cg.config_fingerprint(base, "data2") != fp


def test_params_reject_bad_shapes():
    with pytest.raises(ParamsError, match="multiple of 4"):
        tiny_params(image_size=30)
    with pytest.raises(ParamsError, match="decay_epochs"):
        tiny_params(epochs=1, decay_epochs=2)


# --------------------------------------------------------------------------- models (TensorFlow)
def test_generator_and_discriminator_shapes():
    from tasks.models.gan import build_discriminator, build_generator

    g = build_generator(16, base_filters=4, n_res_blocks=2)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    y = np.asarray(g(x))
    assert g.output_shape == (None, 16, 16, 3) and y.shape == (2, 16, 16, 3)
    assert np.abs(y).max() <= 1.0  # tanh: same range as the input
    assert sum("res" in layer.name and layer.name.endswith("_add") for layer in g.layers) == 2
    assert build_discriminator(16, 4).output_shape == (None, 8, 8, 1)  # one stride-2 layer at 16 px
    assert build_discriminator(64, 4).output_shape == (None, 32, 32, 1)
    assert build_discriminator(64, 4, n_downsamples=3).output_shape == (None, 8, 8, 1)
    with pytest.raises(ValueError, match="divisible by 4"):
        build_generator(18, 4, 1)


def test_history_pool_fills_then_swaps():
    import tensorflow as tf

    from tasks.models.gan import CycleGan

    gan = CycleGan(GanConfig(image_size=16, base_filters=2, n_res_blocks=0, disc_filters=2, pool_size=2))
    fake = lambda v: tf.fill((1, 16, 16, 3), float(v))  # noqa: E731
    q = lambda v, coin, slot: float(gan._query_pool(gan.pool_a, gan.pool_a_count, fake(v),  # noqa: E731
                                                    tf.constant([coin]), tf.constant([slot]))[0, 0, 0, 0])
    assert q(1, 0.9, 0) == 1.0 and q(2, 0.9, 0) == 2.0  # filling: the new image passes through
    assert int(gan.pool_a_count.numpy()) == 2
    assert q(3, 0.1, 0) == 3.0  # coin <= 0.5: new image, pool untouched
    assert q(4, 0.9, 0) == 1.0  # coin > 0.5: the old image of slot 0 comes back ...
    assert q(5, 0.9, 0) == 4.0  # ... and the new one took its place


def test_one_training_step_on_two_tiny_images():
    import keras

    from tasks.models.gan import LOSS_NAMES, CycleGan, pool_query_plan

    keras.utils.set_random_seed(0)
    gan = CycleGan(GanConfig(**TINY))
    rng = np.random.default_rng(0)
    benign, malignant = (rng.uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32) for _ in range(2))
    models = (gan.g_ab, gan.g_ba, gan.d_a, gan.d_b)
    before = [[w.copy() for w in m.get_weights()] for m in models]
    losses = gan.train_step(benign, malignant, 2e-4, pool_query_plan(rng, 1, 3), pool_query_plan(rng, 1, 3))
    assert set(losses) == set(LOSS_NAMES)
    assert all(np.isfinite(v) for v in losses.values())
    assert losses["g_total"] > 10 * (losses["cycle_a"] + losses["cycle_b"]) - 1e-6  # cycle weight 10 included
    for model, old in zip(models, before):
        changed = [not np.array_equal(a, b) for a, b in zip(old, model.get_weights())]
        assert any(changed), f"{model.name}: no weight changed after one step"
    assert int(gan.step.numpy()) == 1 and int(gan.pool_a_count.numpy()) == 1
    assert gan.translate(benign, "ab").shape == (1, 16, 16, 3)


# --------------------------------------------------------------------------- the stage
@pytest.fixture
def project(tmp_path: Path) -> Path:
    make_preprocess(tmp_path, size=24)
    return tmp_path


@pytest.fixture
def eager():
    """Stage tests run tf.functions eagerly: same maths, no ~5 s graph trace per run (the graph path is covered by
    test_one_training_step_on_two_tiny_images and the slow tests)."""
    import tensorflow as tf

    tf.config.run_functions_eagerly(True)
    yield
    tf.config.run_functions_eagerly(False)


def _weights(path: Path) -> list[np.ndarray]:
    from tasks.models.gan import load_generator

    return load_generator(path).get_weights()


def test_stage_writes_outputs_and_resumes(project: Path, eager):
    paths = Paths(project)
    out = cg.run(tiny_params(), paths)
    assert out["steps"] == 2 and out["resumed_from_step"] == 0
    assert (out["train_benign"], out["train_malignant"]) == (6, 2)  # train split only, no augmented copies
    gen = project / "models/cyclegan/generator_b2m.keras"
    from tasks.models.gan import load_generator

    assert load_generator(gen).output_shape == (None, 16, 16, 3)
    losses = pd.read_csv(project / "reports/cyclegan/losses.csv")
    assert losses["step"].tolist() == [2] and np.isfinite(losses.drop(columns=["step", "epoch"])).all().all()
    metrics = json.loads((project / "reports/cyclegan/metrics.json").read_text())
    assert metrics["steps"] == 2 and 0 <= metrics["cycle_l1_benign"] <= 1
    import cv2

    grid = cv2.imread(str(project / "reports/cyclegan/samples.png"))
    assert grid.shape[0] > 4 * 96 and grid.shape[1] > 3 * 96  # 2 + 2 rows, 3 columns of 96 px tiles

    # More epochs later: continues from the step-2 checkpoint instead of starting over.
    out2 = cg.run(tiny_params(epochs=2), paths)
    assert out2["resumed_from_step"] == 2 and out2["steps"] == 4
    assert pd.read_csv(project / "reports/cyclegan/losses.csv")["step"].tolist() == [2, 4]
    assert sorted(p.name for p in (project / "models/cyclegan/ckpt").glob("*.index")) == ["ckpt-2.index",
                                                                                       "ckpt-4.index"]


@pytest.mark.slow
def test_changed_architecture_or_resume_off_starts_fresh(project: Path):
    paths = Paths(project)
    cg.run(tiny_params(), paths)
    assert cg.run(tiny_params(epochs=2, base_filters=2), paths)["resumed_from_step"] == 0
    assert cg.run(tiny_params(epochs=3, base_filters=2, resume=False), paths)["resumed_from_step"] == 0


def test_stage_fails_clearly_without_a_malignant_train_image(tmp_path: Path, eager):
    make_preprocess(tmp_path, size=24, layout={("train", 0): 2, ("val", 1): 1})
    with pytest.raises(ValueError, match="0 malignant"):
        cg.run(tiny_params(), Paths(tmp_path))


@pytest.mark.slow
def test_one_step_is_deterministic_on_cpu():
    import keras

    from tasks.models.gan import CycleGan, pool_query_plan

    results = []
    for _ in range(2):
        keras.utils.set_random_seed(3)
        gan = CycleGan(GanConfig(**TINY))
        rng = np.random.default_rng(0)
        a, b = (rng.uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32) for _ in range(2))
        losses = gan.train_step(a, b, 2e-4, pool_query_plan(rng, 1, 3), pool_query_plan(rng, 1, 3))
        results.append((losses, gan.g_ab.get_weights() + gan.d_b.get_weights()))
    assert results[0][0] == results[1][0]
    assert all(np.array_equal(x, y) for x, y in zip(results[0][1], results[1][1]))


@pytest.mark.slow
def test_resumed_training_equals_uninterrupted_training(tmp_path: Path):
    """2 epochs in one go == 1 epoch, stop, resume for the second (weights bit-identical on CPU)."""
    for name in ("straight", "resumed"):
        make_preprocess(tmp_path / name, size=24)
    straight = Paths(tmp_path / "straight")
    cg.run(tiny_params(epochs=2), straight)
    resumed = Paths(tmp_path / "resumed")
    # As if killed right after epoch 1's checkpoint (decay_epochs=0: the lr schedule does not depend on epochs).
    cg.run(tiny_params(epochs=1), resumed)
    assert cg.run(tiny_params(epochs=2), resumed)["resumed_from_step"] == 2
    a = _weights(straight.models / "cyclegan" / GENERATOR_FILE)
    b = _weights(resumed.models / "cyclegan" / GENERATOR_FILE)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.slow
def test_stage_logs_to_mlflow_and_registers_when_tracking_can(project: Path, eager, monkeypatch):
    from tasks import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the project's own store under tmp_path
    out = cg.run(tiny_params(mlflow=True), Paths(project))
    logged = json.loads((project / "reports/cyclegan/mlflow.json").read_text())
    assert out["mlflow_run_id"] == logged["mlflow_run_id"] and (project / "mlruns" / "mlflow.db").exists()
    if hasattr(tracking, "log_keras_model"):
        assert logged["registered_version"] == "1"
    else:  # said plainly, not silently skipped
        assert logged["register_skipped"] == "tasks.tracking.log_keras_model missing"
