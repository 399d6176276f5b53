"""Storage faults users hit (issue 24): a credential in a corpus URL reaching Ray's own log files, and a
network read that stalls. Each job runs as a user would (a subprocess) and must end with exit status 2
and one line, or succeed, within a bounded time; and no file Ray wrote for it holds the credential."""

from __future__ import annotations

import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import pytest

from tests.conftest import REPO, make_corpus
from tests.test_bad_input import _Quiet, _one_error_line

PASSWORD, TOKEN, SIGNATURE = "s3cretpass4711", "abcdef123456tok", "f00dfacecafe0123456789abcdef"


def _job_within(seconds: float, module: str, *args, env: dict) -> subprocess.CompletedProcess:
    """`python -m jobs.<module>` in its own process group; one that runs past `seconds` (a hang) is killed with
    every process it started (its local Ray) and fails the test instead of blocking it."""
    proc = subprocess.Popen([sys.executable, "-m", f"jobs.{module}", *map(str, args)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **env},
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"jobs.{module} still ran after {seconds} s (killed); its last lines: "
                    f"{(out + err).splitlines()[-5:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture
def ray_tmp():
    """A Ray temp dir of this test's own, so that every file the job's Ray writes can be read back (short:
    Ray's socket paths must fit in 107 bytes, which a pytest tmp_path may not)."""
    path = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# --- 1. a URL's credentials never reach a file that Ray writes -------------------------------------------

@pytest.fixture
def http_corpus_dir(tmp_path):
    """`host:port` of an HTTP server of a small corpus (`part-0.txt`); it ignores user:password and queries."""
    root = tmp_path / "www"
    make_corpus(root, n_lines=600, files=1)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             lambda *a, **kw: _Quiet(*a, directory=str(root), **kw))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _files_holding(secrets: tuple[str, ...], *roots: Path) -> list[str]:
    """Every file under `roots` whose bytes hold one of `secrets`, with the secret it holds."""
    found = []
    for root in roots:
        for path in Path(root).rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                found += [f"{path}: {s}" for s in secrets if s.encode() in data]
    return found


def test_a_corpus_urls_credentials_are_in_no_file_rays_writes(http_corpus_dir, ray_tmp, tmp_path):
    query = f"token={TOKEN}&X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature={SIGNATURE}"
    env = {"RAY_TMPDIR": str(ray_tmp), "BERTRAM_LOG_DIR": str(tmp_path / "logs")}
    # Read with the credentials: the job works (tasks still reach the file) ...
    done = _job_within(120, "preprocess", "--corpus", f"http://user:{PASSWORD}@{http_corpus_dir}/part-0.txt?{query}",
                       "--output", tmp_path / "out", "--min_count_target", 50, "--num_buckets", 2, env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert (tmp_path / "out" / "manifest.json").exists()
    # ... and a file the server does not have fails inside a Ray task, whose error Ray Data logs.
    line = _one_error_line(_job_within(120, "preprocess", "--corpus",
                                       f"http://user:{PASSWORD}@{http_corpus_dir}/missing.txt?{query}",
                                       "--output", tmp_path / "out2", env=env))
    assert f"http://{http_corpus_dir}/missing.txt: not found" in line
    sessions = list((ray_tmp / "ray").glob("session_2*"))
    assert len(sessions) == 2 and list(ray_tmp.rglob("ray-data*.log")), sorted(ray_tmp.rglob("*"))[:20]
    secrets = (PASSWORD, TOKEN, SIGNATURE)
    assert _files_holding(secrets, ray_tmp, tmp_path / "out", tmp_path / "out2", tmp_path / "logs") == []
    assert not any(s in done.stdout + done.stderr + line for s in secrets)


def test_an_error_a_task_raises_carries_no_credential_of_its_causes():
    from pipeline import storage

    url = f"http://user:{PASSWORD}@host/c.txt?token={TOKEN}"
    with pytest.raises(storage.StorageError) as user_error, storage.secrets_scrubbed():
        try:
            raise OSError(f"404 Client Error: Not Found for url: {url}")
        except OSError as exc:
            raise storage.StorageError(f"{url}: not found") from exc
    with pytest.raises(RuntimeError) as other, storage.secrets_scrubbed():
        raise KeyError(url)
    for caught in (user_error, other):
        shown = "".join(traceback.format_exception(caught.value))
        assert PASSWORD not in shown and TOKEN not in shown and "REDACTED" in shown, shown
    assert "KeyError" in str(other.value) and user_error.value.__cause__ is None
    with pytest.raises(ValueError, match="nothing secret"), storage.secrets_scrubbed():
        raise ValueError("nothing secret")  # an error without a secret is raised as it is


# --- 2. a server that stalls: one line within the network timeout, not a hang ----------------------------

class _StallingServer:
    """A TCP server on 127.0.0.1 that accepts every connection, sends `reply` (bytes, maybe nothing) and then
    never sends another byte nor closes, until the test ends."""

    def __init__(self, reply: bytes) -> None:
        self.reply, self.conns = reply, []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            self.conns.append(conn)
            if self.reply:
                conn.recv(65536)  # the request
                conn.sendall(self.reply)

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


_LINES = b"".join(b"the quick river stone number %d .\n" % i for i in range(50))


@pytest.mark.parametrize("when", ["before_headers", "in_the_body"])
def test_a_stalled_http_corpus_is_one_line_after_the_network_timeout(tmp_path, ray_tmp, when):
    reply = b"" if when == "before_headers" else \
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 10000000\r\n\r\n" + _LINES
    server = _StallingServer(reply)
    try:
        uri = f"http://user:{PASSWORD}@127.0.0.1:{server.port}/corpus.txt?token={TOKEN}"
        start = time.time()
        proc = _job_within(90, "preprocess", "--corpus", uri, "--output", tmp_path / "out",
                           env={"BERTRAM_NETWORK_TIMEOUT": "2", "BERTRAM_LOG_DIR": str(tmp_path / "logs"),
                                "RAY_TMPDIR": str(ray_tmp)})
        took = time.time() - start
    finally:
        server.close()
    line = _one_error_line(proc)
    assert line.startswith(f"error: http://127.0.0.1:{server.port}/corpus.txt: ") and "timed out after 2 s" in line
    assert "raise BERTRAM_NETWORK_TIMEOUT" in line and took < 60, (line, took)
    assert _files_holding((PASSWORD, TOKEN), ray_tmp, tmp_path / "logs") == []
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_the_network_timeout_is_checked_and_named(monkeypatch, tmp_path):
    import requests

    from pipeline import storage

    monkeypatch.delenv("BERTRAM_NETWORK_TIMEOUT", raising=False)
    assert storage.network_timeouts() == (10.0, 60.0)
    monkeypatch.setenv("BERTRAM_NETWORK_TIMEOUT", "2.5")
    assert storage.network_timeouts() == (2.5, 2.5)
    error = storage.timed_out(f"https://user:{PASSWORD}@host/c.txt", requests.exceptions.ConnectTimeout("timed out"))
    assert str(error).startswith("https://host/c.txt: timed out after 2.5 s connecting (ConnectTimeout: timed out)")
    monkeypatch.setenv("BERTRAM_NETWORK_TIMEOUT", "soon")
    with pytest.raises(storage.UserError, match="BERTRAM_NETWORK_TIMEOUT must be a number of seconds > 0, "
                                                "got 'soon'"):
        storage.network_timeouts()
    line = _one_error_line(_job_within(60, "preprocess", "--corpus", tmp_path / "c", "--output", tmp_path / "o",
                                       env={"BERTRAM_LOG_DIR": str(tmp_path / "logs")}))
    assert line == "error: BERTRAM_NETWORK_TIMEOUT must be a number of seconds > 0, got 'soon'"


def test_a_file_the_driver_reads_from_a_server_that_stalls_mid_body_is_one_line(monkeypatch):
    from pipeline import storage

    server = _StallingServer(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n" + _LINES)
    monkeypatch.setenv("BERTRAM_NETWORK_TIMEOUT", "1")
    try:
        started = time.time()
        with pytest.raises(storage.StorageError, match="timed out after 1 s without data from the server"):
            storage.read_bytes(f"http://127.0.0.1:{server.port}/words.txt?token={TOKEN}")  # a --words file
    finally:
        server.close()
    assert time.time() - started < 10
