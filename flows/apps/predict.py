"""`lesionflow predict`: score image files/folders with a trained classifier, one CSV row per file.

Thin: collect the inputs, load the model bundle (tasks/models/bundle.py: the one scoring path, with the model's
stored preprocessing), score, write the table. A file that cannot be read, is corrupt, is over the pixel cap
(`--max-pixels`, default the model's stored preprocess.max_pixels) or is smaller than the minimum side is a row
with `error` and no score; the other files are still scored.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from tasks.core.errors import InputError
from tasks.core.io import write_table
from tasks.models.bundle import Bundle, is_uri
from tasks.tracking import load_bundle  # paths and MLflow URIs alike

__all__ = ["Bundle", "collect_inputs", "is_uri", "load_bundle", "predict", "predict_files"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
OUTPUT_COLUMNS = ["isic_id", "path", "probability_malignant", "prediction", "error"]


def collect_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders walked recursively for image files (sorted); a missing input is kept so it
    gets an error row."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)
    return out


def predict_files(bundle: Bundle, files: Sequence[Path]) -> pd.DataFrame:
    """isic_id (file stem), path, probability_malignant, prediction, error per file."""
    res = bundle.predict_frame(pd.DataFrame({"path": [str(f) for f in files]}))
    res.insert(0, "path", [str(f) for f in files])
    res.insert(0, "isic_id", [f.stem for f in files])
    return res[OUTPUT_COLUMNS]


def predict(model: str | Path, inputs: Sequence[str | Path], out: str | Path, root: Path | None = None,
            max_pixels: int | None = None) -> dict:
    """The `lesionflow predict` command: score files/folders, write a CSV, return a summary."""
    files = collect_inputs(inputs)
    if not files:
        raise InputError(f"no images found in {list(map(str, inputs))}")
    bundle = load_bundle(model, root)
    if max_pixels:
        bundle.max_pixels = max_pixels
    res = predict_files(bundle, files)
    write_table(res, Path(out))
    return {"model": bundle.source, "images": len(res), "errors": int(res["error"].notna().sum()),
            "predicted_malignant": int((res["prediction"] == 1).sum()), "threshold": bundle.threshold,
            "max_pixels": bundle.pixel_cap, "out": str(out)}
