"""The promotion gate: score the challenger and the champion on the same frozen test split, decide, record.

`decide()` is pure: promote iff there is no champion yet, or the challenger's AUC beats the champion's by more
than the margin AND it misses no more malignant lesions (false negatives). `judge()` scores and decides
without changing anything; `apply()` tags the challenger, moves the alias last, and appends one line to the
promotion log. The nightly flow, `lesionflow promote` and the demo all go through here.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tasks.core.config import load_params
from tasks.core.errors import InputError
from tasks.core.io import Paths
from tasks.core.lineage import code_version, data_version


class GateConfig(Protocol):
    """The knobs the gate reads (flows.nightly.Nightly, i.e. nightly.yaml, provides them)."""

    margin: float
    model_name: str
    alias: str
    promotion_log: str


# --------------------------------------------------------------------------- the decision (pure)
@dataclass(frozen=True)
class Score:
    """A model's result on the frozen test split: what the gate compares."""

    version: str
    auc: float
    false_negatives: int
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, d: Mapping[str, Any], who: str) -> Score:
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


# --------------------------------------------------------------------------- versions and the decision log
def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


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


def base_record(cfg: GateConfig, root: Path) -> dict[str, Any]:
    """The fields every decision record carries: when, which model/alias, the margin, data and code versions."""
    return {"time": now_iso(), "model": cfg.model_name, "alias": cfg.alias, "margin": cfg.margin,
            "data_version": data_version(root), "code_version": code_version(root)}


# --------------------------------------------------------------------------- the model registry seam
class ModelRegistry(Protocol):
    """What the gate needs from the registry; MLflow in production, an in-memory fake in tests."""

    def champion(self) -> str | None: ...  # version holding the alias, None before the first promotion

    def challenger(self) -> str | None: ...  # version built from the current pipeline outputs (None: no model)

    def score(self, version: str) -> dict[str, Any]: ...  # {version, auc, false_negatives, ...} on the test split

    def set_champion(self, version: str) -> None: ...  # move the alias

    def tag(self, version: str, tags: Mapping[str, str]) -> None: ...


SCORE_KEYS = ("auc", "auc_ci_low", "auc_ci_high", "false_negatives", "false_positives", "sensitivity",
              "specificity", "n", "n_malignant", "n_errors")


class MlflowRegistry:
    """The gate's view of the MLflow registry, through tasks.tracking (the only mlflow importer, so imported
    lazily here) and the evaluate stage's own scorer, on the frozen test split."""

    def __init__(self, root: Path, params_file: Path, model_name: str, alias: str) -> None:
        self.root, self.params_file, self.model_name, self.alias = root, params_file, model_name, alias

    def champion(self) -> str | None:
        from tasks import tracking  # mlflow: heavy

        return tracking.get_alias(self.model_name, self.alias, root=self.root)

    def challenger(self) -> str | None:
        from tasks import tracking  # mlflow: heavy

        return tracking.current_version(self.model_name, self.root)  # what the last evaluate registered

    def score(self, version: str) -> dict[str, Any]:
        from tasks import tracking  # mlflow: heavy
        from tasks.models.bundle import score_model  # heavy (tensorflow once a model loads)

        # same scorer, same params, same data/<stage>/index.parquet test rows for challenger and champion
        bundle = tracking.load_bundle(f"models:/{self.model_name}/{version}", self.root)
        s = score_model(bundle, load_params(self.params_file), Paths(self.root))
        return {"version": version, **{k: s[k] for k in SCORE_KEYS if k in s}}

    def set_champion(self, version: str) -> None:
        from tasks import tracking  # mlflow: heavy

        tracking.set_alias(self.model_name, self.alias, version, root=self.root)

    def tag(self, version: str, tags: Mapping[str, str]) -> None:
        from tasks import tracking  # mlflow: heavy

        tracking.set_version_tags(self.model_name, version, dict(tags), root=self.root)


def make_registry(cfg: GateConfig, root: Path, params_file: Path) -> ModelRegistry:
    """The registry the flows use (tests monkeypatch this factory)."""
    return MlflowRegistry(root, params_file, cfg.model_name, cfg.alias)


# --------------------------------------------------------------------------- judge + apply
def judge(reg: ModelRegistry, cfg: GateConfig, root: Path, version: str | None = None) -> dict[str, Any]:
    """Score challenger and champion on the same test split and decide; changes nothing."""
    challenger = version or reg.challenger()
    rec = base_record(cfg, root)
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


def apply(reg: ModelRegistry, cfg: GateConfig, rec: dict[str, Any], root: Path) -> dict[str, Any]:
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


def promote_now(root: Path, cfg: GateConfig, params_file: Path, version: str | None = None, force: bool = False,
                trigger: str = "manual") -> dict[str, Any]:
    """The gate without reproducing anything (`lesionflow promote`, the demo); `force` skips the comparison
    (a rollback) but is still tagged and logged."""
    if force and version is None:
        raise InputError("promote --force needs --version V (the version to make champion); "
                         "see the versions with `lesionflow ui`")
    reg = make_registry(cfg, root, params_file)
    if force:
        rec = {**base_record(cfg, root), "verdict": "forced", "promote": True,
               "reasons": [f"forced by operator; previous champion {reg.champion()}"],
               "challenger": {"version": str(version)}, "champion": None}
    else:
        rec = judge(reg, cfg, root, version)
    rec["trigger"] = trigger
    return apply(reg, cfg, rec, root)


# --------------------------------------------------------------------------- the drift gate (flows/drift.py reports)
DRIFT_HOLD = "drift-hold"


def drift_gate(rec: Mapping[str, Any], drift: Mapping[str, Any] | None, allow_drifted: bool) -> dict[str, Any]:
    """Put the night's drift summary into the decision record; a drifted night that would promote is held
    (verdict `drift-hold`, alias unmoved) unless nightly.yaml allows drifted promotion. Pure."""
    out = dict(rec)
    if drift is None:
        return out
    out["drift"] = {**dict(drift), "allowed": bool(allow_drifted)}
    if not drift.get("drifted"):
        return out
    what = "; ".join(drift.get("reasons") or []) or "new data differ from the champion's"
    if not out.get("promote"):
        out["reasons"] = [*out.get("reasons", []), f"data drift: {what}"]
    elif allow_drifted:
        out["reasons"] = [*out.get("reasons", []),
                          f"data drift ({what}); promoted anyway: nightly.yaml drift.allow_drifted_promotion is true"]
    else:
        out.update(promote=False, verdict=DRIFT_HOLD, would_be=rec.get("verdict"))
        out["reasons"] = [*out.get("reasons", []),
                          f"held by data drift: {what}; nightly.yaml drift.allow_drifted_promotion is false. Review "
                          f"{drift.get('report', 'the drift report')}, then `lesionflow promote --version "
                          f"{(rec.get('challenger') or {}).get('version')} --force` to promote it by hand"]
    return out
