"""ingest: synthetic (through the local server), local isic-cli folders, incremental reruns, failures."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from tasks import ingest
from tasks.core.config import parse_params
from tasks.core.errors import InputError, RunError
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
    with pytest.raises(RunError, match=missing.stem):
        ingest.run(_params({"kind": "local", "path": str(folder)}), paths)
    assert not paths.index("ingest").exists()  # a failing run commits nothing
    failed = pd.read_csv(paths.reports / "ingest" / "failed.csv")
    assert failed.isic_id.tolist() == [missing.stem]
    # With a tolerance the stage completes and still lists the failure.
    s = ingest.run(_params({"kind": "local", "path": str(folder)}, max_failures=1), paths)
    assert s["failed"] == 1 and s["images"] == 4


def test_local_source_errors_are_clear(tmp_path):
    with pytest.raises(InputError, match="metadata.csv"):
        ingest.run(_params({"kind": "local", "path": str(tmp_path / "nowhere")}), Paths(tmp_path))
    bad = tmp_path / "bad"
    bad.mkdir()
    pd.DataFrame({"isic_id": ["../etc/passwd"]}).to_csv(bad / "metadata.csv", index=False)
    with pytest.raises(RunError, match="invalid isic_id"):
        ingest.run(_params({"kind": "local", "path": str(bad)}), Paths(tmp_path / "p"))
    assert not (tmp_path / "p" / "data" / "ingest" / "images" / "local" / "..").resolve().joinpath("etc").exists()


@pytest.mark.realdata
def test_ingest_all_of_isic_real(tmp_path, isic_real):
    paths = Paths(tmp_path)
    s = ingest.run(_params({"kind": "local", "name": "isic-real", "path": str(isic_real)}), paths)
    df = read_index(paths, "ingest")
    assert s["images"] == len(df) == 2467 and s["failed"] == 0
    assert (df.benign_malignant == "malignant").sum() == 740


# --------------------------------------------------------------------------- transactional runs (issue 10)
def _sample(tmp_path: Path, n: int = 12) -> Path:
    from tasks.fake.isic_folder import write_sample_folder

    return write_sample_folder(tmp_path / "src", n=n, size=(8, 6))


def _snapshot(paths: Paths) -> dict[str, bytes]:
    """Every committed file of data/ingest (work folders excluded) with its bytes."""
    out = paths.stage("ingest")
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and not p.relative_to(out).as_posix().startswith((".staging", ".pruned"))}


def _local(folder: Path, **kw) -> object:
    return _params({"kind": "local", "name": "loc", "path": str(folder)}, **kw)


def _drop_rows(folder: Path, ids: list[str]) -> None:
    meta = pd.read_csv(folder / "metadata.csv", dtype=str, keep_default_na=False)
    meta[~meta.isic_id.isin(ids)].to_csv(folder / "metadata.csv", index=False)


def test_failing_run_changes_nothing_already_ingested(tmp_path):
    folder = _sample(tmp_path)
    paths = Paths(tmp_path / "proj")
    ingest.run(_local(folder), paths)
    before = _snapshot(paths)
    # A changed image (would be re-copied), a new image and a missing one: the run fails on the missing one.
    (folder / "ISIC_9100001.png").write_bytes((folder / "ISIC_9100001.png").read_bytes() + b"changed")
    (folder / "ISIC_9100002.png").unlink()
    with pytest.raises(RunError, match="ISIC_9100002") as ei:
        ingest.run(_local(folder), paths)
    assert "max_failures" in str(ei.value) and "reports/ingest/failed.csv" in str(ei.value)
    assert _snapshot(paths) == before  # index, images, manifest: byte for byte
    # The rerun that tolerates the failure commits, reusing the staged copy and keeping the old bytes aside.
    s = ingest.run(_local(folder, max_failures=1), paths)
    assert s["downloaded"] == 0 and s["images"] == 11
    committed = paths.stage("ingest") / "images/loc/ISIC_9100001.png"
    assert committed.read_bytes().endswith(b"changed")
    old = list((paths.stage("ingest") / ".pruned").rglob("ISIC_9100001.png"))
    assert len(old) == 1 and old[0].read_bytes() == before["images/loc/ISIC_9100001.png"]
    assert not (paths.stage("ingest") / ".staging").exists()


def test_duplicate_metadata_row_is_an_input_error_and_changes_nothing(tmp_path):
    folder = _sample(tmp_path, n=4)
    paths = Paths(tmp_path / "proj")
    ingest.run(_local(folder), paths)
    before = _snapshot(paths)
    meta = pd.read_csv(folder / "metadata.csv", dtype=str, keep_default_na=False)
    pd.concat([meta, meta.iloc[[2]]]).to_csv(folder / "metadata.csv", index=False)
    with pytest.raises(InputError, match=r"ISIC_9100002 \(lines 4, 6\)"):
        ingest.run(_local(folder), paths)
    assert _snapshot(paths) == before


def test_a_source_that_lists_nothing_is_not_emptied(tmp_path):
    from tasks.fake.isic_server import running_server

    folder = _sample(tmp_path, n=6)
    paths = Paths(tmp_path / "proj")
    with running_server(folder) as api:
        def isic(query: str, **kw) -> object:
            return _params({"kind": "isic", "name": "api", "base_url": api, "query": query}, **kw)

        assert ingest.run(isic(""), paths)["images"] == 6
        before = _snapshot(paths)
        with pytest.raises(RunError, match=r"sources\[api\] listed no images.*6 file.*force_prune"):
            ingest.run(isic("diagnosis_1:NoSuchThing"), paths)
        assert _snapshot(paths) == before
        s = ingest.run(isic("diagnosis_1:NoSuchThing", force_prune=True), paths)
    assert s["images"] == 0 and s["pruned"] == 6
    assert len(list((paths.stage("ingest") / ".pruned").rglob("*.png"))) == 6  # moved aside, recoverable


def test_pruning_more_than_the_fraction_needs_the_override_and_trash_is_emptied_later(tmp_path):
    folder = _sample(tmp_path, n=12)
    paths = Paths(tmp_path / "proj")
    ingest.run(_local(folder), paths)
    before = _snapshot(paths)
    _drop_rows(folder, ["ISIC_9100003", "ISIC_9100007"])
    with pytest.raises(RunError) as ei:
        ingest.run(_local(folder), paths)
    msg = str(ei.value)
    assert "sources[loc]" in msg and "2 of 12" in msg and "max_prune_fraction=0.05" in msg and "force_prune" in msg
    assert _snapshot(paths) == before
    s = ingest.run(_local(folder, max_prune_fraction=0.2), paths)
    assert s["pruned"] == 2 and s["images"] == 10
    trash = paths.stage("ingest") / ".pruned"
    [run_dir] = list(trash.iterdir())
    assert sorted(p.name for p in run_dir.rglob("*.png")) == ["ISIC_9100003.png", "ISIC_9100007.png"]
    assert not (paths.stage("ingest") / "images/loc/ISIC_9100003.png").exists()
    # A failing run keeps the trash; the next successful run empties it.
    (folder / "ISIC_9100000.png").unlink()
    with pytest.raises(RunError):
        ingest.run(_local(folder), paths)
    assert run_dir.exists()
    ingest.run(_local(folder, max_failures=1), paths)
    assert not run_dir.exists()


def test_local_folder_odd_entries_are_reported_not_ingested(tmp_path):
    import os

    folder = _sample(tmp_path, n=6)
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"not yours")
    (folder / "ISIC_9100000.png").unlink()
    (folder / "ISIC_9100000.png").mkdir()  # a directory named like an image
    (folder / "ISIC_9100001.png").unlink()
    os.mkfifo(folder / "ISIC_9100001.png")  # a named pipe: opening it would block forever
    (folder / "ISIC_9100002.png").unlink()
    (folder / "ISIC_9100002.png").symlink_to(outside)  # leaves the folder
    shutil.copy(folder / "ISIC_9100003.png", folder / "ISIC_9100003.jpg")  # two files for one id
    (folder / "ISIC_9100009.png").symlink_to(outside)  # not even listed: still reported
    paths = Paths(tmp_path / "proj")
    s = ingest.run(_local(folder, max_failures=5), paths)
    assert s["images"] == 2 and s["failed"] == 5
    failed = pd.read_csv(paths.stage("ingest") / "failed.csv").set_index("isic_id").reason
    assert "directory" in failed["ISIC_9100000"] and "named pipe" in failed["ISIC_9100001"]
    assert "outside" in failed["ISIC_9100002"] and "outside" in failed["ISIC_9100009"]
    assert "several image files" in failed["ISIC_9100003"] and "ISIC_9100003.jpg" in failed["ISIC_9100003"]
    assert sorted(read_index(paths, "ingest").isic_id) == ["ISIC_9100004", "ISIC_9100005"]
    assert not [p for p in paths.stage("ingest").rglob("*") if p.is_file() and p.read_bytes() == b"not yours"]


def test_non_utf8_metadata_is_an_input_error_naming_the_file(tmp_path):
    folder = _sample(tmp_path, n=2)
    meta = (folder / "metadata.csv").read_text(encoding="utf-8").replace("Sample Clinic A", "Clínica A")
    (folder / "metadata.csv").write_bytes(meta.encode("latin-1"))
    with pytest.raises(InputError, match=r"metadata\.csv is not UTF-8.*re-save it as UTF-8"):
        ingest.run(_local(folder), Paths(tmp_path / "proj"))


def test_source_names_never_leave_the_stage_folder(tmp_path):
    base = tmp_path / "data/ingest/images"
    base.mkdir(parents=True)
    assert ingest.child_dir(base, "isic-2024") == base / "isic-2024"
    for bad in ("..", "../x", "a/b", ".hidden", "", "a\\b"):
        with pytest.raises(InputError, match="outside"):
            ingest.child_dir(base, bad)
    (base / "linked").symlink_to(tmp_path)  # a folder that points elsewhere is refused too
    with pytest.raises(InputError, match="outside"):
        ingest.child_dir(base, "linked")


def test_server_failure_mid_run_changes_nothing(tmp_path):
    from tasks.fake.isic_server import IsicServer

    folder = _sample(tmp_path, n=4)
    paths = Paths(tmp_path / "proj")
    with IsicServer(folder) as srv:
        ingest.run(_params({"kind": "isic", "name": "api", "base_url": srv.api_url}), paths)
    before = _snapshot(paths)
    with IsicServer(folder, fail_rate=1.0) as srv:
        with pytest.raises(RunError, match=r"sources\[api\].*503.*Nothing was changed"):
            ingest.run(_params({"kind": "isic", "name": "api", "base_url": srv.api_url}, max_retries=0), paths)
    assert _snapshot(paths) == before
