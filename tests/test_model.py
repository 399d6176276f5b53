"""The BERTRAM model and its batching, on tiny random BERT and RoBERTa models."""

import math

import numpy as np
import pytest
import torch

from pipeline.batching import encode, mask_word
from pipeline.model import MODES, AttentiveMimicking, Bertram, FormModel, NgramVocab, group_by_word

VOCAB_WORDS = ["kumquat", "apple", "orange", "river", "stone", "sweetness", "tree", "green"]


@pytest.fixture(params=["tiny_bert", "tiny_roberta"])
def base_model(request):
    return str(request.getfixturevalue(request.param))


def _ngram_vocab():
    return NgramVocab.build(VOCAB_WORDS * 4, min_count=4)


def _model(mode, base_model):
    torch.manual_seed(0)
    return Bertram.create(mode, base_model, _ngram_vocab(), ngram_dropout=0.0).eval()


def _tokenizer(base_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model)


def test_ngrams_have_boundaries_and_n_range():
    assert NgramVocab.ngrams_of("ab") == ["<S>ab", "ab</S>", "<S>ab</S>"]
    grams = NgramVocab.ngrams_of("kumquat")
    assert "<S>ku" in grams and "uat</S>" in grams and "kumqu" in grams and all(
        3 <= len(g.replace("<S>", "^").replace("</S>", "$")) <= 5 for g in grams)


def test_rare_ngrams_map_to_unk():
    vocab = NgramVocab.build(["kumquat"] * 3 + ["apple"] * 4, min_count=4)
    assert "<S>ap" in vocab.stoi and "<S>ku" not in vocab.stoi
    ids = vocab.encode(["kumquat", "ab"])
    assert ids.shape[0] == 2 and (ids[0][ids[0] != 0] == 1).all()  # every kumquat n-gram is UNK
    assert NgramVocab.from_json(vocab.to_json()).itos == vocab.itos


def test_form_is_a_masked_mean_and_dropout_never_drops_everything():
    form = FormModel(10, 4, dropout=1.0)
    ids = torch.tensor([[2, 3, 0], [4, 0, 0]])
    form.eval()
    expected = torch.stack([form.embedding.weight[[2, 3]].mean(0), form.embedding.weight[4]])
    assert torch.allclose(form(ids), expected)
    form.train()  # dropout 1.0 would drop every n-gram: the word keeps its n-grams instead
    assert torch.allclose(form(ids), expected)
    form.dropout = 0.5
    torch.manual_seed(1)
    outs = {tuple(form(ids)[0].detach().numpy().round(5)) for _ in range(20)}
    assert len(outs) > 1  # in training some n-grams are dropped


def test_attentive_mimicking_matches_a_hand_computation():
    am = AttentiveMimicking(2)
    with torch.no_grad():
        am.linear.weight.copy_(torch.eye(2))
        am.linear.bias.zero_()
    contexts = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [9.0, 9.0]]])  # third is padding
    weights = am(contexts, torch.tensor([[True, True, False]]))
    s = np.array([[1, 1], [1, 2]]) / math.sqrt(2)  # pairwise dot products / sqrt(d)
    rel = s.sum(axis=1)
    assert torch.allclose(weights, torch.tensor([[rel[0] / rel.sum(), rel[1] / rel.sum(), 0.0]], dtype=torch.float))


def test_group_by_word_without_loops():
    vectors = torch.arange(10.0).reshape(5, 2)
    grouped, valid = group_by_word(vectors, torch.tensor([1, 0, 1, 1, 0]), 3)
    assert grouped.shape == (3, 3, 2)
    assert valid.tolist() == [[True, True, False], [True, True, True], [False, False, False]]
    assert grouped[0, :2].tolist() == [[2.0, 3.0], [8.0, 9.0]] and grouped[1].tolist() == [[0, 1], [4, 5], [6, 7]]


def test_masking_multi_piece_words_and_several_occurrences(tiny_bert):
    tokenizer = _tokenizer(str(tiny_bert))
    assert len(tokenizer.tokenize("kumquat")) > 1  # a multi-piece word in this vocabulary
    assert mask_word("kumquat", "a kumquat and the kumquats , kumquat .", "[MASK]") == \
        "a [MASK] and the kumquats , [MASK] ."
    assert mask_word("kumquat", "no such word", "[MASK]") is None
    batch = encode(["kumquat"], [["a kumquat and a kumquat .", "no kumquats here", "kumquat"]], tokenizer, "context")
    t = batch.tensors
    assert batch.skipped_contexts == 1 and t["input_ids"].shape[0] == 2
    row = t["input_ids"][0][t["attention_mask"][0].bool()].tolist()
    assert row[0] == tokenizer.cls_token_id and row[-1] == tokenizer.sep_token_id
    assert row.count(tokenizer.mask_token_id) == 2 and row[t["mask_positions"][0]] == tokenizer.mask_token_id


def test_truncation_keeps_the_mask(tiny_bert):
    tokenizer = _tokenizer(str(tiny_bert))
    long = " ".join(["the"] * 300) + " kumquat " + " ".join(["stone"] * 300)
    t = encode(["kumquat"], [[long]], tokenizer, "add", max_seq_length=32, ngram_vocab=_ngram_vocab()).tensors
    assert t["input_ids"].shape == (1, 32)
    assert t["input_ids"][0, t["mask_positions"][0]] == tokenizer.mask_token_id
    assert t["input_ids"][0, 1] == tokenizer.unk_token_id  # the form slot of `add`


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("per_word", [1, 32])
def test_every_mode_gives_one_vector_per_word(base_model, mode, per_word):
    model = _model(mode, base_model)
    tokenizer = _tokenizer(base_model)
    words = ["kumquat", "apple", "river"]
    contexts = [[f"the {w} is green and sweet {i} ." for i in range(per_word - b % 2 * (per_word > 1))]
                for b, w in enumerate(words)]  # variable numbers of contexts per word
    batch = encode(words, contexts, tokenizer, mode, ngram_vocab=model.ngram_vocab)
    out = model(**batch.tensors)
    assert out.shape == (3, model.config.output_size) and torch.isfinite(out).all()


def test_context_mode_without_contexts_is_a_clear_error(tiny_bert):
    model = _model("context", str(tiny_bert))
    with pytest.raises(ValueError, match="needs at least one context"):
        model(input_ids=torch.zeros((0, 4), dtype=torch.long))


@pytest.mark.parametrize("mode, grads, no_grads", [
    ("form", ["form."], []),
    ("context", ["encoder.", "mimicking.", "context_linear."], []),
    ("replace", ["form.", "encoder.", "context_linear."], []),
    ("add", ["form.", "encoder.", "mimicking."], []),
    ("shallow", ["form.", "gate.", "context_linear."], []),
])
def test_gradients_reach_the_parts_each_mode_uses(tiny_bert, mode, grads, no_grads):
    model = _model(mode, str(tiny_bert)).train()
    tokenizer = _tokenizer(str(tiny_bert))
    batch = encode(["kumquat", "apple"], [["a kumquat tree", "the kumquat is sweet"], ["an apple ."]],
                   tokenizer, mode, ngram_vocab=model.ngram_vocab)
    model(**batch.tensors).pow(2).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    for prefix in grads:
        assert any(n.startswith(prefix) for n in with_grad), (prefix, sorted(with_grad)[:5])
    if mode == "form":
        assert all(n.startswith("form.") for n in with_grad)


@pytest.mark.parametrize("mode", ["form", "context", "add", "shallow"])
def test_save_load_round_trip_is_exact(tmp_path, base_model, mode):
    model = _model(mode, base_model)
    tokenizer = _tokenizer(base_model)
    batch = encode(["kumquat", "stone"], [["the kumquat is sweet"], ["a stone in the river"]], tokenizer, mode,
                   ngram_vocab=model.ngram_vocab)
    model.save_pretrained(str(tmp_path / "m"), tokenizer=tokenizer)
    assert {p.name for p in (tmp_path / "m").iterdir()} >= {"config.json", "model.safetensors"}
    loaded = Bertram.from_pretrained(str(tmp_path / "m"))
    assert torch.equal(model(**batch.tensors), loaded(**batch.tensors))


def test_fuse_takes_form_and_context_parts(tiny_bert):
    form, context = _model("form", str(tiny_bert)), _model("context", str(tiny_bert))
    fused = Bertram.fuse(form, context, "add")
    assert torch.equal(fused.form.embedding.weight, form.form.embedding.weight)
    assert torch.equal(fused.context_linear.weight, context.context_linear.weight)
    with pytest.raises(ValueError, match="needs a form and a context model"):
        Bertram.fuse(context, form, "add")


# ---------------------------------------------------------------------------------------
# The pieces part (a third part of gated/shallow models)


def _pieces_model(base_model, mode="gated"):
    return Bertram.fuse(_model("form", base_model), _model("context", base_model), mode, pieces=True).eval()


@pytest.mark.parametrize("mode", ["gated", "shallow"])
def test_pieces_model_starts_at_a_third_each_with_the_rows_norm(base_model, mode):
    from pipeline.targets import word_pieces

    model, tokenizer = _pieces_model(base_model, mode), _tokenizer(base_model)
    words = ["kumquat", "apple"]
    batch = encode(words, [["the kumquat is sweet"], ["an apple ."]], tokenizer, mode, ngram_vocab=model.ngram_vocab,
                   pieces=word_pieces(tokenizer, words))
    out = model(**batch.tensors)
    rows = model.encoder.get_input_embeddings().weight
    center = rows.mean(0)
    assert torch.allclose(model.gate.center, center)  # measured from the centre of the rows, at a row's distance
    assert torch.allclose((out - center).norm(dim=-1), (rows - center).norm(dim=-1).median().expand(2), rtol=1e-4)
    t = batch.tensors
    form = model.form(t["ngram_ids"])
    pieces = model.pieces_vector(t["piece_ids"])
    _, weights = model.gate.weigh(form, form, pieces, torch.tensor([1, 1]))
    has = (t["piece_ids"] >= 0).any(1)  # (a tiny vocabulary may not split a whole word without [UNK])
    assert has[0]
    expected = torch.where(has.unsqueeze(-1), torch.full((2, 3), 1 / 3), torch.tensor([0.5, 0.5, 0.0]))
    assert torch.allclose(weights, expected)
    # its pieces really are the mean of the piece rows
    ids = [i for i in t["piece_ids"][0].tolist() if i >= 0]
    assert torch.allclose(pieces[0], rows[ids].mean(0), atol=1e-6)


def test_pieces_model_weighs_only_the_parts_a_word_has(tiny_bert):
    model, tokenizer = _pieces_model(str(tiny_bert)), _tokenizer(str(tiny_bert))
    with torch.no_grad():
        model.gate.linear.bias.copy_(torch.tensor([0.0, -50.0, 0.0]))  # context and pieces only
    batch = encode(["kumquat"], [[]], tokenizer, "gated", ngram_vocab=model.ngram_vocab, pieces=[[]]).tensors
    out = model(**batch)  # no contexts, no pieces: the form alone, at the learned scale
    form = model.form(batch["ngram_ids"])
    center = model.gate.center
    assert torch.allclose(torch.nn.functional.normalize(out - center, dim=-1),
                          torch.nn.functional.normalize(form - center, dim=-1), atol=1e-5)
    with pytest.raises(ValueError, match="piece_ids"):
        model(**{k: v for k, v in encode(["kumquat"], [["a kumquat ."]], tokenizer, "gated",
                                          ngram_vocab=model.ngram_vocab).tensors.items()})


def test_pieces_model_trains_the_gate_and_round_trips(tmp_path, tiny_bert):
    from pipeline.train import trainable_parameters

    model, tokenizer = _pieces_model(str(tiny_bert)), _tokenizer(str(tiny_bert))
    assert set(trainable_parameters(model, "fused")) == {"gate.linear.weight", "gate.linear.bias", "gate.log_scale"}
    batch = encode(["kumquat", "stone"], [["the kumquat is sweet"], ["a stone in the river"]], tokenizer, "gated",
                   ngram_vocab=model.ngram_vocab, pieces=[[5, 6], [7]]).tensors
    model.train()
    model(**batch).pow(2).sum().backward()
    assert model.gate.linear.weight.grad.abs().sum() > 0 and model.gate.log_scale.grad != 0
    model.eval()
    model.save_pretrained(str(tmp_path / "m"), tokenizer=tokenizer)
    loaded = Bertram.from_pretrained(str(tmp_path / "m"))
    assert loaded.config.pieces and torch.equal(model(**batch), loaded(**batch))
    with pytest.raises(ValueError, match="third part of the gated and shallow"):
        Bertram.fuse(_model("form", str(tiny_bert)), _model("context", str(tiny_bert)), "add", pieces=True)


def test_the_shared_context_directions_are_projected_out(tiny_bert):
    from pipeline.model import SHARED_DIRECTIONS, shared_directions

    form, context = _model("form", str(tiny_bert)), _model("context", str(tiny_bert))
    hidden = context.encoder.config.hidden_size
    features = [torch.randn(3, hidden), torch.randn(1, hidden), torch.zeros(0, hidden)] + [torch.randn(2, hidden)] * 6
    vectors = context.context_vectors(features)
    by_hand = context(features=features[0], context_word=torch.zeros(3, dtype=torch.long))
    assert vectors.shape == (8, context.config.output_size) and torch.allclose(vectors[0], by_hand[0], atol=1e-5)
    model = Bertram.fuse(form, context, "gated", pieces=True, context_vectors=vectors).eval()
    gate = model.gate
    basis = gate.context_directions
    assert basis.shape[0] == SHARED_DIRECTIONS and torch.allclose(basis @ basis.T, torch.eye(len(basis)), atol=1e-5)
    mean = torch.nn.functional.normalize(vectors.mean(0) - gate.center, dim=0)
    assert abs(float(basis[0] @ mean)) > 0.9999  # the first: towards their mean
    assert torch.equal(basis, shared_directions(vectors, gate.center))
    other = torch.randn(1, gate.center.shape[0])
    signal = other - (other @ basis.T) @ basis  # a word's own direction, orthogonal to the shared ones
    n, p = torch.tensor([4]), torch.tensor([2])
    near = gate.weigh(gate.center + 0.5 * basis[0] + signal, other, other, n, p)[0][0, 0]
    far = gate.weigh(gate.center + 9.0 * basis[0] - 4.0 * basis[1] + signal, other, other, n, p)[0][0, 0]
    assert torch.allclose(near, far, atol=1e-5)  # how far it drifts along the shared directions does not matter
    assert torch.allclose(near, torch.nn.functional.normalize(signal[0], dim=0), atol=1e-5)
    without = Bertram.fuse(form, context, "gated", pieces=True).gate  # no training vectors: nothing projected out
    assert without.context_directions.abs().sum() == 0
    assert not torch.allclose(without.weigh(gate.center + 0.5 * basis[0] + signal, other, other, n)[0][0, 0],
                              without.weigh(gate.center + 9.0 * basis[0] + signal, other, other, n)[0][0, 0])
