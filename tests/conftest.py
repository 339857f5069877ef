"""Shared fixtures; telemetry off and Prefect/MLflow kept inside temp dirs for every test session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

for _k, _v in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "TF_ENABLE_ONEDNN_OPTS": "0",
    "LESIONFLOW_PROGRESS": "0",
}.items():
    os.environ.setdefault(_k, _v)
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="lf-prefect-"))

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
ISIC_REAL = SHARED / "data" / "isic-real"
ISIC_DUPES = SHARED / "data" / "isic-dupes"
KERAS_WEIGHTS = SHARED / "weights" / "keras"


@pytest.fixture(scope="session")
def isic_real() -> Path:
    """The real labelled images; tests using it skip cleanly when ../shared is absent."""
    if not (ISIC_REAL / "metadata.csv").exists():
        pytest.skip("../shared/data/isic-real not present")
    return ISIC_REAL


@pytest.fixture(scope="session")
def isic_dupes() -> Path:
    if not (ISIC_DUPES / "metadata.csv").exists():
        pytest.skip("../shared/data/isic-dupes not present")
    return ISIC_DUPES


@pytest.fixture(scope="session")
def isic_api_fixtures() -> Path:
    p = SHARED / "isic-api"
    if not (p / "images_search_page1.json").exists():
        pytest.skip("../shared/isic-api not present")
    return p
