"""params.yaml validation: the shipped file is valid; typos and wrong types fail with the key path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.core.config import ParamsError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[3]


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


# --------------------------------------------------------------------------- strictness (issue 10)
def _load_text(tmp_path: Path, text: str):
    f = tmp_path / "params.yaml"
    f.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return load_params(f)


@pytest.mark.parametrize("section,key,value,match", [
    ("clean", "min_side", True, "valid integer"),          # bool is not an int
    ("ingest", "timeout_read", "30", "valid number"),       # str is not a float
    ("ingest", "timeout_read", float("inf"), "finite"),     # no infinite timeout
    ("ingest", "timeout_connect", float("nan"), "finite"),
    ("split", "seed", 4.0, "valid integer"),                # float is not an int
])
def test_types_are_strict(section, key, value, match):
    data = _params()
    data[section][key] = value
    with pytest.raises(ParamsError, match=match) as e:
        parse_params(data)
    assert f"{section}.{key}" in str(e.value)


def test_yaml_inf_timeout_fails_before_work(tmp_path):
    text = (ROOT / "params.yaml").read_text().replace("timeout_read: 30.0", "timeout_read: .inf")
    assert ".inf" in text
    with pytest.raises(ParamsError, match=r"ingest\.timeout_read.*finite"):
        _load_text(tmp_path, text)


def test_duplicate_yaml_keys_are_errors(tmp_path):
    text = (ROOT / "params.yaml").read_text().replace("split:\n", "split:\n  seed: 1\n", 1)
    with pytest.raises(ParamsError, match="duplicate key 'seed'"):
        _load_text(tmp_path, text)


def test_non_utf8_params_names_file(tmp_path):
    text = (ROOT / "params.yaml").read_text().encode("utf-8") + b"# caf\xe9\n"
    with pytest.raises(ParamsError, match=r"params\.yaml: not UTF-8.*re-save"):
        _load_text(tmp_path, text)


@pytest.mark.parametrize("name", ["../../../../escape", "a/b", ".hidden", "", "x" * 65, "sp ace"])
def test_source_names_are_safe_slugs(name):
    data = _params()
    data["ingest"]["sources"] = [{"kind": "local", "path": "x", "name": name}]
    with pytest.raises(ParamsError, match=r"ingest\.sources\.0\.local\.name"):
        parse_params(data)


def test_source_names_distinct_ignoring_case():
    data = _params()
    data["ingest"]["sources"] = [{"kind": "local", "path": "a", "name": "Derm"},
                                 {"kind": "local", "path": "b", "name": "derm"}]
    with pytest.raises(ParamsError, match="unique"):
        parse_params(data)


@pytest.mark.parametrize("var,ok", [("ISIC_TOKEN", True), ("MY_ISIC_TOKEN", True),
                                    ("AWS_SECRET_ACCESS_KEY", False), ("GITHUB_TOKEN", False), ("isic_token", False)])
def test_token_env_must_be_an_isic_token_variable(var, ok):
    data = _params()
    data["ingest"]["token_env"] = var
    if ok:
        assert parse_params(data).ingest.token_env == var
    else:
        with pytest.raises(ParamsError, match=r"ingest\.token_env"):
            parse_params(data)


def test_incomplete_profile_is_refused(tmp_path):
    text = (ROOT / "params.yaml").read_text().replace("  tile_grid: 8\n", "", 1)
    with pytest.raises(ParamsError, match=r"incomplete params; missing preprocess\.tile_grid"):
        _load_text(tmp_path, text)


def test_a_stage_sees_only_its_declared_sections():
    from flows.stages import STAGES

    p = load_params(ROOT / "params.yaml")
    view = p.view(STAGES["augment"].params, "augment")
    assert view.augment == p.augment and view.preprocess.size == p.preprocess.size
    with pytest.raises(ParamsError, match="stage 'augment' reads params section 'train'"):
        view.train  # noqa: B018 - the attribute read itself must raise


def test_code_defaults_equal_params_yaml():
    """params.yaml is the one record of the defaults; the in-code defaults may never drift from it."""
    data = _params()
    from tasks.core.config import Params

    drift = []
    for section, field in Params.model_fields.items():
        model = field.annotation
        for key, f in model.model_fields.items():
            if f.is_required() or key in ("sources", "members"):
                continue  # no default, or a list the profile composes
            default = f.get_default(call_default_factory=True)
            if data[section][key] != default:
                drift.append(f"{section}.{key}: code {default!r} vs params.yaml {data[section][key]!r}")
    assert not drift, drift
