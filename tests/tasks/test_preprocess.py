"""preprocess: pure image functions against independent references, and run() end to end on a tiny split."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from tasks.core.config import ParamsError, Preprocess, parse_params
from tasks.core.errors import RunError
from tasks.core.images import (
    clahe_lab,
    decode,
    encode_png,
    fit,
    hair_mask,
    letterbox,
    process_image,
    remove_hair,
    resize,
    shades_of_grey,
)
from tasks.core.io import Paths, image_relpath, read_index
from tasks.preprocess import run


def _lesion(h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    """Skin-toned RGB image with mild noise and a darker brown ellipse (a stand-in lesion)."""
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.float32)
    img[:] = (205, 160, 140)
    img += rng.normal(0, 4, img.shape)
    cv2.ellipse(img, (w // 2, h // 2), (w // 5, h // 5), 15, 0, 360, (120, 75, 60), -1)
    return np.clip(img, 0, 255).astype(np.uint8)


def _local_contrast(img: np.ndarray) -> float:
    """Mean local standard deviation of the grey image (7x7 windows)."""
    g = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)
    mean = cv2.blur(g, (7, 7))
    var = cv2.blur(g * g, (7, 7)) - mean * mean
    return float(np.sqrt(np.maximum(var, 0)).mean())


# --------------------------------------------------------------------------- resize


@pytest.mark.parametrize("shape", [(96, 128), (128, 96), (37, 101), (101, 37), (1, 300), (300, 1), (20, 30)])
@pytest.mark.parametrize("aspect", ["pad", "crop"])
def test_resize_gives_square_output_for_any_aspect(shape: tuple[int, int], aspect: str) -> None:
    img = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    out = resize(img, 64, aspect)  # type: ignore[arg-type]
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8


def test_pad_letterboxes_without_cutting_and_centres_content() -> None:
    img = np.full((50, 100, 3), 200, np.uint8)
    out = resize(img, 64, "pad", "constant", 7)
    # 100x50 -> 64x32 content centred: 16 rows of pad above and below, none left/right.
    assert (out[:16] == 7).all() and (out[48:] == 7).all()
    assert (out[16:48] == 200).all()
    assert fit(img, 64, "pad").shape == (32, 64, 3)


def test_edge_pad_replicates_border_rows() -> None:
    img = np.zeros((50, 100, 3), np.uint8)
    img[0] = (10, 20, 30)
    img[-1] = (40, 50, 60)
    out = letterbox(fit(img, 100, "pad"), 100, "edge")
    assert (out[:25] == (10, 20, 30)).all() and (out[75:] == (40, 50, 60)).all()


def test_crop_keeps_the_centre_square() -> None:
    img = np.zeros((100, 300, 3), np.uint8)
    img[:, :100] = (255, 0, 0)
    img[:, 100:200] = (0, 255, 0)
    img[:, 200:] = (0, 0, 255)
    out = resize(img, 50, "crop")
    assert (out == (0, 255, 0)).all()


def test_resize_rejects_bad_policy() -> None:
    with pytest.raises(ValueError, match="aspect"):
        resize(np.zeros((10, 10, 3), np.uint8), 8, "stretch")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- CLAHE


def test_clahe_matches_albumentations_reference_bit_for_bit() -> None:
    import albumentations as A

    img = _lesion(64, 80)
    for clip, tile in [(2.0, 8), (4.0, 4), (1.5, 2)]:
        ref = A.CLAHE(clip_limit=(clip, clip), tile_grid_size=(tile, tile), p=1.0)(image=img)["image"]
        assert np.array_equal(clahe_lab(img, clip, tile), ref)


def test_clahe_increases_local_contrast_and_keeps_hue() -> None:
    flat = (_lesion(96, 128).astype(np.float32) * 0.3 + 110).astype(np.uint8)  # washed-out copy
    out = clahe_lab(flat, 2.0, 8)
    assert _local_contrast(out) > 1.3 * _local_contrast(flat)
    # a, b (chroma) untouched up to the LAB round trip
    a_in, a_out = (cv2.cvtColor(x, cv2.COLOR_RGB2LAB)[..., 1:].astype(int) for x in (flat, out))
    assert np.abs(a_in - a_out).mean() < 2.0


# --------------------------------------------------------------------------- hair removal


def _with_hairs(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    hairy = img.copy()
    lines = np.zeros(img.shape[:2], np.uint8)
    for (x0, y0, x1, y1) in [(0, 10, 127, 80), (5, 95, 120, 2), (60, 0, 70, 95), (0, 50, 127, 45)]:
        cv2.line(hairy, (x0, y0), (x1, y1), (25, 20, 15), 1, cv2.LINE_AA)
        cv2.line(lines, (x0, y0), (x1, y1), 255, 1)
    return hairy, lines > 0


def test_hair_removal_erases_thin_dark_lines_and_spares_the_lesion() -> None:
    clean = _lesion(96, 128)
    hairy, on_hair = _with_hairs(clean)
    out = remove_hair(hairy, kernel=5, threshold=10)
    err_before = np.abs(hairy.astype(int) - clean).max(axis=2)[on_hair].mean()
    err_after = np.abs(out.astype(int) - clean).max(axis=2)[on_hair].mean()
    assert err_after < 0.35 * err_before, (err_before, err_after)
    # the detector finds most hair pixels, and the filled-in lesion interior is not flagged as hair
    mask = hair_mask(hairy, 5, 10) > 0
    assert mask[on_hair].mean() > 0.8
    interior = np.zeros(mask.shape, np.uint8)
    cv2.ellipse(interior, (64, 48), (18, 12), 15, 0, 360, 1, -1)
    assert mask[(interior > 0) & ~cv2.dilate(on_hair.astype(np.uint8), np.ones((5, 5))).astype(bool)].mean() < 0.05


def test_hair_removal_leaves_a_hairless_image_alone() -> None:
    img = _lesion(96, 128)
    assert np.abs(remove_hair(img, 5, 10).astype(int) - img).mean() < 1.0


# --------------------------------------------------------------------------- colour constancy


def test_shades_of_grey_removes_a_colour_cast() -> None:
    neutral = _lesion(64, 64)
    cast = np.clip(neutral * np.array([1.0, 0.75, 0.55]), 0, 255).astype(np.uint8)
    out = shades_of_grey(cast, 6)
    spread = lambda x: np.ptp(x.reshape(-1, 3).mean(axis=0))  # noqa: E731
    assert spread(out) < 0.5 * spread(cast)
    # the Minkowski p-norms of the three channels come out equal (the estimator's fixed point)
    norms = np.power(np.mean(np.power(out / 255.0, 6), axis=(0, 1)), 1 / 6)
    assert np.ptp(norms) < 0.01
    # and the corrected cast image has the chromaticity of the corrected neutral one (illuminant removed;
    # the method keeps the illuminant's norm, so brightness may differ by a global factor)
    chroma = lambda x: x.astype(float) / (x.astype(float).sum(axis=2, keepdims=True) + 1e-6)  # noqa: E731
    assert np.abs(chroma(out) - chroma(shades_of_grey(neutral, 6))).mean() < 0.01


# --------------------------------------------------------------------------- process_image


def test_process_image_from_bytes_equals_from_array_and_keeps_rgb_order() -> None:
    img = _lesion(96, 128)
    img[:20, :20] = (255, 0, 0)  # a red corner: a BGR/RGB mix-up would turn it blue
    cfg = Preprocess(size=64, clahe=True, hair_removal=True, color_constancy=True)
    from_bytes = process_image(encode_png(img), cfg)
    assert np.array_equal(from_bytes, process_image(img, cfg))
    assert from_bytes.shape == (64, 64, 3)
    corner = process_image(img, Preprocess(size=64, clahe=False))[10, 3]
    assert corner[0] > 200 and corner[2] < 50


def test_process_image_rejects_garbage_with_clear_error() -> None:
    with pytest.raises(ValueError, match="cannot decode"):
        process_image(b"definitely not a jpeg", Preprocess())
    with pytest.raises(ValueError, match="uint8"):
        process_image(np.zeros((8, 8, 3), np.float32), Preprocess())


# --------------------------------------------------------------------------- run() end to end


def _split_project(root: Path, n: int = 6) -> Paths:
    """A tiny project: n good images (one outside the root, absolute path), one corrupt, one missing."""
    paths = Paths(root / "proj")
    raw = paths.root / "raw"
    raw.mkdir(parents=True)
    outside = root / "elsewhere"
    outside.mkdir()
    rows = []
    for i in range(n):
        img = _lesion(80 + 8 * i, 120, seed=i)
        if i == 0:
            p = outside / "ISIC_0000000.jpg"
            cv2.imwrite(str(p), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
            path = str(p.resolve())
        else:
            cv2.imwrite(str(raw / f"ISIC_{i:07d}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
            path = f"raw/ISIC_{i:07d}.jpg"
        rows.append({"source": "s1", "isic_id": f"ISIC_{i:07d}", "path": path, "target": i % 2,
                     "split": ["train", "val", "test"][i % 3], "group_id": f"g{i}"})
    (raw / "ISIC_0000098.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    rows.append({"source": "s2", "isic_id": "ISIC_0000098", "path": "raw/ISIC_0000098.jpg", "target": 0,
                 "split": "train", "group_id": "g98"})
    rows.append({"source": "s2", "isic_id": "ISIC_0000099", "path": "raw/missing.jpg", "target": 1,
                 "split": "train", "group_id": "g99"})
    (paths.stage("split")).mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(paths.index("split"), index=False)
    return paths


def _params(**pre: object):
    return parse_params({"ingest": {"sources": [{"kind": "synthetic"}]},
                         "preprocess": {"size": 32, "max_failed_fraction": 0.5, **pre}})


def _digests(paths: Paths) -> dict[str, str]:
    root = paths.stage("preprocess") / "images"
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*.png")}


@pytest.mark.timeout(60)
def test_run_end_to_end_quarantines_bad_images_and_is_deterministic(tmp_path: Path) -> None:
    paths = _split_project(tmp_path)
    # Warm OpenCV's thread pool in this (parent) process first: forked workers used to deadlock on it.
    clahe_lab(np.zeros((512, 512, 3), np.uint8))
    params = _params(workers=2, hair_removal=True, color_constancy=True)
    summary = run(params, paths)
    assert summary["processed"] == 6 and summary["failed"] == 2

    idx = read_index(paths, "preprocess")
    split = read_index(paths, "split")
    assert list(idx.columns) == [*split.columns, "processed_path"]
    assert set(idx["isic_id"]) == {f"ISIC_{i:07d}" for i in range(6)}
    for rel, sid, iid in zip(idx["processed_path"], idx["source"], idx["isic_id"], strict=True):
        assert rel == image_relpath("preprocess", sid, iid) and not Path(rel).is_absolute()
        img = decode(paths.abs(rel).read_bytes())
        assert img.shape == (32, 32, 3)

    failed = pd.read_csv(paths.stage("preprocess") / "failed.csv")
    assert set(failed["isic_id"]) == {"ISIC_0000098", "ISIC_0000099"}
    reasons = dict(zip(failed["isic_id"], failed["error"], strict=True))
    assert "decode" in reasons["ISIC_0000098"] and "FileNotFoundError" in reasons["ISIC_0000099"]

    metrics = pd.read_json(paths.reports / "preprocess" / "metrics.json", typ="series")
    assert metrics["processed"] == 6 and metrics["failed"] == 2 and metrics["by_split"]["train"] == 2
    grid = decode((paths.reports / "preprocess" / "samples.png").read_bytes())
    assert grid.shape[0] > 2 * 32 and grid.shape[1] > 6 * 32

    first = _digests(paths)
    assert len(first) == 6
    # a stale file from an earlier run is pruned; one worker and two give the same bytes
    stale = paths.stage("preprocess") / "images" / "old" / "x.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    run(_params(workers=1, hair_removal=True, color_constancy=True, cache=False), paths)  # computed again
    assert _digests(paths) == first and not stale.exists()


def test_run_fails_loudly_when_too_many_images_fail(tmp_path: Path) -> None:
    paths = _split_project(tmp_path, n=2)  # 2 of 4 fail = 50% > 10%
    with pytest.raises(RuntimeError, match="max_failed_fraction"):
        run(_params(workers=1, max_failed_fraction=0.1), paths)


def test_run_explains_a_missing_split_index(tmp_path: Path) -> None:
    with pytest.raises(RunError, match="lesionflow stage split"):
        run(_params(), Paths(tmp_path))


# --------------------------------------------------------------------------- params


@pytest.mark.parametrize("bad, where", [
    ({"aspect": "stretch"}, "preprocess.aspect"),
    ({"pad_mode": "mirror"}, "preprocess.pad_mode"),
    ({"tile_grid": 0}, "preprocess.tile_grid"),
    ({"clip_limit": 0}, "preprocess.clip_limit"),
    ({"workers": 0}, "preprocess.workers"),
    ({"size": 8}, "preprocess.size"),
    ({"cc_power": 0.5}, "preprocess.cc_power"),
    ({"clahe_limit": 2}, "unknown key"),
])
def test_bad_preprocess_params_are_rejected_by_name(bad: dict, where: str) -> None:
    with pytest.raises(ParamsError, match=where):
        parse_params({"ingest": {"sources": [{"kind": "synthetic"}]}, "preprocess": bad})


def test_prune_compares_normalised_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.core.io import prune_outputs

    (tmp_path / "images" / "ab").mkdir(parents=True)
    for name in ("keep.png", "stale.png"):
        (tmp_path / "images" / "ab" / name).write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    # the kept file spelled with './' must survive a walk that yields 'images/ab/keep.png'
    assert prune_outputs(Path("images"), {"./images/ab/keep.png"}) == 1
    assert sorted(p.name for p in (tmp_path / "images" / "ab").iterdir()) == ["keep.png"]


@pytest.mark.realdata
def test_run_on_real_isic_images(tmp_path: Path, isic_real: Path) -> None:
    files = sorted(isic_real.glob("*.jpg"))[:24]
    paths = Paths(tmp_path)
    paths.stage("split").mkdir(parents=True)
    pd.DataFrame({"source": "isic-real", "isic_id": [f.stem for f in files], "path": [str(f) for f in files],
                  "split": "train"}).to_parquet(paths.index("split"), index=False)
    summary = run(_params(size=64, workers=2, hair_removal=True, color_constancy=True), paths)
    assert summary["processed"] == len(files) and summary["failed"] == 0
    idx = read_index(paths, "preprocess")
    for rel in idx["processed_path"]:
        img = decode(paths.abs(rel).read_bytes())
        assert img.shape == (64, 64, 3) and img.std() > 5  # real content, not a blank canvas


# --------------------------------------------------------------------------- hardening
def test_bomb_and_damaged_jpegs_fail_per_image_and_reruns_are_byte_identical(tmp_path: Path) -> None:
    """Regression: the 20000x20000 header was decoded (1.2 GB) and a JPEG with garbage in its scan data was
    processed into a garbled training image. Now both land in failed.csv; valid outputs do not change."""
    from tests.tasks.core.image_fixtures import bomb_jpeg, garbage_scan_jpeg

    paths = _split_project(tmp_path, n=3)
    split = read_index(paths, "split")
    (paths.root / "raw" / "bomb.jpg").write_bytes(bomb_jpeg())
    (paths.root / "raw" / "garbage.jpg").write_bytes(garbage_scan_jpeg())
    extra = pd.DataFrame([{"source": "s3", "isic_id": "ISIC_0000100", "path": "raw/bomb.jpg", "target": 0,
                           "split": "train", "group_id": "g100"},
                          {"source": "s3", "isic_id": "ISIC_0000101", "path": "raw/garbage.jpg", "target": 1,
                           "split": "val", "group_id": "g101"}])
    pd.concat([split, extra], ignore_index=True).to_parquet(paths.index("split"), index=False)
    params = _params(workers=1, max_failed_fraction=0.9)
    run(params, paths)
    failed = pd.read_csv(paths.stage("preprocess") / "failed.csv").set_index("isic_id")["error"]
    assert failed["ISIC_0000100"].startswith("ImageRejected: image header says 20000x20000")
    assert failed["ISIC_0000101"].startswith("ImageRejected: damaged JPEG scan data (Corrupt JPEG data")
    # valid images: the same pixels as processing OpenCV's own decode of the file
    idx = read_index(paths, "preprocess").set_index("isic_id")
    for iid in ("ISIC_0000001", "ISIC_0000002"):
        raw = cv2.cvtColor(cv2.imread(str(paths.abs(idx.at[iid, "path"]))), cv2.COLOR_BGR2RGB)
        out = decode(paths.abs(idx.at[iid, "processed_path"]).read_bytes())
        assert np.array_equal(out, process_image(raw, params.preprocess))

    def outputs() -> dict[str, bytes]:
        files = [*paths.stage("preprocess").rglob("*"), *(paths.reports / "preprocess").rglob("*")]
        return {str(p): p.read_bytes() for p in files if p.is_file() and p.name != "run_stats.json"}

    first = outputs()
    run(_params(workers=2, max_failed_fraction=0.9), paths)
    assert outputs() == first
    metrics = json.loads((paths.reports / "preprocess" / "metrics.json").read_text())
    stats = json.loads((paths.reports / "preprocess" / "run_stats.json").read_text())
    assert not {"seconds", "images_per_s", "workers", "stale_files_removed", "config"} & set(metrics)
    assert stats["workers"] == 2 and stats["images_per_s"] > 0


def test_ids_clashing_after_sanitising_are_an_input_error(tmp_path: Path) -> None:
    from tasks.core.errors import InputError

    paths = Paths(tmp_path)
    paths.stage("split").mkdir(parents=True)
    pd.DataFrame({"source": ["s/1", "s?1"], "isic_id": ["ISIC_1", "ISIC_1"], "path": ["x", "y"]}).to_parquet(
        paths.index("split"), index=False)
    with pytest.raises(InputError, match="same file name after sanitising"):
        run(_params(), paths)


# --------------------------------------------------------------------------- result cache (incremental runs)
def _cache_stats(paths: Paths) -> dict:
    return json.loads((paths.reports / "preprocess" / "run_stats.json").read_text())["cache"]


def _all_outputs(paths: Paths) -> dict[str, bytes]:
    """Every output file's bytes (images, index, failed.csv, metrics, samples), run_stats excepted."""
    files = [*paths.stage("preprocess").rglob("*"), *(paths.reports / "preprocess").rglob("*")]
    return {p.relative_to(paths.root).as_posix(): p.read_bytes() for p in files
            if p.is_file() and p.name != "run_stats.json"}


def _add_images(paths: Paths, ids: range) -> None:
    split = read_index(paths, "split")
    rows = []
    for i in ids:
        cv2.imwrite(str(paths.root / "raw" / f"ISIC_{i:07d}.jpg"), cv2.cvtColor(_lesion(90, 110, seed=i),
                                                                                cv2.COLOR_RGB2BGR))
        rows.append({"source": "s1", "isic_id": f"ISIC_{i:07d}", "path": f"raw/ISIC_{i:07d}.jpg", "target": 0,
                     "split": "train", "group_id": f"g{i}"})
    pd.concat([split, pd.DataFrame(rows)], ignore_index=True).to_parquet(paths.index("split"), index=False)


@pytest.mark.parametrize("workers", [1, 2])
def test_cache_warm_and_nightly_runs_write_the_bytes_of_a_cold_run(tmp_path: Path, workers: int) -> None:
    paths = _split_project(tmp_path)
    params = _params(workers=workers, hair_removal=True)
    run(params, paths)
    assert _cache_stats(paths) | {"dir": None} == {"enabled": True, "hits": 0, "misses": 6, "corrupt": 0,
                                                  "dir": None}
    cold = _all_outputs(paths)
    run(params, paths)  # warm: every image from the cache, failures recomputed (they are not cached)
    assert (_cache_stats(paths)["hits"], _cache_stats(paths)["misses"]) == (6, 0)
    assert _all_outputs(paths) == cold

    _add_images(paths, range(10, 12))  # a nightly with new images: only they are processed
    run(params, paths)
    assert (_cache_stats(paths)["hits"], _cache_stats(paths)["misses"]) == (6, 2)
    nightly = _all_outputs(paths)
    shutil.rmtree(paths.cache)  # the cache is never the record: a cold run writes the same bytes
    shutil.rmtree(paths.stage("preprocess"))
    run(params, paths)
    assert _cache_stats(paths)["hits"] == 0
    assert _all_outputs(paths) == nightly


def test_cache_key_follows_result_params_only(tmp_path: Path) -> None:
    paths = _split_project(tmp_path)
    run(_params(workers=1), paths)
    first = _digests(paths)
    run(_params(workers=2, max_failed_fraction=0.6), paths)  # knobs that change no byte: still hits
    assert _cache_stats(paths)["hits"] == 6
    run(_params(workers=1, pad_value=9), paths)  # a pixel param: nothing reused, other bytes
    assert (_cache_stats(paths)["hits"], _cache_stats(paths)["misses"]) == (0, 6)
    assert _digests(paths) != first
    run(_params(workers=1, png_compression=6), paths)  # same pixels, other bytes: also a new key
    assert _cache_stats(paths)["hits"] == 0
    run(_params(workers=1), paths)  # back to the first params: their result set is still there
    assert _cache_stats(paths)["hits"] == 6 and _digests(paths) == first
    run(_params(workers=1, cache=False), paths)
    assert _cache_stats(paths) == {"enabled": False, "hits": 0, "misses": 0, "corrupt": 0, "dir": None}
    assert _digests(paths) == first


def test_corrupt_cache_entry_is_detected_and_recomputed(tmp_path: Path) -> None:
    paths = _split_project(tmp_path)
    params = _params(workers=1)
    run(params, paths)
    first = _all_outputs(paths)
    entries = sorted((paths.cache / "preprocess").rglob("*.bin"))
    assert len(entries) == 6
    entries[0].write_bytes(entries[0].read_bytes()[:100])  # a partial entry
    blob = bytearray(entries[1].read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # a damaged one
    entries[1].write_bytes(bytes(blob))
    run(params, paths)
    assert (_cache_stats(paths)["hits"], _cache_stats(paths)["corrupt"]) == (4, 2)
    assert _all_outputs(paths) == first
    run(params, paths)  # recomputed entries were written back
    assert _cache_stats(paths)["hits"] == 6
