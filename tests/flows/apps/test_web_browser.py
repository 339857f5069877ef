"""`lesionflow app` in a real browser: Playwright for Python driving Debian's `chromium` against a live uvicorn.

Upload a close-up -> the probability, the Grad-CAM overlay and the model version show; upload a wide-field photo
-> the ranked lesions and the annotated photo; upload a corrupt file -> its error. The page must not fetch
anything from another host. Skipped when `chromium` or the `playwright` package is absent.

Screenshots of each state go to the test's tmp dir; set LESIONFLOW_APP_SCREENSHOTS=docs/img to refresh the
ones in the docs (docs/img/app-*.png).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.apps import web
from tasks.models.bundle import Bundle
from tests.flows.apps.test_web import app_bundle, closeup_jpeg, widefield_png  # noqa: F401 - app_bundle: fixture

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROOT = Path(__file__).resolve().parents[3]
# Decided at collection, before the session fixtures (the tiny model's training) would run.
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium)")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")


@pytest.fixture(scope="module")
def live_url(app_bundle: Bundle, lf_trained: Path) -> Iterator[str]:  # noqa: F811 - the imported fixture
    """The app on a free local port, served by uvicorn in a thread for this module."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = web.create_app(app_bundle, web.describe_model(app_bundle, lf_trained / "models"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def shot(page: object, name: str, tmp_path: Path) -> None:
    """Full-page screenshot to tmp_path, and to $LESIONFLOW_APP_SCREENSHOTS/app-<name>.png when set (there
    quantised to 256 colours, dithered: under half the bytes, for the repository)."""
    out = tmp_path / f"app-{name}.png"
    page.screenshot(path=str(out), full_page=True)
    target = os.environ.get("LESIONFLOW_APP_SCREENSHOTS")
    if target:
        from PIL import Image

        dest = (ROOT / target) if not Path(target).is_absolute() else Path(target)
        dest.mkdir(parents=True, exist_ok=True)
        with Image.open(out) as im:
            rgb = im.convert("RGB")
            palette = rgb.quantize(256, method=Image.Quantize.MEDIANCUT)  # then dithered: no banding in photos
            rgb.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG).save(dest / out.name, optimize=True)


def test_page_in_chromium(browser: object, live_url: str, tmp_path: Path) -> None:
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    foreign: list[str] = []
    page.on("request", lambda req: None if req.url.startswith((live_url, "data:")) else foreign.append(req.url))
    page.goto(live_url + "/")
    assert "Research tool, not a diagnosis" in page.locator("#notice").inner_text()
    version = page.locator("#model-version").inner_text()
    assert version.startswith("sha256:")

    # 1. close-up photos: probability, decision, Grad-CAM overlay, model version
    page.set_input_files("#photo-files", [
        {"name": "lesion-1.jpg", "mimeType": "image/jpeg", "buffer": closeup_jpeg(21, "malignant")},
        {"name": "lesion-2.jpg", "mimeType": "image/jpeg", "buffer": closeup_jpeg(22, "benign")},
    ])
    page.fill("input[name=age_approx]", "62")
    page.select_option("select[name=sex]", "female")
    page.select_option("select[name=site]", "back")
    page.click("#photos button[type=submit]")
    page.wait_for_selector("#photo-results")
    cards = page.locator("#photo-results .result[data-ok=true]")
    assert cards.count() == 2
    for i in range(2):
        text = cards.nth(i).locator(".probability").inner_text()
        assert text.endswith("%") and 0 <= float(text[:-1]) <= 100
        assert "flagged" in cards.nth(i).locator(".decision").inner_text().lower()
        overlay = cards.nth(i).locator("img.overlay")
        assert overlay.evaluate("img => img.complete && img.naturalWidth") == web.DISPLAY
    assert page.locator("#model-version").inner_text() == version
    assert page.locator("input[name=age_approx]").input_value() == "62"
    shot(page, "photos", tmp_path)

    # 2. wide-field: annotated photo and the lesions ranked by the ugly-duckling score
    page.click("nav.tabs a[data-tab=widefield]")
    assert page.locator("#widefield").is_visible() and not page.locator("#photos").is_visible()
    photo, truth = widefield_png(3)
    page.set_input_files("#widefield-file", {"name": "back.png", "mimeType": "image/png", "buffer": photo})
    page.click("#widefield button[type=submit]")
    page.wait_for_selector("#widefield-results")
    ranks = page.locator("#widefield-results tr.lesion").evaluate_all("rows => rows.map(r => +r.dataset.rank)")
    assert len(ranks) >= len(truth["boxes"]) - 1 and ranks == list(range(1, len(ranks) + 1))
    assert page.locator("tr.odd-one td").first.inner_text() == "#1"
    assert page.locator("#annotated").evaluate("img => img.complete && img.naturalWidth") == truth["width"]
    shot(page, "widefield", tmp_path)

    # 3. a corrupt file beside a good one: the good one is scored, the corrupt one says why not
    page.click("nav.tabs a[data-tab=photos]")
    good = closeup_jpeg(23)
    page.set_input_files("#photo-files", [
        {"name": "cut-short.jpg", "mimeType": "image/jpeg", "buffer": good[: len(good) // 2]},
        {"name": "fine.jpg", "mimeType": "image/jpeg", "buffer": good},
    ])
    page.click("#photos button[type=submit]")
    page.wait_for_selector("#photo-results")
    bad = page.locator("#photo-results .result[data-ok=false]")
    assert bad.count() == 1 and bad.get_attribute("data-reason") == "corrupt"
    message = bad.locator(".error").inner_text()
    assert "Not scored (corrupt)" in message and "truncated" in message
    assert page.locator("#photo-results .result[data-ok=true]").count() == 1
    shot(page, "error", tmp_path)

    # 4. the client-side check refuses an oversized file before uploading it
    page.set_input_files("#photo-files", {"name": "huge.jpg", "mimeType": "image/jpeg",
                                          "buffer": b"\xff\xd8\xff" + bytes(web.Limits().max_file_bytes)})
    page.click("#photos button[type=submit]")
    assert "larger than" in page.locator("#photos .client-error").inner_text()
    assert foreign == []  # no CDN, fonts or analytics: the page works offline
    page.close()
