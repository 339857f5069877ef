"""augment: seeded reproducibility, independent transforms, online use, offline copies of the train split only."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from tasks.augment import aug_source, augment_copy, augment_fn, build_augmenter, copy_seed, run
from tasks.core.config import Augment, ParamsError, parse_params
from tasks.core.images import decode, encode_png
from tasks.core.io import Paths, image_relpath, read_index


def _images(n: int, size: int = 32) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        img = np.full((size, size, 3), (200, 150, 130), np.uint8)
        cv2.circle(img, (size // 2 + i % 5, size // 2), size // 4, (90, 50, 40), -1)
        out.append(np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8))
    return out


def test_same_seed_same_outputs_on_the_same_sequence() -> None:
    imgs = _images(12)
    a, b = build_augmenter(Augment(seed=7), 32), build_augmenter(Augment(seed=7), 32)
    outs_a = [a(image=im)["image"] for im in imgs]
    outs_b = [b(image=im)["image"] for im in imgs]
    assert all(np.array_equal(x, y) for x, y in zip(outs_a, outs_b))
    # the sequence is random (not the same transform every call) and a different seed differs
    assert len({x.tobytes() for x in outs_a}) > 6
    c = build_augmenter(Augment(seed=8), 32)
    assert not all(np.array_equal(x, c(image=im)["image"]) for x, im in zip(outs_a, imgs))


def test_transforms_draw_independently() -> None:
    # albumentations 2.0.8 gives every child of Compose(seed=s) the same seed: hflip and vflip at the same p
    # would then always fire together. Check both single flips occur.
    cfg = Augment(seed=0, hflip=0.5, vflip=0.5, rotate_p=0, affine_p=0, color_jitter_p=0, clahe_p=0,
                  coarse_dropout_p=0, crop_scale_min=1.0)
    aug = build_augmenter(cfg, 16)
    img = np.zeros((16, 16, 3), np.uint8)
    img[:4, :4] = 255  # top-left marker: its corner tells which flips happened
    corners = []
    for _ in range(60):
        out = aug(image=img)["image"]
        quad = np.array([out[:8, :8].mean(), out[:8, 8:].mean(), out[8:, :8].mean(), out[8:, 8:].mean()])
        corners.append(int(quad.argmax()))
    assert {1, 2} <= set(corners), sorted(set(corners))  # h-only and v-only flips both seen


def test_online_fn_is_plain_numpy_and_sizes_any_input() -> None:
    f = augment_fn(Augment(seed=1, clahe_p=1.0), 24)
    for shape in [(32, 32, 3), (40, 64, 3), (100, 30, 3)]:
        out = f(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))
        assert out.shape == (24, 24, 3) and out.dtype == np.uint8 and out.flags["C_CONTIGUOUS"]


def test_clahe_uses_a_fixed_clip_limit() -> None:
    aug = build_augmenter(Augment(clahe_clip_limit=3.0, clahe_tile_grid=4), 32)
    clahe = next(t for t in aug.transforms if type(t).__name__ == "CLAHE")
    assert tuple(clahe.clip_limit) == (3.0, 3.0) and tuple(clahe.tile_grid_size) == (4, 4)


def test_copy_is_a_function_of_seed_key_and_k_only() -> None:
    img = _images(1)[0]
    s = copy_seed(0, "src", "ISIC_1", 0)
    aug = build_augmenter(Augment(), 32)
    first = augment_copy(aug, img, s)
    aug(image=img)  # consuming randomness in between must not matter
    assert np.array_equal(first, augment_copy(build_augmenter(Augment(), 32), img, s))
    assert s != copy_seed(0, "src", "ISIC_1", 1) and s != copy_seed(1, "src", "ISIC_1", 0)


# --------------------------------------------------------------------------- run()


def _preprocess_project(root: Path, broken: bool = False) -> Paths:
    """A preprocess index: 3 train, 2 val, 2 test images (+ optionally a train row whose PNG is missing)."""
    paths = Paths(root)
    rows = []
    splits = ["train", "train", "train", "val", "val", "test", "test"]
    for i, (img, split) in enumerate(zip(_images(len(splits)), splits)):
        rel = image_relpath("preprocess", "s1", f"ISIC_{i:07d}")
        paths.abs(rel).parent.mkdir(parents=True, exist_ok=True)
        paths.abs(rel).write_bytes(encode_png(img))
        rows.append({"source": "s1", "isic_id": f"ISIC_{i:07d}", "path": f"raw/{i}.jpg", "target": i % 2,
                     "split": split, "group_id": f"g{i}", "processed_path": rel})
    if broken:
        rows.append({"source": "s1", "isic_id": "ISIC_0000099", "path": "raw/99.jpg", "target": 1,
                     "split": "train", "group_id": "g99", "processed_path": "data/preprocess/gone.png"})
    paths.stage("preprocess").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(paths.index("preprocess"), index=False)
    return paths


def _params(**aug: object):
    return parse_params({"ingest": {"sources": [{"kind": "synthetic"}]}, "preprocess": {"size": 32},
                         "augment": aug})


def test_offline_copies_come_from_train_only_with_unique_keys(tmp_path: Path) -> None:
    paths = _preprocess_project(tmp_path, broken=True)
    summary = run(_params(offline_copies=2, workers=2), paths)
    inp = read_index(paths, "preprocess")
    idx = read_index(paths, "augment")
    copies = idx[idx["augmented_from"].notna()]
    originals = idx[idx["augmented_from"].isna()]

    assert len(originals) == len(inp) and originals["source"].eq("s1").all()
    assert summary["copies_written"] == 6 and summary["failed"] == 2  # 3 train x 2; the missing one x 2
    assert set(copies["split"]) == {"train"}
    assert set(copies["isic_id"]) == {"ISIC_0000000", "ISIC_0000001", "ISIC_0000002"}
    assert sorted(copies["source"].unique()) == [aug_source("s1", 0), aug_source("s1", 1)]
    assert not idx.duplicated(["source", "isic_id"]).any()
    assert (copies["augmented_from"] == "s1").all() and sorted(copies["aug_copy"].unique()) == [0, 1]
    # copy rows carry their original's label and group (so split/grouping logic still holds)
    merged = copies.merge(inp, left_on=["augmented_from", "isic_id"], right_on=["source", "isic_id"])
    assert (merged["target_x"] == merged["target_y"]).all() and (merged["group_id_x"] == merged["group_id_y"]).all()
    for rel in copies["processed_path"]:
        assert rel.startswith("data/augment/images/") and decode(paths.abs(rel).read_bytes()).shape == (32, 32, 3)
    failed = pd.read_csv(paths.stage("augment") / "failed.csv")
    assert set(failed["isic_id"]) == {"ISIC_0000099"} and failed["error"].str.contains("FileNotFound").all()
    assert (paths.reports / "augment" / "samples.png").exists()
    assert pd.read_json(paths.reports / "augment" / "metrics.json", typ="series")["copies_written"] == 6


def test_offline_copies_are_reproducible_and_independent_of_other_images(tmp_path: Path) -> None:
    def digests(paths: Paths) -> dict[str, str]:
        idx = read_index(paths, "augment")
        idx = idx[idx["augmented_from"].notna()]
        return {f"{s}/{i}": hashlib.sha256(paths.abs(p).read_bytes()).hexdigest()
                for s, i, p in zip(idx["source"], idx["isic_id"], idx["processed_path"])}

    full = _preprocess_project(tmp_path / "a")
    run(_params(offline_copies=2, workers=2), full)
    first = digests(full)
    run(_params(offline_copies=2, workers=1), full)
    assert digests(full) == first
    # a project holding only one of the train images gets the very same copies of it
    small = _preprocess_project(tmp_path / "b")
    inp = read_index(small, "preprocess")
    inp[inp["isic_id"] == "ISIC_0000001"].to_parquet(small.index("preprocess"), index=False)
    run(_params(offline_copies=2, workers=1), small)
    only = digests(small)
    assert len(only) == 2 and all(first[k] == v for k, v in only.items())


def test_zero_copies_is_a_pass_through(tmp_path: Path) -> None:
    paths = _preprocess_project(tmp_path)
    summary = run(_params(offline_copies=0), paths)
    inp = read_index(paths, "preprocess")
    idx = read_index(paths, "augment")
    assert summary["copies_written"] == 0
    pd.testing.assert_frame_equal(idx[inp.columns], inp)
    assert idx["augmented_from"].isna().all() and idx["aug_copy"].isna().all()
    assert not (paths.stage("augment") / "images").exists() or not any((paths.stage("augment") / "images").rglob("*.png"))
    grid = decode((paths.reports / "augment" / "samples.png").read_bytes())
    assert grid.shape[0] >= 3 * 32 and grid.shape[1] >= 3 * 32
    assert (paths.reports / "augment" / "metrics.json").exists()


def test_fewer_copies_on_rerun_prunes_old_files(tmp_path: Path) -> None:
    paths = _preprocess_project(tmp_path)
    run(_params(offline_copies=2, workers=1), paths)
    run(_params(offline_copies=1, workers=1), paths)
    files = list((paths.stage("augment") / "images").rglob("*.png"))
    assert len(files) == 3 and all("+aug0" in f.as_posix() for f in files)


@pytest.mark.parametrize("bad, where", [
    ({"crop_scale_min": 0}, "augment.crop_scale_min"),
    ({"crop_scale_min": 1.5}, "augment.crop_scale_min"),
    ({"hflip": 1.2}, "augment.hflip"),
    ({"hue": 0.7}, "augment.hue"),
    ({"offline_copies": -1}, "augment.offline_copies"),
    ({"rotate_limit": 270}, "augment.rotate_limit"),
    ({"clahe_clip_limit": 0}, "augment.clahe_clip_limit"),
    ({"flip": 0.5}, "unknown key"),
])
def test_bad_augment_params_are_rejected_by_name(bad: dict, where: str) -> None:
    with pytest.raises(ParamsError, match=where):
        _params(**bad)


def test_build_augmenter_rejects_tiny_size() -> None:
    with pytest.raises(ValueError, match="size"):
        build_augmenter(Augment(), 4)
