"""Near-duplicate photo engine: per-content features, pHash candidate search, pixel verification.

Pure library (no stage, no params object): `tasks.dedupe` composes it with the keep-policy, and
`benchmarks/dedupe.py` drives it directly.

1. features per distinct file content: decoded-pixel hash, 256-bit DCT pHash of the grey image, a small square
   grey thumbnail (`compute_features`, cached by content sha256 in `FeatureCache`);
2. candidates: pHash neighbours within a Hamming radius (exact all-pairs below `brute_force_max` distinct
   hashes, bit-sampling LSH above: sub-quadratic, the collision probability of a pair at the radius is
   `recall`) (`near_pairs`);
3. verification of a candidate on pixels (`verify_pair(s)`): Pearson correlation of the grey thumbnails and of
   their band-pass (detail) versions, as they are or, when they disagree (crops), after an ECC alignment
   limited to what a crop/resize/squash does (axis-aligned scale and shift). The detail correlation is what
   rejects look-alikes: unrelated photos with the same dark dermatoscope vignette reach 0.95-0.98 on plain
   thumbnails but not on their detail;
4. graph helpers: `star_edges` (rows with equal keys), `components` (union-find).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.core.cache import SegmentStore, params_digest, source_digest
from tasks.core.images import DEFAULT_MAX_PIXELS, ImageRejected, check_size
from tasks.core.parallel import parallel_map

# Bump when the feature computation changes: old cache segments are then ignored, never mixed in.
FEATURE_VERSION = 1
# Bump when verify_pair's verdict for the same thumbnails and thresholds changes (cached verdicts are then unused).
VERIFY_VERSION = 1
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
_POOL_MIN_JOBS = 256  # below this, starting worker processes (~1 s) costs more than it saves


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
    def empty(cls, thumb_size: int) -> Features:
        return cls(np.zeros(0, "<U64"), np.zeros(0, bool), np.zeros(0, "<U1"), np.zeros(0, np.int32),
                   np.zeros(0, np.int32), np.zeros(0, "<U32"), np.zeros((0, PHASH_WORDS), np.uint64),
                   np.zeros((0, thumb_size, thumb_size), np.uint8))

    @classmethod
    def concat(cls, parts: Sequence[Features], thumb_size: int) -> Features:
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty(thumb_size)
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in cls.__dataclass_fields__))

    def take(self, idx: np.ndarray) -> Features:
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


def decode_features(data: bytes, thumb_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    """Decode one image file's bytes and compute its features; never raises (errors go into 'error').

    The header is checked first (tasks.core.images.check_size): a file claiming more than `max_pixels` is not
    decoded at all. Pixels come from cv2.imdecode in BGR, as the pixel hash has always been defined."""
    import cv2

    out: dict[str, Any] = {"ok": False, "error": "", "height": 0, "width": 0, "pixhash": "",
                           "phash": np.zeros(PHASH_WORDS, np.uint64),
                           "thumb": np.zeros((thumb_size, thumb_size), np.uint8)}
    if not data:
        out["error"] = "empty file"
        return out
    try:
        check_size(data, max_pixels)
    except ImageRejected as exc:
        out["error"] = f"{exc.reason}: {exc}" if exc.reason == "too_large" else "not a decodable image"
        return out
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as exc:  # some corrupt headers raise instead of returning None
        out["error"] = f"decode error: {exc.msg if hasattr(exc, 'msg') else exc}"
        return out
    if img is None or img.size == 0:
        out["error"] = "not a decodable image"
        return out
    h, w = img.shape[:2]
    pix = hashlib.sha256(f"{h}x{w}x{img.shape[2]}".encode() + img.tobytes()).hexdigest()[:32]
    g = grey_square(img, _HASH_SIDE)
    t = g if thumb_size == _HASH_SIDE else grey_square(img, thumb_size)
    out.update(ok=True, height=h, width=w, pixhash=pix, phash=phash256(g), thumb=to_uint8(t))
    return out


def _features_of_files(jobs: list[tuple[str, str]], thumb_size: int,
                       max_pixels: int = DEFAULT_MAX_PIXELS) -> Features:
    """Worker: (sha, absolute path) -> Features; one process handles a chunk to amortise start-up."""
    import cv2

    if cv2.getNumThreads() != 1:  # in-process run; forked workers inherit 1 from compute_features
        cv2.setNumThreads(1)  # the pool provides the parallelism; OpenCV threads would oversubscribe the cores
    recs = []
    for _sha, path in jobs:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            data, err = b"", f"cannot read: {exc.strerror or exc}"
        else:
            err = ""
        rec = decode_features(data, thumb_size, max_pixels)
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


def _features_ctx(thumb_size: int, max_pixels: int) -> tuple[int, int]:
    return thumb_size, max_pixels


def _features_chunk(ctx: tuple[int, int], chunk: list[tuple[str, str]]) -> Features:
    return _features_of_files(chunk, *ctx)


def compute_features(jobs: list[tuple[str, str]], thumb_size: int, workers: int = 1,
                     chunk: int = 64, max_pixels: int = DEFAULT_MAX_PIXELS) -> Features:
    """Features for (sha, path) jobs, order preserved: through tasks.core.parallel.parallel_map, so the same
    process pool (one OpenCV thread per worker, forkserver once TensorFlow is loaded) or a Dask cluster."""
    chunks = [jobs[i:i + chunk] for i in range(0, len(jobs), chunk)]
    n = workers if len(jobs) >= _POOL_MIN_JOBS else 1
    parts = parallel_map(_features_chunk, chunks, n, setup=_features_ctx, setup_args=(thumb_size, max_pixels),
                         desc="dedupe: hashing")
    return Features.concat(parts, thumb_size)


# --------------------------------------------------------------------------- feature and verdict caches
class FeatureCache:
    """Features keyed by content sha256, stored as append-only segments (tasks.core.cache.SegmentStore).

    A run writes one new segment holding only what it had to compute, so a nightly rerun over 100k cached
    images hashes nothing and rewrites nothing; a damaged segment is dropped and its images hashed again."""

    def __init__(self, root: Path, thumb_size: int):
        self.dir = Path(root) / f"v{FEATURE_VERSION}-t{thumb_size}"
        self.thumb_size = thumb_size
        self.store = SegmentStore(self.dir, Features.__dataclass_fields__)

    def load(self) -> Features:
        parts = [Features(**cols) for cols in self.store.load()]
        feats = Features.concat(parts, self.thumb_size)
        if len(feats):
            _, first = np.unique(feats.sha, return_index=True)
            feats = feats.take(np.sort(first))
        return feats

    def add(self, feats: Features) -> None:
        """Persist newly computed features; compact when segments pile up."""
        self.store.add({f: getattr(feats, f) for f in Features.__dataclass_fields__})

    def compact(self) -> None:
        self.store.compact()


VERDICT_FIELDS = ("a", "b", "corr", "detail", "aligned", "accepted")


def verdict_version() -> str:
    """VERIFY_VERSION + this module's source hash + OpenCV/numpy versions (ECC and blurs are OpenCV's)."""
    import cv2

    return f"v{VERIFY_VERSION}-f{FEATURE_VERSION}/code-{source_digest([__file__])[:16]}/opencv-{cv2.__version__}" \
           f"/numpy-{np.__version__}"


class VerdictCache:
    """Verification results keyed by the ordered pair of content hashes (b verified against a), for one set of
    verify params and one code version: a nightly rerun verifies only the pairs it has not seen.

    `verify_pair` is a function of the two thumbnails (themselves a function of the two contents, the thumb
    size and FEATURE_VERSION) and of the thresholds, which decide whether the alignment is tried; all of them
    name the folder, so a cached verdict is exactly what a fresh verification returns."""

    def __init__(self, root: Path, corr_min: float, detail_min: float, thumb_size: int):
        params = {"verify_corr_min": corr_min, "verify_detail_min": detail_min, "thumb_size": thumb_size}
        self.version = verdict_version()
        self.dir = Path(root) / f"verdicts-{params_digest(params, self.version)}"
        self.params = params
        self.store = SegmentStore(self.dir, VERDICT_FIELDS)

    def load(self) -> pd.DataFrame:
        parts = self.store.load()
        if not parts:
            return pd.DataFrame({"a": np.zeros(0, "<U64"), "b": np.zeros(0, "<U64"), "corr": np.zeros(0),
                                 "detail": np.zeros(0), "aligned": np.zeros(0, bool), "accepted": np.zeros(0, bool)})
        df = pd.DataFrame({f: np.concatenate([p[f] for p in parts]) for f in VERDICT_FIELDS})
        return df.drop_duplicates(["a", "b"], keep="first").reset_index(drop=True)

    def add(self, verdicts: pd.DataFrame) -> None:
        self.store.add({"a": verdicts["a"].to_numpy().astype("<U64"), "b": verdicts["b"].to_numpy().astype("<U64"),
                        "corr": verdicts["corr"].to_numpy(np.float64),
                        "detail": verdicts["detail"].to_numpy(np.float64),
                        "aligned": verdicts["aligned"].to_numpy(bool),
                        "accepted": verdicts["accepted"].to_numpy(bool)})


def verify_cached(thumbs: np.ndarray, sha: np.ndarray, pairs: pd.DataFrame, corr_min: float, detail_min: float,
                  workers: int = 1, cache: VerdictCache | None = None) -> tuple[pd.DataFrame, dict[str, int]]:
    """verify_pairs, taking the verdict of every pair whose two contents were verified before from `cache`.

    `sha[k]` is the content hash of `thumbs[k]`; (i, j) in `pairs` index both. Returns the pairs with corr,
    detail, aligned, accepted (exactly what verify_pairs gives) and {'verified_new', 'verdict_cache_hits'}."""
    if cache is None:
        out = verify_pairs(thumbs, pairs, corr_min, detail_min, workers)
        return out, {"verified_new": len(out), "verdict_cache_hits": 0}
    keys = pd.Series(sha[pairs["i"].to_numpy()]).str.cat(pd.Series(sha[pairs["j"].to_numpy()]), sep=":")
    known = cache.load()
    known.index = known["a"].str.cat(known["b"], sep=":")
    hit = keys.isin(known.index).to_numpy()
    fresh = verify_pairs(thumbs, pairs[~hit], corr_min, detail_min, workers)
    out = pairs.copy()
    for col, dtype in (("corr", np.float64), ("detail", np.float64), ("aligned", bool), ("accepted", bool)):
        vals = np.zeros(len(out), dtype)
        vals[hit] = known.loc[keys[hit].to_numpy(), col].to_numpy(dtype)
        vals[~hit] = fresh[col].to_numpy(dtype)
        out[col] = vals
    if len(fresh):
        cache.add(pd.DataFrame({"a": sha[fresh["i"].to_numpy()], "b": sha[fresh["j"].to_numpy()],
                                **{c: fresh[c].to_numpy() for c in ("corr", "detail", "aligned", "accepted")}}))
    return out, {"verified_new": int((~hit).sum()), "verdict_cache_hits": int(hit.sum())}


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
        # Upper triangle only (columns from s on), counts in uint16 (<= 256 bits): half the work of a full row.
        d = popcount64(h[s:s + block, None, :] ^ h[None, s:, :]).sum(-1, dtype=np.uint16)
        r, c = np.nonzero(d <= radius)
        c = c + s
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
    ij = list(zip(pairs["i"].to_numpy(), pairs["j"].to_numpy(), strict=True))

    def one(p: tuple[int, int]) -> Verdict:
        return verify_pair(thumbs[p[0]], thumbs[p[1]], corr_min, detail_min)

    if workers > 1 and len(ij) > 256:
        # Chunks, not one future per pair (ThreadPoolExecutor ignores map's chunksize): 25k futures cost
        # seconds of bookkeeping at 10^4 images. cv2 releases the GIL inside the blurs and ECC.
        chunks = [ij[k:k + 128] for k in range(0, len(ij), 128)]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            verdicts = [v for part in pool.map(lambda c: [one(p) for p in c], chunks) for v in part]
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
