"""Per-content-hash result cache under `Paths.cache` (`.cache/lesionflow/`): speeds up reruns, never the record.

An entry is the result of one pure computation on one input file's bytes. Its key is
- the sha256 of the input bytes,
- a digest of the parameters that affect the result (never workers or other knobs that do not), and
- a code version: a string bumped by hand when the computation changes, plus the sha256 of the source files
  that do the computation and the library versions given by the caller, so an edited module cannot serve
  stale results even when nobody bumps the string.

Parameters + version name one folder (`<root>/<digest16>/`, with a `params.json` saying what it holds), and
entries live in it as `<sha[:2]>/<sha>.bin`. Each entry is written atomically (temp file + rename) and its
sha256 is recorded in the folder's index: a truncated, damaged or misplaced entry reads as `corrupt`, is
deleted and the caller recomputes it. Deleting the whole cache changes no output, only the time a run takes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from tasks.core.io import write_file_atomic

Status = Literal["hit", "miss", "corrupt"]


def source_digest(files: Iterable[str | Path]) -> str:
    """sha256 over the bytes of source files (a module's own code as part of a cache key); '' if unreadable."""
    h = hashlib.sha256()
    for f in files:
        try:
            h.update(Path(f).read_bytes())
        except OSError:
            return ""
    return h.hexdigest()


def params_digest(params: Mapping[str, Any], version: str) -> str:
    """16 hex chars naming (params, version): the folder of one result set."""
    blob = json.dumps({"params": dict(params), "version": version}, sort_keys=True, separators=(",", ":"),
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class ResultCache:
    """Bytes per input content hash, for one (params, version). Picklable: workers get a copy.

    Entries are the payload itself (`<sha[:2]>/<sha>.bin`), so an output can be a hard link to its entry
    (`link`): creating a file costs ~0.6 ms on this machine's disk, a link 0.02 ms. The sha256 of each payload
    is kept in an index (a SegmentStore in `index/`) that the parent process loads once (`open`) and extends
    once per run (`commit`); workers only `put` and return the digest. An entry whose bytes do not match the
    index (truncated, edited in place through a linked output, copied under another name) reads as corrupt
    and is deleted; an entry missing from the index (a run that crashed before `commit`) is a miss."""

    MANIFEST = "params.json"

    def __init__(self, root: Path | str, params: Mapping[str, Any], version: str):
        self.root = str(root)
        self.params = dict(params)
        self.version = version
        self.key = params_digest(self.params, version)
        self.dir = os.path.join(self.root, self.key)
        self.known: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "known": {}}  # workers only put; the index stays in the parent

    # ------------------------------------------------------------------ entries
    def path(self, sha: str) -> str:
        return os.path.join(self.dir, sha[:2], f"{sha}.bin")

    def _index(self) -> SegmentStore:
        return SegmentStore(os.path.join(self.dir, "index"), ("sha", "digest"))

    def get(self, sha: str) -> tuple[Status, bytes | None]:
        """('hit', payload), ('miss', None), or ('corrupt', None) after deleting a damaged entry."""
        want = self.known.get(sha)
        if want is None:
            return "miss", None
        p = self.path(sha)
        try:
            with open(p, "rb") as fh:
                payload = fh.read()
        except FileNotFoundError:
            return "miss", None
        except OSError:
            return "corrupt", None
        if hashlib.sha256(payload).hexdigest() != want:
            try:
                os.unlink(p)
            except OSError:
                pass
            return "corrupt", None
        return "hit", payload

    def put(self, sha: str, payload: bytes) -> str | None:
        """Store atomically; the payload's sha256 for `commit`, or None if it could not be written (a full
        or read-only disk only costs speed later, so it is never raised)."""
        try:
            write_file_atomic(str(self.path(sha)), payload)  # removes its temp file on failure
        except OSError:
            return None
        return hashlib.sha256(payload).hexdigest()

    def link(self, sha: str, dst: str) -> bool:
        """Make `dst` a hard link to the entry (atomically replacing dst); False if the file system refuses
        (another device, no hard links): then the caller writes the bytes."""
        src = self.path(sha)
        try:  # the usual case under `dvc repro` (outputs removed first): one system call, atomic by itself
            os.link(src, dst)
            return True
        except FileExistsError:
            pass
        except FileNotFoundError:
            if not os.path.exists(src):
                return False
            try:
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                os.link(src, dst)
                return True
            except FileExistsError:
                pass
            except OSError:
                return False
        except OSError:
            return False
        tmp = f"{dst}.{os.getpid()}.link.partial"  # dst exists: replace it atomically
        try:
            os.link(src, tmp)
            os.replace(tmp, dst)
            return True
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return False

    def is_linked(self, sha: str, dst: str) -> bool:
        """dst already is this entry (same inode): nothing to do."""
        try:
            return os.path.samefile(self.path(sha), dst)
        except OSError:
            return False

    # ------------------------------------------------------------------ result sets
    def open(self) -> ResultCache:
        """Create the folder, write (or touch) its manifest -- its mtime is the last use -- and load the index."""
        os.makedirs(self.dir, exist_ok=True)
        man = os.path.join(self.dir, self.MANIFEST)
        if os.path.exists(man):
            os.utime(man)
        else:
            tmp = f"{man}.{os.getpid()}.partial"
            with open(tmp, "w") as fh:
                json.dump({"params": self.params, "version": self.version, "created": time.strftime("%FT%T")},
                          fh, indent=2, sort_keys=True, default=str)
            os.replace(tmp, man)
        self.known = {}
        for part in self._index().load():
            self.known.update(zip(part["sha"].tolist(), part["digest"].tolist(), strict=True))
        return self

    def commit(self, entries: Iterable[tuple[str, str]]) -> int:
        """Record newly put entries (sha, payload sha256) in the index: one segment per run."""
        import numpy as np

        new = {s: d for s, d in entries if d and self.known.get(s) != d}
        if new:
            self._index().add({"sha": np.array(list(new), "<U64"), "digest": np.array(list(new.values()), "<U64")})
            self.known.update(new)
        return len(new)

    def prune_others(self, keep: int = 2) -> list[str]:
        """Delete result sets of other params/versions beyond the `keep` most recently used; names removed."""
        if not os.path.isdir(self.root):
            return []
        others = []
        for name in os.listdir(self.root):
            d = os.path.join(self.root, name)
            if name == self.key or not os.path.isdir(d):
                continue
            try:
                used = os.path.getmtime(os.path.join(d, self.MANIFEST))
            except OSError:
                used = 0.0
            others.append((used, name))
        gone = [name for _, name in sorted(others, reverse=True)[keep:]]
        for name in gone:
            shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        return gone


class SegmentStore:
    """Append-only columnar records (named numpy arrays of equal length), for results too small for one file
    each (dedupe's per-content features and per-pair verdicts).

    A run writes one segment with only what it computed: a folder of `.npy` files written under a temp name
    and renamed when complete, with a `done` file holding the row count and the sha256 of every array. A
    segment whose arrays do not match `done` is skipped (and deleted), so its rows are computed again. Many
    segments are compacted into one."""

    MAX_SEGMENTS = 8

    def __init__(self, folder: Path | str, fields: Iterable[str]):
        self.dir = Path(folder)
        self.fields = tuple(fields)

    def segments(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if p.is_dir() and p.name.startswith("seg-")
                      and (p / "done").exists())

    @staticmethod
    def _digest(arr: Any) -> str:
        import numpy as np

        a = np.ascontiguousarray(arr)
        return hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + a.tobytes()).hexdigest()

    def _read(self, seg: Path) -> dict[str, Any] | None:
        import numpy as np

        try:
            done = (seg / "done").read_text()
            cols = {f: np.load(seg / f"{f}.npy", allow_pickle=False) for f in self.fields}
        except (OSError, ValueError, TypeError):
            return None
        try:
            meta = json.loads(done)
        except ValueError:
            meta = None
        if isinstance(meta, dict):  # current format: verify every array
            sums = meta.get("sha256", {})
            if any(sums.get(f) != self._digest(cols[f]) for f in self.fields):
                return None
        n = {len(c) for c in cols.values()}
        return cols if len(n) == 1 else None

    def load(self) -> list[dict[str, Any]]:
        """Every intact segment's columns, oldest first; damaged segments are deleted."""
        parts = []
        for seg in self.segments():
            cols = self._read(seg)
            if cols is None:
                shutil.rmtree(seg, ignore_errors=True)  # recomputed by the caller, rewritten next time
                continue
            parts.append(cols)
        return parts

    def _write(self, cols: Mapping[str, Any]) -> None:
        import numpy as np

        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".tmp-{os.getpid()}-{time.time_ns()}"
        tmp.mkdir()
        try:
            for f in self.fields:
                np.save(tmp / f"{f}.npy", cols[f], allow_pickle=False)
            meta = {"rows": len(cols[self.fields[0]]), "sha256": {f: self._digest(cols[f]) for f in self.fields}}
            (tmp / "done").write_text(json.dumps(meta, sort_keys=True))
            os.replace(tmp, self.dir / f"seg-{time.strftime('%Y%m%d%H%M%S')}-{time.time_ns() % 10**9:09d}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def add(self, cols: Mapping[str, Any]) -> None:
        """One new segment, atomically (nothing is written for zero rows); compacts when segments pile up."""
        if len(cols[self.fields[0]]):
            self._write(cols)
        if len(self.segments()) > self.MAX_SEGMENTS:
            self.compact()

    def compact(self) -> None:
        """Merge all segments into one (old ones are removed only after the merged one exists)."""
        import numpy as np

        old = self.segments()
        if len(old) <= 1:
            return
        parts = self.load()
        if parts:
            self._write({f: np.concatenate([p[f] for p in parts]) for f in self.fields})
        for seg in old:
            shutil.rmtree(seg, ignore_errors=True)
