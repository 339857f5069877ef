"""Score raw images with a trained classifier, applying exactly the preprocessing stored with it.

`Bundle` = the Keras model + its config (models/classifier.json: preprocessing, size, metadata encoding, TTA,
operating point). It is what `lesionflow predict`, the MLflow pyfunc (tasks/tracking.py) and
`evaluate.score_model` all use, so the three cannot drift apart. A model is found from a project folder
(`models/`), a `.keras` file with its `.json` beside it, an MLflow model folder, or a `runs:/` / `models:/`
URI (downloaded through tasks/tracking.py). An unreadable image yields a row with `error`, never a crash.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from tasks.core.io import write_table

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
OUTPUT_COLUMNS = ["isic_id", "path", "probability_malignant", "prediction", "error"]
CHUNK = 64


@dataclass
class Bundle:
    """A loaded classifier and everything needed to feed it like in training."""

    model: Any
    config: dict[str, Any]
    source: str = ""
    _preprocess: Any = field(default=None, repr=False)

    @classmethod
    def from_files(cls, model_file: str | Path, config_file: str | Path, source: str = "") -> "Bundle":
        from tasks.models.classifier import load_keras

        for f in (model_file, config_file):
            if not Path(f).exists():
                raise FileNotFoundError(f"{f} not found (a model needs classifier.keras and classifier.json)")
        return cls(model=load_keras(model_file), config=json.loads(Path(config_file).read_text()),
                   source=source or str(model_file))

    @property
    def threshold(self) -> float:
        return float(self.config["threshold"])

    @property
    def image_size(self) -> int:
        return int(self.config["image_size"])

    def preprocess_config(self) -> Any:
        """The stored Preprocess params (keys this code version no longer knows are dropped, with defaults
        for new ones, so an older model keeps working)."""
        if self._preprocess is None:
            from tasks.core.config import Preprocess

            known = set(Preprocess.model_fields)
            self._preprocess = Preprocess(**{k: v for k, v in self.config["preprocess"].items() if k in known})
        return self._preprocess

    def preprocess(self, image: bytes | np.ndarray) -> np.ndarray:
        """Raw encoded bytes (or an RGB array) -> the model's input image, as the preprocess stage made it."""
        from tasks.core.images import process_image

        img = process_image(image, self.preprocess_config())
        if img.shape[:2] != (self.image_size, self.image_size):
            raise ValueError(f"preprocessing gave {img.shape[:2]}, model expects {self.image_size} px")
        return img

    def metadata(self, df: pd.DataFrame) -> np.ndarray | None:
        spec = self.config.get("metadata")
        if not spec:
            return None
        from tasks.train import encode_metadata

        return encode_metadata(df, spec)  # missing columns encode as "unknown"

    def predict_arrays(self, images: np.ndarray, metadata: np.ndarray | None = None) -> np.ndarray:
        """Probabilities for already preprocessed images (N, size, size, 3)."""
        from tasks.train import predict_proba

        return predict_proba(self.model, images, metadata, tta=int(self.config.get("tta", 0)))

    def predict_frame(self, df: pd.DataFrame) -> pd.DataFrame:
        """Rows with `path` (image file) or `image` (encoded bytes), optionally age_approx / sex / site ->
        probability_malignant, prediction (at the stored operating point), error; same row order."""
        if "path" not in df and "image" not in df:
            raise ValueError("input needs a `path` column (image files) or an `image` column (encoded bytes)")
        n = len(df)
        probs = np.full(n, np.nan)
        errors: list[str | None] = [None] * n
        meta_all = self.metadata(df.reset_index(drop=True))
        for start in range(0, n, CHUNK):
            stop = min(n, start + CHUNK)
            ok_idx, imgs = [], []
            for i in range(start, stop):
                try:
                    imgs.append(self.preprocess(_image_bytes(df, i)))
                    ok_idx.append(i)
                except Exception as exc:  # noqa: BLE001 - one bad image is a row with an error, not a crash
                    errors[i] = f"{type(exc).__name__}: {exc}"
            if ok_idx:
                meta = None if meta_all is None else meta_all[ok_idx]
                probs[ok_idx] = self.predict_arrays(np.stack(imgs), meta)
        pred = pd.array([None if np.isnan(p) else int(p >= self.threshold) for p in probs], dtype="Int64")
        return pd.DataFrame({"probability_malignant": probs, "prediction": pred,
                             "error": pd.array(errors, dtype="string")})


def _image_bytes(df: pd.DataFrame, i: int) -> bytes:
    if "image" in df:
        value = df["image"].iloc[i]
        if value is not None and not (isinstance(value, float) and np.isnan(value)):
            if isinstance(value, str):  # base64 text, as JSON clients send it
                import base64

                return base64.b64decode(value)
            return bytes(value)
    if "path" in df:
        path = df["path"].iloc[i]
        if isinstance(path, str) and path:
            return Path(path).read_bytes()
    raise ValueError("row has neither an image nor a path")


def _find_model_files(folder: Path) -> tuple[Path, Path] | None:
    """classifier.keras + classifier.json directly in `folder`, or in an MLflow model's artifacts/."""
    from tasks.train import CONFIG_FILE, MODEL_FILE

    for cand in (folder, folder / "artifacts", folder / "models"):
        if (cand / MODEL_FILE).exists():
            return cand / MODEL_FILE, cand / CONFIG_FILE
    return None


def is_uri(model: str | Path) -> bool:
    """runs:/..., models:/..., s3://... (a scheme of 2+ letters, so C:/ stays a path)."""
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:/", str(model))) and not Path(str(model)).exists()


def load_bundle(model: str | Path, root: Path | None = None) -> Bundle:
    """A Bundle from a path (models/ folder, .keras file, MLflow model folder) or an MLflow URI."""
    if is_uri(model):
        from tasks import tracking

        local = Path(tracking.download_model(str(model), root or Path.cwd()))
        found = _find_model_files(local)
        if found is None:
            raise FileNotFoundError(f"{model}: downloaded to {local} but no classifier.keras inside; was it logged "
                                    "by `lesionflow stage evaluate`?")
        return Bundle.from_files(*found, source=str(model))
    path = Path(model)
    if path.is_dir():
        found = _find_model_files(path)
        if found is None:
            raise FileNotFoundError(f"{path}: no classifier.keras here (nor in artifacts/); run `lesionflow stage "
                                    "train` or pass the model file")
        return Bundle.from_files(*found, source=str(path))
    if path.suffix == ".keras":
        return Bundle.from_files(path, path.with_suffix(".json"), source=str(path))
    raise FileNotFoundError(f"{model}: not a model folder, .keras file, runs:/ or models:/ URI")


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


def predict(model: str | Path, inputs: Sequence[str | Path], out: str | Path, root: Path | None = None) -> dict:
    """The `lesionflow predict` command: score files/folders, write a CSV, return a summary."""
    files = collect_inputs(inputs)
    if not files:
        raise ValueError(f"no images found in {list(map(str, inputs))}")
    bundle = load_bundle(model, root)
    res = predict_files(bundle, files)
    write_table(res, Path(out))
    return {"model": bundle.source, "images": len(res), "errors": int(res["error"].notna().sum()),
            "predicted_malignant": int((res["prediction"] == 1).sum()), "threshold": bundle.threshold,
            "out": str(out)}
