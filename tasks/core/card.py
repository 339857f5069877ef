"""The model card of a registered classifier version, as markdown built from plain dicts (pure; no I/O).

`card_inputs(...)` gathers what the card needs from what evaluate already has (the test metrics, the subgroup
table, classifier.json, the index the model was trained and tested on, lineage); `build_card(inputs)` renders
it; `card_description(card)` is the shorter text that fits a registry version's description field (MLflow's
SQL stores cap it at 5,000 characters). Sections: intended use, data lineage (DVC hash, git commit, counts per
source, split and class), the test metrics with bootstrap CIs at the stored operating point, calibration, the
known limits found in those numbers, and last the subgroup table (source, dataset, sex, age band, site),
which is what a too-long description loses first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

DESCRIPTION_LIMIT = 5000  # MLflow's model_versions.description column: String(5000)
SMALL_GROUP = 30  # subgroups with fewer test images than this are flagged as noisy
UNDERPERFORM_AUC = 0.05  # a subgroup whose AUC is this much below the overall AUC is listed as a limit
CARD_FILE = "model_card.md"

INTENDED_USE = (
    "A decision-support research tool: it ranks dermoscopic images of skin lesions by the estimated probability "
    "that the lesion is malignant, to help a trained clinician or researcher decide what to look at first. "
    "**It is not a diagnosis**, not a medical device, and must not be used to rule a lesion in or out "
    "without a clinician's examination (and histopathology where indicated).")
OUT_OF_SCOPE = (
    "Clinical (non-dermoscopic) or wide-field photos scored as close-ups; populations, skin types, cameras or "
    "sites unlike the training data below; any use without a clinician in the loop; children (too few in the "
    "data); screening programmes that have not validated it locally.")


# --------------------------------------------------------------------------- inputs (from evaluate's data)
def data_counts(index: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows per (source, split) of the index a model saw: benign, malignant, and how many were synthetic or
    offline copies (augmented/upsampled), real images counted apart."""
    if index.empty:
        return []
    df = index.copy()
    df["split"] = df["split"].astype(str) if "split" in df else "all"
    synthetic = df["synthetic"].fillna(False).astype(bool) if "synthetic" in df else pd.Series(False, index=df.index)
    copies = (df["augmented_from"].notna() if "augmented_from" in df else pd.Series(False, index=df.index))
    df["_real"] = ~(synthetic | copies)
    df["_target"] = pd.to_numeric(df.get("target"), errors="coerce")
    rows = []
    for (source, split), g in df.groupby(["source", "split"], sort=True):
        real = g[g["_real"]]
        rows.append({"source": str(source), "split": split, "benign": int((real["_target"] == 0).sum()),
                     "malignant": int((real["_target"] == 1).sum()), "real": int(len(real)),
                     "generated": int(len(g) - len(real))})
    return rows


def dataset_counts(index: pd.DataFrame) -> list[dict[str, Any]]:
    """Real rows per `source_dataset` (e.g. HAM10000, ISIC 2020) and class, when the metadata has that column."""
    if "source_dataset" not in index or index.empty:
        return []
    df = index
    if "augmented_from" in df:
        df = df[df["augmented_from"].isna()]
    if "synthetic" in df:
        df = df[~df["synthetic"].fillna(False).astype(bool)]
    target = pd.to_numeric(df["target"], errors="coerce")
    ds = df["source_dataset"].astype("string").fillna("unknown")
    return [{"dataset": str(name), "benign": int((target[ds == name] == 0).sum()),
             "malignant": int((target[ds == name] == 1).sum())} for name in sorted(ds.unique())]


def operating_point_ci(probabilities: Sequence[float], targets: Sequence[int], threshold: float, *,
                       n_bootstrap: int = 1000, ci: float = 0.95, seed: int = 0) -> dict[str, list[float | None]]:
    """Percentile bootstrap CIs of sensitivity, specificity and PPV at a fixed threshold (resampling images)."""
    p = np.asarray(probabilities, float)
    y = np.asarray(targets, int)
    if n_bootstrap <= 0 or len(y) == 0:
        return {}
    rng = np.random.default_rng(seed)
    pred = p >= threshold
    idx = rng.integers(0, len(y), size=(n_bootstrap, len(y)))
    yb, pb = y[idx] == 1, pred[idx]
    tp = (yb & pb).sum(1)
    fn = (yb & ~pb).sum(1)
    tn = (~yb & ~pb).sum(1)
    fp = (~yb & pb).sum(1)
    lo_q, hi_q = (1 - ci) / 2 * 100, (1 + ci) / 2 * 100

    def interval(num: np.ndarray, den: np.ndarray) -> list[float | None]:
        ok = den > 0
        if not ok.any():
            return [None, None]
        vals = num[ok] / den[ok]
        return [float(np.percentile(vals, lo_q)), float(np.percentile(vals, hi_q))]

    return {"sensitivity": interval(tp, tp + fn), "specificity": interval(tn, tn + fp),
            "precision": interval(tp, tp + fp)}


def card_inputs(*, model_name: str, version: str | None, run_id: str | None, metrics: Mapping[str, Any],
                subgroups: pd.DataFrame | Sequence[Mapping[str, Any]], model_config: Mapping[str, Any],
                index: pd.DataFrame, lineage: Mapping[str, Any], op_ci: Mapping[str, Any] | None = None,
                calibration: pd.DataFrame | None = None, created: str | None = None) -> dict[str, Any]:
    """Everything the card shows, as plain JSON-able data (also logged next to the card)."""
    table = subgroups if isinstance(subgroups, pd.DataFrame) else pd.DataFrame(list(subgroups))
    members = [{k: m.get(k) for k in ("name", "arch", "weights", "metadata", "input_size")}
               for m in model_config.get("members") or []]
    calib = [] if calibration is None else [
        {k: _plain(v) for k, v in r.items()} for r in calibration[calibration["count"] > 0].to_dict("records")]
    return {
        "model_name": model_name, "version": None if version is None else str(version), "run_id": run_id,
        "created": created,
        "lineage": dict(lineage),
        "data": {"by_source_split": data_counts(index), "by_dataset": dataset_counts(index)},
        "model": {"members": members, "image_size": model_config.get("image_size"),
                  "tta": model_config.get("tta"), "metadata_inputs": bool(model_config.get("metadata")),
                  "threshold": model_config.get("threshold"),
                  "target_sensitivity": model_config.get("target_sensitivity"),
                  "val_at_threshold": model_config.get("val_at_threshold")},
        "metrics": {k: _plain(v) for k, v in metrics.items() if k != "by_source"},
        "op_ci": dict(op_ci or {}),
        "calibration": calib,
        "subgroups": [{k: _plain(v) for k, v in r.items()} for r in table.to_dict("records")],
    }


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


# --------------------------------------------------------------------------- rendering
def _f(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.{digits}f}"
    return str(v)


def _ci(pair: Sequence[Any] | None) -> str:
    if not pair or pair[0] is None or pair[1] is None:
        return ""
    return f" (CI {_f(pair[0])}–{_f(pair[1])})"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(_f(c) if not isinstance(c, str) else c.replace("|", "/") for c in r) + " |"
            for r in rows]
    return out


def known_limits(inputs: Mapping[str, Any]) -> list[str]:
    """Limits read off the numbers: small test set, noisy or weaker subgroups, missed melanomas, calibration,
    generated training images, missing metadata, a single data source."""
    m = inputs["metrics"]
    out: list[str] = []
    n, n_mal = m.get("n") or 0, m.get("n_malignant") or 0
    if n_mal < 100:
        out.append(f"The test set has {n_mal} malignant of {n} images: every metric of this card has a wide CI; "
                   "read the intervals, not the point values.")
    op = m.get("at_operating_point") or {}
    if op.get("fn"):
        out.append(f"At the operating point it misses {op['fn']} of {n_mal} malignant test lesions "
                   f"(sensitivity {_f(op.get('sensitivity'))}).")
    ece = m.get("ece")
    if ece is not None and ece > 0.05:
        out.append(f"Probabilities are not well calibrated (ECE {_f(ece)}): treat them as a ranking score, not "
                   "as a risk.")
    auc = m.get("auc")
    weak, small, unknown = [], [], []
    for r in inputs.get("subgroups") or []:
        label = f"{r['kind']}={r['group']}"
        if r.get("group") == "unknown" and n and r.get("n", 0) / n > 0.2:
            unknown.append(f"{r['kind']} ({r['n']}/{n})")
        if (r.get("n") or 0) < SMALL_GROUP:
            small.append(label)
        elif auc is not None and r.get("auc") is not None and r["auc"] < auc - UNDERPERFORM_AUC:
            weak.append(f"{label} (AUC {_f(r['auc'])}, n={r['n']})")
    if weak:
        out.append("Weaker subgroups (AUC more than " f"{UNDERPERFORM_AUC:g} below overall): " + ", ".join(weak) + ".")
    if small:
        shown = ", ".join(small[:12]) + (f" and {len(small) - 12} more" if len(small) > 12 else "")
        out.append(f"Subgroups with fewer than {SMALL_GROUP} test images (numbers unreliable): {shown}.")
    if unknown:
        out.append("Metadata missing for more than 20 % of test images in: " + ", ".join(unknown) + ".")
    train = [r for r in inputs["data"]["by_source_split"] if r["split"] == "train"]
    generated = sum(r["generated"] for r in train)
    real = sum(r["real"] for r in train)
    if generated:
        out.append(f"{generated} of {generated + real} training rows are generated (augmented copies or "
                   "synthetic/CycleGAN images); the test split holds real images only.")
    sources = {r["source"] for r in inputs["data"]["by_source_split"]}
    if len(sources) == 1:
        out.append(f"All data come from one source ({next(iter(sources))}); performance elsewhere is untested.")
    out.append("Not validated prospectively, nor on skin types, devices or clinics absent from the data.")
    return out


def build_card(inputs: Mapping[str, Any]) -> str:
    """The model card (markdown) for one model version."""
    name, version = inputs["model_name"], inputs.get("version")
    lin, m, model = inputs["lineage"], inputs["metrics"], inputs["model"]
    op = m.get("at_operating_point") or {}
    ci = inputs.get("op_ci") or {}
    title = f"{name} v{version}" if version else f"{name} (run {inputs.get('run_id')})"
    lines = [f"# Model card: {title}", ""]
    meta = [f"run `{inputs['run_id']}`" if inputs.get("run_id") else None,
            f"created {inputs['created']}" if inputs.get("created") else None]
    if any(meta):
        lines += [" · ".join(x for x in meta if x), ""]
    lines += ["## Intended use", "", INTENDED_USE, "", f"Out of scope: {OUT_OF_SCOPE}", ""]

    lines += ["## Data lineage", ""]
    commit = lin.get("git_commit") or "unknown"
    dirty = " (uncommitted changes in the tree)" if lin.get("git_dirty") else ""
    kind = ("DVC md5 (dvc.lock)" if lin.get("data_hash_source") == "dvc.lock"
            else "sha256 of its index.parquet (no dvc.lock entry)" if lin.get("data_hash_source") == "index-sha256"
            else f"hash ({lin.get('data_hash_source', 'unknown')})")
    lines += [f"- Data: `{lin.get('data_out', 'data')}` {kind} `{lin.get('data_hash') or 'unknown'}`",
              f"- Code: git commit `{commit}`{dirty}",
              f"- Reproduce: `git checkout {commit if lin.get('git_commit') else '<commit>'} && dvc pull && dvc repro`",
              ""]
    counts = inputs["data"]["by_source_split"]
    if counts:
        lines += ["Images per source and split (real images by class; generated = augmented copies and synthetic):",
                  ""]
        lines += _table(["source", "split", "benign", "malignant", "generated"],
                        [[r["source"], r["split"], r["benign"], r["malignant"], r["generated"]] for r in counts])
        lines.append("")
    if inputs["data"].get("by_dataset"):
        lines += ["Real images per source dataset:", ""]
        lines += _table(["dataset", "benign", "malignant"],
                        [[r["dataset"], r["benign"], r["malignant"]] for r in inputs["data"]["by_dataset"]])
        lines.append("")

    lines += ["## Model", ""]
    members = ", ".join(f"{x.get('name')} ({x.get('arch')}{', ' + str(x['weights']) if x.get('weights') else ''}"
                        f"{', +metadata' if x.get('metadata') else ''})" for x in model["members"]) or "–"
    lines += [f"- Members: {members}; image size {_f(model.get('image_size'))} px; TTA {_f(model.get('tta'))}; "
              f"metadata inputs: {_f(model.get('metadata_inputs'))}",
              f"- Operating point: threshold {_f(model.get('threshold'), 4)}, chosen on the validation split for "
              f"sensitivity ≥ {_f(model.get('target_sensitivity'), 2)}", ""]

    lines += ["## Test metrics (frozen test split)", ""]
    rows = [["images (malignant)", f"{_f(m.get('n'))} ({_f(m.get('n_malignant'))})"],
            ["ROC AUC", f"{_f(m.get('auc'))}{_ci([m.get('auc_ci_low'), m.get('auc_ci_high')])}"],
            ["average precision", _f(m.get("average_precision"))],
            ["sensitivity at the operating point", f"{_f(op.get('sensitivity'))}{_ci(ci.get('sensitivity'))}"],
            ["specificity at the operating point", f"{_f(op.get('specificity'))}{_ci(ci.get('specificity'))}"],
            ["precision (PPV) at the operating point", f"{_f(op.get('precision'))}{_ci(ci.get('precision'))}"],
            ["missed malignant (FN) / false alarms (FP)", f"{_f(op.get('fn'))} / {_f(op.get('fp'))}"]]
    lines += _table(["metric", "value (95 % bootstrap CI)"], rows)
    lines += ["", "## Calibration", "",
              f"Expected calibration error (ECE) {_f(m.get('ece'))}, Brier score {_f(m.get('brier'))}.", ""]
    if inputs.get("calibration"):
        lines += _table(["mean predicted", "observed malignant", "images"],
                        [[r.get("mean_predicted"), r.get("fraction_malignant"), r.get("count")]
                         for r in inputs["calibration"]])
        lines.append("")

    lines += ["## Known limits", ""]
    lines += [f"- {x}" for x in known_limits(inputs)]
    lines += ["", "## Subgroups (test split, at the operating point)", ""]
    subs = inputs.get("subgroups") or []
    if subs:
        lines += _table(["kind", "group", "n", "malignant", "AUC", "sensitivity", "specificity", "FN"],
                        [[r["kind"], str(r["group"]), r.get("n"), r.get("n_malignant"), r.get("auc"),
                          r.get("sensitivity_at_op"), r.get("specificity_at_op"), r.get("fn_at_op")] for r in subs])
    else:
        lines.append("No subgroup table.")
    lines.append("")
    return "\n".join(lines)


def card_description(card: str, run_id: str | None = None, limit: int = DESCRIPTION_LIMIT) -> str:
    """The card for the registry's description field: whole when it fits, else cut at a line boundary with a
    pointer to the full artifact."""
    if len(card) <= limit:
        return card
    note = (f"\n\n…cut to fit the registry; the full card is the artifact `{CARD_FILE}` of run `{run_id}` "
            f"(`lesionflow card runs:/{run_id}`)." if run_id else f"\n\n…cut; the full card is `{CARD_FILE}`.")
    budget = limit - len(note)
    cut = card[:budget]
    return cut[:cut.rfind("\n")] + note  # whole lines only: the subgroup table (last) loses its tail rows
