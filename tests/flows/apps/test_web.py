"""`lesionflow app`: the API and the page through FastAPI's TestClient, over the tiny trained model.

Good photos, bad files (type, empty, truncated, oversized), the pixel cap (refused before decoding), request
limits, metadata on (the dual-input tiny model) and off (its image-only member alone), Grad-CAM, the wide-field
tab, the model identity, and that nothing touches the disk.
"""

from __future__ import annotations

import base64
import json
import re
import tempfile
import warnings
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from flows.apps import web
from tasks.models.bundle import Bundle, load_bundle

with warnings.catch_warnings():  # Starlette asks for httpx2, which is not in the tree; httpx works
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


# --------------------------------------------------------------------------- photos
def closeup_jpeg(seed: int = 0, label: str = "malignant", size: int = 320) -> bytes:
    """A dermoscopy-like synthetic close-up (tasks/fake/lesions.py), JPEG bytes."""
    from tasks.fake.lesions import encode_jpeg, render_image, sample_lesion, sample_patient_style

    rng = np.random.default_rng(seed)
    style = sample_patient_style(rng)
    return encode_jpeg(render_image(sample_lesion(rng, label, style), style, rng, size, size), 92)


def widefield_png(seed: int = 3) -> tuple[bytes, dict]:
    from tasks.fake.widefield import render_widefield

    img, truth = render_widefield(np.random.default_rng(seed))
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes(), truth


def huge_png_header(width: int = 100_000, height: int = 100_000) -> bytes:
    """A small PNG whose IHDR claims width x height: only a header reader sees the size."""
    ok, buf = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))
    data = bytearray(buf.tobytes())
    data[16:20], data[20:24] = width.to_bytes(4, "big"), height.to_bytes(4, "big")
    return bytes(data)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def app_bundle(lf_trained: Path) -> Bundle:
    """The tiny trained ensemble: two members, one dual-input (age, sex, site)."""
    return load_bundle(lf_trained / "models")


@pytest.fixture(scope="session")
def plain_bundle(app_bundle: Bundle) -> Bundle:
    """The image-only member of the tiny model on its own: a model that takes no metadata."""
    from tasks.models.classifier import build_ensemble, member_models

    member = next(m for m in member_models(app_bundle.model) if "metadata" not in [t.name for t in m.inputs])
    model = build_ensemble([member], [1.0], 0.0, image_size=app_bundle.image_size, name="image_only")
    config = {**app_bundle.config, "metadata": None, "members": [app_bundle.config["members"][0]],
              "stacker": {"kind": "stack", "coef": [1.0], "intercept": 0.0}}
    return Bundle(model=model, config=config, source="image-only test model")


@pytest.fixture(scope="session")
def client(app_bundle: Bundle, lf_trained: Path) -> TestClient:
    info = web.describe_model(app_bundle, lf_trained / "models")
    return TestClient(web.create_app(app_bundle, info))


@pytest.fixture(scope="session")
def plain_client(plain_bundle: Bundle) -> TestClient:
    return TestClient(web.create_app(plain_bundle))


def score(client: TestClient, *images: dict, gradcam: bool = False) -> list[dict]:
    r = client.post("/api/v1/score", json={"images": list(images), "gradcam": gradcam})
    assert r.status_code == 200, r.text
    return r.json()["results"]


# --------------------------------------------------------------------------- checks before decoding (no model)
def test_check_photo_refuses_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decode(*a: object, **k: object) -> None:
        raise AssertionError("decoded a file that the header checks must refuse")

    monkeypatch.setattr(web, "decode", no_decode)
    lim = web.Limits(max_file_bytes=50_000)
    cases = {b"": "empty", b"x" * 50_001: "file_too_big", b"GIF89a....": "file_type", b"hello world": "file_type",
             b"\xff\xd8\xff\xe0" + b"\x00" * 20: "unreadable", huge_png_header(): "too_large"}
    for data, reason in cases.items():
        with pytest.raises(web.PhotoError) as exc:
            web.decode_photo(data, lim, 50_000_000, 16)
        assert exc.value.reason == reason, (data[:12], str(exc.value))
    assert "10,000,000,000 pixels; the limit is 50,000,000" in str(
        pytest.raises(web.PhotoError, web.check_photo, huge_png_header(), lim, 50_000_000).value)
    assert web.check_photo(closeup_jpeg(size=64), web.Limits(), 50_000_000) == ("jpeg", 64, 64)
    assert [web.sniff_type(d) for d in (b"RIFF\0\0\0\0WEBPVP8 ", b"BM\0\0", b"II*\x00", b"MM\x00*")] == \
        ["webp", "bmp", "tiff", "tiff"]


# --------------------------------------------------------------------------- the page
def test_page_shows_notice_model_and_needs_no_external_asset(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200
    html = r.text
    assert "Research tool, not a diagnosis" in html
    assert re.search(r'id="model-version">sha256:[0-9a-f]{12}<', html)
    assert "90% of malignant lesions" in html and "operating point" in html
    assert 'id="metadata-note">This model uses age, sex and site' in html
    assert '<option value="back"' in html  # the site vocabulary the model was trained with
    # No CDN, no external script/style/font/image: every src/href is local or a data: URI.
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert refs and all(ref.startswith(("/", "#", "data:")) for ref in refs), refs
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert "@import" not in html and "url(" not in html


def test_page_scores_photos_with_gradcam_overlay(client: TestClient) -> None:
    files = [("files", ("lesion.jpg", closeup_jpeg(1), "image/jpeg")),
             ("files", ("notes.txt", b"not a photo", "text/plain"))]
    r = client.post("/ui/score", files=files, data={"age_approx": "55", "sex": "female", "site": "back",
                                                    "gradcam": "on"})
    assert r.status_code == 200, r.text
    html = r.text
    good, bad = re.findall(r'<article class="card[^"]*" data-ok="(\w+)"', html)
    assert (good, bad) == ("true", "false")
    assert re.search(r'class="prob probability">\d+\.\d%<', html)
    assert re.search(r'<img class="overlay" alt="Grad-CAM overlay" src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"',
                     html)
    assert "Not scored (file_type)" in html and "notes.txt" in html
    assert re.search(r"Flagged|Not flagged", html)
    assert 'value="55"' in html and '<option value="female" selected>' in html  # the form keeps its values


def test_page_request_errors_are_shown_on_the_page(client: TestClient) -> None:
    r = client.post("/ui/score", files=[("files", ("", b"", "application/octet-stream"))])
    assert r.status_code == 400 and 'id="request-error"' in r.text and "choose at least one photo" in r.text
    r = client.post("/ui/score", files=[("files", ("a.jpg", b"x", "image/jpeg"))], data={"age_approx": "200"})
    assert r.status_code == 400 and "outside 0-120" in r.text
    r = client.post("/ui/score", data={"x": "1"})
    assert r.status_code == 415 and "multipart/form-data" in r.text


# --------------------------------------------------------------------------- the JSON API: good photos
def test_api_scores_like_the_bundle_and_decides_at_the_operating_point(client: TestClient,
                                                                        app_bundle: Bundle) -> None:
    photos = [closeup_jpeg(s, label) for s, label in ((2, "malignant"), (3, "benign"), (4, "benign"))]
    meta = {"age_approx": 60, "sex": "male", "site": "leg"}
    results = score(client, *({"id": f"p{i}", "image": b64(p), **meta} for i, p in enumerate(photos)))
    assert [r["id"] for r in results] == ["p0", "p1", "p2"]
    expected = app_bundle.predict_frame(pd.DataFrame({"image": photos, "age_approx": [60] * 3, "sex": ["male"] * 3,
                                                      "anatom_site_1": ["leg"] * 3}))
    got = np.array([r["probability_malignant"] for r in results])
    np.testing.assert_allclose(got, expected["probability_malignant"].to_numpy(), rtol=1e-5, atol=1e-6)
    for r in results:
        assert r["error"] is None and 0 <= r["probability_malignant"] <= 1
        assert r["prediction"] == int(r["probability_malignant"] >= app_bundle.threshold) == int(r["flagged"])
        assert r["notes"] == [] and r["gradcam_png"] is None


def test_api_gradcam_and_model_info(client: TestClient, app_bundle: Bundle) -> None:
    (r,) = score(client, {"image": b64(closeup_jpeg(5))}, gradcam=True)
    for key in ("gradcam_png", "model_input_png"):
        img = cv2.imdecode(np.frombuffer(base64.b64decode(r[key]), np.uint8), cv2.IMREAD_COLOR)
        assert img.shape == (web.DISPLAY, web.DISPLAY, 3)
    m = client.get("/api/v1/model").json()
    assert m["threshold"] == pytest.approx(app_bundle.threshold) and m["uses_metadata"] is True
    assert m["target_sensitivity"] == 0.9 and "sensitivity" in m["operating_point"]
    assert m["version"].startswith("sha256:") and m["members"] == ["cnn", "meta"]


def test_gradcam_maps_are_normalised_heatmaps(app_bundle: Bundle) -> None:
    batch = np.stack([app_bundle.preprocess(closeup_jpeg(s)) for s in (6, 7)])
    meta = app_bundle.metadata(pd.DataFrame(index=range(2)))
    cams = web.gradcam_maps(app_bundle, batch, meta)
    assert cams.shape == (2, app_bundle.image_size, app_bundle.image_size)
    assert cams.min() >= 0 and np.allclose(cams.reshape(2, -1).max(1), 1.0)
    assert web.overlay(batch[0], cams[0]).shape == (web.DISPLAY, web.DISPLAY, 3)


# --------------------------------------------------------------------------- bad files, limits, the pixel cap
def test_api_gives_each_bad_file_its_own_error(client: TestClient) -> None:
    good = closeup_jpeg(8)
    images = {"good": good, "text": b"just some text", "empty": b"", "truncated": good[: len(good) // 2],
              "tiny": cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes(), "huge": huge_png_header()}
    results = score(client, *({"id": k, "image": b64(v)} for k, v in images.items()),
                    {"id": "nonsense", "image": "%%% not base64"})
    by_id = {r["id"]: r for r in results}
    assert by_id["good"]["error"] is None and by_id["good"]["probability_malignant"] is not None
    expected = {"text": "file_type", "empty": "empty", "truncated": "corrupt", "tiny": "too_small",
                "huge": "too_large", "nonsense": "bad_base64"}
    assert {k: by_id[k]["error"]["reason"] for k in expected} == expected
    assert all(by_id[k]["probability_malignant"] is None and by_id[k]["prediction"] is None for k in expected)
    assert "shorter side" in by_id["tiny"]["error"]["message"]


def test_pixel_cap_refuses_before_decoding(app_bundle: Bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    capped = TestClient(web.create_app(app_bundle, limits=web.Limits(max_pixels=200 * 200)))
    photo = closeup_jpeg(9, size=256)  # 65,536 px > 40,000
    decoded: list[int] = []
    real = web.decode
    monkeypatch.setattr(web, "decode", lambda data, **k: decoded.append(1) or real(data, **k))
    (r,) = score(capped, {"image": b64(photo)})
    assert r["error"]["reason"] == "too_large" and "256x256 = 65,536 pixels; the limit is 40,000" in \
        r["error"]["message"]
    assert decoded == []
    (ok,) = score(capped, {"image": b64(closeup_jpeg(9, size=192))})
    assert ok["error"] is None and decoded == [1]
    m = capped.get("/api/v1/model").json()
    assert m["max_pixels"] == app_bundle.pixel_cap and m["limits"]["max_pixels"] == 40_000  # stored vs enforced
    r = capped.get("/")
    assert "40,000 pixels" in r.text


def test_request_limits_files_and_bytes(app_bundle: Bundle) -> None:
    lim = web.Limits(max_files=2, max_file_bytes=100_000)
    c = TestClient(web.create_app(app_bundle, limits=lim))
    photo = closeup_jpeg(10, size=96)
    r = c.post("/api/v1/score", json={"images": [{"image": b64(photo)}] * 3})
    assert r.status_code == 413 and "limit is 2" in r.json()["detail"]
    r = c.post("/api/v1/score-files", files=[("files", (f"{i}.jpg", photo, "image/jpeg")) for i in range(3)])
    assert r.status_code == 413 and "too many files" in r.json()["detail"]
    big = b"\xff\xd8\xff" + bytes(lim.max_request_bytes)
    r = c.post("/api/v1/score-files", files=[("files", ("big.jpg", big, "image/jpeg"))])
    assert r.status_code == 413 and "larger than the limit" in r.json()["detail"]
    r = c.post("/ui/score", files=[("files", ("big.jpg", big, "image/jpeg"))])
    assert r.status_code == 413 and 'id="request-error"' in r.text and "Research tool" in r.text
    (res,) = c.post("/api/v1/score-files", files=[("files", ("mid.jpg", photo + bytes(100_000), "image/jpeg"))]
                    ).json()["results"]
    assert res["id"] == "mid.jpg" and res["error"]["reason"] == "file_too_big"


# --------------------------------------------------------------------------- metadata on and off
def test_metadata_used_by_a_dual_input_model(client: TestClient) -> None:
    photo = b64(closeup_jpeg(11))
    variants = [{}, {"age_approx": 25, "sex": "female", "site": "back"}, {"age_approx": 80, "sex": "male",
                                                                         "site": "leg"}]
    results = score(client, *({"image": photo, **v} for v in variants), {"image": photo, "site": "scalp",
                                                                         "age_approx": 50, "sex": "male"})
    probs = [r["probability_malignant"] for r in results]
    assert len({round(p, 9) for p in probs[:3]}) == 3, probs  # age/sex/site move the score
    assert results[0]["notes"] == ["age_approx, sex, site not given: encoded as unknown"]
    assert results[1]["notes"] == []
    assert "not in the model's training vocabulary: encoded as 'other'" in results[3]["notes"][0]
    bad = client.post("/api/v1/score", json={"images": [{"image": photo, "sex": "other"}]})
    assert bad.status_code == 422  # the schema names the allowed values


def test_metadata_ignored_by_an_image_only_model(plain_client: TestClient) -> None:
    photo = b64(closeup_jpeg(12))
    results = score(plain_client, {"image": photo}, {"image": photo, "age_approx": 25, "sex": "female",
                                                     "site": "back"})
    assert results[0]["probability_malignant"] == results[1]["probability_malignant"]
    assert results[0]["notes"] == []
    assert results[1]["notes"] == ["this model does not use age, sex or site: age_approx, sex, site ignored"]
    html = plain_client.get("/").text
    assert "This model ignores age, sex and anatomical site" in html
    assert re.search(r'<select name="sex" disabled>', html)
    assert plain_client.get("/api/v1/model").json()["uses_metadata"] is False


# --------------------------------------------------------------------------- wide-field
def test_screen_finds_and_ranks_the_lesions(client: TestClient) -> None:
    photo, truth = widefield_png(3)
    r = client.post("/api/v1/screen", json={"image": b64(photo)})
    assert r.status_code == 200, r.text
    out = r.json()
    lesions = out["lesions"]
    assert len(lesions) >= len(truth["boxes"]) - 1
    assert [les["ud_rank"] for les in lesions] == list(range(1, len(lesions) + 1))  # sorted by rank
    assert all(0 <= les["probability_malignant"] <= 1 for les in lesions)
    ann = cv2.imdecode(np.frombuffer(base64.b64decode(out["annotated_jpeg"]), np.uint8), cv2.IMREAD_COLOR)
    assert ann.shape[:2] == (truth["height"], truth["width"])
    page = client.post("/ui/screen", files=[("files", ("skin.png", photo, "image/png"))])
    assert page.status_code == 200
    assert len(re.findall(r'<tr class="lesion', page.text)) == len(lesions)
    assert 'class="lesion odd-one" data-rank="1"' in page.text and 'id="annotated"' in page.text


def test_screen_refuses_bad_photos(client: TestClient) -> None:
    photo, _ = widefield_png(4)
    r = client.post("/api/v1/screen", json={"image": b64(photo[: len(photo) // 3])})
    assert r.status_code == 422 and r.json()["detail"]["reason"] == "corrupt"
    r = client.post("/api/v1/screen", json={"image": b64(closeup_jpeg(1, size=48))})
    assert r.status_code == 422 and r.json()["detail"]["reason"] == "too_small"
    page = client.post("/ui/screen", files=[("files", ("x.png", b"\x89PNG\r\n\x1a\n broken", "image/png"))])
    assert page.status_code == 422 and "Not screened (unreadable)" in page.text
    page = client.post("/ui/screen", files=[("files", ("a.png", photo, "image/png")),
                                            ("files", ("b.png", photo, "image/png"))])
    assert page.status_code == 400 and "one wide-field photo" in page.text


# --------------------------------------------------------------------------- nothing on disk; keeping on demand
def test_uploads_never_touch_the_disk(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_disk(*a: object, **k: object) -> None:
        raise AssertionError("an upload went to a temporary file")

    for name in ("TemporaryFile", "NamedTemporaryFile", "mkstemp"):
        monkeypatch.setattr(tempfile, name, no_disk)
    noise = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    big = cv2.imencode(".png", noise)[1].tobytes()
    assert len(big) > 2 * 2**20  # over Starlette's default in-memory spool (1 MiB)
    r = client.post("/api/v1/score-files", files=[("files", ("noise.png", big, "image/png"))])
    assert r.status_code == 200 and r.json()["results"][0]["error"] is None


def test_keep_dir_keeps_uploads_and_answers(app_bundle: Bundle, tmp_path: Path) -> None:
    c = TestClient(web.create_app(app_bundle, keep_dir=tmp_path / "kept"))
    photo = closeup_jpeg(13)
    score(c, {"id": "a", "image": b64(photo)})
    files = sorted(p.name for p in (tmp_path / "kept").iterdir())
    assert len(files) == 2 and files[1].endswith(".jpeg") and files[0].endswith("-score.json")
    record = json.loads((tmp_path / "kept" / files[0]).read_text())
    assert record["files"][0]["name"] == "a" and record["result"][0]["probability_malignant"] is not None
    assert "kept in" in c.get("/").text


# --------------------------------------------------------------------------- identity, OpenAPI, CLI entry
def test_registry_identity(app_bundle: Bundle, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tasks import tracking

    monkeypatch.setattr(tracking, "get_alias", lambda name, alias, root=None: "7")
    monkeypatch.setattr(tracking, "version_info", lambda name, v, root=None: {"aliases": ["champion", "nightly"]})
    info = web.describe_model(app_bundle, "models:/lesionflow-classifier@champion", tmp_path)
    assert (info.name, info.version, info.alias, info.aliases) == ("lesionflow-classifier", "7", "champion",
                                                                   ["champion", "nightly"])
    info = web.describe_model(app_bundle, "models:/lesionflow-classifier/3", tmp_path)
    assert (info.version, info.alias) == ("3", None)

    def broken(*a: object, **k: object) -> None:
        raise RuntimeError("no registry here")

    monkeypatch.setattr(tracking, "get_alias", broken)
    info = web.describe_model(app_bundle, "models:/lesionflow-classifier@champion", tmp_path)
    assert (info.name, info.version, info.alias) == ("lesionflow-classifier", None, "champion")


def test_openapi_describes_the_batch_api(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    assert {"/api/v1/score", "/api/v1/score-files", "/api/v1/screen", "/api/v1/model"} <= set(paths)
    assert "/" not in paths and "/ui/score" not in paths
    assert "multipart/form-data" in paths["/api/v1/score-files"]["post"]["requestBody"]["content"]
    assert "not a diagnosis" in spec["info"]["description"]
    assert "ImageIn" in spec["components"]["schemas"]


def test_serve_app_explains_a_missing_model(tmp_path: Path) -> None:
    from tasks.core.errors import InputError

    with pytest.raises(InputError, match="--model models"):
        web.serve_app(tmp_path / "nothing-here", tmp_path)
    with pytest.raises(InputError, match="max_files must be >= 1"):
        web.Limits(max_files=0)


def test_body_limit_refuses_a_chunked_body_while_reading_it() -> None:
    """No Content-Length (chunked upload): the middleware counts and stops reading at the limit."""
    import asyncio

    seen: list[str] = []

    async def app(scope: dict, receive: object, send: object) -> None:
        msg = await receive()
        seen.append(msg["body"].decode())

    def refuse(scope: dict, message: str) -> object:
        async def respond(scope: dict, receive: object, send: object) -> None:
            seen.append(f"413 {message}")
        return respond

    def run(chunks: list[bytes]) -> int:
        queue = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
        reads = []

        async def receive() -> dict:
            reads.append(1)
            return queue.pop(0)

        asyncio.run(web.BodyLimit(app, 10, refuse)({"type": "http", "method": "POST", "headers": [], "path": "/x"},
                                                   receive, None))
        return len(reads)

    assert run([b"abc", b"def"]) == 2 and seen == ["abcdef"]
    assert run([b"abcdef", b"ghijkl", b"never read"]) == 2 and seen[-1].startswith("413 the request is larger")
