"""dedupe stage: exact and near-duplicate photos across sources, a keep-policy, and the duplicate groups.

Pipeline (pure functions first, `run()` last):
1. features per distinct file content (sha256 of the bytes), cached under `.cache/lesionflow/dedupe/`:
   decoded-pixel hash, 256-bit DCT pHash of the grey image, a small square grey thumbnail;
2. candidates: same bytes, same decoded pixels, same `isic_id` in two sources, and pHash neighbours within
   `phash_max_distance` (exact all-pairs below `brute_force_max` distinct hashes, bit-sampling LSH above:
   sub-quadratic, the collision probability of a pair at the radius is `search_recall`);
3. verification of every non-exact candidate on pixels: Pearson correlation of the grey thumbnails and of their
   band-pass (detail) versions, as they are or, when they disagree (crops), after an ECC alignment limited
   to what a crop/resize/squash does (axis-aligned scale and shift). The detail correlation is what rejects
   look-alikes: unrelated photos with the same dark dermatoscope vignette reach 0.95-0.98 on plain
   thumbnails but not on their detail;
4. union-find of the accepted pairs, keep-policy per group, label-conflict groups dropped entirely.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from tasks.core.config import Dedupe, Params
from tasks.core.io import KEY, Paths, progress, read_index, sha256_file, write_index, write_json, write_table
from tasks.core.labels import label_of

# Bump when the feature computation changes: old cache segments are then ignored, never mixed in.
FEATURE_VERSION = 1
PHASH_BITS = 256
PHASH_WORDS = PHASH_BITS // 64
_HASH_SIDE = 64  # grey image side the DCT runs on
_DCT_SIDE = 16  # 16x16 low-frequency block = 256 bits
_BANDPASS = (1.0, 4.0)  # Gaussian sigmas at 64 px: keeps lesion texture, drops vignette and illumination
# The alignment may undo what a crop, resize or aspect squash does (axis-aligned scale and shift), not more:
# with rotation/shear allowed, ECC bends one smooth round lesion onto another. Measured on 5 % crops of real
# images: |off-diagonal| <= 0.032, |scale - 1| <= 0.105; unrelated look-alike lesions needed 0.11-0.2 shear.
_MAX_SCALE = 0.2
_MAX_SHEAR = 0.05
_MAX_SHIFT = 0.25  # of the thumbnail side
_ECC_GATE = 0.80  # below this unaligned grey correlation, alignment is not even tried
_PHASE_GATE = 0.5  # nor below this phase-correlation peak of the detail images (see verify_pair)
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_POOL_MIN_JOBS = 256  # below this, starting worker processes (~1 s) costs more than it saves

OUTPUT_COLUMNS = ["dup_group", "keep", "dup_reason", "dup_kind", "dup_size", "content_sha256", "phash",
                  "decoded_x", "decoded_y", "readable"]


# --------------------------------------------------------------------------- features (pure)
@dataclass
class Features:
    """Per-content features, stacked: row i describes the file whose bytes hash to sha[i]."""

    sha: np.ndarray  # (n,) <U64
    ok: np.ndarray  # (n,) bool: decoded
    error: np.ndarray  # (n,) str: why not decoded ('' when ok)
    height: np.ndarray  # (n,) int32
    width: np.ndarray  # (n,) int32
    pixhash: np.ndarray  # (n,) <U32: hash of the decoded pixels ('' when not decoded)
    phash: np.ndarray  # (n, 4) uint64
    thumb: np.ndarray  # (n, t, t) uint8

    def __len__(self) -> int:
        return len(self.sha)

    @classmethod
    def empty(cls, thumb_size: int) -> "Features":
        return cls(np.zeros(0, "<U64"), np.zeros(0, bool), np.zeros(0, "<U1"), np.zeros(0, np.int32),
                   np.zeros(0, np.int32), np.zeros(0, "<U32"), np.zeros((0, PHASH_WORDS), np.uint64),
                   np.zeros((0, thumb_size, thumb_size), np.uint8))

    @classmethod
    def concat(cls, parts: Sequence["Features"], thumb_size: int) -> "Features":
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty(thumb_size)
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in cls.__dataclass_fields__))

    def take(self, idx: np.ndarray) -> "Features":
        return Features(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))


def grey_square(img: np.ndarray, side: int) -> np.ndarray:
    """Colour-normalised grey, resized to side x side ignoring aspect (a squashed copy lands on the same grid).

    Each colour channel is standardised (zero mean, unit variance over the image) before averaging, so
    per-channel gains and offsets (white balance, colour constancy) cancel exactly and hue rotations nearly:
    plain luma loses ~10 % of 24-degree hue-shifted copies, this loses ~2 % (benchmarks/dedupe.py)."""
    import cv2

    small = cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32)
    if small.ndim == 2:
        small = small[..., None]
    mu = small.reshape(-1, small.shape[-1]).mean(0)
    sd = small.reshape(-1, small.shape[-1]).std(0)
    z = (small - mu) / np.maximum(sd, 1.0)  # a flat channel (sd ~ 0) carries no shape: leave it ~0
    return z.mean(axis=-1)


def to_uint8(grey: np.ndarray) -> np.ndarray:
    """Store a standardised grey thumbnail compactly: 40 levels per standard deviation, +-3.2 sd."""
    return np.clip(np.rint(128.0 + 40.0 * grey), 0, 255).astype(np.uint8)


def phash256(grey64: np.ndarray) -> np.ndarray:
    """256-bit DCT perceptual hash as 4 uint64: sign of the 16x16 low frequencies against their AC median.

    Thresholding at the median makes it invariant to affine intensity changes (brightness, contrast,
    channel gains); the low frequencies make it survive resizing and re-encoding."""
    import cv2

    d = cv2.dct(np.ascontiguousarray(grey64, np.float32))[:_DCT_SIDE, :_DCT_SIDE].ravel()
    bits = d > np.median(d[1:])
    return np.packbits(bits).view(">u8").astype(np.uint64)


def decode_features(data: bytes, thumb_size: int) -> dict[str, Any]:
    """Decode one image file's bytes and compute its features; never raises (errors go into 'error')."""
    import cv2

    out: dict[str, Any] = {"ok": False, "error": "", "height": 0, "width": 0, "pixhash": "",
                           "phash": np.zeros(PHASH_WORDS, np.uint64),
                           "thumb": np.zeros((thumb_size, thumb_size), np.uint8)}
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    except cv2.error as exc:  # some corrupt headers raise instead of returning None
        out["error"] = f"decode error: {exc.msg if hasattr(exc, 'msg') else exc}"
        return out
    if img is None or img.size == 0:
        out["error"] = "not a decodable image" if data else "empty file"
        return out
    h, w = img.shape[:2]
    pix = hashlib.sha256(f"{h}x{w}x{img.shape[2]}".encode() + img.tobytes()).hexdigest()[:32]
    g = grey_square(img, _HASH_SIDE)
    t = g if thumb_size == _HASH_SIDE else grey_square(img, thumb_size)
    out.update(ok=True, height=h, width=w, pixhash=pix, phash=phash256(g), thumb=to_uint8(t))
    return out


def _features_of_files(jobs: list[tuple[str, str]], thumb_size: int) -> Features:
    """Worker: (sha, absolute path) -> Features; one process handles a chunk to amortise start-up."""
    import cv2

    cv2.setNumThreads(1)  # the pool provides the parallelism; OpenCV threads would oversubscribe the cores
    recs = []
    for sha, path in jobs:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            data, err = b"", f"cannot read: {exc.strerror or exc}"
        else:
            err = ""
        rec = decode_features(data, thumb_size)
        if err:
            rec["error"] = err
        recs.append(rec)
    return Features(
        sha=np.array([s for s, _ in jobs], "<U64"),
        ok=np.array([r["ok"] for r in recs], bool),
        error=np.array([r["error"][:200] for r in recs], str) if recs else np.zeros(0, "<U1"),
        height=np.array([r["height"] for r in recs], np.int32),
        width=np.array([r["width"] for r in recs], np.int32),
        pixhash=np.array([r["pixhash"] for r in recs], "<U32"),
        phash=np.stack([r["phash"] for r in recs]).astype(np.uint64) if recs else np.zeros((0, 4), np.uint64),
        thumb=np.stack([r["thumb"] for r in recs]) if recs else np.zeros((0, thumb_size, thumb_size), np.uint8),
    )


def compute_features(jobs: list[tuple[str, str]], thumb_size: int, workers: int = 1,
                     chunk: int = 64) -> Features:
    """Features for (sha, path) jobs, in a process pool when workers > 1 (order preserved)."""
    import multiprocessing

    chunks = [jobs[i:i + chunk] for i in range(0, len(jobs), chunk)]
    if workers <= 1 or len(jobs) < _POOL_MIN_JOBS:
        parts = [_features_of_files(c, thumb_size) for c in progress(chunks, desc="dedupe: hashing", unit="chunk")]
    else:
        # The platform default start method (fork on Linux): spawn would re-import the caller's __main__,
        # which breaks any script without a main guard; workers only run numpy/OpenCV on their own data.
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context()) as pool:
            parts = list(progress(pool.map(_features_of_files, chunks, [thumb_size] * len(chunks)),
                                  total=len(chunks), desc="dedupe: hashing", unit="chunk"))
    return Features.concat(parts, thumb_size)


# --------------------------------------------------------------------------- feature cache
class FeatureCache:
    """Features keyed by content sha256, stored as append-only segments of .npy files.

    A run writes one new segment holding only what it had to compute, so a nightly rerun over 100k cached
    images hashes nothing and rewrites nothing; many small segments are compacted into one."""

    MAX_SEGMENTS = 8

    def __init__(self, root: Path, thumb_size: int):
        self.dir = Path(root) / f"v{FEATURE_VERSION}-t{thumb_size}"
        self.thumb_size = thumb_size

    def _segments(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if p.is_dir() and p.name.startswith("seg-")
                      and (p / "done").exists())

    def load(self) -> Features:
        parts = []
        for seg in self._segments():
            try:
                parts.append(Features(**{f: np.load(seg / f"{f}.npy") for f in Features.__dataclass_fields__}))
            except (OSError, ValueError, TypeError):
                continue  # a damaged segment only costs speed: its images are hashed again
        feats = Features.concat(parts, self.thumb_size)
        if len(feats):
            _, first = np.unique(feats.sha, return_index=True)
            feats = feats.take(np.sort(first))
        return feats

    def _write_segment(self, feats: Features) -> None:
        """One segment, atomically: it is written under a temp name and renamed once complete."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            for f in Features.__dataclass_fields__:
                np.save(tmp / f"{f}.npy", getattr(feats, f), allow_pickle=False)
            (tmp / "done").write_text(str(len(feats)))
            os.replace(tmp, self.dir / f"seg-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def add(self, feats: Features) -> None:
        """Persist newly computed features; compact when segments pile up."""
        if len(feats):
            self._write_segment(feats)
        if len(self._segments()) > self.MAX_SEGMENTS:
            self.compact()

    def compact(self) -> None:
        """Merge all segments into one (the old ones are removed only after the merged one exists)."""
        old = self._segments()
        if len(old) <= 1:
            return
        self._write_segment(self.load())
        for seg in old:
            shutil.rmtree(seg, ignore_errors=True)


# --------------------------------------------------------------------------- candidate search (pure)
def popcount64(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Hamming distance of packed (..., 4) uint64 hashes."""
    return popcount64(np.bitwise_xor(a, b)).sum(axis=-1, dtype=np.int64)


def _brute_force_pairs(h: np.ndarray, radius: int, block: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Exact all-pairs search (i < j, distance <= radius) in row blocks; O(n^2), only for small n."""
    n = len(h)
    ii, jj = [], []
    for s in range(0, n, block):
        d = popcount64(h[s:s + block, None, :] ^ h[None, :, :]).sum(-1, dtype=np.int64)
        r, c = np.nonzero(d <= radius)
        keep = c > r + s
        ii.append(r[keep] + s)
        jj.append(c[keep])
    return (np.concatenate(ii), np.concatenate(jj)) if ii else (np.zeros(0, np.int64),) * 2


def lsh_plan(n: int, radius: int, recall: float, bits: int = PHASH_BITS) -> tuple[int, int]:
    """(k bits per key, L tables) for bit-sampling LSH over n hashes, k in {16, 24, 32}.

    A pair at distance `radius` collides in one table with p = (1 - radius/bits)^k, so L tables find it
    with probability 1 - (1 - p)^L >= recall. The cost model (measured on one core) is per table:
    a radix sort of 16-bit keys (cheap) or a comparison sort of wider keys, plus one Hamming check for each
    of the ~n^2/2 * 2^-k random collisions."""
    p1 = max(1e-9, 1.0 - radius / bits)
    best: tuple[float, int, int] | None = None
    for k in (16, 24, 32):
        p = p1 ** k
        tables = 1 if p >= recall else math.ceil(math.log(1.0 - recall) / math.log(1.0 - p))
        sort_cost = n * (1.0 if k == 16 else 12.0)
        cost = tables * (n * 2.0 + sort_cost + 4.0 * 0.5 * n * n * 2.0 ** -k)
        if best is None or cost < best[0]:
            best = (cost, k, tables)
    assert best is not None
    return best[1], best[2]


def _lsh_pairs(h: np.ndarray, radius: int, recall: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Bit-sampling LSH: L tables keyed on k random bit positions, then an exact Hamming check per pair.

    Keys are built by shift-or of k bit rows (0.5 ms per table at 100k hashes; packbits across rows is 15x
    slower) and 16-bit keys sort by radix sort in O(n)."""
    n = len(h)
    k, tables = lsh_plan(n, radius, recall)
    bits_t = np.unpackbits(h.astype(">u8").view(np.uint8).reshape(n, -1), axis=1).T.copy()  # (256, n) 0/1
    cols = [np.ascontiguousarray(h[:, w]) for w in range(h.shape[1])]
    rng = np.random.default_rng(seed)
    key_dtype = np.uint16 if k <= 16 else np.uint32 if k <= 32 else np.uint64

    def within(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        # Random collisions sit near distance 128: half the words already exceed the radius for most of
        # them, so the full distance is computed only for the survivors (10x faster than hamming()).
        d = np.bitwise_count(cols[0][a] ^ cols[0][b]).astype(np.int64)
        d += np.bitwise_count(cols[1][a] ^ cols[1][b])
        cand = np.nonzero(d <= radius)[0]
        for w in range(2, len(cols)):
            d[cand] += np.bitwise_count(cols[w][a[cand]] ^ cols[w][b[cand]])
        return cand[d[cand] <= radius]

    found: list[np.ndarray] = []
    for _ in range(tables):
        key = np.zeros(n, key_dtype)
        for j, p in enumerate(rng.choice(PHASH_BITS, size=k, replace=False)):
            key |= bits_t[p].astype(key_dtype) << key_dtype(j)
        order = np.argsort(key, kind="stable")
        sk = key[order]
        # Pairs inside each run of equal keys: compare every element with the one `off` places later.
        off = 1
        while off < n:
            same = np.nonzero(sk[off:] == sk[:-off])[0]
            if not len(same):
                break
            a, b = order[same], order[same + off]
            ok = within(a, b)
            if len(ok):
                lo, hi = np.minimum(a[ok], b[ok]), np.maximum(a[ok], b[ok])
                found.append(lo.astype(np.int64) * n + hi)
            off += 1
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    codes = np.unique(np.concatenate(found))
    return codes // n, codes % n


def near_pairs(hashes: np.ndarray, radius: int, *, recall: float = 0.999, seed: int = 0,
               brute_force_max: int = 4096) -> pd.DataFrame:
    """Pairs (i < j) of rows of `hashes` ((n, 4) uint64) within Hamming `radius`, with their distance.

    Identical hashes are collapsed first (a star of pairs to one representative), so a burst of identical
    images cannot blow up the search; distinct hashes go to exact search or LSH."""
    hashes = np.ascontiguousarray(hashes, np.uint64)
    n = len(hashes)
    if n < 2:
        return pd.DataFrame({"i": np.zeros(0, np.int64), "j": np.zeros(0, np.int64), "hamming": np.zeros(0, np.int64)})
    uniq, first, inv = np.unique(hashes, axis=0, return_index=True, return_inverse=True)
    inv = inv.ravel()
    rep = first[inv]  # representative original row of each row's hash
    star = np.nonzero(rep != np.arange(n))[0]
    si, sj = np.minimum(rep[star], star), np.maximum(rep[star], star)
    if len(uniq) <= brute_force_max:
        ui, uj = _brute_force_pairs(uniq, radius)
    else:
        ui, uj = _lsh_pairs(uniq, radius, recall, seed)
    a, b = first[ui], first[uj]
    i = np.concatenate([si, np.minimum(a, b)])
    j = np.concatenate([sj, np.maximum(a, b)])
    out = pd.DataFrame({"i": i.astype(np.int64), "j": j.astype(np.int64)})
    out["hamming"] = hamming(hashes[out["i"].to_numpy()], hashes[out["j"].to_numpy()])
    return out.sort_values(["i", "j"], kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------- verification (pure)
def _ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    if mask is not None:
        a, b = a[mask], b[mask]
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / den) if den > 1e-9 else 0.0


def _bandpass(t: np.ndarray, scale: float) -> np.ndarray:
    import cv2

    s1, s2 = _BANDPASS[0] * scale, _BANDPASS[1] * scale
    return cv2.GaussianBlur(t, (0, 0), s1) - cv2.GaussianBlur(t, (0, 0), s2)


@dataclass(frozen=True)
class Verdict:
    corr: float  # Pearson correlation of the grey thumbnails (after alignment if aligned)
    detail: float  # Pearson correlation of their band-pass versions
    aligned: bool
    accepted: bool


def _phase_shift(ba: np.ndarray, bb: np.ndarray) -> tuple[tuple[float, float], float]:
    """Translation of bb relative to ba and the phase-correlation peak (~1 same photo, ~0.3 unrelated)."""
    import cv2

    win = cv2.createHanningWindow(ba.shape[::-1], cv2.CV_32F)
    shift, response = cv2.phaseCorrelate(ba, bb, win)
    return shift, float(response)


def aligned_scores(a: np.ndarray, b: np.ndarray, shift: tuple[float, float] = (0.0, 0.0)
                   ) -> tuple[float, float] | None:
    """(corr, detail) after warping b onto a with an ECC affine fit from `shift`; None if no small warp fits."""
    import cv2

    side = a.shape[0]
    scale = side / 64.0
    warp = np.array([[1, 0, shift[0]], [0, 1, shift[1]]], dtype=np.float32)
    try:
        _, warp = cv2.findTransformECC(a, b, warp, cv2.MOTION_AFFINE,
                                       (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 1e-4), None, 3)
    except cv2.error:  # did not converge: the images are not one affine map apart
        return None
    if (np.abs(np.diag(warp[:, :2]) - 1).max() > _MAX_SCALE or abs(warp[0, 1]) > _MAX_SHEAR
            or abs(warp[1, 0]) > _MAX_SHEAR or np.abs(warp[:, 2]).max() > _MAX_SHIFT * side):
        return None
    flags = cv2.INTER_LINEAR + cv2.WARP_INVERSE_MAP
    bw = cv2.warpAffine(b, warp, (side, side), flags=flags, borderMode=cv2.BORDER_REFLECT)
    valid = cv2.warpAffine(np.ones_like(b), warp, (side, side), flags=flags, borderValue=0) > 0.999
    # Band-pass near the border of the warped image mixes in reflected pixels: judge detail on the interior.
    margin = max(1, int(round(2 * _BANDPASS[1] * scale)))
    inner = cv2.erode(valid.astype(np.uint8), np.ones((2 * margin + 1,) * 2, np.uint8)) > 0
    if inner.sum() < 0.25 * side * side:
        return None
    return _ncc(a, bw, valid), _ncc(_bandpass(a, scale), _bandpass(bw, scale), inner)


def verify_pair(ta: np.ndarray, tb: np.ndarray, corr_min: float, detail_min: float) -> Verdict:
    """Same photo? Grey-thumbnail AND detail correlation pass, as they are or after aligning b onto a."""
    a = ta.astype(np.float32)
    b = tb.astype(np.float32)
    scale = a.shape[0] / 64.0
    ba, bb = _bandpass(a, scale), _bandpass(b, scale)
    corr, detail = _ncc(a, b), _ncc(ba, bb)
    if corr >= corr_min and detail >= detail_min:
        return Verdict(corr, detail, False, True)
    if corr < _ECC_GATE:  # too different for a crop/squash of the same photo: skip the costly alignment
        return Verdict(corr, detail, False, False)
    # Cheap gate before ECC (0.2 ms vs 1-5 ms): the phase-correlation peak of the detail images is >= 0.74
    # for 5 % crops of the same photo but ~0.3 for most unrelated candidates.
    shift, response = _phase_shift(ba, bb)
    if response < _PHASE_GATE:
        return Verdict(corr, detail, False, False)
    al = aligned_scores(a, b, shift)
    if al is None or al[1] < detail:  # alignment did not help: report the unaligned scores
        return Verdict(corr, detail, False, False)
    return Verdict(al[0], al[1], True, al[0] >= corr_min and al[1] >= detail_min)


def verify_pairs(thumbs: np.ndarray, pairs: pd.DataFrame, corr_min: float, detail_min: float,
                 workers: int = 1) -> pd.DataFrame:
    """Add corr, detail, aligned, accepted columns to (i, j) pairs of rows of `thumbs`."""
    ij = list(zip(pairs["i"].to_numpy(), pairs["j"].to_numpy()))

    def one(p: tuple[int, int]) -> Verdict:
        return verify_pair(thumbs[p[0]], thumbs[p[1]], corr_min, detail_min)

    if workers > 1 and len(ij) > 256:
        with ThreadPoolExecutor(max_workers=workers) as pool:  # cv2 releases the GIL inside ECC
            verdicts = list(pool.map(one, ij, chunksize=64))
    else:
        verdicts = [one(p) for p in ij]
    out = pairs.copy()
    out["corr"] = np.round([v.corr for v in verdicts], 5) if verdicts else np.zeros(0)
    out["detail"] = np.round([v.detail for v in verdicts], 5) if verdicts else np.zeros(0)
    out["aligned"] = np.array([v.aligned for v in verdicts], bool)
    out["accepted"] = np.array([v.accepted for v in verdicts], bool)
    return out


# --------------------------------------------------------------------------- grouping and keep policy (pure)
def components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected-component label per node for undirected edges (i, j) (union-find, vectorised by scipy)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if n == 0:
        return np.zeros(0, np.int64)
    g = coo_matrix((np.ones(len(i), np.int8), (np.asarray(i), np.asarray(j))), shape=(n, n))
    return connected_components(g, directed=False)[1]


def license_rank(value: Any) -> int:
    """0 = CC-0 (public domain) < 1 = CC-BY < 2 = CC-BY-NC < 3 = anything else or unknown."""
    s = re.sub(r"[^a-z0-9]", "", str(value or "").lower())
    if s.startswith("cc0") or s in ("publicdomain", "pd"):
        return 0
    if s.startswith("ccbync"):
        return 2
    if s.startswith("ccby") and "nd" not in s[4:6]:
        return 1
    return 3


def _license_col(df: pd.DataFrame) -> pd.Series:
    """The licence per row: `copyright_license` (ISIC API), else a local CSV's own `license` column."""
    out = pd.Series([None] * len(df), index=df.index, dtype=object)
    for col in ("copyright_license", "license"):
        if col in df:
            vals = df[col].where(df[col].notna() & (df[col].astype(str).str.strip() != ""))
            out = out.where(out.notna(), vals)
    return out


def _pixels(df: pd.DataFrame) -> pd.Series:
    """Pixel count from the decoded size, falling back on the declared pixels_x/pixels_y."""
    dec = df["decoded_x"].astype("float64") * df["decoded_y"].astype("float64")
    if "pixels_x" in df and "pixels_y" in df:
        decl = pd.to_numeric(df["pixels_x"], errors="coerce") * pd.to_numeric(df["pixels_y"], errors="coerce")
        dec = dec.where(dec > 0, decl)
    return dec.fillna(0)


def rank_members(df: pd.DataFrame, policy: Sequence[str]) -> pd.DataFrame:
    """Sort key columns, best first: readable, then the policy criteria in order, then (source, isic_id)."""
    keys = pd.DataFrame(index=df.index)
    keys["_unreadable"] = ~df["readable"].astype(bool)
    for crit in policy:
        if crit == "labelled":
            keys["_unlabelled"] = df["label"].eq("unknown")
        elif crit == "larger":
            keys["_neg_pixels"] = -_pixels(df)
        elif crit == "license":
            keys["_license"] = _license_col(df).map(license_rank)
        else:  # config validation should have caught it; fail loudly rather than ignore a policy
            raise ValueError(f"params dedupe.keep_policy: unknown criterion {crit!r}")
    keys["_source"] = df["source"].astype(str)
    keys["_isic_id"] = df["isic_id"].astype(str)
    return keys


def _conflict(labels: Iterable[str]) -> bool:
    """Malignant and benign in one group; indeterminate and unknown conflict with nothing."""
    s = set(labels)
    return "malignant" in s and "benign" in s


def star_edges(keys: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Edges (first row, other row) joining rows with equal keys (only rows where mask is True)."""
    rows = np.arange(len(keys)) if mask is None else np.nonzero(mask)[0]
    if not len(rows):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    k = pd.Series(keys[rows], index=rows)
    dup = k[k.duplicated(keep=False)]
    first = pd.Series(dup.index, index=dup.index).groupby(dup.to_numpy()).transform("first")
    other = first.index.to_numpy() != first.to_numpy()
    return first.to_numpy()[other].astype(np.int64), first.index.to_numpy()[other].astype(np.int64)


def assign_groups(df: pd.DataFrame, edges: pd.DataFrame, policy: Sequence[str]) -> pd.DataFrame:
    """Add dup_group, dup_size, keep, dup_reason, dup_kind to `df` (positions 0..n-1).

    `edges` holds accepted pairs (i, j, kind) with kind 'exact' or 'near'. `df` must already carry the
    columns label, readable, read_error, decoded_x, decoded_y, content_sha256, pixhash."""
    df = df.reset_index(drop=True).copy()
    n = len(df)
    comp = components(n, edges["i"].to_numpy(), edges["j"].to_numpy())
    src, iid = df["source"].astype(str).to_numpy(), df["isic_id"].astype(str).to_numpy()
    # Stable group id: the smallest (isic_id, source) of the members; re-issued ids are the larger ones, so
    # the group keeps its id when a re-issue or another source's copy joins it.
    order = np.lexsort((src, iid))
    first = pd.Series(order, index=comp[order]).groupby(level=0).first()  # comp -> row with the smallest key
    df["dup_group"] = [f"{iid[r]}@{src[r]}" for r in first.reindex(comp).to_numpy()]
    size = np.bincount(comp, minlength=comp.max() + 1 if n else 0)[comp] if n else np.zeros(0, int)
    df["dup_size"] = size.astype(int)

    keys = rank_members(df, policy)
    ranked = keys.sort_values(list(keys.columns), kind="stable").index.to_numpy()
    best = pd.Series(ranked, index=comp[ranked]).groupby(level=0).first().reindex(comp).to_numpy()
    labels_by_comp = df.groupby(comp)["label"].agg(lambda s: sorted(set(s)))
    conflict_labels = labels_by_comp[labels_by_comp.map(_conflict)]
    in_conflict = np.isin(comp, conflict_labels.index.to_numpy())
    near_comps = np.unique(comp[edges.loc[edges["kind"] == "near", "i"].to_numpy()]) if len(edges) else []
    readable = df["readable"].to_numpy(bool)

    kind = np.where(size == 1, np.where(readable, "unique", "unreadable"),
                    np.where(np.isin(comp, near_comps), "near", "exact")).astype(object)
    keep = (size == 1) | ((np.arange(n) == best) & ~in_conflict)
    sha, pix = df["content_sha256"].to_numpy(), df["pixhash"].to_numpy()
    identical = (sha == sha[best]) | ((pix == pix[best]) & (pix != ""))
    reason = np.empty(n, object)
    for r in range(n):
        if size[r] == 1:
            reason[r] = "unique" if readable[r] else f"unreadable: {df['read_error'].iat[r]}"
        elif in_conflict[r]:
            reason[r] = f"label conflict in group ({' vs '.join(conflict_labels[comp[r]])})"
        elif keep[r]:
            reason[r] = f"kept: best of {size[r]} by {' > '.join(policy) or 'key'}"
        else:
            b = best[r]
            what = "exact duplicate" if identical[r] else "near duplicate"
            reason[r] = f"{what} of {src[b]}:{iid[b]}"
    df["keep"] = keep.astype(bool)
    df["dup_reason"] = reason.astype(str)
    df["dup_kind"] = kind.astype(str)
    return df


# --------------------------------------------------------------------------- the table-level stage (pure)
@dataclass
class DedupeResult:
    index: pd.DataFrame  # input rows + OUTPUT_COLUMNS
    pairs: pd.DataFrame  # every exact pair and every verified candidate, with scores and verdict
    groups: pd.DataFrame  # one row per group with > 1 member
    metrics: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


PAIR_COLUMNS = ["a", "b", "kind", "why", "hamming", "corr", "detail", "aligned", "accepted", "group"]


def dedupe_table(index: pd.DataFrame, feats: Features, sha_per_row: Sequence[str], cfg: Dedupe) -> DedupeResult:
    """Dedupe an index table given features per content hash (`sha_per_row[r]` names row r's content)."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    df = index.reset_index(drop=True).copy()
    n = len(df)
    pos = pd.Series(np.arange(len(feats)), index=feats.sha)
    fi = pos.reindex(np.asarray(sha_per_row, dtype=str)).to_numpy()
    if np.isnan(fi.astype(float)).any():
        raise ValueError(f"dedupe: features missing for {int(np.isnan(fi.astype(float)).sum())} row(s)")
    fi = fi.astype(np.int64)
    ok = feats.ok[fi]
    df["content_sha256"] = np.asarray(sha_per_row, dtype=object)
    df["pixhash"] = np.where(ok, feats.pixhash[fi], "")
    df["phash"] = [("".join(f"{int(w):016x}" for w in h) if o else "") for h, o in zip(feats.phash[fi], ok)]
    df["decoded_x"] = np.where(ok, feats.width[fi], 0).astype(int)
    df["decoded_y"] = np.where(ok, feats.height[fi], 0).astype(int)
    df["readable"] = ok
    df["read_error"] = np.where(ok, "", feats.error[fi].astype(str))
    df["label"] = [label_of(rec)[0] for rec in df.to_dict("records")]

    # 1) exact: same bytes, or the same decoded pixels (re-saved with other metadata / encoder settings).
    ei1, ej1 = star_edges(df["content_sha256"].to_numpy())
    ei2, ej2 = star_edges(df["pixhash"].to_numpy(), ok)
    exact = pd.DataFrame({"i": np.concatenate([ei1, ei2]), "j": np.concatenate([ej1, ej2]),
                          "why": ["same bytes"] * len(ei1) + ["same pixels"] * len(ei2)})
    exact = exact.drop_duplicates(["i", "j"]).reset_index(drop=True)
    exact_comp = components(n, exact["i"].to_numpy(), exact["j"].to_numpy())
    timings["exact_s"] = time.perf_counter() - t0

    # 2) near candidates among one representative per exact component (its members share the pixels).
    t1 = time.perf_counter()
    readable_rows = np.nonzero(ok)[0]
    reps = pd.Series(readable_rows).groupby(exact_comp[readable_rows]).first().to_numpy()
    found = near_pairs(feats.phash[fi[reps]], cfg.phash_max_distance, recall=cfg.search_recall, seed=cfg.seed,
                       brute_force_max=cfg.brute_force_max)
    cand = pd.DataFrame({"i": reps[found["i"].to_numpy()], "j": reps[found["j"].to_numpy()], "why": "phash"})
    # Same isic_id from two sources is always a candidate (ISIC re-serves ids), but still checked on pixels.
    rep_of_comp = pd.Series(reps, index=exact_comp[reps])
    rep_row = np.full(n, -1, np.int64)
    rep_row[readable_rows] = rep_of_comp.reindex(exact_comp[readable_rows]).to_numpy()
    ids = df["isic_id"].astype(str).to_numpy()
    si, sj = star_edges(ids, ok)
    si, sj = rep_row[si], rep_row[sj]
    keep_same = si != sj
    same = pd.DataFrame({"i": np.minimum(si, sj)[keep_same], "j": np.maximum(si, sj)[keep_same],
                         "why": "same isic_id"})
    cand = pd.concat([cand, same], ignore_index=True)
    cand = (cand.groupby(["i", "j"], as_index=False, sort=True)["why"]
            .agg(lambda w: "+".join(sorted(set(w)))))
    cand["hamming"] = hamming(feats.phash[fi[cand["i"].to_numpy()]], feats.phash[fi[cand["j"].to_numpy()]])
    timings["search_s"] = time.perf_counter() - t1

    # 3) verification on pixels (thumbnails).
    t2 = time.perf_counter()
    ver = verify_pairs(feats.thumb, cand.assign(i=fi[cand["i"].to_numpy()], j=fi[cand["j"].to_numpy()]),
                       cfg.verify_corr_min, cfg.verify_detail_min, cfg.workers)
    ver[["i", "j"]] = cand[["i", "j"]].to_numpy()
    timings["verify_s"] = time.perf_counter() - t2

    # 4) groups and keep policy.
    t3 = time.perf_counter()
    acc = ver[ver["accepted"]]
    edges = pd.concat([exact.assign(kind="exact")[["i", "j", "kind"]], acc.assign(kind="near")[["i", "j", "kind"]]],
                      ignore_index=True)
    out = assign_groups(df, edges, list(cfg.keep_policy))
    timings["group_s"] = time.perf_counter() - t3

    pairs = pd.concat([exact.assign(kind="exact", hamming=0, corr=1.0, detail=1.0, aligned=False, accepted=True),
                       ver.assign(kind="near")], ignore_index=True)
    keyname = df["source"].astype(str).to_numpy() + ":" + ids
    pi, pj = pairs["i"].to_numpy(np.int64), pairs["j"].to_numpy(np.int64)
    pairs = pairs.assign(a=keyname[pi], b=keyname[pj], group=out["dup_group"].to_numpy()[pi])[PAIR_COLUMNS]
    groups = summarize_groups(out, pairs)
    metrics = dedupe_metrics(out, pairs, groups)
    timings["total_s"] = time.perf_counter() - t0
    result_cols = list(index.columns) + [c for c in OUTPUT_COLUMNS if c not in index.columns]
    return DedupeResult(out[result_cols], pairs, groups, metrics, timings)


def summarize_groups(out: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """One row per duplicate group (> 1 member): members, kept one, kind, conflict, score range."""
    multi = out[out["dup_size"] > 1]
    cols = ["group", "size", "kind", "members", "kept", "labels", "conflict", "min_corr", "min_detail",
            "max_hamming"]
    if multi.empty:
        return pd.DataFrame(columns=cols)
    acc = pairs[pairs["accepted"]]
    score = acc.groupby("group").agg(min_corr=("corr", "min"), min_detail=("detail", "min"),
                                     max_hamming=("hamming", "max"))
    rows = []
    for g, m in multi.groupby("dup_group", sort=True):
        keys = (m["source"].astype(str) + ":" + m["isic_id"].astype(str)).tolist()
        kept = m.loc[m["keep"], ["source", "isic_id"]]
        labels = sorted(set(m["label"]))
        rows.append({"group": g, "size": len(m), "kind": m["dup_kind"].iat[0], "members": ";".join(sorted(keys)),
                     "kept": ";".join(kept["source"].astype(str) + ":" + kept["isic_id"].astype(str)),
                     "labels": ";".join(labels), "conflict": _conflict(labels)})
    groups = pd.DataFrame(rows).set_index("group").join(score).reset_index()
    return groups[cols]


def dedupe_metrics(out: pd.DataFrame, pairs: pd.DataFrame, groups: pd.DataFrame) -> dict[str, Any]:
    """Numbers for DVC metrics: images, groups, pairs by kind, kept / dropped by reason, conflicts."""
    dropped = out[~out["keep"]]
    reason = dropped["dup_reason"].str.extract(r"^(exact duplicate|near duplicate|label conflict)")[0]
    acc = pairs[pairs["accepted"]]
    return {
        "images": int(len(out)),
        "unreadable": int((~out["readable"]).sum()),
        "groups": int(len(groups)),
        "images_in_groups": int(groups["size"].sum()) if len(groups) else 0,
        "largest_group": int(groups["size"].max()) if len(groups) else 1,
        "exact_pairs": int((acc["kind"] == "exact").sum()),
        "near_pairs": int((acc["kind"] == "near").sum()),
        "same_id_pairs": int(acc["why"].str.contains("same isic_id").sum()),
        "candidates_verified": int((pairs["kind"] == "near").sum()),
        "candidates_rejected": int((~pairs["accepted"]).sum()),
        "same_id_rejected": int((~pairs["accepted"] & pairs["why"].str.contains("same isic_id")).sum()),
        "kept": int(out["keep"].sum()),
        "dropped": int(len(dropped)),
        "dropped_by_reason": {k: int(v) for k, v in reason.fillna("other").value_counts().sort_index().items()},
        "conflict_groups": int(groups["conflict"].sum()) if len(groups) else 0,
        "distinct_photos": int(out["dup_group"].nunique()),
    }


# --------------------------------------------------------------------------- I/O: content hashes, cache, run
def _missing_sha(path: Path) -> str:
    """A stable stand-in content key for a file that cannot be read (it still needs a features row)."""
    return "missing-" + hashlib.sha256(str(path).encode()).hexdigest()[:56]


def content_hashes(index: pd.DataFrame, paths: Paths, trust_ingest: bool, workers: int) -> list[str]:
    """sha256 per row: ingest's `sha256` column when trusted and well-formed, else computed from the file."""
    files = [paths.abs(p) for p in index["path"].astype(str)]
    given = [""] * len(files)
    if "sha256" in index and trust_ingest:
        given = index["sha256"].astype(str).str.lower().tolist()

    def one(k: int) -> str:
        if _SHA_RE.match(given[k] or "") and files[k].is_file():
            return given[k]
        try:
            return sha256_file(files[k])
        except OSError:
            return _missing_sha(files[k])

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # hashlib releases the GIL
        return list(pool.map(one, range(len(files))))


def features_for(index: pd.DataFrame, shas: list[str], paths: Paths, cfg: Dedupe,
                 cache: FeatureCache | None) -> tuple[Features, dict[str, int]]:
    """Features for every distinct content of the index: cached ones loaded, the rest computed and cached."""
    cached = cache.load() if cache is not None else Features.empty(cfg.thumb_size)
    have = set(cached.sha.tolist())
    todo: dict[str, str] = {}
    for sha, p in zip(shas, index["path"].astype(str)):
        if sha not in have and sha not in todo:
            todo[sha] = str(paths.abs(p))
    new = compute_features(list(todo.items()), cfg.thumb_size, cfg.workers)
    if cache is not None:
        # A missing file is not content: never cache its stand-in (it may appear by the next run).
        cacheable = np.array([not s.startswith("missing-") for s in new.sha], bool)
        cache.add(new.take(np.nonzero(cacheable)[0]))
    needed = set(shas)
    keep_cached = np.array([s in needed for s in cached.sha], bool)
    feats = Features.concat([cached.take(np.nonzero(keep_cached)[0]), new], cfg.thumb_size)
    stats = {"distinct_contents": len(needed), "hashed_new": len(new), "cache_hits": int(keep_cached.sum())}
    return feats, stats


def run(params: Params, paths: Paths) -> dict[str, Any]:
    """Read data/ingest/index.parquet; write data/dedupe/{index.parquet,groups.csv,pairs.csv}, reports/dedupe/."""
    cfg = params.dedupe
    t0 = time.perf_counter()
    index = read_index(paths, "ingest")
    missing = [c for c in [*KEY, "path"] if c not in index.columns]
    if missing:
        raise ValueError(f"{paths.index('ingest')}: missing column(s) {missing}; rerun `lesionflow stage ingest`")
    shas = content_hashes(index, paths, cfg.trust_ingest_sha256, cfg.workers)
    t_sha = time.perf_counter() - t0
    t1 = time.perf_counter()
    feats, cache_stats = features_for(index, shas, paths, cfg, FeatureCache(paths.cache / "dedupe", cfg.thumb_size))
    t_feat = time.perf_counter() - t1
    res = dedupe_table(index, feats, shas, cfg)

    out_dir = paths.stage("dedupe")
    write_index(res.index, paths, "dedupe")
    write_table(res.groups, out_dir / "groups.csv")
    write_table(res.pairs, out_dir / "pairs.csv")
    rep = paths.reports / "dedupe"
    metrics = {**res.metrics, "hashed_new": cache_stats["hashed_new"], "cache_hits": cache_stats["cache_hits"]}
    write_json(rep / "metrics.json", metrics)
    timings = {"content_sha_s": t_sha, "features_s": t_feat, **res.timings, "stage_s": time.perf_counter() - t0}
    summary = {
        "metrics": metrics,
        "cache": cache_stats,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "params": cfg.model_dump(mode="json"),
        "conflicts": res.groups.loc[res.groups["conflict"].astype(bool), ["group", "members", "labels"]]
        .to_dict("records") if len(res.groups) else [],
        "same_id_rejected": res.pairs.loc[~res.pairs["accepted"] & res.pairs["why"].str.contains("same isic_id"),
                                          ["a", "b", "corr", "detail"]].to_dict("records"),
        "outputs": [paths.rel(paths.index("dedupe")), paths.rel(out_dir / "groups.csv"),
                    paths.rel(out_dir / "pairs.csv")],
    }
    write_json(rep / "summary.json", summary)
    return {"images": metrics["images"], "groups": metrics["groups"], "kept": metrics["kept"],
            "dropped": metrics["dropped"], "conflict_groups": metrics["conflict_groups"],
            "unreadable": metrics["unreadable"], "hashed_new": metrics["hashed_new"],
            "seconds": round(timings["stage_s"], 2)}
