"""The nightly drift report: how does the data a challenger saw differ from the data the champion was trained on?

Reference: the champion's own data rows, logged by evaluate with its model card (tracking.DATA_ROWS_ARTIFACT:
metadata and raw image paths of every row; the reference is its real `train` rows). New: the real rows of the
current data/<INPUT_STAGE> index that the champion never saw. tasks/core/drift.py runs the checks (metadata
chi-square/KS, image statistics, a two-sample classifier on the champion's own embedding + MMD); this module
loads the data, samples images, draws the plots, logs the report as an MLflow run (`drift` stage: drift.json,
drift.md, PNGs under `drift/`; copies in reports/drift/) and returns the summary the nightly flow puts into its
promotion-log line. nightly.yaml `drift:` holds the thresholds and `allow_drifted_promotion`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from tasks.core import drift as D
from tasks.core.io import Paths, write_json, write_text

log = logging.getLogger(__name__)

REPORT_DIR = "reports/drift"
CHUNK = 64


class DriftConfig(BaseModel):
    """nightly.yaml `drift:` — when a night's new data counts as drifted, and what that does to promotion."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    allow_drifted_promotion: bool = False  # a drifted night may still move the alias (else: held, with reasons)
    alpha: float = Field(default=0.01, gt=0, lt=1)  # p-value below which a difference is significant ...
    categorical_effect: float = Field(default=0.1, ge=0, le=1)  # ... and Cramér's V at least this (sex, site, ...)
    numeric_effect: float = Field(default=0.1, ge=0, le=1)  # ... KS D at least this (age)
    image_effect: float = Field(default=0.5, ge=0)  # ... |SMD| at least this (brightness, colour, size)
    embedding_auc: float = Field(default=0.7, ge=0.5, le=1)  # ... new-vs-reference classifier AUC at least this
    min_new: int = Field(default=20, ge=1)  # fewer new images: reported, never called drift
    max_images: int = Field(default=500, ge=0)  # images sampled per side for statistics + embeddings (0 = none)
    embedding: bool = True  # the champion's embedding (loads the model; TensorFlow)
    seed: int = 0

    def thresholds(self) -> D.Thresholds:
        return D.Thresholds(alpha=self.alpha, categorical_effect=self.categorical_effect,
                            numeric_effect=self.numeric_effect, image_effect=self.image_effect,
                            embedding_auc=self.embedding_auc, min_new=self.min_new)


# --------------------------------------------------------------------------- rows
def real_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows that are real images: no augmented copies, no synthetic (CycleGAN/fake) rows."""
    keep = pd.Series(True, index=df.index)
    if "augmented_from" in df:
        keep &= df["augmented_from"].isna()
    if "synthetic" in df:
        keep &= ~df["synthetic"].fillna(False).astype(bool)
    return df[keep]


def split_new(current: pd.DataFrame, reference_all: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(reference, new): the reference's real train rows (all its real rows when it has no split), and the current
    real rows whose (source, isic_id) the reference never had."""
    ref = real_rows(reference_all)
    if "split" in ref and (ref["split"] == "train").any():
        ref = ref[ref["split"] == "train"]
    seen = set(zip(reference_all["source"].astype(str), reference_all["isic_id"].astype(str)))
    cur = real_rows(current)
    mask = [k not in seen for k in zip(cur["source"].astype(str), cur["isic_id"].astype(str))]
    return ref.reset_index(drop=True), cur[mask].reset_index(drop=True)


def sample(df: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    return df if len(df) <= n else df.sample(n=n, random_state=seed).sort_index()


# --------------------------------------------------------------------------- images
def _images(paths: Paths, rows: pd.DataFrame) -> Iterator[tuple[int, np.ndarray]]:
    from tasks.core.images import decode_file

    for i, rel in enumerate(rows["path"].astype(str)):
        try:
            yield i, decode_file(paths.abs(rel))
        except (OSError, ValueError) as exc:
            log.warning("drift: skipping %s (%s)", rel, exc)


def image_features(paths: Paths, rows: pd.DataFrame, embed: Callable[[list[np.ndarray]], np.ndarray] | None
                   ) -> tuple[pd.DataFrame, np.ndarray | None]:
    """Image statistics per readable row (raw images: size and colour as they arrive), and the embedding of the
    same images when `embed` is given (a list of RGB arrays -> features), in chunks."""
    stats: list[dict[str, float]] = []
    feats: list[np.ndarray] = []
    chunk: list[np.ndarray] = []
    for _, img in _images(paths, rows):
        stats.append(D.image_stats(img))
        if embed is not None:
            chunk.append(img)
            if len(chunk) == CHUNK:
                feats.append(embed(chunk))
                chunk = []
    if embed is not None and chunk:
        feats.append(embed(chunk))
    emb = np.concatenate(feats) if feats else None
    return pd.DataFrame(stats, columns=list(D.IMAGE_STATS)), emb


def champion_embedder(root: Path, model_uri: str) -> Callable[[list[np.ndarray]], np.ndarray]:
    """RGB arrays -> the champion's penultimate features, through its own preprocessing (tasks.models.bundle)."""
    from tasks import tracking
    from tasks.models.bundle import Scorer

    scorer = Scorer(tracking.load_bundle(model_uri, root))
    return lambda images: scorer.embeddings(scorer.prepare(images))


# --------------------------------------------------------------------------- compare + plots
def compare(root: Path, reference: pd.DataFrame, new: pd.DataFrame, cfg: DriftConfig,
            embed: Callable[[list[np.ndarray]], np.ndarray] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The report for two sets of index rows, and the data its plots need."""
    paths = Paths(root)
    data: dict[str, Any] = {"reference": D.metadata_frame(reference), "new": D.metadata_frame(new)}
    kwargs: dict[str, Any] = {}
    if cfg.max_images and "path" in reference and "path" in new and len(new):
        ref_s, new_s = sample(reference, cfg.max_images, cfg.seed), sample(new, cfg.max_images, cfg.seed)
        ref_stats, ref_emb = image_features(paths, ref_s, embed)
        new_stats, new_emb = image_features(paths, new_s, embed)
        kwargs.update(reference_images=ref_stats, new_images=new_stats, reference_features=ref_emb,
                      new_features=new_emb)
        data.update(kwargs)
    report = D.drift_report(reference, new, thresholds=cfg.thresholds(), seed=cfg.seed, **kwargs)
    return report, data


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_report(report: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """metadata.png (category shares and age, reference vs new), images.png (image statistics), embedding.png
    (the two sets in the first two principal components of the champion's features)."""
    plt = _plt()
    figs: dict[str, Any] = {}
    meta = report["metadata"]
    cats = [c for c in D.CATEGORICAL if c in meta]
    panels = cats + (["age_approx"] if "age_approx" in meta else [])
    if panels:
        cols = 3
        rows = (len(panels) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
        for ax in axes.ravel()[len(panels):]:
            ax.axis("off")
        for ax, col in zip(axes.ravel(), panels):
            c = meta[col]
            flag = " DRIFT" if c.get("drift") else ""
            p = c.get("p_value")
            title = f"{col}{flag}\np={p:.2g}, effect {c['effect']:.2f}" if p is not None else col
            if col == "age_approx":
                bins = np.arange(0, 95, 5)
                for side, colour in (("reference", "tab:blue"), ("new", "tab:orange")):
                    vals = data[side]["age_approx"].dropna()
                    if len(vals):
                        ax.hist(vals, bins=bins, density=True, alpha=0.5, color=colour, label=side)
                ax.set_xlabel("age")
            else:
                keys = c["categories"][:12]
                x = np.arange(len(keys))
                ax.bar(x - 0.2, [c["reference"][k] for k in keys], 0.4, label="reference", color="tab:blue")
                ax.bar(x + 0.2, [c["new"][k] for k in keys], 0.4, label="new", color="tab:orange")
                ax.set_xticks(x, [k[:14] for k in keys], rotation=35, ha="right", fontsize=7)
                ax.set_ylabel("share")
            ax.set_title(title, fontsize=9, color="red" if flag else "black")
            ax.legend(fontsize=7)
        fig.suptitle(f"Metadata: {report['n_new']} new vs {report['n_reference']} reference rows", fontsize=10)
        fig.tight_layout()
        figs["metadata"] = fig
    ref_img, new_img = data.get("reference_images"), data.get("new_images")
    if report["images"] and ref_img is not None and new_img is not None:
        keys = list(report["images"])
        fig, axes = plt.subplots(2, 4, figsize=(16, 6.4), squeeze=False)
        for ax in axes.ravel()[len(keys):]:
            ax.axis("off")
        for ax, col in zip(axes.ravel(), keys):
            c = report["images"][col]
            both = np.r_[ref_img[col].to_numpy(), new_img[col].to_numpy()]
            bins = np.linspace(both.min(), both.max() + 1e-9, 30)
            ax.hist(ref_img[col], bins=bins, density=True, alpha=0.5, label="reference", color="tab:blue")
            ax.hist(new_img[col], bins=bins, density=True, alpha=0.5, label="new", color="tab:orange")
            flag = " DRIFT" if c.get("drift") else ""
            eff = c.get("effect")
            ax.set_title(f"{col}{flag}\nSMD {eff:+.2f}" if isinstance(eff, float) else col, fontsize=9,
                         color="red" if flag else "black")
            ax.legend(fontsize=7)
        fig.suptitle("Image statistics (raw images)", fontsize=10)
        fig.tight_layout()
        figs["images"] = fig
    ref_f, new_f = data.get("reference_features"), data.get("new_features")
    if ref_f is not None and new_f is not None and len(ref_f) and len(new_f) and report["embedding"]:
        z = np.concatenate([ref_f, new_f]).astype(float)
        z = z - z.mean(0)
        _, _, vt = np.linalg.svd(z, full_matrices=False)
        pc = z @ vt[:2].T if vt.shape[0] >= 2 else np.c_[z @ vt[:1].T, np.zeros(len(z))]
        fig, ax = plt.subplots(figsize=(5.5, 5))
        ax.scatter(pc[:len(ref_f), 0], pc[:len(ref_f), 1], s=8, alpha=0.5, label="reference", color="tab:blue")
        ax.scatter(pc[len(ref_f):, 0], pc[len(ref_f):, 1], s=8, alpha=0.5, label="new", color="tab:orange")
        c = report["embedding"]["classifier"]
        mmd = report["embedding"].get("mmd") or {}
        auc = f"{c['auc']:.3f}" if c.get("auc") is not None else "n/a"
        extra = f", MMD² {mmd['mmd2']:.3g} (p={mmd['p_value']:.2g})" if mmd.get("mmd2") is not None else ""
        ax.set(title=f"Champion embedding (PCA)\nclassifier AUC {auc}{extra}", xlabel="PC1", ylabel="PC2")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        figs["embedding"] = fig
    return figs


def markdown(report: dict[str, Any], title: str) -> str:
    """drift.md: the verdict, the reasons, and one table per kind of check."""
    lines = [f"# {title}", "", f"**{report['status']}** — {report['n_new']} new vs {report['n_reference']} "
             "reference rows.", ""]
    if report.get("reasons"):
        lines += ["Drift:", ""] + [f"- {r}" for r in report["reasons"]] + [""]
    if report.get("note"):
        lines += [report["note"], ""]

    def table(title: str, checks: dict[str, Any]) -> None:
        if not checks:
            return
        nonlocal lines
        lines += [f"## {title}", "", "| check | test | p-value | effect | drift |", "|---|---|---|---|---|"]
        for name, c in checks.items():
            p, e = c.get("p_value"), c.get("effect")
            lines.append(f"| {name} | {c.get('test')} | {'–' if p is None else f'{p:.3g}'} | "
                         f"{'–' if e is None else f'{e:.3f}'} ({c.get('effect_name', '')}) | "
                         f"{'**yes**' if c.get('drift') else 'no'} |")
        lines.append("")

    table("Metadata", report["metadata"])
    table("Image statistics", report["images"])
    table("Embedding", {k: {**v, "effect": v.get("effect", v.get("mmd2"))} for k, v in report["embedding"].items()})
    t = report["thresholds"]
    lines += [f"Thresholds: p < {t['alpha']} and Cramér's V ≥ {t['categorical_effect']}, KS D ≥ "
              f"{t['numeric_effect']}, |SMD| ≥ {t['image_effect']}, classifier AUC ≥ {t['embedding_auc']}; "
              f"at least {t['min_new']} new rows.", ""]
    return "\n".join(lines)


def write_report(out: Path, report: dict[str, Any], figures: dict[str, Any], title: str) -> list[Path]:
    """drift.json, drift.md and <name>.png under `out`; returns the files."""
    plt = _plt()
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "drift.json", out / "drift.md"]
    write_json(files[0], report)
    write_text(files[1], markdown(report, title))
    for name, fig in figures.items():
        fig.savefig(out / f"{name}.png", dpi=100)
        plt.close(fig)
        files.append(out / f"{name}.png")
    return files


def _metrics(report: dict[str, Any]) -> dict[str, float]:
    m: dict[str, float] = {"drift.drifted": float(report["drifted"]), "drift.n_new": report["n_new"],
                           "drift.n_reference": report["n_reference"]}
    for kind in ("metadata", "images", "embedding"):
        for name, c in report[kind].items():
            for key in ("p_value", "effect", "mmd2"):
                v = c.get(key)
                if isinstance(v, (int, float)) and np.isfinite(v):
                    m[f"drift.{kind}.{name}.{key}"] = float(v)
    return m


# --------------------------------------------------------------------------- the nightly step
def _skip(reason: str, **extra: Any) -> dict[str, Any]:
    return {"status": "skipped", "drifted": False, "reasons": [], "note": reason, **extra}


def load_reference(root: Path, model_name: str, version: str) -> pd.DataFrame | None:
    """The data rows logged with a version's model card (None when it was registered without them)."""
    from tasks import tracking  # mlflow: heavy

    info = tracking.version_info(model_name, version, root=root)
    local = tracking.read_run_artifact(info["run_id"], tracking.DATA_ROWS_ARTIFACT, root)
    return pd.read_parquet(local) if local is not None and local.is_file() else None


def drift_check(root: Path, cfg: DriftConfig, model_name: str, champion: str | None, *,
                log_mlflow: bool = True) -> dict[str, Any]:
    """Compare the current data with the champion's; write reports/drift/, log an MLflow `drift` run; return the
    summary for the promotion log ({status, drifted, reasons, n_new, n_reference, champion, run_id, report})."""
    from tasks.models.inputs import INPUT_STAGE

    paths = Paths(root)
    if not cfg.enabled:
        return _skip("disabled in nightly.yaml (drift.enabled: false)")
    if champion is None:
        return _skip("no champion yet: nothing to compare with")
    index_file = paths.index(INPUT_STAGE)
    if not index_file.exists():
        return _skip(f"no {paths.rel(index_file)}: nothing reproduced to compare")
    reference_all = load_reference(root, model_name, champion)
    if reference_all is None:
        return _skip(f"champion v{champion} has no data rows logged with its model card (registered before drift "
                     "reports)", champion=champion)
    reference, new = split_new(pd.read_parquet(index_file), reference_all)
    embed = None
    if cfg.embedding and cfg.max_images and len(new) >= cfg.min_new:
        embed = champion_embedder(root, f"models:/{model_name}/{champion}")
    report, data = compare(root, reference, new, cfg, embed)
    report["champion"] = champion
    title = f"Drift: new data vs the data of {model_name} v{champion}"
    files = write_report(root / REPORT_DIR, report, plot_report(report, data), title)
    summary = {k: report.get(k) for k in ("status", "drifted", "reasons", "n_new", "n_reference", "note")}
    summary.update(champion=champion, report=str(Path(REPORT_DIR) / "drift.md"))
    if log_mlflow:
        from tasks import tracking  # mlflow: heavy

        out = tracking.log_stage_run("drift", {"drift": cfg}, paths, metrics=_metrics(report), artifacts=files,
                                     artifact_path="drift", run_name=f"drift vs {model_name} v{champion}",
                                     tags={"champion_version": str(champion), "drift.status": report["status"]})
        summary["run_id"] = out["mlflow_run_id"]
    return summary


def safe_drift_check(root: Path, cfg: DriftConfig, model_name: str, champion: str | None) -> dict[str, Any]:
    """drift_check that never fails the night: an error is reported (status `error`) and does not hold
    promotion."""
    try:
        return drift_check(root, cfg, model_name, champion)
    except Exception as exc:  # the report is evidence for the gate, not a stage: record and carry on
        log.exception("drift report failed")
        return {"status": "error", "drifted": False, "reasons": [], "error": f"{type(exc).__name__}: {exc}",
                "champion": champion}


def drift_now(root: Path | str, config: str = "nightly.yaml", version: str | None = None) -> dict[str, Any]:
    """`lesionflow drift [--version V]`: the report for the current data against the champion (or version V)."""
    from flows.nightly import load_nightly
    from tasks import tracking  # mlflow: heavy

    root = Path(root).resolve()
    ncfg = load_nightly(root / config)
    champion = version or tracking.get_alias(ncfg.model_name, ncfg.alias, root=root)
    return drift_check(root, ncfg.drift, ncfg.model_name, champion)


def report_lines(summary: dict[str, Any]) -> Sequence[str]:
    """Human lines for logs: status and reasons."""
    head = f"drift {summary['status']}"
    if summary.get("n_new") is not None:
        head += f": {summary['n_new']} new vs {summary['n_reference']} reference rows"
    if summary.get("note"):
        head += f" ({summary['note']})"
    return [head, *(summary.get("reasons") or [])]
