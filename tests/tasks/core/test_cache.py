"""tasks.core.cache: per-content result entries (atomic, checked, keyed by params + code) and segment stores."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import numpy as np

from tasks.core.cache import ResultCache, SegmentStore, params_digest, source_digest

SHA = hashlib.sha256(b"input").hexdigest()


def _put(c: ResultCache, sha: str, payload: bytes) -> None:
    c.commit([(sha, c.put(sha, payload))])


def test_put_commit_get_roundtrip_and_miss(tmp_path: Path) -> None:
    c = ResultCache(tmp_path, {"size": 64}, "v1").open()
    assert c.get(SHA) == ("miss", None)
    digest = c.put(SHA, b"png bytes")
    assert digest == hashlib.sha256(b"png bytes").hexdigest()
    assert c.get(SHA) == ("miss", None)  # not in the index until committed (a crash before commit = a miss)
    assert c.commit([(SHA, digest)]) == 1
    assert c.get(SHA) == ("hit", b"png bytes")
    assert ResultCache(tmp_path, {"size": 64}, "v1").open().get(SHA) == ("hit", b"png bytes")  # index persisted
    assert Path(c.path(SHA)).parent.name == SHA[:2] and Path(c.path(SHA)).read_bytes() == b"png bytes"
    assert not list(Path(c.dir).rglob("*.partial"))
    assert (Path(c.dir) / "params.json").exists()


def test_link_makes_the_output_the_entry(tmp_path: Path) -> None:
    c = ResultCache(tmp_path / "cache", {"size": 64}, "v1").open()
    _put(c, SHA, b"png bytes")
    dst = tmp_path / "out" / "sub" / "x.png"
    assert c.link(SHA, str(dst)) and dst.read_bytes() == b"png bytes" and c.is_linked(SHA, str(dst))
    other = hashlib.sha256(b"o").hexdigest()
    assert not c.link(other, str(tmp_path / "y.png"))  # no entry: the caller writes instead
    shutil.rmtree(tmp_path / "cache")  # the cache is never the record
    assert dst.read_bytes() == b"png bytes"


def test_params_and_version_name_the_folder() -> None:
    a = params_digest({"size": 64, "clahe": True}, "v1")
    assert a == params_digest({"clahe": True, "size": 64}, "v1")  # key order does not matter
    assert a != params_digest({"size": 65, "clahe": True}, "v1")
    assert a != params_digest({"size": 64, "clahe": True}, "v2")


def test_damaged_entries_read_as_corrupt_and_are_removed(tmp_path: Path) -> None:
    c = ResultCache(tmp_path, {"size": 64}, "v1").open()
    other = hashlib.sha256(b"other").hexdigest()
    third = hashlib.sha256(b"third").hexdigest()
    for s, payload in ((SHA, b"x" * 100), (other, b"y" * 100), (third, b"z" * 100)):
        _put(c, s, payload)
    p = Path(c.path(SHA))
    p.write_bytes(p.read_bytes()[:-10])  # truncated
    q = Path(c.path(other))
    blob = bytearray(q.read_bytes())
    blob[-1] ^= 1  # one flipped bit
    q.write_bytes(bytes(blob))
    assert c.get(SHA) == ("corrupt", None) and not p.exists()
    assert c.get(other) == ("corrupt", None) and not q.exists()
    Path(c.path(third)).write_bytes(b"x" * 100)  # another entry's bytes under this name
    assert c.get(third) == ("corrupt", None)
    assert c.get(SHA) == ("miss", None)  # gone: recomputed and put again by the caller


def test_prune_others_keeps_the_most_recently_used_sets(tmp_path: Path) -> None:
    sets = []
    for k in range(4):
        c = ResultCache(tmp_path, {"size": 64 + k}, "v1").open()
        _put(c, SHA, b"x")
        man = Path(c.dir) / ResultCache.MANIFEST
        os.utime(man, (time.time() - 100 + k, time.time() - 100 + k))
        sets.append(c)
    gone = sets[0].prune_others(keep=2)  # sets[0] is the current one: never removed
    assert sorted(gone) == [sets[1].key]
    assert {p.name for p in tmp_path.iterdir()} == {sets[0].key, sets[2].key, sets[3].key}


def test_source_digest_follows_the_code(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("x = 1\n")
    a = source_digest([f])
    f.write_text("x = 2\n")
    assert source_digest([f]) != a and len(a) == 64
    assert source_digest([tmp_path / "missing.py"]) == ""


def test_segment_store_appends_checks_and_compacts(tmp_path: Path) -> None:
    store = SegmentStore(tmp_path / "s", ("key", "val"))
    assert store.load() == []
    for k in range(3):
        store.add({"key": np.array([f"k{k}"]), "val": np.array([float(k)])})
    store.add({"key": np.zeros(0, "<U2"), "val": np.zeros(0)})  # nothing to write
    parts = store.load()
    assert [p["key"][0] for p in parts] == ["k0", "k1", "k2"] and len(store.segments()) == 3
    # a segment whose array no longer matches its checksum is dropped (and deleted)
    bad = store.segments()[1]
    np.save(bad / "val.npy", np.array([9.0]))
    assert [p["key"][0] for p in store.load()] == ["k0", "k2"] and not bad.exists()
    store.compact()
    (seg,) = store.segments()
    merged = store.load()[0]
    assert merged["key"].tolist() == ["k0", "k2"] and merged["val"].tolist() == [0.0, 2.0]
    assert not list((tmp_path / "s").glob(".tmp-*"))


def test_segment_store_compacts_when_segments_pile_up(tmp_path: Path) -> None:
    store = SegmentStore(tmp_path / "s", ("key",))
    for k in range(SegmentStore.MAX_SEGMENTS + 1):
        store.add({"key": np.array([f"k{k}"])})
    assert len(store.segments()) == 1
    assert len(store.load()[0]["key"]) == SegmentStore.MAX_SEGMENTS + 1
