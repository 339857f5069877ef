"""Deterministic .keras files: identical weights give identical bytes (classifier and CycleGAN generator)."""

from __future__ import annotations

import hashlib
import json
import time
import zipfile
from pathlib import Path

import numpy as np

from tasks.models.saving import ZIP_DATE, save_keras


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_classifier_saved_twice_is_byte_identical_and_loads(tmp_path: Path) -> None:
    from tasks.models.classifier import build_small_cnn, load_keras

    model = build_small_cnn(32, filters=(4, 8), name="m0")
    save_keras(model, tmp_path / "a.keras")
    time.sleep(1.1)  # a save timestamp would now differ
    save_keras(model, tmp_path / "b.keras")
    assert _sha(tmp_path / "a.keras") == _sha(tmp_path / "b.keras")
    with zipfile.ZipFile(tmp_path / "a.keras") as z:
        assert all(i.date_time == ZIP_DATE for i in z.infolist())
        assert "date_saved" not in json.loads(z.read("metadata.json"))
    again = load_keras(tmp_path / "a.keras")
    for x, y in zip(again.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(x, y)
    assert not list(tmp_path.glob("*.partial*"))  # no temp file left behind


def test_generator_saved_twice_is_byte_identical(tmp_path: Path) -> None:
    import keras

    from tasks.models.gan import GENERATOR_FILE, build_generator, load_generator

    keras.utils.set_random_seed(0)
    gen = build_generator(16, base_filters=4, n_res_blocks=1)
    save_keras(gen, tmp_path / "a" / GENERATOR_FILE)
    time.sleep(1.1)
    save_keras(gen, tmp_path / "b" / GENERATOR_FILE)
    assert _sha(tmp_path / "a" / GENERATOR_FILE) == _sha(tmp_path / "b" / GENERATOR_FILE)
    assert load_generator(tmp_path / "a" / GENERATOR_FILE).output_shape == (None, 16, 16, 3)


def test_two_builds_with_equal_weights_save_to_equal_bytes(tmp_path: Path) -> None:
    """config.json carries Python object ids (`shared_object_id`); they are renumbered, so a second model object
    with the same weights (a forced rerun) writes the same file."""
    import keras

    from tasks.models.classifier import build_small_cnn
    from tasks.models.saving import renumber_shared_objects

    files = []
    for name in ("a", "b"):
        keras.utils.set_random_seed(0)
        model = build_small_cnn(32, filters=(4, 8), name="m0")
        files.append(save_keras(model, tmp_path / f"{name}.keras"))
    assert _sha(files[0]) == _sha(files[1])
    got = renumber_shared_objects({"x": [{"shared_object_id": 99}, {"shared_object_id": 7}, {"shared_object_id": 99}]})
    assert got == {"x": [{"shared_object_id": 1}, {"shared_object_id": 2}, {"shared_object_id": 1}]}
