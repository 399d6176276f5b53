"""The inference and augment jobs with a local Ray on tiny BERT/RoBERTa BERTRAM models: the vectors
equal the Python API's, every context source, words without contexts, S3, re-runs, bad arguments,
and an augmented model that plain transformers reloads in a fresh process."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

import jobs.infer
from jobs.augment import AugmentConfig, augment
from jobs.common import main
from jobs.infer import InferConfig, infer
from pipeline import infer as api
from pipeline import manifest, storage
from pipeline.augment import token_for
from pipeline.config import ConfigError
from pipeline.model import Bertram, NgramVocab
from pipeline.words import read_vectors, vector_lines, vectors_table
from tests.conftest import REPO

WORDS = ["kumquat", "apple", "orange", "river", "stone", "sweetness", "tree", "green"]
FILLER = ["the", "a", "is", "of", "and", "fruit", "tree", "river", "stone", "apple", "orange", "small", "sweet",
          "grows", "on", "in", "green", "light", ",", "."]
SETTINGS = dict(batch_contexts=16, max_contexts_per_chunk=8, max_seq_length=128)  # several chunks and passes


def _contexts(word: str, n: int) -> list[str]:
    """`n` different sentences that contain `word` once, at varying places."""
    rng = random.Random(word)
    out: dict[str, None] = {}
    while len(out) < n:
        left, right = rng.choices(FILLER, k=rng.randint(0, 8)), rng.choices(FILLER, k=rng.randint(1, 8))
        out[" ".join(left + [word] + right)] = None
    return list(out)


def _save_model(uri: str, mode: str, base_model) -> str:
    torch.manual_seed(0)
    model = Bertram.create(mode, str(base_model), NgramVocab.build(WORDS * 4, min_count=4), ngram_dropout=0.0)
    model.save_pretrained(uri, tokenizer=AutoTokenizer.from_pretrained(base_model))
    return uri


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_bert) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bertram")
    return {mode: _save_model(str(root / mode), mode, tiny_bert) for mode in ("add", "context")}


def _config(bertram: str, output, **kw) -> InferConfig:
    # float32, to compare with the Python API's numbers (bf16 autocast: ~1e-4 off)
    return InferConfig(bertram=bertram, output=str(output), num_actors=2, bf16=False, **SETTINGS, **kw)


def _expected(bertram: str, words_with_contexts) -> dict[str, torch.Tensor]:
    model, tokenizer = api.load(bertram)
    return api.infer_vectors(model, tokenizer, words_with_contexts, **SETTINGS)


def _vectors(output: str) -> tuple[list[str], np.ndarray, list[int]]:
    table = storage.read_parquet(storage.join(output, "vectors.parquet"))
    assert table.schema.field("vector").type == pa.list_(pa.float32())
    assert table.schema.field("n_contexts").type == pa.int32()
    return table["word"].to_pylist(), np.array(table["vector"].to_pylist(), np.float32), \
        table["n_contexts"].to_pylist()


def _text(output: str) -> tuple[list[str], np.ndarray]:
    rows = [line.split(" ") for line in storage.read_text(storage.join(output, "vectors.txt")).splitlines()]
    return [r[0] for r in rows], np.array([[float(x) for x in r[1:]] for r in rows], np.float32)


def _check(output: str, expected: dict[str, torch.Tensor], n_contexts: dict[str, int]) -> None:
    """vectors.parquet holds `expected` in its order with those context counts; vectors.txt the same numbers."""
    words, vectors, counts = _vectors(output)
    assert words == list(expected)
    assert counts == [n_contexts[w] for w in words]
    for word, vector in zip(words, vectors):
        assert torch.allclose(torch.from_numpy(vector), expected[word], atol=1e-5), word
    text_words, text_vectors = _text(output)
    assert text_words == words
    np.testing.assert_array_equal(text_vectors, vectors)  # float32 values survive the text exactly


def _reference_text(path, pairs) -> str:
    path.write_text("".join(w + "\t" + "\t".join(cs) + "\n" for w, cs in pairs), encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------------------
# jobs.infer


def test_contexts_in_reference_text_give_the_python_apis_vectors(ray_local, models, tmp_path):
    data = {w: _contexts(w, n) for w, n in [("kumquat", 20), ("apple", 3), ("river", 1), ("stone", 9)]}
    unusable = "kumquats , not the word"
    # kumquat on two lines (its contexts are merged), one context without the word.
    path = _reference_text(tmp_path / "contexts.tsv", [("kumquat", data["kumquat"][:12] + [unusable]),
                                                       *[(w, data[w]) for w in ("apple", "river", "stone")],
                                                       ("kumquat", data["kumquat"][10:])])
    result = infer(_config(models["add"], tmp_path / "out", contexts=path))
    _check(str(tmp_path / "out"), _expected(models["add"], data), {w: len(cs) for w, cs in data.items()})
    assert result["words"] == 4 and result["contexts"] == 33 and result["words_without_contexts"] == 0
    assert result["mode"] == "add" and result["dim"] == 32 and result["words_per_s"] > 0


def test_parquet_contexts_restricted_to_a_words_file_with_duplicates_and_a_word_without_contexts(
        ray_local, models, tmp_path):
    data = {w: _contexts(w, n) for w, n in [("kumquat", 5), ("apple", 40), ("river", 2), ("green", 3)]}
    parquet = tmp_path / "contexts.parquet"
    storage.write_parquet(str(parquet), pa.table({"word": list(data), "contexts": list(data.values())}))
    words = tmp_path / "words.txt"
    words.write_text("river\nsweetness\n\napple\nriver\nkumquat\n", encoding="utf-8")  # sweetness: no contexts
    result = infer(_config(models["add"], tmp_path / "out", contexts=str(parquet), words=str(words),
                           max_contexts_per_word=32))
    order = ["river", "sweetness", "apple", "kumquat"]  # the words file's, duplicates once
    used = {w: data.get(w, [])[:32] for w in order}  # apple: its first 32 contexts
    expected = _expected(models["add"], used)
    model = Bertram.from_pretrained(models["add"])
    form = model.form(model.ngram_vocab.encode(["sweetness"]))[0].detach()  # (D,)
    assert torch.allclose(expected["sweetness"], form, atol=1e-6)  # the form vector, from the API too
    _check(str(tmp_path / "out"), expected, {w: len(cs) for w, cs in used.items()})
    assert result["words_without_contexts"] == 1 and result["words_without_contexts_sample"] == ["sweetness"]


def test_words_and_corpus_gather_contexts_with_preprocess_and_a_rerun_is_skipped(ray_local, models, small_corpus,
                                                                                tmp_path, monkeypatch):
    corpus, _ = small_corpus
    words = tmp_path / "words.txt"
    words.write_text("River\nzebra\nstone\n", encoding="utf-8")  # lowercased like the corpus; zebra is absent
    out = tmp_path / "out"
    config = _config(models["add"], out, words=str(words), corpus=str(corpus), max_contexts_per_word=12)
    result = infer(config)
    pre = out / "preprocessed"
    assert manifest.read(str(pre))["mode"] == "words"
    gathered = api.read_contexts(str(pre))
    assert len(gathered["river"]) == len(gathered["stone"]) == 12 and gathered["zebra"] == []
    expected = _expected(models["add"], gathered)
    _check(str(out), {w: expected[w] for w in ("river", "zebra", "stone")}, {"river": 12, "zebra": 0, "stone": 12})
    assert result["words_without_contexts_sample"] == ["zebra"]

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    assert infer(config)["finished_at"] == result["finished_at"]  # skipped: nothing was redone
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == before

    words.write_text("river\nlight\n", encoding="utf-8")  # the same file with other words: both stages redone
    infer(config)
    assert _vectors(str(out))[0] == ["river", "light"] and _vectors(str(out))[2] == [12, 12]
    assert set(api.read_contexts(str(pre))) == {"river", "light"}
    words.write_text("river\nzebra\n", encoding="utf-8")

    # A context-only model cannot give zebra a vector: one clear error, before any inference work.
    monkeypatch.setattr(jobs.infer, "connect_ray", lambda *a, **k: pytest.fail("inference started"))
    with pytest.raises(ConfigError, match=r"context-only model, and 1 words .*'zebra'.*form part"):
        infer(_config(models["context"], out, words=str(words), corpus=str(corpus), max_contexts_per_word=12,
                      overwrite=True))
    words.write_text("river\nnew-york\n", encoding="utf-8")  # never one corpus token: fails before preprocess
    with pytest.raises(ConfigError, match=r"'new-york'"):
        infer(_config(models["context"], tmp_path / "out-never", words=str(words), corpus=str(corpus)))
    assert not (tmp_path / "out-never" / "preprocessed").exists()


def test_vectors_come_back_in_the_input_order_whatever_order_the_actors_finished_in():
    words = ["kumquat", "apple", "river", "stone", "tree"]
    vectors = np.arange(10, dtype=np.float32).reshape(5, 2)  # (W, D)
    shuffled = vectors_table(words, vectors, [1, 2, 3, 4, 5]).take([3, 0, 4, 2, 1])
    table = jobs.infer.in_order(shuffled, words)
    assert table["word"].to_pylist() == words and table["n_contexts"].to_pylist() == [1, 2, 3, 4, 5]
    np.testing.assert_array_equal(np.array(table["vector"].to_pylist(), np.float32), vectors)


def test_a_context_only_model_without_contexts_for_a_word_fails_before_any_ray_work(models, tmp_path, monkeypatch):
    monkeypatch.setattr(jobs.infer, "connect_ray", lambda *a, **k: pytest.fail("Ray work started"))
    path = _reference_text(tmp_path / "c.tsv", [("apple", _contexts("apple", 3)), ("kumquat", ["kumquats only"])])
    with pytest.raises(ConfigError, match=r"context-only model, and 1 words .*'kumquat'"):
        infer(_config(models["context"], tmp_path / "out", contexts=path))


def test_model_contexts_and_output_on_s3(ray_local, models, tiny_bert, s3_bucket, tmp_path):
    bertram = _save_model(f"{s3_bucket}/models/add", "add", tiny_bert)
    data = {w: _contexts(w, n) for w, n in [("orange", 4), ("tree", 11)]}
    contexts = f"{s3_bucket}/in/contexts.tsv"
    storage.write_text(contexts, "".join(w + "\t" + "\t".join(cs) + "\n" for w, cs in data.items()))
    output = f"{s3_bucket}/vectors"
    infer(_config(bertram, output, contexts=contexts))
    assert manifest.is_complete(output)
    _check(output, _expected(models["add"], data), {w: len(cs) for w, cs in data.items()})

    augmented = f"{s3_bucket}/augmented"
    augment(AugmentConfig(vectors=output, model=str(tiny_bert), output=augmented))
    local = tmp_path / "augmented"
    for f in storage.list_files(augmented):
        (local / f.uri[len(augmented) + 1:]).parent.mkdir(parents=True, exist_ok=True)
        (local / f.uri[len(augmented) + 1:]).write_bytes(storage.read_bytes(f.uri))
    tokenizer, lm = AutoTokenizer.from_pretrained(local), AutoModel.from_pretrained(local)  # tiny_bert has no head
    _, vectors, _ = _vectors(output)
    row = lm.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("<BERTRAM:tree>")]
    assert torch.equal(row.detach(), torch.from_numpy(vectors[1]))


def _cli(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(InferConfig, infer, jobs.infer.__doc__, prog="python -m jobs.infer", argv=argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    return err


def test_bad_arguments_are_one_clear_line(models, tiny_bert, tmp_path, capsys):
    words, empty, contexts = tmp_path / "words.txt", tmp_path / "empty.txt", tmp_path / "c.tsv"
    words.write_text("kumquat\n", encoding="utf-8")
    empty.write_text("\n  \n", encoding="utf-8")
    _reference_text(contexts, [("kumquat", _contexts("kumquat", 2))])
    base = ["--bertram", models["add"], "--output", str(tmp_path / "out")]
    assert "not both" in _cli(base + ["--words", str(words), "--corpus", str(tmp_path), "--contexts",
                                      str(contexts)], capsys)
    assert "no contexts: give --words FILE --corpus URI" in _cli(base, capsys)
    assert "--corpus needs --words" in _cli(base + ["--corpus", str(tmp_path)], capsys)
    assert "holds no words" in _cli(base + ["--contexts", str(contexts), "--words", str(empty)], capsys)
    missing = ["--bertram", str(tmp_path / "no-model"), "--output", str(tmp_path / "out"), "--contexts", str(contexts)]
    assert "holds no BERTRAM model (config.json missing); run jobs.train" in _cli(missing, capsys)
    broken = tmp_path / "broken"
    _save_model(str(broken), "add", tiny_bert)
    (broken / "ngram_vocab.json").unlink()
    capsys.readouterr()  # the progress bars of building it
    assert "incomplete model (ngram_vocab.json missing)" in _cli(
        ["--bertram", str(broken), "--output", str(tmp_path / "out"), "--contexts", str(contexts)], capsys)
    assert not (tmp_path / "out").exists()

    run = subprocess.run([sys.executable, "-m", "jobs.infer", *base], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2 and run.stderr.strip().startswith("error: no contexts"), run.stderr[-2000:]


# ---------------------------------------------------------------------------------------
# jobs.augment


_FRESH_PROCESS = """
import json, sys
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer
out = {}
for path, cls, words in json.loads(sys.argv[1]):
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = (AutoModelForMaskedLM if cls == "masked_lm" else AutoModel).from_pretrained(path)
    rows = {}
    for word in words:
        ids = tokenizer(f"<BERTRAM:{word}>", add_special_tokens=False)["input_ids"]
        rows[word] = {"ids": ids, "row": lm.get_input_embeddings().weight[ids[0]].tolist()}
    lm(**tokenizer("a kumquat / <BERTRAM:kumquat> is sweet", return_tensors="pt"))
    out[path] = {"rows": rows, "architectures": lm.config.architectures}
print(json.dumps(out))
"""


def test_an_augmented_bert_and_roberta_reload_in_a_fresh_process(ray_local, tiny_bert, tiny_roberta, tmp_path):
    data = {w: _contexts(w, n) for w, n in [("kumquat", 6), ("apple", 2), ("ʘ̃ʘ", 3)]}
    contexts = _reference_text(tmp_path / "contexts.tsv", data.items())
    mlm = tmp_path / "bert-mlm"  # a checkpoint with a masked-LM head: --head auto keeps it
    AutoModelForMaskedLM.from_pretrained(tiny_bert).save_pretrained(mlm)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(mlm)
    runs = []  # (output, head expected, vectors output)
    for name, base, lm, head in [("bert", tiny_bert, tiny_bert, "auto"), ("bert-mlm", tiny_bert, mlm, "auto"),
                                 ("roberta", tiny_roberta, tiny_roberta, "masked_lm")]:
        vectors = tmp_path / f"vectors-{name.split('-')[0]}"
        if not vectors.exists():
            bertram = _save_model(str(tmp_path / f"bertram-{name}"), "add", base)
            infer(_config(bertram, vectors, contexts=contexts))
        result = augment(AugmentConfig(vectors=str(vectors), model=str(lm), output=str(tmp_path / name),
                                       head=head))
        assert result["tokens"] == [token_for(w) for w in data] and result["tokens_added"] == 3
        # Plain text reaches the words the tokenizer splits (and Kumquat where it is cased): kumquat and ʘ̃ʘ;
        # apple is one token of the tiny BERT's vocabulary (it keeps its own row), not of the tiny RoBERTa's
        assert result["plain_words"] == (2 if name.startswith("bert") else 3) and result["plain_forms"] >= 2
        assert result["vocab_size"] == result["vocab_size_before"] + 3 + result["plain_forms"]
        assert '"a kumquat is ..."' in result["usage"]
        runs.append((str(tmp_path / name), result["head"], str(vectors)))
    assert [head for _, head, _ in runs] == ["base", "masked_lm", "masked_lm"]

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    arg = json.dumps([(path, head, list(data)) for path, head, _ in runs])
    run = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, arg], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    reloaded = json.loads(run.stdout.strip().splitlines()[-1])
    for path, head, vectors in runs:
        words, expected, _ = _vectors(vectors)
        assert reloaded[path]["architectures"][0].endswith("ForMaskedLM" if head == "masked_lm" else "Model")
        for word, vector in zip(words, expected):
            assert len(reloaded[path]["rows"][word]["ids"]) == 1, (path, word)  # one token
            np.testing.assert_array_equal(np.array(reloaded[path]["rows"][word]["row"], np.float32), vector)


def test_vectors_read_the_same_from_an_output_its_parquet_and_its_text(tmp_path):
    words, vectors = ["kumquat", "apple"], np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32)
    out = tmp_path / "vectors"
    out.mkdir()
    storage.write_parquet(str(out / "vectors.parquet"), vectors_table(words, vectors, [3, 0]))
    table = storage.read_parquet(str(out / "vectors.parquet"))
    lines, _ = vector_lines(table["word"].to_pylist(), table["vector"].to_numpy(zero_copy_only=False))
    (out / "vectors.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "w2v.txt").write_text("2 5\n" + "\n".join(lines) + "\n", encoding="utf-8")  # with a header
    for uri in (out, out / "vectors.parquet", out / "vectors.txt", tmp_path / "w2v.txt"):
        got_words, got = read_vectors(str(uri))
        assert got_words == words
        np.testing.assert_array_equal(got, vectors)


def test_augment_refuses_vectors_of_another_size_naming_both(tiny_bert, tmp_path):
    (tmp_path / "v.txt").write_text("kumquat 0.1 0.2 0.3\napple 1 2 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"3 dimensions .* size 32"):
        augment(AugmentConfig(vectors=str(tmp_path / "v.txt"), model=str(tiny_bert), output=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()
    (tmp_path / "ragged.txt").write_text("kumquat 0.1 0.2\napple 1 2 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="different sizes"):
        read_vectors(str(tmp_path / "ragged.txt"))
