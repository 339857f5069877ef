"""Synthetic dermoscopy-like lesions written as an ISIC-style folder (images + metadata.csv), with planted trouble.

The look of a lesion follows the ABCD rule from a latent "atypia" score whose distribution depends on the
label (benign low, malignant high, overlapping), so a classifier can learn it but not perfectly. Planted
trouble (duplicates, near duplicates, corrupt files, missing and conflicting labels) is listed in
`planted.csv` so dedupe/clean tests can check themselves. Everything is a function of the seed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from tasks.core.io import write_bytes, write_table, write_text

GENERATOR_VERSION = 1
ID_BASE = 8_000_000  # synthetic ids ISIC_8000000..: real archive ids are far below; the API fixtures use 9000000+
MAX_N = 1_000_000  # keeps every id inside ISIC_8xxxxxx
MIN_SIZE = 32
MIN_N_FOR_TROUBLE = 40  # below this the fixed fractions round to nothing useful (and would dominate the set)

# Planted trouble as a share of n (each at least 1 when n >= MIN_N_FOR_TROUBLE). Copies and corrupt files
# are extra files counted INSIDE n; unlabeled/indeterminate relabel original images.
TROUBLE_FRACTIONS: dict[str, float] = {
    "exact_dup": 0.02,
    "near_dup_resized": 0.02,
    "near_dup_reencoded": 0.02,
    "near_dup_recoloured": 0.02,
    "near_dup_cropped": 0.02,
    "conflicting_label": 0.01,
    "corrupt_truncated": 0.01,
    "corrupt_garbage": 0.01,
    "unlabeled": 0.02,
    "indeterminate": 0.02,
}
PLANTED_KINDS = tuple(TROUBLE_FRACTIONS)
COPY_KINDS = ("exact_dup", "near_dup_resized", "near_dup_reencoded", "near_dup_recoloured", "near_dup_cropped",
              "conflicting_label")
NEAR_TRANSFORMS = ("resized", "reencoded", "recoloured", "cropped")
CORRUPT_KINDS = ("corrupt_truncated", "corrupt_garbage")
RELABEL_KINDS = ("unlabeled", "indeterminate")

# isic-cli writes these three first, then the sorted union of acquisition + clinical keys.
LEAD_COLUMNS = ["isic_id", "attribution", "copyright_license"]
META_COLUMNS = sorted([
    "pixels_x", "pixels_y", "image_type", "dermoscopic_type", "image_manipulation",  # acquisition
    "age_approx", "sex", "anatom_site_1", "anatom_site_2", "diagnosis_1", "diagnosis_2", "diagnosis_3",
    "diagnosis_confirm_type", "patient_id", "lesion_id",  # clinical
])
COLUMNS = LEAD_COLUMNS + META_COLUMNS
PLANTED_COLUMNS = ["isic_id", "kind", "of_isic_id", "detail"]

# Licences are per cohort in the archive; a re-upload by another cohort carries another licence.
COHORTS = (
    ("lesionflow Synthetic Cohort A (generated images of no real patient)", "CC-0"),
    ("lesionflow Synthetic Cohort B (generated images of no real patient)", "CC-BY"),
    ("lesionflow Synthetic Cohort C (generated images of no real patient)", "CC-BY-NC"),
)
COHORT_WEIGHTS = (0.3, 0.3, 0.4)
LICENSE_URLS = {
    "CC-0": ("CC0 1.0 Universal (public domain dedication)",
             "https://creativecommons.org/publicdomain/zero/1.0/legalcode"),
    "CC-BY": ("Creative Commons Attribution 4.0 International",
              "https://creativecommons.org/licenses/by/4.0/legalcode"),
    "CC-BY-NC": ("Creative Commons Attribution-NonCommercial 4.0 International",
                 "https://creativecommons.org/licenses/by-nc/4.0/legalcode"),
}

# Diagnosis hierarchy names from isic-metadata diagnosis_hierarchical.py (REFERENCE.md section 9).
MALIGNANT_DX = (
    ("Malignant melanocytic proliferations (Melanoma)", "Melanoma Invasive", 0.55),
    ("Malignant melanocytic proliferations (Melanoma)", "Melanoma in situ", 0.40),
    ("Malignant melanocytic proliferations (Melanoma)", "Melanoma, NOS", 0.05),
)
BENIGN_DX = (
    ("Benign melanocytic proliferations", "Nevus", 0.80),
    ("Benign epidermal proliferations", "Seborrheic keratosis", 0.12),
    ("Benign epidermal proliferations", "Solar lentigo", 0.08),
)
INDETERMINATE_DX = (
    ("Indeterminate melanocytic proliferations", "Atypical melanocytic neoplasm", 0.6),
    ("Indeterminate melanocytic proliferations", "Atypical intraepithelial melanocytic proliferation", 0.4),
)
CONFIRM_BENIGN = (("histopathology", 0.4), ("serial imaging showing no change", 0.3),
                  ("single image expert consensus", 0.3))
# anatom_site_1 -> level-2 names (isic-metadata anatom_site_hierarchical.py).
SITES = {
    "Head and neck": ("Head", "Neck"),
    "Trunk": ("Anterior trunk", "Lateral trunk", "Posterior trunk"),
    "Upper extremity": ("Shoulder", "Upper arm", "Forearm", "Hand"),
    "Lower extremity": ("Thigh", "Lower leg", "Foot"),
    "Anogenital region": ("Perianal region", "Genital region"),
}
SITE_WEIGHTS = (0.12, 0.48, 0.17, 0.21, 0.02)

# Colours, BGR in 0..1. Skin anchors from very light to dark; pigments for ABCD colour variegation.
SKIN_ANCHORS = np.array([[0.71, 0.77, 0.93], [0.55, 0.67, 0.87], [0.39, 0.53, 0.75], [0.22, 0.31, 0.48]],
                        np.float32)
LIGHT_BROWN = (0.26, 0.42, 0.66)
MID_BROWN = (0.16, 0.27, 0.47)
DARK_BROWN = (0.09, 0.15, 0.27)
BLACK = (0.09, 0.09, 0.12)
BLUE_GREY = (0.56, 0.48, 0.43)
RED = (0.30, 0.30, 0.72)
ATYPICAL_EXTRAS = (BLACK, BLUE_GREY, RED)
JPEG_QUALITY = (88, 95)  # originals; re-encoded near duplicates use 55..78


# --------------------------------------------------------------------------- lesion model
@dataclass(frozen=True)
class PatientStyle:
    """What a patient's lesions share: skin tone and a 'signature nevus' (colour, size) they vary around."""

    skin_tone: float  # 0 very light .. 1 dark
    nevus_brown: float  # 0 light brown .. 1 mid brown
    nevus_size: float  # typical benign radius as a fraction of the image side


@dataclass(frozen=True)
class LesionSpec:
    """Appearance parameters of one lesion; photos of the same lesion share it (and its structure seed)."""

    atypia: float  # latent 0..1 driving A, B, C, D together
    radius: float  # mean radius as a fraction of the shorter image side (D)
    elongation: float  # axis ratio (benign: oval)
    asymmetry: float  # amplitude of low-order shape harmonics + off-centre colour blobs (A)
    irregularity: float  # amplitude of high-order border harmonics (B)
    softness: float  # border width as a fraction of the radius (B: blurred edge)
    softness_var: float  # how unevenly the border is blurred around the lesion
    colours: tuple[tuple[float, float, float], ...]  # base first, 1..5 of them (C)
    centre_dark: float  # benign concentric profile: >0 darker centre, <0 lighter centre
    network: float  # pigment network strength
    dots: int  # dots/globules
    opacity: float
    structure_seed: int


def sample_patient_style(rng: np.random.Generator) -> PatientStyle:
    """A patient: mostly light skin (as in the ISIC archive), signature nevus colour and size."""
    return PatientStyle(skin_tone=float(rng.beta(1.4, 3.5)), nevus_brown=float(rng.uniform(0, 1)),
                        nevus_size=float(rng.uniform(0.17, 0.28)))


def sample_lesion(rng: np.random.Generator, label: str, style: PatientStyle) -> LesionSpec:
    """Lesion parameters for a label ('benign', 'malignant', 'indeterminate'); classes overlap on purpose."""
    if label == "malignant":
        a = rng.beta(5.5, 1.7)
    elif label == "benign":
        a = rng.beta(1.4, 5.5)
    elif label == "indeterminate":
        a = rng.beta(3.5, 3.5)
    else:
        raise ValueError(f"label must be benign, malignant or indeterminate, not {label!r}")
    a = float(a)
    # D: benign lesions vary around the patient's signature size; atypical ones grow.
    radius = style.nevus_size * math.exp(rng.normal(0, 0.15)) * (0.8 + 0.9 * a)
    radius = float(np.clip(radius, 0.10, 0.42))
    elongation = float(1.0 + abs(rng.normal(0, 0.12)) + 0.15 * a * rng.uniform())
    asymmetry = float(0.02 + 0.20 * a * rng.uniform(0.5, 1.5))
    irregularity = float(0.004 + 0.05 * a * rng.uniform(0.4, 1.6))
    softness = float(rng.uniform(0.06, 0.14) + 0.25 * a * rng.uniform())
    softness_var = float(np.clip(0.1 + 0.9 * a + rng.normal(0, 0.15), 0, 0.95))
    # C: colour count rises with atypia: benign mostly 1-2 browns, malignant mostly 3-5 incl. black/blue/red.
    n_col = int(np.clip(round(0.6 + 4.6 * a + rng.normal(0, 0.5)), 1, 5))
    darken = 1.0 - 0.35 * style.skin_tone  # pigment stays darker than darker skin
    brown_mix = float(np.clip(style.nevus_brown + rng.normal(0, 0.12) + 0.5 * a, 0, 1))
    base = tuple(float(darken * ((1 - brown_mix) * lb + brown_mix * mb))
                 for lb, mb in zip(LIGHT_BROWN, MID_BROWN, strict=True))
    colours: list[tuple[float, ...]] = [base]
    if n_col >= 2:
        colours.append(tuple(darken * c for c in DARK_BROWN))
    if n_col >= 3:
        extras = [ATYPICAL_EXTRAS[i] for i in rng.permutation(len(ATYPICAL_EXTRAS))]
        colours.extend(extras[: n_col - 2])
    centre_dark = float(rng.uniform(-0.15, 0.35))
    network = float(np.clip(rng.uniform(0.0, 0.7), 0, 1))
    dots = int(rng.poisson(1 + 12 * a * a))
    return LesionSpec(
        atypia=a, radius=radius, elongation=elongation, asymmetry=asymmetry, irregularity=irregularity,
        softness=softness, softness_var=softness_var, colours=tuple(tuple(c) for c in colours),  # type: ignore[misc]
        centre_dark=centre_dark, network=network, dots=dots, opacity=float(rng.uniform(0.72, 0.97)),
        structure_seed=int(rng.integers(0, 2**63 - 1)),
    )


def skin_background(rng: np.random.Generator, h: int, w: int, tone: float) -> np.ndarray:
    """Float32 BGR skin: tone, blotchy low-frequency variation, redness, grain, a few follicles."""
    t = float(np.clip(tone, 0, 1)) * (len(SKIN_ANCHORS) - 1)
    i = min(int(t), len(SKIN_ANCHORS) - 2)
    base = SKIN_ANCHORS[i] * (1 - (t - i)) + SKIN_ANCHORS[i + 1] * (t - i)
    base = base * rng.uniform(0.94, 1.06, 3).astype(np.float32)
    blotch = cv2.resize(rng.normal(0, 1, (5, 5, 3)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    lum = cv2.resize(rng.normal(0, 1, (6, 6)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    red = cv2.resize(rng.normal(0, 1, (4, 4)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    img = base[None, None, :] * (1 + 0.008 * blotch + 0.018 * lum[..., None])
    img[..., 2] += 0.015 * red  # uneven erythema
    img[..., :2] -= 0.008 * red[..., None]
    img += rng.normal(0, 0.012, (h, w, 1)).astype(np.float32)  # grain shared by channels, as skin texture
    for _ in range(int(rng.poisson(4 * h * w / 128**2))):  # follicle openings
        cv2.circle(img, (int(rng.integers(0, w)), int(rng.integers(0, h))), max(1, round(min(h, w) / 128)),
                   tuple(float(c) * 0.85 for c in base), -1, cv2.LINE_AA)
    return img


def _harmonics(rng: np.random.Generator, ks: range, amp: float, decay: float, theta: np.ndarray) -> np.ndarray:
    out = np.zeros_like(theta)
    for k in ks:
        out += amp * rng.uniform(0.3, 1.0) / (k ** decay) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return out


def paint_lesion(img: np.ndarray, spec: LesionSpec, cx: float, cy: float, scale_px: float,
                 angle: float = 0.0) -> None:
    """Composite one lesion onto a float32 BGR canvas in place, centred at (cx, cy), rotated by `angle` rad.

    `scale_px` converts the spec's relative radius to pixels (the shorter image side for a close-up; any
    size on a wide-field canvas). Only the lesion's bounding box is touched, so big canvases stay cheap.
    """
    h, w = img.shape[:2]
    R = spec.radius * scale_px
    srng = np.random.default_rng(spec.structure_seed)  # structure is fixed per lesion, whatever the photo
    n_th = 512
    th = np.linspace(0, 2 * np.pi, n_th, endpoint=False)
    # A + B: low-order harmonics bend the outline (asymmetry), high-order ones make it ragged (border).
    rf = 1 + _harmonics(srng, range(1, 4), spec.asymmetry, 0.5, th)
    rf += _harmonics(srng, range(4, 19), spec.irregularity, 0.6, th)
    rf = np.clip(rf, 0.45, None)
    soft_mod = _harmonics(srng, range(1, 4), 1.0, 0.0, th)
    soft_mod /= max(np.abs(soft_mod).max(), 1e-6)
    soft = np.clip(spec.softness * (1 + spec.softness_var * 1.5 * soft_mod), 0.025, 0.6)

    reach = 1.9 * R * (1 + spec.asymmetry) * spec.elongation
    x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 1, w)
    y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 1, h)
    if x0 >= x1 or y0 >= y1:
        return
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = xs - cx, ys - cy
    ca, sa = math.cos(angle), math.sin(angle)
    u = (dx * ca + dy * sa) / R  # lesion-local coordinates, in radii
    v = (-dx * sa + dy * ca) / R
    ve = v * spec.elongation
    r = np.hypot(u, ve)
    t = np.mod(np.arctan2(ve, u), 2 * np.pi)
    idx = (t * (n_th / (2 * np.pi))).astype(np.int32) % n_th
    d = r / rf[idx]  # < 1 inside the outline
    s = soft[idx]
    alpha = np.clip((1 - d) / s + 0.5, 0, 1)
    alpha = alpha * alpha * (3 - 2 * alpha)  # smoothstep: soft but not linear edge

    cols = [np.array(c, np.float32) for c in spec.colours]
    col = np.broadcast_to(cols[0], alpha.shape + (3,)).copy()
    grid = 7
    gm = ((u + 1.6) / 3.2 * (grid - 1)).astype(np.float32)
    gv = ((v + 1.6) / 3.2 * (grid - 1)).astype(np.float32)

    def field() -> np.ndarray:
        g = srng.normal(0, 1, (grid, grid)).astype(np.float32)
        return cv2.remap(g, gm, gv, cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)

    # Concentric profile (symmetric, benign-looking): darker or lighter centre in the second brown.
    centre = np.clip(1 - d, 0, 1) ** 1.5
    if len(cols) >= 2:
        w2 = np.clip(centre * (0.6 + abs(spec.centre_dark)) + (0.35 * spec.asymmetry) * field(), 0, 1)
        col += (cols[1] - col) * w2[..., None] * (0.85 if spec.centre_dark > 0 else 0.4)
    else:
        col *= (1 - 0.25 * spec.centre_dark * centre)[..., None]
    # Atypical colours as blotches pushed off-centre (colour asymmetry grows with A).
    for c in cols[2:]:
        psi = srng.uniform(0, 2 * np.pi)
        f = field() + 2.5 * spec.asymmetry * (u * math.cos(psi) + v * math.sin(psi)) / 0.3
        thr = srng.uniform(0.2, 0.9)
        wb = 1 / (1 + np.exp(-(f - thr) / 0.25))
        col += (c - col) * (wb * srng.uniform(0.6, 0.95))[..., None]
    # Pigment network: zero crossings of band-pass noise form an organic mesh of dark lines; it fades
    # towards the rim in regular lesions and is coarser and patchier in atypical ones.
    if spec.network > 0.05:
        cells = int(srng.integers(17, 23) - 6 * spec.atypia)
        g = srng.normal(0, 1, (2 * cells + 1, 2 * cells + 1)).astype(np.float32)
        nz = cv2.remap(g, (u + 1.6) / 3.2 * 2 * cells, (v + 1.6) / 3.2 * 2 * cells, cv2.INTER_CUBIC,
                       borderMode=cv2.BORDER_REFLECT)
        mesh = np.exp(-((nz / 0.3) ** 2)) * np.clip(1.15 - d, 0, 1)
        if spec.atypia > 0.4:
            mesh *= np.clip(field() + 0.3, 0, 1)  # broken-up network
        col *= (1 - spec.network * 0.55 * mesh)[..., None]
    # Mottling: pigment density varies inside every lesion, more so in atypical ones.
    mottle = cv2.remap(srng.normal(0, 1, (13, 13)).astype(np.float32), gm * 2, gv * 2, cv2.INTER_CUBIC,
                       borderMode=cv2.BORDER_REFLECT)
    col *= (1 + (0.08 + 0.12 * spec.atypia) * mottle)[..., None]
    col *= (1 + srng.normal(0, 0.03, alpha.shape).astype(np.float32))[..., None]

    a3 = (alpha * spec.opacity)[..., None]
    roi = img[y0:y1, x0:x1]
    roi *= 1 - a3
    roi += col * a3
    # Dots and globules: irregular, peripheral and black for atypical lesions; few and central otherwise.
    for _ in range(spec.dots):
        ang = srng.uniform(0, 2 * np.pi)
        rad = srng.uniform(0.2, 0.7) if spec.atypia < 0.45 else srng.uniform(0.5, 1.1)
        du, dv = rad * math.cos(ang), rad * math.sin(ang) / spec.elongation
        px = cx + R * (du * ca - dv * sa)
        py = cy + R * (du * sa + dv * ca)
        size = max(0.5, R * srng.uniform(0.015, 0.035 + 0.03 * spec.atypia))
        shade = np.array(BLACK if srng.uniform() < spec.atypia else DARK_BROWN, np.float32)
        strength = srng.uniform(0.4, 0.8)
        # Only the dot's own few pixels are touched (a whole-ROI pass per dot costs more than the lesion).
        bx0, bx1 = max(int(px - size - 2), x0), min(int(px + size + 3), x1)
        by0, by1 = max(int(py - size - 2), y0), min(int(py + size + 3), y1)
        if bx0 >= bx1 or by0 >= by1:
            continue
        rr = np.hypot(xs[by0 - y0:by1 - y0, bx0 - x0:bx1 - x0] - px, ys[by0 - y0:by1 - y0, bx0 - x0:bx1 - x0] - py)
        wdot = (np.clip((size + 0.5 - rr), 0, 1) * strength)[..., None]
        patch = img[by0:by1, bx0:bx1]
        patch += (shade - patch) * wdot


def _bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, n: int = 24) -> np.ndarray:
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2


def add_nuisances(rng: np.random.Generator, img: np.ndarray) -> dict[str, bool]:
    """Hair, air bubbles, ruler, exposure/colour cast, dermatoscope vignette and blur, each at random; in place."""
    h, w = img.shape[:2]
    s = min(h, w)
    px = s / 128  # nuisance sizes scale with the image
    applied: dict[str, bool] = {}
    applied["hair"] = bool(rng.uniform() < 0.35)
    if applied["hair"]:
        layer = np.zeros((h, w), np.float32)
        colour = rng.uniform(0.05, 0.2)
        for _ in range(int(rng.integers(1, 5) if rng.uniform() < 0.6 else rng.integers(8, 25))):
            p0 = rng.uniform(-0.1, 1.1, 2) * (w, h)
            p2 = p0 + rng.normal(0, 0.6, 2) * s
            p1 = (p0 + p2) / 2 + rng.normal(0, 0.2, 2) * s
            pts = np.round(_bezier(p0, p1, p2) * 16).astype(np.int32)  # 4 fractional bits for AA
            cv2.polylines(layer, [pts], False, float(rng.uniform(0.7, 1.0)),
                          max(1, round(px * rng.uniform(0.6, 1.6))), cv2.LINE_AA, shift=4)
        img *= (1 - layer)[..., None]
        img += (colour * layer)[..., None]
    applied["bubbles"] = bool(rng.uniform() < 0.15)
    if applied["bubbles"]:
        for _ in range(int(rng.integers(1, 5))):
            c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            rad = max(2, int(s * rng.uniform(0.02, 0.08)))
            inner = img.copy()
            cv2.circle(inner, c, rad, (1.0, 1.0, 1.0), -1, cv2.LINE_AA)
            img[:] = img * 0.9 + inner * 0.1  # slightly brighter inside
            cv2.circle(img, c, rad, (0.95, 0.97, 1.0), max(1, round(px * 0.8)), cv2.LINE_AA)  # bright rim
            cv2.circle(img, (c[0] + max(1, rad // 3), c[1] + max(1, rad // 3)), max(1, rad - 1),
                       (0.35, 0.35, 0.4), 1, cv2.LINE_AA)  # shadow edge
    applied["ruler"] = bool(rng.uniform() < 0.10)
    if applied["ruler"]:
        side = int(rng.integers(0, 4))
        band = max(4, int(s * 0.09))
        step = max(3, int(round(s * rng.uniform(0.035, 0.05))))
        ruler = np.full((band, max(h, w), 3), rng.uniform(0.8, 0.95), np.float32)
        for k, x in enumerate(range(step // 2, ruler.shape[1], step)):
            length = band if k % 5 == 0 else band // 2
            cv2.line(ruler, (x, 0), (x, length - 1), (0.1, 0.1, 0.1), max(1, round(px * 0.6)), cv2.LINE_AA)
        if side in (1, 3):
            ruler = np.ascontiguousarray(np.rot90(ruler))
        a = float(rng.uniform(0.7, 0.95))
        if side == 0:
            img[:band] = img[:band] * (1 - a) + ruler[:, :w] * a
        elif side == 2:
            img[h - band:] = img[h - band:] * (1 - a) + ruler[::-1, :w] * a
        elif side == 1:
            img[:, :band] = img[:, :band] * (1 - a) + ruler[:h, :] * a
        else:
            img[:, w - band:] = img[:, w - band:] * (1 - a) + ruler[:h, ::-1] * a
    # Exposure, gamma and the bluish-white cast of polarised contact dermoscopy.
    if rng.uniform() < 0.3:
        img[:] = img * 0.8 + np.array([0.85, 0.80, 0.76], np.float32) * 0.2
    gain = rng.uniform(0.85, 1.12)
    gamma = rng.uniform(0.85, 1.18)
    np.clip(img, 0, 1, out=img)
    img[:] = (img * gain) ** gamma
    applied["vignette"] = bool(rng.uniform() < 0.3)
    if applied["vignette"]:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        rad = s * rng.uniform(0.44, 0.72)  # from a full dark ring to dark corners only
        dist = np.hypot(xx - w / 2 + rng.normal(0, 0.05 * s), yy - h / 2 + rng.normal(0, 0.05 * s))
        edge = max(1.0, s * rng.uniform(0.02, 0.06))
        keep = np.clip((rad - dist) / edge + 0.5, 0, 1)
        img *= (0.06 + 0.94 * keep)[..., None]
    applied["blur"] = bool(rng.uniform() < 0.2)
    if applied["blur"]:
        sigma = float(rng.uniform(0.4, 1.2) * px)
        img[:] = cv2.GaussianBlur(img, (0, 0), sigma)
    return applied


def render_image(spec: LesionSpec, style: PatientStyle, rng: np.random.Generator, width: int,
                 height: int) -> np.ndarray:
    """One dermoscopy-like photo (uint8 BGR) of a lesion; `rng` decides pose, skin and nuisances of this photo."""
    img = skin_background(rng, height, width, style.skin_tone)
    s = min(width, height)
    cx = width / 2 + rng.normal(0, 0.05) * s
    cy = height / 2 + rng.normal(0, 0.05) * s
    paint_lesion(img, spec, cx, cy, s * rng.uniform(0.92, 1.08), angle=float(rng.uniform(0, 2 * np.pi)))
    add_nuisances(rng, img)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    """Baseline JPEG with every encoder knob pinned, so bytes are reproducible."""
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality), cv2.IMWRITE_JPEG_OPTIMIZE, 0,
                                         cv2.IMWRITE_JPEG_PROGRESSIVE, 0, cv2.IMWRITE_JPEG_RST_INTERVAL, 0,
                                         cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420])
    if not ok:
        raise RuntimeError("cv2.imencode failed to encode a JPEG")
    return buf.tobytes()


def decode_jpeg(data: bytes) -> np.ndarray | None:
    """cv2 decode of bytes; None when OpenCV cannot decode them."""
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


# --------------------------------------------------------------------------- planted trouble (pure on bytes)
def near_duplicate(jpeg: bytes, transform: str, rng: np.random.Generator) -> tuple[bytes, str]:
    """Another file of the same photo: resized, re-encoded, recoloured or slightly cropped; (bytes, detail)."""
    img = decode_jpeg(jpeg)
    if img is None:
        raise ValueError("near_duplicate needs a decodable JPEG")
    h, w = img.shape[:2]
    q = int(rng.integers(*JPEG_QUALITY, endpoint=True))
    if transform == "resized":
        if rng.uniform() < 0.35:  # like re-uploads squashed to a square, aspect not preserved
            side = max(MIN_SIZE // 2, int(round(max(h, w) * rng.uniform(0.5, 0.8))))
            nw, nh = side, side
        else:
            f = rng.uniform(0.5, 0.8)
            nw, nh = max(16, int(round(w * f))), max(16, int(round(h * f)))
        out = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
        return encode_jpeg(out, q), f"{w}x{h}->{nw}x{nh}"
    if transform == "reencoded":
        q = int(rng.integers(55, 78, endpoint=True))
        return encode_jpeg(img, q), f"quality={q}"
    if transform == "recoloured":
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV).astype(np.int16)
        shift = int(rng.integers(3, 9)) * (1 if rng.uniform() < 0.5 else -1)  # OpenCV hue units (2 degrees)
        sat = float(rng.uniform(0.8, 1.25))
        hsv[..., 0] = (hsv[..., 0] + shift) % 180
        hsv[..., 1] = np.clip(hsv[..., 1] * sat, 0, 255)
        out = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR)
        gamma = float(rng.choice([rng.uniform(0.75, 0.9), rng.uniform(1.1, 1.3)]))
        lut = np.clip(((np.arange(256) / 255.0) ** gamma) * 255 + 0.5, 0, 255).astype(np.uint8)
        out = cv2.LUT(out, lut)
        return encode_jpeg(out, q), f"hue={shift * 2:+d}deg sat={sat:.2f} gamma={gamma:.2f}"
    if transform == "cropped":
        # Total share removed per axis, <= 8 %, about the same on both axes (aspect roughly kept), split
        # unevenly between the two sides as when someone trims borders by hand.
        fx = rng.uniform(0.02, 0.07)
        fy = float(np.clip(fx * rng.uniform(0.8, 1.2), 0.01, 0.08))
        cut_x, cut_y = max(1, int(w * fx)), max(1, int(h * fy))
        left = int(round(cut_x * rng.uniform(0.3, 0.7)))
        top = int(round(cut_y * rng.uniform(0.3, 0.7)))
        out = img[top:h - (cut_y - top), left:w - (cut_x - left)]
        return encode_jpeg(out, q), f"crop x={cut_x / w:.3f} y={cut_y / h:.3f}"
    raise ValueError(f"unknown near-duplicate transform {transform!r}; use one of {NEAR_TRANSFORMS}")


def truncate_jpeg(jpeg: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """A download cut off inside the JPEG header (before the start-of-scan marker).

    Why there: OpenCV 5's cv2.imread decodes a file cut anywhere in the scan data (grey fill, only a
    stderr warning) while cv2.imdecode rejects it; a cut before SOS fails on every cv2 path, so the
    planted truth is unambiguous. Mid-scan truncations are still worth checking for (EOI marker) in clean.
    """
    sos = jpeg.find(b"\xff\xda")
    if sos <= 4:
        raise ValueError("truncate_jpeg needs a baseline JPEG with a start-of-scan marker")
    keep = int(rng.integers(max(2, sos // 4), sos))
    return jpeg[:keep], f"kept {keep}/{len(jpeg)} bytes (cut before start of scan)"


def garbage_bytes(rng: np.random.Generator, size: int) -> tuple[bytes, str]:
    """Not an image under a .jpg name: random bytes or an error page saved as the file."""
    choice = rng.uniform()
    if choice < 0.4:
        return rng.integers(0, 256, size, dtype=np.uint8).tobytes(), "random bytes"
    if choice < 0.7:
        # A JPEG signature followed by noise: fools magic-number sniffing, not a decoder.
        body = rng.integers(0, 256, max(size - 4, 1), dtype=np.uint8).tobytes()
        return b"\xff\xd8\xff\xe0" + body, "JPEG signature + random bytes"
    page = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
            f'<Message>Access Denied</Message><RequestId>{int(rng.integers(0, 2**62)):016X}</RequestId></Error>\n')
    return page.encode(), "S3 error page"


# --------------------------------------------------------------------------- plan (pure, no pixels)
def validate_args(n: int, malignant_fraction: float, image_size: int) -> None:
    """Clear errors for bad arguments, before any work."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise ValueError(f"n must be a positive integer (number of images), got {n!r}")
    if n > MAX_N:
        raise ValueError(f"n must be <= {MAX_N} so ids stay in the synthetic range ISIC_8xxxxxx, got {n}")
    if not isinstance(malignant_fraction, (int, float)) or not 0.0 <= float(malignant_fraction) <= 1.0 \
            or math.isnan(float(malignant_fraction)):
        raise ValueError(f"malignant_fraction must be within [0, 1], got {malignant_fraction!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < MIN_SIZE:
        raise ValueError(f"image_size must be an integer >= {MIN_SIZE} px, got {image_size!r}")


def trouble_counts(n: int, trouble: bool = True) -> dict[str, int]:
    """How many rows of each planted kind an n-image set gets (0 for all when trouble is off or n is tiny)."""
    if not trouble or n < MIN_N_FOR_TROUBLE:
        return {k: 0 for k in PLANTED_KINDS}
    return {k: max(1, int(round(f * n))) for k, f in TROUBLE_FRACTIONS.items()}


def _pick(rng: np.random.Generator, table: tuple) -> tuple:
    w = np.array([row[-1] for row in table], float)
    return table[int(rng.choice(len(table), p=w / w.sum()))]


@dataclass
class _Row:
    """One planned file: metadata plus how to make its bytes."""

    meta: dict[str, Any]
    role: str  # original | copy | corrupt
    lesion: int = -1  # index into the lesion list (originals, corrupt)
    photo_seed: int = 0
    width: int = 0
    height: int = 0
    quality: int = 92
    kind: str = ""  # planted kind
    of_row: int = -1  # source row for copies
    transform: str = ""
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _diagnosis(rng: np.random.Generator, label: str) -> dict[str, Any]:
    if label == "malignant":
        d2, d3, _ = _pick(rng, MALIGNANT_DX)
        return {"diagnosis_1": "Malignant", "diagnosis_2": d2, "diagnosis_3": d3,
                "diagnosis_confirm_type": "histopathology"}
    if label == "indeterminate":
        d2, d3, _ = _pick(rng, INDETERMINATE_DX)
        return {"diagnosis_1": "Indeterminate", "diagnosis_2": d2, "diagnosis_3": d3,
                "diagnosis_confirm_type": "histopathology"}
    d2, d3, _ = _pick(rng, BENIGN_DX)
    out = {"diagnosis_1": "Benign", "diagnosis_2": d2, "diagnosis_3": d3,
           "diagnosis_confirm_type": _pick(rng, CONFIRM_BENIGN)[0]}
    if rng.uniform() < 0.1:
        out["diagnosis_3"] = None  # the hierarchy is sometimes only filled to level 2
    return out


def _site(rng: np.random.Generator) -> dict[str, Any]:
    if rng.uniform() < 0.06:
        return {"anatom_site_1": None, "anatom_site_2": None}
    s1 = list(SITES)[int(rng.choice(len(SITES), p=np.array(SITE_WEIGHTS) / sum(SITE_WEIGHTS)))]
    s2 = SITES[s1][int(rng.integers(len(SITES[s1])))] if rng.uniform() < 0.6 else None
    return {"anatom_site_1": s1, "anatom_site_2": s2}


def _dims(rng: np.random.Generator, size: int) -> tuple[int, int]:
    landscape = rng.uniform() < 0.25  # some landscape 4:3 photos, as in the archive
    if landscape and round(size * 0.75) >= MIN_SIZE:  # never shorter than the smallest allowed size
        return size, int(round(size * 0.75))
    return size, size


def plan(n: int, seed: int = 0, malignant_fraction: float = 0.3, image_size: int = 128,
         trouble: bool = True) -> tuple[list[_Row], list[LesionSpec], list[PatientStyle]]:
    """Decide every file (ids, metadata, roles, seeds) without rendering a pixel."""
    validate_args(n, malignant_fraction, image_size)
    ss = np.random.SeedSequence([int(seed), GENERATOR_VERSION])
    r_layout, r_labels, r_meta, r_trouble, r_ids, r_look = (np.random.default_rng(s) for s in ss.spawn(6))
    counts = trouble_counts(n, trouble)
    n_copies = sum(counts[k] for k in COPY_KINDS)
    n_corrupt = sum(counts[k] for k in CORRUPT_KINDS)
    n_base = n - n_copies - n_corrupt

    # Lesions: most have one photo, some two or three (different photos of the same lesion).
    photos: list[int] = []
    while sum(photos) < n_base:
        photos.append(int(r_layout.choice([1, 2, 3], p=[0.86, 0.11, 0.03])))
    photos[-1] -= sum(photos) - n_base
    n_lesions = len(photos)
    # Patients: several lesions each (1-8, mean ~3), so split/ugly-duckling have groups to respect.
    sizes: list[int] = []
    while sum(sizes) < n_lesions:
        sizes.append(int(r_layout.choice(np.arange(1, 9), p=[.22, .2, .18, .14, .1, .08, .05, .03])))
    sizes[-1] -= sum(sizes) - n_lesions
    patient_of = np.repeat(np.arange(len(sizes)), sizes)
    r_layout.shuffle(patient_of)

    # Labels: indeterminate/unlabeled go to single-photo lesions; of the rest exactly
    # round(fraction * lesions) are malignant, so the fraction holds at small n too (unlabeled ones keep
    # a hidden true label that decides their look).
    single = [int(i) for i in r_labels.permutation(n_lesions) if photos[i] == 1]
    indeterminate = set(single[: counts["indeterminate"]])
    unlabeled = set(single[counts["indeterminate"]: counts["indeterminate"] + counts["unlabeled"]])
    labels = np.array(["benign"] * n_lesions, dtype=object)
    rest = [int(i) for i in r_labels.permutation(n_lesions) if i not in indeterminate]
    labels[rest[: int(round(malignant_fraction * len(rest)))]] = "malignant"
    labels[sorted(indeterminate)] = "indeterminate"

    n_patients = len(sizes) + n_copies  # copies arrive as re-uploads from new single-image "patients"
    styles = [sample_patient_style(r_look) for _ in range(len(sizes))]
    ages = r_meta.normal(52, 16, len(sizes))
    sexes = r_meta.choice(["male", "female"], len(sizes))
    cohorts = r_meta.choice(len(COHORTS), len(sizes), p=COHORT_WEIGHTS)
    pid_nums = r_ids.choice(1_000_000, n_patients, replace=False) + ID_BASE
    n_lesion_ids = n_lesions + n_copies + n_corrupt
    lid_nums = r_ids.choice(1_000_000, n_lesion_ids, replace=False) + ID_BASE

    def patient_meta(p: int) -> dict[str, Any]:
        age = None if r_meta.uniform() < 0.05 else int(np.clip(round(ages[p] / 5) * 5, 0, 85))
        sex = None if r_meta.uniform() < 0.04 else str(sexes[p])
        att, lic = COHORTS[int(cohorts[p])]
        return {"attribution": att, "copyright_license": lic, "age_approx": age, "sex": sex,
                "patient_id": f"IP_{pid_nums[p]:07d}"}

    specs = [sample_lesion(r_look, str(labels[i]), styles[patient_of[i]]) for i in range(n_lesions)]
    rows: list[_Row] = []
    for i in range(n_lesions):
        p = int(patient_of[i])
        base = {**patient_meta(p), **_site(r_meta), "lesion_id": f"IL_{lid_nums[i]:07d}",
                "image_type": "dermoscopic", "image_manipulation": "synthetic",
                "dermoscopic_type": str(r_meta.choice(["contact polarized", "contact non-polarized",
                                                      "non-contact polarized"], p=[.5, .35, .15]))}
        if i in unlabeled:
            dx = {"diagnosis_1": None, "diagnosis_2": None, "diagnosis_3": None, "diagnosis_confirm_type": None}
        else:
            dx = _diagnosis(r_meta, str(labels[i]))
        for _ in range(photos[i]):
            w, h = _dims(r_meta, image_size)
            kind = "unlabeled" if i in unlabeled else ("indeterminate" if i in indeterminate else "")
            rows.append(_Row(meta={**base, **dx}, role="original", lesion=i, photo_seed=int(r_look.integers(2**63)),
                             width=w, height=h, quality=int(r_meta.integers(*JPEG_QUALITY, endpoint=True)),
                             kind=kind, extra={"patient": p}))

    # Copies of distinct labelled single-photo originals (so each planted group is exactly one pair).
    candidates = [j for j, r in enumerate(rows) if r.kind == "" and photos[r.lesion] == 1
                  and r.meta["diagnosis_1"] in ("Benign", "Malignant")]
    sources = list(r_trouble.permutation(candidates)[:n_copies])
    if len(sources) < n_copies:
        raise ValueError(f"n={n} is too small to plant {n_copies} duplicates; raise n or pass trouble=False")
    next_pid, next_lid = len(sizes), n_lesions
    for kind in COPY_KINDS:
        for _ in range(counts[kind]):
            j = int(sources.pop())
            src = rows[j]
            transform = {"exact_dup": "exact"}.get(kind, kind.removeprefix("near_dup_"))
            if kind == "conflicting_label":
                transform = str(r_trouble.choice(NEAR_TRANSFORMS))
            meta = dict(src.meta)
            # A re-upload by another cohort: new ids, other licence, same clinical facts (unless conflicting).
            att, lic = COHORTS[(COHORTS.index((meta["attribution"], meta["copyright_license"]))
                                + int(r_trouble.integers(1, len(COHORTS)))) % len(COHORTS)]
            meta.update(attribution=att, copyright_license=lic, patient_id=f"IP_{pid_nums[next_pid]:07d}",
                        lesion_id=f"IL_{lid_nums[next_lid]:07d}")
            next_pid += 1
            next_lid += 1
            if kind == "conflicting_label":
                flipped = "benign" if meta["diagnosis_1"] == "Malignant" else "malignant"
                meta.update(_diagnosis(r_trouble, flipped))
            rows.append(_Row(meta=meta, role="copy", kind=kind, of_row=j, transform=transform,
                             photo_seed=int(r_trouble.integers(2**63))))
    # Corrupt files: their own (labelled) lesions in existing patients, the bytes broken in transit.
    for kind in CORRUPT_KINDS:
        for _ in range(counts[kind]):
            p = int(r_trouble.integers(len(sizes)))
            label = "malignant" if r_trouble.uniform() < malignant_fraction else "benign"
            specs.append(sample_lesion(r_look, label, styles[p]))
            w, h = _dims(r_meta, image_size)
            meta = {**patient_meta(p), **_site(r_meta), **_diagnosis(r_meta, label),
                    "lesion_id": f"IL_{lid_nums[next_lid]:07d}", "image_type": "dermoscopic",
                    "image_manipulation": "synthetic", "dermoscopic_type": "contact polarized"}
            next_lid += 1
            rows.append(_Row(meta=meta, role="corrupt", lesion=len(specs) - 1, kind=kind, width=w, height=h,
                             photo_seed=int(r_trouble.integers(2**63)), extra={"patient": p}))
    # Ids last, shuffled, so neither order nor id gives a planted row away.
    for r, num in zip(rows, r_ids.permutation(len(rows)) + ID_BASE, strict=True):
        r.meta["isic_id"] = f"ISIC_{num:07d}"
    return rows, specs, styles


# --------------------------------------------------------------------------- generate (I/O)
def _attribution_text(meta: pd.DataFrame) -> str:
    """isic-cli's attribution.txt: by image count desc, then name; 'Anonymous' last; blank-line separated."""
    counts = meta["attribution"].value_counts()
    names = sorted(counts.index, key=lambda a: (a == "Anonymous", -counts[a], a))
    return "\n\n".join(names) + "\n"


def generate(out_dir: Path, n: int, seed: int = 0, malignant_fraction: float = 0.3, image_size: int = 128,
             trouble: bool = True) -> pd.DataFrame:
    """Write n synthetic images + metadata.csv (+ planted.csv, attribution.txt, licenses/) to out_dir."""
    rows, specs, styles = plan(n, seed, malignant_fraction, image_size, trouble)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data: list[bytes] = [b""] * len(rows)
    for j, r in enumerate(rows):  # originals and corrupt sources first: copies need their bytes
        if r.role in ("original", "corrupt"):
            rng = np.random.default_rng(r.photo_seed)
            style = styles[r.extra["patient"]]
            jpeg = encode_jpeg(render_image(specs[r.lesion], style, rng, r.width, r.height), r.quality)
            if r.kind == "corrupt_truncated":
                jpeg, r.detail = truncate_jpeg(jpeg, rng)
            elif r.kind == "corrupt_garbage":
                jpeg, r.detail = garbage_bytes(rng, len(jpeg))
            data[j] = jpeg
    for j, r in enumerate(rows):
        if r.role == "copy":
            src = data[r.of_row]
            if r.transform == "exact":
                data[j], r.detail = src, "same bytes"
            else:
                data[j], r.detail = near_duplicate(src, r.transform, np.random.default_rng(r.photo_seed))
                if r.kind == "conflicting_label":
                    r.detail = f"{r.transform}: {r.detail}"
    records = []
    for j, r in enumerate(rows):
        w, h = r.width, r.height
        if r.role == "copy":
            img = decode_jpeg(data[j])
            h, w = img.shape[:2]  # type: ignore[union-attr]
        records.append({**r.meta, "pixels_x": w, "pixels_y": h})
    meta = pd.DataFrame.from_records(records)
    for col in COLUMNS:
        if col not in meta:
            meta[col] = None
    meta = meta[COLUMNS]
    for col in ("age_approx", "pixels_x", "pixels_y"):
        meta[col] = meta[col].astype("Int64")  # ints in the CSV, blank when missing
    order = np.argsort(meta["isic_id"].to_numpy())
    meta = meta.iloc[order].reset_index(drop=True)
    planted = pd.DataFrame(
        [{"isic_id": r.meta["isic_id"], "kind": r.kind,
          "of_isic_id": rows[r.of_row].meta["isic_id"] if r.of_row >= 0 else None, "detail": r.detail}
         for r in rows if r.kind], columns=PLANTED_COLUMNS,
    ).sort_values(["kind", "isic_id"]).reset_index(drop=True)

    _remove_stale(out_dir, set(meta["isic_id"]))
    for j, r in enumerate(rows):
        write_bytes(out_dir / f"{r.meta['isic_id']}.jpg", data[j])
    write_table(meta, out_dir / "metadata.csv")
    write_table(planted, out_dir / "planted.csv")
    write_text(out_dir / "attribution.txt", _attribution_text(meta))
    for lic in sorted(meta["copyright_license"].unique()):
        title, url = LICENSE_URLS[lic]
        write_text(out_dir / "licenses" / f"{lic}.txt",
                   f"{lic}: {title}\nFull legal code: {url}\n\nApplies to the lesionflow synthetic images "
                   f"attributed to a cohort with this licence in metadata.csv (generated, no real patients).\n")
    summary = {
        "generator": "tasks.fake.lesions", "version": GENERATOR_VERSION, "n": n, "seed": int(seed),
        "malignant_fraction": float(malignant_fraction), "image_size": int(image_size), "trouble": bool(trouble),
        "planted": trouble_counts(n, trouble), "lesions": len({r.meta["lesion_id"] for r in rows}),
        "patients": int(meta["patient_id"].nunique()),
        "diagnosis_1": {str(k): int(v) for k, v in meta["diagnosis_1"].fillna("(missing)").value_counts().items()},
    }
    write_text(out_dir / "synthetic.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return meta


def _remove_stale(out_dir: Path, keep: set[str]) -> None:
    """A rerun into the same folder with other args must not leave images metadata.csv no longer lists.

    Only files an earlier run of this generator listed are removed (synthetic.json marks its folder).
    """
    old = out_dir / "metadata.csv"
    if not (out_dir / "synthetic.json").exists() or not old.exists():
        return
    try:
        ids = pd.read_csv(old, usecols=["isic_id"])["isic_id"].astype(str)
    except (ValueError, pd.errors.ParserError):
        return
    for isic_id in ids:
        if isic_id not in keep and isic_id.startswith("ISIC_8"):
            (out_dir / f"{isic_id}.jpg").unlink(missing_ok=True)


def sample_grid(seed: int = 0, image_size: int = 128, rows: int = 4, cols: int = 4,
                tile: int | None = None) -> np.ndarray:
    """A rows x cols BGR mosaic of fresh lesions (top half benign, bottom half malignant), each captioned.

    Rendered at `image_size`, shown at `tile` px (INTER_AREA) so a docs picture can stay small.
    """
    validate_args(rows * cols, 0.5, image_size)
    tile = int(tile or image_size)
    rng = np.random.default_rng([int(seed), GENERATOR_VERSION, 99])
    tiles = []
    for k in range(rows * cols):
        label = "benign" if k < rows * cols // 2 else "malignant"
        style = sample_patient_style(rng)
        spec = sample_lesion(rng, label, style)
        img = render_image(spec, style, rng, image_size, image_size)
        img = cv2.resize(img, (tile, tile), interpolation=cv2.INTER_AREA) if tile != image_size else img
        caption = np.full((16, tile, 3), 255, np.uint8)
        cv2.putText(caption, f"{label} a={spec.atypia:.2f} c={len(spec.colours)}", (3, 12),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.34 * tile / 112, (0, 0, 0), 1, cv2.LINE_AA)
        tiles.append(np.vstack([img, caption]))
    return np.vstack([np.hstack(tiles[r * cols:(r + 1) * cols]) for r in range(rows)])


def write_sample_grid(path: Path, seed: int = 0, image_size: int = 128, tile: int = 112) -> Path:
    """Write the sample mosaic as a small PNG (docs picture), atomically.

    Skin grain defeats PNG compression; 64 levels per channel are invisible here and halve the file.
    """
    grid = sample_grid(seed, image_size, tile=tile)
    grid = (grid // 4) * 4 + 2
    ok, buf = cv2.imencode(".png", grid, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:
        raise RuntimeError("cv2.imencode failed to encode the sample grid PNG")
    write_bytes(path, buf.tobytes())
    return Path(path)
