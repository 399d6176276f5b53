"""Cached encoder features (jobs.features), training on them, the vocabulary's words in the form
stage, the gated fusion, and the held-out exclusion across every stage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import features, manifest, storage
from pipeline.batching import encode
from pipeline.model import Bertram, NgramVocab
from pipeline.targets import whole_word_tokens
from tests.test_train import WORDS, _config, _write_inputs

CONTEXTS = {"fruit": ["the fruit is sweet", "a small fruit grows on the tree", "fruit of the light"],
            "river": ["the river is green", "a stone in the river"]}


@pytest.mark.parametrize("mode,kind", [("context", "mask"), ("context", "mask4+pooled"), ("shallow", "mask"),
                                       ("gated", "mask+pooled")])
def test_cached_features_give_the_vectors_the_encoder_gives(tiny_bert, mode, kind):
    torch.manual_seed(0)
    vocab = NgramVocab.build(WORDS * 4, min_count=1)
    model = Bertram.create(mode, str(tiny_bert), vocab if mode != "context" else None, context_features=kind).eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    words = list(CONTEXTS)
    t = encode(words, [CONTEXTS[w] for w in words], tok, mode, 32, vocab if mode != "context" else None).tensors
    with torch.no_grad():
        direct = model(**t)
        cached = features.compute_features(model, tok, words, [CONTEXTS[w] for w in words], 32, batch_contexts=2)
        sizes = torch.tensor([len(f) for f in cached])
        via_cache = model(ngram_ids=t.get("ngram_ids"), features=torch.from_numpy(np.concatenate(cached)),
                          context_word=torch.repeat_interleave(torch.arange(len(words)), sizes))
    assert [len(f) for f in cached] == [3, 2]
    assert cached[0].shape[1] == (64 if kind.endswith("+pooled") else 32)
    torch.testing.assert_close(via_cache, direct, atol=1e-5, rtol=1e-4)


def test_gated_mode_reads_the_number_of_contexts(tiny_bert):
    torch.manual_seed(0)
    vocab = NgramVocab.build(WORDS * 4, min_count=1)
    model = Bertram.create("gated", str(tiny_bert), vocab).eval()
    assert model.gate.in_features == 2 * 32 + 1
    with torch.no_grad():
        model.gate.weight.zero_()
        model.gate.weight[0, -1] = 5.0  # the gate opens with the number of contexts only
        model.gate.bias.fill_(-5.0)
        feats = torch.randn(2, 32)
        ngrams = vocab.encode(["fruit", "river"])
        got = model(ngram_ids=ngrams, features=feats, context_word=torch.tensor([0, 1]))  # one context each
        form, context = model.form(ngrams), model.context_linear(feats)
        a = torch.sigmoid(torch.tensor(5 * np.log(2) - 5))  # log(1 + 1 context)
        torch.testing.assert_close(got, a * context + (1 - a) * form)
        many = model(ngram_ids=ngrams[:1], features=feats[:1].expand(20, -1), context_word=torch.zeros(20).long())
        a = torch.sigmoid(torch.tensor(5 * np.log(21) - 5))
        torch.testing.assert_close(many, a * context[:1] + (1 - a) * form[:1], atol=1e-5, rtol=1e-4)


def test_whole_word_tokens_of_wordpiece_and_byte_level_bpe(tiny_bert, tiny_roberta):
    from transformers import AutoTokenizer

    words, ids = whole_word_tokens(AutoTokenizer.from_pretrained(tiny_bert))
    assert "fruit" in words and "kum" in words and not any(w.startswith("##") or w.startswith("[") for w in words)
    assert "quat" in words and ":" not in words and "a" not in words  # single letters carry no n-grams
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    assert tok.convert_ids_to_tokens(ids[words.index("fruit")]) == "fruit"
    tok = AutoTokenizer.from_pretrained(tiny_roberta)
    words, ids = whole_word_tokens(tok)
    starts = {t[1:] for t in tok.get_vocab() if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 2}
    assert words and set(words) == starts  # `Ġword` tokens only: `word` without Ġ continues a word
    assert all(tok.convert_ids_to_tokens(i) == "Ġ" + w for w, i in zip(words, ids))


def test_the_features_job_tokenizing_on_cpu_workers_writes_the_same_features(ray_local, tiny_bert, tmp_path):
    from jobs.features import FeaturesConfig, compute

    pre, tgt = _write_inputs(str(tmp_path), str(tiny_bert), n_contexts=24)
    found = {}
    for name, kw in (("inside", {}), ("apart", dict(tokenize_apart=True, tokens_per_pass=96, num_actors=2))):
        out = str(tmp_path / name)
        m = compute(FeaturesConfig(preprocessed=pre, targets=tgt, model=str(tiny_bert), output=out,
                                   contexts_per_word=10, max_seq_length=32, bf16=False, **kw))
        found[name] = {}
        for f in storage.list_files(out):
            if f.uri.endswith(".parquet"):
                table = storage.read_parquet(f.uri)
                found[name].update({w: features.feature_matrix(table["features"], i)
                                    for i, w in enumerate(table["word"].to_pylist())})
        assert m["contexts"] == 10 * len(WORDS)
    assert found["apart"].keys() == found["inside"].keys()
    for word, expected in found["inside"].items():
        np.testing.assert_allclose(found["apart"][word], expected, atol=1e-5)


@pytest.mark.slow
def test_features_job_then_context_training_on_them(ray_local, tiny_bert, tmp_path):
    from jobs.features import FeaturesConfig, compute
    from jobs.train import train
    from pipeline import infer

    pre, tgt = _write_inputs(str(tmp_path), str(tiny_bert), n_contexts=24)
    excluded = tmp_path / "excluded.txt"
    excluded.write_text("river\n")
    out = str(tmp_path / "features")
    m = compute(FeaturesConfig(preprocessed=pre, targets=tgt, model=str(tiny_bert), output=out,
                               contexts_per_word=10, max_seq_length=32, exclude_words=str(excluded),
                               bf16=False))  # float32: the very numbers inference computes (bf16: ~1e-4 off)
    assert m["words"] == len(WORDS) - 1 and m["contexts"] == 10 * (len(WORDS) - 1) and m["feature_size"] == 32
    rows = {}
    for f in storage.list_files(out):
        if f.uri.endswith(".parquet"):
            table = storage.read_parquet(f.uri)
            rows.update({w: features.feature_matrix(table["features"], i) for i, w in enumerate(table["word"].to_pylist())})
    assert "river" not in rows and all(v.shape == (10, 32) for v in rows.values())
    # The cached rows are the encoder's features of the seeded sample.
    model = Bertram.create("context", str(tiny_bert)).eval()
    from transformers import AutoTokenizer

    contexts = infer.read_contexts(pre, ["fruit"])["fruit"]
    sample = features.sample_contexts("fruit", contexts, 10, seed=42)
    expected = features.compute_features(model, AutoTokenizer.from_pretrained(tiny_bert), ["fruit"], [sample], 32)[0]
    np.testing.assert_allclose(rows["fruit"], expected, atol=1e-5)
    assert manifest.is_complete(out)

    ctx = str(tmp_path / "context")
    trained = train(_config("context", pre, tgt, tiny_bert, ctx, features=out, num_workers=1, epochs=6,
                            exclude_words=str(excluded)))
    losses = [loss for _, loss in trained["losses"]]
    assert trained["features"] == out and np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2]), losses
    # The trained model infers from text through the encoder, as it was trained on the cache.
    bertram, tok = infer.load(ctx)
    with torch.no_grad():
        from_text = infer.infer_vectors(bertram, tok, {"fruit": sample}, max_seq_length=32)["fruit"]
        from_cache = bertram(features=torch.from_numpy(rows["fruit"].copy()), context_word=torch.zeros(10, dtype=torch.long))
    torch.testing.assert_close(from_text, from_cache[0], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_features_refuse_a_mode_that_feeds_the_form_through_the_encoder(ray_local, tiny_bert, tmp_path):
    from jobs.features import FeaturesConfig, compute
    from jobs.fuse import FuseConfig, fuse
    from jobs.train import train
    from pipeline.config import ConfigError

    pre, tgt = _write_inputs(str(tmp_path), str(tiny_bert), n_contexts=8)
    feats = str(tmp_path / "features")
    compute(FeaturesConfig(preprocessed=pre, targets=tgt, model=str(tiny_bert), output=feats, max_seq_length=32))
    for stage in ("form", "context"):
        train(_config(stage, pre, tgt, tiny_bert, str(tmp_path / stage), num_workers=0, epochs=1,
                      vocab_words=False, **({"features": feats} if stage == "context" else {})))
    fuse(FuseConfig(form=str(tmp_path / "form"), context=str(tmp_path / "context"), mode="add",
                    output=str(tmp_path / "init")))
    with pytest.raises(ConfigError, match="feeds the form vector through the encoder"):
        train(_config("fused", pre, tgt, tiny_bert, str(tmp_path / "fused"), init=str(tmp_path / "init"),
                      features=feats))
    with pytest.raises(ConfigError, match="context and fused stages"):
        _config("form", pre, tgt, tiny_bert, str(tmp_path / "f2"), features=feats)


@pytest.mark.slow
def test_no_excluded_word_reaches_any_batch_of_any_stage(ray_local, tiny_bert, tmp_path, monkeypatch):
    """Every stage (form with the vocabulary's words, context on text and on features, fused add
    and gated) with --exclude_words: the batches the loop trains on never hold an excluded word."""
    from jobs.features import FeaturesConfig, compute
    from jobs.fuse import FuseConfig, fuse
    from jobs.train import train
    from pipeline import train as training

    seen: dict[str, set[str]] = {}
    stage_now = {"name": None}
    original = training.Collate.__call__

    def spy(self, batch):
        out = original(self, batch)
        if out:  # a batch this rank trains on
            seen.setdefault(stage_now["name"], set()).update(batch["words"][0])
        return out

    monkeypatch.setattr(training.Collate, "__call__", spy)  # local mode: the loop runs in this process
    pre, tgt = _write_inputs(str(tmp_path), str(tiny_bert), n_contexts=8)
    excluded_words = {"river", "apple", "kum"}  # two corpus targets and a vocabulary-only word
    excluded = tmp_path / "excluded.txt"
    excluded.write_text("\n".join(sorted(excluded_words)) + "\n")
    feats = str(tmp_path / "features")
    compute(FeaturesConfig(preprocessed=pre, targets=tgt, model=str(tiny_bert), output=feats, max_seq_length=32,
                           exclude_words=str(excluded)))
    common = dict(num_workers=0, epochs=2, exclude_words=str(excluded))
    runs = [("form", "form", {}), ("context", "context text", {}), ("context", "context features", {"features": feats})]
    for stage, name, kw in runs:
        stage_now["name"] = name
        train(_config(stage, pre, tgt, tiny_bert, str(tmp_path / name.replace(" ", "-")), **common, **kw))
    for mode, kw in (("add", {}), ("gated", {"features": feats})):
        fuse(FuseConfig(form=str(tmp_path / "form"), context=str(tmp_path / "context-features"), mode=mode,
                        output=str(tmp_path / f"init-{mode}")))
        stage_now["name"] = f"fused {mode}"
        train(_config("fused", pre, tgt, tiny_bert, str(tmp_path / f"fused-{mode}"), init=str(tmp_path / f"init-{mode}"),
                      **common, **kw))
    assert set(seen) == {"form", "context text", "context features", "fused add", "fused gated"}
    for name, words in seen.items():
        assert not words & excluded_words, (name, words & excluded_words)
        assert set(WORDS) - excluded_words <= words, name  # ... and every other target word is trained on
    assert {"quat", "orange", "sweet"} <= seen["form"] and "kum" not in seen["form"]  # vocabulary words, not excluded


def test_cosine_objective_ignores_scale():
    from pipeline.train import objective

    target = torch.randn(4, 8)
    assert float(objective(3 * target, target, "cosine")) == pytest.approx(0.0, abs=1e-6)
    assert float(objective(3 * target, target, "mse")) > 1.0
    assert float(objective(-target, target, "cosine")) == pytest.approx(2.0)
