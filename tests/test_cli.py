"""`lesionflow` speaks to people: one `error:` line naming the file / key / id, exit 2 for bad input, 1 for
runtime failures, a traceback only with --debug (or LESIONFLOW_DEBUG=1)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows import cli
from flows.cli import main

ROOT = Path(__file__).resolve().parents[1]
LESIONFLOW = Path(sys.executable).parent / "lesionflow"


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """An empty project with the real params.yaml (no data yet); debug off whatever the caller's env says."""
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    monkeypatch.delenv(cli.FORCE_PRUNE_ENV, raising=False)
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def run(capsys, *argv: str) -> tuple[int, str, list[str]]:
    """main(argv) -> (exit code, stdout, stderr lines)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err.splitlines()


def one_error(err: list[str]) -> str:
    """The single stderr line, which must be an `error:` line (no traceback, no usage block)."""
    assert len(err) == 1, "expected one error line, got:\n" + "\n".join(err)
    assert err[0].startswith("error: ")
    return err[0]


# --------------------------------------------------------------------------- bad input: exit 2
def test_bad_params_exit_2_and_name_the_key(project, capsys):
    data = yaml.safe_load((project / "params.yaml").read_text())
    data["split"]["valdation"] = 0.15
    (project / "params.yaml").write_text(yaml.safe_dump(data))
    code, out, err = run(capsys, "--root", str(project), "--params", str(project / "params.yaml"), "stage", "split")
    line = one_error(err)
    assert code == 2 and out == ""
    assert "params.yaml" in line and "split.valdation" in line and "unknown key" in line


def test_bad_params_value_names_file_and_key(project, capsys):
    (project / "bad.yaml").write_text("ingest:\n  sources: [{kind: synthetic}]\n  workers: many\n")
    code, _, err = run(capsys, "--params", str(project / "bad.yaml"), "params")
    line = one_error(err)
    assert code == 2 and "bad.yaml" in line and "ingest.workers" in line


def test_missing_params_file(project, capsys):
    code, _, err = run(capsys, "--params", str(project / "nope.yaml"), "params")
    assert code == 2 and "nope.yaml: not found" in one_error(err)


def test_unknown_stage_exit_2_lists_the_stages(project, capsys):
    code, _, err = run(capsys, "--root", str(project), "stage", "ingset")
    line = one_error(err)
    assert code == 2 and "unknown stage 'ingset'" in line and "ingest" in line and "evaluate" in line


def test_usage_errors_are_one_line_exit_2(capsys):
    code, _, err = run(capsys, "run", "--executor", "bogus")
    line = one_error(err)
    assert code == 2 and "--executor" in line and "bogus" in line and "--help" in line
    code, _, err = run(capsys, "frobnicate")
    assert code == 2 and "frobnicate" in one_error(err)
    code, _, err = run(capsys, "deploy", "--gpu-limit", "0")
    assert code == 2 and "--gpu-limit" in one_error(err)


def test_run_with_unknown_stage_is_bad_input(project, capsys):
    shutil.copy(ROOT / "dvc.yaml", project / "dvc.yaml")
    code, _, err = run(capsys, "--root", str(project), "run", "--stages", "nope")
    assert code == 2 and "unknown stage(s) ['nope']" in one_error(err)


def test_run_without_dvc_yaml_says_where_it_looked(project, capsys):
    code, _, err = run(capsys, "--root", str(project / "elsewhere"), "run")
    line = one_error(err)
    assert code == 2 and "elsewhere/dvc.yaml: not found" in line and "--root" in line


def test_force_prune_is_for_ingest_only(project, capsys):
    code, _, err = run(capsys, "--root", str(project), "stage", "split", "--force-prune")
    assert code == 2 and "--force-prune applies to the ingest stage only" in one_error(err)


def test_force_prune_sets_the_param_for_that_run_only(project, capsys, monkeypatch):
    seen = []
    monkeypatch.setattr("flows.stages.Stage.load", lambda self: lambda params, paths: seen.append(params.ingest))
    assert run(capsys, "--root", str(project), "--params", str(project / "params.yaml"),
               "stage", "ingest", "--force-prune")[0] == 0
    assert run(capsys, "--root", str(project), "--params", str(project / "params.yaml"), "stage", "ingest")[0] == 0
    assert [s.force_prune for s in seen] == [True, False]
    assert yaml.safe_load((project / "params.yaml").read_text())["ingest"].get("force_prune") in (None, False)
    monkeypatch.setenv(cli.FORCE_PRUNE_ENV, "1")  # how `lesionflow run/nightly --force-prune` reach DVC's stage
    assert run(capsys, "--root", str(project), "--params", str(project / "params.yaml"), "stage", "ingest")[0] == 0
    assert seen[-1].force_prune is True


def test_force_prune_env_name_matches_the_pipeline():
    from flows.pipeline import FORCE_PRUNE_ENV

    assert cli.FORCE_PRUNE_ENV == FORCE_PRUNE_ENV


def test_isic_server_images_folder_must_exist(project, capsys):
    code, _, err = run(capsys, "isic-server", "--images", str(project / "none"))
    assert code == 2 and "none/metadata.csv: not found" in one_error(err)
    code, _, err = run(capsys, "isic-server", "--root", str(project / "none"))  # deprecated spelling still works
    assert code == 2 and "deprecated" in err[0] and "--images" in err[0] and err[-1].startswith("error: ")
    code, _, err = run(capsys, "isic-server")
    assert code == 2 and "--images" in one_error(err)


# --------------------------------------------------------------------------- runtime failures: exit 1
def test_missing_upstream_index_exit_1_names_file_and_next_step(project, capsys):
    code, out, err = run(capsys, "--root", str(project), "--params", str(project / "params.yaml"), "stage", "dedupe")
    line = one_error(err)
    assert code == 1 and out == ""
    assert "data/ingest/index.parquet not found" in line and "lesionflow stage ingest" in line


def test_debug_flag_and_env_show_the_traceback(project, capsys, monkeypatch):
    argv = ["--root", str(project), "--params", str(project / "params.yaml"), "stage", "dedupe"]
    for extra, env in ((["--debug"], None), ([], "1")):
        if env:
            monkeypatch.setenv(cli.DEBUG_ENV, env)
        code, _, err = run(capsys, *extra, *argv)
        assert code == 1 and err[0] == "Traceback (most recent call last):" and len(err) > 3
        assert err[-1].startswith("error: ") and "index.parquet not found" in err[-1]


def test_unexpected_exception_names_its_type_and_points_at_debug(project, capsys, monkeypatch):
    def boom(params, paths):
        raise KeyError("isic_id")

    monkeypatch.setattr("flows.stages.Stage.load", lambda self: boom)
    code, _, err = run(capsys, "--root", str(project), "--params", str(project / "params.yaml"), "stage", "clean")
    line = one_error(err)
    assert code == 1 and "KeyError: 'isic_id'" in line and "--debug" in line


def test_no_prefect_server_is_a_runtime_error(project, capsys, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr("prefect.settings.PREFECT_API_URL.value", lambda: None)
    code, _, err = run(capsys, "--root", str(project), "deploy", "--pool", "p")
    assert code == 1 and "prefect server start" in one_error(err)


def test_promote_force_needs_a_version(project, capsys):
    code, _, err = run(capsys, "--root", str(project), "promote", "--force")
    assert code == 2 and "--version" in one_error(err)


def test_the_console_script_end_to_end(project):
    """The installed `lesionflow` entry point: same exit codes and one line, in a real process."""
    res = subprocess.run([str(LESIONFLOW), "--root", str(project), "stage", "nope"], capture_output=True, text=True)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "unknown stage 'nope'" in res.stderr
