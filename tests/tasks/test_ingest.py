"""ingest: synthetic (through the local server), local isic-cli folders, incremental reruns, failures."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from tasks import ingest
from tasks.core.config import parse_params
from tasks.core.io import Paths, read_index, read_json


def _params(*sources: dict, **ingest_kw) -> object:
    return parse_params({"ingest": {"sources": list(sources), "workers": 4, **ingest_kw}})


def _local_folder(tmp_path: Path, src: Path, n: int) -> Path:
    """A small isic-cli-style folder: the first n rows of a real metadata.csv and their images."""
    meta = pd.read_csv(src / "metadata.csv", dtype=str).head(n)
    out = tmp_path / "local"
    out.mkdir()
    meta.to_csv(out / "metadata.csv", index=False)
    for i in meta.isic_id:
        shutil.copy(src / f"{i}.jpg", out / f"{i}.jpg")
    return out


def test_synthetic_through_local_server_then_incremental(tmp_path):
    paths = Paths(tmp_path)
    params = _params({"kind": "synthetic", "n": 24, "seed": 3, "image_size": 64})
    s1 = ingest.run(params, paths)
    df = read_index(paths, "ingest")
    assert s1["images"] == len(df) >= 24 and s1["failed"] == 0 and s1["downloaded"] == len(df)
    assert set(df.source) == {"synthetic"}
    assert df.isic_id.str.fullmatch(r"ISIC_\d{7}").all()
    for row in df.itertuples():
        f = paths.abs(row.path)
        assert f.exists() and f.stat().st_size == row.file_size
        assert ingest.sha256_file(f) == row.sha256
    assert {"diagnosis_1", "patient_id", "lesion_id", "pixels_x"} <= set(df.columns)
    manifest = read_json(tmp_path / "data/ingest/manifest.json")
    assert manifest["sources"]["synthetic"]["kind"] == "synthetic" and manifest["images"] == len(df)
    assert (tmp_path / "data/ingest/attribution.txt").read_text().strip()
    assert list((tmp_path / "data/ingest/licenses/synthetic").glob("*.txt"))

    # Rerun: nothing downloaded again, identical index (incremental, deterministic).
    s2 = ingest.run(params, paths)
    assert s2["downloaded"] == 0 and s2["skipped"] == len(df)
    pd.testing.assert_frame_equal(read_index(paths, "ingest"), df)

    # Interrupted run: a lost file and a stray partial file -> resumed, nothing half-written survives.
    victim = paths.abs(df.path.iloc[0])
    victim.unlink()
    (victim.parent / f".{victim.name}.partial").write_bytes(b"half")
    s3 = ingest.run(params, paths)
    assert s3["downloaded"] == 1 and victim.exists()
    assert not list((tmp_path / "data/ingest").rglob("*.partial"))


def test_local_source_and_pruning(tmp_path, isic_real):
    folder = _local_folder(tmp_path, isic_real, 12)
    paths = Paths(tmp_path / "proj")
    both = _params({"kind": "local", "name": "real", "path": str(folder)},
                   {"kind": "synthetic", "n": 10, "image_size": 48})
    ingest.run(both, paths)
    df = read_index(paths, "ingest")
    assert (df.source == "real").sum() == 12
    real = df[df.source == "real"].set_index("isic_id")
    meta = pd.read_csv(folder / "metadata.csv", dtype=str).set_index("isic_id")
    assert (real.benign_malignant == meta.benign_malignant.reindex(real.index)).all()  # legacy columns kept
    assert not real.path.str.startswith("/").any()  # copied inside the project, relative paths

    # Dropping a source from params removes its images from the output (output == params).
    only_real = _params({"kind": "local", "name": "real", "path": str(folder)})
    s = ingest.run(only_real, paths)
    assert s["pruned"] > 0 and set(read_index(paths, "ingest").source) == {"real"}
    assert not (paths.stage("ingest") / "images" / "synthetic").exists()


def test_local_missing_image_is_reported_not_silent(tmp_path, isic_real):
    folder = _local_folder(tmp_path, isic_real, 5)
    missing = sorted(folder.glob("*.jpg"))[0]
    missing.unlink()
    paths = Paths(tmp_path / "proj")
    with pytest.raises(ingest.IngestError, match=missing.stem):
        ingest.run(_params({"kind": "local", "path": str(folder)}), paths)
    failed = pd.read_csv(paths.stage("ingest") / "failed.csv")
    assert failed.isic_id.tolist() == [missing.stem]
    # With a tolerance the stage completes and still lists the failure.
    s = ingest.run(_params({"kind": "local", "path": str(folder)}, max_failures=1), paths)
    assert s["failed"] == 1 and s["images"] == 4


def test_local_source_errors_are_clear(tmp_path):
    with pytest.raises(ingest.IngestError, match="metadata.csv"):
        ingest.run(_params({"kind": "local", "path": str(tmp_path / "nowhere")}), Paths(tmp_path))
    bad = tmp_path / "bad"
    bad.mkdir()
    pd.DataFrame({"isic_id": ["../etc/passwd"]}).to_csv(bad / "metadata.csv", index=False)
    with pytest.raises(ingest.IngestError, match="invalid isic_id"):
        ingest.run(_params({"kind": "local", "path": str(bad)}), Paths(tmp_path / "p"))
    assert not (tmp_path / "p" / "data" / "ingest" / "images" / "local" / "..").resolve().joinpath("etc").exists()


@pytest.mark.realdata
def test_ingest_all_of_isic_real(tmp_path, isic_real):
    paths = Paths(tmp_path)
    s = ingest.run(_params({"kind": "local", "name": "isic-real", "path": str(isic_real)}), paths)
    df = read_index(paths, "ingest")
    assert s["images"] == len(df) == 2467 and s["failed"] == 0
    assert (df.benign_malignant == "malignant").sum() == 740
