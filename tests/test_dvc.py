"""dvc.yaml is the pipeline of record: it must agree with the code (flows.stages.STAGES, params, imports)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.stages import STAGES
from tasks.core.config import Params

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
# Every project module a stage imports (transitively) must be covered by its deps; the library layers are listed
# as folders (tasks/core, tasks/models, tasks/fake), so adding a helper module never needs a dvc.yaml edit.
SHARED_INFRA = {"tasks/__init__.py"}
LEAVES: set[str] = set()


def _entries(items) -> list[str]:
    """Paths of a deps/outs/metrics/plots list (entries are strings or one-key mappings)."""
    return [next(iter(i)) if isinstance(i, dict) else i for i in items or []]


def test_dvc_stages_equal_registry_in_order():
    assert list(DVC) == list(STAGES), "dvc.yaml stages and flows/stages.py STAGES must list the same names in order"


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_contract(name):
    st = DVC[name]
    assert st["cmd"] == f"lesionflow stage {name}"
    assert st["params"][0] == name, f"{name}: its own params section comes first"
    assert tuple(st["params"]) == STAGES[name].params, (
        f"{name}: dvc.yaml params {st['params']} != flows/stages.py sections {STAGES[name].params}: the stage is "
        "handed exactly the sections DVC tracks for it")
    deps = _entries(st.get("deps"))
    assert f"tasks/{name}.py" in deps, f"{name}: its own source must be a dep (a code change must rerun it)"
    homes = (f"data/{name}", f"models/{name}", f"reports/{name}/") + (("models/classifier",) if name == "train" else ())
    assert any(o.startswith(homes) for o in _entries(st.get("outs"))), f"{name}: outs must live under {homes}"
    metrics = st.get("metrics") or []
    assert {f"reports/{name}/metrics.json": {"cache": False}} in metrics
    for dep in deps:
        assert (ROOT / dep).exists() or dep.startswith(("data/", "models/")), f"{name}: dep {dep} does not exist"


@pytest.mark.parametrize("name", list(STAGES))
def test_params_section_exists_for_every_stage(name):
    assert name in Params.model_fields, f"tasks/config.py Params lacks a `{name}` section"
    assert name in yaml.safe_load((ROOT / "params.yaml").read_text()), f"params.yaml lacks a `{name}:` section"


def project_imports(path: Path) -> set[str]:
    """Project files a module imports (anywhere in it, lazy imports included), as dvc.yaml dep paths."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        mods = []
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for m in mods:
            top = m.split(".")[0]
            if top == "isic_client":
                found.add("isic_client")  # the package is one dep (a directory)
            elif top == "tasks":
                parts = m.split(".")
                for i in range(len(parts), 1, -1):
                    cand = ROOT / Path(*parts[:i])
                    if cand.with_suffix(".py").exists():
                        found.add(cand.with_suffix(".py").relative_to(ROOT).as_posix())
                        break
                    if (cand / "__init__.py").exists() and i == len(parts):
                        found.add((cand / "__init__.py").relative_to(ROOT).as_posix())
                        break
    return found


def closure(start: str) -> set[str]:
    """`start` and every project module it imports, transitively (shared infra not followed)."""
    seen, todo = set(), [start]
    while todo:
        f = todo.pop()
        if f in seen or f in SHARED_INFRA:
            continue
        seen.add(f)
        if f.endswith(".py") and f not in LEAVES:
            todo.extend(project_imports(ROOT / f))
    return seen - SHARED_INFRA


def _covered(f: str, deps: list[str]) -> bool:
    return any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("name", list(STAGES))
def test_deps_cover_every_module_the_stage_imports(name):
    """A stage whose helper module changes must rerun: every project module it (transitively) imports is a dep."""
    src = ROOT / "tasks" / f"{name}.py"
    if not src.exists():
        pytest.fail(f"tasks/{name}.py missing")
    deps = _entries(DVC[name].get("deps"))
    missing = sorted(f for f in closure(f"tasks/{name}.py") if not _covered(f, deps))
    assert not missing, f"dvc.yaml stage {name!r} imports {missing} but does not list them in deps"


def test_stage_modules_expose_run():
    for name in STAGES:
        tree = ast.parse((ROOT / "tasks" / f"{name}.py").read_text())
        assert any(isinstance(n, ast.FunctionDef) and n.name == "run" for n in tree.body), f"tasks/{name}.py: no run()"


def test_stage_order_is_topological():
    """Every dep produced by another stage comes from an earlier one (the flow runs dvc.yaml order, one by one)."""
    produced_by = {o: n for n, st in DVC.items() for o in _entries(st.get("outs"))}
    order = list(DVC)
    for name, st in DVC.items():
        for dep in _entries(st.get("deps")):
            producer = next((p for o, p in produced_by.items() if dep == o or dep.startswith(o + "/")), None)
            if producer is not None:
                assert order.index(producer) < order.index(name), f"{name} depends on {dep} of later {producer}"


def test_dvc_parses_the_pipeline():
    """DVC itself accepts dvc.yaml (schema, params files, overlapping outs) and sees the same stages."""
    res = subprocess.run([sys.executable, "-m", "dvc", "stage", "list", "--name-only"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == list(STAGES)


# --------------------------------------------------------------------------- DVC semantics on a toy project
TOY = r'''
import json, pathlib, sys, yaml
name = sys.argv[1]
prev = {"b": "a", "c": "b"}.get(name)
p = yaml.safe_load(open("params.yaml"))[name]
inp = json.loads((pathlib.Path("data") / prev / "out.json").read_text()) if prev else {}
out = pathlib.Path("data") / name
out.mkdir(parents=True, exist_ok=True)
(out / "out.json").write_text(json.dumps({"from": inp, "p": p}, sort_keys=True))
print("ran", name)
'''


@pytest.fixture
def toy3(tmp_path) -> Path:
    """a -> b -> c, each with params: [<name>] and its outs as the next stage's dep."""
    from flows.pipeline import subprocess_env

    (tmp_path / "stage.py").write_text(TOY)
    (tmp_path / "params.yaml").write_text("a: {x: 1}\nb: {x: 1}\nc: {x: 1}\n")
    stages = {n: {"cmd": f"python stage.py {n}", "deps": ["stage.py"] + ([f"data/{prev}"] if prev else []),
                  "params": [n], "outs": [f"data/{n}"]}
              for n, prev in (("a", None), ("b", "a"), ("c", "b"))}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    env = subprocess_env()
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=tmp_path, check=True, env=env)
    return tmp_path


def repro(root: Path, *args: str) -> tuple[str, float]:
    from flows.pipeline import subprocess_env

    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "dvc", "repro", *args], cwd=root, capture_output=True, text=True,
                         env=subprocess_env())
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout, time.perf_counter() - t0


@pytest.mark.slow
def test_second_repro_is_a_fast_noop(toy3):
    out, _ = repro(toy3)
    assert [ln for ln in out.splitlines() if ln.startswith("ran ")] == ["ran a", "ran b", "ran c"]
    out, seconds = repro(toy3)
    assert "Data and pipelines are up to date." in out and "ran " not in out
    assert seconds < 5


@pytest.mark.slow
def test_param_change_reruns_only_that_stage_and_downstream(toy3):
    repro(toy3)
    (toy3 / "params.yaml").write_text("a: {x: 1}\nb: {x: 2}\nc: {x: 1}\n")
    from flows.pipeline import subprocess_env

    status = json.loads(subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=toy3,
                                       capture_output=True, text=True, env=subprocess_env()).stdout)
    assert set(status) == {"b"}  # before repro DVC only knows b's params changed
    out, _ = repro(toy3)
    assert [ln for ln in out.splitlines() if ln.startswith("ran ")] == ["ran b", "ran c"]
    assert "Stage 'a' didn't change, skipping" in out
    assert json.loads((toy3 / "data" / "c" / "out.json").read_text())["from"]["p"] == {"x": 2}
