"""Typed, validated params.yaml: the one place that parses it (pydantic, strict, unknown keys rejected).

params.yaml is the record of every value a run uses: params files must be complete (`load_params` refuses a
missing key), so DVC sees every value and a default changes only by editing the file, which reruns exactly the
stages that read it. The defaults written below exist so library callers and tests can build a section in code;
tests/tasks/core/test_config.py keeps them equal to params.yaml, so the two can never drift.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.core.errors import InputError

DEFAULT_PARAMS = Path("params.yaml")


def repeated(names: list[str]) -> list[str]:
    """Names that occur more than once (for the uniqueness checks of sources and ensemble members)."""
    return sorted({n for n in names if names.count(n) > 1})


class Strict(BaseModel):
    """Base for every params section: a typo is an error, not a silently ignored key."""

    # strict: YAML `true` is not the int 1, "1.5" is not a float; allow_inf_nan=False: `.inf` is no timeout.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


# --------------------------------------------------------------------------- ingest
# Source names become folder names under data/ingest/images: a slug, so no name can climb out of the project.
SOURCE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
# A token variable must be one the user opted into for ISIC: a name such as AWS_SECRET_ACCESS_KEY is refused,
# so a params typo can never send a cloud secret to a server as a Bearer token.
TOKEN_ENV = r"^[A-Z0-9_]*ISIC[A-Z0-9_]*TOKEN$"


class IsicSource(Strict):
    """The ISIC Archive API v2 (or any server speaking it, such as `lesionflow isic-server`)."""

    kind: Literal["isic"]
    name: str = Field(default="isic", pattern=SOURCE_NAME)
    base_url: str = "https://api.isic-archive.com/api/v2/"
    query: str = ""
    collections: list[Union[int, str]] = Field(default_factory=list)  # ids, or names resolved at run time
    limit: int | None = Field(default=None, gt=0)

    @field_validator("base_url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v if v.endswith("/") else v + "/"


class LocalSource(Strict):
    """A folder of images + metadata.csv, as `isic image download` writes it."""

    kind: Literal["local"]
    name: str = Field(default="local", pattern=SOURCE_NAME)
    path: str


class SyntheticSource(Strict):
    """Synthetic dermoscopy-like lesions, served through the local ISIC server so the real client runs."""

    kind: Literal["synthetic"]
    name: str = Field(default="synthetic", pattern=SOURCE_NAME)
    n: int = Field(default=300, gt=0)
    seed: int = 0
    malignant_fraction: float = Field(default=0.3, ge=0.0, le=1.0)
    image_size: int = Field(default=128, ge=32, le=2048)
    trouble: bool = True  # plant duplicates, corrupt files and label problems for dedupe/clean to find


Source = Annotated[Union[IsicSource, LocalSource, SyntheticSource], Field(discriminator="kind")]


class Ingest(Strict):
    sources: list[Source] = Field(min_length=1)
    workers: int = Field(default=8, ge=1, le=64)
    timeout_connect: float = Field(default=3.05, gt=0)
    timeout_read: float = Field(default=30.0, gt=0)
    max_retries: int = Field(default=5, ge=0)
    backoff_cap: float = Field(default=30.0, gt=0)
    # name of the env var holding an optional API token (never the token); sent only over https or to loopback
    token_env: str = Field(default="ISIC_TOKEN", pattern=TOKEN_ENV)
    max_failures: int = Field(default=0, ge=0)  # downloads allowed to fail before the stage errors
    # A rerun removes files that left a source only when at most this share of the source's files would go
    # (and never when a source that listed images lists none); `force_prune` (or --force-prune) overrides.
    max_prune_fraction: float = Field(default=0.05, ge=0, le=1)
    force_prune: bool = False

    @model_validator(mode="after")
    def _unique_names(self) -> Ingest:
        dupes = repeated([s.name.lower() for s in self.sources])  # folders must differ on case-insensitive disks
        if dupes:
            raise ValueError(f"source names must be unique (ignoring case); repeated: {dupes} "
                             "(set `name:` on each source)")
        return self


# --------------------------------------------------------------------------- data preparation
class Dedupe(Strict):
    """Exact + near-duplicate detection (tasks/dedupe.py); docs/stages/dedupe.md explains each knob."""

    phash_max_distance: int = Field(default=64, ge=0, le=256)  # candidate radius on the 256-bit pHash
    verify_corr_min: float = Field(default=0.95, ge=-1.0, le=1.0)  # grey-thumbnail correlation (aligned)
    verify_detail_min: float = Field(default=0.95, ge=-1.0, le=1.0)  # band-pass (detail) correlation
    thumb_size: int = Field(default=64, ge=16, le=256)  # verification thumbnail side, px
    search_recall: float = Field(default=0.999, gt=0.0, lt=1.0)  # LSH: P(pair at the radius is found)
    brute_force_max: int = Field(default=4096, ge=2)  # up to this many distinct hashes: exact all-pairs
    seed: int = 0  # LSH bit sampling
    trust_ingest_sha256: bool = True  # reuse ingest's sha256 column instead of re-reading every file
    keep_policy: list[Literal["labelled", "larger", "license"]] = Field(
        default_factory=lambda: ["labelled", "larger", "license"]
    )
    workers: int = Field(default=2, ge=1)


class Clean(Strict):
    indeterminate: Literal["drop", "benign", "malignant"] = "drop"
    min_side: int = Field(default=32, ge=1)  # images with a shorter side (px) are quarantined
    # width x height from the header; larger = quarantined, never decoded
    max_pixels: int = Field(default=50_000_000, ge=1)
    workers: int = Field(default=2, ge=1, le=64)  # decode processes (JPEG warning capture is per process)
    check_declared_size: bool = True  # quarantine if decoded size != metadata pixels_x/pixels_y (either orientation)
    verify_checksum: bool = True  # quarantine if the bytes no longer match ingest's sha256 (or file_size)


class Split(Strict):
    train: float = Field(default=0.7, gt=0, lt=1)
    val: float = Field(default=0.15, gt=0, lt=1)
    test: float = Field(default=0.15, gt=0, lt=1)
    seed: int = 42
    # Columns whose shared values put images in one group (absent columns are skipped; isic_id always counts).
    # `group_id` here is a source-provided split unit (e.g. isic-real's metadata), kept as `source_group_id`.
    group_by: list[str] = Field(default_factory=lambda: ["patient_id", "lesion_id", "dup_group", "group_id"])

    @model_validator(mode="after")
    def _sum_to_one(self) -> Split:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1 (got {total:g})")
        return self


class Preprocess(Strict):
    """Resize + enhancement of every split image into data/preprocess (docs/stages/preprocess.md)."""

    size: int = Field(default=64, ge=16, le=1024)  # output side in px (square)
    aspect: Literal["pad", "crop"] = "pad"  # pad = letterbox the whole image; crop = centre square
    pad_mode: Literal["constant", "edge"] = "constant"  # letterbox fill: pad_value, or replicate the border
    pad_value: int = Field(default=0, ge=0, le=255)
    clahe: bool = True
    clip_limit: float = Field(default=2.0, gt=0)
    tile_grid: int = Field(default=8, ge=1, le=64)
    hair_removal: bool = False
    hair_kernel: int = Field(default=0, ge=0, le=101)  # black-hat kernel side in px; 0 = auto (~size/32, odd)
    hair_threshold: int = Field(default=10, ge=1, le=255)  # black-hat response that counts as hair
    color_constancy: bool = False
    cc_power: float = Field(default=6.0, ge=1.0, le=32.0)  # shades-of-grey Minkowski p (1 = grey world)
    workers: int = Field(default=2, ge=1, le=64)
    png_compression: int = Field(default=1, ge=0, le=9)  # zlib level, lossless either way; 1 = fastest (RLE)
    max_failed_fraction: float = Field(default=0.05, ge=0, le=1)  # more failures than this fail the stage
    max_pixels: int = Field(default=50_000_000, ge=1)  # header-checked cap; also stored for predict/serve/screen
    cache: bool = True  # reuse PNGs of unchanged inputs from .cache/lesionflow/preprocess (same bytes either way)


class Augment(Strict):
    """albumentations pipeline (online in train, offline copies of the train split here)."""

    seed: int = 0
    hflip: float = Field(default=0.5, ge=0, le=1)
    vflip: float = Field(default=0.5, ge=0, le=1)
    rotate_limit: int = Field(default=45, ge=0, le=180)  # degrees, uniform in [-limit, limit]
    rotate_p: float = Field(default=0.5, ge=0, le=1)
    affine_p: float = Field(default=0.3, ge=0, le=1)
    affine_scale: float = Field(default=0.1, ge=0, lt=1)  # zoom in [1 - s, 1 + s]
    affine_translate: float = Field(default=0.05, ge=0, le=0.5)  # shift, fraction of the side
    affine_shear: float = Field(default=5.0, ge=0, le=45)  # degrees
    color_jitter_p: float = Field(default=0.5, ge=0, le=1)
    brightness: float = Field(default=0.2, ge=0, le=1)
    contrast: float = Field(default=0.2, ge=0, le=1)
    saturation: float = Field(default=0.2, ge=0, le=1)
    hue: float = Field(default=0.02, ge=0, le=0.5)  # fraction of the hue circle; skin tones: keep small
    crop_scale_min: float = Field(default=0.7, gt=0, le=1)  # RandomResizedCrop area in [min, 1]
    clahe_p: float = Field(default=0.0, ge=0, le=1)
    clahe_clip_limit: float = Field(default=2.0, gt=0)  # fixed, not sampled (a scalar in A.CLAHE is a range)
    clahe_tile_grid: int = Field(default=8, ge=1, le=64)
    coarse_dropout_p: float = Field(default=0.2, ge=0, le=1)
    dropout_max_holes: int = Field(default=4, ge=1, le=64)
    dropout_max_size: float = Field(default=0.1, gt=0, le=0.5)  # hole side, fraction of the image side
    offline_copies: int = Field(default=0, ge=0, le=100)  # K augmented copies of each train image (0 = none)
    workers: int = Field(default=2, ge=1, le=64)


# --------------------------------------------------------------------------- cyclegan / upsample
class Cyclegan(Strict):
    """Benign->malignant CycleGAN on the train split (tasks/cyclegan.py, docs/stages/cyclegan.md)."""

    seed: int = 0
    image_size: int = Field(default=32, ge=16, le=512)  # GAN resolution (multiple of 4); train images resized to it
    base_filters: int = Field(default=16, ge=1, le=256)  # generator width (paper: 64)
    n_res_blocks: int = Field(default=3, ge=0, le=16)  # generator depth (paper: 6 at 128 px, 9 at 256 px)
    disc_filters: int = Field(default=16, ge=1, le=256)  # PatchGAN width (paper: 64)
    disc_downsamples: int | None = Field(default=None, ge=1, le=7)  # None = field scaled like 70 px of 256
    batch_size: int = Field(default=1, ge=1, le=256)  # paper: 1
    epochs: int = Field(default=4, ge=0)
    steps_per_epoch: int = Field(default=50, ge=1)
    decay_epochs: int = Field(default=2, ge=0)  # the last N epochs decay the learning rate linearly to 0
    lr: float = Field(default=2e-4, gt=0)
    beta_1: float = Field(default=0.5, ge=0, lt=1)
    cycle_weight: float = Field(default=10.0, ge=0)
    identity_weight: float = Field(default=5.0, ge=0)  # paper: half the cycle weight
    pool_size: int = Field(default=50, ge=0)  # history of generated images the discriminators see (0 = none)
    flip: bool = True  # random flips/90-degree turns of train images (lesions have no orientation)
    log_every: int = Field(default=10, ge=1)  # one losses.csv row = mean over this many steps
    keep_checkpoints: int = Field(default=2, ge=1)
    resume: bool = True  # continue from models/cyclegan/ckpt when its config and data fingerprint match
    samples: int = Field(default=4, ge=1, le=32)  # rows per domain in reports/cyclegan/samples.png
    deterministic: bool = True  # op determinism (bit-identical reruns on CPU)
    mlflow: bool = True  # log params, losses, samples to tasks/tracking.py's store
    register_model: bool = True  # and register G(benign->malignant) as a new version of `model_name`
    experiment: str = "lesionflow"
    model_name: str = "lesionflow-cyclegan"

    @model_validator(mode="after")
    def _shape(self) -> Cyclegan:
        if self.image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4 (got {self.image_size})")
        if self.decay_epochs > self.epochs:
            raise ValueError(f"decay_epochs ({self.decay_epochs}) cannot exceed epochs ({self.epochs})")
        return self


class Upsample(Strict):
    """Synthetic malignant train images from benign train images (tasks/upsample.py)."""

    target_ratio: float = Field(default=0.5, ge=0, lt=1)  # malignant share of train to reach; 0 = pass-through
    seed: int = 0
    max_per_source: int = Field(default=1, ge=1, le=8)  # translations per benign image (extra: flips/turns)
    upscale: Literal["residual", "resize"] = "residual"  # how GAN-size output returns to preprocess.size
    batch_size: int = Field(default=32, ge=1, le=4096)
    quality: bool = True  # classifier share + KID in reports/upsample/metrics.json
    feature_size: int = Field(default=32, ge=8, le=256)  # side of the images the quality features use
    kid_subsets: int = Field(default=20, ge=1)
    kid_subset_size: int = Field(default=100, ge=2)
    samples: int = Field(default=8, ge=0, le=64)  # source -> synthetic pairs in reports/upsample/samples.png
    mlflow: bool = True
    experiment: str = "lesionflow"


# --------------------------------------------------------------------------- train / evaluate
Arch = Literal[
    "small_cnn", "mobilenet", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "densenet121", "vgg16",
    "xception",
]


class Member(Strict):
    """One ensemble member: architecture and initialisation; unset overrides fall back to `train`."""

    name: str = Field(default="m0", pattern=r"^[A-Za-z0-9_-]+$")
    arch: Arch = "small_cnn"
    weights: Literal["imagenet", "none"] = "none"  # imagenet needs the file under $KERAS_HOME/models/
    alpha: float = Field(default=1.0, gt=0, le=1.4)  # MobileNet width multiplier
    input_size: int | None = Field(default=None, ge=32, le=1024)  # None = preprocess.size; resized in-model
    metadata: bool = False  # dual input: image + (age, sex, site)
    seed: int = 0  # added to train.seed so members differ
    epochs: int | None = Field(default=None, ge=0)
    fine_tune_epochs: int | None = Field(default=None, ge=0)
    lr: float | None = Field(default=None, gt=0)


class Train(Strict):
    """Classifier training (tasks/train.py, docs/stages/train.md)."""

    seed: int = 0
    batch_size: int = Field(default=8, ge=1, le=4096)
    epochs: int = Field(default=10, ge=0)  # phase 1: head only for transfer members, whole net for small_cnn
    lr: float = Field(default=1e-3, gt=0)
    fine_tune_epochs: int = Field(default=0, ge=0)  # phase 2: top `fine_tune_layers` backbone layers unfrozen
    fine_tune_layers: int = Field(default=30, ge=0)  # 0 = the whole backbone
    fine_tune_lr: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)  # > 0 switches Adam to AdamW
    loss: Literal["bce", "focal"] = "bce"
    class_weight: bool = True  # balanced class weights (n / (2 n_c))
    focal_gamma: float = Field(default=2.0, ge=0)
    focal_alpha: float = Field(default=0.25, gt=0, lt=1)
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5)
    dropout: float = Field(default=0.3, ge=0, lt=1)
    early_stopping_patience: int = Field(default=5, ge=1)
    reduce_lr_patience: int = Field(default=2, ge=1)
    reduce_lr_factor: float = Field(default=0.5, gt=0, lt=1)
    min_lr: float = Field(default=1e-6, ge=0)
    online_augment: bool = True  # albumentations (tasks.core.augmentation.build_augmenter) inside tf.data
    cache: Literal["memory", "disk", "none"] = "memory"  # decoded images; disk = .cache/lesionflow/tfdata
    include_offline_copies: bool = True  # rows with augmented_from (augment stage)
    include_synthetic: bool = True  # rows flagged synthetic (upsample stage)
    max_images: int | None = Field(default=None, ge=2)  # stratified cap on train rows (smoke profiles)
    ensemble: Literal["stack", "mean"] = "stack"  # stack = logistic regression on val logits (calibrates too)
    tta: int = Field(default=0, ge=0, le=4)  # flips averaged at predict: 0/1 none, 2 +h, 3 +v, 4 +hv
    target_sensitivity: float = Field(default=0.90, gt=0, le=1)  # operating point chosen on val, stored
    site_min_count: int = Field(default=5, ge=1)  # rarer sites become "other" in the metadata input
    threads: int = Field(default=0, ge=0)  # TF intra/inter-op threads; 0 = TF default
    deterministic: bool = True  # op determinism (bit-identical reruns on CPU)
    download_weights: bool = False  # let Keras fetch ImageNet weights (network!); dvc repro keeps it off
    members: list[Member] = Field(default_factory=lambda: [Member(name="cnn")], min_length=1)

    @model_validator(mode="after")
    def _unique_members(self) -> Train:
        dupes = repeated([m.name for m in self.members])
        if dupes:
            raise ValueError(f"member names must be unique; repeated: {dupes}")
        return self


class Evaluate(Strict):
    """Test-split scoring, plots and MLflow registration (tasks/evaluate.py)."""

    bootstrap: int = Field(default=1000, ge=0)  # resamples for the ROC AUC CI (0 = none)
    ci: float = Field(default=0.95, gt=0, lt=1)
    seed: int = 0
    calibration_bins: int = Field(default=10, ge=2, le=100)
    age_bands: list[float] = Field(default_factory=lambda: [0, 30, 45, 60, 75, 200])  # band edges, years
    gallery: int = Field(default=12, ge=0, le=64)  # most confident mistakes shown
    gradcam: int = Field(default=6, ge=0, le=32)
    mlflow: bool = True  # log the run (params, metrics, plots, model) to tracking.py's store
    register_model: bool = True  # and register the model as a new version of `model_name`
    experiment: str = "lesionflow"
    model_name: str = "lesionflow-classifier"

    @field_validator("age_bands")
    @classmethod
    def _increasing(cls, v: list[float]) -> list[float]:
        if len(v) < 2 or any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError("needs >= 2 strictly increasing edges")
        return v


class UglyDuckling(Strict):
    """Per-patient ugly-duckling ranking in the classifier's embedding space (tasks/ugly_duckling.py)."""

    min_lesions: int = Field(default=3, ge=2)  # patients with fewer distinct lesions are not ranked
    max_patients: int | None = Field(default=None, ge=1)  # seeded sample of patients (None = all)
    model: str = ""  # "" = models/ of this project; else a path, runs:/ or models:/ URI
    synthetic_patients: int = Field(default=20, ge=0)  # planted-odd-lesion check (0 = skip)
    synthetic_lesions: int = Field(default=6, ge=3)  # lesions per synthetic patient (one of them odd)
    tsne_perplexity: float = Field(default=30.0, gt=0)
    seed: int = 0
    mlflow: bool = True
    experiment: str = "lesionflow"


# --------------------------------------------------------------------------- tune (no stage: `lesionflow tune`)
# Sections a search may vary: train reads them and nothing upstream does (with augment.offline_copies 0), so a
# trial on the existing data/upsample index is exactly what `dvc repro` gives after the values are applied.
TUNABLE_SECTIONS = ("train", "augment")
# Keys that change data stages' outputs, the model's list of members, or only speed/bookkeeping: not searched.
UNTUNABLE_KEYS = frozenset({"augment.offline_copies", "augment.workers", "train.members", "train.threads",
                            "train.deterministic", "train.download_weights", "train.cache"})


class SearchDim(Strict):
    """One dimension of the search space: `float`/`int` in [low, high] (log scale optional) or `categorical`."""

    type: Literal["float", "int", "categorical"]
    low: Union[int, float, None] = None
    high: Union[int, float, None] = None
    log: bool = False
    choices: list[Union[bool, int, float, str]] | None = None

    @model_validator(mode="after")
    def _shape(self) -> SearchDim:
        if self.type == "categorical":
            if not self.choices or self.low is not None or self.high is not None or self.log:
                raise ValueError("categorical needs `choices` (a non-empty list) and no low/high/log")
            return self
        if self.choices is not None or self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs `low` and `high` and no `choices`")
        if self.type == "int" and not (isinstance(self.low, int) and isinstance(self.high, int)):
            raise ValueError("int bounds must be whole numbers")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("log scale needs low > 0")
        return self


_SECTION_MODELS: dict[str, type[BaseModel]] = {"train": Train, "augment": Augment}


def _default_space() -> dict[str, dict[str, Any]]:
    return {
        "train.lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True},
        "train.dropout": {"type": "float", "low": 0.0, "high": 0.5},
        "train.weight_decay": {"type": "categorical", "choices": [0.0, 1.0e-4, 1.0e-3]},
        "train.label_smoothing": {"type": "float", "low": 0.0, "high": 0.1},
        "augment.rotate_limit": {"type": "int", "low": 0, "high": 90},
        "augment.color_jitter_p": {"type": "float", "low": 0.0, "high": 0.8},
    }


class Tune(Strict):
    """Hyperparameter search (`lesionflow tune`, flows/tune.py, docs/tune.md). Not a stage: DVC tracks no
    output of it; the best trial is written back into the train/augment sections."""

    n_trials: int = Field(default=20, ge=1)  # finished trials the study holds; a rerun runs the missing ones
    timeout_s: float | None = Field(default=None, gt=0)  # no new trial starts after this many seconds
    seed: int = 0  # sampler seed
    sampler: Literal["tpe", "random"] = "tpe"
    startup_trials: int = Field(default=5, ge=0)  # TPE: random trials before the model-based ones
    pruner: Literal["median", "asha", "none"] = "median"
    pruner_startup_trials: int = Field(default=3, ge=0)  # median: finished trials before any pruning
    pruner_warmup_steps: int = Field(default=2, ge=0)  # epochs (all members, in order) before a trial may be pruned
    asha_reduction_factor: int = Field(default=3, ge=2)
    baseline_first: bool = True  # trial 0 trains this file's values: the search is judged against them
    study_name: str = Field(default="lesionflow", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
    mlflow: bool = True  # a parent run with one child run per trial
    experiment: str = "lesionflow"
    # `<section>.<key>` -> {type: float|int|categorical, low, high, log, choices}; sections train, augment.
    space: dict[str, dict[str, Any]] = Field(default_factory=_default_space, min_length=1)

    @field_validator("space")
    @classmethod
    def _check_space(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        problems = []
        for key, spec in v.items():
            section, _, name = key.partition(".")
            model = _SECTION_MODELS.get(section)
            if model is None or name not in model.model_fields:
                problems.append(f"{key}: not a key of {' or '.join(TUNABLE_SECTIONS)} (write `<section>.<key>`)")
                continue
            if key in UNTUNABLE_KEYS:
                problems.append(f"{key}: not tunable (it changes data stages, the member list or only speed)")
                continue
            try:
                dim = SearchDim.model_validate(spec)
            except ValidationError as exc:
                problems.append(f"{key}: " + "; ".join(e["msg"] for e in exc.errors()))
                continue
            values = dim.choices if dim.type == "categorical" else [dim.low, dim.high]
            if dim.type == "float":
                values = [float(x) for x in values]
            for value in values:  # every bound/choice must be a valid value of the key itself
                try:
                    model.model_validate({name: value})
                except ValidationError as exc:
                    problems.append(f"{key}: {value!r} is not a valid value ({exc.errors()[0]['msg']})")
        if problems:
            raise ValueError("bad search space: " + " | ".join(problems))
        return v


class Params(Strict):
    """The whole params.yaml: one section per dvc.yaml stage, named exactly like it, plus `tune` (the search)."""

    def view(self, sections: tuple[str, ...] | list[str], stage: str = "") -> SectionView:
        """Only the named sections: a stage sees what its dvc.yaml `params:` declares, nothing else."""
        return SectionView(self, tuple(sections), stage)

    ingest: Ingest
    dedupe: Dedupe = Dedupe()
    clean: Clean = Clean()
    split: Split = Split()
    preprocess: Preprocess = Preprocess()
    augment: Augment = Augment()
    cyclegan: Cyclegan = Cyclegan()
    upsample: Upsample = Upsample()
    train: Train = Train()
    evaluate: Evaluate = Evaluate()
    ugly_duckling: UglyDuckling = UglyDuckling()
    tune: Tune = Tune()  # not a stage: the search `lesionflow tune` runs (flows/tune.py)


class ParamsError(InputError):
    """params.yaml is missing, unreadable or invalid; the message names file, key path and what is allowed."""


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key (typo?)"
    elif err["type"] in ("literal_error", "union_tag_invalid"):
        expected = err.get("ctx", {}).get("expected") or err.get("ctx", {}).get("expected_tags")
        msg = f"{msg}" if expected is None else f"must be one of {expected}"
    got = err.get("input")
    tail = "" if err["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {got!r})"
    return f"  {loc or '<root>'}: {msg}{tail}"


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys a section accepts, so an 'unknown key' error can say what is allowed."""
    cur: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or cur is None:
            continue
        field = getattr(cur, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        cur = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return sorted(getattr(cur, "model_fields", {}).keys()) if cur is not None else []


def parse_params(data: Any, source: str = "params.yaml") -> Params:
    """Validate a params mapping; raise ParamsError listing every bad key path."""
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            line = _describe(err)
            if err["type"] == "extra_forbidden":
                allowed = _allowed_keys(Params, tuple(err["loc"]))
                if allowed:
                    line += f"; allowed: {', '.join(allowed)}"
            lines.append(line)
        raise ParamsError(f"{source}: invalid params ({len(lines)} problem(s)):\n" + "\n".join(lines)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key repeated in one mapping (plain YAML silently keeps the last value)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key] + 1}); keep one", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: str | Path, what: str = "file") -> Any:
    """Read a YAML file strictly: UTF-8 only, no duplicate keys; errors name the file and the line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found (run from the project root or pass --params)") from None
    except IsADirectoryError:
        raise ParamsError(f"{path}: is a directory, expected a YAML {what}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{path}: not UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 1]!r}); "
                          "re-save the file as UTF-8") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None


def missing_keys(data: dict[str, Any]) -> list[str]:
    """`section.key` paths a params mapping leaves to code defaults (list items such as sources may omit
    their optional fields; every section key must be written out)."""
    missing = []
    for section, field in Params.model_fields.items():
        given = data.get(section)
        model = field.annotation
        if not isinstance(given, dict):
            missing.append(section)
            continue
        missing += [f"{section}.{k}" for k in model.model_fields if k not in given]
    return missing


def load_params(path: str | Path = DEFAULT_PARAMS, *, complete: bool = True) -> Params:
    """Read and validate a params file (once, before any work).

    A params file is complete: every key of every section is written out, so the file alone is the record of
    a run (DVC tracks values in the file, not defaults in code) and a default changes only by editing it.
    """
    data = load_yaml(path, "params file")
    params = parse_params(data, str(path))
    if complete:
        gaps = missing_keys(data)
        if gaps:
            shown = ", ".join(gaps[:12]) + (f", ... ({len(gaps)} in all)" if len(gaps) > 12 else "")
            raise ParamsError(f"{path}: incomplete params; missing {shown}. Params files are complete records: "
                              "copy the missing keys from params.yaml (`lesionflow params` prints a full file)")
    return params


# Set for a stage process when `--force-prune` was given to `run` / `nightly` (the flags reach `lesionflow stage`).
FORCE_PRUNE_ENV = "LESIONFLOW_FORCE_PRUNE"


def with_force_prune(params: Params, source: str = "params.yaml") -> Params:
    """`params` with ingest.force_prune=true (Params is frozen: rebuilt through the one parser)."""
    data = params.model_dump(mode="json")
    data["ingest"] = {**data["ingest"], "force_prune": True}
    return parse_params(data, f"{source} (with --force-prune)")


def dump_params(params: Params) -> str:
    """The validated params as YAML, defaults filled in."""
    return yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False)


class SectionView:
    """The params sections one stage declared; reading any other section is an error naming the stage.

    DVC reruns a stage only when a declared section changes, so a stage that read an undeclared section would
    silently go stale; this view makes that mistake fail loudly in the first test that runs the stage.
    """

    def __init__(self, params: Params, sections: tuple[str, ...], stage: str = "") -> None:
        unknown = [s for s in sections if s not in Params.model_fields]
        if unknown:
            raise ParamsError(f"unknown params section(s) {unknown}; sections: {', '.join(Params.model_fields)}")
        self._params, self._sections, self._stage = params, sections, stage

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._sections:
            who = f"stage {self._stage!r}" if self._stage else "this stage"
            raise ParamsError(f"{who} reads params section {name!r} but declares only {list(self._sections)} "
                              "(add it to the stage's `params:` in dvc.yaml and flows/stages.py)")
        return getattr(self._params, name)
