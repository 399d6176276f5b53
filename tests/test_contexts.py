"""Context windows, sentence splits, the seeded sample, dedup and cap (pure functions, no Ray)."""

import numpy as np
import pyarrow as pa
import pytest

from pipeline import storage
from pipeline.contexts import (SAMPLE_SCHEMA, bucket_of, extract_contexts, sample_split, select_contexts,
                               targets_table, uniform_hash)
from pipeline.corpus import make_splits, tokenize


def _extract(lines, words, counts=None, window=25, cap=1000, seed=1):
    targets = targets_table(words, counts or [1] * len(words), num_buckets=4, cap=cap, oversample=2.0)
    return extract_contexts(tokenize(pa.array(lines)), np.arange(len(lines)) * 1000, 0, targets, window, seed)


def test_window_is_clipped_at_sentence_ends_and_dots_are_dropped():
    rows = _extract(["a b c kumquat d e . f g kumquat h"], ["kumquat"], window=2)
    assert sorted(rows["context"].to_pylist()) == ["b c kumquat d e", "f g kumquat h"]


def test_window_size_counts_tokens_either_side():
    line = " ".join(f"w{i}" for i in range(40)) + " kumquat " + " ".join(f"v{i}" for i in range(40))
    (context,) = _extract([line], ["kumquat"], window=25)["context"].to_pylist()
    tokens = context.split()
    assert len(tokens) == 51 and tokens[25] == "kumquat" and tokens[0] == "w15" and tokens[-1] == "v24"


def test_every_occurrence_is_a_row_when_the_word_is_rare():
    rows = _extract(["kumquat and kumquat", "no match here", "one kumquat"], ["kumquat"], window=1)
    assert sorted(rows["context"].to_pylist()) == ["and kumquat", "kumquat and", "one kumquat"]
    assert set(rows["target"].to_pylist()) == {0}


def test_select_dedups_caps_and_orders_by_u():
    targets = targets_table(["a", "b", "zero"], [5, 2, 0], 1, cap=3, oversample=1.0)
    rows = pa.table({"bucket": [0] * 7, "target": [0, 0, 0, 0, 0, 1, 1],
                     "u": [0.5, 0.1, 0.3, 0.05, 0.9, 0.2, 0.1],
                     "context": ["x", "y", "x", "z", "w", "p", "p"]}, schema=SAMPLE_SCHEMA)
    out = {r["word"]: r for r in select_contexts(rows, targets, 0, cap=3).to_pylist()}
    assert out["a"]["contexts"] == ["z", "y", "x"]  # distinct, smallest u first, capped at 3
    assert out["b"]["contexts"] == ["p"] and out["b"]["count"] == 2
    assert out["zero"]["contexts"] == [] and out["zero"]["count"] == 0


def test_buckets_are_stable_and_spread():
    words = [f"word{i}" for i in range(5000)]
    b = bucket_of(words, 25)
    assert (b == bucket_of(words, 25)).all()
    assert bucket_of(["kumquat"], 25)[0] == 15  # a fixed value: the hash must never change silently
    counts = np.bincount(b, minlength=25)
    assert counts.min() > 150 and counts.max() < 260


def test_uniform_hash_is_uniform_and_seeded():
    pos = np.arange(100_000)
    u = uniform_hash(7, 3, pos * 17, pos % 50)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    assert (u == uniform_hash(7, 3, pos * 17, pos % 50)).all()
    assert not (u == uniform_hash(8, 3, pos * 17, pos % 50)).all()


def _frequent_word_corpus(path, n_lines=10_000):
    # "kumquat" occurs once in every line, each line distinct: 10,000 occurrences.
    lines = [f"line {i} has a kumquat in position {i % 7}" for i in range(n_lines)]
    path.write_text("\n".join(lines) + "\n")
    return lines


def _sample(path, split_bytes, seed, cap=1000, count=10_000):
    targets = targets_table(["kumquat"], [count], 1, cap=cap, oversample=2.0)
    splits = make_splits(storage.list_files(str(path)), split_bytes)
    rows = pa.concat_tables([sample_split(s, targets, True, 10**6, 25, seed) for s in splits])
    return select_contexts(rows, targets, 0, cap)["contexts"][0].as_py()


def test_sample_is_reproducible_and_independent_of_splitting(tmp_path):
    path = tmp_path / "c.txt"
    _frequent_word_corpus(path)
    whole = _sample(path, 10**9, seed=5)
    assert whole == _sample(path, 10**9, seed=5)
    assert whole == _sample(path, 4096, seed=5)  # same sample however the corpus is cut
    assert whole != _sample(path, 10**9, seed=6)


def test_sample_is_unbiased_over_the_whole_corpus(tmp_path):
    path = tmp_path / "c.txt"
    _frequent_word_corpus(path)
    contexts = _sample(path, 10**9, seed=5)
    assert len(contexts) == 1000
    line_ids = np.array([int(c.split()[1]) for c in contexts])
    # Not the first 1000 lines: spread over the corpus like a uniform sample of 10,000.
    assert line_ids.max() > 9000 and abs(line_ids.mean() - 5000) < 300
    hist = np.bincount(line_ids // 1000, minlength=10)
    assert hist.min() > 60 and hist.max() < 140, hist


@pytest.mark.parametrize("cap", [1, 32])
def test_cap_is_respected(tmp_path, cap):
    path = tmp_path / "c.txt"
    _frequent_word_corpus(path, n_lines=500)
    assert len(_sample(path, 10**9, seed=1, cap=cap, count=500)) == cap


def test_contexts_equal_joined_token_windows_on_messy_text():
    """Contexts are byte ranges of the normalised text: check them against joined token lists."""
    import random

    import pyarrow as pa

    from pipeline.corpus import tokenize

    rng = random.Random(3)
    vocab = ["kumquat", "café", "東京", "x", "don't", ".", ",", "3.14", "naïve", "e.g."]
    spaces = [" ", "  ", "\t", "\u00a0", " \u2003 "]
    lines = ["".join(rng.choice(vocab) + rng.choice(spaces) for _ in range(rng.randint(2, 30))) for _ in range(300)]
    expected = set()
    for tokens in tokenize(pa.array(lines)).to_pylist():  # one call: the regex is compiled once
        sentence = []
        for tok in tokens + ["."]:
            if tok != ".":
                sentence.append(tok)
                continue
            expected |= {" ".join(sentence[max(0, i - 3):i + 4]) for i, w in enumerate(sentence) if w == "kumquat"}
            sentence = []
    rows = _extract(lines, ["kumquat"], window=3)
    assert set(rows["context"].to_pylist()) == expected
    assert any(len(c.encode()) <= 12 for c in expected) and any(len(c.encode()) > 12 for c in expected)
