"""The shipped default texts, reading user text, and cutting token windows."""

from __future__ import annotations

import gzip
import os

import pytest
import torch

from cvxq_tui.errors import InputError, TextError
from cvxq_tui.text import default_text, read_text, token_windows, tokenize


class CharTokenizer:
    """One token per character: enough to test windowing without loading a model."""

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


@pytest.fixture(scope="module")
def char_tok():
    return CharTokenizer()


@pytest.mark.parametrize("split, low, high", [
    ("calib", 1_200_000, 2_500_000), ("eval", 250_000, 600_000), ("ood", 200_000, 400_000),
])
def test_default_texts_load(split, low, high):
    text = default_text(split)
    assert low < len(text.encode()) < high
    assert default_text(split) is text  # cached


def test_default_splits_are_disjoint_documents():
    calib, evaluation = default_text("calib"), default_text("eval")
    # Every document starts with its title over/underline; compare paragraph sets.
    paras = lambda t: {p for p in t.split("\n\n") if len(p) > 300}  # noqa: E731
    assert not paras(calib) & paras(evaluation)
    assert "Sir Walter Elliot" in default_text("ood")
    assert ":mod:" not in default_text("ood")


def test_unknown_default_split():
    with pytest.raises(InputError, match="calib, eval, ood"):
        default_text("train")


def test_windows_are_consecutive_and_deterministic(char_tok):
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    w = token_windows(char_tok, text, 64)
    assert w.dtype == torch.long and w.shape == (1000 // 64, 64)
    assert w.flatten().tolist() == [ord(c) for c in text[: w.numel()]]
    assert torch.equal(w, token_windows(char_tok, text, 64))
    assert token_windows(char_tok, text, 64, 3).shape == (3, 64)


def test_chunked_tokenization_matches_whole_text(char_tok):
    words = " ".join(f"word{i}" for i in range(60_000))  # > several chunks
    text = "\n\n".join(words[i:i + 5000] for i in range(0, len(words), 5000))
    assert tokenize(char_tok, text) == [ord(c) for c in text]
    # a bounded request stops early but still returns at least what was asked
    assert len(tokenize(char_tok, text, max_tokens=1000)) >= 1000


def test_too_short_text_names_counts_and_fix(char_tok):
    with pytest.raises(TextError) as err:
        token_windows(char_tok, "x" * 1000, 128, 10)
    msg = str(err.value)
    assert "1,280" in msg and "1,000" in msg
    assert "--seq-len" in msg and "--calib-samples" in msg and "longer text" in msg
    with pytest.raises(TextError, match="too short"):
        token_windows(char_tok, "x" * 10, 128, purpose="evaluation")
    with pytest.raises(InputError):
        token_windows(char_tok, "x" * 10, 1)


def test_read_text_file_and_folder(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.md").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "c.rst.gz").write_bytes(gzip.compress(b"third"))
    (tmp_path / "skip.png").write_bytes(b"\x89PNG\x00")
    (tmp_path / ".hidden.txt").write_text("hidden")
    assert read_text(tmp_path) == "first\n\nsecond\n\nthird"
    assert read_text(tmp_path / "a.txt") == "first"


def test_read_text_errors(tmp_path):
    with pytest.raises(TextError, match="does not exist"):
        read_text(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(TextError, match="empty"):
        read_text(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"abc\x00\x01\x02")
    with pytest.raises(TextError, match="binary"):
        read_text(tmp_path / "bin.txt")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin1"))
    with pytest.raises(TextError, match="not UTF-8.*iconv"):
        read_text(tmp_path / "latin.txt")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "img.png").write_bytes(b"x")
    with pytest.raises(TextError, match="no text files"):
        read_text(tmp_path / "folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads everything")
def test_unreadable_text(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("x")
    path.chmod(0)
    with pytest.raises(TextError, match="permission"):
        read_text(path)
