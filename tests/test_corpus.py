"""Reading and tokenising a corpus: splits, line accounting, bad input, tokenizer behaviour."""

import bz2
import gzip
import random

import numpy as np
import pytest
import zstandard

from pipeline import storage
from pipeline.corpus import Split, decode_lines, make_splits, read_split, tokenize_text


@pytest.mark.parametrize("text, tokens", [
    ("Hello, world!", ["hello", ",", "world", "!"]),
    ("Don't stop: it's here.", ["do", "n't", "stop", ":", "it", "'s", "here", "."]),
    ("They'll say we're late", ["they", "'ll", "say", "we", "'re", "late"]),
    ("pi is 3.14, not 1,000", ["pi", "is", "3.14", ",", "not", "1,000"]),
    ("e.g. the U.S. army", ["e.g.", "the", "u.s.", "army"]),
    ("Zürich naïve café Москва 東京", ["zürich", "naïve", "café", "москва", "東京"]),
    ("a 'quoted' word", ["a", "'", "quoted", "'", "word"]),
    ("snake_case (x)", ["snake_case", "(", "x", ")"]),
    ("tabs\tand  spaces\u00a0nbsp", ["tabs", "and", "spaces", "nbsp"]),
])
def test_tokenizer(text, tokens):
    assert tokenize_text(text) == tokens


def test_tokenizer_keeps_case_when_asked():
    assert tokenize_text("Paris is NICE", lowercase=False) == ["Paris", "is", "NICE"]


def _all_lines(split_list, max_line_bytes=10**6):
    lines, offsets, too_long = [], [], 0
    for s in split_list:
        for raw, off, tl in read_split(s, max_line_bytes, chunk_bytes=64):
            lines += raw
            offsets += off.tolist()
            too_long += tl
    return lines, offsets, too_long


@pytest.mark.parametrize("split_bytes", [1, 7, 50, 333, 10**6])
def test_splits_partition_the_lines_exactly(tmp_path, split_bytes):
    rng = random.Random(split_bytes)
    lines = [" ".join("w%d" % rng.randint(0, 99) for _ in range(rng.randint(0, 12))) for _ in range(300)]
    data = ("\n".join(lines)).encode()  # no trailing newline: the last line still counts
    path = tmp_path / "c.txt"
    path.write_bytes(data)
    splits = make_splits(storage.list_files(str(path)), split_bytes)
    got, offsets, _ = _all_lines(splits)
    assert [g.decode() for g in got] == lines
    expected_offsets = np.cumsum([0] + [len(line.encode()) + 1 for line in lines[:-1]])
    assert offsets == expected_offsets.tolist()


@pytest.mark.parametrize("suffix, compress", [(".gz", gzip.compress), (".bz2", bz2.compress),
                                              (".zst", lambda b: zstandard.ZstdCompressor().compress(b))])
def test_compressed_files_are_read_whole(tmp_path, suffix, compress):
    lines = [f"line {i} with words" for i in range(1000)]
    path = tmp_path / f"c.txt{suffix}"
    path.write_bytes(compress(("\n".join(lines) + "\n").encode()))
    splits = make_splits(storage.list_files(str(path)), 100)
    assert len(splits) == 1 and splits[0].end == -1
    got, _, _ = _all_lines(splits)
    assert [g.decode() for g in got] == lines


def test_overlong_line_is_streamed_past_and_counted(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"a short line\n" + b"x" * (10 << 20) + b"\nanother short line\n")
    got, _, too_long = _all_lines([Split(0, str(path), 0, -1)], max_line_bytes=1 << 20)
    assert got == [b"a short line", b"another short line"] and too_long == 1


def test_decode_lines_accounts_for_every_line():
    raw = [b"good line here", "caf\u00e9 ol\u00e9 ok".encode(), b"bad \xff\xfe bytes", b"", b"   ",
           b"single", b"nul \x00 inside", b"y" * 200]
    lines, index, stats = decode_lines(raw, max_line_bytes=100)
    assert lines.to_pylist() == ["good line here", "café olé ok"]
    assert index.tolist() == [0, 1]
    assert stats.read == 8 and stats.used == 2
    assert stats.skipped == {"empty": 2, "one_word": 1, "bad_encoding": 1, "binary": 1, "too_long": 1}
    assert stats.used + sum(stats.skipped.values()) == stats.read


def test_tokens_never_hold_whitespace_whatever_the_length():
    # Regression: pyarrow's utf8_split_whitespace kept "'. '" when a string ended on a 64-byte boundary.
    lines = [("word " * n)[: n + 40] + " ." for n in range(1, 200)] + ["x\u00a0y\tz  .  "]
    for line in lines:
        tokens = tokenize_text(line)
        assert all(t and not any(c.isspace() for c in t) for t in tokens), (line, tokens)
    assert tokenize_text("kumquat gamma beta delta gamma delta delta alpha river gamma .")[-1] == "."
