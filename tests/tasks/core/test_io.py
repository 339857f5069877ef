"""tasks.core.io: user CSVs fail with the file's name; per-image atomic writes; pruning; run stats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.core.errors import InputError
from tasks.core.io import Paths, read_csv, write_file_atomic, write_run_stats


def test_read_csv_utf8_and_bom(tmp_path: Path) -> None:
    p = tmp_path / "m.csv"
    p.write_bytes("\ufeffisic_id,site\nISIC_0000001,Sch\u00e4del\n".encode())
    df = read_csv(p, dtype=str)
    assert list(df.columns) == ["isic_id", "site"] and df["site"].iat[0] == "Sch\u00e4del"


@pytest.mark.parametrize("content, match", [
    ("isic_id,site\nISIC_0000001,Sch\u00e4del\n".encode("latin-1"), r"not UTF-8 text \(byte 0xe4"),
    (b"", "empty file"),
    (b'a,b\n"unclosed,1\n', "not a valid CSV"),
])
def test_read_csv_errors_name_the_file(tmp_path: Path, content: bytes, match: str) -> None:
    p = tmp_path / "meta data.csv"
    p.write_bytes(content)
    with pytest.raises(InputError, match=match) as err:
        read_csv(p)
    assert str(p) in str(err.value)
    with pytest.raises(InputError, match="not found"):
        read_csv(tmp_path / "nope.csv")


def test_write_file_atomic_creates_the_folder_and_leaves_no_partial(tmp_path: Path) -> None:
    dst = tmp_path / "a" / "b.png"
    write_file_atomic(str(dst), b"123")
    assert dst.read_bytes() == b"123" and list(dst.parent.iterdir()) == [dst]


def test_run_stats_go_beside_the_metrics(tmp_path: Path) -> None:
    out = write_run_stats(Paths(tmp_path), "clean", {"seconds": 1.5})
    assert out == tmp_path / "reports" / "clean" / "run_stats.json"
    assert json.loads(out.read_text()) == {"seconds": 1.5}
