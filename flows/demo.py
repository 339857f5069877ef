"""`lesionflow demo`: the whole DAG on the default params through the pipeline flow, then the promotion gate
(the first model becomes champion), then where to look. Returns data; the CLI prints it."""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flows.nightly import NIGHTLY_FILE, load_nightly
from flows.pipeline import Executor, format_results, mlflow_ui_command, pipeline_flow, plan
from flows.promotion import promote_now

log = logging.getLogger(__name__)


def is_dvc_project(root: Path) -> bool:
    """DVC needs its own dir and a git repo (a tarball without .git falls back to the in-process executor)."""
    git = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=root, capture_output=True, text=True)
    return (root / ".dvc").is_dir() and git.returncode == 0


def pick_executor(root: Path, executor: Executor | None = None) -> Executor:
    """`dvc` in a git+DVC checkout, else `inprocess` (unless one is asked for)."""
    return executor or ("dvc" if is_dvc_project(root) else "inprocess")


def header(root: Path, executor: Executor | None = None) -> str:
    """The line the CLI prints before the (long) run: what will run, how, where."""
    root = root.resolve()
    order = plan(root)
    return (f"lesionflow demo: {len(order)} stages ({' -> '.join(order)}), executor={pick_executor(root, executor)}, "
            f"root={root}")


def where_to_look(root: Path) -> list[str]:
    """Pointers to the outputs a newcomer wants after a run: metrics, plots, tracking UI."""
    rep = root / "reports"
    plots = sorted(p.relative_to(root).as_posix() for p in rep.rglob("*") if p.suffix in (".png", ".svg", ".html")) \
        if rep.exists() else []
    return [f"metrics: {', '.join(sorted(p.relative_to(root).as_posix() for p in rep.glob('*/metrics.json')))}"
            if rep.exists() else "metrics: (none yet)",
            f"plots:   {', '.join(plots[:12])}{' ...' if len(plots) > 12 else ''}" if plots else "plots:   (none yet)",
            "compare: dvc metrics show   |   dvc plots show --json   |   dvc dag",
            "MLflow:  lesionflow ui   (= " + " ".join(mlflow_ui_command()) + ")",
            "Prefect: prefect server start, then PREFECT_API_URL=http://127.0.0.1:4200/api lesionflow run "
            "(runs show live in http://127.0.0.1:4200)"]


def demo(root: Path, executor: Executor | None = None, promote: bool = True) -> dict[str, Any]:
    """Run every stage through the pipeline flow, then (with `promote`) the gate. Returns results, promotion
    record (None when skipped or when this checkout has no model stages), seconds, executor and notes."""
    root = root.resolve()
    executor = pick_executor(root, executor)
    t0 = time.perf_counter()
    results = pipeline_flow(root=str(root), executor=executor)
    seconds = round(time.perf_counter() - t0, 1)
    promotion: dict[str, Any] | None = None
    notes: list[str] = []
    if promote:
        try:
            promotion = promote_now(root, load_nightly(root / NIGHTLY_FILE), root / "params.yaml", trigger="demo")
        except ModuleNotFoundError as exc:  # no train/evaluate stage in this checkout yet
            notes.append(f"no model registry yet ({exc.name} missing): nothing to register or promote")
            log.info(notes[-1])
    return {"results": results, "promotion": promotion, "seconds": seconds, "executor": executor, "notes": notes,
            "where_to_look": where_to_look(root)}


def report(out: Mapping[str, Any]) -> str:
    """What the CLI prints after the demo: the stage table, the gate's verdict, where to look."""
    lines = ["", format_results(out["results"])]
    lines += ["", *out.get("notes", [])] if out.get("notes") else []
    promotion = out.get("promotion")
    if promotion:
        ch = promotion.get("challenger") or {}
        lines += ["", f"promotion: {promotion['verdict']} ({'; '.join(promotion['reasons'])})"]
        if ch.get("version") is not None:
            champion = ch["version"] if promotion["applied"] else (promotion.get("champion") or {}).get("version")
            lines.append(f"champion: {promotion['model']} version {champion} "
                         f"(models:/{promotion['model']}@{promotion['alias']}); log: reports/promotion_log.jsonl")
    lines += ["", f"done in {out['seconds']:.0f} s. Where to look:"]
    lines += ["  " + line for line in out["where_to_look"]]
    return "\n".join(lines)
