"""Latency of `lesionflow app` (flows/apps/web.py): one photo and a batch of 16, model load excluded and included.

Requests go through the whole FastAPI app in-process (FastAPI's TestClient: routing, JSON/base64 or multipart
parsing, limits, decode, preprocess, predict, JSON answer), without a network hop. For each model:

  load_included   a fresh Python process: import the app, load the model (TensorFlow import, .keras load),
                  build the app, then the first request (TensorFlow traces the model here); one process per
                  batch size, so nothing is warm
  warm            the same process after warm-up: median of --repeats requests
                  score      POST /api/v1/score (JSON, base64)
                  gradcam    the same with the Grad-CAM overlays the page shows
                  page       POST /ui/score (multipart, Grad-CAM on: what a person waits for)
                  screen     POST /api/v1/screen, one 1024x768 wide-field photo (detection + every lesion scored)

Models (`--models`): `small_cnn:64` (the demo profile of params.yaml) and `mobilenet_v2:224` (a transfer
member at ImageNet size), built untrained (latency does not depend on the weight values) and saved like
train does; or any model folder / .keras file / models:/ URI. Photos: synthetic dermoscopy-like JPEGs of
--photo-size (default 1024x768, a typical upload; decode and preprocessing scale with it).

    python benchmarks/app.py --models small_cnn:64 mobilenet_v2:224 --repeats 5
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def photos(n: int, width: int, height: int, seed: int = 0) -> list[bytes]:
    """n synthetic close-ups (tasks/fake/lesions.py), JPEG q90."""
    from tasks.fake.lesions import encode_jpeg, render_image, sample_lesion, sample_patient_style

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        style = sample_patient_style(rng)
        spec = sample_lesion(rng, "malignant" if i % 3 == 0 else "benign", style)
        out.append(encode_jpeg(render_image(spec, style, rng, width, height), 90))
    return out


def widefield(seed: int = 3) -> bytes:
    import cv2

    from tasks.fake.widefield import render_widefield

    img, _ = render_widefield(np.random.default_rng(seed))
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def build_model(spec: str, out: Path) -> Path:
    """`arch:size` -> an untrained one-member ensemble saved as out/classifier.keras + classifier.json."""
    from tasks.core.config import Preprocess
    from tasks.models.classifier import build_ensemble, build_member
    from tasks.models.inputs import CONFIG_FILE, MODEL_FILE
    from tasks.models.saving import save_keras

    arch, size = spec.split(":")
    size = int(size)
    member = build_member(arch, size, weights="none", name="m0")
    model = build_ensemble([member], [1.0], 0.0, image_size=size)
    out.mkdir(parents=True, exist_ok=True)
    save_keras(model, out / MODEL_FILE)
    config = {"format": 1, "image_size": size, "preprocess": Preprocess(size=size).model_dump(mode="json"),
              "metadata": None, "tta": 0, "threshold": 0.5, "target_sensitivity": 0.9,
              "val_at_threshold": {"sensitivity": 0.9, "specificity": 0.5},
              "members": [{"name": "m0", "arch": arch}], "stacker": {"kind": "stack", "coef": [1.0], "intercept": 0.0},
              "classes": ["benign", "malignant"]}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return out


def client_for(model: str) -> tuple[object, dict]:
    from flows.apps import web
    from tasks.tracking import load_bundle  # paths and registry/run URIs alike

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient
    t0 = time.perf_counter()
    bundle = load_bundle(model)
    app = web.create_app(bundle, web.describe_model(bundle, model))
    return TestClient(app), {"load_s": time.perf_counter() - t0}


def score_json(client: object, batch: list[bytes], gradcam: bool = False) -> None:
    body = {"images": [{"image": base64.b64encode(p).decode()} for p in batch], "gradcam": gradcam}
    r = client.post("/api/v1/score", json=body)
    if r.status_code != 200 or any(x["error"] for x in r.json()["results"]):
        raise RuntimeError(f"request failed: {r.status_code} {r.text[:300]}")


def score_page(client: object, batch: list[bytes]) -> None:
    files = [("files", (f"{i}.jpg", p, "image/jpeg")) for i, p in enumerate(batch)]
    r = client.post("/ui/score", files=files, data={"gradcam": "on"})
    if r.status_code != 200 or 'data-ok="false"' in r.text:
        raise RuntimeError(f"page request failed: {r.status_code}")


def screen(client: object, photo: bytes) -> None:
    r = client.post("/api/v1/screen", json={"image": base64.b64encode(photo).decode(), "annotated": True})
    if r.status_code != 200:
        raise RuntimeError(f"screen failed: {r.status_code} {r.text[:300]}")


def median_ms(fn: object, repeats: int) -> float:
    fn()  # warm-up: tracing, first-call allocations
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(1000 * statistics.median(times), 1)


def cold(model: str, batch_size: int, width: int, height: int) -> dict:
    """In this (fresh) process: import + load + app + first request."""
    batch = photos(batch_size, width, height)
    t0 = time.perf_counter()
    from flows.apps import web  # noqa: F401 - the import is part of what is measured

    t_import = time.perf_counter() - t0
    client, info = client_for(model)
    t1 = time.perf_counter()
    score_json(client, batch)
    first = time.perf_counter() - t1
    return {"import_s": round(t_import, 2), "load_s": round(info["load_s"], 2), "first_request_s": round(first, 2),
            "total_s": round(time.perf_counter() - t0, 2)}


def warm(model: str, repeats: int, width: int, height: int) -> dict:
    client, _ = client_for(model)
    batch = photos(16, width, height)
    wide = widefield()
    return {
        "score_1_ms": median_ms(lambda: score_json(client, batch[:1]), repeats),
        "score_16_ms": median_ms(lambda: score_json(client, batch), repeats),
        "gradcam_1_ms": median_ms(lambda: score_json(client, batch[:1], True), repeats),
        "gradcam_16_ms": median_ms(lambda: score_json(client, batch, True), repeats),
        "page_1_ms": median_ms(lambda: score_page(client, batch[:1]), repeats),
        "page_16_ms": median_ms(lambda: score_page(client, batch), repeats),
        "screen_1024x768_ms": median_ms(lambda: screen(client, wide), repeats),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["small_cnn:64", "mobilenet_v2:224"],
                    help="arch:size (built untrained) or a model folder / .keras file / URI")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--photo-size", default="1024x768", help="WxH of the synthetic close-ups")
    ap.add_argument("--cold", help=argparse.SUPPRESS)  # internal: one cold measurement in this process
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    width, height = (int(v) for v in args.photo_size.lower().split("x"))
    if args.cold:
        print(json.dumps(cold(args.cold, args.batch, width, height)))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="lf-app-bench-") as tmp:
        for spec in args.models:
            model = spec
            if ":" in spec and not spec.startswith(("models:/", "runs:/")):
                model = str(build_model(spec, Path(tmp) / spec.replace(":", "_")))
            row: dict = {"model": spec}
            for n in (1, 16):
                out = subprocess.run([sys.executable, __file__, "--cold", model, "--batch", str(n), "--photo-size",
                                      args.photo_size], capture_output=True, text=True, check=True)
                row[f"load_included_{n}"] = json.loads(out.stdout.strip().splitlines()[-1])
            row["warm"] = warm(model, args.repeats, width, height)
            rows.append(row)
    load = [round(v, 1) for v in os.getloadavg()]  # other work on the machine inflates every number
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                      "load_average_1_5_15min": load, "photo_size": args.photo_size, "repeats": args.repeats,
                      "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
