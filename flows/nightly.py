"""Nightly retrain: refresh the data, reproduce what is stale, and promote the challenger only if it is better.

The sequence (every step logged in Prefect; every verdict in MLflow tags and reports/promotion_log.jsonl):
1. run the network stages (ingest) with `--force`: DVC cannot see new images at the source, and ingest is
   incremental (persist: true), so this downloads only what is new and leaves data/ingest byte-identical
   when nothing is;
2. `dvc status`: nothing stale (no new images, code or params) -> log `noop` and stop, no retraining;
3. otherwise reproduce the whole pipeline (DVC skips what is still up to date);
4. score the challenger and the current champion on the same frozen test split, `decide()`;
5. optionally `dvc push` and `git commit dvc.lock`; only then move the `champion` alias.
Any failure: the alias is never touched (it moves last), the workspace is restored to what dvc.lock
records (`dvc checkout --force`), the failure is logged, and the flow run fails.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import math
import numbers
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol

import yaml
from prefect import flow
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from flows import stages as registry
from flows.pipeline import PipelineError, pipeline_flow, plan, subprocess_env

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


def load_nightly(path: Path | str) -> Nightly:
    """Read and validate nightly.yaml; a missing file means the defaults."""
    path = Path(path)
    if not path.exists():
        return Nightly()
    try:
        data = yaml.safe_load(path.read_text()) or {}
        return Nightly.model_validate(data)
    except (yaml.YAMLError, ValidationError) as exc:
        raise ValueError(f"{path}: invalid nightly config: {exc}") from None


# --------------------------------------------------------------------------- the promotion gate (pure)
@dataclass(frozen=True)
class Score:
    """A model's result on the frozen test split: what the gate compares."""

    version: str
    auc: float
    false_negatives: int
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, d: Mapping[str, Any], who: str) -> "Score":
        """Validate a score dict {version, auc, false_negatives, ...}; a malformed score can never promote."""
        missing = [k for k in ("version", "auc", "false_negatives") if k not in d or d[k] is None]
        if missing:
            raise ValueError(f"{who} score lacks {missing}: {dict(d)}")
        auc, fn = d["auc"], d["false_negatives"]
        # numbers.* so numpy scalars pass; bool is excluded because True would read as AUC 1.0
        if isinstance(auc, bool) or not isinstance(auc, numbers.Real) or not math.isfinite(auc) or not 0 <= auc <= 1:
            raise ValueError(f"{who} auc must be a finite number in [0, 1], got {auc!r}")
        integral = isinstance(fn, numbers.Integral) or (isinstance(fn, numbers.Real) and float(fn).is_integer())
        if isinstance(fn, bool) or not integral:
            raise ValueError(f"{who} false_negatives must be an integer count, got {fn!r}")
        if fn < 0:
            raise ValueError(f"{who} false_negatives must be >= 0, got {fn!r}")
        extra = {k: v for k, v in d.items() if k not in ("version", "auc", "false_negatives")}
        return cls(str(d["version"]), float(auc), int(fn), extra)


@dataclass(frozen=True)
class Decision:
    """The gate's verdict: `promote` says whether the alias moves; `reasons` say why in words."""

    promote: bool
    verdict: str  # first | promote | reject | same
    reasons: tuple[str, ...]
    auc_delta: float | None = None  # challenger - champion
    fn_delta: int | None = None  # challenger - champion (negative = fewer missed melanomas)


def decide(challenger: Mapping[str, Any], champion: Mapping[str, Any] | None, margin: float) -> Decision:
    """Promote iff there is no champion, or challenger AUC > champion AUC + margin and its FN <= champion's."""
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    ch = Score.of(challenger, "challenger")
    if champion is None:
        return Decision(True, "first", ("no champion yet: the first model becomes champion",))
    cp = Score.of(champion, "champion")
    for k in ("n", "n_malignant"):  # false-negative counts only compare on the very same test rows
        if k in ch.extra and k in cp.extra and ch.extra[k] != cp.extra[k]:
            raise ValueError(f"challenger and champion were scored on different test sets ({k} {ch.extra[k]} vs "
                             f"{cp.extra[k]}); refusing to compare")
    if ch.version == cp.version:
        return Decision(False, "same", (f"version {ch.version} already is the champion",), 0.0, 0)
    auc_delta, fn_delta = ch.auc - cp.auc, ch.false_negatives - cp.false_negatives
    reasons = []
    better = ch.auc > cp.auc + margin
    reasons.append(f"AUC {ch.auc:.4f} vs {cp.auc:.4f} (+margin {margin:g} = {cp.auc + margin:.4f}): "
                   + ("better by more than the margin" if better else "not better by the margin"))
    safe = ch.false_negatives <= cp.false_negatives
    reasons.append(f"false negatives {ch.false_negatives} vs {cp.false_negatives}: "
                   + ("no more missed malignant lesions" if safe else "misses more malignant lesions"))
    promote = better and safe
    return Decision(promote, "promote" if promote else "reject", tuple(reasons), auc_delta, fn_delta)


# --------------------------------------------------------------------------- versions and logs
def data_version(root: Path) -> dict[str, Any]:
    """What data the decision saw: dvc.lock's sha256 and the md5 of every data/model output it records
    (reports/ metrics and plots left out: they describe the data, they are not it)."""
    lock = root / "dvc.lock"
    if not lock.exists():
        return {"dvc_lock_sha256": None, "outs": {}}
    text = lock.read_bytes()
    doc = yaml.safe_load(text) or {}
    outs = {o["path"]: o.get("md5") for st in (doc.get("stages") or {}).values() for o in st.get("outs", [])
            if not o["path"].startswith("reports/")}
    return {"dvc_lock_sha256": hashlib.sha256(text).hexdigest()[:16], "outs": outs}


def code_version(root: Path) -> dict[str, Any]:
    """The git commit of the code (and whether the tree had uncommitted changes)."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line atomically: one write() under an exclusive lock, fsynced (never a torn line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        written = os.write(fd, data)
        if written != len(data):  # disk full mid-line: cut the fragment so the log stays line-parseable
            os.ftruncate(fd, os.fstat(fd).st_size - written)
            raise OSError(f"{path}: short write ({written}/{len(data)} bytes)")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_log(path: Path) -> list[dict[str, Any]]:
    """All records of the promotion log (oldest first)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
        raise PipelineError(f"`dvc push` failed ({res.returncode}): {res.stderr.strip()[-2000:]}")


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


# --------------------------------------------------------------------------- the model registry seam
class ModelRegistry(Protocol):
    """What the gate needs from the registry; MLflow in production, an in-memory fake in tests."""

    def champion(self) -> str | None: ...  # version holding the alias, None before the first promotion

    def challenger(self) -> str | None: ...  # version built from the current pipeline outputs (None: no model)

    def score(self, version: str) -> dict[str, Any]: ...  # {version, auc, false_negatives, ...} on the test split

    def set_champion(self, version: str) -> None: ...  # move the alias

    def tag(self, version: str, tags: Mapping[str, str]) -> None: ...


class MlflowRegistry:
    """The gate's view of the MLflow registry, through tasks.tracking (the only mlflow importer) and
    tasks.evaluate.score_model (the scorer the evaluate stage uses, on the frozen test split)."""

    def __init__(self, root: Path, params_file: Path, model_name: str, alias: str) -> None:
        self.root, self.params_file, self.model_name, self.alias = root, params_file, model_name, alias

    def champion(self) -> str | None:
        from tasks import tracking

        return tracking.get_alias(self.model_name, self.alias, root=self.root)

    def challenger(self) -> str | None:
        from tasks import tracking

        return tracking.current_version(self.model_name, self.root)  # what the last evaluate registered

    def score(self, version: str) -> dict[str, Any]:
        from tasks.core.config import load_params
        from tasks.core.io import Paths
        from tasks.evaluate import score_model

        # same scorer, same params, same data/<stage>/index.parquet test rows for challenger and champion
        s = score_model(f"models:/{self.model_name}/{version}", load_params(self.params_file), Paths(self.root))
        keep = ("auc", "auc_ci_low", "auc_ci_high", "false_negatives", "false_positives", "sensitivity",
                "specificity", "n", "n_malignant", "n_errors")
        return {"version": version, **{k: s[k] for k in keep if k in s}}

    def set_champion(self, version: str) -> None:
        from tasks import tracking

        tracking.set_alias(self.model_name, self.alias, version, root=self.root)

    def tag(self, version: str, tags: Mapping[str, str]) -> None:
        from tasks import tracking

        tracking.set_version_tags(self.model_name, version, dict(tags), root=self.root)


def make_registry(cfg: Nightly, root: Path, params_file: Path) -> ModelRegistry:
    """The registry the flows use (tests monkeypatch this factory)."""
    return MlflowRegistry(root, params_file, cfg.model_name, cfg.alias)


# --------------------------------------------------------------------------- judge + apply
def judge(reg: ModelRegistry, cfg: Nightly, root: Path, version: str | None = None) -> dict[str, Any]:
    """Score challenger and champion on the same test split and decide; changes nothing."""
    challenger = version or reg.challenger()
    rec: dict[str, Any] = {"time": now_iso(), "model": cfg.model_name, "alias": cfg.alias, "margin": cfg.margin,
                           "data_version": data_version(root), "code_version": code_version(root)}
    if challenger is None:
        return {**rec, "verdict": "no-model", "promote": False,
                "reasons": ["the pipeline produced no registered model version"], "challenger": None,
                "champion": None}
    champ_version = reg.champion()
    ch = reg.score(challenger)
    cp = reg.score(champ_version) if champ_version is not None and champ_version != challenger else None
    if champ_version is not None and cp is None:
        cp = ch  # the challenger already is the champion: decide() reports `same`
    d = decide(ch, cp, cfg.margin)
    return {**rec, "verdict": d.verdict, "promote": d.promote, "reasons": list(d.reasons),
            "auc_delta": d.auc_delta, "fn_delta": d.fn_delta, "challenger": ch, "champion": cp}


def decision_tags(rec: Mapping[str, Any]) -> dict[str, str]:
    """The record as MLflow model-version tags (strings; short enough for the 5000-char tag limit)."""
    ch, cp = rec.get("challenger") or {}, rec.get("champion") or {}
    return {
        "promotion.verdict": str(rec["verdict"]),
        "promotion.time": str(rec["time"]),
        "promotion.trigger": str(rec.get("trigger", "")),
        "promotion.margin": str(rec["margin"]),
        "promotion.challenger_auc": str(ch.get("auc")),
        "promotion.challenger_false_negatives": str(ch.get("false_negatives")),
        "promotion.champion_version": str(cp.get("version")),
        "promotion.champion_auc": str(cp.get("auc")),
        "promotion.champion_false_negatives": str(cp.get("false_negatives")),
        "promotion.reasons": " | ".join(rec.get("reasons", []))[:4000],
        "promotion.data_version": json.dumps(rec["data_version"], sort_keys=True)[:4000],
        "promotion.code_version": json.dumps(rec["code_version"], sort_keys=True),
    }


def apply(reg: ModelRegistry, cfg: Nightly, rec: dict[str, Any], root: Path) -> dict[str, Any]:
    """Tag the challenger, move the alias if the verdict says so (the last mutation), append the log line."""
    log = root / cfg.promotion_log
    rec = dict(rec)
    version = (rec.get("challenger") or {}).get("version")
    try:
        if version is not None and rec["verdict"] != "same":  # keep the champion's own promotion tags
            reg.tag(version, decision_tags(rec))
        if rec["promote"]:
            reg.set_champion(version)
        rec["applied"] = bool(rec["promote"])
    except Exception as exc:
        rec.update(applied=False, verdict="failed", promote=False, error=f"{type(exc).__name__}: {exc}")
        append_jsonl(log, rec)
        exc.promotion_logged = True  # type: ignore[attr-defined]  # the flow must not log it twice
        raise
    append_jsonl(log, rec)
    return rec


def _flow_run_id() -> str | None:
    try:
        from prefect.runtime import flow_run

        return flow_run.id
    except Exception:
        return None


def _logger():
    import logging

    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # called outside a flow run (e.g. `lesionflow promote`)
        return logging.getLogger("flows.nightly")


def promote_now(root: Path, cfg: Nightly, params_file: Path, version: str | None = None, force: bool = False,
                trigger: str = "manual") -> dict[str, Any]:
    """The gate without reproducing anything (`lesionflow promote`, the demo); `force` skips the comparison
    (a rollback) but is still tagged and logged."""
    reg = make_registry(cfg, root, params_file)
    if force:
        if version is None:
            raise ValueError("--force needs --version (which version to make champion)")
        rec = {"time": now_iso(), "model": cfg.model_name, "alias": cfg.alias, "margin": cfg.margin,
               "data_version": data_version(root), "code_version": code_version(root), "verdict": "forced",
               "promote": True, "reasons": [f"forced by operator; previous champion {reg.champion()}"],
               "challenger": {"version": str(version)}, "champion": None}
    else:
        rec = judge(reg, cfg, root, version)
    rec["trigger"] = trigger
    return apply(reg, cfg, rec, root)


# --------------------------------------------------------------------------- the flow
@flow(name="nightly", log_prints=True)
def nightly_flow(root: str = ".", config: str = NIGHTLY_FILE, params: str = "params.yaml") -> dict[str, Any]:
    """Refresh data, reproduce if anything is stale, gate the challenger; see the module docstring."""
    root_p = Path(root).resolve()
    cfg = load_nightly(root_p / config)
    logger = _logger()
    order = plan(root_p)  # dvc.yaml vs registry mismatch fails here, before any work
    network = [s for s in order if "network" in registry.STAGES[s].tags]
    reg = make_registry(cfg, root_p, root_p / params)
    base = {"trigger": "nightly", "flow_run": _flow_run_id(), "started_at": now_iso()}
    log = root_p / cfg.promotion_log
    try:
        if network:
            logger.info("refreshing %s (forced; incremental)", network)
            pipeline_flow(str(root_p), params, "dvc", stages=network, force=True,
                          network_retries=cfg.network_retries, retry_delay_seconds=cfg.retry_delay_seconds)
        stale = dvc_status(root_p)
        logger.info("stale stages: %s", sorted(stale) or "none")
        champion = None if stale else reg.champion()
        if not stale and champion is not None:
            rec = {**base, "time": now_iso(), "model": cfg.model_name, "verdict": "noop", "promote": False,
                   "reasons": ["no new images, code or params: nothing to retrain"], "stale": [],
                   "champion": {"version": champion},
                   "data_version": data_version(root_p), "code_version": code_version(root_p)}
            append_jsonl(log, rec)
            logger.info("nothing changed; champion stays version %s", champion)
            return rec
        if stale:
            results = pipeline_flow(str(root_p), params, "dvc", network_retries=cfg.network_retries,
                                    retry_delay_seconds=cfg.retry_delay_seconds)
            logger.info("reproduced: %s", [r["stage"] for r in results if r["ran"]])
        rec = {**base, **judge(reg, cfg, root_p), "stale": sorted(stale)}
        logger.info("verdict %s: %s", rec["verdict"], "; ".join(rec["reasons"]))
        if cfg.push_remote:
            dvc_push(root_p, cfg.remote)
        if cfg.commit_lock:
            rec["lock_commit"] = commit_lock(root_p, f"nightly: reproduce ({rec['verdict']})")
        rec = apply(reg, cfg, rec, root_p)
        return rec
    except Exception as exc:
        restored = restore_workspace(root_p)
        if not getattr(exc, "promotion_logged", False):
            append_jsonl(log, {**base, "time": now_iso(), "model": cfg.model_name, "verdict": "failed",
                               "promote": False, "applied": False, "error": f"{type(exc).__name__}: {exc}",
                               "restored": restored, "data_version": data_version(root_p),
                               "code_version": code_version(root_p)})
        logger.error("nightly failed (%s); champion untouched, workspace restored=%s", exc, restored["ok"])
        raise

