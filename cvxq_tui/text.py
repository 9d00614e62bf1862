"""Calibration and evaluation text: the shipped default texts, user text files, and the
token windows cut from them."""

from __future__ import annotations

import lzma
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

from cvxq_tui.errors import InputError, TextError

# split -> asset file (built by tools/build_default_text.py; provenance in assets/NOTICE)
DEFAULT_TEXTS = {
    "calib": "python-docs-calib.txt.xz",
    "eval": "python-docs-eval.txt.xz",
    "ood": "austen-ood.txt.xz",
}

TEXT_SUFFIXES = frozenset(
    {".txt", ".text", ".md", ".markdown", ".rst", ".tex", ".org", ".adoc", ".asciidoc"}
)
_COMPRESSED = frozenset({".xz", ".gz", ".bz2"})

# Tokenizing one huge string is slow and memory hungry; pieces of this many characters
# keep a 10 MB text linear and let a bounded request stop early.
_CHUNK_CHARS = 64_000
_CHUNKS_PER_CALL = 8

_FLAG_HINT = {
    "calibration": "fewer calibration samples (--calib-samples)",
    "evaluation": "fewer evaluation windows (--eval-samples)",
}


@lru_cache(maxsize=None)
def default_text(split: str) -> str:
    """The shipped text for ``split``: "calib" (Python docs), "eval" (other Python docs
    documents, disjoint from "calib") or "ood" (Jane Austen prose, another domain)."""
    if split not in DEFAULT_TEXTS:
        raise InputError(
            f"Unknown default text {split!r}. Fix: use one of {', '.join(DEFAULT_TEXTS)}."
        )
    asset = resources.files("cvxq_tui") / "assets" / DEFAULT_TEXTS[split]
    try:
        return lzma.decompress(asset.read_bytes()).decode("utf-8")
    except (OSError, lzma.LZMAError, UnicodeDecodeError) as exc:
        raise TextError(
            f"The shipped default text {DEFAULT_TEXTS[split]} is missing or damaged ({exc}). "
            "Fix: reinstall cvxq-tui, or pass your own text file."
        ) from None


def _is_text_file(path: Path) -> bool:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes = suffixes[:-1]
    return bool(suffixes) and suffixes[-1] in TEXT_SUFFIXES


def _read_bytes(path: Path) -> bytes:
    suffix = path.suffix.lower()
    if suffix == ".xz":
        return lzma.decompress(path.read_bytes())
    if suffix == ".gz":
        import gzip

        return gzip.decompress(path.read_bytes())
    if suffix == ".bz2":
        import bz2

        return bz2.decompress(path.read_bytes())
    return path.read_bytes()


def _read_one(path: Path) -> str:
    try:
        data = _read_bytes(path)
    except PermissionError:
        raise TextError(
            f"Cannot read text file {path}: permission denied. Fix: make it readable "
            f"(chmod a+r {path}) or pass another file."
        ) from None
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise TextError(
            f"Cannot read text file {path} ({exc}). Fix: check the file, or pass another one."
        ) from None
    if b"\x00" in data[:65536]:
        raise TextError(
            f"{path} looks like a binary file, not text. Fix: pass a UTF-8 text file "
            f"({', '.join(sorted(TEXT_SUFFIXES))}) or a folder of them."
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TextError(
            f"{path} is not UTF-8 text (undecodable byte at offset {exc.start}). Fix: "
            f"convert it, e.g. iconv -f latin1 -t utf-8 {path} > converted.txt."
        ) from None


def text_files(folder: Path) -> list[Path]:
    """Text files under ``folder``, recursively, in sorted path order, hidden ones skipped."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and _is_text_file(p)
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def read_text(path: str | Path) -> str:
    """The text of a file, or of every text file in a folder (sorted, recursive, joined by
    blank lines). Raises TextError for a missing path, unreadable, binary or empty text."""
    path = Path(path).expanduser()
    if not path.exists():
        raise TextError(
            f"Text path {path} does not exist. Fix: pass an existing text file or folder, "
            "or leave the option out to use the shipped default text."
        )
    if path.is_dir():
        files = text_files(path)
        if not files:
            raise TextError(
                f"Folder {path} holds no text files. Fix: add files ending in "
                f"{', '.join(sorted(TEXT_SUFFIXES))} (optionally .gz/.xz/.bz2), or pass a file."
            )
        text = "\n\n".join(_read_one(f).strip() for f in files)
    else:
        text = _read_one(path)
    if not text.strip():
        raise TextError(
            f"The text in {path} is empty. Fix: pass a file or folder that contains text."
        )
    return text


def _chunks(text: str, size: int = _CHUNK_CHARS):
    """Pieces of about ``size`` characters, cut at a paragraph, line or word end so the
    tokenizer sees whole words."""
    start, n = 0, len(text)
    while start < n:
        end = min(start + size, n)
        if end < n:
            for sep in ("\n\n", "\n", " "):
                cut = text.rfind(sep, start + size // 2, end)
                if cut > start:
                    end = cut + len(sep)
                    break
        yield text[start:end]
        start = end


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> list[int]:
    """Token ids of ``text`` without special tokens, tokenized chunk by chunk; stops once
    ``max_tokens`` are available."""
    ids: list[int] = []
    batch: list[str] = []

    def flush() -> None:
        for piece in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            ids.extend(piece)
        batch.clear()

    for chunk in _chunks(text):
        batch.append(chunk)
        if len(batch) == _CHUNKS_PER_CALL:
            flush()
            if max_tokens is not None and len(ids) >= max_tokens:
                return ids
    if batch:
        flush()
    return ids


def token_windows(
    tokenizer,
    text: str,
    seq_len: int,
    n_windows: int | None = None,
    *,
    purpose: str = "calibration",
) -> torch.Tensor:
    """Non-overlapping consecutive windows of ``seq_len`` tokens from the start of ``text``,
    as a LongTensor [n, seq_len]. ``n_windows=None`` takes every whole window; a given
    ``n_windows`` that the text cannot fill raises TextError."""
    if seq_len < 2:
        raise InputError(f"Sequence length {seq_len} is too short. Fix: use --seq-len 2 or more.")
    if n_windows is not None and n_windows < 1:
        raise InputError(
            f"{n_windows} {purpose} windows requested. Fix: ask for at least one."
        )
    need = None if n_windows is None else n_windows * seq_len
    ids = tokenize(tokenizer, text, max_tokens=need)
    available = len(ids)
    fewer = _FLAG_HINT.get(purpose, f"fewer {purpose} windows")
    if need is not None and available < need:
        raise TextError(
            f"The {purpose} text is too short: {n_windows} windows of {seq_len} tokens need "
            f"{need:,} tokens but it has {available:,}. Fix: use a shorter --seq-len, "
            f"{fewer}, or a longer text."
        )
    count = n_windows if n_windows is not None else available // seq_len
    if count == 0:
        raise TextError(
            f"The {purpose} text is too short: one window of {seq_len} tokens needs "
            f"{seq_len:,} tokens but it has {available:,}. Fix: use a shorter --seq-len "
            "or a longer text."
        )
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)
