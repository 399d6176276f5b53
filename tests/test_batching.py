"""Batches sized by tokens: every context served exactly once, in passes within the budget, results in input
order; tokenization apart from the encoder gives the same features as inside it."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from pipeline import features
from pipeline.batching import encode, pad, token_batches, tokenize_contexts
from pipeline.model import Bertram, NgramVocab
from tests.test_features import CONTEXTS


@pytest.mark.parametrize("budget,max_rows", [(1, None), (64, None), (300, 7), (10_000, 64), (10_000, None)])
def test_token_batches_serve_every_row_once_within_the_budget_and_sorted(budget, max_rows):
    rng = random.Random(budget)
    lengths = [rng.randint(3, 80) for _ in range(500)]
    passes = token_batches(lengths, budget, max_rows)
    served = torch.cat(passes).tolist()
    assert sorted(served) == list(range(500))  # each row exactly once
    for chosen in passes:
        widths = [lengths[i] for i in chosen.tolist()]
        assert len(widths) == 1 or len(widths) * max(widths) <= budget  # a row longer than the budget goes alone
        assert max_rows is None or len(widths) <= max_rows
    flat = [lengths[i] for i in served]
    assert flat == sorted(flat)  # passes of alike lengths: little padding
    padded = sum(len(c) * max(lengths[i] for i in c.tolist()) for c in passes)
    # Passes of the same sizes in input order pad far more (here ~95% of the real tokens; sorted: ~1/4 of that).
    start, unsorted = 0, 0
    for chosen in passes:
        unsorted += len(chosen) * max(lengths[start:start + len(chosen)])
        start += len(chosen)
    if len(passes) > 1 and budget > 100:
        assert padded - sum(lengths) < 0.5 * (unsorted - sum(lengths)), (padded, unsorted, sum(lengths))
    # Scattering each pass's results back by its indices restores the input order.
    values = torch.tensor(lengths, dtype=torch.float)
    out = torch.empty(500)
    for chosen in passes:
        out[chosen] = values[chosen] * 2
    assert torch.equal(out, values * 2)


def test_tokenize_then_pad_is_what_encode_gives(tiny_bert):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    words = list(CONTEXTS) + ["absent"]
    contexts = [CONTEXTS[w] for w in CONTEXTS] + [["no such word here"]]
    t = tokenize_contexts(words, contexts, tok, "add", 12)
    e = encode(words, contexts, tok, "add", 12, NgramVocab.build(words * 4, min_count=1)).tensors
    ids, mask = pad(t.rows, tok.pad_token_id)
    assert torch.equal(ids, e["input_ids"]) and torch.equal(mask, e["attention_mask"])
    assert t.owner == e["context_word"].tolist() and t.skipped == 1 and max(t.lengths) <= 12


@pytest.mark.parametrize("tokens_per_pass", [None, 20, 100_000])
def test_features_by_token_budget_and_tokenized_apart_equal_the_per_count_passes(tiny_bert, tokens_per_pass):
    import pyarrow as pa
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    model = Bertram.create("context", str(tiny_bert)).eval()
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    words = list(CONTEXTS)
    contexts = [CONTEXTS[w] for w in words]
    before = features.compute_features(model, tok, words, contexts, 32, batch_contexts=1)  # one context a pass
    now = features.compute_features(model, tok, words, contexts, 32, batch_contexts=64, tokens_per_pass=tokens_per_pass)
    batch = pa.table({"bucket": [0, 0], "word": words, "count": [5, 5], "contexts": contexts})
    tokens = features.tokenize_rows(batch, str(tiny_bert), 32)  # the CPU workers' step
    assert tokens.column_names == ["bucket", "word", "count", "rows", "positions"]
    per_word = tokens["rows"].to_pylist()
    apart = features.features_of_tokens(model, [r for rows in per_word for r in rows],
                                        [p for ps in tokens["positions"].to_pylist() for p in ps],
                                        [b for b, rows in enumerate(per_word) for _ in rows], len(words),
                                        tok.pad_token_id, 64, tokens_per_pass)
    for a, b, c in zip(before, now, apart):
        assert a.shape == b.shape == c.shape
        np.testing.assert_allclose(b, a, atol=1e-5)
        np.testing.assert_allclose(c, a, atol=1e-5)


def test_inference_by_token_budget_gives_the_same_vectors_in_fewer_padded_tokens(tiny_bert, monkeypatch):
    from transformers import AutoTokenizer

    from pipeline import infer

    torch.manual_seed(0)
    model = Bertram.create("context", str(tiny_bert)).eval()
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    rng = random.Random(0)
    words = {f"fruit{'s' * i}": [" ".join(["the"] * rng.randint(1, 20) + [f"fruit{'s' * i}"] + ["tree"] * rng.randint(0, 9))
                                 for _ in range(rng.randint(1, 6))] for i in range(12)}
    passes = []
    real = infer._infer
    monkeypatch.setattr(infer, "_infer", lambda m, t, w, c, n: passes.append(sum(map(len, c))) or real(m, t, w, c, n))
    with torch.no_grad():
        before = infer.infer_vectors(model, tok, words, batch_contexts=64)
        count_before = list(passes)
        passes.clear()
        now = infer.infer_vectors(model, tok, words, batch_contexts=64, tokens_per_pass=64)
    assert len(passes) > len(count_before) and sum(passes) == sum(count_before)  # every context once, smaller passes
    for w in words:
        torch.testing.assert_close(now[w], before[w], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["add", "context"])
def test_length_grouped_encoder_passes_give_the_same_outputs_and_gradients(tiny_bert, mode):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    rng = random.Random(1)
    words = [f"fruit{'s' * i}" for i in range(6)]
    contexts = [[" ".join(["the"] * rng.randint(1, 25) + [w] + ["tree"] * rng.randint(0, 5)) for _ in range(4)]
                for w in words]
    vocab = NgramVocab.build(words * 4, min_count=1)
    results = []
    for tokens_per_pass in (None, 60):
        torch.manual_seed(0)
        model = Bertram.create(mode, str(tiny_bert), vocab if mode == "add" else None, ngram_dropout=0.0)
        model.tokens_per_pass = tokens_per_pass
        t = encode(words, contexts, tok, mode, 32, vocab if mode == "add" else None).tensors
        out = model(**t)
        out.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.detach(), grads))
    (one, g1), (grouped, g2) = results
    torch.testing.assert_close(grouped, one, atol=1e-5, rtol=1e-4)
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], atol=1e-4, rtol=1e-3)
