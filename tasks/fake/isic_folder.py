"""ISIC-style folders (what `isic image download DIR` writes): scanning their image files safely, reading image
sizes from headers, and writing small sample folders for tests and benchmarks."""

from __future__ import annotations

import csv
import os
import random
import stat
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from isic_client.models import LICENSES

__all__ = ["IMAGE_TYPES", "FolderScan", "scan_images", "image_size", "write_png", "write_sample_folder"]

# Image suffixes an ISIC folder may hold, with the Content-Type a server sends for them.
IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png",
               ".tif": "image/tiff", ".tiff": "image/tiff"}


@dataclass
class FolderScan:
    """The image files of one folder, by id (the file name without its suffix).

    `files` maps an id to its one regular file. An id whose entry cannot be used (not a regular file, a
    symlink that leaves the folder, or several image files for one id) is in `problems` with the reason
    instead, and never in `files`."""

    root: Path
    files: dict[str, Path] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def scan_images(root: Path) -> FolderScan:
    """Every entry of `root` named like an image (suffix in IMAGE_TYPES, any case), checked without opening it.

    Directories, named pipes, sockets and devices are refused (opening a pipe would block forever); a symlink
    is followed only when its target is a regular file inside `root`. One directory listing, no recursion."""
    root = Path(root)
    real_root = root.resolve()
    scan = FolderScan(root)
    names: dict[str, list[str]] = {}
    with os.scandir(root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        stem, suffix = os.path.splitext(entry.name)
        if suffix.lower() not in IMAGE_TYPES or not stem:
            continue
        names.setdefault(stem, []).append(entry.name)
        try:
            if entry.is_symlink():
                target = Path(entry.path).resolve()
                if not target.is_relative_to(real_root):
                    scan.problems[stem] = f"{entry.name} is a symlink to {target}, outside {root}; not followed"
                    continue
                mode = target.stat().st_mode
                if not stat.S_ISREG(mode):
                    scan.problems[stem] = f"{entry.name} is a symlink to {_kind(mode)}, not an image file"
                    continue
            else:
                mode = entry.stat(follow_symlinks=False).st_mode
                if not stat.S_ISREG(mode):
                    scan.problems[stem] = f"{entry.name} is {_kind(mode)}, not an image file"
                    continue
        except OSError as exc:  # a broken symlink, or an entry removed while we look
            scan.problems[stem] = f"{entry.name} cannot be read: {exc.strerror or exc}"
            continue
        scan.files[stem] = Path(entry.path)
    for stem, found in names.items():
        if len(found) > 1:  # ISIC_x.jpg + ISIC_x.png: which one carries the label is unknowable
            scan.files.pop(stem, None)
            scan.problems[stem] = (f"several image files for one id: {', '.join(found)}; keep exactly one "
                                   f"in {root}")
    return scan


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG IHDR or a JPEG SOFn header; None when neither parses."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        w, h = struct.unpack(">II", data[16:24])
        return int(w), int(h)
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        (seg_len,) = struct.unpack(">H", data[i + 2:i + 4])
        # SOF0..SOF15 minus DHT (C4), JPG (C8), DAC (CC) carry the frame size.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > len(data):
                return None
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return int(w), int(h)
        if marker == 0xDA:  # start of scan before any SOF: not a valid header
            return None
        i += 2 + seg_len
    return None


def write_png(path: Path, width: int, height: int, seed: int = 0) -> int:
    """A small valid RGB PNG (a seeded colour pattern) written with zlib only; returns its byte size."""
    rng = random.Random(seed)
    base = [rng.randrange(256) for _ in range(3)]
    rows = []
    for y in range(height):
        row = bytearray([0])  # filter type 0
        for x in range(width):
            row += bytes(((base[0] + 7 * x) % 256, (base[1] + 5 * y) % 256, (base[2] + 3 * (x ^ y)) % 256))
        rows.append(bytes(row))

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"".join(rows), 6)) + chunk(b"IEND", b""))
    Path(path).write_bytes(data)
    return len(data)


def write_sample_folder(root: Path, n: int = 12, seed: int = 0, size: tuple[int, int] = (24, 16)) -> Path:
    """A tiny ISIC-style folder (valid PNGs + metadata.csv with current-API columns) for tests/benchmarks.

    Not lesion-like (that is tasks/fake/lesions.py); varied metadata so search and collections have work."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    cols = ["isic_id", "attribution", "copyright_license", "image_type", "age_approx", "sex", "anatom_site_1",
            "diagnosis_1", "diagnosis_2", "diagnosis_3", "melanocytic", "mel_thick_mm", "patient_id",
            "lesion_id", "collection"]
    dx = [("Benign", "Benign melanocytic proliferations", "Nevus"),
          ("Malignant", "Malignant melanocytic proliferations (Melanoma)", "Melanoma Invasive"),
          ("Malignant", "Malignant adnexal epithelial proliferations - Follicular", "Basal cell carcinoma"),
          ("Indeterminate", "Indeterminate epidermal proliferations", "Solar or actinic keratosis"),
          ("", "", "")]
    rows = []
    for i in range(n):
        isic_id = f"ISIC_{9100000 + i:07d}"
        write_png(root / f"{isic_id}.png", size[0] + i % 3, size[1], seed=seed * 100003 + i)
        d1, d2, d3 = dx[i % len(dx)]
        rows.append({
            "isic_id": isic_id,
            "attribution": ["Anonymous", "Sample Clinic A", "Sample Institute B"][i % 3],
            "copyright_license": LICENSES[i % 3],
            "image_type": "dermoscopic" if i % 4 else "clinical: close-up",
            "age_approx": "" if i % 7 == 6 else str(5 * rng.randrange(4, 17)),
            "sex": "" if i % 5 == 4 else rng.choice(["male", "female"]),
            "anatom_site_1": rng.choice(["Trunk", "Head and neck", "Lower extremity", "Upper extremity"]),
            "diagnosis_1": d1, "diagnosis_2": d2, "diagnosis_3": d3,
            "melanocytic": {"Nevus": "true", "Melanoma Invasive": "true"}.get(d3, "false" if d3 else ""),
            "mel_thick_mm": f"{rng.randrange(10, 300) / 100:.2f}" if d3 == "Melanoma Invasive" else "",
            "patient_id": f"IP_{9100100 + i // 2:07d}",
            "lesion_id": f"IL_{9100200 + i:07d}",
            "collection": "Sample collection A" if i % 2 == 0 else "Sample collection B",
        })
    with open(root / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return root
