"""Keras builders for the lesion classifier: small CNN, keras.applications backbones, dual input, ensemble.

Every builder takes explicit arguments (no params objects, no globals). Layers this module adds are named
`lf_*` so training code can tell head from backbone; `lf_features` is the pooled image embedding,
`lf_logit` the pre-sigmoid score and `lf_prob` the malignant probability (float32 even under mixed precision).
Images enter every model as float32 RGB in [0, 255]; each backbone's own input scaling lives inside the model
(`BackbonePreprocess`), so a saved model needs nothing but the square image of the stored size.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.core.errors import InputError

if TYPE_CHECKING:  # annotations only; keras (and TF) load on first use
    import keras

IMAGE_INPUT = "image"
METADATA_INPUT = "metadata"
FEATURES = "lf_features"
LOGIT = "lf_logit"
PROB = "lf_prob"

# arch -> (keras.applications constructor name, input scaling the ImageNet weights expect)
BACKBONES: dict[str, tuple[str, str]] = {
    "mobilenet": ("MobileNet", "tf"),
    "mobilenet_v2": ("MobileNetV2", "tf"),
    "mobilenet_v3_small": ("MobileNetV3Small", "none"),  # has its own Rescaling layer
    "efficientnet_b0": ("EfficientNetB0", "none"),  # has its own Rescaling + Normalization
    "densenet121": ("DenseNet121", "torch"),
    "vgg16": ("VGG16", "caffe"),
    "xception": ("Xception", "tf"),
}
ARCHS = ("small_cnn", *BACKBONES)

SHARED_WEIGHTS = Path(__file__).resolve().parents[2].parent / "shared" / "weights" / "keras"
_KA = "https://storage.googleapis.com/tensorflow/keras-applications/"
# Where Keras itself downloads each backbone's files from (keras/src/applications/*.py).
_WEIGHTS_URL = {
    "mobilenet": _KA + "mobilenet/", "mobilenet_v2": _KA + "mobilenet_v2/", "mobilenet_v3_small": _KA + "mobilenet_v3/",
    "efficientnet_b0": "https://storage.googleapis.com/keras-applications/", "densenet121": _KA + "densenet/",
    "vgg16": _KA + "vgg16/", "xception": _KA + "xception/",
}


class WeightsMissingError(FileNotFoundError):
    """ImageNet weights are not in the Keras cache and downloading is off (or failed)."""


@functools.cache
def _preprocess_layer() -> type:
    """The BackbonePreprocess layer class, defined on first use so importing this module never imports TF."""
    import keras

    @keras.saving.register_keras_serializable(package="lesionflow")
    class BackbonePreprocess(keras.layers.Layer):
        """Scale [0, 255] RGB the way a backbone's ImageNet weights expect (saved with the model, no Lambda)."""

        _MEAN_TORCH = (0.485, 0.456, 0.406)
        _STD_TORCH = (0.229, 0.224, 0.225)
        _MEAN_CAFFE_BGR = (103.939, 116.779, 123.68)

        def __init__(self, mode: str = "tf", **kwargs: Any) -> None:
            super().__init__(**kwargs)
            if mode not in ("tf", "torch", "caffe", "unit", "none"):
                raise ValueError(f"unknown preprocessing mode {mode!r}")
            self.mode = mode

        def call(self, x: Any) -> Any:
            ops = keras.ops
            if self.mode == "tf":
                return x / 127.5 - 1.0
            if self.mode == "unit":
                return x / 255.0
            if self.mode == "torch":
                mean = ops.convert_to_tensor(self._MEAN_TORCH, dtype=x.dtype)
                std = ops.convert_to_tensor(self._STD_TORCH, dtype=x.dtype)
                return (x / 255.0 - mean) / std
            if self.mode == "caffe":
                bgr = ops.flip(x, axis=-1)
                return bgr - ops.convert_to_tensor(self._MEAN_CAFFE_BGR, dtype=x.dtype)
            return x

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "mode": self.mode}

    return BackbonePreprocess


def BackbonePreprocess(mode: str = "tf", **kwargs: Any) -> Any:  # noqa: N802  (reads like the layer it makes)
    """A layer scaling [0, 255] RGB for a backbone: tf ([-1, 1]), torch, caffe (BGR - mean), unit, none."""
    return _preprocess_layer()(mode, **kwargs)


def load_keras(path: str | Path) -> Any:
    """Load a .keras file written by these builders (registers the custom layer first)."""
    import keras

    _preprocess_layer()
    return keras.models.load_model(path, compile=False)


# --------------------------------------------------------------------------- ImageNet weight files
def keras_home() -> Path:
    """Where Keras looks for downloads: the dir Keras fixed when it was imported ($KERAS_HOME, else ~/.keras),
    or /tmp/.keras when that is not writable, exactly as keras.utils.get_file decides."""
    home = None
    if "keras" in sys.modules:  # Keras reads KERAS_HOME once, at import; later changes do not count
        try:
            from keras.src.backend.config import keras_home as _keras_home

            home = _keras_home()
        except ImportError:  # private module moved: fall back to the documented rule
            home = None
    if home is None:
        home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    base = Path(os.path.expanduser(home))
    try:
        base.mkdir(parents=True, exist_ok=True)  # get_file falls back to /tmp when the dir does not exist yet
    except OSError:
        pass
    return base if os.access(base, os.W_OK) else Path("/tmp/.keras")


def weights_filename(arch: str, alpha: float = 1.0, size: int = 224) -> str:
    """The no-top ImageNet file name Keras looks for under $KERAS_HOME/models/ for this backbone."""
    if arch == "mobilenet":
        alpha_text = {1.0: "1_0", 0.75: "7_5", 0.5: "5_0", 0.25: "2_5"}.get(float(alpha))
        if alpha_text is None or size not in (128, 160, 192, 224):
            raise InputError("MobileNet ImageNet weights exist for alpha 0.25/0.5/0.75/1.0 and size "
                             "128/160/192/224 (set the member's input_size)")
        return f"mobilenet_{alpha_text}_{size}_tf_no_top.h5"
    if arch == "mobilenet_v2":
        if size not in (96, 128, 160, 192, 224):
            raise InputError("MobileNetV2 ImageNet weights exist for sizes 96/128/160/192/224 (set input_size)")
        return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{size}_no_top.h5"
    if arch == "mobilenet_v3_small":
        return f"weights_mobilenet_v3_small_224_{float(alpha)}_float_no_top_v2.h5"
    if arch == "efficientnet_b0":
        return "efficientnetb0_notop.h5"
    if arch in ("densenet121", "vgg16", "xception"):
        stem = {"densenet121": "densenet121", "vgg16": "vgg16", "xception": "xception"}[arch]
        return f"{stem}_weights_tf_dim_ordering_tf_kernels_notop.h5"
    raise InputError(f"{arch!r} has no ImageNet weights (archs with weights: {', '.join(BACKBONES)})")


def ensure_weights(filename: str, shared_dir: Path | None = None) -> Path | None:
    """Copy `filename` from the shared offline folder into $KERAS_HOME/models/ if missing; its path or None."""
    target = keras_home() / "models" / filename
    if target.exists():
        return target
    src = (shared_dir or SHARED_WEIGHTS) / filename
    if src.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{filename}.partial")
        shutil.copyfile(src, tmp)
        os.replace(tmp, target)  # atomic: a concurrent reader never sees half a file
        return target
    return None


def _missing_weights_message(filename: str, arch: str) -> str:
    target = keras_home() / "models" / filename
    return (
        f"ImageNet weights for {arch!r} not found: expected {target}. Either pre-seed the file "
        f"(download {_WEIGHTS_URL[arch]}{filename} on a machine with network, or copy it from "
        f"{SHARED_WEIGHTS}/ if it is there, into $KERAS_HOME/models/), set `train.download_weights: true` "
        f"to let Keras fetch it (needs network), or use `weights: none` for that member. "
        f"Offline, only mobilenet alpha 0.25 at 224 px (mobilenet_2_5_224_tf_no_top.h5) is available here."
    )


# --------------------------------------------------------------------------- builders
def _inputs(size: int, metadata_dim: int) -> dict[str, Any]:
    import keras

    inputs = {IMAGE_INPUT: keras.Input((size, size, 3), name=IMAGE_INPUT, dtype="float32")}
    if metadata_dim:
        inputs[METADATA_INPUT] = keras.Input((metadata_dim,), name=METADATA_INPUT, dtype="float32")
    return inputs


def _head(inputs: dict[str, Any], features: Any, *, dropout: float, name: str, seed: int) -> keras.Model:
    """Shared top: pooled features (+ metadata branch) -> logit -> probability."""
    import keras

    x = keras.layers.Dropout(dropout, seed=seed, name="lf_dropout")(features)
    if METADATA_INPUT in inputs:
        m = keras.layers.Dense(16, activation="relu", name="lf_meta_dense")(inputs[METADATA_INPUT])
        x = keras.layers.Concatenate(name="lf_concat")([x, m])
        x = keras.layers.Dense(32, activation="relu", name="lf_joint_dense")(x)
    logit = keras.layers.Dense(1, name=LOGIT, dtype="float32")(x)
    prob = keras.layers.Activation("sigmoid", name=PROB, dtype="float32")(logit)
    return keras.Model(inputs=inputs, outputs=prob, name=name)


def build_small_cnn(image_size: int, *, input_size: int | None = None, filters: Sequence[int] = (32, 64, 128, 256),
                    dropout: float = 0.3, metadata_dim: int = 0, name: str = "small_cnn",
                    seed: int = 0) -> keras.Model:
    """Baseline: conv-BN-ReLU-pool blocks, global average pooling (0.39 M params with the default filters)."""
    import keras

    inputs = _inputs(image_size, metadata_dim)
    x = inputs[IMAGE_INPUT]
    if input_size and input_size != image_size:
        x = keras.layers.Resizing(input_size, input_size, name="lf_resize")(x)
    x = BackbonePreprocess("unit", name="lf_prep")(x)
    for i, f in enumerate(filters):
        x = keras.layers.Conv2D(f, 3, padding="same", use_bias=False, name=f"cnn_conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"cnn_bn{i}")(x)
        x = keras.layers.Activation("relu", name=f"cnn_relu{i}")(x)
        x = keras.layers.MaxPooling2D(name=f"cnn_pool{i}")(x)
    features = keras.layers.GlobalAveragePooling2D(name=FEATURES)(x)
    return _head(inputs, features, dropout=dropout, name=name, seed=seed)


def build_transfer(arch: str, image_size: int, *, input_size: int | None = None, weights: str = "none",
                   alpha: float = 1.0, dropout: float = 0.3, metadata_dim: int = 0, name: str | None = None,
                   seed: int = 0, download: bool = False) -> keras.Model:
    """A keras.applications backbone (no top) + our head. ImageNet weights come from the local Keras cache
    (pre-seeded, or copied from the shared offline folder) unless `download`; a missing file raises
    WeightsMissingError, never a silent random init."""
    import keras

    if arch not in BACKBONES:
        raise InputError(f"unknown backbone {arch!r}; choose one of {', '.join(ARCHS)}")
    if weights not in ("imagenet", "none"):
        raise InputError(f"weights must be 'imagenet' or 'none', got {weights!r}")
    ctor_name, mode = BACKBONES[arch]
    size = input_size or image_size
    if weights == "imagenet":  # keras is imported above, so keras_home() is the dir Keras will search
        filename = weights_filename(arch, alpha, size)
        if ensure_weights(filename) is None and not download:
            raise WeightsMissingError(_missing_weights_message(filename, arch))
    inputs = _inputs(image_size, metadata_dim)
    x = inputs[IMAGE_INPUT]
    if size != image_size:
        x = keras.layers.Resizing(size, size, name="lf_resize")(x)
    x = BackbonePreprocess(mode, name="lf_prep")(x)
    kwargs: dict[str, Any] = {}
    if arch in ("mobilenet", "mobilenet_v2", "mobilenet_v3_small"):
        kwargs["alpha"] = alpha
    ctor = getattr(keras.applications, ctor_name)
    try:
        # input_tensor keeps the backbone's layers in this graph (flat), so Grad-CAM can reach its last conv.
        backbone = ctor(include_top=False, weights="imagenet" if weights == "imagenet" else None,
                        input_tensor=x, input_shape=(size, size, 3), **kwargs)
    except Exception as exc:  # Keras raises a bare Exception on a failed fetch ("URL fetch failure ...")
        if weights == "imagenet" and "fetch" in str(exc).lower():
            raise WeightsMissingError(_missing_weights_message(weights_filename(arch, alpha, size), arch)) from exc
        raise
    features = keras.layers.GlobalAveragePooling2D(name=FEATURES)(backbone.output)
    return _head(inputs, features, dropout=dropout, name=name or arch, seed=seed)


def build_member(arch: str, image_size: int, *, input_size: int | None = None, weights: str = "none",
                 alpha: float = 1.0, dropout: float = 0.3, metadata_dim: int = 0, name: str = "m0", seed: int = 0,
                 download: bool = False) -> keras.Model:
    """Dispatch on `arch`: small_cnn, or a keras.applications backbone."""
    if arch == "small_cnn":
        if weights != "none":
            raise InputError("small_cnn has no pretrained weights; use weights: none")
        return build_small_cnn(image_size, input_size=input_size, dropout=dropout, metadata_dim=metadata_dim,
                               name=name, seed=seed)
    return build_transfer(arch, image_size, input_size=input_size, weights=weights, alpha=alpha, dropout=dropout,
                          metadata_dim=metadata_dim, name=name, seed=seed, download=download)


def backbone_layers(model: keras.Model) -> list[Any]:
    """The pretrained part of a transfer member, in graph order (every layer not named lf_* nor an input)."""
    import keras

    return [layer for layer in model.layers
            if not layer.name.startswith("lf_") and not isinstance(layer, keras.layers.InputLayer)]


def freeze_backbone(model: keras.Model, trainable_top: int | None = None) -> int:
    """Freeze the backbone, then unfreeze its top `trainable_top` layers (0 = all, None = none) except
    BatchNormalization, whose statistics stay ImageNet's. Returns how many weighted layers train."""
    import keras

    layers = backbone_layers(model)
    trainable = 0
    for i, layer in enumerate(layers):
        top = trainable_top is not None and (trainable_top == 0 or i >= len(layers) - trainable_top)
        layer.trainable = top and not isinstance(layer, keras.layers.BatchNormalization)
        trainable += int(layer.trainable and bool(layer.weights))
    return trainable


def input_names(model: keras.Model) -> list[str]:
    """Names of a model's inputs (image, and metadata for dual-input models)."""
    return [t.name for t in model.inputs]


def logit_model(member: keras.Model) -> keras.Model:
    """The member up to its pre-sigmoid logit (same layers, shared weights)."""
    import keras

    inputs = dict(zip(input_names(member), member.inputs))
    return keras.Model(inputs, member.get_layer(LOGIT).output, name=member.name)


def build_ensemble(members: Sequence[keras.Model], coef: Sequence[float], intercept: float, *, image_size: int,
                   metadata_dim: int = 0, name: str = "classifier") -> keras.Model:
    """One model: every member's logit -> a fixed linear stacker (fitted on val) -> sigmoid."""
    import keras

    if len(coef) != len(members):
        raise ValueError(f"{len(coef)} stacker weights for {len(members)} members")
    inputs = _inputs(image_size, metadata_dim)
    logits = []
    for member in members:
        sub = logit_model(member)
        logits.append(sub({k: inputs[k] for k in input_names(sub)}))
    x = logits[0] if len(logits) == 1 else keras.layers.Concatenate(name="lf_member_logits")(logits)
    stack = keras.layers.Dense(1, name="lf_stack", dtype="float32")
    out = keras.layers.Activation("sigmoid", name=PROB, dtype="float32")(stack(x))
    model = keras.Model(inputs=inputs, outputs=out, name=name)
    stack.set_weights([np.asarray(coef, dtype="float32").reshape(-1, 1), np.asarray([intercept], dtype="float32")])
    return model


def member_models(model: keras.Model) -> list[keras.Model]:
    """The member sub-models of an ensemble from build_ensemble ([model] for a bare member)."""
    import keras

    subs = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    return subs or [model]


def last_conv_layer(model: keras.Model) -> Any:
    """The last layer with a 4-D (spatial) output: where Grad-CAM looks."""
    import keras

    for layer in reversed(model.layers):
        if isinstance(layer, keras.layers.InputLayer) or "Pooling" in type(layer).__name__:
            continue  # pooling only coarsens the map the conv before it already has
        shape = getattr(layer.output, "shape", None)
        if shape is not None and len(shape) == 4:
            return layer
    raise ValueError(f"model {model.name!r} has no spatial layer for Grad-CAM")


def gradcam(member: keras.Model, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Grad-CAM heatmaps in [0, 1] (N, h, w) of the member's logit w.r.t. its last spatial layer."""
    import keras
    import tensorflow as tf

    conv = last_conv_layer(member)
    grad_model = keras.Model(dict(zip(input_names(member), member.inputs)),
                             [conv.output, member.get_layer(LOGIT).output])
    feeds = {k: tf.convert_to_tensor(inputs[k], dtype=tf.float32) for k in input_names(member)}
    with tf.GradientTape() as tape:
        fmap, logit = grad_model(feeds, training=False)
        score = tf.reduce_sum(tf.cast(logit, tf.float32))
    grads = tf.cast(tape.gradient(score, fmap), tf.float32)
    fmap = tf.cast(fmap, tf.float32)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * fmap, axis=-1)).numpy()
    peak = cam.reshape(len(cam), -1).max(axis=1).reshape(-1, 1, 1)
    return cam / np.where(peak > 0, peak, 1.0)
