"""Deterministic `.keras` files: the same weights always give the same bytes.

A `.keras` file is a zip holding config.json, metadata.json (with `date_saved`) and model.weights.h5; Keras
stamps the save time into metadata.json and every zip entry, and writes Python object ids (memory addresses)
as `shared_object_id` into config.json. `save_keras` rewrites the archive with the save date removed, the
shared-object ids renumbered in order of appearance (the same sharing, stable numbers) and every entry dated
1980-01-01, then renames it into place atomically, so a forced DVC rerun with identical weights leaves
models/classifier.keras (and the CycleGAN generator) byte-identical.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from tasks.core.io import atomic_path

ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip entry can hold
VOLATILE_METADATA = ("date_saved",)


def renumber_shared_objects(obj: Any, ids: dict[Any, int] | None = None) -> Any:
    """Replace every `shared_object_id` (an id() of the saving process) by 1, 2, ... in order of first appearance;
    equal ids stay equal, so shared layers/objects are still shared on load."""
    ids = {} if ids is None else ids
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if key == "shared_object_id" and isinstance(value, (int, str)):
                out[key] = ids.setdefault(value, len(ids) + 1)
            else:
                out[key] = renumber_shared_objects(value, ids)
        return out
    if isinstance(obj, list):
        return [renumber_shared_objects(v, ids) for v in obj]
    return obj


def normalise_keras_archive(src: Path | str, dst: Path | str) -> None:
    """Copy the zip `src` to `dst` with fixed entry dates/permissions and metadata.json without its save date."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename == "metadata.json":
                meta = json.loads(data)
                for key in VOLATILE_METADATA:
                    meta.pop(key, None)
                data = json.dumps(meta, sort_keys=True).encode()
            elif info.filename == "config.json":
                data = json.dumps(renumber_shared_objects(json.loads(data))).encode()
            entry = zipfile.ZipInfo(info.filename, date_time=ZIP_DATE)
            entry.compress_type = info.compress_type
            entry.external_attr = 0o644 << 16
            entry.create_system = 3  # unix: the same bytes whichever OS saved it
            zout.writestr(entry, data)


def save_keras(model: Any, path: Path | str) -> Path:
    """model.save to `path` (a .keras file) deterministically and atomically; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        keras_tmp = tmp.with_name(tmp.name + ".keras")  # Keras insists on the .keras suffix
        try:
            model.save(keras_tmp)
            normalise_keras_archive(keras_tmp, tmp)
        finally:
            keras_tmp.unlink(missing_ok=True)
    return path
