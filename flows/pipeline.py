"""The Prefect pipeline: every dvc.yaml stage, in dvc.yaml order, as one Prefect task.

DVC stays the pipeline of record: the default executor runs `dvc repro --single-item <stage>` in a
subprocess, so DVC alone decides what is stale, dvc.lock records what ran, and every stage (training
included) gets a fresh process that frees its memory (GPU too) when it exits. The in-process executor
calls the stage's `run(params, paths)` directly; it serves tests and debugging, and does not touch dvc.lock.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import yaml
from prefect import flow, get_run_logger, task

from flows import stages as registry

DVC_FILE = "dvc.yaml"
# Tag of the GPU stages; a Prefect tag concurrency limit on it (`prefect concurrency-limit create gpu 1`, or
# `lesionflow deploy`) lets one GPU stage run at a time across all flow runs. The server enforces it when the
# task run starts; when no limit exists nothing is checked (a global `concurrency()` block instead cost ~2 s
# per stage here just to learn that no limit exists).
GPU_LIMIT = "gpu"
Executor = Literal["dvc", "inprocess"]
# Loggers of stage code forwarded into Prefect's run logs by the in-process executor.
STAGE_LOGGERS = ("tasks", "isic_client")


class PipelineError(RuntimeError):
    """dvc.yaml and the stage registry disagree, or a stage failed; the message says which and why."""


# --------------------------------------------------------------------------- plan (pure, no Prefect)
def read_dvc_stages(root: Path | str) -> dict[str, dict[str, Any]]:
    """The `stages:` mapping of `<root>/dvc.yaml`, in file order."""
    path = Path(root) / DVC_FILE
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found (run from the project root or pass --root)") from None
    stages = (doc or {}).get("stages")
    if not isinstance(stages, dict) or not stages:
        raise PipelineError(f"{path}: has no `stages:` mapping")
    return stages


def registry_mismatch(dvc_order: Sequence[str], names: Sequence[str]) -> list[str]:
    """Human-readable differences between the dvc.yaml stage order and the registry's; [] when they agree."""
    problems = []
    missing = [n for n in names if n not in dvc_order]
    extra = [n for n in dvc_order if n not in names]
    if missing:
        problems.append(f"in flows/stages.py STAGES but not in dvc.yaml: {missing}")
    if extra:
        problems.append(f"in dvc.yaml but not in flows/stages.py STAGES: {extra}")
    common_dvc = [n for n in dvc_order if n in names]
    common_reg = [n for n in names if n in dvc_order]
    if not problems and common_dvc != common_reg:
        problems.append(f"order differs: dvc.yaml {common_dvc} vs STAGES {common_reg}")
    return problems


def plan(root: Path | str, only: Sequence[str] | None = None,
         stages: Mapping[str, registry.Stage] | None = None) -> list[str]:
    """The stages to run, in dvc.yaml order, after checking dvc.yaml agrees with the registry."""
    reg = registry.STAGES if stages is None else stages
    order = list(read_dvc_stages(root))
    problems = registry_mismatch(order, list(reg))
    if problems:
        raise PipelineError(f"{Path(root) / DVC_FILE} and flows/stages.py disagree: " + "; ".join(problems))
    if not only:
        return order
    unknown = [n for n in only if n not in order]
    if unknown:
        raise PipelineError(f"unknown stage(s) {unknown}; stages: {', '.join(order)}")
    return [n for n in order if n in only]


def dvc_command(stage: str, force: bool = False) -> list[str]:
    """`dvc repro --single-item <stage>` through this interpreter, so the venv's dvc runs even off PATH."""
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    return cmd + ["--force"] if force else cmd


# Env var naming the pipeline execution a stage runs in (the root Prefect flow run), so tracking code can tag
# every MLflow run of one execution alike and the UI can group them (tasks.tracking reads it, if it wants).
RUN_ENV = "LESIONFLOW_PIPELINE_RUN"


def pipeline_run_id() -> str | None:
    """The root Prefect flow run id (a nightly's subflows share it), or None outside a flow run."""
    try:
        from prefect.runtime import flow_run

        run = flow_run.root_flow_run_id or flow_run.id
    except Exception:
        return None
    return str(run) if run else None


def subprocess_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Env for stage subprocesses: the venv's bin first (dvc.yaml calls `lesionflow`), unbuffered output."""
    env = dict(os.environ)
    env.update(extra or {})
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"  # child prints reach the Prefect log as they happen, not at exit
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def stream(cmd: Sequence[str], cwd: Path, emit: Callable[[str], None], tail: int = 40,
           env: Mapping[str, str] | None = None) -> tuple[int, list[str]]:
    """Run `cmd`, passing each output line (stdout+stderr) to `emit`; return (exit code, last `tail` lines)."""
    last: deque[str] = deque(maxlen=tail)
    with subprocess.Popen(list(cmd), cwd=cwd, env=subprocess_env(env), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            last.append(line)
            emit(line)
        rc = proc.wait()
    return rc, list(last)


def read_metrics(root: Path, stage: str) -> dict[str, Any]:
    """`reports/<stage>/metrics.json` (the dvc.yaml metrics convention), or {} when the stage wrote none."""
    path = root / "reports" / stage / "metrics.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


# --------------------------------------------------------------------------- executors
def execute_dvc(stage: str, root: Path, force: bool, emit: Callable[[str], None]) -> dict[str, Any]:
    """Reproduce one stage with DVC; `ran` is False when DVC found it up to date and skipped it."""
    skipped = False

    def watch(line: str) -> None:
        nonlocal skipped  # DVC's own words are the only signal of a skip; a long stage log can't hide them
        skipped = skipped or line.startswith(f"Stage '{stage}' didn't change, skipping")
        emit(line)

    t0 = time.perf_counter()
    run_id = pipeline_run_id()
    rc, last = stream(dvc_command(stage, force), root, watch, env={RUN_ENV: run_id} if run_id else None)
    seconds = round(time.perf_counter() - t0, 2)
    if rc != 0:
        raise PipelineError(f"stage {stage!r}: `dvc repro --single-item {stage}` exited {rc}; last output:\n"
                            + "\n".join(last[-15:]))
    ran = not skipped
    return {"stage": stage, "executor": "dvc", "ran": ran, "seconds": seconds,
            "metrics": read_metrics(root, stage)}


class _ForwardHandler(logging.Handler):
    """Copies stage-code log records into the Prefect run logger (so they show in the UI)."""

    def __init__(self, target: logging.Logger | logging.LoggerAdapter) -> None:
        super().__init__(logging.INFO)
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.log(record.levelno, "%s: %s", record.name, record.getMessage())


@contextmanager
def forward_logs(target: logging.Logger | logging.LoggerAdapter) -> Iterator[None]:
    handler = _ForwardHandler(target)
    loggers = [logging.getLogger(n) for n in STAGE_LOGGERS]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def execute_inprocess(stage: str, root: Path, params_file: Path, logger: Any) -> dict[str, Any]:
    """Call the stage's `run(params, paths)` in this process (tests, debugging); dvc.lock is not updated."""
    from tasks.core.config import load_params
    from tasks.core.io import Paths

    params = load_params(params_file)  # validated per stage: a bad edit fails before that stage's work
    t0 = time.perf_counter()
    with forward_logs(logger):
        summary = registry.STAGES[stage].run(params, Paths(root))
    seconds = round(time.perf_counter() - t0, 2)
    summary = json.loads(json.dumps(summary or {}, default=str))  # JSON-able for the Prefect result
    return {"stage": stage, "executor": "inprocess", "ran": True, "seconds": seconds, "summary": summary,
            "metrics": read_metrics(root, stage)}


# --------------------------------------------------------------------------- Prefect
@task(log_prints=True)
def run_stage(name: str, root: str, executor: Executor = "dvc", params: str = "params.yaml",
              force: bool = False) -> dict[str, Any]:
    """One pipeline stage as a Prefect task (named like the stage by `stage_task`)."""
    logger = get_run_logger()
    stage = registry.STAGES[name]
    root_p = Path(root).resolve()
    logger.info("stage %s (executor=%s, tags=%s)", name, executor, list(stage.tags))
    if executor == "dvc":
        result = execute_dvc(name, root_p, force, lambda line: logger.info("%s", line))
    elif executor == "inprocess":
        result = execute_inprocess(name, root_p, root_p / params, logger)
    else:
        raise PipelineError(f"unknown executor {executor!r}; use dvc or inprocess")
    logger.info("stage %s %s in %.1f s", name, "ran" if result["ran"] else "was up to date", result["seconds"])
    return result


def stage_task(stage: registry.Stage, network_retries: int = 2, retry_delay_seconds: float = 30.0):
    """The Prefect task for one stage: its name, its registry tags (`gpu` -> the tag concurrency limit),
    retries when it touches the network."""
    retries = network_retries if "network" in stage.tags else 0
    return run_stage.with_options(name=stage.name, task_run_name=stage.name, tags=list(stage.tags),
                                  retries=retries, retry_delay_seconds=retry_delay_seconds)


@flow(name="pipeline", log_prints=True)
def pipeline_flow(root: str = ".", params: str = "params.yaml", executor: Executor = "dvc",
                  stages: list[str] | None = None, force: bool = False, network_retries: int = 2,
                  retry_delay_seconds: float = 30.0) -> list[dict[str, Any]]:
    """Run the dvc.yaml stages in order (all, or `stages`), each a Prefect task; stop at the first failure."""
    root_p = Path(root).resolve()
    if executor == "dvc" and Path(params).name != "params.yaml":
        # dvc.yaml's `params: [<stage>]` always reads params.yaml: another file would run unrecorded params.
        raise PipelineError(f"--params {params}: the dvc executor reads params.yaml only; copy your file there "
                            "or use --executor inprocess")
    order = plan(root_p, stages)
    logger = get_run_logger()
    logger.info("plan: %s (executor=%s, root=%s)", " -> ".join(order), executor, root_p)
    results = []
    for name in order:
        t = stage_task(registry.STAGES[name], network_retries, retry_delay_seconds)
        results.append(t(name, str(root_p), executor, params, force))
    return results


# --------------------------------------------------------------------------- reporting / demo
def format_results(results: Sequence[Mapping[str, Any]]) -> str:
    """A small table of what each stage did, for the CLI."""
    lines = [f"{'stage':<16}{'status':<14}{'seconds':>9}  metrics"]
    for r in results:
        status = "ran" if r["ran"] else "up to date"
        metrics = ", ".join(f"{k}={v}" for k, v in list(_scalars(r.get("metrics", {})).items())[:5])
        lines.append(f"{r['stage']:<16}{status:<14}{r['seconds']:>9.1f}  {metrics}")
    return "\n".join(lines)


def _scalars(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()
            if isinstance(v, (int, float, str, bool))}


def where_to_look(root: Path) -> list[str]:
    """Pointers to the outputs a newcomer wants after a run: metrics, plots, tracking UI."""
    rep = root / "reports"
    plots = sorted(p.relative_to(root).as_posix() for p in rep.rglob("*") if p.suffix in (".png", ".svg", ".html")) \
        if rep.exists() else []
    out = [f"metrics: {', '.join(sorted(p.relative_to(root).as_posix() for p in rep.glob('*/metrics.json')))}"
           if rep.exists() else "metrics: (none yet)",
           f"plots:   {', '.join(plots[:12])}{' ...' if len(plots) > 12 else ''}" if plots else "plots:   (none yet)",
           "compare: dvc metrics show   |   dvc plots show --json   |   dvc dag",
           "MLflow:  lesionflow ui   (= " + " ".join(mlflow_ui_command()) + ")",
           "Prefect: prefect server start, then PREFECT_API_URL=http://127.0.0.1:4200/api lesionflow run "
           "(runs show live in http://127.0.0.1:4200)"]
    return out


def mlflow_ui_command(host: str = "127.0.0.1", port: int | None = None) -> list[str]:
    """The `mlflow ui` command over the project's tracking store (run from the project root)."""
    cmd = ["mlflow", "ui", "--backend-store-uri", "sqlite:///mlruns/mlflow.db",
           "--default-artifact-root", "mlruns/artifacts", "--host", host]
    return cmd + ["--port", str(port)] if port else cmd


def _is_dvc_project(root: Path) -> bool:
    """DVC needs its own dir and a git repo (a tarball without .git falls back to the in-process executor)."""
    git = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=root, capture_output=True, text=True)
    return (root / ".dvc").is_dir() and git.returncode == 0


def demo(root: Path, executor: Executor | None = None, promote: bool = True) -> dict[str, Any]:
    """`lesionflow demo`: the whole DAG on the default params through the pipeline flow, then the promotion
    gate (the first model becomes champion), then where to look. Returns what it printed, as data."""
    root = root.resolve()
    executor = executor or ("dvc" if _is_dvc_project(root) else "inprocess")
    t0 = time.perf_counter()
    print(f"lesionflow demo: {len(plan(root))} stages ({' -> '.join(plan(root))}), executor={executor}, root={root}")
    results = pipeline_flow(root=str(root), executor=executor)
    seconds = round(time.perf_counter() - t0, 1)
    print("\n" + format_results(results))
    promotion: dict[str, Any] | None = None
    if promote:
        from flows.nightly import load_nightly, promote_now

        try:
            promotion = promote_now(root, load_nightly(root / "nightly.yaml"), root / "params.yaml", trigger="demo")
        except ModuleNotFoundError as exc:  # no train/evaluate stage in this checkout yet
            print(f"\nno model registry yet ({exc.name} missing): nothing to register or promote")
    if promotion:
        ch = promotion.get("challenger") or {}
        print(f"\npromotion: {promotion['verdict']} ({'; '.join(promotion['reasons'])})")
        if ch.get("version") is not None:
            print(f"champion: {promotion['model']} version "
                  f"{ch['version'] if promotion['applied'] else (promotion.get('champion') or {}).get('version')}"
                  f" (models:/{promotion['model']}@{promotion['alias']}); log: reports/promotion_log.jsonl")
    print(f"\ndone in {seconds:.0f} s. Where to look:")
    for line in where_to_look(root):
        print("  " + line)
    return {"results": results, "promotion": promotion, "seconds": seconds, "executor": executor}
