"""params.yaml validation: the shipped file is valid; typos and wrong types fail with the key path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.config import ParamsError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def _params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_shipped_params_are_valid():
    p = load_params(ROOT / "params.yaml")
    assert p.ingest.sources[0].kind == "synthetic"


@pytest.mark.parametrize("profile", sorted((ROOT / "params").glob("*.yaml")), ids=lambda p: p.name)
def test_profiles_are_valid(profile):
    load_params(profile)


def test_unknown_key_names_path_and_allowed_keys():
    data = _params()
    data["split"]["tset"] = 0.2
    with pytest.raises(ParamsError) as e:
        parse_params(data, "params.yaml")
    msg = str(e.value)
    assert "params.yaml" in msg and "split.tset" in msg and "unknown key" in msg and "allowed: " in msg
    assert "test" in msg


def test_wrong_type_names_path():
    data = _params()
    data["ingest"]["workers"] = "many"
    with pytest.raises(ParamsError, match=r"ingest\.workers"):
        parse_params(data)


def test_source_kind_and_options_validated():
    data = _params()
    data["ingest"]["sources"] = [{"kind": "ftp", "path": "x"}]
    with pytest.raises(ParamsError, match="must be one of"):
        parse_params(data)
    data["ingest"]["sources"] = [{"kind": "local"}]  # path is required
    with pytest.raises(ParamsError, match=r"ingest\.sources\.0\.local\.path: Field required"):
        parse_params(data)
    data["ingest"]["sources"] = [{"kind": "isic", "limit": -1}]
    with pytest.raises(ParamsError, match="limit"):
        parse_params(data)
    data["ingest"]["sources"] = [{"kind": "local", "path": "a"}, {"kind": "local", "path": "b"}]
    with pytest.raises(ParamsError, match="unique"):
        parse_params(data)


def test_split_fractions_must_sum_to_one():
    data = _params()
    data["split"].update(train=0.8, val=0.15, test=0.15)
    with pytest.raises(ParamsError, match="sum to 1"):
        parse_params(data)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("ingest: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_cli_params_exits_nonzero_before_work(tmp_path):
    data = _params()
    data["preprocess"]["sise"] = 64
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(data))
    cmd = [sys.executable, "-m", "flows.cli", "--params", str(bad), "--root", str(tmp_path), "stage", "ingest"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    assert "preprocess.sise" in r.stderr and str(bad) in r.stderr
    assert not (tmp_path / "data").exists()  # failed before any work


def test_cli_params_prints_validated(tmp_path):
    r = subprocess.run([sys.executable, "-m", "flows.cli", "params"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    printed = yaml.safe_load(r.stdout)
    assert printed["split"]["seed"] == _params()["split"]["seed"]
    assert printed["ingest"]["sources"][0]["kind"] == "synthetic"


@pytest.mark.parametrize("profile", sorted((ROOT / "params").glob("*.yaml")), ids=lambda p: p.name)
def test_profiles_are_complete(profile):
    """`cp params/<profile>.yaml params.yaml && dvc repro` needs every stage section present in the file."""
    from flows.stages import STAGES

    missing = [s for s in STAGES if s not in yaml.safe_load(profile.read_text())]
    assert not missing, f"{profile.name} lacks sections {missing}"
