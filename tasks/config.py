"""Typed, validated params.yaml: the one place that parses it (pydantic, unknown keys rejected)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_PARAMS = Path("params.yaml")


class Strict(BaseModel):
    """Base for every params section: a typo is an error, not a silently ignored key."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- ingest
class IsicSource(Strict):
    """The ISIC Archive API v2 (or any server speaking it, such as `lesionflow isic-server`)."""

    kind: Literal["isic"]
    name: str = "isic"
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
    name: str = "local"
    path: str


class SyntheticSource(Strict):
    """Synthetic dermoscopy-like lesions, served through the local ISIC server so the real client runs."""

    kind: Literal["synthetic"]
    name: str = "synthetic"
    n: int = Field(default=300, gt=0)
    seed: int = 0
    malignant_fraction: float = Field(default=0.3, ge=0.0, le=1.0)
    image_size: int = Field(default=128, ge=32, le=2048)


Source = Annotated[Union[IsicSource, LocalSource, SyntheticSource], Field(discriminator="kind")]


class Ingest(Strict):
    sources: list[Source] = Field(min_length=1)
    workers: int = Field(default=8, ge=1, le=64)
    timeout_connect: float = Field(default=3.05, gt=0)
    timeout_read: float = Field(default=30.0, gt=0)
    max_retries: int = Field(default=5, ge=0)
    backoff_cap: float = Field(default=30.0, gt=0)
    token_env: str = "ISIC_TOKEN"  # name of the env var holding an optional API token (never the token)

    @model_validator(mode="after")
    def _unique_names(self) -> "Ingest":
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique; repeated: {dupes} (set `name:` on each source)")
        return self


# --------------------------------------------------------------------------- data preparation
class Dedupe(Strict):
    phash_max_distance: int = Field(default=40, ge=0, le=256)  # on the 256-bit pHash
    verify_corr_min: float = Field(default=0.95, ge=-1.0, le=1.0)
    thumb_size: int = Field(default=48, ge=8, le=256)
    keep_policy: list[Literal["labelled", "larger", "license"]] = Field(
        default_factory=lambda: ["labelled", "larger", "license"]
    )
    workers: int = Field(default=2, ge=1)


class Clean(Strict):
    indeterminate: Literal["drop", "benign", "malignant"] = "drop"
    min_side: int = Field(default=32, ge=1)


class Split(Strict):
    train: float = Field(default=0.7, gt=0, lt=1)
    val: float = Field(default=0.15, gt=0, lt=1)
    test: float = Field(default=0.15, gt=0, lt=1)
    seed: int = 42

    @model_validator(mode="after")
    def _sum_to_one(self) -> "Split":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1 (got {total:g})")
        return self


class Preprocess(Strict):
    size: int = Field(default=128, ge=16, le=1024)
    aspect: Literal["pad", "crop"] = "pad"
    clahe: bool = True
    clip_limit: float = Field(default=2.0, gt=0)
    tile_grid: int = Field(default=8, ge=1)
    hair_removal: bool = False
    color_constancy: bool = False
    workers: int = Field(default=2, ge=1)


class Augment(Strict):
    seed: int = 0
    hflip: float = Field(default=0.5, ge=0, le=1)
    vflip: float = Field(default=0.5, ge=0, le=1)
    rotate_limit: int = Field(default=45, ge=0, le=180)
    affine_p: float = Field(default=0.3, ge=0, le=1)
    color_jitter_p: float = Field(default=0.5, ge=0, le=1)
    crop_scale_min: float = Field(default=0.7, gt=0, le=1)
    clahe_p: float = Field(default=0.0, ge=0, le=1)
    coarse_dropout_p: float = Field(default=0.2, ge=0, le=1)
    offline_copies: int = Field(default=0, ge=0)


class Params(Strict):
    """The whole params.yaml: one section per dvc.yaml stage, named exactly like it."""

    ingest: Ingest
    dedupe: Dedupe = Dedupe()
    clean: Clean = Clean()
    split: Split = Split()
    preprocess: Preprocess = Preprocess()
    augment: Augment = Augment()


class ParamsError(ValueError):
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


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    """Read and validate params.yaml (once, before any work)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found (run from the project root or pass --params)") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    return parse_params(data, str(path))


def dump_params(params: Params) -> str:
    """The validated params as YAML, defaults filled in."""
    return yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False)
