"""The layering rule for the modules of this area: no stage imports another stage; core imports no models."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
STAGES = {"ingest", "dedupe", "clean", "split", "preprocess", "augment", "cyclegan", "upsample", "train", "evaluate",
          "ugly_duckling"}
CHECKED = ["tasks/cyclegan.py", "tasks/upsample.py", "tasks/train.py", "tasks/evaluate.py", "tasks/ugly_duckling.py",
           "tasks/tracking.py", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tasks" / "models").glob("*.py")),
           "tasks/core/metrics.py", "tasks/core/outliers.py", "tasks/core/lineage.py", "tasks/fake/widefield.py"]


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_no_stage_imports_another_stage() -> None:
    bad = {}
    for rel in CHECKED:
        hits = sorted(m for m in _imports(ROOT / rel) if m.split(".")[:2][0] == "tasks"
                      and len(m.split(".")) >= 2 and m.split(".")[1] in STAGES)
        if hits:
            bad[rel] = hits
    assert not bad, bad


def test_core_and_models_stay_below_tracking_and_mlflow() -> None:
    for rel in CHECKED:
        mods = _imports(ROOT / rel)
        if rel != "tasks/tracking.py":
            assert not any(m == "mlflow" or m.startswith("mlflow.") for m in mods), rel
        if rel.startswith("tasks/core/"):
            assert not any(m.startswith("tasks.models") or m == "tasks.tracking" for m in mods), rel
