"""The Python API (pipeline/infer.py) on tiny random BERT and RoBERTa models: batched inference,
chunking, fallbacks for words without contexts, loading, adding vectors to a language model, rewriting."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

from pipeline import augment, infer, storage
from pipeline.model import Bertram, NgramVocab

WORDS = ["kumquat", "apple", "orange", "river", "stone", "sweetness", "tree", "green"]
FILLER = ["the", "a", "is", "of", "and", "fruit", "tree", "river", "stone", "apple", "orange", "small", "sweet",
          "grows", "on", "in", "green", "light", ",", "."]


@pytest.fixture(params=["tiny_bert", "tiny_roberta"])
def base_model(request) -> str:
    return str(request.getfixturevalue(request.param))


def _model(mode: str, base_model: str) -> Bertram:
    torch.manual_seed(0)
    return Bertram.create(mode, base_model, NgramVocab.build(WORDS * 4, min_count=4), ngram_dropout=0.0).eval()


def _contexts(word: str, n: int) -> list[str]:
    """`n` different sentences that contain `word` once, at varying places."""
    rng = random.Random(word)
    out: dict[str, None] = {}
    while len(out) < n:
        left, right = rng.choices(FILLER, k=rng.randint(0, 8)), rng.choices(FILLER, k=rng.randint(1, 8))
        out[" ".join(left + [word] + right)] = None
    return list(out)


def _form(model: Bertram, word: str) -> torch.Tensor:
    return model.form(model.ngram_vocab.encode([word]))[0].detach()  # (D,)


def _record_batch_sizes(model: Bertram) -> list[int]:
    """The number of words of each forward pass from now on."""
    sizes: list[int] = []
    model.register_forward_hook(lambda module, args, kwargs, out: sizes.append(out.shape[0]), with_kwargs=True)
    return sizes


# ---------------------------------------------------------------------------------------
# Inference


@pytest.mark.parametrize("mode", ["context", "add", "form"])
def test_batched_vectors_equal_one_word_at_a_time(base_model, mode):
    model, tokenizer = _model(mode, base_model), AutoTokenizer.from_pretrained(base_model)
    counts = {"kumquat": 5, "apple": 1, "river": 12, "stone": 3, "green": 7, "tree": 32}
    words = {w: _contexts(w, n) for w, n in counts.items()}
    words["kumquat"].insert(2, "no such word, only kumquats here")  # skipped
    sizes = _record_batch_sizes(model)
    batched = infer.infer_vectors(model, tokenizer, words, batch_contexts=16)
    assert list(batched) == list(words)
    assert max(sizes) > 1 and (len(sizes) > 1 or mode == "form")  # several words per pass, several passes
    for word, contexts in words.items():
        single = infer.infer_vector(model, tokenizer, word, contexts)
        assert batched[word].shape == (model.config.output_size,)
        assert torch.allclose(batched[word], single, atol=1e-5), word
    assert not torch.allclose(batched["kumquat"], batched["apple"], atol=1e-3)


@pytest.mark.parametrize("mode", ["context", "add"])
def test_a_word_with_many_contexts_is_the_size_weighted_mean_of_its_chunks(tiny_bert, mode):
    model, tokenizer = _model(mode, str(tiny_bert)), AutoTokenizer.from_pretrained(tiny_bert)
    usable = _contexts("kumquat", 70)
    contexts = usable[:10] + ["kumquats are not it"] + usable[10:40] + ["nor is this"] + usable[40:]
    apple = _contexts("apple", 3)
    vectors = infer.infer_vectors(model, tokenizer, [("kumquat", contexts), ("apple", apple)],
                                  batch_contexts=40, max_contexts_per_chunk=32)
    chunks = [usable[0:32], usable[32:64], usable[64:70]]  # chunks hold usable contexts only
    by_hand = sum(len(c) * infer.infer_vector(model, tokenizer, "kumquat", c) for c in chunks) / 70
    assert torch.allclose(vectors["kumquat"], by_hand, atol=1e-5)
    assert not torch.allclose(vectors["kumquat"], infer.infer_vector(model, tokenizer, "kumquat", usable), atol=1e-4)
    assert torch.allclose(vectors["apple"], infer.infer_vector(model, tokenizer, "apple", apple), atol=1e-5)


@pytest.mark.parametrize("mode", ["form", "add", "add-quotes", "replace", "shallow"])
def test_a_model_with_a_form_part_gives_the_form_vector_without_usable_contexts(base_model, mode):
    model, tokenizer = _model(mode, base_model), AutoTokenizer.from_pretrained(base_model)
    form = _form(model, "kumquat")
    for contexts in ([], ["no such word here", "kumquats are not it"]):
        assert torch.allclose(infer.infer_vector(model, tokenizer, "kumquat", contexts), form, atol=1e-6)
    apple = _contexts("apple", 3)
    vectors = infer.infer_vectors(model, tokenizer, {"kumquat": [], "apple": apple})  # one pass, mixed
    assert torch.allclose(vectors["kumquat"], form, atol=1e-6)
    assert torch.allclose(vectors["apple"], infer.infer_vector(model, tokenizer, "apple", apple), atol=1e-5)
    if mode != "form":  # apple's vector came from its contexts, not its form
        assert not torch.allclose(vectors["apple"], _form(model, "apple"), atol=1e-4)


def test_a_context_model_without_usable_contexts_says_which_word_and_what_to_do(base_model):
    model, tokenizer = _model("context", base_model), AutoTokenizer.from_pretrained(base_model)
    for contexts in ([], ["kumquats only"]):
        with pytest.raises(ValueError, match=r"'kumquat'.*form part"):
            infer.infer_vector(model, tokenizer, "kumquat", contexts)
    sizes = _record_batch_sizes(model)
    with pytest.raises(ValueError, match=r"no usable context for 'kumquat'"):
        infer.infer_vectors(model, tokenizer, {"apple": _contexts("apple", 2), "kumquat": ["kumquats only"]},
                            batch_contexts=2)
    assert sizes == []  # it failed before any work, not at kumquat's pass after apple's


def test_duplicate_words_are_inferred_once_from_all_their_contexts(tiny_bert):
    model, tokenizer = _model("add", str(tiny_bert)), AutoTokenizer.from_pretrained(tiny_bert)
    c = _contexts("kumquat", 4)
    sizes = _record_batch_sizes(model)
    vectors = infer.infer_vectors(model, tokenizer, [("kumquat", c[:2]), ("apple", _contexts("apple", 2)),
                                                     ("kumquat", c[1:])])
    assert list(vectors) == ["kumquat", "apple"] and sum(sizes) == 2
    assert torch.allclose(vectors["kumquat"], infer.infer_vector(model, tokenizer, "kumquat", c), atol=1e-5)
    with_duplicate = infer.infer_vector(model, tokenizer, "kumquat", c[:2] + c[1:])
    assert not torch.allclose(vectors["kumquat"], with_duplicate, atol=1e-4)  # the duplicate context was dropped


@pytest.mark.parametrize("word", ["kumquat" * 28 + "kumq", "ʘ̃ʘ"])
def test_long_and_unusual_words_are_found_in_their_contexts(base_model, word):
    model, tokenizer = _model("add", base_model), AutoTokenizer.from_pretrained(base_model)
    contexts = _contexts(word, 3)
    vectors = infer.infer_vectors(model, tokenizer, {word: contexts, "apple": _contexts("apple", 2)})
    assert vectors[word].shape == (model.config.output_size,) and torch.isfinite(vectors[word]).all()
    assert torch.allclose(vectors[word], infer.infer_vector(model, tokenizer, word, contexts), atol=1e-5)
    assert not torch.allclose(vectors[word], _form(model, word), atol=1e-4)  # the contexts were used


def test_bad_arguments_fail_with_a_message(tiny_bert):
    model, tokenizer = _model("add", str(tiny_bert)), AutoTokenizer.from_pretrained(tiny_bert)
    with pytest.raises(ValueError, match="batch_contexts"):
        infer.infer_vectors(model, tokenizer, {"kumquat": []}, batch_contexts=0)
    with pytest.raises(ValueError, match="wrap it in a list"):
        infer.infer_vector(model, tokenizer, "kumquat", "a kumquat tree")
    with pytest.raises(ValueError, match="non-empty"):
        infer.infer_vectors(model, tokenizer, {" ": ["a tree"]})


# ---------------------------------------------------------------------------------------
# Loading


def _break_base_model(uri: str) -> None:
    """Point the saved config at a base model that does not exist: only the saved tokenizer can load."""
    config = storage.read_json(storage.join(uri, "config.json"))
    storage.write_json(storage.join(uri, "config.json"), {**config, "base_model": "/no/such/base-model"})


@pytest.mark.parametrize("mode", ["form", "add"])
def test_a_saved_model_loads_with_its_tokenizer_and_gives_the_same_vectors(tmp_path, base_model, mode):
    model, tokenizer = _model(mode, base_model), AutoTokenizer.from_pretrained(base_model)
    uri = str(tmp_path / "bertram")
    model.save_pretrained(uri, tokenizer=tokenizer)
    _break_base_model(uri)
    loaded, loaded_tokenizer = infer.load(uri)
    assert not loaded.training and loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    words = {w: _contexts(w, 4) for w in ["kumquat", "apple", "ʘ̃ʘ"]}
    before, after = infer.infer_vectors(model, tokenizer, words), infer.infer_vectors(loaded, loaded_tokenizer, words)
    for word in words:
        assert torch.allclose(before[word], after[word], atol=1e-6)


def test_without_a_saved_tokenizer_the_base_models_is_loaded(tmp_path, tiny_roberta):
    uri = str(tmp_path / "bertram")
    _model("form", str(tiny_roberta)).save_pretrained(uri)
    _, tokenizer = infer.load(uri)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(tiny_roberta).get_vocab()


def test_a_model_on_s3_loads_with_its_tokenizer(s3_bucket, tiny_bert):
    model, tokenizer = _model("add", str(tiny_bert)), AutoTokenizer.from_pretrained(tiny_bert)
    uri = f"{s3_bucket}/models/bertram"
    model.save_pretrained(uri, tokenizer=tokenizer)
    _break_base_model(uri)
    loaded, loaded_tokenizer = infer.load(uri)
    contexts = _contexts("kumquat", 3)
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert torch.allclose(infer.infer_vector(loaded, loaded_tokenizer, "kumquat", contexts),
                          infer.infer_vector(model, tokenizer, "kumquat", contexts), atol=1e-6)


# ---------------------------------------------------------------------------------------
# Adding the vectors to a language model


@pytest.mark.parametrize("lm_class", [AutoModelForMaskedLM, AutoModel])
def test_added_tokens_are_one_piece_whose_embedding_is_the_vector(base_model, lm_class):
    lm, tokenizer = lm_class.from_pretrained(base_model), AutoTokenizer.from_pretrained(base_model)
    before = lm.get_input_embeddings().weight.detach().clone()  # (V, D)
    vocab_size, dim = before.shape
    vectors = {"kumquat": torch.randn(dim, generator=torch.Generator().manual_seed(0)),
               "ʘ̃ʘ": np.random.default_rng(0).standard_normal(dim).astype(np.float32)}
    tokens = augment.add_word_vectors_to_model(vectors, tokenizer, lm)
    assert tokens == ["<BERTRAM:kumquat>", "<BERTRAM:ʘ̃ʘ>"] and len(tokenizer) == vocab_size + 2
    weight = lm.get_input_embeddings().weight
    assert weight.shape == (vocab_size + 2, dim) and torch.equal(weight[:vocab_size], before)
    for word, token in zip(vectors, tokens):
        assert tokenizer.tokenize(token) == [token]
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert token_id in tokenizer(augment.rewrite(f"a {word} is sweet", [word]))["input_ids"]
        assert torch.equal(weight[token_id], torch.as_tensor(vectors[word]))
    out = lm(**tokenizer(augment.rewrite("a kumquat is sweet", vectors), return_tensors="pt"))
    if lm_class is AutoModelForMaskedLM:  # the tied output layer grew with the input embeddings
        assert out.logits.shape[-1] == vocab_size + 2

    augment.add_word_vectors_to_model({"kumquat": torch.ones(dim)}, tokenizer, lm)  # again: overwrite
    assert len(tokenizer) == vocab_size + 2
    assert torch.equal(lm.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(tokens[0])], torch.ones(dim))


def test_a_vector_of_the_wrong_size_is_refused_before_anything_changes(tiny_bert):
    lm, tokenizer = AutoModelForMaskedLM.from_pretrained(tiny_bert), AutoTokenizer.from_pretrained(tiny_bert)
    dim, size = lm.get_input_embeddings().embedding_dim, len(tokenizer)
    for bad in (torch.zeros(dim + 1), torch.zeros(1, dim)):
        with pytest.raises(ValueError, match=rf"'kumquat'.*size {dim}"):
            augment.add_word_vectors_to_model({"apple": torch.zeros(dim), "kumquat": bad}, tokenizer, lm)
    assert len(tokenizer) == size and lm.get_input_embeddings().num_embeddings == size


_FRESH_PROCESS = """
import json, sys
from transformers import AutoModelForMaskedLM, AutoTokenizer
out = {}
for path in sys.argv[1:]:
    tokenizer, lm = AutoTokenizer.from_pretrained(path), AutoModelForMaskedLM.from_pretrained(path)
    ids = tokenizer("<BERTRAM:kumquat>", add_special_tokens=False)["input_ids"]
    logits = lm(**tokenizer("a kumquat / <BERTRAM:kumquat> is sweet", return_tensors="pt")).logits
    out[path] = {"ids": ids, "row": lm.get_input_embeddings().weight[ids[0]].tolist(),
                 "vocab": len(tokenizer), "logits": logits.shape[-1]}
print(json.dumps(out))
"""


def test_an_augmented_model_saved_with_transformers_reloads_in_a_fresh_process(tmp_path, tiny_bert, tiny_roberta):
    expected = {}
    for name, base in (("bert", tiny_bert), ("roberta", tiny_roberta)):
        lm, tokenizer = AutoModelForMaskedLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
        vector = torch.randn(lm.get_input_embeddings().embedding_dim, generator=torch.Generator().manual_seed(1))
        augment.add_word_vectors_to_model({"kumquat": vector}, tokenizer, lm)
        lm.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        expected[str(tmp_path / name)] = (tokenizer.convert_tokens_to_ids("<BERTRAM:kumquat>"), vector, len(tokenizer))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, *expected], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    reloaded = json.loads(run.stdout.strip().splitlines()[-1])
    for path, (token_id, vector, vocab_size) in expected.items():
        assert reloaded[path]["ids"] == [token_id]  # still one token
        np.testing.assert_array_equal(np.array(reloaded[path]["row"], dtype=np.float32), vector.numpy())
        assert reloaded[path]["vocab"] == reloaded[path]["logits"] == vocab_size


# ---------------------------------------------------------------------------------------
# Rewriting text


@pytest.mark.parametrize("text, words, style, expected", [
    ("a kumquat is sweet", ["kumquat"], "slash", "a kumquat / <BERTRAM:kumquat> is sweet"),
    ("a kumquat is sweet", ["kumquat"], "replace", "a <BERTRAM:kumquat> is sweet"),
    ("kumquats, xkumquat, kumquat_1 and Kumquat stay", ["kumquat"], "slash",
     "kumquats, xkumquat, kumquat_1 and Kumquat stay"),
    ("kumquat. (kumquat), kumquat!", ["kumquat"], "slash",
     "kumquat / <BERTRAM:kumquat>. (kumquat / <BERTRAM:kumquat>), kumquat / <BERTRAM:kumquat>!"),
    ("a kumquat and an apple, then a kumquat", ["kumquat", "apple"], "replace",
     "a <BERTRAM:kumquat> and an <BERTRAM:apple>, then a <BERTRAM:kumquat>"),
    ("new york and new", ["new", "new york"], "replace", "<BERTRAM:new york> and <BERTRAM:new>"),
    ("I like c++ and ʘ̃ʘ.", ["c++", "ʘ̃ʘ"], "replace", "I like <BERTRAM:c++> and <BERTRAM:ʘ̃ʘ>."),
    ("nothing to do", [], "slash", "nothing to do"),
])
def test_rewrite(text, words, style, expected):
    assert augment.rewrite(text, words, style) == expected


def test_rewrite_takes_the_vectors_dict_and_refuses_unknown_styles():
    assert augment.rewrite("a kumquat", {"kumquat": torch.zeros(2)}) == "a kumquat / <BERTRAM:kumquat>"
    with pytest.raises(ValueError, match="slash, replace"):
        augment.rewrite("a kumquat", ["kumquat"], style="both")


def test_the_usage_example_of_the_module_docstring_works_end_to_end(tmp_path, tiny_bert):
    uri = str(tmp_path / "bertram")
    _model("add", str(tiny_bert)).save_pretrained(uri, tokenizer=AutoTokenizer.from_pretrained(tiny_bert))
    bertram, tokenizer = infer.load(uri)
    vectors = infer.infer_vectors(bertram, tokenizer, {"kumquat": ["a kumquat is a small orange fruit ."]})
    name = bertram.config.base_model
    lm, lm_tokenizer = AutoModelForMaskedLM.from_pretrained(name), AutoTokenizer.from_pretrained(name)
    augment.add_word_vectors_to_model(vectors, lm_tokenizer, lm)
    out = lm(**lm_tokenizer(augment.rewrite("a kumquat is sweet", vectors), return_tensors="pt"))
    out.logits.sum().backward()  # the augmented model can be fine-tuned: no inference tensors leaked into it
    token_id = lm_tokenizer.convert_tokens_to_ids("<BERTRAM:kumquat>")
    assert lm.get_input_embeddings().weight.grad[token_id].abs().sum() > 0


@pytest.mark.parametrize("how", ["keep", "replace", "combine"])
def test_a_whole_word_keeps_replaces_or_combines_its_own_row_and_every_unreached_word_has_a_reason(tiny_bert, how):
    from pipeline import augment

    tokenizer, lm = AutoTokenizer.from_pretrained(tiny_bert), AutoModel.from_pretrained(tiny_bert)
    weight = lm.get_input_embeddings().weight
    apple = tokenizer.convert_tokens_to_ids("apple")
    before = weight[apple].detach().clone()
    vectors = {w: torch.full((32,), float(i + 1)) for i, w in enumerate(["kumquat", "apple", "new york"])}
    plain = augment.add_plain_words(vectors, tokenizer, lm)
    changed = augment.set_whole_word_rows(vectors, tokenizer, lm, how)
    expected = {"keep": before, "replace": vectors["apple"], "combine": (before + vectors["apple"]) / 2}[how]
    assert torch.allclose(lm.get_input_embeddings().weight[apple], expected)
    assert changed == ([] if how == "keep" else ["apple"])
    unreached = augment.reach(vectors, plain, changed)
    assert "kumquat" not in unreached and "space" in unreached["new york"]
    assert ("apple" in unreached) == (how == "keep") and "own row stays" in unreached.get("apple", "own row stays")
    assert "1 holds a space" in augment.describe_unreached(unreached)
    with pytest.raises(ValueError, match="whole_words"):
        augment.set_whole_word_rows(vectors, tokenizer, lm, "drop")
