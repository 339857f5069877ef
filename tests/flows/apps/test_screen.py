"""Wide-field screening: synthetic photos, classic-CV detection, patch scoring, ugly-duckling rank, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from flows.apps.screen import (
    CSV_COLUMNS,
    crop_patch,
    detect_lesions,
    evaluate_screen,
    iou,
    load_truth,
    match_boxes,
    screen,
    synth_widefield,
    ud_scores,
)


@pytest.fixture(scope="module")
def widefield(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return synth_widefield(tmp_path_factory.mktemp("wf"), n=8, seed=3, width=800, height=600)


def test_synth_widefield_writes_truth_and_is_deterministic(widefield: list[Path], tmp_path: Path) -> None:
    assert len(widefield) == 8
    for f in widefield:
        truth = json.loads(f.with_suffix(".json").read_text())
        img = cv2.imread(str(f))
        assert img.shape == (600, 800, 3)
        assert 4 <= len(truth["boxes"]) <= 8 and 0 <= truth["odd_index"] < len(truth["boxes"])
        assert truth["labels"][truth["odd_index"]] == "malignant" and truth["labels"].count("malignant") == 1
        for x, y, w, h in truth["boxes"]:
            assert 0 <= x and 0 <= y and x + w <= 800 and y + h <= 600 and w > 5 and h > 5
            # the true box really holds a dark blob: its centre is darker than the photo's median
            assert img[y + h // 2, x + w // 2].mean() < np.median(img) - 10
        # boxes never overlap (the detector is not asked to split touching lesions)
        assert all(iou(a, b) == 0 for i, a in enumerate(truth["boxes"]) for b in truth["boxes"][i + 1:])
    again = synth_widefield(tmp_path, n=1, seed=3, width=800, height=600)[0]
    assert again.read_bytes() == widefield[0].read_bytes()


def test_detection_recall_and_planted_odd_lesion_ranks_first(widefield: list[Path], tmp_path: Path) -> None:
    results = [evaluate_screen(load_truth(f), screen(f, tmp_path)) for f in widefield]
    recall = np.mean([r["recall"] for r in results])
    precision = np.mean([r["precision"] for r in results])
    odd_first = np.mean([r["odd_rank"] == 1 for r in results])
    assert recall >= 0.8, results
    assert precision >= 0.6, results
    assert odd_first > 0.5, [r["odd_rank"] for r in results]  # chance is ~1/6


def test_screen_writes_csv_and_annotated_png(widefield: list[Path], tmp_path: Path) -> None:
    f = widefield[0]
    table = screen(f, tmp_path)
    csv = pd.read_csv(tmp_path / f"{f.stem}_screen.csv")
    assert list(csv.columns[: len(CSV_COLUMNS)]) == CSV_COLUMNS and len(csv) == len(table) >= 4
    assert sorted(csv["ud_rank"]) == list(range(1, len(csv) + 1))
    assert csv["ud_score"].iloc[csv["ud_rank"].idxmin()] == csv["ud_score"].max()
    assert csv["probability"].isna().all()  # no model given: ranks only, never an invented probability
    ann = cv2.imread(str(tmp_path / f"{f.stem}_screen.png"))
    orig = cv2.imread(str(f))
    assert ann.shape == orig.shape and (ann != orig).any()


def test_plain_skin_has_no_lesions_and_bad_file_is_a_clear_error(tmp_path: Path) -> None:
    from tasks.fake.lesions import skin_background

    skin = (np.clip(skin_background(np.random.default_rng(0), 300, 400, 0.3), 0, 1) * 255).astype(np.uint8)
    assert len(detect_lesions(skin)) <= 1  # follicles and blotches are not lesions
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        screen(bad, tmp_path)


def test_custom_embedding_drives_the_rank(widefield: list[Path], tmp_path: Path) -> None:
    """An embedding where only patch 2 differs must rank patch 2 first (screen uses the given embedder)."""

    def embed(patches: list[np.ndarray]) -> np.ndarray:
        e = np.tile([1.0, 0.0], (len(patches), 1))
        e[2] = [0.0, 1.0]
        return e

    table = screen(widefield[1], tmp_path, embed=embed)
    assert int(table["ud_rank"].iloc[2]) == 1


def test_crop_patch_pads_at_edges_and_centres() -> None:
    img = np.zeros((50, 60, 3), np.uint8)
    img[0:10, 0:10] = 255
    patch = crop_patch(img, (0, 0, 10, 10), context=2.0)
    assert patch.shape == (20, 20, 3)
    assert patch[10, 10].mean() == 255  # the box's centre pixel region lands at the patch centre


def test_iou_matching_and_ud_scores() -> None:
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 10, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (20, 20, 5, 5)) == 0.0
    assert match_boxes([(0, 0, 10, 10), (50, 50, 10, 10)], [(51, 50, 10, 10), (100, 100, 3, 3)]) == [None, 0]
    s, r = ud_scores(np.array([[1.0, 0, 0], [1, 0.1, 0], [0, 0, 1], [1, 0, 0.1]]))
    assert r[2] == 1 and sorted(r) == [1, 2, 3, 4]
    _, rz = ud_scores(np.array([[1.0, 100], [1.1, 101], [5.0, 100], [0.9, 99]]), normalise="zscore")
    assert rz[2] == 1


def test_screen_files_reports_an_unreadable_photo_and_goes_on(widefield: list[Path], tmp_path: Path) -> None:
    """Issue 10: one broken photo is an error entry in the summary; the other photos are still screened."""
    from flows.apps.screen import screen_files

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    summary = screen_files([widefield[0], bad], tmp_path / "out", model="none")
    assert summary["images"] == 2 and summary["errors"] == 1
    good, broken = summary["per_image"]
    assert good["lesions"] >= 4 and "recall" in good
    assert "broken.png" in broken["error"] and broken["lesions"] is None
    capped = screen_files([widefield[0]], tmp_path / "out2", model="none", max_pixels=1000)
    assert capped["errors"] == 1
