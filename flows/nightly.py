"""Nightly retrain: refresh the data, reproduce what is stale, and promote the challenger only if it is better.

The sequence (every step logged in Prefect; every verdict in MLflow tags and reports/promotion_log.jsonl):
1. run the network stages (ingest) with `--force`: DVC cannot see new images at the source, and ingest is
   incremental (persist: true), so this downloads only what is new and leaves data/ingest byte-identical
   when nothing is;
2. `dvc status`: nothing stale (no new images, code or params) -> log `noop` and stop, no retraining;
3. otherwise reproduce the whole pipeline (DVC skips what is still up to date);
3b. the drift report (flows/drift.py): the new data vs the data the champion was trained on;
4. score the challenger and the current champion on the same frozen test split (flows.promotion); a drifted
   night is held (verdict `drift-hold`) unless nightly.yaml `drift.allow_drifted_promotion` is true;
5. optionally `dvc push` and `git commit dvc.lock`; only then move the `champion` alias.
Any failure: the alias is never touched (it moves last), the workspace is restored to what dvc.lock
records (`dvc checkout --force`), a `failed` line with the reason goes to the promotion log, and the flow
run fails.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect import flow
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from flows import drift as drift_step
from flows import promotion
from flows import stages as registry
from flows.pipeline import PipelineError, pipeline_flow, plan, subprocess_env
from flows.promotion import append_jsonl, now_iso
from tasks.core.errors import InputError
from tasks.core.lineage import code_version, data_version

NIGHTLY_FILE = "nightly.yaml"


# --------------------------------------------------------------------------- config
class Nightly(BaseModel):
    """nightly.yaml: operations knobs. Not in params.yaml, whose sections are DVC stage params: changing the
    margin or the schedule must not make any stage stale."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cron: str = "0 2 * * *"
    timezone: str = "UTC"
    margin: float = Field(default=0.005, ge=0.0, le=1.0)  # challenger AUC must beat champion AUC + margin
    model_name: str = "lesionflow-classifier"
    alias: str = "champion"
    promotion_log: str = "reports/promotion_log.jsonl"
    network_retries: int = Field(default=2, ge=0, le=10)
    retry_delay_seconds: float = Field(default=60.0, ge=0)
    push_remote: bool = False  # `dvc push` the reproduced data before promoting (needs a DVC remote)
    remote: str | None = None  # DVC remote name; None = the default remote
    commit_lock: bool = False  # `git commit dvc.lock` after a reproduction (the record of what the model saw)
    drift: drift_step.DriftConfig = Field(default_factory=drift_step.DriftConfig)  # the drift report + gate

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown IANA timezone {v!r} (e.g. UTC, Europe/Berlin, America/New_York)") from None
        return v

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=v)  # Prefect's own validator: what the deployment will accept
        except ValidationError:
            raise ValueError(f"invalid cron expression {v!r} (5 fields, e.g. '0 2 * * *' = 02:00 daily)") from None
        return v


class NightlyConfigError(InputError):
    """nightly.yaml is unreadable or invalid; the message names the file and every bad key (exit 2)."""


def load_nightly(path: Path | str) -> Nightly:
    """Read and validate nightly.yaml; a missing file means the defaults."""
    path = Path(path)
    if not path.exists():
        return Nightly()
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise NightlyConfigError(f"{path}: not valid YAML ({exc}); fix the file") from None
    try:
        return Nightly.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: "
                             + ("unknown key (typo?)" if e["type"] == "extra_forbidden"
                                else e["msg"].removeprefix("Value error, "))
                             for e in errors)
        keys = f" (keys: {', '.join(Nightly.model_fields)})" if any(e["type"] == "extra_forbidden"
                                                                   for e in errors) else ""
        raise NightlyConfigError(f"{path}: invalid nightly config: {problems}{keys}") from None


# --------------------------------------------------------------------------- DVC / git operations
def _dvc(root: Path, *args: str, timeout: float = 3600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def dvc_status(root: Path) -> dict[str, Any]:
    """`dvc status --json`: {} when every stage is up to date; else what changed per stage."""
    res = _dvc(root, "status", "--json", timeout=600)
    if res.returncode != 0:
        raise PipelineError(f"`dvc status` failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    out = res.stdout.strip()
    return json.loads(out) if out else {}


def restore_workspace(root: Path) -> dict[str, Any]:
    """Put every stage output back to what dvc.lock records (undoes a half-run stage); never raises."""
    try:
        res = _dvc(root, "checkout", "--force", timeout=3600)
        return {"ok": res.returncode == 0, "output": (res.stdout + res.stderr).strip()[-1000:]}
    except Exception as exc:  # restoring is best effort; the original failure is what gets raised
        return {"ok": False, "output": f"{type(exc).__name__}: {exc}"}


def dvc_push(root: Path, remote: str | None) -> None:
    res = _dvc(root, "push", *(["-r", remote] if remote else []))
    if res.returncode != 0:
        raise PipelineError(f"`dvc push` failed ({res.returncode}): {res.stderr.strip()[-2000:]}; "
                            "check the remote with `dvc remote list` or set push_remote: false in nightly.yaml")


def commit_lock(root: Path, message: str) -> str | None:
    """`git commit dvc.lock` (only that file); returns the new commit, or None when the lock is unchanged."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=120)

    if git("diff", "--quiet", "HEAD", "--", "dvc.lock").returncode == 0 and \
            git("ls-files", "--error-unmatch", "dvc.lock").returncode == 0:
        return None
    for args in (("add", "dvc.lock"), ("commit", "-m", message, "--", "dvc.lock")):
        res = git(*args)
        if res.returncode != 0:
            raise PipelineError(f"`git {' '.join(args[:1])}` failed: {(res.stderr or res.stdout).strip()[-1000:]}")
    return git("rev-parse", "HEAD").stdout.strip()


# --------------------------------------------------------------------------- the flow
def _flow_run_id() -> str | None:
    try:
        from prefect.runtime import flow_run

        return flow_run.id
    except Exception:
        return None


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # called outside a flow run
        return logging.getLogger(__name__)


def failure_reason(exc: BaseException) -> str:
    """One line saying why the night failed (a PipelineError's summary, else the exception's first line)."""
    text = getattr(exc, "summary", None) or str(exc) or type(exc).__name__
    return " ".join(text.split("\n", 1)[0].split())


@flow(name="nightly", log_prints=True)
def nightly_flow(root: str = ".", config: str = NIGHTLY_FILE, params: str = "params.yaml",
                 force_prune: bool = False) -> dict[str, Any]:
    """Refresh data, reproduce if anything is stale, gate the challenger; see the module docstring.
    `force_prune` lets this night's ingest prune images its sources no longer list (an operator's decision)."""
    root_p = Path(root).resolve()
    cfg = load_nightly(root_p / config)
    logger = _logger()
    order = plan(root_p)  # dvc.yaml vs registry mismatch fails here, before any work
    network = [s for s in order if "network" in registry.STAGES[s].tags]
    reg = promotion.make_registry(cfg, root_p, root_p / params)
    base = {"trigger": "nightly", "flow_run": _flow_run_id(), "started_at": now_iso()}
    log = root_p / cfg.promotion_log
    try:
        if network:
            logger.info("refreshing %s (forced; incremental%s)", network, "; force_prune" if force_prune else "")
            pipeline_flow(str(root_p), params, "dvc", stages=network, force=True,
                          network_retries=cfg.network_retries, retry_delay_seconds=cfg.retry_delay_seconds,
                          force_prune=force_prune)
        stale = dvc_status(root_p)
        logger.info("stale stages: %s", sorted(stale) or "none")
        champion = None if stale else reg.champion()
        if not stale and champion is not None:
            rec = {**base, **promotion.base_record(cfg, root_p), "verdict": "noop", "promote": False,
                   "reasons": ["no new images, code or params: nothing to retrain"], "stale": [],
                   "champion": {"version": champion}}
            append_jsonl(log, rec)
            logger.info("nothing changed; champion stays version %s", champion)
            return rec
        if stale:
            results = pipeline_flow(str(root_p), params, "dvc", network_retries=cfg.network_retries,
                                    retry_delay_seconds=cfg.retry_delay_seconds)
            logger.info("reproduced: %s", [r["stage"] for r in results if r["ran"]])
        drift = drift_step.safe_drift_check(root_p, cfg.drift, cfg.model_name, reg.champion())
        for line in drift_step.report_lines(drift):
            logger.info(line)
        rec = {**base, **promotion.judge(reg, cfg, root_p), "stale": sorted(stale)}
        rec = promotion.drift_gate(rec, drift, cfg.drift.allow_drifted_promotion)
        logger.info("verdict %s: %s", rec["verdict"], "; ".join(rec["reasons"]))
        if cfg.push_remote:
            dvc_push(root_p, cfg.remote)
        if cfg.commit_lock:
            rec["lock_commit"] = commit_lock(root_p, f"nightly: reproduce ({rec['verdict']})")
        return promotion.apply(reg, cfg, rec, root_p)
    except Exception as exc:
        restored = restore_workspace(root_p)
        reason = failure_reason(exc)
        if not getattr(exc, "promotion_logged", False):
            append_jsonl(log, {**base, "time": now_iso(), "model": cfg.model_name, "alias": cfg.alias,
                               "verdict": "failed", "promote": False, "applied": False,
                               "reasons": [f"night failed, nothing promoted: {reason}"],
                               "stage": getattr(exc, "stage", None), "error": f"{type(exc).__name__}: {reason}",
                               "restored": restored, "data_version": data_version(root_p),
                               "code_version": code_version(root_p)})
        logger.error("nightly failed (%s); champion untouched, workspace restored=%s", reason, restored["ok"])
        raise
