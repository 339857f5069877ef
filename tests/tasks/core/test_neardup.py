"""The near-duplicate engine: pixel verification (look-alikes refused, crops aligned), pHash search (exact and
LSH), the pixel cap on feature decoding, the feature cache."""

from __future__ import annotations

import cv2
import numpy as np

from tasks.core import neardup as N
from tests.tasks.core.lesion_images import crop, lesion_image, recolour


# --------------------------------------------------------------------------- verification
def test_lookalike_fails_on_detail_although_thumbnails_correlate() -> None:
    """The vignette makes plain thumbnails of different photos correlate; the band-pass check must refuse."""
    a = N.to_uint8(N.grey_square(lesion_image(7), 64))
    b = N.to_uint8(N.grey_square(lesion_image(7, texture_seed=12345), 64))
    v = N.verify_pair(a, b, 0.95, 0.95)
    plain = np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1]
    assert plain > 0.9  # would pass a thumbnail-only test at 0.9
    assert not v.accepted and v.detail < 0.9
    same = N.to_uint8(N.grey_square(recolour(crop(lesion_image(7))), 64))
    assert N.verify_pair(a, same, 0.95, 0.95).accepted


def test_crop_is_verified_after_alignment() -> None:
    """A 6 % crop misaligns the thumbnails (detail fails as is); the ECC affine alignment recovers it."""
    a = N.to_uint8(N.grey_square(lesion_image(3), 64)).astype(np.float32)
    b = N.to_uint8(N.grey_square(crop(lesion_image(3), 0.06), 64)).astype(np.float32)
    unaligned = np.corrcoef(N._bandpass(a, 1.0).ravel(), N._bandpass(b, 1.0).ravel())[0, 1]
    v = N.verify_pair(a, b, 0.95, 0.95)
    assert unaligned < 0.95 and v.aligned and v.accepted and v.detail > 0.98


# --------------------------------------------------------------------------- search
def _random_hashes(n: int, planted: int, radius: int, seed: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2, size=(n, 256), dtype=np.uint8)
    pairs = []
    for a, b in rng.choice(n, size=(planted, 2), replace=False):
        bits[b] = bits[a]
        bits[b, rng.choice(256, int(rng.integers(0, radius + 1)), replace=False)] ^= 1
        pairs.append((min(a, b), max(a, b)))
    return np.packbits(bits, axis=1).view(">u8").astype(np.uint64), pairs


def test_lsh_search_is_exact_in_distance_and_finds_planted_pairs() -> None:
    h, planted = _random_hashes(3000, 60, 40, seed=1)
    brute = N.near_pairs(h, 40, brute_force_max=10**9)
    lsh = N.near_pairs(h, 40, recall=0.999, brute_force_max=0)
    b, l_ = set(zip(brute.i, brute.j, strict=True)), set(zip(lsh.i, lsh.j, strict=True))
    assert l_ <= b  # never a pair beyond the radius
    assert set(planted) <= b and len(l_ & set(planted)) >= 59
    assert (lsh["hamming"] <= 40).all() and (lsh["i"] < lsh["j"]).all()


def test_identical_hashes_are_collapsed_to_a_star() -> None:
    h, _ = _random_hashes(50, 0, 0, seed=2)
    h = np.concatenate([h, np.repeat(h[:1], 200, axis=0)])
    pairs = N.near_pairs(h, 10, brute_force_max=10)
    zero = pairs[pairs["hamming"] == 0]
    assert len(zero) == 200 and set(zero["i"]) == {0}  # 200 edges, not 200*201/2


def test_lsh_plan_meets_recall_and_grows_with_radius() -> None:
    for r in (24, 40, 64):
        k, tables = N.lsh_plan(100_000, r, 0.999)
        assert 1 - (1 - (1 - r / 256) ** k) ** tables >= 0.999
    assert N.lsh_plan(100_000, 64, 0.999)[1] > N.lsh_plan(100_000, 40, 0.999)[1]


# --------------------------------------------------------------------------- pixel cap
def test_features_refuse_a_header_over_the_cap_without_decoding(monkeypatch) -> None:
    from tests.tasks.core.image_fixtures import bomb_jpeg, valid_jpeg

    calls = []
    real = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda *a: calls.append(1) or real(*a))
    rec = N.decode_features(bomb_jpeg(), 64)
    assert not rec["ok"] and rec["error"].startswith("too_large") and not calls
    assert N.decode_features(valid_jpeg(100, 50), 64, max_pixels=5000)["ok"]
    assert N.decode_features(valid_jpeg(100, 50), 64, max_pixels=4999)["error"].startswith("too_large")
    assert N.decode_features(b"", 64)["error"] == "empty file"
    assert N.decode_features(b"junk", 64)["error"] == "not a decodable image"


def test_feature_cache_round_trip(tmp_path) -> None:
    from tests.tasks.core.image_fixtures import valid_jpeg

    f = tmp_path / "a.jpg"
    f.write_bytes(valid_jpeg())
    feats = N.compute_features([("a" * 64, str(f))], 64)
    cache = N.FeatureCache(tmp_path / "cache", 64)
    cache.add(feats)
    back = cache.load()
    assert back.sha.tolist() == ["a" * 64] and np.array_equal(back.phash, feats.phash) and back.ok.all()
