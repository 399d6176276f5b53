"""Faults a user would hit (issue 24), each reproduced: a fused model that differs between two identical
runs, printed snippets that run code a word or a path smuggles in, a words-file entry written in the
`<BERTRAM:w>` token syntax, and two jobs started in the same second sharing one log file."""

from __future__ import annotations

import ast
import io
import os
import subprocess
import sys
import textwrap
import tokenize

import pytest
import torch

from tests.conftest import REPO

# ---------------------------------------------------------------------------------------
# 1. jobs.fuse is a function of its inputs and settings: two identical runs, byte-identical models


def _parts(tiny_bert, tmp_path) -> tuple[str, str]:
    """A form and a context model of the tiny BERT, saved as jobs.train saves them (no training: the
    fuse stage reads only the saved models)."""
    from transformers import AutoTokenizer

    from pipeline.model import Bertram, NgramVocab

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    vocab = NgramVocab.build(["kumquat", "apple", "orange", "river", "stone", "tree"] * 4, min_count=4)
    uris = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for mode in ("form", "context"):
            uri = str(tmp_path / mode)
            Bertram.create(mode, str(tiny_bert), vocab if mode == "form" else None).save_pretrained(uri, tokenizer)
            uris.append(uri)
    return uris[0], uris[1]


def test_two_identical_fuse_runs_give_byte_identical_models_and_vectors(tiny_bert, tmp_path):
    from jobs.fuse import FuseConfig, fuse
    from pipeline import infer
    from pipeline.model import Bertram

    form, context = _parts(tiny_bert, tmp_path)
    contexts = {"kumquat": ["the kumquat is a small orange fruit .", "a kumquat grows on a tree ."],
                "stone": ["a stone in the river ."]}
    for mode in ("gated", "shallow"):  # the modes whose gate is initialised afresh (without --pieces)
        outputs = []
        for run in range(2):
            output = str(tmp_path / f"{mode}-{run}")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(1000 + run)  # whatever the process drew before: the result must not depend on it
                fuse(FuseConfig(form=form, context=context, mode=mode, output=output))
            outputs.append(output)
        for name in ("config.json", "model.safetensors", "ngram_vocab.json"):
            first, second = (open(os.path.join(o, name), "rb").read() for o in outputs)
            assert first == second, f"{mode}: {name} differs between two identical runs"
        vectors = []
        for output in outputs:
            model, tokenizer = infer.load(output)
            with torch.no_grad():
                vectors.append(infer.infer_vectors(model, tokenizer, contexts))
        assert all(torch.equal(vectors[0][w], vectors[1][w]) for w in contexts), mode
    # ... and the fusion draws from its own seed, not from (and without changing) the caller's random state
    parts = Bertram.from_pretrained(form), Bertram.from_pretrained(context)
    state = torch.get_rng_state()
    Bertram.fuse(*parts, "gated")
    assert torch.equal(torch.get_rng_state(), state)


def test_the_fuse_seed_seeds_the_gate_and_is_recorded_where_it_matters(tiny_bert, tmp_path):
    from jobs.fuse import FuseConfig, fuse
    from pipeline.model import Bertram

    form, context = _parts(tiny_bert, tmp_path)
    gates = {}
    for seed in (1, 2):
        m = fuse(FuseConfig(form=form, context=context, mode="gated", seed=seed, output=str(tmp_path / f"s{seed}")))
        assert m["config"]["seed"] == seed
        gates[seed] = Bertram.from_pretrained(str(tmp_path / f"s{seed}")).gate.weight
    assert not torch.equal(gates[1], gates[2])  # the seed is the run's, not a constant
    # add, and gated with --pieces, initialise nothing afresh: their result does not depend on the seed
    m = fuse(FuseConfig(form=form, context=context, mode="add", seed=7, output=str(tmp_path / "add")))
    assert "seed" not in m["config"]


def test_augmenting_a_model_with_an_untied_head_twice_gives_the_same_model(tiny_bert, tmp_path):
    """The rows transformers adds to an untied output embedding (an MLM head of its own) come from a fixed seed."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from pipeline import augment

    config = BertConfig.from_pretrained(tiny_bert)
    config.tie_word_embeddings = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertForMaskedLM(config).save_pretrained(tmp_path / "untied")
    states = []
    for run in range(2):
        tokenizer, lm = AutoTokenizer.from_pretrained(tiny_bert), BertForMaskedLM.from_pretrained(tmp_path / "untied")
        assert lm.get_output_embeddings().weight is not lm.get_input_embeddings().weight
        vectors = {"kumquat": torch.ones(32), "new york": torch.zeros(32)}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1000 + run)
            augment.add_word_vectors_to_model(vectors, tokenizer, lm)
            augment.add_plain_words(vectors, tokenizer, lm)
        states.append(lm.state_dict())
    assert [k for k in states[0] if not torch.equal(states[0][k], states[1][k])] == []


def test_augment_with_a_head_the_checkpoint_lacks_gives_the_same_model_twice(tiny_bert, tmp_path):
    """--head masked_lm on a checkpoint without one: the head transformers draws comes from a fixed seed."""
    from jobs.augment import AugmentConfig, augment

    vectors = tmp_path / "vectors.txt"
    vectors.write_text("kumquat " + " ".join(["0.5"] * 32) + "\n", encoding="utf-8")
    for run in range(2):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1000 + run)
            m = augment(AugmentConfig(vectors=str(vectors), model=str(tiny_bert), output=str(tmp_path / f"a{run}"),
                                      head="masked_lm"))
        assert m["head"] == "masked_lm"
    first, second = ((tmp_path / f"a{run}" / "model.safetensors").read_bytes() for run in range(2))
    assert first == second


# ---------------------------------------------------------------------------------------
# 2. The printed copy-paste snippets quote every user value: they parse into the expected calls only

HOSTILE_WORDS = ['zq"]);__import__("os").system("id");print(["', "it's \\\"x\\\"\n\u202eevil"]
HOSTILE_PATHS = ['/tmp/out"),__import__("os").system("id"),("', "/tmp/o'u\\t\n\"x"]


def _calls(tree: ast.AST) -> list[str]:
    """What every call in `tree` calls, sorted: `a.b` for a name's attribute, `().b` for a call result's."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func, parts = node.func, []
            while isinstance(func, ast.Attribute):
                parts.append(func.attr)
                func = func.value
            parts.append(func.id if isinstance(func, ast.Name) else "()")
            names.append(".".join(reversed(parts)))
    return sorted(names)


def _strings(tree: ast.AST) -> set[str]:
    return {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}


@pytest.mark.parametrize("word", HOSTILE_WORDS)
@pytest.mark.parametrize("path", HOSTILE_PATHS)
def test_the_augment_usage_line_quotes_the_word_and_the_path(word, path):
    from jobs.augment import _usage
    from pipeline.augment import token_for

    text = f"a {word} is ..."
    st = _usage(path, "masked_lm", word, token_for(word), True, True)
    tree = ast.parse(st)
    assert len(tree.body) == 1 and _calls(tree) == ["().encode", "SentenceTransformer"]
    assert _strings(tree) == {path, text}
    for head, cls in (("masked_lm", "AutoModelForMaskedLM"), ("base", "AutoModel")):
        for plain in (True, False):
            usage = _usage(path, head, word, token_for(word), plain, False)
            tree = ast.parse(usage)
            assert len(tree.body) == 1 and _calls(tree) == sorted(["AutoTokenizer.from_pretrained",
                                                                        f"{cls}.from_pretrained"])
            assert _strings(tree) == {path}
            comments = [t.string for t in tokenize.generate_tokens(io.StringIO(usage).readline)
                        if t.type == tokenize.COMMENT]
            shown = f"... {word} / {token_for(word)} ... (pipeline.augment.rewrite)" if not plain else text
            assert len(comments) == 1 and comments[0].startswith("# input text: ")
            assert ast.literal_eval(comments[0][len("# input text: "):]) == shown


@pytest.mark.parametrize("word", HOSTILE_WORDS)
@pytest.mark.parametrize("path", HOSTILE_PATHS + ['s3://bucket/run"),__import__("os").system("id"),("/augmented'])
def test_the_run_summary_snippet_quotes_the_word_and_the_path(word, path, monkeypatch):
    from jobs.run import load_snippet
    from pipeline.augment import token_for

    monkeypatch.delenv("BERTRAM_LOCAL_COPY", raising=False)
    remote = path.startswith("s3://")
    local = "augmented" if remote else path
    copy = ["storage.copy_tree"] if remote else []
    for plain in (True, False):
        text = f"a {word} is ..." if plain else f"a {word} / {token_for(word)} is ..."
        manifest = {"head": "masked_lm", "tokens": [token_for(word)], "example_word": word, "plain_words": int(plain)}
        lines = load_snippet(path, manifest)
        tree = ast.parse(textwrap.dedent("\n".join(lines[1:])))
        assert [type(s).__name__ for s in tree.body] == ["ImportFrom"] + ["ImportFrom", "Expr"] * remote + ["Assign", "Assign"]
        assert _calls(tree) == sorted(copy + ["AutoTokenizer.from_pretrained", "AutoModelForMaskedLM.from_pretrained",
                                              "model", "tokenizer"])
        assert _strings(tree) == {local, text, "pt"} | ({path} if remote else set())
        st = load_snippet(path, {**manifest, "sentence_transformers": True})
        tree = ast.parse(textwrap.dedent("\n".join(st[1:])))
        assert _calls(tree) == sorted(copy + ["().encode", "SentenceTransformer"])
        assert _strings(tree) == {local, text} | ({path} if remote else set())


# ---------------------------------------------------------------------------------------
# 3. A words-file entry in the token syntax `<BERTRAM:w>` is refused, in one line, before any work


@pytest.mark.parametrize("lowercase", [False, True])
def test_a_words_file_entry_in_the_token_syntax_is_refused_with_its_line(tmp_path, lowercase):
    from pipeline.config import ConfigError
    from pipeline.words import read_words

    words = tmp_path / "words.txt"
    words.write_text("kumquat\n\n  <BERTRAM:kumquat>  \napple\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        read_words(str(words), "--words", lowercase=lowercase)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"--words {words}: line 3: ")
    assert "'<BERTRAM:kumquat>'" in message and "kumquat" in message.split(";")[-1]
    words.write_text("kumquat\na<bertram:x\n", encoding="utf-8")  # any case, anywhere in the word
    with pytest.raises(ConfigError, match=r"line 2: "):
        read_words(str(words), "--heldout")


def test_augment_refuses_a_vector_named_in_the_token_syntax_before_any_work(tiny_bert, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from jobs.augment import AugmentConfig, augment
    from pipeline import augment as api
    from pipeline.config import ConfigError

    text = tmp_path / "vectors.txt"
    text.write_text("kumquat " + " ".join(["0.5"] * 32) + "\n<BERTRAM:kumquat> " + " ".join(["1.5"] * 32) + "\n")
    out = tmp_path / "augmented"
    with pytest.raises(ConfigError, match=r"^--vectors .*vectors.txt: line 2: '<BERTRAM:kumquat>'"):
        augment(AugmentConfig(vectors=str(text), model=str(tiny_bert), output=str(out)))
    assert not out.exists()
    # the library refuses it too: its plain token would carry (or overwrite) the vector of <BERTRAM:kumquat>
    tokenizer, lm = AutoTokenizer.from_pretrained(tiny_bert), AutoModel.from_pretrained(tiny_bert)
    vectors = {"kumquat": torch.zeros(32), "<BERTRAM:kumquat>": torch.ones(32)}
    for add in (api.add_word_vectors_to_model, api.add_plain_words):
        with pytest.raises(ValueError, match="token syntax"):
            add(vectors, tokenizer, lm)


def test_infer_refuses_a_contexts_word_in_the_token_syntax_before_inferring(tiny_bert, tmp_path):
    from jobs.infer import InferConfig, infer
    from pipeline.config import ConfigError

    form, _ = _parts(tiny_bert, tmp_path)
    contexts = tmp_path / "contexts.tsv"  # no --words: the words are those of --contexts
    contexts.write_text("kumquat\ta kumquat .\n<BERTRAM:apple>\tan apple .\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^--contexts .*contexts.tsv: '<BERTRAM:apple>' is the token syntax"):
        infer(InferConfig(bertram=form, contexts=str(contexts), output=str(tmp_path / "vectors")))
    assert not (tmp_path / "vectors" / "vectors.parquet").exists()


# ---------------------------------------------------------------------------------------
# 4. Two jobs started in the same second write two log files

_SAME_SECOND = textwrap.dedent("""
    import sys, time
    real = time.gmtime
    time.gmtime = lambda seconds=None: real(1_800_000_000)  # both jobs start in the same second
    from pipeline import console
    from pipeline.console import log
    with console.session("probe") as path:
        log(f"probe: job {sys.argv[1]}")
        time.sleep(0.3)
    print(path)
""")


def test_two_jobs_started_in_the_same_second_write_two_log_files(tmp_path):
    env = {**os.environ, "BERTRAM_LOG_DIR": str(tmp_path / "logs")}
    jobs = [subprocess.Popen([sys.executable, "-c", _SAME_SECOND, str(i)], cwd=REPO, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in (1, 2)]
    outputs = [job.communicate(timeout=60) for job in jobs]
    assert all(job.returncode == 0 for job in jobs), [err for _, err in outputs]
    logs = sorted((tmp_path / "logs").glob("probe-*.log"))
    assert len(logs) == 2, [p.name for p in logs]
    assert {p.name for p in logs} == {"probe-20270115-080000.log", "probe-20270115-080000-2.log"}
    said = {out.strip() for out, _ in outputs}
    assert said == {str(p) for p in logs}  # each job names its own file
    for i, (out, _) in enumerate(outputs, 1):
        full = open(out.strip(), encoding="utf-8").read()
        assert f"probe: job {i}" in full and f"probe: job {3 - i}" not in full
