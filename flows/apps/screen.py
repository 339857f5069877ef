"""Wide-field screening: find pigmented lesions in a photo of skin, score each, rank the ugly duckling.

Detection is classic CV at a working scale (longest side `work_side` px): the skin background is estimated
by a grey closing of the LAB lightness with a kernel larger than any lesion (dark blobs vanish, skin stays),
so `darkness = background - L` is independent of skin tone and slow shading. The threshold is the larger
of Otsu's and a robust noise floor (median + k * MAD of the darkness map), then open/close morphology and
connected components filtered by area, fill ratio and aspect (hairs, follicles and specks go). Each
candidate is cropped as a square patch (`context` x its box) and scored by the model bundle (probability,
tasks/models/bundle.py: the one scoring path) and the ugly-duckling rank among the photo's lesions
(tasks/core/outliers.py). Not a diagnosis.

Photos are decoded under a pixel cap (the model's stored preprocess.max_pixels, or `--max-pixels`): an
unreadable or oversized photo is an error entry in the summary, the other photos are still screened.
Test photos come from tasks/fake/widefield.py (`synth_widefield`, re-exported here for the CLI).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.core.errors import InputError, RunError
from tasks.core.io import write_bytes, write_table
from tasks.core.outliers import ud_scores
from tasks.fake.widefield import load_truth, render_widefield, synth_widefield
from tasks.models.bundle import DEFAULT_MAX_PIXELS, Bundle, Scorer, decode_limited, is_uri
from tasks.tracking import load_bundle  # paths and MLflow URIs alike

__all__ = ["load_truth", "render_widefield", "synth_widefield"]  # the synthetic photos' home: tasks.fake.widefield

log = logging.getLogger(__name__)

CSV_COLUMNS = ["lesion", "x", "y", "w", "h", "area", "probability", "ud_score", "ud_rank"]


@dataclass(frozen=True)
class DetectConfig:
    """Knobs of the candidate detector (fractions are of the working image's shorter side)."""

    work_side: int = 768  # detection runs at this longest side; boxes are mapped back to full resolution
    background_frac: float = 0.15  # closing kernel: must exceed the largest lesion diameter
    noise_k: float = 6.0  # threshold >= median + k * 1.4826 * MAD of the darkness map
    min_contrast: float = 8.0  # and never below this many L units (0..255) darker than the skin
    min_diameter_frac: float = 0.02  # smaller blobs are follicles/specks
    max_diameter_frac: float = 0.25
    min_fill: float = 0.35  # blob area / box area; thin hair strands fill little of their box
    max_aspect: float = 3.0


# --------------------------------------------------------------------------- detection (pure)
def darkness_map(bgr: np.ndarray, background_px: int) -> np.ndarray:
    """How much darker than the local skin each pixel is (float32, L units, >= 0)."""
    import cv2

    lab = cv2.cvtColor(bgr, cv2.COLOR_BGR2LAB)
    light = cv2.GaussianBlur(lab[..., 0], (0, 0), 1.0)
    k = max(3, int(background_px) | 1)
    # Rect kernels are separable in OpenCV (fast at any size); closing removes dark blobs narrower than k.
    bg = cv2.morphologyEx(light, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_RECT, (k, k)))
    bg = cv2.blur(bg, (k, k))  # the closing is blocky; smooth it, skin shading is low-frequency anyway
    return np.clip(bg.astype(np.float32) - light.astype(np.float32), 0, None)


def threshold_darkness(dark: np.ndarray, cfg: DetectConfig = DetectConfig()) -> float:
    """max(Otsu, median + k * MAD, min_contrast): Otsu alone splits skin noise when lesions cover little area."""
    import cv2

    u8 = np.clip(dark, 0, 255).astype(np.uint8)
    otsu, _ = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    med = float(np.median(dark))
    mad = float(np.median(np.abs(dark - med))) * 1.4826
    return float(max(otsu, med + cfg.noise_k * mad, cfg.min_contrast))


def detect_lesions(bgr: np.ndarray, cfg: DetectConfig = DetectConfig()) -> pd.DataFrame:
    """Candidate lesion boxes (x, y, w, h, area in full-resolution px, contrast) in a BGR uint8 photo."""
    import cv2

    if bgr is None or bgr.ndim != 3 or bgr.shape[2] != 3:
        raise ValueError("expected a BGR colour image (h, w, 3)")
    h0, w0 = bgr.shape[:2]
    scale = min(1.0, cfg.work_side / max(h0, w0))
    img = cv2.resize(bgr, (round(w0 * scale), round(h0 * scale)), interpolation=cv2.INTER_AREA) if scale < 1 else bgr
    side = min(img.shape[:2])
    dark = darkness_map(img, round(cfg.background_frac * side))
    thr = threshold_darkness(dark, cfg)
    mask = (dark > thr).astype(np.uint8)
    k = max(3, round(0.006 * side) | 1)
    ell = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, ell)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, ell)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    rows = []
    dmin, dmax = cfg.min_diameter_frac * side, cfg.max_diameter_frac * side
    for i in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[i])
        diameter = 2 * math.sqrt(area / math.pi)
        aspect = max(w, h) / max(1, min(w, h))
        if not dmin <= diameter <= dmax or area / (w * h) < cfg.min_fill or aspect > cfg.max_aspect:
            continue
        contrast = float(dark[labels == i].mean())
        rows.append({"x": round(x / scale), "y": round(y / scale), "w": round(w / scale), "h": round(h / scale),
                     "area": round(area / scale**2), "contrast": round(contrast, 2)})
    return pd.DataFrame(rows, columns=["x", "y", "w", "h", "area", "contrast"])


def crop_patch(bgr: np.ndarray, box: Sequence[int], context: float = 2.2) -> np.ndarray:
    """Square RGB patch centred on the box, `context` x its longer side (reflect-padded at image edges), so
    the lesion fills the patch about as much as in a dermoscopy close-up."""
    import cv2

    x, y, w, h = (int(v) for v in box)
    side = max(8, int(round(max(w, h) * context)))
    cx, cy = x + w / 2, y + h / 2
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    pad = max(0, -x0, -y0, x0 + side - bgr.shape[1], y0 + side - bgr.shape[0])
    src = cv2.copyMakeBorder(bgr, pad, pad, pad, pad, cv2.BORDER_REFLECT) if pad else bgr
    patch = src[y0 + pad:y0 + pad + side, x0 + pad:x0 + pad + side]
    return cv2.cvtColor(patch, cv2.COLOR_BGR2RGB)


def patch_features(rgb: np.ndarray) -> np.ndarray:
    """Hand-made appearance vector of a patch (no model): lesion-pixel LAB mean/std, darkness, size and
    border roughness. Used when no classifier is given, and as a transparent baseline."""
    import cv2

    small = cv2.resize(rgb, (64, 64), interpolation=cv2.INTER_AREA)
    lab = cv2.cvtColor(small, cv2.COLOR_RGB2LAB).astype(np.float32)
    light = lab[..., 0]
    thr = 0.5 * (np.median(light[:6]) + light.min()) if light.size else 0
    mask = light < thr
    if mask.sum() < 4:
        mask = light <= np.percentile(light, 20)
    px = lab[mask]
    cnts, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    c = max(cnts, key=cv2.contourArea) if cnts else None
    area = float(mask.mean())
    rough = 0.0
    if c is not None and cv2.contourArea(c) > 0:
        hull = cv2.convexHull(c)
        rough = 1 - cv2.contourArea(c) / max(cv2.contourArea(hull), 1e-6)
    feats = [*px.mean(0) / 25, *px.std(0) / 10, (np.median(light) - px[:, 0].mean()) / 25, 3 * area, 5 * rough]
    return np.asarray(feats, np.float64)


# --------------------------------------------------------------------------- scoring
def score_patches(patches: list[np.ndarray], model: Any = None,
                  embed: Callable[[list[np.ndarray]], np.ndarray] | None = None) -> pd.DataFrame:
    """probability (NaN without a model), ud_score, ud_rank per patch. Embeddings: `embed(patches)` if given,
    else the classifier's penultimate layer, else `patch_features`."""
    prob = np.full(len(patches), np.nan)
    emb = None
    if model is not None and patches:
        scorer = model if isinstance(model, Scorer) else Scorer(model)
        batch = scorer.prepare(patches)
        prob = scorer.probabilities(batch)
        if embed is None:
            emb = scorer.embeddings(batch)
    norm = "l2"
    if emb is None and embed is not None:
        emb = np.asarray(embed(patches))
    elif emb is None:
        emb = np.stack([patch_features(p) for p in patches]) if patches else np.zeros((0, 1))
        norm = "zscore"
    s, r = ud_scores(emb, norm)
    return pd.DataFrame({"probability": prob, "ud_score": s, "ud_rank": r})


def annotate(bgr: np.ndarray, table: pd.DataFrame) -> np.ndarray:
    """Boxes coloured green (low suspicion) -> red (high) with the ud_rank beside each; suspicion =
    probability when there is one, else the ud rank."""
    import cv2

    out = bgr.copy()
    n = len(table)
    th = max(1, round(min(out.shape[:2]) / 400))
    for row in table.itertuples(index=False):
        p = row.probability
        s = float(p) if np.isfinite(p) else (1.0 - (row.ud_rank - 1) / max(1, n - 1))
        colour = (0, int(round(255 * (1 - s))), int(round(255 * s)))  # BGR: green -> red
        cv2.rectangle(out, (int(row.x), int(row.y)), (int(row.x + row.w), int(row.y + row.h)), colour, th + 1)
        label = f"#{int(row.ud_rank)}" + (f" {p:.2f}" if np.isfinite(p) else "")
        org = (int(row.x), max(12, int(row.y) - 4))
        cv2.putText(out, label, org, cv2.FONT_HERSHEY_SIMPLEX, 0.45 * th, (0, 0, 0), th + 2, cv2.LINE_AA)
        cv2.putText(out, label, org, cv2.FONT_HERSHEY_SIMPLEX, 0.45 * th, (255, 255, 255), th, cv2.LINE_AA)
    return out


def read_photo(image_path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A photo as BGR uint8, decoded under the pixel cap; InputError naming the file otherwise."""
    import cv2

    try:
        rgb = decode_limited(image_path.read_bytes(), max_pixels, min_side=1)
    except OSError as exc:
        raise InputError(f"{image_path}: cannot read the file ({exc})") from None
    except ValueError as exc:  # ImageRejected / InputError: unreadable, corrupt, too large
        raise InputError(f"{image_path}: not a usable image ({exc})") from None
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)


def screen(image_path: str | Path, out_dir: str | Path, model: Any = None, *, cfg: DetectConfig = DetectConfig(),
           context: float = 2.2, embed: Callable[[list[np.ndarray]], np.ndarray] | None = None,
           root: Path | None = None, max_pixels: int | None = None) -> pd.DataFrame:
    """Detect, crop, score and rank the lesions of one wide-field photo; writes <stem>_screen.png/.csv in
    out_dir. `model`: a Bundle, a Scorer, a model path/URI, or None (no probability; ranks from hand-made patch
    features). `max_pixels`: the decode cap (default: the model's stored cap, else DEFAULT_MAX_PIXELS)."""
    import cv2

    image_path = Path(image_path)
    if isinstance(model, (str, Path)):
        model = load_bundle(model, root)
    bundle = model.bundle if isinstance(model, Scorer) else model
    cap = max_pixels or (bundle.pixel_cap if isinstance(bundle, Bundle) else DEFAULT_MAX_PIXELS)
    bgr = read_photo(image_path, cap)
    boxes = detect_lesions(bgr, cfg)
    patches = [crop_patch(bgr, b, context) for b in boxes[["x", "y", "w", "h"]].to_numpy()]
    scores = score_patches(patches, model, embed)
    table = pd.concat([boxes.reset_index(drop=True), scores], axis=1)
    table.insert(0, "lesion", np.arange(len(table)))
    table = table[CSV_COLUMNS + ["contrast"]]
    out_dir = Path(out_dir)
    write_table(table, out_dir / f"{image_path.stem}_screen.csv")
    ok, png = cv2.imencode(".png", annotate(bgr, table))
    if not ok:
        raise RunError("cv2.imencode failed to encode the annotated PNG")
    write_bytes(out_dir / f"{image_path.stem}_screen.png", png.tobytes())
    return table


def screen_files(images: Sequence[str | Path], out_dir: str | Path, model: str | Path | None = "models",
                 root: Path | None = None, max_pixels: int | None = None) -> dict[str, Any]:
    """The `lesionflow screen` command: screen each photo; model 'none' (or the default models/ folder when
    absent) = no classifier. Where a synth-widefield truth JSON sits beside a photo, recall and the odd
    lesion's rank are reported too. A photo that cannot be read (or is over the pixel cap) gets an `error`
    entry and the others are still screened."""
    bundle = None
    note = None
    if model is not None and str(model).lower() != "none":
        default = str(model) == "models" and not is_uri(model) and not Path(root or ".", "models").exists()
        if default:
            note = "no models/ folder: probability left empty, ranks from hand-made patch features"
        else:
            bundle = load_bundle(Path(root or ".", model) if not is_uri(model) else model, root)
    if bundle is not None and max_pixels:
        bundle.max_pixels = max_pixels
    per_image = []
    for img in images:
        try:
            table = screen(img, out_dir, bundle, max_pixels=max_pixels)
        except InputError as exc:
            log.warning("screen: %s", exc)
            per_image.append({"image": str(img), "lesions": None, "most_odd": None, "error": str(exc)})
            continue
        row: dict[str, Any] = {"image": str(img), "lesions": len(table),
                               "most_odd": None if table.empty else int(table.loc[table["ud_rank"].idxmin(), "lesion"])}
        if Path(img).with_suffix(".json").exists():
            row.update(evaluate_screen(load_truth(img), table))
        per_image.append(row)
    out: dict[str, Any] = {"images": len(per_image), "out": str(out_dir),
                           "errors": sum(1 for r in per_image if r.get("error")),
                           "model": getattr(bundle, "source", None), "per_image": per_image}
    if note:
        out["note"] = note
    scored = [r for r in per_image if "recall" in r]
    if scored:
        out["recall"] = round(float(np.mean([r["recall"] for r in scored])), 4)
        out["odd_top1_rate"] = round(float(np.mean([r["odd_rank"] == 1 for r in scored])), 4)
    return out


# --------------------------------------------------------------------------- evaluation (pure)
def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x, y, w, h) boxes."""
    ax1, ay1, bx1, by1 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw, ih = max(0.0, min(ax1, bx1) - max(a[0], b[0])), max(0.0, min(ay1, by1) - max(a[1], b[1]))
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def match_boxes(truth: Sequence[Sequence[float]], found: Sequence[Sequence[float]],
                min_iou: float = 0.3) -> list[int | None]:
    """For each true box, the index of the best unused detected box with IoU >= min_iou (greedy), or None."""
    pairs = sorted(((iou(t, f), i, j) for i, t in enumerate(truth) for j, f in enumerate(found)), reverse=True)
    match: list[int | None] = [None] * len(truth)
    used: set[int] = set()
    for v, i, j in pairs:
        if v < min_iou:
            break
        if match[i] is None and j not in used:
            match[i] = j
            used.add(j)
    return match


def evaluate_screen(truth: dict[str, Any], table: pd.DataFrame, min_iou: float = 0.3) -> dict[str, Any]:
    """Recall, precision and whether the planted odd lesion was found and ranked first, for one photo."""
    found = table[["x", "y", "w", "h"]].to_numpy(float).tolist()
    match = match_boxes(truth["boxes"], found, min_iou)
    hit = sum(m is not None for m in match)
    m_odd = match[truth["odd_index"]]
    return {"true": len(truth["boxes"]), "detected": len(found), "matched": hit,
            "recall": hit / max(1, len(truth["boxes"])), "precision": hit / max(1, len(found)),
            "odd_found": m_odd is not None,
            "odd_rank": None if m_odd is None else int(table["ud_rank"].iloc[m_odd])}
