"""The house rules: `ls tasks/` shows the DAG, layers run one way, and no stage imports another stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flows.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = {"__init__.py", "tracking.py"}  # the only non-stage modules at tasks/ top level
PACKAGES = {"core", "models", "fake"}


def test_tasks_top_level_is_the_stages_plus_the_library():
    modules = {p.name for p in (ROOT / "tasks").glob("*.py")}
    assert modules - LIBRARY == {f"{s}.py" for s in STAGES}
    packages = {p.name for p in (ROOT / "tasks").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == PACKAGES


def test_import_contracts_hold():
    """import-linter contracts in pyproject.toml (layers, mlflow only in tracking, the client stands alone)."""
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists():
        pytest.skip("import-linter not installed (pip install -e '.[dev]')")
    r = subprocess.run([str(exe), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]


PROBE = """
import json, sys
import {module}
print(json.dumps(sorted(m for m in sys.modules if m.startswith(("tasks.", "flows.")))))
"""


@pytest.mark.parametrize("name", list(STAGES))
def test_importing_a_stage_pulls_no_other_stage(name):
    """`python -c "import tasks.<stage>"` loads no other stage and nothing from flows/."""
    r = subprocess.run([sys.executable, "-c", PROBE.format(module=f"tasks.{name}")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    loaded = set(json.loads(r.stdout.strip().splitlines()[-1]))
    others = {f"tasks.{s}" for s in STAGES if s != name} & loaded
    assert not others, f"tasks.{name} imports other stages: {sorted(others)}"
    assert not {m for m in loaded if m.startswith("flows.")}, f"tasks.{name} imports flows: {sorted(loaded)}"
