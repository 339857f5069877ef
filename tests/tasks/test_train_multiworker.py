"""train under MultiWorkerMirroredStrategy: two CPU worker processes on 127.0.0.1 (TF_CONFIG) train the tiny profile
in sync; the chief alone writes, and its model matches single-process training on the same global batch.

Tolerance (docs/distributed.md): 2 workers x batch_size 16 are compared with one process at batch_size 32 (the
same global batch, the same seeded shuffle and augmentation draws; each worker keeps its slice of every batch).
What still differs is float arithmetic: the gradient all-reduce sums the two replicas' partial sums in another
order than one process sums 32 rows, and synchronized batch norm computes the global variance as E[x^2] - E[x]^2
from all-reduced sums instead of TensorFlow's two-pass moments. Measured: max |p_chief - p_single| = 6.8e-05 on
the val images, equal val AUC; the bound is 1e-3 (Adam's first steps, update ~ lr * g / |g|, can amplify last-bit
differences where a gradient component is near zero). Dropout is set to 0 for the comparison: replicas draw their
own masks, which is statistically the same training but not the same draws. Measured wall time: 82-97 s for the
three processes on 2 cores (hence slow).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.tasks.conftest import ROOT, TINY, build_tiny_project

PROB_TOL = 1e-3  # max |p_chief - p_single| over the val images; measured 6.8e-05
AUC_TOL = 0.02  # one or two rank flips among 24 val images
TIMEOUT_S = 420

RUNNER = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
from flows.stages import STAGES
from tasks.core.config import load_params
from pathlib import Path
from tasks.core.io import Paths
out = STAGES["train"].run(load_params(sys.argv[1]), Paths(Path(sys.argv[2])))
print("RESULT " + json.dumps(out), flush=True)
"""


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _params_file(path: Path, **train: object) -> Path:
    raw = yaml.safe_load(TINY.read_text())
    raw["train"].update(train)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _start(params: Path, root: Path, tf_config: dict | None, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(TF_ENABLE_ONEDNN_OPTS="0", TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="-1",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return subprocess.Popen([sys.executable, "-c", RUNNER, str(params), str(root)], cwd=ROOT, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def _result(proc: subprocess.Popen, log: Path) -> dict:
    try:
        rc = proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = "timeout"
    text = log.read_text()
    assert rc == 0, f"exit {rc}:\n{text[-4000:]}"
    return json.loads(next(line for line in text.splitlines() if line.startswith("RESULT "))[7:])


def test_tf_config_parsing() -> None:
    from tasks.core.errors import InputError
    from tasks.train import ClusterTask, cluster_task

    two = {"worker": ["a:1", "b:2"]}
    assert cluster_task({}) is None
    assert cluster_task({"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker"}})}) is None
    assert cluster_task({"TF_CONFIG": json.dumps({"cluster": two, "task": {"type": "worker", "index": 0}})}) == \
        ClusterTask(workers=2, chief=True, task="worker:0")
    assert not cluster_task({"TF_CONFIG": json.dumps({"cluster": two, "task": {"type": "worker", "index": 1}})}).chief
    with_chief = {"chief": ["c:0"], **two}
    assert not cluster_task({"TF_CONFIG": json.dumps({"cluster": with_chief, "task": {"type": "worker"}})}).chief
    assert cluster_task({"TF_CONFIG": json.dumps({"cluster": with_chief, "task": {"type": "chief"}})}).workers == 3
    for bad, match in (("{", "not valid JSON"), (json.dumps({"cluster": {"ps": ["p:1"], **two}, "task": {
            "type": "worker"}}), "parameter servers"), (json.dumps({"cluster": two, "task": {"type": "worker",
                                                                                            "index": 2}}), "not in")):
        with pytest.raises(InputError, match=match):
            cluster_task({"TF_CONFIG": bad})


@pytest.mark.slow
def test_two_workers_train_in_sync_and_match_one_process(tmp_path: Path, lf_tiny_params) -> None:
    roots = {name: build_tiny_project(tmp_path / name, lf_tiny_params) for name in ("single", "chief", "worker")}
    single_params = _params_file(tmp_path / "single.yaml", batch_size=32, dropout=0.0)
    multi_params = _params_file(tmp_path / "multi.yaml", batch_size=16, dropout=0.0)  # per replica: global 32
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}

    t0 = time.perf_counter()
    procs = {
        "single": _start(single_params, roots["single"], None, tmp_path / "single.log"),
        "chief": _start(multi_params, roots["chief"], {"cluster": cluster, "task": {"type": "worker", "index": 0}},
                        tmp_path / "chief.log"),
        "worker": _start(multi_params, roots["worker"], {"cluster": cluster, "task": {"type": "worker", "index": 1}},
                         tmp_path / "worker.log"),
    }
    try:
        results = {name: _result(proc, tmp_path / f"{name}.log") for name, proc in procs.items()}
    finally:
        for proc in procs.values():  # a failed worker leaves its peer waiting on the collective: end it
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    seconds = time.perf_counter() - t0

    # Only the chief writes; the other worker trained (it took part in every step) and wrote nothing.
    assert results["worker"]["role"] == "worker:1" and results["worker"]["members"] == 2
    assert not (roots["worker"] / "models").exists() and not (roots["worker"] / "reports" / "train").exists()
    assert (roots["chief"] / "models" / "classifier.keras").is_file()
    stats = json.loads((roots["chief"] / "reports" / "train" / "run_stats.json").read_text())
    assert stats["workers"] == 2 and "workers" not in json.loads(
        (roots["single"] / "reports" / "train" / "run_stats.json").read_text())

    # The chief's model is single-process training up to float ordering (module docstring).
    from tasks.core.io import Paths, read_index
    from tasks.models.bundle import predict_proba
    from tasks.models.classifier import load_keras
    from tasks.models.inputs import INPUT_STAGE, encode_metadata, load_val_images, select_rows

    chief_cfg = json.loads((roots["chief"] / "models" / "classifier.json").read_text())
    single_cfg = json.loads((roots["single"] / "models" / "classifier.json").read_text())
    for cfg in (chief_cfg, single_cfg):
        cfg["train"].pop("batch_size")
        cfg.pop("threshold"), cfg.pop("val_at_threshold"), cfg.pop("stacker")
    assert chief_cfg == single_cfg

    paths = Paths(roots["single"])
    val = select_rows(read_index(paths, INPUT_STAGE), "val")
    images = load_val_images([str(paths.abs(p)) for p in val["processed_path"]], lf_tiny_params.preprocess.size)
    meta = encode_metadata(val, chief_cfg["metadata"])
    p = {name: predict_proba(load_keras(roots[name] / "models" / "classifier.keras"), images, meta, tta=2)
         for name in ("chief", "single")}
    diff = float(np.max(np.abs(p["chief"] - p["single"])))
    m = {name: json.loads((roots[name] / "reports" / "train" / "metrics.json").read_text())
         for name in ("chief", "single")}
    print(f"multi-worker vs single: max |dp| = {diff:.2e}, val AUC {m['chief']['val_auc']} vs "
          f"{m['single']['val_auc']}, {seconds:.0f} s for the three processes")
    assert diff < PROB_TOL
    assert abs(m["chief"]["val_auc"] - m["single"]["val_auc"]) < AUC_TOL
    assert m["chief"]["n_train"] == m["single"]["n_train"]
