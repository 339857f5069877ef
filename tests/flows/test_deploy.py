"""Deployments (checked as objects, no server) and the orchestration CLI commands."""

from __future__ import annotations

from flows import deploy
from flows.cli import main
from flows.nightly import Nightly
from tests.flows.conftest import ROOT


def test_nightly_deployment_has_the_configured_cron_and_timezone(tmp_path):
    cfg = Nightly(cron="30 3 * * 1-5", timezone="Europe/Berlin")
    nightly, pipeline = deploy.build_deployments(tmp_path, cfg, "ops/nightly.yaml")
    (sched,) = nightly.schedules
    assert (sched.schedule.cron, sched.schedule.timezone, sched.active) == ("30 3 * * 1-5", "Europe/Berlin", True)
    assert nightly.name == "nightly" and nightly.flow_name == "nightly"
    assert nightly.parameters == {"root": str(tmp_path.resolve()), "config": "ops/nightly.yaml"}
    assert nightly.concurrency_limit == 1  # never two nightlies at once (they would share one DVC lock)
    assert pipeline.name == "pipeline" and pipeline.schedules == [] and pipeline.parameters["executor"] == "dvc"


def test_next_nightly_runs_fall_at_the_configured_local_time():
    """The schedule computes real dates: 02:00 in Berlin is 01:00 UTC in winter and 00:00 UTC in summer."""
    import asyncio
    import datetime as dt
    from zoneinfo import ZoneInfo

    from prefect.server.schemas.schedules import CronSchedule

    (d, _) = deploy.build_deployments(ROOT, Nightly(cron="0 2 * * *", timezone="Europe/Berlin"))
    sched = d.schedules[0].schedule
    server_side = CronSchedule(cron=sched.cron, timezone=sched.timezone)  # what the server's scheduler uses
    utc = ZoneInfo("UTC")
    for month, utc_hour in ((1, 1), (7, 0)):
        runs = asyncio.run(server_side.get_dates(n=3, start=dt.datetime(2025, month, 10, 12, tzinfo=utc)))
        assert [r.astimezone(utc).hour for r in runs] == [utc_hour] * 3
        assert [r.astimezone(utc).day for r in runs] == [11, 12, 13]


def test_deploy_dry_run_describes_schedule_without_a_server(tmp_path, capsys):
    (tmp_path / "nightly.yaml").write_text("cron: '15 1 * * *'\ntimezone: America/New_York\n")
    assert main(["--root", str(tmp_path), "deploy", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "nightly/nightly: cron '15 1 * * *' America/New_York" in out and "pipeline/pipeline: on demand" in out


def test_deploy_rejects_bad_config_before_contacting_anything(tmp_path, capsys):
    (tmp_path / "nightly.yaml").write_text("timezone: Atlantis/Capital\n")
    assert main(["--root", str(tmp_path), "deploy", "--dry-run"]) == 2  # bad input
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ") and "nightly.yaml" in line and "unknown IANA timezone 'Atlantis/Capital'" in line


def test_ui_prints_the_mlflow_command(capsys):
    assert main(["ui", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db "
                          "--default-artifact-root mlruns/artifacts --host 127.0.0.1")


def test_run_reports_a_registry_mismatch_as_an_error(tmp_path, capsys, monkeypatch):
    (tmp_path / "dvc.yaml").write_text("stages:\n  ingest: {cmd: x}\n  mystery: {cmd: y}\n")
    assert main(["--root", str(tmp_path), "run", "--executor", "inprocess"]) == 1
    assert "in dvc.yaml but not in flows/stages.py STAGES: ['mystery']" in capsys.readouterr().err
