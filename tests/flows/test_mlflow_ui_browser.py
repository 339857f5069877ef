"""What people see in the MLflow UI, checked in a real browser (Playwright for Python driving Debian's
`chromium`) against a real `mlflow server` on 127.0.0.1 over the tiny project's store.

After the tiny evaluate (a registered version with its model card, made `champion`) and a tiny tune search
(flows/tune.py with a scripted trainer: one parent run, one child run per trial): the registered model shows
the `champion` alias, the version page shows the model card, the evaluate run shows its metrics and its ROC
plot artifact, and the tune parent run expands to its child runs. Skipped when `chromium` or the `playwright`
package is absent. Screenshots go to the test's tmp dir; LESIONFLOW_MLFLOW_SCREENSHOTS=docs/img refreshes
docs/img/mlflow-*.png.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.flows.apps.test_card import MODEL, registered  # noqa: F401 - the fixture
from tests.tasks.conftest import TINY, lf_tiny_params, lf_trained  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow  # trains the tiny model, evaluates with MLflow, starts a server (~2 min)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROOT = Path(__file__).resolve().parents[2]
WAIT_MS = 60_000


@pytest.fixture(scope="module")
def tuned(registered: dict) -> dict:  # noqa: F811
    """A tiny search in the same store: the parent run id, or None when flows/tune.py is not there."""
    try:
        from flows import tune
        from tests.flows.test_tune import ScriptedTrain
    except ImportError:
        return {**registered, "parent": None}
    root = registered["root"]
    shutil.copy(TINY, root / "params.yaml")
    out = tune.tune(root, root / "params.yaml", n_trials=3, train_fn=ScriptedTrain([0.80, 0.40, 0.90]))
    return {**registered, "parent": out["mlflow_parent_run_id"], "study": out["study"]}


@pytest.fixture(scope="module")
def server(tuned: dict) -> Iterator[str]:
    """`mlflow server` over the project's sqlite store and artifact folder on a free local port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tuned["root"]
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{root}/mlruns/mlflow.db",
           "--default-artifact-root", (root / "mlruns" / "artifacts").as_uri(), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=1).read().strip() == b"OK":
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("mlflow server did not become healthy in 120 s")
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def page(server: str) -> Iterator[object]:
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        pg = browser.new_page(viewport={"width": 1400, "height": 900})
        pg.set_default_timeout(WAIT_MS)
        yield pg
        browser.close()


def goto(page: object, url: str) -> None:
    page.goto(url)  # the UI keeps polling: wait for elements, never for network idle
    page.wait_for_load_state("load")


def shot(page: object, name: str, tmp_path: Path) -> None:
    out = tmp_path / f"mlflow-{name}.png"
    close = page.get_by_role("button", name=re.compile("^close$", re.I))  # the assistant side panel, if open
    if close.count() and close.first.is_visible():
        close.first.click()
        page.wait_for_timeout(300)
    page.screenshot(path=str(out))
    target = os.environ.get("LESIONFLOW_MLFLOW_SCREENSHOTS")
    if target:
        dest = (ROOT / target) if not Path(target).is_absolute() else Path(target)
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, dest / out.name)


def test_registry_shows_the_champion_and_the_model_card(page: object, server: str, tuned: dict,
                                                        tmp_path: Path) -> None:
    goto(page, f"{server}/#/models/{MODEL}")
    row = page.get_by_role("row").filter(has_text=f"Version {tuned['version']}")
    row.get_by_text("champion").first.wait_for()
    assert "Model card" in row.inner_text()  # the description column shows the card
    shot(page, "registry", tmp_path)
    goto(page, f"{server}/#/models/{MODEL}/versions/{tuned['version']}")
    page.get_by_text(f"Model card: {MODEL} v{tuned['version']}").first.wait_for()
    body = page.locator("body").inner_text()
    assert "champion" in body and "It is not a diagnosis" in body and "Known limits" in body
    page.get_by_role("table").filter(has_text="ROC AUC").first.wait_for()  # markdown tables rendered as tables
    shot(page, "model-card", tmp_path)


def test_evaluate_run_shows_metrics_and_the_roc_plot(page: object, server: str, tuned: dict, tmp_path: Path) -> None:
    goto(page, f"{server}/#/experiments/1/runs/{tuned['run_id']}")
    page.get_by_text(f"evaluate {MODEL} v{tuned['version']}").first.wait_for()
    page.get_by_text("test.auc", exact=True).first.wait_for()
    assert "test.at_operating_point.sensitivity" in page.locator("body").inner_text()
    shot(page, "run-metrics", tmp_path)
    goto(page, f"{server}/#/experiments/1/runs/{tuned['run_id']}/artifacts/reports/evaluate/roc.png")
    page.get_by_text("reports/evaluate/roc.png").first.wait_for()
    # the preview fetches the PNG and shows it as a blob: image (495 px wide: 4.5 in at 110 dpi)
    page.wait_for_function("Array.from(document.images).some(i => i.src.startsWith('blob:') && i.complete "
                           "&& i.naturalWidth > 400)")
    assert "model_card.md" in page.locator("body").inner_text()  # the card is an artifact of the run too
    shot(page, "roc", tmp_path)


def test_tune_parent_run_expands_to_its_trials(page: object, server: str, tuned: dict, tmp_path: Path) -> None:
    if tuned["parent"] is None:
        pytest.skip("no flows/tune.py: no parent run to open")
    goto(page, f"{server}/#/experiments/1/runs")
    row = page.get_by_role("row").filter(has_text=f"tune {tuned['study']}")
    row.first.wait_for()
    assert not page.get_by_text("trial 0", exact=True).count()
    row.first.locator("button").first.click()  # the expander of a parent run
    for n in range(3):
        page.get_by_text(f"trial {n}", exact=True).first.wait_for()
    shot(page, "tune-children", tmp_path)
