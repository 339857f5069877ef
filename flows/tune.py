"""`lesionflow tune`: hyperparameter search with Optuna over train.* / augment.* params (docs/tune.md).

- The space and budget are the `tune:` section of the params file (tasks/core/config.py `Tune`): `<section>.<key>`
  -> float/int (low, high, log) or categorical (choices), for keys of `train` and `augment` only: train reads
  them and no data stage does (with `augment.offline_copies: 0`), so a trial on the existing data/upsample index
  is exactly what `dvc repro` gives once its values are in params.yaml.
- Each trial is the train stage itself (`tasks.train.run` through the stage registry, the train stage's params
  view) on an index of the train and val rows only: test rows are not in it, so no test image is ever opened or
  scored. The objective is the trained ensemble's val AUC (`reports/train/metrics.json` `val_auc`).
- Pruning: every epoch's val AUC is reported to the trial (step = epochs so far over the members in order); the
  median or ASHA pruner stops a trial that falls behind (Optuna's TrialPruned raised from the epoch callback).
- The study lives in the project, `mlruns/optuna.db` (sqlite), named `<tune.study_name>-<fingerprint>`: the
  fingerprint covers the space, every other train/augment/preprocess value and the input index, so a rerun with
  the same config continues the study (load_if_exists; `n_trials` is the number of finished trials it should
  hold), and a changed config starts a new one instead of mixing incomparable trials. Trials of a killed run
  are failed by the storage heartbeat on the next run.
- MLflow: one parent run per study (reopened on resume), one child run per trial with the train/augment/
  preprocess params as `<section>.<key>` (the compare view lines trials up key by key), val metrics, the
  per-epoch val AUC as a step metric and a plot; the parent has the best value per trial, trials.csv, the
  optimisation plot and best.yaml.
- The best trial: `--apply` rewrites the tuned values in the params file in place (line-level edit: comments
  and layout kept; the result is validated with load_params before it replaces the file); the summary also
  prints the equivalent `dvc exp run -S ...` command.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import math
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flows.stages import STAGES
from tasks.core.config import Params, ParamsError, SearchDim, load_params, parse_params
from tasks.core.errors import InputError, RunError
from tasks.core.io import Paths, atomic_path, read_index, sha256_file, write_index, write_json
from tasks.models.inputs import INPUT_STAGE

_log = logging.getLogger(__name__)

STORAGE_FILE = "mlruns/optuna.db"  # beside MLflow's mlflow.db: the search is tracking data, not a DVC output
WORK_DIR = ".cache/lesionflow/tune"  # trial scratch (models, reports), removed after each trial is logged
SIG_DIGITS = 3  # sampled floats are rounded to this many significant digits: what trains is what gets applied
FINGERPRINT_SECTIONS = ("train", "augment", "preprocess")  # the values a trial's result depends on
HEARTBEAT_S = 60  # a RUNNING trial without a heartbeat for GRACE_S (its process died) is failed on the next run
GRACE_S = 180


# --------------------------------------------------------------------------- the space
@dataclass(frozen=True)
class Dim:
    """One search dimension, `section.key` -> SearchDim."""

    key: str
    spec: SearchDim

    @property
    def section(self) -> str:
        return self.key.split(".", 1)[0]

    @property
    def name(self) -> str:
        return self.key.split(".", 1)[1]

    def contains(self, value: Any) -> bool:
        s = self.spec
        if s.type == "categorical":
            return any(type(value) is type(c) and value == c for c in s.choices or [])
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return s.low <= value <= s.high and (s.type == "float" or float(value).is_integer())

    def suggest(self, trial: Any) -> Any:
        """The trial's value: Optuna's suggestion, floats rounded to SIG_DIGITS (enqueued values kept as given)."""
        s = self.spec
        if s.type == "categorical":
            return trial.suggest_categorical(self.key, list(s.choices or []))
        if s.type == "int":
            return int(trial.suggest_int(self.key, int(s.low), int(s.high), log=s.log))
        value = trial.suggest_float(self.key, float(s.low), float(s.high), log=s.log)
        if trial.user_attrs.get("baseline"):
            return value  # the baseline (an enqueued trial): exactly the file's value
        return min(max(round_sig(value), float(s.low)), float(s.high))


def round_sig(x: float, digits: int = SIG_DIGITS) -> float:
    if x == 0 or not math.isfinite(x):
        return float(x)
    return float(f"{x:.{digits - 1}e}")


def parse_space(params: Params) -> list[Dim]:
    """The search dimensions of `params.tune.space` (validated by the Tune section); InputError when a tuned
    augment key would not reproduce under `dvc repro` (offline copies are made with the augment params)."""
    dims = [Dim(key, SearchDim.model_validate(spec)) for key, spec in params.tune.space.items()]
    if any(d.section == "augment" for d in dims) and params.augment.offline_copies:
        raise InputError(f"tune.space varies augment.* but augment.offline_copies is {params.augment.offline_copies}: "
                         "the augment stage makes its copies with those values, a trial would not match `dvc repro`; "
                         "set augment.offline_copies: 0 or tune train.* keys only")
    return dims


def current_values(params: Params, dims: list[Dim]) -> dict[str, Any]:
    return {d.key: getattr(getattr(params, d.section), d.name) for d in dims}


def with_values(params: Params, values: Mapping[str, Any]) -> Params:
    """A copy of `params` with `section.key` values replaced, validated like a params file (ParamsError)."""
    data = params.model_dump(mode="json")
    for key, value in values.items():
        section, name = key.split(".", 1)
        data[section][name] = value
    return parse_params(data, "tune trial values")


def fingerprint(params: Params, dims: list[Dim], index_file: Path) -> str:
    """What a trial's val AUC depends on besides the tuned values: the space, every other train/augment/preprocess
    value and the input index. Equal fingerprints = comparable trials = the same study."""
    tuned = {d.key for d in dims}
    base = {s: {k: v for k, v in getattr(params, s).model_dump(mode="json").items() if f"{s}.{k}" not in tuned}
            for s in FINGERPRINT_SECTIONS}
    blob = json.dumps({"space": params.tune.space, "base": base, "index": sha256_file(index_file)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# --------------------------------------------------------------------------- writing the best trial back
def yaml_scalar(value: Any) -> str:
    """A value as it is written in a params file (YAML: true, 3, 0.00316, 1.0e-05, focal)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return yaml.safe_dump(value).splitlines()[0]


def dvc_exp_command(values: Mapping[str, Any]) -> str:
    """The `dvc exp run` that trains the given values as a DVC experiment (params.yaml untouched)."""
    return "dvc exp run " + " ".join(f"-S '{k}={yaml_scalar(v)}'" for k, v in values.items())


def edit_params_text(text: str, values: Mapping[str, Any], source: str = "params file") -> str:
    """`text` with each `section.key` value replaced on its own line (indentation, comments and every other
    line kept). ParamsError when a key is not written as a plain `key: value` line of its section."""
    lines = text.splitlines(keepends=True)
    for key, value in values.items():
        section, name = key.split(".", 1)
        start = next((i for i, ln in enumerate(lines) if re.match(rf"^{re.escape(section)}:\s*(#.*)?$", ln)), None)
        if start is None:
            raise ParamsError(f"{source}: no block `{section}:` line (a flow-style section cannot be edited; "
                              f"use: {dvc_exp_command(values)})")
        end = next((i for i in range(start + 1, len(lines)) if re.match(r"^[A-Za-z_]", lines[i])), len(lines))
        indent = next((m.group(1) for ln in lines[start + 1:end] if (m := re.match(r"^(\s+)[A-Za-z_]", ln))), None)
        pattern = re.compile(rf"^(?P<head>{indent}{re.escape(name)}:[ \t]*)(?P<value>[^#\r\n]*?)"
                             rf"(?P<tail>[ \t]*(#[^\r\n]*)?)(?P<eol>\r?\n?)$") if indent else None
        hits = [i for i in range(start + 1, end) if pattern and pattern.match(lines[i])]
        if len(hits) != 1:
            raise ParamsError(f"{source}: `{key}` is not one `{name}: value` line of the `{section}:` block; set "
                              f"it by hand or use: {dvc_exp_command(values)}")
        m = pattern.match(lines[hits[0]])
        new = yaml_scalar(value)
        tail = m.group("tail")
        if tail.strip() and len(m.group("value")) != len(new):  # keep a trailing comment's column where it fits
            pad = max(1, len(m.group("value")) + len(tail) - len(tail.lstrip()) - len(new))
            tail = " " * pad + tail.lstrip()
        lines[hits[0]] = f"{m.group('head')}{new}{tail}{m.group('eol')}"
    return "".join(lines)


def apply_values(params_file: Path, values: Mapping[str, Any]) -> dict[str, Any]:
    """Write `values` into the params file in place; the edited file must load (complete, valid) and differ
    from the old one in exactly these values, else nothing is written. Returns {key: [old, new]}."""
    params_file = Path(params_file)
    old = load_params(params_file)
    text = params_file.read_text(encoding="utf-8")
    new_text = edit_params_text(text, values, str(params_file))
    with atomic_path(params_file) as tmp:
        tmp.write_text(new_text, encoding="utf-8")
        new = load_params(tmp)
        want = with_values(old, values)
        if new.model_dump(mode="json") != want.model_dump(mode="json"):
            raise ParamsError(f"{params_file}: editing the tuned lines did not give the expected params; file left "
                              f"unchanged (set them by hand, or: {dvc_exp_command(values)})")
        mode = params_file.stat().st_mode & 0o777
    params_file.chmod(mode)
    return {k: [getattr(getattr(old, k.split('.')[0]), k.split('.', 1)[1]), v] for k, v in values.items()}


# --------------------------------------------------------------------------- trials
@dataclass(frozen=True)
class TrialPaths(Paths):
    """A trial's view of the project: images from `source`, the search's train+val index, outputs under root."""

    source: Path = Path(".")
    index_file: Path = Path(".")

    def index(self, name: str) -> Path:
        if name != INPUT_STAGE:
            raise RunError(f"a tune trial reads only data/{INPUT_STAGE}, not data/{name}")
        return self.index_file

    def abs(self, rel: str | Path) -> Path:
        p = Path(rel)
        return p if p.is_absolute() else self.source / p


@dataclass
class Reporter:
    """Receives every epoch's Keras logs of the running trial: reports val AUC to Optuna and prunes."""

    trial: Any
    records: list[dict[str, float]] = field(default_factory=list)

    def epoch(self, logs: Mapping[str, Any]) -> None:
        import optuna

        row = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) or hasattr(v, "__float__")}
        step = len(self.records)
        self.records.append({"step": step, **row})
        value = row.get("val_auc")
        if value is None or not math.isfinite(value):
            return
        self.trial.report(value, step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"val AUC {value:.4f} at step {step}")


_ACTIVE: list[Reporter] = []


def epoch_end(logs: Mapping[str, Any] | None) -> None:
    """Forward one epoch's logs to the running trial (the Keras epoch callback calls this)."""
    if _ACTIVE:
        _ACTIVE[-1].epoch(logs or {})


@contextlib.contextmanager
def epoch_hook() -> Iterator[None]:
    """Chain `epoch_end` after the train stage's per-epoch log callback for the duration of the search."""
    from tasks import train

    original = train._EpochLog.make

    def make(member: str, phase: int) -> Any:
        callback = original(member, phase)
        logged = callback.on_epoch_end

        def on_epoch_end(epoch: int, logs: dict | None = None) -> None:
            logged(epoch, logs)
            epoch_end(logs)

        callback.on_epoch_end = on_epoch_end
        return callback

    train._EpochLog.make = staticmethod(make)
    try:
        yield
    finally:
        train._EpochLog.make = staticmethod(original)


def search_index(root: Path, work: Path) -> Path:
    """The search's input: data/upsample/index.parquet without its test rows (written under `work`)."""
    index = read_index(Paths(root), INPUT_STAGE)
    if "split" not in index.columns:
        raise InputError(f"{Paths(root).index(INPUT_STAGE)}: no `split` column; run the pipeline up to upsample")
    kept = index[index["split"].isin(["train", "val"])].reset_index(drop=True)
    holder = Paths(work)
    write_index(kept, holder, INPUT_STAGE)
    return holder.index(INPUT_STAGE)


# --------------------------------------------------------------------------- plots
def _figure(width: float = 6.4, height: float = 3.6) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def trial_plot(records: list[dict[str, float]], path: Path, title: str) -> Path:
    """Per-epoch val AUC (and train AUC) of one trial over its steps (members in order)."""
    fig = _figure()
    ax = fig.add_subplot(111)
    steps = [r["step"] for r in records]
    for key, style in (("val_auc", "o-"), ("auc", "x--")):
        ys = [r.get(key, math.nan) for r in records]
        if any(math.isfinite(y) for y in ys):
            ax.plot(steps, ys, style, label=key)
    ax.set_xlabel("epoch (members in order)")
    ax.set_ylabel("AUC")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if records:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def study_plot(trials: list[Any], path: Path, baseline: float | None) -> Path:
    """Val AUC per trial (pruned: their last reported value), the running best and the baseline."""
    fig = _figure()
    ax = fig.add_subplot(111)
    done = [t for t in trials if t.state.name == "COMPLETE"]
    pruned = [t for t in trials if t.state.name == "PRUNED" and t.intermediate_values]
    ax.plot([t.number for t in done], [t.value for t in done], "o", label="complete")
    if pruned:
        ax.plot([t.number for t in pruned], [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
                "x", color="grey", label="pruned (last report)")
    best, xs, ys = -math.inf, [], []
    for t in sorted(done, key=lambda t: t.number):
        best = max(best, t.value)
        xs.append(t.number)
        ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", label="best so far")
    if baseline is not None:
        ax.axhline(baseline, linestyle=":", color="black", label="baseline (trial 0)")
    ax.set_xlabel("trial")
    ax.set_ylabel("val AUC")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


# --------------------------------------------------------------------------- the search
def storage_url(root: Path) -> str:
    return f"sqlite:///{(root / STORAGE_FILE).resolve().as_posix()}"


def _clear_keras() -> None:
    import sys

    if "keras" in sys.modules:
        sys.modules["keras"].backend.clear_session()
    gc.collect()


def _trial_metrics(result: Mapping[str, Any], reports: Path) -> dict[str, Any]:
    metrics_file = reports / "metrics.json"
    if metrics_file.exists():
        m = json.loads(metrics_file.read_text())
        return {"val_auc": m.get("val_auc"), "threshold": m.get("threshold"), "n_train": m.get("n_train"),
                "n_val": m.get("n_val"), "val_at_threshold": m.get("val_at_threshold"),
                "members": {k: {"val_auc": v.get("val_auc"), "epochs": v.get("epochs")}
                            for k, v in (m.get("members") or {}).items()}}
    return {"val_auc": result.get("val_auc")}


def tune(root: Path | str, params_file: Path | str, *, n_trials: int | None = None, timeout_s: float | None = None,
         apply: bool = False, train_fn: Callable[[Any, Paths], Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Run (or continue) the search of `params_file`'s `tune:` section over the project at `root`; returns a
    summary (study, trial counts, best trial and its values, baseline, MLflow parent run, dvc exp command,
    what --apply changed). `train_fn(params_view, paths)` replaces the train stage (tests)."""
    import optuna

    from tasks import tracking

    root = Path(root).resolve()
    params_file = Path(params_file)
    params = load_params(params_file)
    cfg = params.tune
    dims = parse_space(params)
    n_target = n_trials if n_trials is not None else cfg.n_trials
    timeout = timeout_s if timeout_s is not None else cfg.timeout_s
    if n_target < 1 or (timeout is not None and timeout <= 0):
        raise InputError(f"--trials must be >= 1 and --timeout > 0 (got {n_target}, {timeout})")
    stage = STAGES["train"]
    run_train = train_fn or stage.load()

    project_index = Paths(root).index(INPUT_STAGE)
    if not project_index.exists():
        raise RunError(f"{project_index} not found: run the pipeline up to {INPUT_STAGE} first "
                       f"(`dvc repro {INPUT_STAGE}`)")
    fp = fingerprint(params, dims, project_index)
    name = f"{cfg.study_name}-{fp[:10]}"
    work = root / WORK_DIR / name
    index_file = search_index(root, work)
    (root / STORAGE_FILE).parent.mkdir(parents=True, exist_ok=True)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna, and the documented way to do this
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(storage_url(root), heartbeat_interval=HEARTBEAT_S,
                                             grace_period=GRACE_S)
    sampler = (optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=cfg.startup_trials)
               if cfg.sampler == "tpe" else optuna.samplers.RandomSampler(seed=cfg.seed))
    if cfg.pruner == "median":
        pruner: Any = optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup_trials,
                                                  n_warmup_steps=cfg.pruner_warmup_steps)
    elif cfg.pruner == "asha":
        pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, cfg.pruner_warmup_steps),
                                                        reduction_factor=cfg.asha_reduction_factor)
    else:
        pruner = optuna.pruners.NopPruner()
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize", sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    baseline_values = current_values(params, dims)
    if not study.trials:
        study.set_user_attr("fingerprint", fp)
        study.set_user_attr("space", dict(cfg.space))
        study.set_user_attr("params_file", str(params_file))
        if cfg.baseline_first:
            inside = {k: v for k, v in baseline_values.items() if next(d for d in dims if d.key == k).contains(v)}
            if len(inside) < len(baseline_values):
                _log.warning("tune: baseline values outside the space are left to the sampler: %s",
                             sorted(set(baseline_values) - set(inside)))
            study.enqueue_trial(inside, user_attrs={"baseline": True})
    finished = [t for t in study.trials if t.state.is_finished()]
    remaining = max(0, n_target - len(finished))

    def run_name_of(number: int) -> str:
        return f"trial {number}"

    def objective(trial: Any) -> float:
        values = {d.key: d.suggest(trial) for d in dims}
        trial.set_user_attr("values", values)
        trial_params = with_values(params, values)
        tdir = work / "trials" / f"trial-{trial.number:04d}"
        shutil.rmtree(tdir, ignore_errors=True)
        tpaths = TrialPaths(root=tdir, source=root, index_file=index_file)
        reporter = Reporter(trial)
        state, result, t0 = "FAIL", {}, time.perf_counter()
        _ACTIVE.append(reporter)
        try:
            result = dict(run_train(trial_params.view(stage.params, stage.name), tpaths) or {})
            value = result.get("val_auc")
            state = "COMPLETE" if value is not None and math.isfinite(value) else "FAIL"
        except optuna.TrialPruned:
            state = "PRUNED"
            raise
        finally:
            _ACTIVE.remove(reporter)
            seconds = round(time.perf_counter() - t0, 2)
            trial.set_user_attr("seconds", seconds)
            if cfg.mlflow and parent_id:
                _log_trial(trial, trial_params, values, state, result, reporter, tpaths, seconds)
            shutil.rmtree(tdir, ignore_errors=True)
            _clear_keras()
            _log.info("tune: trial %d %s %s in %.1f s: %s", trial.number, state,
                      f"val AUC {result.get('val_auc'):.4f}" if state == "COMPLETE" else "", seconds, values)
        return float(value) if state == "COMPLETE" else math.nan

    def _log_trial(trial: Any, trial_params: Params, values: dict[str, Any], state: str, result: dict[str, Any],
                   reporter: Reporter, tpaths: TrialPaths, seconds: float) -> None:
        reports = tpaths.reports / "train"
        reports.mkdir(parents=True, exist_ok=True)
        plot = trial_plot(reporter.records, reports / "trial_val_auc.png",
                          f"trial {trial.number} ({state.lower()}): " + ", ".join(
                              f"{k}={yaml_scalar(v)}" for k, v in values.items()))
        metrics = _trial_metrics(result, reports) if state == "COMPLETE" else {}
        metrics.update({"seconds": seconds, "epochs_run": len(reporter.records)})
        if state == "PRUNED":
            metrics["pruned_at_step"] = max(0, len(reporter.records) - 1)
        steps = [(r["step"], {"epoch_val_auc": r["val_auc"]}) for r in reporter.records if "val_auc" in r]
        tracking.log_child_run(
            parent_id, run_name_of(trial.number),
            sections={s: getattr(trial_params, s) for s in FINGERPRINT_SECTIONS},
            metrics=metrics, steps=steps,
            artifacts=[plot, reports / "history.csv", reports / "metrics.json"],
            tags={"tune.study": name, "tune.trial": trial.number, "tune.state": state,
                  "tune.baseline": bool(trial.user_attrs.get("baseline", False)), "stage": "tune-trial"},
            extra_params={"tune.trial": trial.number, **{f"tune.value.{k}": v for k, v in values.items()}},
            status="FAILED" if state == "FAIL" else "FINISHED")

    def after_trial(study: Any, trial: Any) -> None:
        if not (cfg.mlflow and parent_id):
            return
        done = [t for t in study.trials if t.state.name == "COMPLETE"]
        tracking.log_active(metrics={
            "best_val_auc": max((t.value for t in done), default=math.nan),
            "trials_complete": len(done),
            "trials_pruned": sum(t.state.name == "PRUNED" for t in study.trials),
        }, step=trial.number)

    parent_id: str | None = None
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if cfg.mlflow:
            run = stack.enter_context(tracking.start_parent_run(
                root, f"tune {name}", experiment=cfg.experiment, run_id=study.user_attrs.get("mlflow_parent_run_id"),
                tags={"stage": "tune", "tune.study": name, "tune.storage": STORAGE_FILE}))
            parent_id = run.info.run_id
            if study.user_attrs.get("mlflow_parent_run_id") != parent_id:
                study.set_user_attr("mlflow_parent_run_id", parent_id)
                tracking.log_active(params={
                    **{f"tune.{k}": v for k, v in cfg.model_dump(mode="json").items() if k != "space"},
                    "tune.space": json.dumps(cfg.space, sort_keys=True), "tune.fingerprint": fp,
                    "tune.params_file": str(params_file)})
        if remaining:
            _log.info("tune: study %s: %d finished, running %d more (timeout %s)", name, len(finished), remaining,
                      timeout)
            with epoch_hook():
                study.optimize(objective, n_trials=remaining, timeout=timeout, callbacks=[after_trial],
                               gc_after_trial=True)
        summary = _summary(study, name, root, params_file, baseline_values, parent_id,
                           round(time.perf_counter() - t0, 2))
        if cfg.mlflow and parent_id:
            out = work / "report"
            out.mkdir(parents=True, exist_ok=True)
            study.trials_dataframe().to_csv(out / "trials.csv", index=False)
            write_json(out / "best.json", summary)
            (out / "best.yaml").write_text(yaml.safe_dump({"best": summary.get("best"),
                                                           "dvc_exp_run": summary.get("dvc_exp_run")},
                                                          sort_keys=False))
            study_plot(study.trials, out / "study_val_auc.png", summary.get("baseline_val_auc"))
            best = summary.get("best") or {}
            tracking.log_active(metrics={"best_val_auc": best.get("val_auc"),
                                         "baseline_val_auc": summary.get("baseline_val_auc")},
                                tags={"tune.best_trial": best.get("trial", "none")},
                                artifacts=[out / "trials.csv", out / "best.yaml", out / "study_val_auc.png"],
                                artifact_path="tune")
    if apply:
        best = summary.get("best")
        if not best:
            raise RunError(f"study {name} has no completed trial: nothing to apply")
        summary["applied"] = {"file": str(params_file), "changed": apply_values(params_file, best["values"])}
    return summary


def _summary(study: Any, name: str, root: Path, params_file: Path, baseline_values: dict[str, Any],
             parent_id: str | None, seconds: float) -> dict[str, Any]:
    states = [t.state.name for t in study.trials]
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    base = next((t for t in done if t.user_attrs.get("baseline")), None)
    out: dict[str, Any] = {
        "study": name, "storage": STORAGE_FILE, "seconds": seconds,
        "trials": {s.lower(): states.count(s) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING") if s in states},
        "baseline_values": baseline_values,
        "baseline_val_auc": base.value if base else None,
        "mlflow_parent_run_id": parent_id,
    }
    if done:
        best = max(done, key=lambda t: (t.value, -t.number))
        values = best.user_attrs.get("values") or best.params
        out["best"] = {"trial": best.number, "val_auc": best.value, "values": values,
                       "is_baseline": bool(best.user_attrs.get("baseline"))}
        out["dvc_exp_run"] = dvc_exp_command(values)
        out["apply"] = f"lesionflow --params {params_file} tune --apply (writes the values above into the file)"
    return out
