"""The model bundle: THE one scoring path of lesionflow.

`Bundle` = the Keras model + its config (models/classifier.json: preprocessing, size, metadata encoding, TTA,
operating point). The evaluate stage, the promotion gate (`score_model`), `lesionflow predict` and `screen`
(flows/apps/), the MLflow pyfunc and `lesionflow serve` (tasks/tracking.py) and the ugly-duckling ranking all
score through it, so they cannot drift apart:

- `Bundle.predict_frame(df)`: raw images (`path` or encoded `image` bytes, + optional metadata) -> probability,
  prediction at the stored operating point and a per-row `error` (an unreadable, oversized or too small image
  is an error row, never a crash). Decoding is capped at the model's stored `preprocess.max_pixels`.
- `Bundle.predict_processed(files, rows)`: already processed PNGs (the preprocess stage's output) -> the same
  probabilities without re-preprocessing (evaluate).
- `score_model(model, index | params, paths)`: a model on the frozen test split, raw images through its own
  stored preprocessing (the promotion gate compares champion and challenger with it).
- `Scorer`: probabilities and penultimate-layer embeddings of RGB images (ugly duckling, screening).

A model is found from a project folder (`models/`), a `.keras` file with its `.json` beside it, an MLflow model
folder, or a `runs:/` / `models:/` URI (downloaded through tasks/tracking.py, imported only for a URI).
TensorFlow is imported only inside functions.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.core.errors import InputError
from tasks.core.images import DEFAULT_MAX_PIXELS
from tasks.core.io import Paths, read_index
from tasks.core.metrics import score
from tasks.models.inputs import CONFIG_FILE, INPUT_STAGE, MODEL_FILE, encode_metadata, load_images, test_rows

log = logging.getLogger(__name__)

CHUNK = 64
MIN_SIDE = 16  # raw images with a shorter side are an error row: too little lesion to score


class ModelNotFoundError(InputError, FileNotFoundError):
    """No classifier where the user pointed (a FileNotFoundError too, for callers that catch that)."""


# --------------------------------------------------------------------------- raw arrays -> probabilities
def flips(images: np.ndarray, tta: int) -> list[np.ndarray]:
    """The TTA views: identity, then horizontal, vertical and both flips (first max(1, tta))."""
    views = [images, images[:, :, ::-1], images[:, ::-1, :], images[:, ::-1, ::-1]]
    return views[: max(1, tta)]


def _pad(x: np.ndarray, n: int) -> np.ndarray:
    if len(x) == n:
        return np.ascontiguousarray(x)
    return np.concatenate([x, np.zeros((n - len(x), *x.shape[1:]), x.dtype)])


def predict_proba(model: Any, images: np.ndarray, metadata: np.ndarray | None = None, *, tta: int = 0,
                  batch_size: int = 64) -> np.ndarray:
    """Malignant probability per image (float64), averaged over the TTA flips."""
    from tasks.models.classifier import IMAGE_INPUT, METADATA_INPUT, input_names

    if len(images) == 0:
        return np.zeros(0)
    names = input_names(model)
    if METADATA_INPUT in names and metadata is None:
        raise InputError("this model takes metadata (age, sex, site); none given")
    n = len(images)
    out = np.zeros(n)
    views = flips(images, tta)
    for view in views:
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            # Every batch padded to batch_size: one input shape, so the predict function is traced once.
            feeds = {IMAGE_INPUT: _pad(np.asarray(view[start:stop], dtype=np.float32), batch_size)}
            if METADATA_INPUT in names:
                feeds[METADATA_INPUT] = _pad(np.asarray(metadata[start:stop], dtype=np.float32), batch_size)
            out[start:stop] += np.asarray(model.predict_on_batch(feeds)).reshape(-1)[: stop - start]
    return out / len(views)


# --------------------------------------------------------------------------- decoding with limits
def decode_limited(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = MIN_SIDE) -> np.ndarray:
    """Encoded bytes -> uint8 RGB, refusing images over `max_pixels` (from the header, before decoding) or with a
    shorter side under `min_side` (tasks.core.images.ImageRejected, an InputError naming the reason)."""
    from tasks.core.images import decode

    return decode(data, max_pixels=max_pixels, min_side=min_side)


# --------------------------------------------------------------------------- the bundle
@dataclass
class Bundle:
    """A loaded classifier and everything needed to feed it like in training."""

    model: Any
    config: dict[str, Any]
    source: str = ""
    max_pixels: int | None = None  # None: the model's stored preprocess.max_pixels, else DEFAULT_MAX_PIXELS
    min_side: int = MIN_SIDE
    _preprocess: Any = field(default=None, repr=False)

    @classmethod
    def from_files(cls, model_file: str | Path, config_file: str | Path, source: str = "") -> Bundle:
        from tasks.models.classifier import load_keras

        for f in (model_file, config_file):
            if not Path(f).exists():
                raise ModelNotFoundError(f"{f} not found (a model needs classifier.keras and classifier.json)")
        return cls(model=load_keras(model_file), config=json.loads(Path(config_file).read_text()),
                   source=source or str(model_file))

    @property
    def threshold(self) -> float:
        return float(self.config["threshold"])

    @property
    def image_size(self) -> int:
        return int(self.config["image_size"])

    @property
    def tta(self) -> int:
        return int(self.config.get("tta", 0))

    @property
    def pixel_cap(self) -> int:
        """The decode cap: an explicit override, else what training stored, else the project default."""
        if self.max_pixels is not None:
            return int(self.max_pixels)
        stored = (self.config.get("preprocess") or {}).get("max_pixels")
        return int(stored) if stored else int(DEFAULT_MAX_PIXELS)

    def preprocess_config(self) -> Any:
        """The stored Preprocess params (keys this code version no longer knows are dropped, with defaults
        for new ones, so an older model keeps working)."""
        if self._preprocess is None:
            from tasks.core.config import Preprocess

            known = set(Preprocess.model_fields)
            self._preprocess = Preprocess(**{k: v for k, v in self.config["preprocess"].items() if k in known})
        return self._preprocess

    def preprocess(self, image: bytes | np.ndarray) -> np.ndarray:
        """Raw encoded bytes (or an RGB array) -> the model's input image, as the preprocess stage made it.
        Bytes are decoded under the pixel cap and the minimum side."""
        from tasks.core.images import process_image

        if isinstance(image, (bytes, bytearray, memoryview)):
            image = decode_limited(bytes(image), self.pixel_cap, self.min_side)
        img = process_image(image, self.preprocess_config())
        if img.shape[:2] != (self.image_size, self.image_size):
            raise InputError(f"preprocessing gave {img.shape[:2]}, model expects {self.image_size} px")
        return img

    def metadata(self, df: pd.DataFrame) -> np.ndarray | None:
        spec = self.config.get("metadata")
        if not spec:
            return None
        return encode_metadata(df, spec)  # missing columns encode as "unknown"

    def predict_arrays(self, images: np.ndarray, metadata: np.ndarray | None = None) -> np.ndarray:
        """Probabilities for already preprocessed images (N, size, size, 3)."""
        return predict_proba(self.model, images, metadata, tta=self.tta)

    def predict_processed(self, files: Sequence[str | Path], rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, images) of processed image files (the preprocess stage's PNGs), metadata from `rows`."""
        images = load_images([str(f) for f in files], self.image_size)
        return self.predict_arrays(images, self.metadata(rows.reset_index(drop=True))), images

    def predict_frame(self, df: pd.DataFrame) -> pd.DataFrame:
        """Rows with `path` (image file) or `image` (encoded bytes), optionally age_approx / sex / site ->
        probability_malignant, prediction (at the stored operating point), error; same row order."""
        if "path" not in df and "image" not in df:
            raise InputError("input needs a `path` column (image files) or an `image` column (encoded bytes)")
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
    raise InputError("row has neither an image nor a path")


# --------------------------------------------------------------------------- finding a model
def find_model_files(folder: Path) -> tuple[Path, Path] | None:
    """classifier.keras + classifier.json directly in `folder`, or in an MLflow model's artifacts/."""
    for cand in (folder, folder / "artifacts", folder / "models"):
        if (cand / MODEL_FILE).exists():
            return cand / MODEL_FILE, cand / CONFIG_FILE
    return None


def is_uri(model: str | Path) -> bool:
    """runs:/..., models:/..., s3://... (a scheme of 2+ letters, so C:/ stays a path)."""
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:/", str(model))) and not Path(str(model)).exists()


def load_bundle(model: str | Path, root: Path | None = None, *,
                download: Callable[[str, Path], str] | None = None) -> Bundle:
    """A Bundle from a path (models/ folder, .keras file, MLflow model folder) or an MLflow URI.

    URIs need `download` (models sit below tracking and never import mlflow): call
    `tasks.tracking.load_bundle`, which passes MLflow's downloader.
    """
    if is_uri(model):
        if download is None:
            raise InputError(f"{model}: an MLflow URI; load it through tasks.tracking.load_bundle")
        local = Path(download(str(model), Path(root or Path.cwd())))
        found = find_model_files(local)
        if found is None:
            raise ModelNotFoundError(f"{model}: downloaded to {local} but no classifier.keras inside; was it "
                                     "logged by `lesionflow stage evaluate`?")
        return Bundle.from_files(*found, source=str(model))
    path = Path(model)
    if path.is_dir():
        found = find_model_files(path)
        if found is None:
            raise ModelNotFoundError(f"{path}: no classifier.keras here (nor in artifacts/); run `lesionflow stage "
                                     "train` or pass the model file")
        return Bundle.from_files(*found, source=str(path))
    if path.suffix == ".keras":
        return Bundle.from_files(path, path.with_suffix(".json"), source=str(path))
    raise ModelNotFoundError(f"{model}: not a model folder, .keras file, runs:/ or models:/ URI")


# --------------------------------------------------------------------------- the promotion gate's scorer
def score_predictions(probabilities: Sequence[float], targets: Sequence[int], threshold: float, *,
                      n_bootstrap: int = 1000, ci: float = 0.95, seed: int = 0, bins: int = 10) -> dict[str, Any]:
    """`tasks.core.metrics.score` at the model's operating point (what evaluate and the gate both report)."""
    return score(probabilities, targets, threshold=threshold, n_bootstrap=n_bootstrap, ci=ci, seed=seed, bins=bins)


def score_model(model: str | Path | Bundle, index_or_params: pd.DataFrame | Any, paths: Paths, *,
                n_bootstrap: int | None = None, seed: int = 0, with_predictions: bool = False) -> dict[str, Any]:
    """Score any model (Bundle, folder/.keras path, runs:/ or models:/ URI) on the frozen test split.

    `index_or_params`: an index table (its test rows are used), or params with an `evaluate` section (then
    data/<INPUT_STAGE>/index.parquet under paths, and evaluate's bootstrap count and seed). Each model applies its
    own stored preprocessing to the raw images (`path`), exactly as `predict` does, so a champion trained at
    another size or with other preprocessing is scored on the same test images. Top-level `auc`,
    `false_negatives`, `false_positives`, `sensitivity`, `specificity` are at the model's own operating point.
    """
    if isinstance(index_or_params, pd.DataFrame):
        index_df, n_boot = index_or_params, 1000 if n_bootstrap is None else n_bootstrap
    else:
        index_df = read_index(paths, INPUT_STAGE)
        n_boot = index_or_params.evaluate.bootstrap if n_bootstrap is None else n_bootstrap
        seed = index_or_params.evaluate.seed
    rows = test_rows(index_df)
    if rows.empty:
        raise InputError("no labelled test rows in the index")
    if "path" not in rows:
        raise InputError("index has no `path` column (raw image path); pass an index from ingest or later")
    bundle = model if isinstance(model, Bundle) else load_bundle(model, paths.root)
    meta_cols = [c for c in ("age_approx", "sex", "anatom_site_1", "anatom_site_general") if c in rows]
    preds = bundle.predict_frame(pd.DataFrame({"path": [str(paths.abs(p)) for p in rows["path"]],
                                               **{c: rows[c].to_numpy() for c in meta_cols}}))
    ok = preds["error"].isna().to_numpy()
    out = score_predictions(preds.loc[ok, "probability_malignant"], rows.loc[ok, "target"], bundle.threshold,
                            n_bootstrap=n_boot, seed=seed)
    op = out["at_operating_point"]
    out.update({"false_negatives": op["fn"], "false_positives": op["fp"], "sensitivity": op["sensitivity"],
                "specificity": op["specificity"], "n_errors": int((~ok).sum()),
                "model": bundle.source if isinstance(model, Bundle) else str(model)})
    if with_predictions:
        out["predictions"] = pd.DataFrame({"source": rows["source"], "isic_id": rows["isic_id"],
                                           "target": rows["target"],
                                           "probability_malignant": preds["probability_malignant"],
                                           "error": preds["error"]}).to_dict("records")
    return out


# --------------------------------------------------------------------------- embeddings
def feature_layer_output(member: Any) -> Any:
    """The penultimate representation of a member: `lf_features` if present, else the input of the last Dense."""
    import keras

    from tasks.models.classifier import FEATURES

    try:
        return member.get_layer(FEATURES).output
    except ValueError:
        dense = [layer for layer in member.layers if isinstance(layer, keras.layers.Dense)]
        if not dense:
            raise ValueError(f"model {member.name!r} has neither an `{FEATURES}` layer nor a Dense head") from None
        return dense[-1].input


def embedding_model(model: Any) -> Any:
    """keras.Model: model inputs -> penultimate features (members of an ensemble concatenated)."""
    import keras

    from tasks.models.classifier import input_names, member_models

    inputs = dict(zip(input_names(model), model.inputs))
    members = member_models(model)
    if members == [model]:  # a bare member: its own feature layer
        return keras.Model(inputs, feature_layer_output(model), name="embedding")
    outs = []
    for member in members:
        sub = keras.Model(dict(zip(input_names(member), member.inputs)), feature_layer_output(member))
        outs.append(sub({k: inputs[k] for k in input_names(sub)}))
    out = outs[0] if len(outs) == 1 else keras.layers.Concatenate(name="lf_embedding")(outs)
    return keras.Model(inputs, out, name="embedding")


@dataclass
class Scorer:
    """Probabilities and embeddings for RGB images of any size, through a model bundle's own preprocessing."""

    bundle: Bundle
    _embed: Any = field(default=None, repr=False)

    def prepare(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """RGB arrays -> (n, size, size, 3) model inputs, preprocessed exactly like training images."""
        return np.stack([self.bundle.preprocess(np.ascontiguousarray(im)) for im in images])

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        return self.bundle.predict_arrays(batch, self._metadata(len(batch)))

    def embeddings(self, batch: np.ndarray, batch_size: int = 64) -> np.ndarray:
        from tasks.models.classifier import IMAGE_INPUT, METADATA_INPUT

        if self._embed is None:
            self._embed = embedding_model(self.bundle.model)
        names = [t.name for t in self._embed.inputs]
        meta = self._metadata(len(batch))
        parts = []
        for start in range(0, len(batch), batch_size):
            feeds = {IMAGE_INPUT: np.asarray(batch[start:start + batch_size], np.float32)}
            if METADATA_INPUT in names:
                feeds[METADATA_INPUT] = meta[start:start + batch_size]
            parts.append(np.asarray(self._embed.predict_on_batch(feeds)))
        return np.concatenate(parts) if parts else np.zeros((0, 0))

    def _metadata(self, n: int) -> np.ndarray | None:
        # Patches and wide-field crops carry no age/sex/site: a dual-input model gets them as "unknown".
        return self.bundle.metadata(pd.DataFrame(index=range(n))) if self.bundle.config.get("metadata") else None
