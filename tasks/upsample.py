"""Stage `upsample`: synthetic malignant TRAIN images from benign TRAIN images via the CycleGAN generator.

Reads data/augment/index.parquet and models/cyclegan/generator_b2m.keras; writes data/upsample/{images/,
index.parquet} (every input row with synthetic=False, plus the synthetic rows) and reports/upsample/{metrics.json,
quality.png, samples.png}. Synthetic rows never enter val/test and never come from val/test images.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.core.config import Upsample
from tasks.core.errors import InputError, RunError
from tasks.core.images import dihedral
from tasks.core.io import KEY, Paths, read_index, write_bytes, write_index, write_json, write_run_stats, write_table
from tasks.models.gan import GENERATOR_FILE
from tasks.models.inputs import train_domains

log = logging.getLogger(__name__)

STAGE = "upsample"
# Train reads the stage before it; augment's rows (offline copies included) pass through here unchanged.
INPUT_STAGE = "augment"
SOURCE_SUFFIX = "+cyclegan"
# Label columns of the benign image a synthetic row was made from: wrong for the synthetic image, so cleared;
# `target` and `label` are the stage's own statement about it.
SOURCE_LABEL_COLUMNS = ("diagnosis_1", "diagnosis_2", "diagnosis_3", "diagnosis_4", "diagnosis_5",
                        "benign_malignant", "diagnosis", "dx", "diagnosis_isic2019", "dx_type")

# Columns of earlier stages that describe an image file -> the generated file's value.
FILE_COLUMNS = {"content_sha256": "sha256", "file_size": "file_size", "pixels_x": "width", "pixels_y": "height",
                "image_width": "width", "image_height": "height", "decoded_x": "width", "decoded_y": "height"}


# --------------------------------------------------------------------------- pure: how many, from which
def n_to_generate(n_malignant: int, n_benign: int, target_ratio: float) -> int:
    """Smallest k >= 0 with (m + k) / (m + b + k) >= target_ratio; 0 when the ratio is 0 or already reached."""
    if n_malignant < 0 or n_benign < 0:
        raise InputError(f"counts must be >= 0 (got malignant={n_malignant}, benign={n_benign})")
    if not 0 <= target_ratio < 1:
        raise InputError(f"target_ratio must be in [0, 1), got {target_ratio}")
    if target_ratio == 0:
        return 0
    r = Fraction(str(target_ratio))  # exact decimal: 0.3 means 3/10, not the float just below it
    need = (r * (n_malignant + n_benign) - n_malignant) / (1 - r)
    return max(0, math.ceil(need))


def candidate_sources(benign: pd.DataFrame, seed: int, max_per_source: int) -> pd.DataFrame:
    """Benign train rows in generation order: a seeded permutation (of key-sorted rows), once per variant.

    Variant v > 0 is the same image turned/flipped (dihedral transform v) before translation, so a benign image
    used twice never yields two identical synthetic images. The stage takes the first k that read cleanly.
    """
    base = benign.sort_values(KEY, kind="mergesort").reset_index(drop=True)
    order = np.random.default_rng(seed).permutation(len(base))
    parts = [base.iloc[order].assign(variant=v) for v in range(max_per_source)]
    return pd.concat(parts, ignore_index=True) if parts else base.assign(variant=pd.Series(dtype=int))


def synthetic_key(source: str, isic_id: str, variant: int) -> tuple[str, str]:
    """(source, isic_id) of a synthetic image: `<source>+cyclegan`, `<isic_id>-cg<variant>`."""
    return f"{source}{SOURCE_SUFFIX}", f"{isic_id}-cg{variant}"


def synthetic_rows(sources: pd.DataFrame, files: list[dict]) -> pd.DataFrame:
    """Index rows for generated images: every column of the benign source kept (group_id, patient, metadata) except
    its label columns; key, paths, target 1, split train, synthetic True and the source's key added."""
    from tasks.core.io import image_relpath

    if len(sources) != len(files):
        raise ValueError(f"{len(sources)} sources but {len(files)} generated files")
    rows = sources.drop(columns=["variant"]).copy()
    keys = [synthetic_key(s, i, int(v)) for s, i, v in zip(sources["source"], sources["isic_id"], sources["variant"])]
    rows["source_source"] = sources["source"].to_numpy()
    rows["source_isic_id"] = sources["isic_id"].to_numpy()
    rows["synthetic_variant"] = sources["variant"].astype(int).to_numpy()
    rows["source"] = [k[0] for k in keys]
    rows["isic_id"] = [k[1] for k in keys]
    rel = [image_relpath(STAGE, s, i) for s, i in keys]
    rows["processed_path"] = rel
    rows["path"] = rel  # the synthetic image is its own original
    rows["target"] = 1
    rows["label"] = "malignant"
    rows["split"] = "train"
    rows["synthetic"] = True
    for col in SOURCE_LABEL_COLUMNS:
        if col in rows.columns:
            rows[col] = None
    rows["sha256"] = [f["sha256"] for f in files]
    for col, key in FILE_COLUMNS.items():
        if col in rows.columns:  # describe the new file wherever the input describes its files
            rows[col] = [f[key] for f in files]
    for col in ("phash",):  # per-image hashes of the source that were not recomputed
        if col in rows.columns:
            rows[col] = None
    return rows.reset_index(drop=True)


def combine(index: pd.DataFrame, synthetic: pd.DataFrame) -> pd.DataFrame:
    """All input rows (synthetic=False, source_* empty) followed by the synthetic rows."""
    real = index.copy()
    real["synthetic"] = False
    for col in ("source_source", "source_isic_id"):
        real[col] = None
    real["synthetic_variant"] = pd.array([pd.NA] * len(real), dtype="Int64")
    if synthetic.empty:
        return real.reset_index(drop=True)
    synthetic = synthetic.astype({"synthetic_variant": "Int64"})
    out = pd.concat([real, synthetic], ignore_index=True)
    out["synthetic"] = out["synthetic"].astype(bool)
    return out


class LeakError(RunError):
    """A synthetic row would reach val/test, come from a non-benign-train image, or leave its source's group."""


def check_no_leak(out: pd.DataFrame, index: pd.DataFrame) -> None:
    """Raise if a synthetic row is outside train, or was made from anything but a real benign train image."""
    syn = out.loc[out["synthetic"]]
    if syn.empty:
        return
    bad_split = syn.loc[syn["split"] != "train", KEY]
    if len(bad_split):
        raise LeakError(f"synthetic rows outside the train split: {bad_split.head().to_dict('records')}")
    allowed = train_domains(index)[0][KEY].astype(str)
    allowed_keys = set(zip(allowed["source"], allowed["isic_id"]))
    src = list(zip(syn["source_source"].astype(str), syn["source_isic_id"].astype(str)))
    bad = [k for k in src if k not in allowed_keys]
    if bad:
        raise LeakError(f"synthetic rows made from images that are not benign train images: {bad[:5]}")
    groups = index.set_index(KEY)["group_id"] if "group_id" in index.columns else None
    if groups is not None:
        want = groups.reindex(pd.MultiIndex.from_tuples(
            list(zip(syn["source_source"], syn["source_isic_id"])))).to_numpy()
        if not np.array_equal(want.astype(str), syn["group_id"].astype(str).to_numpy()):
            raise LeakError("synthetic rows must keep the group_id of their source image")


# --------------------------------------------------------------------------- images
def upscale(source_hi: np.ndarray, source_lo: np.ndarray, fake_lo: np.ndarray, mode: str) -> np.ndarray:
    """Bring a GAN-size translation back to the source's size: plain resize, or the source plus the GAN's change.

    `residual` keeps the source's high frequencies (hair, texture, sharpness) and adds the up-sampled difference
    fake - input at GAN scale, so synthetic images are not systematically blurrier than real ones (a shortcut a
    classifier would happily learn). At equal sizes both modes return the translation itself.
    """
    import cv2

    h, w = source_hi.shape[:2]
    if fake_lo.shape[:2] == (h, w):
        return fake_lo.copy()
    interp = cv2.INTER_CUBIC
    if mode == "resize":
        up = cv2.resize(fake_lo.astype(np.float32), (w, h), interpolation=interp)
        return np.clip(np.rint(up), 0, 255).astype(np.uint8)
    if mode != "residual":
        raise InputError(f"upscale mode must be 'residual' or 'resize', got {mode!r}")
    delta = fake_lo.astype(np.float32) - source_lo.astype(np.float32)
    up = cv2.resize(delta, (w, h), interpolation=interp)
    return np.clip(np.rint(source_hi.astype(np.float32) + up), 0, 255).astype(np.uint8)


@dataclass
class Generated:
    used: pd.DataFrame  # the candidate rows translated, in order
    files: list[dict]  # sha256, file_size, width, height of each written PNG
    failed: list[dict]  # candidates whose image could not be read
    source_features: np.ndarray  # image_features of each source as translated (variant transform applied)
    synthetic_features: np.ndarray
    samples: list[tuple[np.ndarray, np.ndarray]]  # (source, synthetic) pairs for the report grid


def generate(generator: Any, candidates: pd.DataFrame, k: int, paths: Paths, mode: str, batch_size: int = 32,
             feature_size: int = 32, n_samples: int = 8) -> Generated:
    """Translate and write the first k readable candidates (features computed on the fly, not kept images)."""
    import cv2

    from tasks.core.images import decode, encode_png
    from tasks.core.io import image_relpath
    from tasks.models.gan import to_uint8, to_unit, translate

    size = int(generator.input_shape[1])
    sample_at = set(np.linspace(0, k - 1, min(n_samples, k)).round().astype(int).tolist()) if k else set()
    used, files, failed, samples, f_src, f_syn = [], [], [], [], [], []
    pos = 0
    while len(files) < k and pos < len(candidates):
        chunk = candidates.iloc[pos:pos + min(batch_size, k - len(files))]
        pos += len(chunk)
        his, los, ok = [], [], []
        for i, r in enumerate(chunk.itertuples(index=False)):
            try:
                hi = dihedral(decode(paths.abs(r.processed_path).read_bytes()), int(r.variant))
            except (OSError, ValueError) as exc:
                failed.append({"source": r.source, "isic_id": r.isic_id, "processed_path": r.processed_path,
                               "reason": f"{type(exc).__name__}: {exc}"})
                continue
            his.append(hi)
            los.append(hi if hi.shape[:2] == (size, size) else cv2.resize(hi, (size, size),
                                                                          interpolation=cv2.INTER_AREA))
            ok.append(i)
        if not ok:
            continue
        fakes = to_uint8(translate(generator, to_unit(np.stack(los)), batch_size))
        rows = chunk.iloc[ok]
        for r, hi, lo, fake in zip(rows.itertuples(index=False), his, los, fakes):
            out = upscale(hi, lo, fake, mode)
            png = encode_png(out)
            rel = image_relpath(STAGE, *synthetic_key(r.source, r.isic_id, int(r.variant)))
            write_bytes(paths.abs(rel), png)
            if len(files) in sample_at:
                samples.append((hi, out))
            files.append({"sha256": hashlib.sha256(png).hexdigest(), "file_size": len(png),
                          "width": out.shape[1], "height": out.shape[0]})
            f_src.append(image_features([hi], feature_size)[0])
            f_syn.append(image_features([out], feature_size)[0])
        used.append(rows)
    used_df = pd.concat(used, ignore_index=True) if used else candidates.iloc[:0]
    return Generated(used_df, files, failed, np.asarray(f_src), np.asarray(f_syn), samples)


# --------------------------------------------------------------------------- quality signal
def image_features(images: Iterable[np.ndarray], size: int = 32) -> np.ndarray:
    """Simple colour/shape/texture features per image: LAB moments, HSV histograms, an 8x8 grey thumbnail,
    gradient statistics. Computed at `size` px so real (full-size) and synthetic images compare fairly."""
    import cv2

    feats = []
    for img in images:
        small = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
        lab = cv2.cvtColor(small, cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float32)
        hsv = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)
        hists = [np.histogram(hsv[..., c], bins=8, range=(0, 180 if c == 0 else 256))[0] / (size * size)
                 for c in range(3)]
        grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY).astype(np.float32)
        thumb = cv2.resize(grey, (8, 8), interpolation=cv2.INTER_AREA).ravel() / 255.0
        gx, gy = cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1)
        mag = np.sqrt(gx**2 + gy**2) / 255.0
        feats.append(np.concatenate([lab.mean(0) / 255, lab.std(0) / 255, *hists, thumb,
                                     [mag.mean(), mag.std(), np.percentile(mag, 90)]]))
    return np.asarray(feats, dtype=np.float64).reshape(len(feats), -1)


def kid(x: np.ndarray, y: np.ndarray, n_subsets: int = 20, subset_size: int = 100,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018) on given embeddings: unbiased MMD^2 with the cubic
    polynomial kernel (x.y/d + 1)^3, averaged over random subsets; (mean, std)."""
    m = min(len(x), len(y), subset_size)
    if m < 2:
        return float("nan"), float("nan")
    d = x.shape[1]
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_subsets):
        a = x[rng.choice(len(x), m, replace=False)]
        b = y[rng.choice(len(y), m, replace=False)]
        kxx, kyy, kxy = (a @ a.T / d + 1) ** 3, (b @ b.T / d + 1) ** 3, (a @ b.T / d + 1) ** 3
        off = m * (m - 1)
        vals.append((kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off - 2 * kxy.mean())
    return float(np.mean(vals)), float(np.std(vals))


def quality(real_train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray] | None,
            sources: np.ndarray, synthetic: np.ndarray, cfg: Upsample) -> tuple[dict, dict]:
    """Share of synthetic images a real-data classifier calls malignant, and KIDs; (metrics, probabilities).

    The classifier is a balanced logistic regression on standardised `image_features` of the real train split.
    KIDs use the unstandardised features (each already in [0, 1]): standardising would let a feature that is
    nearly constant on real images (a hue bin skin never reaches) blow every distance up by orders of magnitude.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    x_train, y_train = real_train
    if len(np.unique(y_train)) < 2 or len(synthetic) == 0:
        return {}, {}
    scaler = StandardScaler().fit(x_train)
    clf = LogisticRegression(class_weight="balanced", max_iter=2000, C=0.1).fit(scaler.transform(x_train), y_train)
    prob = lambda f: clf.predict_proba(scaler.transform(f))[:, 1]  # noqa: E731
    emb_benign, emb_malignant, emb_syn = x_train[y_train == 0], x_train[y_train == 1], synthetic
    p = {"real benign": prob(x_train[y_train == 0]), "real malignant": prob(x_train[y_train == 1]),
         "benign sources": prob(sources), "synthetic": prob(synthetic)}
    kid_sm = kid(emb_syn, emb_malignant, cfg.kid_subsets, cfg.kid_subset_size, cfg.seed)
    kid_bm = kid(emb_benign, emb_malignant, cfg.kid_subsets, cfg.kid_subset_size, cfg.seed)
    kid_sb = kid(emb_syn, emb_benign, cfg.kid_subsets, cfg.kid_subset_size, cfg.seed)
    metrics = {
        "synthetic_called_malignant": float(np.mean(p["synthetic"] >= 0.5)),
        "sources_called_malignant": float(np.mean(p["benign sources"] >= 0.5)),
        "real_malignant_called_malignant": float(np.mean(p["real malignant"] >= 0.5)),
        "synthetic_mean_prob": float(np.mean(p["synthetic"])),
        "kid_synthetic_vs_malignant": kid_sm[0], "kid_synthetic_vs_malignant_std": kid_sm[1],
        "kid_benign_vs_malignant": kid_bm[0], "kid_synthetic_vs_benign": kid_sb[0],
    }
    if val is not None and len(np.unique(val[1])) == 2:
        metrics["quality_classifier_val_auc"] = float(roc_auc_score(val[1], prob(val[0])))
    return {k: round(v, 6) for k, v in metrics.items()}, p


def quality_plot(probs: dict, metrics: dict) -> bytes:
    """PNG: histograms of the quality classifier's P(malignant) per group, KIDs in the title."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    bins = np.linspace(0, 1, 21)
    for name, values in probs.items():
        ax.hist(values, bins=bins, density=True, histtype="step", linewidth=1.5, label=f"{name} (n={len(values)})")
    ax.axvline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("P(malignant), logistic regression on real train images")
    ax.set_ylabel("density")
    ax.set_title(f"KID synthetic-malignant {metrics.get('kid_synthetic_vs_malignant', float('nan')):.3f}, "
                 f"benign-malignant {metrics.get('kid_benign_vs_malignant', float('nan')):.3f}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version string: same plot, same bytes
    plt.close(fig)
    return buf.getvalue()


# --------------------------------------------------------------------------- the stage
def _read_rgb(paths: Paths, rel: Iterable[str]) -> list[np.ndarray]:
    from tasks.core.images import decode

    out = []
    for r in rel:
        try:
            out.append(decode(paths.abs(r).read_bytes()))
        except (OSError, ValueError):
            continue  # only a quality statistic; unreadable inputs were reported where they failed
    return out


def run(params: Any, paths: Paths) -> dict:
    """Upsample the malignant share of the train split to `upsample.target_ratio` with CycleGAN images."""
    cfg = params.upsample
    t0 = time.perf_counter()
    index = read_index(paths, INPUT_STAGE)
    for col in ("synthetic", "source_isic_id", "source_source"):
        if col in index.columns:
            raise InputError(f"{paths.index(INPUT_STAGE)}: already has column {col!r}; upsample reads the "
                             f"{INPUT_STAGE} output, not its own")
    benign, malignant = train_domains(index, str(paths.index(INPUT_STAGE)))
    k = n_to_generate(len(malignant), len(benign), cfg.target_ratio)
    out_dir, report_dir = paths.stage(STAGE), paths.reports / STAGE
    metrics: dict[str, Any] = {
        "target_ratio": cfg.target_ratio, "train_benign": len(benign), "train_malignant": len(malignant),
        "ratio_before": round(len(malignant) / max(len(benign) + len(malignant), 1), 6), "requested": k,
    }
    synthetic = index.iloc[:0]
    gen = None
    if k > 0:
        from tasks.models.gan import load_generator

        generator = load_generator(paths.models / "cyclegan" / GENERATOR_FILE)
        candidates = candidate_sources(benign, cfg.seed, cfg.max_per_source)
        gen = generate(generator, candidates, k, paths, cfg.upscale, cfg.batch_size, cfg.feature_size, cfg.samples)
        synthetic = synthetic_rows(gen.used, gen.files)
        metrics["gan_image_size"] = int(generator.input_shape[1])
        if len(gen.used) < k:
            log.warning("upsample: generated %d of %d requested (%d benign train images x max_per_source=%d, "
                        "%d unreadable); raise upsample.max_per_source to reach the target", len(gen.used), k,
                        len(benign), cfg.max_per_source, len(gen.failed))
    out = combine(index, synthetic)
    check_no_leak(out, index)  # the guarantee, checked on what is about to be written

    from tasks.core.io import prune_outputs

    keep = {str(paths.abs(p)) for p in synthetic["processed_path"]} if len(synthetic) else set()
    prune_outputs(out_dir / "images", keep)
    write_index(out, paths, STAGE)
    failed = gen.failed if gen is not None else []
    write_table(pd.DataFrame(failed, columns=[*KEY, "processed_path", "reason"]), out_dir / "failed.csv")
    n_syn = len(synthetic)
    n_train = len(benign) + len(malignant) + n_syn
    metrics.update({"generated": n_syn, "shortfall": k - n_syn, "failed_sources": len(failed),
                    "ratio_after": round((len(malignant) + n_syn) / max(n_train, 1), 6), "upscale": cfg.upscale})

    artifacts = []
    for stale in ("quality.png", "samples.png"):  # a pass-through run must not leave an old run's plots behind
        (report_dir / stale).unlink(missing_ok=True)
    if gen is not None and n_syn and cfg.quality:
        metrics.update(_quality_report(cfg, paths, index, benign, malignant, gen, report_dir))
        artifacts.append(report_dir / "quality.png")
    if gen is not None and gen.samples:
        from tasks.core.images import encode_png, titled_grid

        size = max(96, gen.samples[0][0].shape[0])
        grid = titled_grid([[a for a, _ in gen.samples], [b for _, b in gen.samples]], size,
                           ("benign source", "synthetic"), [])
        write_bytes(report_dir / "samples.png", encode_png(grid))
        artifacts.append(report_dir / "samples.png")
    write_json(report_dir / "metrics.json", metrics)
    stats = {"seconds": round(time.perf_counter() - t0, 2)}
    write_run_stats(paths, STAGE, stats)
    tracked: dict[str, Any] = {"mlflow": "off"}
    if cfg.mlflow:
        from tasks import tracking

        tracked = tracking.log_stage_run(STAGE, {STAGE: cfg}, paths, metrics={**metrics, **stats},
                                         artifacts=[report_dir / "metrics.json", *artifacts],
                                         experiment=cfg.experiment)
    write_json(report_dir / "mlflow.json", tracked)  # run ids change every run: kept out of the DVC metrics
    return {k_: metrics.get(k_) for k_ in ("requested", "generated", "ratio_before", "ratio_after",
                                           "synthetic_called_malignant", "kid_synthetic_vs_malignant")} | tracked


def _quality_report(cfg: Upsample, paths: Paths, index: pd.DataFrame, benign: pd.DataFrame,
                    malignant: pd.DataFrame, gen: Generated, report_dir: Path) -> dict:
    """Features of real train / val images (sources and synthetic come from `gen`) -> metrics + quality.png."""
    feats = lambda rel: image_features(_read_rgb(paths, rel), cfg.feature_size)  # noqa: E731
    fb, fm = feats(benign["processed_path"]), feats(malignant["processed_path"])
    x_train = np.concatenate([fb, fm])
    y_train = np.concatenate([np.zeros(len(fb), int), np.ones(len(fm), int)])
    val_rows = index.loc[index["split"].eq("val") & pd.to_numeric(index["target"], errors="coerce").isin([0, 1])]
    images, keep = [], []
    for i, rel in enumerate(val_rows["processed_path"]):
        got = _read_rgb(paths, [rel])
        if got:
            images.append(got[0])
            keep.append(i)
    val = None
    if images:
        val = (image_features(images, cfg.feature_size),
               pd.to_numeric(val_rows["target"]).astype(int).to_numpy()[keep])
    q, probs = quality((x_train, y_train), val, gen.source_features, gen.synthetic_features, cfg)
    if probs:
        write_bytes(report_dir / "quality.png", quality_plot(probs, q))
    return q
