"""Shared I/O for stages: project paths, atomic writes, and the `data/<stage>/index.parquet` contract."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from tasks.core.errors import InputError, RunError

# Every index table is keyed by (source, isic_id): one id can arrive from two sources.
KEY = ["source", "isic_id"]


@dataclass(frozen=True)
class Paths:
    """Where a stage reads and writes; all stage outputs live under `root`."""

    root: Path

    @classmethod
    def here(cls) -> Paths:
        return cls(Path.cwd())

    @property
    def data(self) -> Path:
        return self.root / "data"

    def stage(self, name: str) -> Path:
        """`data/<stage>/`: the stage's output folder."""
        return self.data / name

    def index(self, name: str) -> Path:
        return self.stage(name) / "index.parquet"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def cache(self) -> Path:
        """Caches that speed up reruns but are never the record (e.g. per-content-hash image hashes)."""
        return self.root / ".cache" / "lesionflow"

    def rel(self, path: Path | str) -> str:
        """A path relative to root (posix), as stored in index tables so outputs stay relocatable."""
        p = Path(path)
        try:
            return p.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return p.as_posix()

    def abs(self, rel: str | Path) -> Path:
        p = Path(rel)
        return p if p.is_absolute() else self.root / p


@contextmanager
def atomic_path(final: Path | str) -> Iterator[Path]:
    """Yield a temp path beside `final`; rename onto it only if the block succeeds (no partial file ever)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)  # mkstemp makes 0600; outputs are shared data, not secrets
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (images can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path | str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_run_stats(paths: Paths, stage: str, stats: dict[str, Any]) -> Path:
    """`reports/<stage>/run_stats.json`: timings, throughput, cache hits. Bookkeeping, never a DVC metric, so
    `dvc metrics diff` after a forced rerun shows only real result changes."""
    out = paths.reports / stage / "run_stats.json"
    write_json(out, stats)
    return out


def read_json(path: Path | str) -> Any:
    return json.loads(Path(path).read_text())


def write_table(df: pd.DataFrame, path: Path | str) -> None:
    """Parquet or CSV by suffix, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False)


def write_index(df: pd.DataFrame, paths: Paths, stage: str) -> Path:
    """Write `data/<stage>/index.parquet` after checking the (source, isic_id) key is present and unique."""
    missing = [c for c in KEY if c not in df.columns]
    if missing:
        raise InputError(f"{stage} index lacks key column(s) {missing}")
    dup = df.duplicated(KEY, keep=False)
    if dup.any():
        rows = df.loc[dup, KEY].head(5).to_dict("records")
        raise InputError(f"{stage} index has duplicate (source, isic_id) rows, e.g. {rows}")
    out = paths.index(stage)
    write_table(df.reset_index(drop=True), out)
    return out


def read_index(paths: Paths, stage: str) -> pd.DataFrame:
    """Read a stage's index table, with a clear error if the stage has not run yet."""
    path = paths.index(stage)
    if not path.exists():
        raise RunError(f"{path} not found: run `lesionflow stage {stage}` (or `dvc repro {stage}`) first")
    return pd.read_parquet(path)


def read_csv(path: Path | str, **kwargs: Any) -> pd.DataFrame:
    """A user-supplied CSV as a DataFrame: UTF-8 (a byte-order mark is fine); InputError naming the file when it
    is missing, empty, not UTF-8 or not parseable, with what to do about it."""
    path = Path(path)
    kwargs.setdefault("encoding", "utf-8-sig")
    try:
        return pd.read_csv(path, **kwargs)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                         "re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 in.csv > out.csv`") from None
    except pd.errors.EmptyDataError:
        raise InputError(f"{path}: empty file; expected a CSV with a header row") from None
    except pd.errors.ParserError as exc:
        raise InputError(f"{path}: not a valid CSV ({str(exc).strip()})") from None


def show_progress() -> bool:
    """Progress bars only when a person is watching (a TTY), never in CI logs; LESIONFLOW_PROGRESS=0/1 forces."""
    forced = os.environ.get("LESIONFLOW_PROGRESS")
    if forced is not None:
        return forced not in ("0", "false", "")
    return sys.stderr.isatty()


def progress(iterable: Any = None, **kwargs: Any) -> Any:
    """tqdm with the project's TTY policy."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not show_progress(), **kwargs)


def write_file_atomic(path: str, data: bytes) -> None:
    """Write via `<path>.<pid>.partial` + rename, into an existing folder (per-image hot path).

    tasks.core.io.write_bytes does the same plus mkdir + mkstemp on every call, which cost ~20% of the whole
    per-image time at 128 px; here one image has one writer, and a folder is made only when missing.
    """
    tmp = f"{path}.{os.getpid()}.partial"
    try:
        try:
            fh = open(tmp, "wb")
        except FileNotFoundError:  # first file of its shard: create the folder here, in parallel workers
            os.makedirs(os.path.dirname(tmp), exist_ok=True)
            fh = open(tmp, "wb")
        with fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


def safe_name(text: str) -> str:
    """A file-system-safe path component (ids and source names come from metadata and params)."""
    name = _UNSAFE.sub("_", str(text)).lstrip(".")
    return name or "_"


def shard_of(isic_id: str) -> str:
    """Two hex chars of sha1(id): 256 sub-folders, ~400 files each at 100k images (fast listings)."""
    return hashlib.sha1(str(isic_id).encode()).hexdigest()[:2]


def image_relpath(stage: str, source: str, isic_id: str) -> str:
    """data/<stage>/images/<source>/<shard>/<isic_id>.png (relative to the project root)."""
    return f"data/{stage}/images/{safe_name(source)}/{shard_of(isic_id)}/{safe_name(isic_id)}.png"


def prune_outputs(images_dir: Path, keep: set[str]) -> int:
    """Delete files under images_dir that are not in `keep` (left by earlier runs), so the folder matches
    the index. Paths are compared normalised, so 'root/./x' and 'root/x' are the same file."""
    removed = 0
    if not images_dir.exists():
        return 0
    keep = {os.path.normpath(k) for k in keep}
    for folder, _, names in os.walk(images_dir):
        for name in names:
            f = os.path.normpath(os.path.join(folder, name))
            if f not in keep:
                os.unlink(f)
                removed += 1
    return removed

