"""The pipeline flow: plan from dvc.yaml, stage order, retries, gpu tag/limit, DVC executor, logs."""

from __future__ import annotations

import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from flows import pipeline
from flows.pipeline import PipelineError, plan, registry_mismatch
from flows.stages import Stage
from tasks.core.config import ParamsError
from tests.flows.conftest import ROOT, ToyStage, dvc, write_dvc_yaml


# --------------------------------------------------------------------------- plan (no Prefect)
def test_registry_mismatch_names_every_difference():
    assert registry_mismatch(["a", "b", "c"], ["a", "b", "c"]) == []
    probs = registry_mismatch(["a", "b", "x"], ["a", "b", "c"])
    assert any("['c']" in p and "not in dvc.yaml" in p for p in probs)
    assert any("['x']" in p and "not in flows/stages.py" in p for p in probs)
    assert registry_mismatch(["b", "a"], ["a", "b"]) == ["order differs: dvc.yaml ['b', 'a'] vs STAGES ['a', 'b']"]


def test_plan_reads_dvc_order_and_checks_registry(tmp_path):
    write_dvc_yaml(tmp_path, ["ingest", "clean", "train"])
    reg = {n: Stage(n) for n in ["ingest", "clean", "train"]}
    assert plan(tmp_path, stages=reg) == ["ingest", "clean", "train"]
    assert plan(tmp_path, only=["train", "ingest"], stages=reg) == ["ingest", "train"]  # dvc order, not CLI order
    with pytest.raises(PipelineError, match="unknown stage"):
        plan(tmp_path, only=["nope"], stages=reg)
    with pytest.raises(PipelineError, match="disagree.*not in dvc.yaml: \\['extra'\\]"):
        plan(tmp_path, stages={**reg, "extra": Stage("extra")})
    with pytest.raises(PipelineError, match="not found"):
        plan(tmp_path / "missing", stages=reg)


def test_plan_of_the_real_project_matches_registry():
    from flows.stages import STAGES

    assert plan(ROOT) == list(STAGES)


def test_stage_task_options_follow_registry_tags():
    t = pipeline.stage_task(Stage("ingest", tags=("network",)), network_retries=3, retry_delay_seconds=5)
    assert (t.name, t.retries, t.retry_delay_seconds, set(t.tags)) == ("ingest", 3, 5, {"network"})
    g = pipeline.stage_task(Stage("train", tags=("gpu",)), network_retries=3)
    assert (g.name, g.retries, set(g.tags)) == ("train", 0, {"gpu"})


def test_stream_passes_every_line_and_exit_code(tmp_path):
    seen: list[str] = []
    code = "import sys; print('out 1'); print('err 2', file=sys.stderr); print('out 3'); sys.exit(4)"
    rc, tail = pipeline.stream([sys.executable, "-c", code], tmp_path, seen.append)
    assert rc == 4 and sorted(seen) == ["err 2", "out 1", "out 3"] and tail == seen


def test_dvc_executor_rejects_another_params_file(tmp_path):
    write_dvc_yaml(tmp_path, ["ingest"])
    with pytest.raises(PipelineError, match="reads params.yaml only"):  # .fn: the flow body, no engine needed
        pipeline.pipeline_flow.fn(root=str(tmp_path), params="params/other.yaml", executor="dvc")


# --------------------------------------------------------------------------- in-process flow on toy stages
@pytest.fixture
def toy_inprocess(tmp_path, monkeypatch):
    """Four toy stages in a temp project (real params.yaml); returns (root, calls, fail counter)."""
    names = ["ingest", "clean", "train", "evaluate"]
    write_dvc_yaml(tmp_path, names)
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    calls: list[tuple[str, tuple[str, ...]]] = []
    state = {"ingest_failures": 0}

    def make(name: str):
        def run(params, paths):
            from prefect.context import TaskRunContext

            assert paths.root == tmp_path.resolve() and getattr(params, name) is not None  # the validated Params
            with pytest.raises(ParamsError, match="declares only"):  # a stage sees only its declared sections
                _ = params.split
            if name == "ingest" and state["ingest_failures"] > 0:
                state["ingest_failures"] -= 1
                raise ConnectionError("flaky network")
            if name == state.get("fail"):
                raise RuntimeError(f"{name} broke")
            calls.append((name, tuple(sorted(TaskRunContext.get().task_run.tags))))
            out = paths.reports / name
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.json").write_text(json.dumps({"n": len(calls)}))
            return {"n": len(calls)}
        return run

    tags = {"ingest": ("network",), "train": ("gpu",), "evaluate": ("gpu",)}
    monkeypatch.setattr("flows.stages.STAGES", {n: ToyStage(n, tags.get(n, ()), fn=make(n)) for n in names})
    return tmp_path, calls, state


def test_flow_runs_stages_in_dvc_order_with_tags(prefect_harness, toy_inprocess):
    root, calls, _ = toy_inprocess
    results = pipeline.pipeline_flow(root=str(root), executor="inprocess")
    assert [c[0] for c in calls] == ["ingest", "clean", "train", "evaluate"]
    assert dict(calls) == {"ingest": ("network",), "clean": (), "train": ("gpu",), "evaluate": ("gpu",)}
    assert [r["stage"] for r in results] == ["ingest", "clean", "train", "evaluate"]
    assert results[2]["summary"] == {"n": 3} and results[2]["metrics"] == {"n": 3}
    assert all(r["ran"] and r["executor"] == "inprocess" for r in results)


@pytest.mark.slow
def test_gpu_tag_limit_serialises_gpu_stages_across_flow_runs(prefect_harness, tmp_path, monkeypatch):
    """Two pipeline runs at once: with the `gpu` tag limit at 1 their gpu stages never overlap."""
    from prefect import get_client

    from flows.deploy import ensure_gpu_limit

    write_dvc_yaml(tmp_path, ["train"])
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    spans: list[tuple[float, float]] = []

    def train(params, paths):
        t0 = time.monotonic()
        time.sleep(1.3)  # unlimited runs overlap by ~1 s; not 2.0, the server's default slot-occupancy retry
        spans.append((t0, time.monotonic()))
        return {}

    monkeypatch.setattr("flows.stages.STAGES", {"train": ToyStage("train", ("gpu",), fn=train)})
    assert "1 task run" in ensure_gpu_limit(1)
    try:
        with ThreadPoolExecutor(2) as ex:
            futs = [ex.submit(pipeline.pipeline_flow, root=str(tmp_path), executor="inprocess") for _ in range(2)]
            [f.result() for f in futs]
    finally:
        with get_client(sync_client=True) as client:  # the harness is shared by the whole session
            if any(c.tag == "gpu" for c in client.read_concurrency_limits(limit=100, offset=0)):
                client.delete_concurrency_limit_by_tag("gpu")
    (a0, a1), (b0, b1) = sorted(spans)
    # Typical gap 0.3-1.4 s; once, under a load average of 8, B started 16 us before A's function returned
    # (a Prefect lease race?). 50 ms tolerance: harmless for a GPU stage, and unlimited runs overlap by ~1 s.
    assert b0 >= a1 - 0.05, f"gpu stages overlapped: {spans}"


def test_flow_retries_flaky_ingest_then_continues(prefect_harness, toy_inprocess):
    root, calls, state = toy_inprocess
    state["ingest_failures"] = 2
    pipeline.pipeline_flow(root=str(root), executor="inprocess", network_retries=2, retry_delay_seconds=0)
    assert [c[0] for c in calls] == ["ingest", "clean", "train", "evaluate"] and state["ingest_failures"] == 0


def test_flow_fails_when_retries_run_out_and_runs_nothing_downstream(prefect_harness, toy_inprocess):
    root, calls, state = toy_inprocess
    state["ingest_failures"] = 3
    with pytest.raises(ConnectionError, match="flaky network"):
        pipeline.pipeline_flow(root=str(root), executor="inprocess", network_retries=2, retry_delay_seconds=0)
    assert calls == []


def test_failure_stops_the_flow_at_that_stage(prefect_harness, toy_inprocess):
    root, calls, state = toy_inprocess
    state["fail"] = "train"  # not a network stage: no retry
    with pytest.raises(RuntimeError, match="train broke"):
        pipeline.pipeline_flow(root=str(root), executor="inprocess", network_retries=2, retry_delay_seconds=0)
    assert [c[0] for c in calls] == ["ingest", "clean"]


def test_subset_of_stages(prefect_harness, toy_inprocess):
    root, calls, _ = toy_inprocess
    results = pipeline.pipeline_flow(root=str(root), executor="inprocess", stages=["evaluate", "clean"])
    assert [c[0] for c in calls] == ["clean", "evaluate"] and len(results) == 2


# --------------------------------------------------------------------------- DVC executor on a real toy project
def test_dvc_executor_skips_up_to_date_and_streams_logs(prefect_harness, toy, monkeypatch):
    lines: list[str] = []
    real = pipeline.execute_dvc
    monkeypatch.setattr(pipeline, "execute_dvc", lambda stage, root, force, emit, *rest: real(
        stage, root, force, lambda line: (lines.append(line), emit(line)), *rest))
    results = pipeline.pipeline_flow(root=str(toy), executor="dvc")
    assert [(r["stage"], r["ran"]) for r in results] == [("ingest", False), ("train", False)]
    assert "Stage 'ingest' didn't change, skipping" in lines

    (toy / "src" / "img9.txt").write_text("new image\n")
    lines.clear()
    results = pipeline.pipeline_flow(root=str(toy), executor="dvc", stages=["ingest"], force=True)
    assert results[0]["ran"] and results[0]["metrics"] == {"new": 1}
    assert "ingest: 1 new file(s)" in lines  # the stage's own output reached the run logger
    run_line = next(line for line in lines if line.startswith("pipeline run: "))
    assert len(run_line.split(": ")[1]) == 36  # the flow run's UUID: MLflow runs of one execution can be grouped


def test_dvc_executor_failure_names_stage_and_output(prefect_harness, toy):
    (toy / "FAIL_train").write_text("")
    (toy / "params.yaml").write_text("ingest: {source: src}\ntrain: {lr: 0.2}\n")
    with pytest.raises(PipelineError, match=r"(?s)stage 'train'.*exited.*train: injected failure"):
        pipeline.pipeline_flow(root=str(toy), executor="dvc", stages=["train"])


@pytest.mark.slow
def test_dvc_executor_param_change_reruns_only_that_stage_and_downstream(prefect_harness, toy):
    (toy / "params.yaml").write_text("ingest: {source: src}\ntrain: {lr: 0.5}\n")
    results = pipeline.pipeline_flow(root=str(toy), executor="dvc")
    assert [(r["stage"], r["ran"]) for r in results] == [("ingest", False), ("train", True)]
    assert json.loads((toy / "data" / "train" / "model.json").read_text())["lr"] == 0.5
    again = pipeline.pipeline_flow(root=str(toy), executor="dvc")
    assert [r["ran"] for r in again] == [False, False]
    assert json.loads(dvc(toy, "status", "--json")) == {}


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_demo_runs_every_stage_of_the_real_project(prefect_harness, tmp_path):
    """`lesionflow demo` on a fresh copy of this checkout: every dvc.yaml stage runs through DVC, then the gate."""
    import subprocess

    from flows import demo
    from flows.stages import STAGES

    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    proj = tmp_path / "proj"
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (proj / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, proj / f)
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
    out = demo.demo(proj, executor="dvc")
    assert [r["stage"] for r in out["results"]] == list(STAGES) and all(r["ran"] for r in out["results"])
    assert all((proj / "reports" / s / "metrics.json").exists() for s in STAGES)
    assert json.loads(dvc(proj, "status", "--json")) == {}  # dvc.lock records exactly what the demo made
    printed = demo.report(out)
    assert "Where to look" in printed and "mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db" in printed
    if "evaluate" in STAGES:  # once the model stages are in dvc.yaml the first model must become champion
        assert out["promotion"]["verdict"] == "first" and out["promotion"]["applied"]
