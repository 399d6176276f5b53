"""The behaviour objective (pipeline/behaviour.py) and its stage (jobs.tune) on tiny models.

    .venv/bin/python -m pytest -q tests/test_behaviour.py
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from pipeline import behaviour
from pipeline.model import Bertram, NgramVocab

WORDS = ["river", "stone", "apple", "orange", "tree"]
FILLER = ["the", "a", "is", "of", "and", "fruit", "small", "sweet", "grows", "on", "in", "green", "light"]


def _contexts(word: str, n: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(f"{seed}{word}")
    return list(dict.fromkeys(" ".join(rng.choices(FILLER, k=3) + [word] + rng.choices(FILLER, k=3))
                              for _ in range(n)))


def _sentences(tokenizer, word: str, n: int = 3):
    own = tokenizer.convert_tokens_to_ids(word)
    return own, behaviour.sentence_inputs(tokenizer, word, own, _contexts(word, n), 32)


def test_the_loss_is_zero_at_the_true_row_and_its_gradient_reaches_the_vector(tiny_bert):
    lm, tok = AutoModel.from_pretrained(tiny_bert).eval(), AutoTokenizer.from_pretrained(tiny_bert)
    table = lm.get_input_embeddings().weight.detach()
    rows, owner, own = [], [], []
    for b, w in enumerate(["river", "stone"]):
        i, sentences = _sentences(tok, w)
        rows += sentences
        owner += [b] * len(sentences)
        own.append(i)
    ids, mask = behaviour._pad(rows, tok.pad_token_id)
    owner, own = torch.tensor(owner), torch.tensor(own)
    with torch.no_grad():
        reference = behaviour.lm_outputs(lm, table[ids], mask, ids == own[owner].unsqueeze(-1))
    true = table[own].clone().requires_grad_(True)
    assert float(behaviour.behaviour_loss(lm, table, true, ids, mask, own, owner, reference)) == pytest.approx(0, abs=1e-5)
    other = (table[own] + torch.randn(2, table.shape[1], generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    loss = behaviour.behaviour_loss(lm, table, other, ids, mask, own, owner, reference)
    loss.backward()
    assert float(loss) > 0.01 and bool((other.grad.norm(dim=-1) > 0).all())  # both words' vectors get a gradient


def _gated(base) -> Bertram:
    torch.manual_seed(0)
    return Bertram.create("gated", str(base), NgramVocab.build(WORDS * 4, min_count=4), ngram_dropout=0.0)


def test_tune_trains_bertram_and_never_the_encoder(tiny_bert):
    model, tok = _gated(tiny_bert), AutoTokenizer.from_pretrained(tiny_bert)
    encoder = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    gate = model.gate.weight.detach().clone()
    history = behaviour.tune(model, tok, WORDS, {w: _contexts(w, 6) for w in WORDS},
                             behaviour.BehaviourSettings(steps=4, words_per_step=3, lr=1e-2, max_seq_length=32))
    assert len(history) == 4 and all(h == h for h in history)
    assert all(torch.equal(encoder[k], v) for k, v in model.encoder.state_dict().items())
    assert not torch.equal(gate, model.gate.weight)
    only_gate = _gated(tiny_bert)
    form = only_gate.form.embedding.weight.detach().clone()
    behaviour.tune(only_gate, tok, WORDS, {w: _contexts(w, 6) for w in WORDS},
                   behaviour.BehaviourSettings(steps=2, words_per_step=3, lr=1e-2, trainable="gate", max_seq_length=32))
    assert torch.equal(form, only_gate.form.embedding.weight)
    with pytest.raises(ValueError, match="two contexts"):
        behaviour.tune(only_gate, tok, ["river"], {"river": ["the river"]}, behaviour.BehaviourSettings(steps=1))


def test_the_tune_stage_excludes_words_saves_a_loadable_model_and_skips_a_rerun(tiny_bert, tmp_path, monkeypatch, capsys):
    import pyarrow as pa

    from jobs.tune import TuneConfig, tune
    from pipeline import infer, manifest, storage
    from pipeline.config import ConfigError

    fused = str(tmp_path / "fused")
    _gated(tiny_bert).save_pretrained(fused, tokenizer=AutoTokenizer.from_pretrained(tiny_bert))
    pre, tgt = tmp_path / "pre", tmp_path / "targets"
    storage.write_text(str(pre / "contexts.tsv"), "".join("\t".join([w, *_contexts(w, 6)]) + "\n" for w in WORDS))
    manifest.write(str(pre), "preprocess", {}, 0.0)
    (pre / "contexts").mkdir()
    (pre / "contexts.tsv").rename(pre / "contexts" / "bucket-00000.tsv")
    storage.write_parquet(str(tgt / "targets.parquet"), pa.table({
        "word": WORDS, "vector": [[0.0] * 32] * len(WORDS), "source": ["embedding"] * len(WORDS), "ota_loss": [None] * 5}))
    manifest.write(str(tgt), "targets", {}, 0.0)
    (tmp_path / "heldout.txt").write_text("river\n")
    drawn: set[str] = set()
    original = behaviour.sentence_inputs
    monkeypatch.setattr(behaviour, "sentence_inputs", lambda tok, w, *a: drawn.add(w) or original(tok, w, *a))
    config = dict(bertram=fused, preprocessed=str(pre), targets=str(tgt), exclude_words=str(tmp_path / "heldout.txt"),
                  output=str(tmp_path / "tuned"), steps=6, words_per_step=2)
    out = tune(TuneConfig(**config))
    assert out["words"] == 4 and out["steps"] == 6 and drawn and "river" not in drawn
    tuned, _ = infer.load(str(tmp_path / "tuned"))
    before, _ = infer.load(fused)
    assert not torch.equal(tuned.gate.weight, before.gate.weight)
    assert tune(TuneConfig(**config)) == out and "skipping" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="tunes a fused model"):
        form = str(tmp_path / "form")
        Bertram.create("form", str(tiny_bert), NgramVocab.build(WORDS * 4, min_count=4)).save_pretrained(form)
        tune(TuneConfig(**{**config, "bertram": form, "output": str(tmp_path / "t2")}))
    assert json.loads((tmp_path / "tuned" / "manifest.json").read_text())["stage"] == "tune"
