"""augment: seeded reproducibility, independent transforms, online use, offline copies of the train split only."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pytest

from tasks.augment import aug_source, run
from tasks.core.config import ParamsError, parse_params
from tasks.core.images import decode, encode_png
from tasks.core.io import Paths, image_relpath, read_index
from tests.tasks.core.lesion_images import blob_images

# --------------------------------------------------------------------------- run()


def _preprocess_project(root: Path, broken: bool = False) -> Paths:
    """A preprocess index: 3 train, 2 val, 2 test images (+ optionally a train row whose PNG is missing)."""
    paths = Paths(root)
    rows = []
    splits = ["train", "train", "train", "val", "val", "test", "test"]
    for i, (img, split) in enumerate(zip(blob_images(len(splits)), splits, strict=True)):
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


def test_offline_copies_are_reproducible_and_independent_of_otherblob_images(tmp_path: Path) -> None:
    def digests(paths: Paths) -> dict[str, str]:
        idx = read_index(paths, "augment")
        idx = idx[idx["augmented_from"].notna()]
        return {f"{s}/{i}": hashlib.sha256(paths.abs(p).read_bytes()).hexdigest()
                for s, i, p in zip(idx["source"], idx["isic_id"], idx["processed_path"], strict=True)}

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
    images = paths.stage("augment") / "images"
    assert not images.exists() or not any(images.rglob("*.png"))
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


def test_forced_rerun_is_byte_identical_and_timings_are_not_metrics(tmp_path: Path) -> None:
    import json

    paths = _preprocess_project(tmp_path)

    def outputs() -> dict[str, bytes]:
        files = [*paths.stage("augment").rglob("*"), *(paths.reports / "augment").rglob("*")]
        return {str(p): p.read_bytes() for p in files if p.is_file() and p.name != "run_stats.json"}

    run(_params(offline_copies=1, workers=1), paths)
    first = outputs()
    run(_params(offline_copies=1, workers=2), paths)
    assert outputs() == first
    metrics = json.loads((paths.reports / "augment" / "metrics.json").read_text())
    stats = json.loads((paths.reports / "augment" / "run_stats.json").read_text())
    assert not {"seconds", "config", "workers"} & set(metrics) and stats["workers"] == 2 and "seconds" in stats


def test_missing_columns_are_an_input_error(tmp_path: Path) -> None:
    from tasks.core.errors import InputError

    paths = Paths(tmp_path)
    paths.stage("preprocess").mkdir(parents=True)
    pd.DataFrame({"source": ["s"], "isic_id": ["ISIC_0000001"]}).to_parquet(paths.index("preprocess"), index=False)
    with pytest.raises(InputError, match=r"\['processed_path', 'split'\] missing"):
        run(_params(), paths)
