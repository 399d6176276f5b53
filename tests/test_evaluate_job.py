"""jobs.evaluate on tiny models: the report's numbers against direct calls of the library,
WNLaMPro with the inferred vectors, the errors a user can make, s3:// output, re-runs.

    .venv/bin/python -m pytest -q tests/test_evaluate_job.py

A tiny masked LM (hidden 32, 2 layers, random) with its own WordPiece vocabulary: apple,
orange and river are single tokens that the vocabulary can also split into pieces (so the
mean-of-pieces baseline has words to score); kumquat is two pieces (not a single token).
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

from jobs.common import main
from jobs.evaluate import EvaluateConfig, evaluate
from pipeline import evaluate as ev
from pipeline import augment, infer, storage, wnlampro
from pipeline.model import Bertram, NgramVocab

WORDS = ["the", "a", "is", "of", "and", "kind", "fruit", "tree", "river", "stone", "apple", "orange", "small",
         "sweet", "grows", "on", "in", "green", "light", "kum", "app", "ora", "riv"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ":", '"', ".", ",", "/"] + WORDS + \
    ["##s", "##quat", "##le", "##nge", "##er", "##e"]
FILLER = ["the", "a", "is", "of", "and", "fruit", "tree", "small", "sweet", "grows", "on", "in", "light", ","]
HELDOUT = ["apple", "kumquat", "orange", "green", "river", "stone"]  # kumquat: 2 pieces; green: no contexts
COUNTS = [1, 2, 4]

# Six WNLaMPro entries in the published format (key words with and without contexts).
DATASET = "\n".join([
    "0\ttest\tkumquat (n,2.01,7)\thypernym\tfruit (n,4.87,40876)\ttree (n,5.03,77412)",
    "1\tdev\triver (n,4.99,42)\tcohyponym\tstone (n,4.71,33210)",
    "2\ttest\tsweet (a,4.63,900)\tantonym\tsmall (a,5.15,81273)\tgreen (a,5.03,70211)\tlight (a,5.10,90233)",
    "3\ttest\tkumqaut (n,0.00,3)\tcorruption\tkumquat (n,2.01,7)",
    "4\ttest\tapple (n,4.74,120)\thypernym\tfruit (n,4.87,40876)",
    "5\ttest\torange (n,4.61,99)\tcohyponym\tapple (n,4.74,120)\tstone (n,4.71,33210)",
]) + "\n"


def _contexts(word: str, n: int) -> list[str]:
    rng = random.Random(word)
    out: dict[str, None] = {}
    while len(out) < n:
        left, right = rng.choices(FILLER, k=rng.randint(0, 6)), rng.choices(FILLER, k=rng.randint(1, 6))
        out[" ".join(left + [word] + right)] = None
    return list(out)


# What --contexts holds: apple also has a context without it as a whole word (never usable).
CONTEXTS = {"apple": _contexts("apple", 3)[:1] + ["apples grow on trees"] + _contexts("apple", 3)[1:],
            "orange": _contexts("orange", 6), "river": _contexts("river", 2), "stone": _contexts("stone", 5),
            "kumquat": _contexts("kumquat", 4), "sweet": _contexts("sweet", 3)}
# The reconstruction's input, by hand: the single-token held-out words with a usable context, in file order.
USABLE = {w: [c for c in CONTEXTS[w] if c != "apples grow on trees"] for w in ["apple", "orange", "river", "stone"]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, str]:
    """The tiny MLM, three BERTRAM models for it (add, form, context) and the input files."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    root = tmp_path_factory.mktemp("evaluate")
    lm_dir = root / "mlm"
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)})
    tokenizer.save_pretrained(lm_dir)
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=37, max_position_embeddings=128)).save_pretrained(lm_dir)
    paths = {"lm": str(lm_dir)}
    for mode in ("add", "form", "context"):
        torch.manual_seed(1)
        model = Bertram.create(mode, str(lm_dir), NgramVocab.build(WORDS * 4, min_count=4), ngram_dropout=0.0)
        paths[mode] = str(root / mode)
        model.save_pretrained(paths[mode], tokenizer=tokenizer)
    files = {"heldout": "\n".join(HELDOUT) + "\n", "wnlampro": DATASET,
             "contexts": "".join("\t".join([w, *cs]) + "\n" for w, cs in CONTEXTS.items())}
    for name, text in files.items():
        (root / f"{name}.txt").write_text(text, encoding="utf-8")
        paths[name] = str(root / f"{name}.txt")
    return paths


def _config(setup, output, **overrides) -> EvaluateConfig:
    values = dict(bertram=setup["add"], compare=[f"form={setup['form']}", f"context={setup['context']}"],
                  model=setup["lm"], output=str(output), heldout=setup["heldout"], contexts=setup["contexts"],
                  counts=COUNTS, plot_words=3, bf16=False)  # float32: the library's own numbers
    return EvaluateConfig(**{**values, **overrides})


def _same(report_rows: list[dict], rows: list[dict]) -> None:
    assert len(report_rows) == len(rows)
    for got, want in zip(report_rows, rows):
        assert got.keys() == want.keys()
        for k, v in want.items():
            assert (got[k] is None and math.isnan(v)) if isinstance(v, float) and math.isnan(v) else got[k] == v, k


def test_reconstruction_report_equals_the_library_and_a_rerun_is_skipped(tmp_path, setup, monkeypatch, capsys):
    out = tmp_path / "eval"
    manifest = evaluate(_config(setup, out))
    files = sorted(p.name for p in out.iterdir())
    assert files == ["manifest.json", "pca.png", "reconstruction.png", "report.json", "report.md"]
    for png in ("pca.png", "reconstruction.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())

    tokenizer = AutoTokenizer.from_pretrained(setup["lm"])
    embedding = AutoModel.from_pretrained(setup["lm"]).get_input_embeddings().weight.detach()
    models = {"form": infer.load(setup["form"]), "context": infer.load(setup["context"]),
              "bertram": infer.load(setup["add"])}
    rows = ev.reconstruction(models, USABLE, tokenizer, embedding, COUNTS, seed=0)
    assert [(r["model"], r["contexts"]) for r in rows] == \
        [("mean of word pieces (baseline)", "-")] + [(m, n) for m in models for n in COUNTS]
    assert rows[0]["n"] == 3  # apple, orange, river have pieces; stone has none
    _same(report["reconstruction"]["rows"], rows)
    assert report["reconstruction"]["words"] == {"heldout": 6, "evaluated": 4, "not_single_token": ["kumquat"],
                                                 "no_contexts": ["green"],
                                                 "fewer_contexts_than": {"1": 0, "2": 0, "4": 2}}
    md = (out / "report.md").read_text()
    assert ev.markdown_table(rows) in md and "kumquat" in md and "![PCA](pca.png)" in md
    assert manifest["reconstruction_words"] == 4 and "wnlampro" not in report

    monkeypatch.setattr(ev, "reconstruction", lambda *a, **k: pytest.fail("a complete report was recomputed"))
    assert evaluate(_config(setup, out)) == manifest
    assert "skipping" in capsys.readouterr().err
    with pytest.raises(Exception, match="other settings"):  # changed settings never silently reuse the report
        evaluate(_config(setup, out, counts=[1]))


def test_wnlampro_rows_use_the_inferred_vectors(tmp_path, setup, monkeypatch):
    used = {}

    def spy(vectors, tokenizer, model):
        used.update(vectors)
        return add(vectors, tokenizer, model)

    add = augment.add_word_vectors_to_model
    monkeypatch.setattr(augment, "add_word_vectors_to_model", spy)
    evaluate(_config(setup, tmp_path / "eval", heldout=None, compare=[], wnlampro=setup["wnlampro"]))
    report = json.loads((tmp_path / "eval" / "report.json").read_text())["wnlampro"]
    entries = wnlampro.select(wnlampro.read_dataset(setup["wnlampro"]), "test")
    assert report["entries"] == 5 == len(entries)  # the dev entry is left out

    # The vectors: inferred by the main model from the key words' contexts; kumqaut has none: its form.
    main_model, tokenizer = infer.load(setup["add"])
    keys = sorted({e.word for e in entries})
    expected = infer.infer_vectors(main_model, tokenizer, {w: CONTEXTS.get(w, []) for w in keys})
    assert sorted(used) == keys
    for word in keys:
        assert torch.allclose(used[word], expected[word], atol=1e-5), word
    form = main_model.form(main_model.ngram_vocab.encode(["kumqaut"]))[0]
    assert torch.allclose(used["kumqaut"], form, atol=1e-5)
    assert report["vectors"] == {"contexts": 4, "form": 1, "none": 0}

    def scores(style: str) -> dict:
        lm, lm_tokenizer = AutoModelForMaskedLM.from_pretrained(setup["lm"]), AutoTokenizer.from_pretrained(setup["lm"])
        if style != "plain":
            add(used, lm_tokenizer, lm)
        return wnlampro.score(wnlampro.rank_targets(lm, lm_tokenizer, entries, style), entries)

    results = report["results"]
    assert list(results) == ["plain", "bertram replace", "bertram slash"]
    assert results["plain"] == scores("plain")
    for style in ("replace", "slash"):
        assert results[f"bertram {style}"] == scores(style)
    assert results["bertram replace"] != results["plain"]  # the vectors changed the predictions
    md = (tmp_path / "eval" / "report.md").read_text()
    assert ev.wnlampro_table(results) in md


def test_a_model_without_a_trained_mlm_head_fails_before_any_work(tmp_path, setup, tiny_bert, capsys):
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as exit_:
        main(EvaluateConfig, evaluate, "", "jobs.evaluate",
             ["--bertram", setup["add"], "--model", str(tiny_bert), "--wnlampro", setup["wnlampro"],
              "--output", str(out)])
    assert exit_.value.code == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(error) == 1
    assert "no trained masked-LM head" in error[0] and "bert-base-uncased" in error[0] and "cls.predictions" in error[0]
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--bertram", "{tmp}/nothing"], "--bertram {tmp}/nothing holds no BERTRAM model (config.json missing)"),
    (["--bertram", "{tmp}/partial"], "--bertram {tmp}/partial: config.json is not a BERTRAM config (no mode)"),
    (["--compare", "{form}"], "--compare '{form}': expected name=URI"),
    (["--compare", "bertram={form}"], "the name 'bertram' is taken"),
    (["--contexts", "none"], "--heldout needs --contexts"),
    (["--heldout", "none", "--contexts", "none"], "nothing to evaluate: pass --heldout FILE --contexts URI"),
    (["--heldout", "none", "--wnlampro", "{tmp}/bad.txt"], "--wnlampro {tmp}/bad.txt, line 2: RELATION must be"),
    (["--counts", "0,4"], "--counts must be numbers of contexts >= 1"),
])
def test_bad_arguments_fail_with_one_line_naming_the_fix(tmp_path, setup, capsys, args, message):
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "config.json").write_text("{}")
    (tmp_path / "bad.txt").write_text(DATASET.splitlines()[0] + "\n0\ttest\tx (n,1,1)\tmeronym\ty (n,1,1)\n")
    argv = ["--bertram", setup["add"], "--model", setup["lm"], "--heldout", setup["heldout"],
            "--contexts", setup["contexts"], "--output", str(tmp_path / "eval")]
    argv += [a.format(tmp=tmp_path, form=setup["form"]) for a in args]
    with pytest.raises(SystemExit) as exit_:
        main(EvaluateConfig, evaluate, "", "jobs.evaluate", argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert message.format(tmp=tmp_path, form=setup["form"]) in err
    assert not (tmp_path / "eval").exists()


def test_the_report_goes_to_s3(s3_bucket, setup):
    uri = f"{s3_bucket}/eval"
    evaluate(_config(setup, uri, compare=[], counts=[2]))
    names = sorted(f.uri.rsplit("/", 1)[1] for f in storage.list_files(uri))
    assert names == ["manifest.json", "pca.png", "reconstruction.png", "report.json", "report.md"]
    report = storage.read_json(f"{uri}/report.json")
    assert [(r["model"], r["contexts"]) for r in report["reconstruction"]["rows"]] == \
        [("mean of word pieces (baseline)", "-"), ("bertram", 2)]
    assert storage.read_bytes(f"{uri}/pca.png")[:4] == b"\x89PNG"


def test_without_a_wordpiece_tokenizer_the_baseline_is_skipped_and_said_why(tmp_path, tiny_roberta):
    tokenizer = AutoTokenizer.from_pretrained(tiny_roberta)
    model = Bertram.create("form", str(tiny_roberta), NgramVocab.build(WORDS * 4, min_count=4), ngram_dropout=0.0)
    model.save_pretrained(str(tmp_path / "form"), tokenizer=tokenizer)
    (tmp_path / "heldout.txt").write_text("apple\na\n")  # " a" is one token of the tiny RoBERTa, " apple" three
    (tmp_path / "contexts.txt").write_text("apple\tan apple grows\na\ta river is green\n")
    evaluate(EvaluateConfig(bertram=str(tmp_path / "form"), model=str(tiny_roberta), output=str(tmp_path / "eval"),
                            heldout=str(tmp_path / "heldout.txt"), contexts=str(tmp_path / "contexts.txt"),
                            counts=[1], plot_words=0))
    report = json.loads((tmp_path / "eval" / "report.json").read_text())["reconstruction"]
    assert report["baseline"].startswith("skipped") and "not a WordPiece tokenizer" in report["baseline"]
    assert [(r["model"], r["n"]) for r in report["rows"]] == [("bertram", 1)]
    assert report["words"]["not_single_token"] == ["apple"]
    assert "Baseline: skipped" in (tmp_path / "eval" / "report.md").read_text()
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == \
        ["manifest.json", "reconstruction.png", "report.json", "report.md"]


def test_downstream_report_equals_the_library(tmp_path, setup):
    from pipeline import downstream

    out = tmp_path / "eval"
    manifest = evaluate(_config(setup, out, downstream_counts=[1, 2], downstream_sentences=2))
    report = json.loads((out / "report.json").read_text())["downstream"]

    tokenizer = AutoTokenizer.from_pretrained(setup["lm"])
    lm = AutoModel.from_pretrained(setup["lm"]).eval()
    own, pieces = downstream.word_inputs(tokenizer, HELDOUT)
    assert sorted(own) == ["apple", "orange", "river"]  # single tokens with pieces; stone has none, kumquat is split
    split = downstream.split_sentences({w: CONTEXTS[w] for w in own}, 2, seed=0)
    bertram = infer.load(setup["add"])
    vectors = {f"bertram, {n} contexts": infer.infer_vectors(*bertram, {w: p[:n] for w, (p, _) in split.items()})
               for n in (1, 2)}
    result = downstream.fidelity(lm, tokenizer, vectors, {w: s for w, (_, s) in split.items()}, pieces, own)
    rows = downstream.summary_rows(result)
    assert [r["input"] for r in report["rows"]] == [downstream.PIECES, downstream.MEAN, "bertram, 1 contexts",
                                                    "bertram, 2 contexts"]
    assert report["words"] == manifest["downstream_words"] == 3 and report["sentences"] == result["sentences"] == 4
    for got, want in zip(report["rows"], rows):
        assert got.keys() == want.keys()
        for k, v in want.items():
            assert got[k] == (pytest.approx(v, abs=1e-6) if not isinstance(v, str) else v), k
    md = (out / "report.md").read_text()
    assert "## Downstream" in md and downstream.markdown_table(rows, "mean", result["row_norm"]) in md
    off = evaluate(_config(setup, tmp_path / "off", downstream=False))
    assert "downstream_words" not in off and "Downstream" not in (tmp_path / "off" / "report.md").read_text()
