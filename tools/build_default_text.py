#!/usr/bin/env python3
"""Build the default texts shipped in cvxq_tui/assets/ from Debian packages.

    python tools/build_default_text.py            # needs apt-get and dpkg-deb

Writes three xz-compressed UTF-8 texts and a NOTICE with their provenance and licences:

* python-docs-calib.txt.xz / python-docs-eval.txt.xz: Python 3.11 documentation sources
  (reStructuredText) from Debian's ``python3.11-doc``, split *by document* so the
  evaluation text shares no document with the calibration text.
* austen-ood.txt.xz: an out-of-domain evaluation text (19th-century prose fiction, public
  domain) from Debian's ``r-cran-janeaustenr``, so quality can be checked on text that is
  unlike the calibration text.

The output depends only on the package versions pinned below; rerunning the script
reproduces the assets byte for byte (xz with a fixed preset, no timestamps).
"""

from __future__ import annotations

import argparse
import hashlib
import lzma
import re
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "cvxq_tui" / "assets"

PYDOC_PACKAGE = "python3.11-doc"
PYDOC_VERSION = "3.11.2-6+deb12u9"
PYDOC_ROOT = "usr/share/doc/python3.11/html/_sources"
# Prose-heavy parts of the documentation; changelogs (whatsnew), the C API and the
# deprecated distutils are left out.
PYDOC_FOLDERS = ("faq", "howto", "library", "reference", "tutorial", "using")
PYDOC_MAX_DOC_BYTES = 80_000  # a few huge documents would otherwise dominate the slice
PYDOC_EVAL_BYTES = 400_000
PYDOC_CALIB_BYTES = 1_600_000

OOD_PACKAGE = "r-cran-janeaustenr"
OOD_VERSION = "1.0.0-1"
OOD_RDB = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
OOD_TITLE = "persuasion"
OOD_BYTES = 300_000

XZ_PRESET = 9


def apt_download(package: str, version: str, into: Path) -> Path:
    """Downloads ``package=version`` with apt-get and extracts it with dpkg-deb -x."""
    subprocess.run(
        ["apt-get", "download", f"{package}={version}"], cwd=into, check=True,
        stdout=subprocess.DEVNULL,
    )
    debs = sorted(into.glob(f"{package}_*.deb"))
    if len(debs) != 1:
        sys.exit(f"expected one {package} .deb in {into}, found {debs}")
    root = into / package
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root)], check=True)
    return root


def _doc_order(rel: str) -> str:
    # A fixed pseudo-random order spreads both parts over the whole documentation instead of
    # taking the alphabetically first modules.
    return hashlib.sha256(rel.encode()).hexdigest()


def select_pydocs(sources: Path) -> tuple[list[str], list[str]]:
    """Returns (eval documents, calibration documents) as paths relative to ``sources``.

    Documents are visited in sha256(path) order; the first ones fill the evaluation part up
    to PYDOC_EVAL_BYTES, the following ones fill the calibration part up to
    PYDOC_CALIB_BYTES. Each document lands in at most one part."""
    docs = []
    for folder in PYDOC_FOLDERS:
        for path in (sources / folder).rglob("*.rst.txt"):
            size = path.stat().st_size
            if 0 < size <= PYDOC_MAX_DOC_BYTES:
                docs.append(path.relative_to(sources).as_posix())
    docs.sort(key=_doc_order)
    evaluation, calibration = [], []
    eval_bytes = calib_bytes = 0
    for rel in docs:
        size = (sources / rel).stat().st_size
        if eval_bytes < PYDOC_EVAL_BYTES:
            evaluation.append(rel)
            eval_bytes += size
        elif calib_bytes < PYDOC_CALIB_BYTES:
            calibration.append(rel)
            calib_bytes += size
        else:
            break
    return sorted(evaluation), sorted(calibration)


def join_documents(sources: Path, rels: list[str]) -> str:
    parts = [(sources / rel).read_text(encoding="utf-8").strip() for rel in rels]
    return "\n\n".join(parts) + "\n"


def read_r_strings(blob: bytes) -> list[str]:
    """Decodes one serialized R character vector (XDR format 3, as stored in an R lazy-load
    database). Only what janeaustenr's data holds is supported."""
    if blob[:2] != b"X\n":
        raise ValueError("not an XDR-serialized R object")
    pos = 2
    version, _, _ = struct.unpack_from(">iii", blob, pos)
    pos += 12
    if version == 3:
        (n,) = struct.unpack_from(">i", blob, pos)
        pos += 4 + n  # native encoding name
    flags, length = struct.unpack_from(">ii", blob, pos)
    pos += 8
    if flags & 0xFF != 16:  # STRSXP
        raise ValueError(f"not a character vector (SEXP type {flags & 0xFF})")
    out = []
    for _ in range(length):
        flags, n = struct.unpack_from(">ii", blob, pos)
        pos += 8
        if flags & 0xFF != 9:  # CHARSXP
            raise ValueError("malformed character vector")
        if n < 0:  # NA_character_
            out.append("")
            continue
        out.append(blob[pos:pos + n].decode("utf-8"))
        pos += n
    return out


def read_r_lazyload_db(path: Path) -> list[list[str]]:
    """Every character vector in an R .rdb file: a sequence of (4-byte length, zlib stream)."""
    data = path.read_bytes()
    vectors, pos = [], 0
    while pos < len(data):
        inflater = zlib.decompressobj()
        blob = inflater.decompress(data[pos + 4:])
        pos = len(data) - len(inflater.unused_data)
        vectors.append(read_r_strings(blob))
    return vectors


def select_ood(rdb: Path) -> str:
    """The opening OOD_BYTES of the novel titled OOD_TITLE, cut at a paragraph end."""
    for lines in read_r_lazyload_db(rdb):
        if next((line.strip() for line in lines if line.strip()), "").lower() == OOD_TITLE:
            text = "\n".join(line.rstrip() for line in lines).strip() + "\n"
            text = re.sub(r"\n{3,}", "\n\n", text)  # R keeps runs of empty lines
            cut = text.rfind("\n\n", 0, OOD_BYTES)
            return text[:cut].strip() + "\n"
    sys.exit(f"{OOD_TITLE} not found in {rdb}")


def write_xz(path: Path, text: str) -> None:
    path.write_bytes(lzma.compress(text.encode("utf-8"), preset=XZ_PRESET))


NOTICE = """\
Default texts shipped with cvxq-tui
===================================

Built by tools/build_default_text.py; rerunning it reproduces these files byte for byte.
All files are UTF-8 text compressed with xz.

python-docs-calib.txt.xz  ({calib_docs} documents, {calib_bytes:,} bytes uncompressed)
python-docs-eval.txt.xz   ({eval_docs} documents, {eval_bytes:,} bytes uncompressed)
    Source: Debian package {pydoc_pkg} version {pydoc_ver},
    files {pydoc_root}/**/*.rst.txt (the reStructuredText sources of the Python 3.11
    documentation).
    Selection rule: documents under {folders} of at most {max_doc:,} bytes, ordered by
    sha256 of their relative path; the first documents fill the evaluation text up to
    {eval_target:,} bytes, the following ones fill the calibration text up to
    {calib_target:,} bytes. The two texts share no document. Within a text, documents are
    concatenated in path order, separated by a blank line. The document lists are at the
    end of this file.
    Licence: Python documentation is Copyright (c) 2001-2023 Python Software Foundation;
    All Rights Reserved. It is distributed under the PSF License Agreement for Python 3.11
    (https://docs.python.org/3.11/license.html); the example code in it is also available
    under the Zero-Clause BSD licence. Python is a trademark of the Python Software
    Foundation.

austen-ood.txt.xz  ({ood_bytes:,} bytes uncompressed)
    Out-of-domain evaluation text: the opening chapters of Jane Austen's novel
    "Persuasion" (1818), cut at a paragraph end near {ood_target:,} bytes.
    Source: Debian package {ood_pkg} version {ood_ver}, file {ood_rdb}
    (R lazy-load database of the CRAN package janeaustenr 1.0.0 by Julia Silge, whose texts
    come from Project Gutenberg); decoded from R's serialization format, lines joined with
    newlines, runs of blank lines collapsed to one.
    Licence: the novel is in the public domain. The janeaustenr packaging is MIT-licensed
    (Copyright 2016-2017 Julia Silge); no part of that packaging is included here.

Calibration documents
---------------------
{calib_list}

Evaluation documents
--------------------
{eval_list}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSETS, help="asset folder to write")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cvxq-text-") as tmp:
        tmp = Path(tmp)
        sources = apt_download(PYDOC_PACKAGE, PYDOC_VERSION, tmp) / PYDOC_ROOT
        evaluation, calibration = select_pydocs(sources)
        calib_text = join_documents(sources, calibration)
        eval_text = join_documents(sources, evaluation)
        ood_text = select_ood(apt_download(OOD_PACKAGE, OOD_VERSION, tmp) / OOD_RDB)
    write_xz(args.out / "python-docs-calib.txt.xz", calib_text)
    write_xz(args.out / "python-docs-eval.txt.xz", eval_text)
    write_xz(args.out / "austen-ood.txt.xz", ood_text)
    notice = NOTICE.format(
        calib_docs=len(calibration), calib_bytes=len(calib_text.encode()),
        eval_docs=len(evaluation), eval_bytes=len(eval_text.encode()),
        pydoc_pkg=PYDOC_PACKAGE, pydoc_ver=PYDOC_VERSION, pydoc_root=PYDOC_ROOT,
        folders=", ".join(f"{f}/" for f in PYDOC_FOLDERS), max_doc=PYDOC_MAX_DOC_BYTES,
        eval_target=PYDOC_EVAL_BYTES, calib_target=PYDOC_CALIB_BYTES,
        ood_bytes=len(ood_text.encode()), ood_target=OOD_BYTES, ood_pkg=OOD_PACKAGE,
        ood_ver=OOD_VERSION, ood_rdb=OOD_RDB,
        calib_list="\n".join(calibration), eval_list="\n".join(evaluation),
    )
    (args.out / "NOTICE").write_text(notice, encoding="utf-8")
    for path in sorted(args.out.iterdir()):
        print(f"{path.stat().st_size:>10,}  {path}")


if __name__ == "__main__":
    main()
