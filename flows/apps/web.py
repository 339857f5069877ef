"""`lesionflow app`: a scoring web page and a JSON API over one classifier (FastAPI, server-rendered HTML).

One process holds one model bundle (tasks/models/bundle.py: the same scoring path as evaluate, predict, serve and
screen) and answers:

- `GET /`: the page. Tabs for close-up photos (one or several, optional age/sex/site, per photo the probability
  of malignancy, the decision at the model's operating point and what that point means, a Grad-CAM overlay) and
  for wide-field photos (detected lesions, each scored and ranked by the ugly-duckling score, on the annotated
  photo). Plain HTML with a little inline JavaScript (tabs, a client-side size check): no external asset, no CDN,
  so it works offline; a Content-Security-Policy keeps it that way.
- `POST /api/v1/score` (JSON, base64 images, per-image metadata) and `POST /api/v1/score-files` (multipart) for
  batch scoring, `POST /api/v1/screen` for one wide-field photo, `GET /api/v1/model`, `GET /healthz`.
  FastAPI describes them at `/openapi.json` (and `/docs`, whose Swagger assets come from a CDN).

Limits are checked before any pixel is decoded: request body size (refused while reading it), number of files,
bytes per file, file type (from the file's first bytes, not its name), and the pixel count from the header
(`tasks.core.images.probe_size`); `tasks.core.images.decode` then catches corrupt data. Every photo gets its own
result or its own error. Uploads are held in memory only (multipart parts are never spooled to disk) and
dropped after the answer, unless `keep_dir` is set. A research tool, not a diagnosis: the page says so.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from flows.apps.screen import DetectConfig, annotate, crop_patch, detect_lesions, score_patches
from tasks.core.errors import InputError
from tasks.core.images import DEFAULT_MAX_PIXELS, ImageRejected, decode, probe_size
from tasks.models.bundle import MIN_SIDE, Bundle, Scorer, find_model_files, is_uri, predict_proba
from tasks.tracking import load_bundle  # paths and MLflow URIs alike

log = logging.getLogger(__name__)

DEFAULT_MODEL = "models:/lesionflow-classifier@champion"
TEMPLATES = Path(__file__).resolve().parent / "templates"
API = "/api/v1"
# Formats accepted, sniffed from the first bytes (a file's name and its declared content type prove nothing).
IMAGE_TYPES = {"jpeg": "JPEG", "png": "PNG", "webp": "WebP", "bmp": "BMP", "tiff": "TIFF"}
ACCEPT = "image/jpeg,image/png,image/webp,image/bmp,image/tiff"
NOTICE = ("Research tool, not a diagnosis. The scores come from a machine-learning model that has not been "
          "validated for clinical use; they must not be used to decide on care. See a doctor about any "
          "lesion that worries you.")
SEXES = ("male", "female")
DISPLAY = 256  # px: the side of the model-input and Grad-CAM images on the page


# --------------------------------------------------------------------------- limits and errors
@dataclass(frozen=True)
class Limits:
    """What one request may carry. `max_pixels=None`: the model's stored cap (preprocess.max_pixels)."""

    max_files: int = 16
    max_file_bytes: int = 20 * 1024 * 1024
    max_pixels: int | None = None
    min_side: int = MIN_SIDE  # close-ups: a shorter side under this is too little lesion to score
    widefield_min_side: int = 64
    max_lesions: int = 64  # wide-field: keep the most contrasted candidates beyond this

    def __post_init__(self) -> None:
        for key in ("max_files", "max_file_bytes", "min_side", "widefield_min_side", "max_lesions"):
            if getattr(self, key) < 1:
                raise InputError(f"app limit {key} must be >= 1, got {getattr(self, key)}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise InputError(f"app limit max_pixels must be >= 1 (or unset), got {self.max_pixels}")

    @property
    def max_request_bytes(self) -> int:
        # base64 in JSON grows 4/3; 1 MiB for the form fields and multipart/JSON framing.
        return int(self.max_files * self.max_file_bytes * 4 / 3) + (1 << 20)


class PhotoError(Exception):
    """One photo refused; `reason` is a short code, the message says why and what is allowed."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class RequestProblem(Exception):
    """The whole request refused (HTTP `status`)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def sniff_type(data: bytes) -> str | None:
    """'jpeg', 'png', 'webp', 'bmp', 'tiff' from the signature; None for anything else."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


def check_photo(data: bytes, limits: Limits, max_pixels: int) -> tuple[str, int, int]:
    """(type, width, height) of an upload, or PhotoError: empty, file too big, not an allowed type, header
    unreadable or over the pixel cap. Nothing is decoded here."""
    if not data:
        raise PhotoError("empty", "the file is empty")
    if len(data) > limits.max_file_bytes:
        raise PhotoError("file_too_big", f"the file has {len(data):,} bytes; the limit is "
                                         f"{limits.max_file_bytes:,} bytes ({limits.max_file_bytes / 2**20:g} MiB)")
    kind = sniff_type(data)
    if kind is None:
        raise PhotoError("file_type", f"not a {', '.join(IMAGE_TYPES.values())} image (the file starts with "
                                      f"bytes {data[:8].hex()})")
    size = probe_size(data)
    if size is None:
        raise PhotoError("unreadable", f"a {IMAGE_TYPES[kind]} file whose header gives no image size: damaged?")
    w, h = size
    if w * h > max_pixels:
        raise PhotoError("too_large", f"{w}x{h} = {w * h:,} pixels; the limit is {max_pixels:,} pixels "
                                      "(not decoded)")
    return kind, w, h


def decode_photo(data: bytes, limits: Limits, max_pixels: int, min_side: int) -> np.ndarray:
    """check_photo, then tasks.core.images.decode under the same cap (uint8 RGB); errors as PhotoError."""
    check_photo(data, limits, max_pixels)
    try:
        return decode(data, max_pixels=max_pixels, min_side=min_side)
    except ImageRejected as exc:
        raise PhotoError(exc.reason, str(exc)) from None


# --------------------------------------------------------------------------- the model and what it means
class ModelInfo(BaseModel):
    """What the page and the API say about the model being served (the API's `ModelOut` extends it)."""

    name: str
    version: str | None
    alias: str | None
    aliases: list[str]
    source: str
    threshold: float
    target_sensitivity: float | None
    val_sensitivity: float | None
    val_specificity: float | None
    uses_metadata: bool
    sites: list[str]
    image_size: int
    tta: int
    members: list[str]
    max_pixels: int

    def operating_point_text(self) -> str:
        """What the decision threshold means, in one paragraph."""
        text = f"A photo is flagged when its probability is at least {self.threshold:.3f}, the model's operating point."
        if self.target_sensitivity is not None:
            pct = round(100 * self.target_sensitivity)
            text += (f" That threshold was chosen on the validation split so that {pct}% of malignant lesions "
                     f"score at or above it (target sensitivity {self.target_sensitivity:.2f}")
            if self.val_sensitivity is not None and self.val_specificity is not None:
                text += (f"; measured on validation: sensitivity {self.val_sensitivity:.2f}, specificity "
                         f"{self.val_specificity:.2f}")
            text += (f"). About {100 - pct} in 100 malignant lesions still score below it: 'not flagged' is not "
                     "'benign'.")
        return text


def _registry_identity(ref: str, root: Path) -> tuple[str, str | None, str | None, list[str]]:
    """(name, version, alias, aliases) of a models:/ URI from the project's registry (None where unknown)."""
    m = re.match(r"^models:/([^/@]+)(?:@([^/]+)|/([^/]+))?/?$", ref)
    if not m:
        return ref, None, None, []
    name, alias, version = m.group(1), m.group(2), m.group(3)
    aliases: list[str] = [alias] if alias else []
    try:
        from tasks import tracking  # the only mlflow importer; only for a registry URI

        if alias:
            version = tracking.get_alias(name, alias, root)
        if version and version.isdigit():
            aliases = sorted(set(aliases) | set(tracking.version_info(name, version, root).get("aliases") or []))
    except Exception as exc:  # noqa: BLE001 - the identity is informative; scoring works without it
        log.warning("could not read %s from the model registry: %s", ref, exc)
    return name, version, alias, aliases


def describe_model(bundle: Bundle, ref: str | Path | None = None, root: Path | None = None) -> ModelInfo:
    """ModelInfo from the bundle's config and where it came from: a registry URI gives name, version and alias;
    a local folder or file gives its path and, as version, the first 12 hex of the weights' sha256."""
    ref = str(ref if ref is not None else bundle.source)
    root = Path(root or Path.cwd())
    cfg = bundle.config
    name, version, alias, aliases = ref, None, None, []
    if ref.startswith("models:/"):
        name, version, alias, aliases = _registry_identity(ref, root)
    elif ref.startswith("runs:/"):
        name = ref
    else:
        path = Path(ref)
        found = find_model_files(path) if path.is_dir() else (path, None) if path.suffix == ".keras" else None
        if found and found[0].exists():
            from tasks.core.io import sha256_file

            version = "sha256:" + sha256_file(found[0])[:12]
        name = f"{path.name or path} (local, not registered)"
    val = cfg.get("val_at_threshold") or {}
    spec = cfg.get("metadata") or None
    return ModelInfo(
        name=name, version=version, alias=alias, aliases=aliases, source=ref,
        threshold=float(cfg["threshold"]),
        target_sensitivity=_num(cfg.get("target_sensitivity")),
        val_sensitivity=_num(val.get("sensitivity")), val_specificity=_num(val.get("specificity")),
        uses_metadata=spec is not None, sites=list(spec["sites"]) if spec else [],
        image_size=int(cfg["image_size"]), tta=int(cfg.get("tta", 0)),
        members=[str(m.get("name", m.get("arch", "?"))) for m in cfg.get("members") or []],
        max_pixels=int(bundle.pixel_cap),
    )


def _num(v: Any) -> float | None:
    return None if v is None else float(v)


# --------------------------------------------------------------------------- images for the page
def png_b64(rgb: np.ndarray) -> str:
    import cv2

    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"PNG encoding failed for an image of shape {rgb.shape}")
    return base64.b64encode(buf.tobytes()).decode("ascii")


def jpeg_b64(rgb: np.ndarray, quality: int = 88) -> str:
    import cv2

    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for an image of shape {rgb.shape}")
    return base64.b64encode(buf.tobytes()).decode("ascii")


def upscale(rgb: np.ndarray, side: int = DISPLAY) -> np.ndarray:
    import cv2

    if rgb.shape[0] >= side:
        return rgb
    return cv2.resize(rgb, (side, side), interpolation=cv2.INTER_CUBIC)


def gradcam_maps(bundle: Bundle, images: np.ndarray, metadata: np.ndarray | None) -> np.ndarray:
    """Grad-CAM heatmaps (n, size, size) in [0, 1]: each member's map of its logit w.r.t. its last spatial layer
    (tasks.models.classifier.gradcam), resized to the input and averaged with the stacker's positive weights
    (a member the stacker weighs against malignancy would show benign evidence, so it is left out)."""
    import cv2

    from tasks.models.classifier import IMAGE_INPUT, METADATA_INPUT, gradcam, member_models

    members = member_models(bundle.model)
    coef = list((bundle.config.get("stacker") or {}).get("coef") or [])
    weights = [max(0.0, float(c)) for c in coef] if len(coef) == len(members) else [1.0] * len(members)
    if not any(weights):
        weights = [1.0] * len(members)
    feeds = {IMAGE_INPUT: images.astype(np.float32)}
    if metadata is not None:
        feeds[METADATA_INPUT] = metadata.astype(np.float32)
    size = images.shape[1]
    acc = np.zeros(images.shape[:3], np.float64)
    for member, w in zip(members, weights, strict=True):
        if w == 0:
            continue
        cams = gradcam(member, feeds)
        acc += w * np.stack([cv2.resize(c.astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
                             for c in cams])
    acc = np.clip(acc, 0, None)
    peak = acc.reshape(len(acc), -1).max(axis=1).reshape(-1, 1, 1)
    return acc / np.where(peak > 0, peak, 1.0)


def overlay(rgb: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The heatmap (JET: blue = no influence, red = most) blended onto the image, upscaled for display."""
    import cv2

    big = upscale(rgb)
    heat = cv2.resize(cam.astype(np.float32), big.shape[1::-1], interpolation=cv2.INTER_CUBIC)
    colour = cv2.applyColorMap(np.clip(heat * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    colour = cv2.cvtColor(colour, cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(big, 1 - alpha, colour, alpha, 0)


# --------------------------------------------------------------------------- scoring
def predict_batch(bundle: Bundle, images: np.ndarray, metadata: np.ndarray | None) -> np.ndarray:
    """`Bundle.predict_arrays` (the bundle's predict_proba, its TTA) with batches padded to the next power of two
    up to 64 instead of always to 64: the same probabilities, but one photo costs one image, not 64 (a
    MobileNetV2 at 224 px: tens of ms instead of seconds on 2 cores); at most 7 batch shapes get traced."""
    bs = min(64, 1 << max(0, (len(images) - 1).bit_length()))
    return predict_proba(bundle.model, images, metadata, tta=bundle.tta, batch_size=bs)


@dataclass
class AppScorer(Scorer):
    """The bundle's Scorer (what `lesionflow screen` scores wide-field patches with), predicting like
    predict_batch."""

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        return predict_batch(self.bundle, batch, self._metadata(len(batch)))


@dataclass
class Photo:
    """One uploaded close-up and its optional metadata."""

    name: str
    data: bytes
    age_approx: float | None = None
    sex: str | None = None
    site: str | None = None


@dataclass
class PhotoResult:
    name: str
    probability_malignant: float | None = None
    prediction: int | None = None
    flagged: bool | None = None
    error: dict[str, str] | None = None
    notes: list[str] = field(default_factory=list)
    model_input_png: str | None = None
    gradcam_png: str | None = None

    def public(self, images: bool) -> dict[str, Any]:
        out = asdict(self)
        if not images:
            out.pop("model_input_png")
            out.pop("gradcam_png")
        return out


class Service:
    """The model and everything the routes do with it. Model calls are serialised by a lock (one model,
    TensorFlow on a few cores: concurrent predicts only compete); decoding and preprocessing run outside it."""

    def __init__(self, bundle: Bundle, info: ModelInfo, limits: Limits = Limits(), keep_dir: Path | None = None):
        self.bundle = bundle
        self.info = info
        self.limits = limits
        self.keep_dir = Path(keep_dir) if keep_dir else None
        self.max_pixels = int(limits.max_pixels or bundle.pixel_cap or DEFAULT_MAX_PIXELS)
        self.lock = threading.Lock()
        # Full-resolution pixels are the memory peak (3 bytes x max_pixels per photo): decode a few at a time.
        self.decode_slots = threading.BoundedSemaphore(max(1, min(4, os.cpu_count() or 1)))
        self._scorer: Scorer | None = None

    # ---------------------------------------------------------------- close-ups
    def metadata_notes(self, photo: Photo) -> list[str]:
        given = [k for k in ("age_approx", "sex", "site") if getattr(photo, k) not in (None, "")]
        if not self.info.uses_metadata:
            return [f"this model does not use age, sex or site: {', '.join(given)} ignored"] if given else []
        notes = []
        site = (photo.site or "").strip().lower()
        if site and site not in ("unknown",) and site not in self.info.sites:
            notes.append(f"site {photo.site!r} was not in the model's training vocabulary: encoded as 'other'")
        missing = [k for k in ("age_approx", "sex", "site") if k not in given]
        if missing:
            notes.append(f"{', '.join(missing)} not given: encoded as unknown")
        return notes

    def score(self, photos: Sequence[Photo], *, gradcam: bool = False, images: bool | None = None) -> list[PhotoResult]:
        """Per photo: probability, decision at the operating point, errors; Grad-CAM and the model-input image
        as base64 PNG when `gradcam` (or `images`) is set."""
        if len(photos) > self.limits.max_files:
            raise RequestProblem(413, f"{len(photos)} photos in one request; the limit is {self.limits.max_files}")
        images = gradcam if images is None else images
        results = [PhotoResult(name=p.name) for p in photos]
        ok, inputs = [], []
        for i, photo in enumerate(photos):
            try:
                with self.decode_slots:
                    rgb = decode_photo(photo.data, self.limits, self.max_pixels, self.limits.min_side)
                    inputs.append(self.bundle.preprocess(rgb))
                    del rgb
                ok.append(i)
            except PhotoError as exc:
                results[i].error = {"reason": exc.reason, "message": str(exc)}
            except Exception as exc:  # noqa: BLE001 - one bad photo is a result with an error, not a failed request
                log.warning("photo %r failed in preprocessing: %s", photo.name, exc)
                results[i].error = {"reason": "unprocessable", "message": f"{type(exc).__name__}: {exc}"}
        if ok:
            frame = pd.DataFrame({"age_approx": [photos[i].age_approx for i in ok],
                                  "sex": [photos[i].sex for i in ok],
                                  "anatom_site_1": [photos[i].site for i in ok]})
            meta = self.bundle.metadata(frame)
            batch = np.stack(inputs)
            with self.lock:
                probs = predict_batch(self.bundle, batch, meta)
                cams = gradcam_maps(self.bundle, batch, meta) if gradcam else None
            for k, i in enumerate(ok):
                p = float(probs[k])
                r = results[i]
                r.probability_malignant = p
                r.prediction = int(p >= self.bundle.threshold)
                r.flagged = bool(r.prediction)
                r.notes = self.metadata_notes(photos[i])
                if images:
                    r.model_input_png = png_b64(upscale(batch[k]))
                if cams is not None:
                    r.gradcam_png = png_b64(overlay(batch[k], cams[k]))
        self.keep("score", [(p.name, p.data) for p in photos], [r.public(False) for r in results])
        return results

    # ---------------------------------------------------------------- wide-field
    @property
    def scorer(self) -> Scorer:
        if self._scorer is None:
            self._scorer = AppScorer(self.bundle)  # caches the embedding model across requests
        return self._scorer

    def screen(self, name: str, data: bytes, *, annotated: bool = True) -> dict[str, Any]:
        """Lesions of one wide-field photo: boxes, probability, ud_score and ud_rank (1 = most unlike the
        others), ranked; the annotated photo as base64 JPEG when `annotated`. PhotoError for a bad file."""
        with self.decode_slots:
            rgb = decode_photo(data, self.limits, self.max_pixels, self.limits.widefield_min_side)
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        del rgb
        boxes = detect_lesions(bgr, DetectConfig())
        dropped = max(0, len(boxes) - self.limits.max_lesions)
        if dropped:
            boxes = boxes.sort_values("contrast", ascending=False, kind="stable").head(self.limits.max_lesions)
        boxes = boxes.reset_index(drop=True)
        patches = [crop_patch(bgr, b) for b in boxes[["x", "y", "w", "h"]].to_numpy()]
        with self.lock:  # the same scoring as `lesionflow screen`: probability, embeddings, ugly-duckling rank
            scores = score_patches(patches, self.scorer)
        table = pd.concat([boxes, scores], axis=1)
        table.insert(0, "lesion", np.arange(len(table)))
        threshold = self.bundle.threshold
        lesions = [{"lesion": int(r.lesion), "ud_rank": int(r.ud_rank), "ud_score": float(r.ud_score),
                    "probability_malignant": float(r.probability), "flagged": bool(r.probability >= threshold),
                    "x": int(r.x), "y": int(r.y), "w": int(r.w), "h": int(r.h), "area": int(r.area)}
                   for r in table.sort_values("ud_rank", kind="stable").itertuples(index=False)]
        notes = ["the classifier was trained on dermoscopy close-ups: its probability on a wide-field crop is a "
                 "rough signal; the ugly-duckling rank compares this photo's lesions with each other"]
        if dropped:
            notes.append(f"{dropped} low-contrast candidates beyond the limit of {self.limits.max_lesions} not scored")
        if not lesions:
            notes.append("no lesion found: the detector looks for spots clearly darker than the surrounding skin")
        out: dict[str, Any] = {"name": name, "width": int(bgr.shape[1]), "height": int(bgr.shape[0]),
                               "lesions": lesions, "notes": notes}
        self.keep("screen", [(name, data)], out)
        if annotated:
            import cv2

            ann = cv2.cvtColor(annotate(bgr, table), cv2.COLOR_BGR2RGB)
            scale = 1600 / max(ann.shape[:2])
            if scale < 1:
                ann = cv2.resize(ann, (round(ann.shape[1] * scale), round(ann.shape[0] * scale)),
                                 interpolation=cv2.INTER_AREA)
            out["annotated_jpeg"] = jpeg_b64(ann)
        return out

    # ---------------------------------------------------------------- optional keeping
    def keep(self, kind: str, files: list[tuple[str, bytes]], result: Any) -> None:
        """Only with keep_dir: each upload as <sha256>.<type>, and the answer as <time>-<kind>.json."""
        if self.keep_dir is None:
            return
        from tasks.core.io import write_bytes, write_json

        names = []
        for name, data in files:
            digest = hashlib.sha256(data).hexdigest()
            ext = sniff_type(data) or "bin"
            write_bytes(self.keep_dir / f"{digest}.{ext}", data)
            names.append({"name": name, "sha256": digest})
        stamp = time.strftime("%Y%m%dT%H%M%S") + f"-{time.time_ns() % 10**9:09d}"
        write_json(self.keep_dir / f"{stamp}-{kind}.json", {"files": names, "result": result,
                                                            "model": self.info.model_dump()})


# --------------------------------------------------------------------------- API schemas
class ImageIn(BaseModel):
    """One image for /api/v1/score."""

    id: str | None = Field(None, description="echoed back; default: the position in `images`")
    image: str = Field(..., description="the encoded file (JPEG, PNG, WebP, BMP or TIFF) in base64")
    age_approx: float | None = Field(None, ge=0, le=120, description="age in years")
    sex: Literal["male", "female"] | None = None
    site: str | None = Field(None, description="anatomical site, ISIC vocabulary (e.g. 'back', 'lower extremity')")


class ScoreRequest(BaseModel):
    images: list[ImageIn] = Field(..., min_length=1)
    gradcam: bool = Field(False, description="add a Grad-CAM overlay (base64 PNG) per image; slower")


class ErrorOut(BaseModel):
    reason: str = Field(..., description="empty | file_too_big | file_type | unreadable | too_large | corrupt | "
                                         "too_small | bad_base64 | unprocessable")
    message: str


class ResultOut(BaseModel):
    id: str
    probability_malignant: float | None = None
    prediction: int | None = Field(None, description="1 = at or above the operating point (flagged), 0 = below")
    flagged: bool | None = None
    error: ErrorOut | None = None
    notes: list[str] = []
    model_input_png: str | None = None
    gradcam_png: str | None = None


class ModelOut(ModelInfo):
    max_pixels: int = Field(..., description="the pixel cap stored with the model")
    operating_point: str
    limits: dict[str, int] = Field(..., description="what this server accepts: max_files, max_file_bytes, "
                                                    "max_pixels (enforced), max_request_bytes")


class ScoreResponse(BaseModel):
    model: ModelOut
    notice: str
    results: list[ResultOut]


class ScreenRequest(BaseModel):
    image: str = Field(..., description="one wide-field photo, base64")
    annotated: bool = Field(True, description="return the annotated photo (base64 JPEG)")


class LesionOut(BaseModel):
    lesion: int
    ud_rank: int = Field(..., description="1 = the lesion most unlike the photo's others (the ugly duckling)")
    ud_score: float
    probability_malignant: float
    flagged: bool
    x: int
    y: int
    w: int
    h: int
    area: int


class ScreenResponse(BaseModel):
    model: ModelOut
    notice: str
    name: str
    width: int
    height: int
    lesions: list[LesionOut]
    notes: list[str]
    annotated_jpeg: str | None = None


# --------------------------------------------------------------------------- request body limit
class BodyLimit:
    """ASGI middleware: a POST body over `max_bytes` is refused with 413 while it is read (never buffered past
    the limit); an accepted body is replayed to the app from memory."""

    def __init__(self, app: Any, max_bytes: int, refuse: Any) -> None:
        self.app, self.max_bytes, self.refuse = app, max_bytes, refuse

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        msg = (f"the request is larger than the limit of {self.max_bytes:,} bytes; send fewer or smaller photos")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self.refuse(scope, msg)(scope, receive, send)
            return
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                await self.refuse(scope, msg)(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body"):
                break
        data, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def read_upload(request: Any, limits: Limits) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
    """Files (field `files`) and text fields of a multipart form, all in memory: the parser's spool is made
    larger than the body limit, so no part ever rolls over to a temporary file."""
    from starlette.formparsers import MultiPartException, MultiPartParser

    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise RequestProblem(415, "send the photos as multipart/form-data (an HTML form or curl -F files=@photo.jpg)")
    parser = MultiPartParser(request.headers, request.stream(), max_files=limits.max_files, max_fields=32,
                             max_part_size=64 * 1024)
    parser.spool_max_size = limits.max_request_bytes + 1
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if "Too many files" in str(exc):
            raise RequestProblem(413, f"too many files: the limit is {limits.max_files} per request") from None
        raise RequestProblem(400, f"malformed upload: {exc}") from None
    files, fields = [], {}
    try:
        for key, value in form.multi_items():
            if isinstance(value, str):
                fields[key] = value
            elif key == "files":
                data = await value.read()
                if value.filename or data:  # a form submitted with no file chosen sends one empty part
                    files.append((value.filename or f"photo {len(files) + 1}", data))
    finally:
        await form.close()
    return files, fields


# --------------------------------------------------------------------------- the app
def create_app(bundle: Bundle, info: ModelInfo | None = None, *, limits: Limits = Limits(),
               keep_dir: Path | None = None) -> Any:
    """The FastAPI app over one loaded bundle."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    info = info or describe_model(bundle)
    service = Service(bundle, info, limits, keep_dir)
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]))
    page = env.get_template("app.html")
    model_out = {**info.model_dump(), "operating_point": info.operating_point_text(),
                 "limits": {"max_files": limits.max_files, "max_file_bytes": limits.max_file_bytes,
                            "max_pixels": service.max_pixels, "max_request_bytes": limits.max_request_bytes}}
    csp = ("default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
           "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")

    def render(status: int = 200, **ctx: Any) -> HTMLResponse:
        ctx.setdefault("tab", "photos")
        html = page.render(info=info, model=model_out, notice=NOTICE, limits=limits, max_pixels=service.max_pixels,
                           types=", ".join(IMAGE_TYPES.values()), accept=ACCEPT, keep_dir=keep_dir, api=API,
                           sexes=SEXES, **ctx)
        return HTMLResponse(html, status_code=status, headers={"Content-Security-Policy": csp,
                                                                "Cache-Control": "no-store"})

    def refuse(scope: dict, message: str) -> Response:
        if scope["path"].startswith(API):
            return JSONResponse({"detail": message}, status_code=413)
        tab = "widefield" if scope["path"].endswith("screen") else "photos"
        return render(413, error=message, tab=tab)

    app = FastAPI(
        title="lesionflow app",
        version="1",
        description=(f"Scores skin-lesion photos with one lesionflow classifier. **{NOTICE}**\n\n"
                     "Batch scoring: `POST /api/v1/score` (JSON, base64 images) or `POST /api/v1/score-files` "
                     "(multipart, `files` fields). One wide-field photo: `POST /api/v1/screen`. Every image gets "
                     "its own result or error; a request over the limits is refused whole (413)."),
    )
    app.add_middleware(BodyLimit, max_bytes=limits.max_request_bytes, refuse=refuse)

    @app.exception_handler(RequestProblem)
    async def _problem(request: Request, exc: RequestProblem) -> Response:
        if request.url.path.startswith(API):
            return JSONResponse({"detail": str(exc)}, status_code=exc.status)
        tab = "widefield" if request.url.path.endswith("screen") else "photos"
        return render(exc.status, error=str(exc), tab=tab)

    # ------------------------------------------------------------ page
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return render()

    @app.post("/ui/score", response_class=HTMLResponse, include_in_schema=False)
    async def ui_score(request: Request) -> HTMLResponse:
        files, fields = await read_upload(request, limits)
        if not files:
            raise RequestProblem(400, "choose at least one photo")
        form = _form_metadata(fields)
        photos = [Photo(name, data, **form) for name, data in files]
        results = await run_in_threadpool(service.score, photos, gradcam=fields.get("gradcam") == "on", images=True)
        return render(results=results, form=form, gradcam=fields.get("gradcam") == "on")

    @app.post("/ui/screen", response_class=HTMLResponse, include_in_schema=False)
    async def ui_screen(request: Request) -> HTMLResponse:
        files, _ = await read_upload(request, limits)
        if len(files) != 1:
            raise RequestProblem(400, "choose one wide-field photo")
        name, data = files[0]
        try:
            screened = await run_in_threadpool(service.screen, name, data)
        except PhotoError as exc:
            return render(422, tab="widefield", screen_error={"name": name, "reason": exc.reason,
                                                               "message": str(exc)})
        return render(tab="widefield", screened=screened)

    # ------------------------------------------------------------ API
    @app.get("/healthz", tags=["service"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(f"{API}/model", response_model=ModelOut, tags=["model"])
    def model() -> dict[str, Any]:
        """The model being served: name, version, alias, operating point and what it means, metadata use."""
        return model_out

    @app.post(f"{API}/score", response_model=ScoreResponse, tags=["score"])
    def score(req: ScoreRequest) -> dict[str, Any]:
        """Score a batch of close-up photos (base64). Each result has the probability of malignancy, the
        decision at the operating point (`prediction`) or an `error`; metadata is used only by a model that
        takes it (see `notes`)."""
        photos, bad = [], {}
        for i, item in enumerate(req.images):
            name = item.id if item.id is not None else str(i)
            try:
                data = base64.b64decode(item.image, validate=True)
            except (binascii.Error, ValueError):
                bad[i] = {"reason": "bad_base64", "message": "`image` is not valid base64"}
                data = b""
            photos.append(Photo(name, data, item.age_approx, item.sex, item.site))
        results = [r.public(req.gradcam) for r in service.score(photos, gradcam=req.gradcam)]
        for i, err in bad.items():
            results[i].update(error=err, probability_malignant=None, prediction=None, flagged=None)
        return {"model": model_out, "notice": NOTICE, "results": [{"id": r.pop("name"), **r} for r in results]}

    @app.post(f"{API}/score-files", response_model=ScoreResponse, tags=["score"], openapi_extra={
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["files"],
            "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                           "age_approx": {"type": "number"}, "sex": {"type": "string", "enum": list(SEXES)},
                           "site": {"type": "string"}, "gradcam": {"type": "boolean"}}}}}}})
    async def score_files(request: Request) -> dict[str, Any]:
        """Score uploaded files (multipart `files`, repeated); optional `age_approx`, `sex`, `site` apply to all
        of them. Same answer as /api/v1/score, ids are the file names."""
        files, fields = await read_upload(request, limits)
        if not files:
            raise RequestProblem(400, "no `files` in the form")
        gc = fields.get("gradcam", "").lower() in ("1", "true", "on", "yes")
        photos = [Photo(name, data, **_form_metadata(fields)) for name, data in files]
        results = await run_in_threadpool(service.score, photos, gradcam=gc)
        return {"model": model_out, "notice": NOTICE,
                "results": [{"id": r.name, **r.public(gc)} for r in results]}

    @app.post(f"{API}/screen", response_model=ScreenResponse, tags=["screen"],
              responses={422: {"description": "the photo was refused (type, size, pixels, corrupt)"}})
    def screen(req: ScreenRequest) -> Any:
        """Find the lesions of one wide-field photo, score each and rank them by the ugly-duckling score."""
        try:
            data = base64.b64decode(req.image, validate=True)
        except (binascii.Error, ValueError):
            return JSONResponse({"detail": {"reason": "bad_base64", "message": "`image` is not valid base64"}}, 422)
        try:
            out = service.screen("image", data, annotated=req.annotated)
        except PhotoError as exc:
            return JSONResponse({"detail": {"reason": exc.reason, "message": str(exc)}}, 422)
        return {"model": model_out, "notice": NOTICE, **out}

    app.state.service = service
    return app


def _form_metadata(fields: dict[str, str]) -> dict[str, Any]:
    """age_approx / sex / site from form fields; empty or 'unknown' -> None; a bad age is an InputError."""
    out: dict[str, Any] = {"age_approx": None, "sex": None, "site": None}
    age = (fields.get("age_approx") or "").strip()
    if age:
        try:
            value = float(age)
        except ValueError:
            raise RequestProblem(400, f"age {age!r} is not a number") from None
        if not 0 <= value <= 120:
            raise RequestProblem(400, f"age {value:g} is outside 0-120")
        out["age_approx"] = value
    sex = (fields.get("sex") or "").strip().lower()
    if sex and sex != "unknown":
        if sex not in SEXES:
            raise RequestProblem(400, f"sex must be one of {', '.join(SEXES)} or unknown, not {sex!r}")
        out["sex"] = sex
    site = (fields.get("site") or "").strip()
    out["site"] = site if site and site.lower() != "unknown" else None
    return out


# --------------------------------------------------------------------------- command line
def serve_app(model: str | Path = DEFAULT_MODEL, root: Path | str = ".", *, host: str = "127.0.0.1",
              port: int = 8000, limits: Limits = Limits(), keep_dir: Path | str | None = None) -> int:
    """`lesionflow app`: load the model (a registry URI, a models/ folder or a .keras file), serve the page
    and the API with uvicorn until interrupted."""
    import uvicorn

    root = Path(root).resolve()
    ref = str(model)
    if not is_uri(ref) and not Path(ref).is_absolute() and not Path(ref).exists():
        ref = str(root / ref)
    hint = (f"For a local model use `--model models` (after `lesionflow stage train`); the default "
            f"{DEFAULT_MODEL} needs a champion in {root}/mlruns (`lesionflow demo` or `lesionflow promote`).")
    try:
        bundle = load_bundle(ref, root)
    except FileNotFoundError as exc:
        raise InputError(f"{exc}. {hint}") from None
    except Exception as exc:  # the registry's own errors (MlflowException: no such model or alias)
        if not is_uri(ref):
            raise
        raise InputError(f"{ref}: cannot load it from the model registry ({exc}). {hint}") from None
    info = describe_model(bundle, ref, root)
    app = create_app(bundle, info, limits=limits, keep_dir=Path(keep_dir) if keep_dir else None)
    log.info("serving %s (version %s) on http://%s:%d", info.name, info.version, host, port)
    uvicorn.run(app, host=host, port=port, log_level="info")
    return 0


def main(args: Any) -> int:
    """Entry for flows/cli.py (`lesionflow app`): args.model, root, host, port, max_files, max_file_mb,
    max_pixels, keep."""
    limits = Limits(max_files=args.max_files, max_file_bytes=int(args.max_file_mb * 2**20),
                    max_pixels=args.max_pixels)
    return serve_app(args.model, args.root, host=args.host, port=args.port, limits=limits, keep_dir=args.keep)
