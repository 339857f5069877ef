"""`lesionflow card MODEL_URI` (flows/apps/card.py): the tiny model evaluated with MLflow on, its card on the run
and on the registry version, printed for models:/name@alias, models:/name/version and runs:/ID."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from flows.apps import card as app
from tasks.core.errors import InputError
from tests.tasks.conftest import lf_tiny_params, lf_trained  # noqa: F401 - fixtures

MODEL = "lesionflow-classifier"


def register_tiny(trained: Path, dest: Path, params) -> dict:  # noqa: ANN001
    """A copy of the trained tiny project, evaluated with MLflow on (run + registered version + card), its
    version made `champion`. Returns {root, version, run_id}."""
    from tasks import evaluate, tracking
    from tasks.core.io import Paths

    root = dest / "proj"
    shutil.copytree(trained, root, ignore=shutil.ignore_patterns("mlruns", "reports"))
    summary = evaluate.run(params, Paths(root))
    info = summary["mlflow"]
    tracking.set_alias(MODEL, "champion", info["version"], root=root)
    return {"root": root, "version": info["version"], "run_id": info["run_id"]}


@pytest.fixture(scope="module")
def registered(lf_trained: Path, lf_tiny_params, tmp_path_factory) -> Iterator[dict]:  # noqa: F811, ANN001
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        yield register_tiny(lf_trained, tmp_path_factory.mktemp("card"), lf_tiny_params)
    finally:
        mp.undo()


def test_card_for_every_uri_form(registered: dict) -> None:
    root, version, run_id = registered["root"], registered["version"], registered["run_id"]
    by_alias = app.card(f"models:/{MODEL}@champion", root)
    assert by_alias == app.card(f"models:/{MODEL}/{version}", root) == app.card(f"runs:/{run_id}", root)
    assert app.card(f"runs:/{run_id}/model", root) == by_alias
    assert by_alias.startswith(f"# Model card: {MODEL} v{version}")
    for needle in ("not a diagnosis", "## Data lineage", "## Test metrics", "ROC AUC", "(CI ", "## Calibration",
                   "## Subgroups", "| sex | female |", "| age_band |", "| site |", "| source | synthetic |",
                   "## Known limits", "Images per source and split"):
        assert needle in by_alias, needle


def test_card_is_the_version_description_and_rows_are_logged(registered: dict) -> None:
    import mlflow

    from tasks import tracking

    root, version, run_id = registered["root"], registered["version"], registered["run_id"]
    tracking.configure(root)
    mv = mlflow.MlflowClient().get_model_version(MODEL, version)
    assert mv.description == app.card(f"runs:/{run_id}", root)
    rows = pd.read_parquet(tracking.read_run_artifact(run_id, tracking.DATA_ROWS_ARTIFACT, root))
    assert len(rows) == 96 and {"source", "isic_id", "split", "path", "sex", "target"} <= set(rows)
    assert tracking.read_run_artifact(run_id, tracking.CARD_DATA_ARTIFACT, root) is not None


def test_card_errors_name_the_uri(registered: dict) -> None:
    root = registered["root"]
    with pytest.raises(InputError, match="expected models:/"):
        app.card("lesionflow-classifier", root)
    with pytest.raises(InputError, match="models:/nope@champion: not found"):
        app.card("models:/nope@champion", root)
    with pytest.raises(InputError, match="models:/lesionflow-classifier/99: not found"):
        app.card(f"models:/{MODEL}/99", root)
