"""Synthetic wide-field photos: a patient's skin with several benign lesions and one malignant (the odd one).

Rendered with the close-up lesion model of tasks/fake/lesions.py; `synth_widefield` writes widefield_XXX.png with
a JSON of the true boxes, labels and odd index beside each image (`load_truth` reads it back). They test the
wide-field screening app (flows/apps/screen.py) and back `lesionflow synth-widefield`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from tasks.core.errors import InputError, RunError
from tasks.core.io import write_bytes, write_json


def _true_box(before: np.ndarray, after: np.ndarray, tol: float = 0.03) -> list[int] | None:
    changed = np.abs(after - before).max(axis=2) > tol
    ys, xs = np.nonzero(changed)
    if not len(xs):
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def render_widefield(rng: np.random.Generator, width: int = 1024, height: int = 768,
                     n_lesions: tuple[int, int] = (4, 8)) -> tuple[np.ndarray, dict[str, Any]]:
    """One photo (uint8 BGR): a patient's skin with benign lesions around a shared signature nevus and one
    malignant lesion (the odd one), non-overlapping; plus its truth (boxes x, y, w, h; odd index; labels)."""
    from tasks.fake.lesions import paint_lesion, sample_lesion, sample_patient_style, skin_background

    style = sample_patient_style(rng)
    style = type(style)(skin_tone=min(style.skin_tone, 0.6), nevus_brown=style.nevus_brown,
                        nevus_size=style.nevus_size)  # darkest skins hide light nevi from any detector
    img = skin_background(rng, height, width, style.skin_tone)
    k = int(rng.integers(n_lesions[0], n_lesions[1] + 1))
    odd = int(rng.integers(0, k))
    s = min(width, height)
    scale = s * rng.uniform(0.12, 0.16)  # lesion radius ~2-7 % of the short side: a wide-field view
    placed: list[tuple[float, float, float]] = []
    boxes, labels = [], []
    for i in range(k):
        spec = sample_lesion(rng, "malignant" if i == odd else "benign", style)
        reach = 1.9 * spec.radius * scale * (1 + spec.asymmetry) * spec.elongation
        for _ in range(200):  # rejection sampling: lesions never touch (a detector cannot split merged blobs)
            cx, cy = rng.uniform(reach + 4, width - reach - 4), rng.uniform(reach + 4, height - reach - 4)
            if all(math.hypot(cx - px, cy - py) > reach + pr + 8 for px, py, pr in placed):
                break
        else:
            raise RunError("could not place lesions without overlap; use a larger canvas or fewer lesions")
        before = img.copy()
        paint_lesion(img, spec, cx, cy, scale, angle=float(rng.uniform(0, 2 * math.pi)))
        box = _true_box(before, img)
        placed.append((cx, cy, reach))
        boxes.append(box)
        labels.append("malignant" if i == odd else "benign")
    out = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    return out, {"width": width, "height": height, "boxes": boxes, "odd_index": odd, "labels": labels,
                 "skin_tone": round(style.skin_tone, 3)}


def synth_widefield(out_dir: str | Path, n: int, seed: int = 0, width: int = 1024, height: int = 768) -> list[Path]:
    """Write n synthetic wide-field photos (widefield_XXX.png) each with a JSON of true boxes and odd index."""
    import cv2

    if n < 1:
        raise InputError("n must be >= 1")
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        img, truth = render_widefield(rng, width, height)
        path = out_dir / f"widefield_{i:03d}.png"
        ok, png = cv2.imencode(".png", img)
        if not ok:
            raise RunError("cv2.imencode failed")
        write_bytes(path, png.tobytes())
        write_json(path.with_suffix(".json"), {**truth, "image": path.name, "seed": seed, "index": i})
        files.append(path)
    return files


def load_truth(image_path: str | Path) -> dict[str, Any]:
    """The JSON synth_widefield wrote beside an image."""
    p = Path(image_path).with_suffix(".json")
    if not p.exists():
        raise InputError(f"{p}: no truth file (made by `lesionflow synth-widefield`)")
    return json.loads(p.read_text())
