"""Fixtures for the orchestration tests: one Prefect test server per session, and toy DVC projects."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.stages import Stage

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect server for the whole session (8-11 s once); request it only where a flow runs."""
    from prefect.testing.utilities import prefect_test_harness

    # A task blocked by a tag concurrency limit retries after this many seconds (server default 10).
    os.environ.setdefault("PREFECT_SERVER_TASKS_TAG_CONCURRENCY_SLOT_WAIT_SECONDS", "0.5")
    with prefect_test_harness(server_startup_timeout=90):
        yield


def worker_checkout(root: Path, *, trouble: bool = True) -> Path:
    """A copy of the project's code and pipeline definition under `root` (what a worker machine's checkout
    holds), plus tiny.yaml: params.yaml with its ingest source swapped for 12 tiny synthetic lesions (params
    files are complete records, so the source is all that changes)."""
    root.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for d in ("flows", "tasks", "isic_client"):
        shutil.copytree(ROOT / d, root / d, ignore=ignore)
    for f in ("dvc.yaml", "nightly.yaml", "params.yaml"):
        shutil.copy(ROOT / f, root / f)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["ingest"]["sources"] = [{"kind": "synthetic", "name": "synthetic", "n": 12, "seed": 0,
                                    "malignant_fraction": 0.5, "image_size": 32, "trouble": trouble}]
    (root / "tiny.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


@dataclass(frozen=True)
class ToyStage(Stage):
    """A registry entry whose run() is a test function instead of tasks/<name>.py."""

    fn: Callable[..., Any] | None = None

    def load(self) -> Callable[..., Any]:
        return self.fn


def write_dvc_yaml(root: Path, names: list[str], cmd: Callable[[str], str] = lambda n: f"lesionflow stage {n}") -> None:
    """A dvc.yaml listing `names` in order (enough for the planner; not runnable by DVC)."""
    stages = {n: {"cmd": cmd(n), "params": [n], "outs": [f"data/{n}"]} for n in names}
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))


# A real, runnable two-stage DVC project: `ingest` copies new files from src/ (incremental, like the real one;
# persist: true), `train` summarises data/ingest into a "model". FAIL_<STAGE> files make a stage fail.
TOY_STAGE_PY = r'''
import json, os, pathlib, shutil, sys, yaml
name = sys.argv[1]
if pathlib.Path(f"FAIL_{name}").exists():
    print(f"{name}: injected failure", flush=True)
    out = pathlib.Path("data") / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "half-written").write_text("x")  # a partial output that a restore must undo
    sys.exit(3)
p = yaml.safe_load(open("params.yaml"))[name]
out = pathlib.Path("data") / name
out.mkdir(parents=True, exist_ok=True)
if name == "ingest":
    new = [f for f in sorted(pathlib.Path("src").iterdir()) if not (out / f.name).exists()]
    for f in new:
        shutil.copy(f, out / f.name)
    print(f"ingest: {len(new)} new file(s)", flush=True)
    print(f"pipeline run: {os.environ.get('LESIONFLOW_PIPELINE_RUN')}", flush=True)
    metrics = {"new": len(new)}
else:
    n = len(list(pathlib.Path("data/ingest").iterdir()))
    (out / "model.json").write_text(json.dumps({"n_images": n, "lr": p["lr"]}))
    print(f"train: model on {n} image(s), lr={p['lr']}", flush=True)
    metrics = {"n_images": n}
rep = pathlib.Path("reports") / name
rep.mkdir(parents=True, exist_ok=True)
(rep / "metrics.json").write_text(json.dumps(metrics))
'''

TOY_DVC = {
    "stages": {
        "ingest": {"cmd": "python stage.py ingest", "deps": ["stage.py"], "params": ["ingest"],
                   "outs": [{"data/ingest": {"persist": True}}],
                   "metrics": [{"reports/ingest/metrics.json": {"cache": False}}]},
        "train": {"cmd": "python stage.py train", "deps": ["stage.py", "data/ingest"], "params": ["train"],
                  "outs": ["data/train"], "metrics": [{"reports/train/metrics.json": {"cache": False}}]},
    }
}
TOY_STAGES = {"ingest": Stage("ingest", tags=("network",)), "train": Stage("train", tags=("gpu",))}


def _run(cmd: list[str], cwd: Path) -> str:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert res.returncode == 0, f"{cmd} failed: {res.stdout}\n{res.stderr}"
    return res.stdout


def dvc(root: Path, *args: str) -> str:
    from flows.pipeline import subprocess_env

    res = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True,
                         env=subprocess_env())
    assert res.returncode == 0, f"dvc {args} failed: {res.stdout}\n{res.stderr}"
    return res.stdout


@pytest.fixture(scope="session")
def toy_template(tmp_path_factory) -> Path:
    """The toy project, reproduced once and committed (copied per test: copies are cheap, repro is not)."""
    root = tmp_path_factory.mktemp("toy") / "proj"
    (root / "src").mkdir(parents=True)
    for i in range(2):
        (root / "src" / f"img{i}.txt").write_text(f"image {i}\n")
    (root / "stage.py").write_text(TOY_STAGE_PY)
    (root / "params.yaml").write_text("ingest: {source: src}\ntrain: {lr: 0.1}\n")
    (root / "dvc.yaml").write_text(yaml.safe_dump(TOY_DVC, sort_keys=False))
    (root / ".gitignore").write_text("/src/\n/reports/\n")
    _run(["git", "init", "-q"], root)
    _run(["git", "config", "user.email", "toy@example.com"], root)
    _run(["git", "config", "user.name", "toy"], root)
    dvc(root, "init", "-q")
    dvc(root, "config", "core.analytics", "false")
    dvc(root, "repro")
    _run(["git", "add", "-A"], root)
    _run(["git", "commit", "-q", "-m", "toy"], root)
    return root


@pytest.fixture
def toy(toy_template, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the reproduced toy project, with the registry patched to its two stages."""
    root = tmp_path / "proj"
    shutil.copytree(toy_template, root, symlinks=True)
    monkeypatch.setattr("flows.stages.STAGES", dict(TOY_STAGES))
    return root


class FakeRegistry:
    """In-memory stand-in for the MLflow registry: the challenger is the version named after the toy model."""

    def __init__(self, root: Path, scores: Mapping[str, Mapping[str, Any]], champion: str | None = None,
                 fail_on: str | None = None) -> None:
        self.root, self.scores, self.alias, self.fail_on = root, dict(scores), champion, fail_on
        self.tags: dict[str, dict[str, str]] = {}
        self.calls: list[str] = []

    def _maybe_fail(self, what: str) -> None:
        self.calls.append(what)
        if self.fail_on == what:
            raise RuntimeError(f"injected {what} failure")

    def champion(self) -> str | None:
        self._maybe_fail("champion")
        return self.alias

    def challenger(self) -> str | None:
        self._maybe_fail("challenger")
        model = self.root / "data" / "train" / "model.json"
        return f"v{json.loads(model.read_text())['n_images']}" if model.exists() else None

    def score(self, version: str) -> dict[str, Any]:
        self._maybe_fail("score")
        return {"version": version, **self.scores[version]}

    def set_champion(self, version: str) -> None:
        self._maybe_fail("set_champion")
        self.alias = version

    def tag(self, version: str, tags: Mapping[str, str]) -> None:
        self._maybe_fail("tag")
        self.tags.setdefault(version, {}).update(tags)
