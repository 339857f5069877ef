"""MLflow for lesionflow: the only module that imports mlflow.

Store: tracking + registry in `sqlite:///<root>/mlruns/mlflow.db`, artifacts in `<root>/mlruns/artifacts`
(MLFLOW_TRACKING_URI overrides the store; for another sqlite file the artifacts go beside it). Experiment
`lesionflow`; registered model `lesionflow-classifier`, promoted with aliases (never the deprecated stages).

Small API for the stages and the nightly flow:
`tracking_uri(root)`, `start_run(root, ...)`, `register(model_uri, name, tags) -> version`,
`get_alias(name, alias) -> version | None`, `set_alias(name, alias, version)`,
`set_version_tags(name, version, tags)`, `current_version(name, root)`, `download_model(uri, root)`,
`log_keras_model(model, name, input_example, custom_objects) -> model_uri` (cyclegan), `log_evaluation(...)`.
The logged model is a pyfunc (`LesionflowModel`) wrapping the Keras model + its stored preprocessing: input a
DataFrame with `path` (image files) or `image` (encoded bytes; base64 in JSON), optional age_approx / sex /
anatom_site_1; output probability_malignant, prediction (stored operating point), error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import warnings
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Iterator

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no lookups of config.mlflow-telemetry.io (trap 5)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm bars in stage logs

EXPERIMENT = "lesionflow"
MODEL_NAME = "lesionflow-classifier"
# Pinned to what runs here: inferring them re-imports TF in a subprocess (7.7 s vs 0.6 s, trap 6).
PIP_PACKAGES = ("tensorflow", "keras", "mlflow", "numpy", "pandas", "pyarrow", "pydantic", "pyyaml",
                "opencv-python-headless", "scikit-learn", "scipy", "tqdm")
PARAM_MAX = 6000  # MLflow's limit on one param value


# --------------------------------------------------------------------------- store
def tracking_uri(root: Path | str) -> str:
    """MLFLOW_TRACKING_URI if set, else the project's sqlite store."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(Path(root).resolve() / 'mlruns' / 'mlflow.db').as_posix()}"


def artifact_location(uri: str) -> str | None:
    """For a sqlite store, artifacts live beside the database (mlruns/artifacts); a server chooses its own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "artifacts").resolve().as_uri()
    return None


def configure(root: Path | str, experiment: str = EXPERIMENT) -> str:
    """Point mlflow at the store (tracking and registry) and return the experiment id (created if needed)."""
    uri = tracking_uri(root)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    try:
        return mlflow.create_experiment(experiment, artifact_location=artifact_location(uri))
    except mlflow.exceptions.MlflowException:  # created meanwhile by a concurrent run
        exp = mlflow.get_experiment_by_name(experiment)
        if exp is None:
            raise
        return exp.experiment_id


@contextlib.contextmanager
def start_run(root: Path | str, run_name: str | None = None, experiment: str = EXPERIMENT,
              tags: dict[str, str] | None = None) -> Iterator[Any]:
    """An MLflow run in the project's store, tagged with the git commit (and whether the tree was dirty)."""
    exp_id = configure(root, experiment)
    git = git_state(Path(root))
    all_tags = {**{k: str(v) for k, v in git.items() if v is not None}, **(tags or {})}
    # One pipeline execution (flows/pipeline.py sets this for every stage) = one group in the MLflow UI.
    if os.environ.get("LESIONFLOW_PIPELINE_RUN"):
        all_tags.setdefault("lesionflow.pipeline_run", os.environ["LESIONFLOW_PIPELINE_RUN"])
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=all_tags) as run:
        yield run


def client(root: Path | str | None = None) -> Any:
    """An MlflowClient on the project's store: `root`'s, else the one already configured in this process,
    else the current directory's (so the registry helpers work without a prior start_run)."""
    from mlflow.tracking._tracking_service.utils import is_tracking_uri_set

    if root is not None or not is_tracking_uri_set():
        configure(root if root is not None else Path.cwd())
    return mlflow.MlflowClient()


# --------------------------------------------------------------------------- registry (aliases only)
def register(model_uri: str, name: str = MODEL_NAME, tags: dict[str, Any] | None = None,
             root: Path | str | None = None) -> str:
    """Register `model_uri` as a new version of `name`; returns the version (a string, as MLflow does)."""
    client(root)
    mv = mlflow.register_model(model_uri, name, tags={k: _tag(v) for k, v in (tags or {}).items()})
    return str(mv.version)


def get_alias(name: str, alias: str, root: Path | str | None = None) -> str | None:
    """The version an alias points to, or None when the alias (or the model) does not exist."""
    try:
        return str(client(root).get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException:
        return None


def set_alias(name: str, alias: str, version: str | int, root: Path | str | None = None) -> None:
    client(root).set_registered_model_alias(name, alias, str(version))


def delete_alias(name: str, alias: str, root: Path | str | None = None) -> None:
    client(root).delete_registered_model_alias(name, alias)


def set_version_tags(name: str, version: str | int, tags: dict[str, Any], root: Path | str | None = None) -> None:
    c = client(root)
    for k, v in tags.items():
        c.set_model_version_tag(name, str(version), k, _tag(v))


def version_info(name: str, version: str | int, root: Path | str | None = None) -> dict[str, Any]:
    """run_id, source, tags and aliases of one registered version."""
    mv = client(root).get_model_version(name, str(version))
    return {"version": str(mv.version), "run_id": mv.run_id, "source": mv.source, "tags": dict(mv.tags),
            "aliases": list(getattr(mv, "aliases", []) or [])}


def current_version(name: str, root: Path | str) -> str | None:
    """The version the last evaluate of this project registered (reports/evaluate/mlflow.json), if it still
    exists in the registry; None when evaluate has not registered one."""
    info_file = Path(root) / "reports" / "evaluate" / "mlflow.json"
    if not info_file.exists():
        return None
    info = json.loads(info_file.read_text())
    if info.get("registered_model") != name or not info.get("version"):
        return None
    try:
        client(root).get_model_version(name, str(info["version"]))
    except mlflow.exceptions.MlflowException:
        return None
    return str(info["version"])


def download_model(uri: str, root: Path | str) -> str:
    """A local folder holding the artifacts of a runs:/ or models:/ URI (resolved in the project's store)."""
    configure(root)
    return mlflow.artifacts.download_artifacts(artifact_uri=uri)


def load_pyfunc(uri: str, root: Path | str) -> Any:
    configure(root)
    return mlflow.pyfunc.load_model(uri)


def _tag(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


# --------------------------------------------------------------------------- provenance
def git_state(root: Path) -> dict[str, Any]:
    """git_commit and git_dirty of the project (None outside a repository)."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def dvc_hash(root: Path, out: str) -> tuple[str | None, str]:
    """The DVC hash of a stage output (`data/<stage>`) from dvc.lock, or ('sha256 of its index', 'index')."""
    lock = Path(root) / "dvc.lock"
    if lock.exists():
        import yaml

        doc = yaml.safe_load(lock.read_text()) or {}
        for stage in (doc.get("stages") or {}).values():
            for o in stage.get("outs") or []:
                if o.get("path") == out and o.get("md5"):
                    return str(o["md5"]), "dvc.lock"
    index = Path(root) / out / "index.parquet"
    if index.exists():
        return hashlib.sha256(index.read_bytes()).hexdigest(), "index-sha256"
    return None, "missing"


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {'a.b.c': value}; lists become JSON text."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = json.dumps(obj) if isinstance(obj, list) else obj
    return out


def numeric(flat: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a flat dict, as MLflow metrics (keys with characters MLflow rejects replaced)."""
    out = {}
    for k, v in flat.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
            continue
        out[re.sub(r"[^\w\-. /]", "_", k)] = float(v)  # MLflow allows only these characters in names
    return out


# --------------------------------------------------------------------------- the pyfunc model
class LesionflowModel(mlflow.pyfunc.PythonModel):
    """pyfunc: DataFrame of image paths or bytes (+ optional metadata) -> probability_malignant per row."""

    def load_context(self, context: Any) -> None:
        from tasks.predict import Bundle

        self.bundle = Bundle.from_files(context.artifacts["model"], context.artifacts["config"])

    # A DataFrame hint: MLflow infers no schema from it (the explicit signature rules) and does not warn.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        return self.bundle.predict_frame(df.reset_index(drop=True))


def signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    inputs = Schema([
        ColSpec("string", "path", required=False),
        ColSpec("binary", "image", required=False),
        ColSpec("double", "age_approx", required=False),
        ColSpec("string", "sex", required=False),
        ColSpec("string", "anatom_site_1", required=False),
    ])
    outputs = Schema([ColSpec("double", "probability_malignant"), ColSpec("long", "prediction", required=False),
                      ColSpec("string", "error", required=False)])
    return ModelSignature(inputs=inputs, outputs=outputs)


def pip_requirements() -> list[str]:
    reqs = []
    for pkg in PIP_PACKAGES:
        try:
            reqs.append(f"{pkg}=={importlib_metadata.version(pkg)}")
        except importlib_metadata.PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def log_pyfunc(model_dir: Path, example_image: bytes | None = None, name: str = "model") -> Any:
    """Log models/classifier.{keras,json} as a pyfunc with signature, input example and pinned requirements.

    The `tasks` package travels with the model (code_paths), so `mlflow models serve` needs only the pip
    requirements, not a lesionflow checkout."""
    from tasks.train import CONFIG_FILE, MODEL_FILE

    example = pd.DataFrame({"image": [example_image]}) if example_image else None
    with warnings.catch_warnings():  # "add type hints to predict": the explicit signature is the schema here
        warnings.filterwarnings("ignore", message=".*type hint", category=UserWarning)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=LesionflowModel(),
            artifacts={"model": str(model_dir / MODEL_FILE), "config": str(model_dir / CONFIG_FILE)},
            code_paths=[str(Path(__file__).resolve().parent)],
            signature=signature(),
            input_example=example,
            pip_requirements=pip_requirements(),
        )


def log_keras_model(model: Any, name: str = "model", input_example: Any = None,
                    custom_objects: dict[str, Any] | None = None) -> str:
    """Log a bare Keras model (mlflow.tensorflow flavour, pinned requirements) in the active run; its URI."""
    import mlflow.tensorflow

    info = mlflow.tensorflow.log_model(model, name=name, input_example=input_example,
                                       custom_objects=custom_objects, pip_requirements=pip_requirements())
    return info.model_uri


# --------------------------------------------------------------------------- evaluate's run
def _example_image(test_index: pd.DataFrame, root: Path) -> bytes | None:
    """A small JPEG of one test image: a real, self-contained input example (kB, not a full-size photo)."""
    import cv2

    from tasks.core.images import decode

    for rel in test_index.get("processed_path", pd.Series(dtype=str)).head(5):
        p = Path(rel) if Path(rel).is_absolute() else root / rel
        try:
            img = cv2.resize(decode(p.read_bytes()), (64, 64), interpolation=cv2.INTER_AREA)
        except (OSError, ValueError):
            continue
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
        if ok:
            return buf.tobytes()
    return None


DATA_REPORT_STAGES = ("ingest", "dedupe", "clean", "split", "preprocess", "upsample")


def log_evaluation(params: Any, paths: Any, *, metrics: dict[str, Any], reports: list[Path],
                   test_index: pd.DataFrame, model_dir: Path, register_model: bool = True) -> dict[str, Any]:
    """One MLflow run per evaluate: params, train + test metrics (history per epoch), plots and tables,
    git commit, DVC data hash (log_input), the pyfunc model; registered as a new version tagged with its
    test metrics. Returns ids for reports/evaluate/mlflow.json and the nightly flow."""
    from tasks.core.config import dump_params
    from tasks.train import INPUT_STAGE
    from tasks.train import STAGE as TRAIN_STAGE

    root = Path(paths.root)
    cfg = params.evaluate
    digest, digest_source = dvc_hash(root, f"data/{INPUT_STAGE}")
    with start_run(root, experiment=cfg.experiment, tags={"stage": "evaluate", "data_hash": str(digest),
                                                          "data_hash_source": digest_source}) as run:
        flat_params = {k: (str(v)[:PARAM_MAX] if v is not None else "null")
                       for k, v in flatten(params.model_dump(mode="json")).items()}
        items = list(flat_params.items())
        for i in range(0, len(items), 100):  # log_params sends at most 100 per batch
            mlflow.log_params(dict(items[i:i + 100]))
        mlflow.log_text(dump_params(params), "params.yaml")
        test_metrics = numeric(flatten(metrics))
        mlflow.log_metrics({f"test.{k}": v for k, v in test_metrics.items()})
        train_report = paths.reports / TRAIN_STAGE
        if (train_report / "metrics.json").exists():
            mlflow.log_metrics({f"train.{k}": v for k, v in
                                numeric(flatten(json.loads((train_report / "metrics.json").read_text()))).items()})
        if (train_report / "history.csv").exists():
            hist = pd.read_csv(train_report / "history.csv")
            for _, row in hist.iterrows():
                vals = {f"{row['member']}.{k}": float(row[k]) for k in hist.columns
                        if k not in ("member", "phase", "epoch") and pd.notna(row[k])}
                mlflow.log_metrics(vals, step=int(row["epoch"]))
        for folder in reports:
            if Path(folder).exists():
                mlflow.log_artifacts(str(folder), artifact_path=f"reports/{Path(folder).name}")
        # The data report of the run (counts per source/class/split, duplicates, drops by reason, class balance
        # plot) rides along, so a model in the UI shows what data it came from.
        for stage in DATA_REPORT_STAGES:
            folder = paths.reports / stage
            if (folder / "metrics.json").exists():
                mlflow.log_metrics({f"data.{stage}.{k}": v for k, v in
                                    numeric(flatten(json.loads((folder / "metrics.json").read_text()))).items()})
                mlflow.log_artifacts(str(folder), artifact_path=f"data_report/{stage}")
        cols = [c for c in ("source", "isic_id", "target", "split", "age_approx", "sex") if c in test_index]
        with warnings.catch_warnings():  # "source can be interpreted in multiple ways", int-column hints
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(test_index[cols].reset_index(drop=True),
                                              source=str(paths.index(INPUT_STAGE)), targets="target",
                                              name=f"{INPUT_STAGE}-test", digest=(digest or "")[:36] or None)
            mlflow.log_input(dataset, context="testing", tags={"dvc_out": f"data/{INPUT_STAGE}",
                                                               "hash_source": digest_source})
        info = log_pyfunc(model_dir, _example_image(test_index, root))
        result: dict[str, Any] = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                                  "model_uri": info.model_uri, "run_model_uri": f"runs:/{run.info.run_id}/model",
                                  "tracking_uri": mlflow.get_tracking_uri()}
        if register_model:
            op = metrics.get("at_operating_point") or {}
            tags = {"test_auc": metrics.get("auc"), "test_auc_ci_low": metrics.get("auc_ci_low"),
                    "test_auc_ci_high": metrics.get("auc_ci_high"), "test_sensitivity": op.get("sensitivity"),
                    "test_specificity": op.get("specificity"), "test_fn": op.get("fn"), "test_n": metrics.get("n"),
                    "threshold": op.get("threshold"), "data_hash": digest, "git_commit": git_state(root)["git_commit"],
                    "run_id": run.info.run_id}
            version = register(info.model_uri, cfg.model_name, {k: v for k, v in tags.items() if v is not None},
                               root)
            result.update({"registered_model": cfg.model_name, "version": version})
    return result


def serve(model_uri: str, root: Path | str, host: str = "127.0.0.1", port: int = 5001) -> int:
    """`mlflow models serve` for a URI of the project's store (env-manager local: this environment)."""
    # mlflow execs `uvicorn` through bash: the venv's bin/ must be on PATH even when the venv is not activated.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(root), "MLFLOW_DISABLE_TELEMETRY": "true", "PATH": path}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
           "-h", host, "-p", str(port)]
    return subprocess.call(cmd, env=env)
