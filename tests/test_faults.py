"""Faults users and clusters cause, and what each must give: two runs on one output, a directory that is not
the stage's, SIGTERM, a full disk, a damaged BERTRAM model, a pickled weights file.

Each test here failed on the code before its fix (the issue's closing note says how)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.stage import Stage
from pipeline import lock, manifest, storage
from pipeline.config import ConfigError
from tests.conftest import REPO, make_corpus
from tests.test_bad_input import _job, _one_error_line


# --- one run at a time on an output ------------------------------------------------------------------

def _lock_record(pid: int, host: str | None = None, beat: float | None = None) -> dict:
    return {"host": host or socket.gethostname(), "pid": pid, "process_start": lock._process_start(pid),
            "what": "preprocess", "token": "t" * 32, "started": "2026-01-01T00:00:00Z",
            "heartbeat_at": time.time() if beat is None else beat}


def test_a_second_run_on_an_output_in_use_is_one_line_naming_the_holder_and_touches_nothing(tmp_path):
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    make_corpus(corpus, n_lines=200, files=1)
    out.mkdir()
    (out / "manifest.json").write_text('{"stage": "preprocess"}')  # an earlier output: must stay as it is
    with lock.hold(str(out), "preprocess"):  # this process is "the first run", mid-pass
        proc = _job("preprocess", "--corpus", corpus, "--output", out, "--overwrite", timeout=120)
        line = _one_error_line(proc)
        assert f"pid {os.getpid()}" in line and "in use by preprocess" in line and socket.gethostname() in line
        assert (out / "manifest.json").read_text() == '{"stage": "preprocess"}'
        assert json.loads((out / lock.LOCK).read_text())["pid"] == os.getpid()  # still the first run's
    assert not (out / lock.LOCK).exists()  # released at the end of the block
    with lock.hold(str(out), "jobs.run"):
        assert lock.acquire(f"{tmp_path}/./out/", "preprocess") is None  # the same output, held by this process
        lock.release(None, f"{tmp_path}/./out/")


def test_a_lock_whose_holder_is_gone_is_taken_over_and_a_live_ones_is_not(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / lock.LOCK).write_text(json.dumps(_lock_record(sleeper.pid)))
        with pytest.raises(lock.OutputInUse, match=f"pid {sleeper.pid}"):
            lock.acquire(str(tmp_path), "test")
    finally:
        sleeper.kill()
        sleeper.wait()
    with lock.hold(str(tmp_path), "test"):  # its holder died (kill -9, an OOM): taken over
        assert json.loads((tmp_path / lock.LOCK).read_text())["pid"] == os.getpid()
    # Another host: its pid means nothing here; a fresh heartbeat holds, an old one is a crashed run.
    (tmp_path / lock.LOCK).write_text(json.dumps(_lock_record(1, host="elsewhere")))
    with pytest.raises(lock.OutputInUse, match="host elsewhere"):
        lock.acquire(str(tmp_path), "test")
    (tmp_path / lock.LOCK).write_text(json.dumps(_lock_record(1, host="elsewhere", beat=time.time() - 2 * lock.STALE_S)))
    with lock.hold(str(tmp_path), "test"):
        pass
    assert not (tmp_path / lock.LOCK).exists()


def test_the_lock_on_object_storage_is_a_conditional_put(s3_bucket, tmp_path):
    local = str(tmp_path / "lock")
    assert storage.write_if_absent(local, b"a") and not storage.write_if_absent(local, b"b")
    assert (tmp_path / "lock").read_bytes() == b"a" and [p.name for p in tmp_path.iterdir()] == ["lock"]
    uri = lock.lock_uri(s3_bucket + "/out")
    assert storage.write_if_absent(uri, b'{"token": "a"}')
    assert not storage.write_if_absent(uri, b'{"token": "b"}')  # the store refused the second writer
    assert json.loads(storage.read_bytes(uri)) == {"token": "a"}
    storage.delete(uri)
    with lock.hold(s3_bucket + "/out", "test"):
        assert json.loads(storage.read_bytes(uri))["pid"] == os.getpid()
    assert not storage.exists(uri)


def test_a_reset_keeps_the_lock_and_a_lock_does_not_make_an_output_a_users(tmp_path):
    out = tmp_path / "out"
    with lock.hold(str(out), "test"):
        (out / "data.parquet").write_text("x")
        manifest.reset(str(out), "test", ("data.parquet",))
        assert (out / lock.LOCK).exists() and not (out / "data.parquet").exists()


# --- no directory a stage did not create is deleted ---------------------------------------------------

def test_train_never_deletes_a_checkpoint_directory_that_is_not_its_own(ray_local, tiny_bert, tmp_path):
    from jobs.train import train
    from tests.test_train import _config, _write_inputs

    pre, tgt = _write_inputs(str(tmp_path / "in"), str(tiny_bert))
    theirs = tmp_path / "ckpt" / "mine"
    theirs.mkdir(parents=True)
    (theirs / "notes.txt").write_text("a user's file")
    with pytest.raises(storage.UserError, match="--checkpoints/--run_name .*mine holds files that are not Ray Train"):
        train(_config("form", pre, tgt, tiny_bert, str(tmp_path / "form"), epochs=1,
                      checkpoints=str(tmp_path / "ckpt"), run_name="mine"))
    assert (theirs / "notes.txt").read_text() == "a user's file"


def test_resuming_is_said_only_when_there_is_a_checkpoint_to_resume_from(tiny_bert, tmp_path, capsys):
    from jobs.train import _prepare_output
    from tests.test_train import _config

    out = tmp_path / "form"
    run_dir = out / "checkpoints" / "bertram-form"
    run_dir.mkdir(parents=True)
    (run_dir / ".validate_storage_marker").write_text("")  # what Ray Train writes before the first checkpoint
    (out / "train_config.json").write_text(json.dumps({"config": {"lr": 1}, "inputs": {}}))
    config = _config("form", "pre", "tgt", tiny_bert, str(out))
    _prepare_output(config, "bertram-form", str(out / "checkpoints"), {"lr": 1}, {})
    assert "resuming" not in capsys.readouterr().err and not run_dir.exists()  # a fresh start, said as one
    (run_dir / "checkpoint_1").mkdir(parents=True)
    (run_dir / "checkpoint_1" / "progress.json").write_text("{}")
    _prepare_output(config, "bertram-form", str(out / "checkpoints"), {"lr": 1}, {})
    assert "resuming run 'bertram-form'" in capsys.readouterr().err


# --- SIGTERM: one line, exit 143, nothing complete lost, the lock released --------------------------

def test_sigterm_stops_a_job_with_one_line_and_exit_143_and_releases_its_output(tmp_path):
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    make_corpus(corpus, n_lines=60_000, files=6)
    proc = subprocess.Popen([sys.executable, "-m", "jobs.preprocess", "--corpus", str(corpus), "--output", str(out),
                             "--num_buckets", "2", "--split_mb", "0.05"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (out / "_work").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)  # mid-pass: Ray Data tasks are writing their fragments
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=60)
    lines = [line for line in text.splitlines() if line.strip()]
    assert proc.returncode == 143, lines[-20:]
    assert [line for line in lines if line.startswith("error: ")] == [lines[-1]] and "Traceback" not in text
    assert "stopped by SIGTERM" in lines[-1] and "run the same command again" in lines[-1]
    assert not (out / lock.LOCK).exists() and not manifest.is_complete(str(out))


@pytest.mark.slow
def test_sigterm_during_training_resumes_from_the_last_checkpoint(tiny_bert, tmp_path):
    from tests.test_train import _write_inputs

    pre, tgt = _write_inputs(str(tmp_path / "in"), str(tiny_bert))
    out = tmp_path / "out"
    args = [sys.executable, "-m", "jobs.train", "--stage", "context", "--preprocessed", pre, "--targets", tgt,
            "--model", str(tiny_bert), "--output", str(out), "--epochs", "40", "--max_seq_length", "32",
            "--checkpoint_every", "20", "--checkpoint_interval_s", "0"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and \
            len(list((out / "checkpoints").glob("*/checkpoint_*/progress.json"))) < 2:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "stopped by SIGTERM" in text.splitlines()[-1], text[-3000:]
    again = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming run" in again.stdout + again.stderr
    attempts = manifest.read(str(out))["attempts"]
    assert len(attempts) == 2 and attempts[1]["start_step"] > 0, attempts


# --- a full disk, a read-only output ------------------------------------------------------------------

def _stage(work) -> Stage:
    from dataclasses import dataclass

    @dataclass
    class Config:
        output: str
        overwrite: bool = False

    return Stage(name="test", config=Config, outputs=("part-*", "_work"), work=work)


def test_a_full_disk_during_the_work_is_one_line_naming_the_output_and_frees_what_it_wrote(tmp_path):
    out = tmp_path / "out"

    def work(config, ready):
        (out / "_work").mkdir()
        (out / "_work" / "fragment").write_bytes(b"x" * 5000)
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "part-00000"))

    stage = _stage(work)
    with pytest.raises(storage.StorageError) as failed:
        stage.run(stage.config(output=str(out)))
    line = str(failed.value)
    assert line.startswith("no space left on the device at ") and f"(--output {out})" in line
    assert "free there; it needs more than the 4.9 KB it had written" in line and "choose another --output" in line
    assert not out.exists()  # its fragments removed, the lock released, the directory it made removed

    def read_only(config, ready):
        raise RuntimeError("a Ray task failed: OSError: [Errno 30] Read-only file system: '/data/out/part-1'")

    with pytest.raises(storage.StorageError, match="the filesystem is read-only at /data/out/part-1"):
        _stage(read_only).run(_stage(read_only).config(output=str(out)))


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB filesystem (tmpfs), where the machine lets us mount one."""
    where = tmp_path / "disk"
    where.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small filesystem here (needs root)")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_in_a_real_job_is_one_line_and_leaves_no_fragments(small_disk, tmp_path):
    corpus = tmp_path / "corpus"
    make_corpus(corpus, n_lines=40_000, files=4)  # ~1.5 MB of text: its contexts do not fit in 2 MB
    out = small_disk / "out"
    line = _one_error_line(_job("preprocess", "--corpus", corpus, "--output", out, "--num_buckets", "2",
                                "--max_contexts_per_word", "100000", "--split_mb", "0.2", timeout=180))
    assert line.startswith("error: no space left on the device") and f"--output {out}" in line, line
    assert "free there" in line
    assert not any(p.is_file() for p in out.rglob("*")), list(out.rglob("*"))  # fragments removed


# --- a damaged BERTRAM model, a pickled weights file: one line before any work -------------------------

@pytest.fixture(scope="module")
def context_model(tmp_path_factory, tiny_bert) -> Path:
    from tests.test_infer_job import _save_model

    return Path(_save_model(str(tmp_path_factory.mktemp("bertram") / "context"), "context", tiny_bert))


@pytest.mark.parametrize("damage, said", [
    (lambda c: c.update(surprise=1), "has unknown keys ('surprise')"),
    (lambda c: c["encoder_config"].update(model_type="no-such-encoder"), "encoder_config transformers cannot build"),
    (lambda c: c.update(mode="telepathy"), "mode must be one of"),
    (lambda c: c.pop("base_model"), "is not valid"),
    (lambda c: c["encoder_config"].update(hidden_size=64, num_attention_heads=4),
     "model.safetensors is not the weights of the model config.json describes"),
    (lambda c: c.clear(), "not JSON"),
])
def test_a_damaged_bertram_model_is_one_line_before_any_work(context_model, tmp_path, damage, said):
    from pipeline.model import saved_config

    model = tmp_path / "model"
    shutil.copytree(context_model, model)
    config = json.loads((model / "config.json").read_text())
    damage(config)
    (model / "config.json").write_text(json.dumps(config) if config else '{"mode": "con')
    with pytest.raises(ConfigError, match=said.replace("(", r"\(").replace(")", r"\)")):
        saved_config(str(model))


def test_infer_with_a_damaged_model_stops_before_ray_starts(context_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(context_model, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "surprise": 1}))
    (tmp_path / "words.txt").write_text("kumquat\n")
    started = time.time()
    proc = _job("infer", "--bertram", model, "--words", tmp_path / "words.txt", "--corpus", tmp_path,
                "--output", tmp_path / "out", timeout=120)
    line = _one_error_line(proc)
    assert "config.json has unknown keys ('surprise')" in line and "Started a local Ray" not in proc.stdout
    assert time.time() - started < 30


def test_a_pickled_weights_file_is_refused_in_one_line_before_the_output_is_touched(tiny_bert, tmp_path):
    import torch
    from safetensors.torch import load_file

    model = tmp_path / "pickled"
    shutil.copytree(tiny_bert, model)
    state = dict(load_file(model / "model.safetensors"))
    state["payload"] = os.system  # a global a weights_only load refuses (what an attack would call)
    torch.save(state, model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    from tests.test_train import _write_inputs

    pre, _ = _write_inputs(str(tmp_path / "in"), str(tiny_bert))
    out = tmp_path / "targets"
    out.mkdir()
    (out / "manifest.json").write_text('{"stage": "targets"}')
    (out / "targets.parquet").write_text("a complete earlier output")
    proc = _job("targets", "--preprocessed", pre, "--model", model, "--output", out, "--overwrite",
                timeout=120)
    line = _one_error_line(proc)
    assert "pytorch_model.bin is a pickle that holds more than tensors (GLOBAL posix.system)" in line, line
    assert "weights_only=False" not in proc.stdout + proc.stderr
    assert (out / "targets.parquet").read_text() == "a complete earlier output"
