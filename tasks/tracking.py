"""MLflow for lesionflow: the only module that imports mlflow.

Store: tracking + registry in `sqlite:///<root>/mlruns/mlflow.db`, artifacts in `<root>/mlruns/artifacts`
(MLFLOW_TRACKING_URI overrides the store; for another sqlite file the artifacts go beside it). Experiment
`lesionflow`; registered model `lesionflow-classifier`, promoted with aliases (never the deprecated stages).

Small API for the stages and the nightly flow:
`tracking_uri(root)`, `start_run(root, ...)`, `register(model_uri, name, tags) -> version`,
`get_alias(name, alias) -> version | None`, `set_alias(name, alias, version)`,
`set_version_tags(name, version, tags)`, `current_version(name, root)`, `download_model(uri, root)`,
`log_keras_model(model, name, input_example, custom_objects) -> model_uri` (cyclegan),
`log_stage_run(stage, sections, paths, metrics=..., ...)`: THE one way a stage logs a run (cyclegan, upsample,
evaluate, ugly_duckling), params named `<section>.<key>`; `log_evaluation(...)` builds evaluate's on it.
The experiment is tagged `mlflow.experimentKind = custom_model_development` (the UI opens it on training runs).
The logged model is a pyfunc (`LesionflowModel`) wrapping tasks.models.bundle.Bundle (the one scoring path, with
the stored preprocessing and pixel cap): input a
DataFrame with `path` (image files) or `image` (encoded bytes; base64 in JSON), optional age_approx / sex /
anatom_site_1; output probability_malignant, prediction (stored operating point), error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd

from tasks.core.lineage import dvc_hash, git_state, short_commit

__all__ = ["dvc_hash", "git_state"]  # lineage readers re-exported for older callers; their home is tasks.core.lineage

log = logging.getLogger(__name__)

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no lookups of config.mlflow-telemetry.io (trap 5)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm bars in stage logs

EXPERIMENT = "lesionflow"
MODEL_NAME = "lesionflow-classifier"
# Pinned to what runs here: inferring them re-imports TF in a subprocess (7.7 s vs 0.6 s, trap 6).
PIP_PACKAGES = ("tensorflow", "keras", "mlflow", "numpy", "pandas", "pyarrow", "pydantic", "pyyaml",
                "opencv-python-headless", "scikit-learn", "scipy", "tqdm")
PARAM_MAX = 6000  # MLflow's limit on one param value
# The MLflow UI opens an experiment of this kind on its training runs (not the GenAI traces view).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


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
        if (exp.tags or {}).get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    try:
        return mlflow.create_experiment(experiment, artifact_location=artifact_location(uri),
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
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


# --------------------------------------------------------------------------- flat params/metrics
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
        from tasks.models.bundle import Bundle

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
    from tasks.models.inputs import CONFIG_FILE, MODEL_FILE

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


# --------------------------------------------------------------------------- one run per stage
def section_params(sections: Mapping[str, Any]) -> dict[str, str]:
    """{section: params model or dict} -> {'<section>.<key>': text} (nested keys dotted, lists as JSON)."""
    out: dict[str, str] = {}
    for name, value in sections.items():
        data = value.model_dump(mode="json") if hasattr(value, "model_dump") else value
        for key, v in flatten(data if isinstance(data, dict) else {"": data}, f"{name}.").items():
            out[key.rstrip(".")] = "null" if v is None else str(v)[:PARAM_MAX]
    return out


def _log_artifacts(paths: Iterable[Path | str], artifact_path: str) -> None:
    for path in paths:
        path = Path(path)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=f"{artifact_path}/{path.name}")
        elif path.exists():
            mlflow.log_artifact(str(path), artifact_path)


def log_stage_run(stage: str, sections: Mapping[str, Any], paths: Any, *, metrics: Mapping[str, Any],
                  artifacts: Iterable[Path | str] = (), artifact_path: str = "reports", experiment: str = EXPERIMENT,
                  run_name: str | None = None, tags: Mapping[str, str] | None = None,
                  extra_params: Mapping[str, Any] | None = None,
                  steps: Iterable[tuple[int, Mapping[str, float]]] = (), keras_model: Any = None,
                  register_as: str | None = None, model_artifact: str = "model",
                  custom_objects: dict[str, Any] | None = None,
                  extra: Callable[[Any], Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The one MLflow run of a stage: params named `<section>.<key>` (only the sections given: the stage's
    declared ones), numeric metrics (nested keys dotted), per-step metrics, artifacts (files under
    `artifact_path`, folders under `artifact_path/<name>`), optionally a Keras model logged and registered as
    `register_as`, and whatever `extra(run)` logs inside the same run. Returns {mlflow_run_id, experiment_id,
    [model_uri, registered_version], **extra's result}."""
    root = Path(paths.root)
    with start_run(root, run_name=run_name or stage, experiment=experiment,
                   tags={"stage": stage, **(tags or {})}) as run:
        run_id = run.info.run_id
        params = section_params(sections)
        params.update({k: "null" if v is None else str(v)[:PARAM_MAX] for k, v in (extra_params or {}).items()})
        items = sorted(params.items())
        for i in range(0, len(items), 100):  # log_params sends at most 100 per batch
            mlflow.log_params(dict(items[i:i + 100]))
        flat = numeric(flatten(dict(metrics)))
        if flat:
            mlflow.log_metrics(flat)
        for step, values in steps:
            vals = numeric(dict(values))
            if vals:
                mlflow.log_metrics(vals, step=int(step))
        _log_artifacts(artifacts, artifact_path)
        out: dict[str, Any] = {"mlflow_run_id": run_id, "experiment_id": run.info.experiment_id}
        if keras_model is not None and register_as:
            example = np.zeros((1, *keras_model.input_shape[1:]), np.float32)
            model_uri = log_keras_model(keras_model, name=model_artifact, input_example=example,
                                        custom_objects=custom_objects)
            out["model_uri"] = model_uri
            out["registered_version"] = register(model_uri, register_as, {**(tags or {}), "run_id": run_id}, root)
        if extra is not None:
            out.update(extra(run))
    return out


def next_version(name: str, root: Path | str) -> int:
    """The version number registering `name` now would get (1 for a new model)."""
    try:
        versions = client(root).search_model_versions(f"name='{name}'")
    except mlflow.exceptions.MlflowException:
        return 1
    return max((int(v.version) for v in versions), default=0) + 1


# --------------------------------------------------------------------------- evaluate's run
DATA_REPORT_STAGES = ("ingest", "dedupe", "clean", "split", "preprocess", "upsample")
TRAIN_STAGE = "train"


def model_sections(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """The training params a model was made with, from its classifier.json (evaluate does not read params.train):
    `train` (the whole section when train stored it, else members/TTA/stacker) and `preprocess`."""
    train = model_config.get("train")
    if not isinstance(train, dict):
        train = {k: model_config.get(k) for k in ("members", "tta", "target_sensitivity", "stacker")}
    return {"train": train, "preprocess": model_config.get("preprocess") or {}}


def _train_steps(report: Path) -> list[tuple[int, dict[str, float]]]:
    if not (report / "history.csv").exists():
        return []
    hist = pd.read_csv(report / "history.csv")
    return [(int(row["epoch"]), {f"{row['member']}.{k}": float(row[k]) for k in hist.columns
                                 if k not in ("member", "phase", "epoch") and pd.notna(row[k])})
            for _, row in hist.iterrows()]


def log_evaluation(cfg: Any, paths: Any, *, metrics: dict[str, Any], model_config: Mapping[str, Any],
                   reports: list[Path], test_index: pd.DataFrame, model_dir: Path, input_stage: str,
                   register_model: bool | None = None) -> dict[str, Any]:
    """One MLflow run per evaluate (run name `evaluate <model> v<next version> <commit>`): the [evaluate] params
    plus the model's training params from classifier.json, test + train metrics (history per epoch), plots and
    tables, the data report, git commit, DVC data hash (log_input), the pyfunc model; registered as a new version
    tagged with its test metrics. Returns ids for reports/evaluate/mlflow.json and the nightly flow."""
    import yaml

    root = Path(paths.root)
    register_model = cfg.register_model if register_model is None else register_model
    digest, digest_source = dvc_hash(root, f"data/{input_stage}")
    configure(root, cfg.experiment)
    commit = short_commit(root) or "no-git"
    run_name = (f"evaluate {cfg.model_name} v{next_version(cfg.model_name, root)} {commit}" if register_model
                else f"evaluate {cfg.model_name} {commit}")
    train_report = paths.reports / TRAIN_STAGE

    def extra(run: Any) -> dict[str, Any]:
        mlflow.log_text(yaml.safe_dump({"evaluate": cfg.model_dump(mode="json")}, sort_keys=False), "params.yaml")
        mlflow.log_dict(dict(model_config), "classifier.json")
        if (train_report / "metrics.json").exists():
            mlflow.log_metrics({f"train.{k}": v for k, v in
                                numeric(flatten(json.loads((train_report / "metrics.json").read_text()))).items()})
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
                                              source=str(paths.index(input_stage)), targets="target",
                                              name=f"{input_stage}-test", digest=(digest or "")[:36] or None)
            mlflow.log_input(dataset, context="testing", tags={"dvc_out": f"data/{input_stage}",
                                                               "hash_source": digest_source})
        info = log_pyfunc(model_dir, _example_image(test_index, root))
        result: dict[str, Any] = {"run_id": run.info.run_id, "model_uri": info.model_uri,
                                  "run_model_uri": f"runs:/{run.info.run_id}/model",
                                  "tracking_uri": mlflow.get_tracking_uri()}
        if register_model:
            op = metrics.get("at_operating_point") or {}
            tags = {"test_auc": metrics.get("auc"), "test_auc_ci_low": metrics.get("auc_ci_low"),
                    "test_auc_ci_high": metrics.get("auc_ci_high"), "test_sensitivity": op.get("sensitivity"),
                    "test_specificity": op.get("specificity"), "test_fn": op.get("fn"), "test_n": metrics.get("n"),
                    "threshold": op.get("threshold"), "data_hash": digest,
                    "git_commit": git_state(root)["git_commit"], "run_id": run.info.run_id}
            version = register(info.model_uri, cfg.model_name, {k: v for k, v in tags.items() if v is not None},
                               root)
            result.update({"registered_model": cfg.model_name, "version": version})
        return result

    out = log_stage_run("evaluate", {"evaluate": cfg, **model_sections(model_config)}, paths,
                        metrics={"test": metrics}, artifacts=reports, experiment=cfg.experiment, run_name=run_name,
                        tags={"data_hash": str(digest), "data_hash_source": digest_source},
                        steps=_train_steps(train_report), extra=extra)
    out.pop("mlflow_run_id", None)  # evaluate's record names it run_id (nightly and mlflow.json readers)
    return out

def serve(model_uri: str, root: Path | str, host: str = "127.0.0.1", port: int = 5001) -> int:
    """`mlflow models serve` for a URI of the project's store (env-manager local: this environment)."""
    # mlflow execs `uvicorn` through bash: the venv's bin/ must be on PATH even when the venv is not activated.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(root), "MLFLOW_DISABLE_TELEMETRY": "true", "PATH": path}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
           "-h", host, "-p", str(port)]
    return subprocess.call(cmd, env=env)


def load_bundle(model: str | Path, root: Path | str | None = None) -> Any:
    """The scoring bundle for a path or an MLflow URI (runs:/, models:/): URIs are downloaded through mlflow."""
    from tasks.models.bundle import load_bundle as load

    return load(model, Path(root) if root is not None else None, download=download_model)


# --------------------------------------------------------------------------- model cards (tasks/core/card.py renders)
CARD_ARTIFACT = "model_card.md"
CARD_DATA_ARTIFACT = "model_card/card.json"
DATA_ROWS_ARTIFACT = "model_card/data_rows.parquet"  # the rows (metadata only) a model was made from: drift's reference


def set_version_description(name: str, version: str | int, description: str, root: Path | str | None = None) -> None:
    """The registry version's description (what the MLflow UI shows on the version page)."""
    client(root).update_model_version(name, str(version), description=description)


def log_card(run_id: str, card: str, root: Path | str, *, inputs: Mapping[str, Any] | None = None,
             rows: pd.DataFrame | None = None, name: str | None = None, version: str | int | None = None,
             description: str | None = None) -> None:
    """Attach a model card to a (finished) run: `model_card.md`, its inputs as JSON and the model's data rows;
    with name + version also the registry version's description (`description`, default the card)."""
    import tempfile

    c = client(root)
    c.log_text(run_id, card, CARD_ARTIFACT)
    if inputs is not None:
        c.log_dict(run_id, dict(inputs), CARD_DATA_ARTIFACT)
    if rows is not None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(DATA_ROWS_ARTIFACT).name
            rows.reset_index(drop=True).to_parquet(path, index=False)
            c.log_artifact(run_id, str(path), str(Path(DATA_ROWS_ARTIFACT).parent))
    if name and version is not None:
        set_version_description(name, version, description if description is not None else card, root)


def resolve_model_uri(uri: str, root: Path | str | None = None) -> dict[str, Any]:
    """models:/name@alias, models:/name/version or runs:/ID[/path] -> {run_id, name, version} (name/version None
    for runs:/). Raises LookupError naming the URI when it does not resolve."""
    c = client(root)
    m = re.match(r"^models:/([^/@]+)(?:@([^/]+)|/(\d+))/?$", uri)
    try:
        if m:
            name, alias, version = m.groups()
            mv = c.get_model_version_by_alias(name, alias) if alias else c.get_model_version(name, version)
            return {"run_id": mv.run_id, "name": name, "version": str(mv.version),
                    "description": mv.description or ""}
        r = re.match(r"^runs:/([0-9a-fA-F]+)(?:/.*)?$", uri)
        if r:
            c.get_run(r.group(1))
            return {"run_id": r.group(1), "name": None, "version": None, "description": ""}
    except mlflow.exceptions.MlflowException as exc:
        raise LookupError(f"{uri}: not found in {tracking_uri(root or Path.cwd())} ({exc.error_code})") from None
    raise LookupError(f"{uri}: expected models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID")


def read_run_artifact(run_id: str, path: str, root: Path | str | None = None) -> Path | None:
    """A local copy of one artifact of a run, or None when the run has no such artifact."""
    client(root)
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path))
    except (mlflow.exceptions.MlflowException, OSError):
        return None


def read_card(uri: str, root: Path | str | None = None) -> str:
    """The model card of a models:/ or runs:/ URI: the run's `model_card.md`, else the version's description.
    Raises LookupError when the URI resolves but carries no card."""
    info = resolve_model_uri(uri, root)
    local = read_run_artifact(info["run_id"], CARD_ARTIFACT, root)
    if local is not None and local.is_file():
        return local.read_text()
    if info["description"]:
        return info["description"]
    raise LookupError(f"{uri}: run {info['run_id']} has no {CARD_ARTIFACT} (registered before model cards; "
                      "re-run `lesionflow stage evaluate`)")


# --------------------------------------------------------------------------- searches (flows/tune.py)
@contextlib.contextmanager
def start_parent_run(root: Path | str, run_name: str, *, experiment: str = EXPERIMENT,
                     tags: Mapping[str, str] | None = None, run_id: str | None = None) -> Iterator[Any]:
    """The parent run of a search: `run_id` reopened when it still exists (a resumed study keeps one parent, so
    all its trials sit under it in the UI), else a new run (tagged like start_run)."""
    exp_id = configure(root, experiment)
    if run_id:
        try:
            old = mlflow.MlflowClient().get_run(run_id)
            reopen = old.info.lifecycle_stage == "active" and old.info.experiment_id == exp_id
        except mlflow.exceptions.MlflowException:
            reopen = False
        if reopen:
            with mlflow.start_run(run_id=run_id) as run:
                if tags:
                    mlflow.set_tags(dict(tags))
                yield run
            return
    with start_run(root, run_name=run_name, experiment=experiment, tags=dict(tags or {})) as run:
        yield run


def log_active(*, params: Mapping[str, Any] | None = None, metrics: Mapping[str, Any] | None = None,
               step: int | None = None, tags: Mapping[str, Any] | None = None, artifacts: Iterable[Path | str] = (),
               artifact_path: str | None = None) -> None:
    """Params (text, clipped to MLflow's limit), numeric metrics (nested keys dotted), tags and files on the
    active run."""
    if params:
        items = sorted((k, "null" if v is None else str(v)[:PARAM_MAX]) for k, v in params.items())
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i:i + 100]))
    flat = numeric(flatten(dict(metrics or {})))
    if flat:
        mlflow.log_metrics(flat, step=step)
    if tags:
        mlflow.set_tags({k: _tag(v) for k, v in tags.items()})
    for path in artifacts:
        if Path(path).exists():
            mlflow.log_artifact(str(path), artifact_path)


def log_child_run(parent_run_id: str, run_name: str, *, sections: Mapping[str, Any],
                  metrics: Mapping[str, Any] | None = None, steps: Iterable[tuple[int, Mapping[str, float]]] = (),
                  artifacts: Iterable[Path | str] = (), tags: Mapping[str, Any] | None = None,
                  extra_params: Mapping[str, Any] | None = None, status: str = "FINISHED") -> str:
    """One child run under the active parent (`mlflow.parentRunId`): params named `<section>.<key>` like a
    stage run's, so the UI's compare view lines trials up key by key; metrics, per-step metrics, files under
    `reports/`; ended with `status` (FINISHED, FAILED or KILLED). Returns its run id."""
    active = mlflow.active_run()
    exp_id = (active.info.experiment_id if active is not None
              else mlflow.MlflowClient().get_run(parent_run_id).info.experiment_id)
    run = mlflow.start_run(run_name=run_name, nested=True, parent_run_id=parent_run_id, experiment_id=exp_id,
                           tags={k: _tag(v) for k, v in (tags or {}).items()})
    try:
        log_active(params={**section_params(sections), **dict(extra_params or {})}, metrics=metrics,
                   artifacts=artifacts, artifact_path="reports")
        for step, values in steps:
            vals = numeric(dict(values))
            if vals:
                mlflow.log_metrics(vals, step=int(step))
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    mlflow.end_run(status=status)
    return run.info.run_id


def child_runs(parent_run_id: str, root: Path | str | None = None) -> list[Any]:
    """The child runs of a parent run (oldest first)."""
    c = client(root)
    parent = c.get_run(parent_run_id)
    return list(reversed(c.search_runs([parent.info.experiment_id],
                                       filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                       max_results=5000)))
