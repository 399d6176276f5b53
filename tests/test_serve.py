"""jobs.serve: the request reader (unit), the Serve application on a local Ray answering real HTTP on 127.0.0.1
(stage): vectors equal to jobs.infer's, every bad-request class answered with a 4xx while the server keeps
serving, concurrent requests batched, the Python handle, a killed replica replaced, a model that cannot be
loaded failing the deployment in one line without its credentials; and the command (`bertram serve`)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from jobs.infer import InferConfig, infer
from jobs.serve import ServeConfig, ServeSettings, application, build
from pipeline import storage
from pipeline.config import ConfigError
from pipeline.infer import Inferrer, infer_vectors, load
from pipeline.serving import BadRequest, Limits, read_request
from tests.conftest import REPO
from tests.test_infer_job import _contexts, _save_model
from tests.test_run_job import _free_port, ray_head  # noqa: F401 - ray_head: a real local head (a fixture)

APP = "bertram-test"


# ---------------------------------------------------------------------------------------
# Unit: the request reader and the shared inference function


def _body(value) -> bytes:
    return json.dumps(value).encode()


def test_a_request_is_read_into_words_usable_contexts_and_counts():
    body = _body({"words": [{"word": "kumquat", "contexts": ["a kumquat .", "no word", "a kumquat ."]},
                            {"word": "apple"}, {"word": "kumquat", "contexts": ["kumquat trees"]}]})
    assert read_request(body, Limits(), needs_contexts=False) == [
        ("kumquat", ["a kumquat ."], 3), ("apple", [], 0), ("kumquat", ["kumquat trees"], 1)]
    # a form model reads no contexts: they are accepted and not used
    assert read_request(body, Limits(), needs_contexts=False, reads_contexts=False)[0] == ("kumquat", [], 3)


BAD = [  # (body, limits, needs_contexts, status, words of the message)
    (b"\xff\xfe{}", {}, False, 400, "not UTF-8"),
    (b'{"words": [', {}, False, 400, "not JSON"),
    (_body([1, 2]), {}, False, 400, 'JSON object with a "words" list'),
    (_body({"word": "x"}), {}, False, 400, 'JSON object with a "words" list'),
    (_body({"words": [], "x": 1}), {}, False, 400, "unknown field 'x'"),
    (_body({"words": []}), {}, False, 400, "non-empty list"),
    (_body({"words": ["kumquat"]}), {}, False, 400, "words[0] must be an object"),
    (_body({"words": [{"contexts": ["a"]}]}), {}, False, 400, "words[0].word is missing"),
    (_body({"words": [{"word": 3}]}), {}, False, 400, "words[0].word is missing"),
    (_body({"words": [{"word": "a", "context": ["a"]}]}), {}, False, 400, "unknown field 'context' in words[0]"),
    (_body({"words": [{"word": "a", "contexts": "a b"}]}), {}, False, 400, "must be a list of strings"),
    (_body({"words": [{"word": "a", "contexts": ["a", 3]}]}), {}, False, 400, "must be a list of strings"),
    (_body({"words": [{"word": " a"}]}), {}, False, 400, "surrounding whitespace"),
    (_body({"words": [{"word": "<BERTRAM:a>"}]}), {}, False, 400, "token syntax"),
    (_body({"words": [{"word": "ab"}] * 3}), {"max_words_per_request": 2}, False, 400, "max_words_per_request"),
    (_body({"words": [{"word": "a", "contexts": ["a"] * 3}]}), {"max_contexts_per_word": 2}, False, 400,
     "max_contexts_per_word"),
    (_body({"words": [{"word": "a", "contexts": ["a"]}] * 3}), {"max_contexts_per_request": 2}, False, 400,
     "max_contexts_per_request"),
    (_body({"words": [{"word": "a", "contexts": ["a " + "x" * 50]}]}), {"max_context_chars": 20}, False, 400,
     "words[0].contexts[0] is 52 characters long"),
    (_body({"words": [{"word": "a" * 30}]}), {"max_word_chars": 20}, False, 400, "max_word_chars"),
    (_body({"words": [{"word": "kumquat", "contexts": ["an apple"]}]}), {}, False, 400,
     "no context holds the word 'kumquat'"),
    (_body({"words": [{"word": "apple", "contexts": ["an apple"]}, {"word": "kumquat"}]}), {}, True, 400,
     "words[1]: 'kumquat' has no context"),
    (_body({"words": [{"word": "a" * 50}]}), {"max_request_bytes": 40}, False, 413, "max_request_bytes"),
]


@pytest.mark.parametrize("body,limits,needs_contexts,status,message", BAD, ids=[b[4] for b in BAD])
def test_a_bad_request_is_one_line_with_its_status(body, limits, needs_contexts, status, message):
    with pytest.raises(BadRequest) as caught:
        read_request(body, Limits(**limits), needs_contexts=needs_contexts)
    assert caught.value.status == status
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_limits_and_settings_refuse_what_cannot_work():
    with pytest.raises(ValueError, match="max_words_per_request"):
        Limits(max_words_per_request=0)
    with pytest.raises(ConfigError, match="max_batch_contexts"):
        ServeSettings(bertram="m", max_batch_contexts=8)  # below max_contexts_per_word: a word would not fit
    with pytest.raises(ConfigError, match="min_replicas"):
        ServeSettings(bertram="m", min_replicas=3, max_replicas=2)

def test_detach_needs_a_cluster(monkeypatch):
    from jobs.serve import serve_model

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match="--detach needs a Ray cluster"):
        serve_model(ServeConfig(bertram="m", detach=True))


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_bert) -> dict[str, str]:
    root = tmp_path_factory.mktemp("serve-models")
    return {mode: _save_model(str(root / mode), mode, tiny_bert) for mode in ("add", "context", "form")}


def test_the_same_word_twice_gets_the_vector_of_its_own_contexts(models):
    """Two requests batched together may ask for one word from other contexts: no merging across them."""
    inferrer = Inferrer(models["add"], bf16=False, batch_contexts=16)
    first, second = _contexts("kumquat", 6)[:3], _contexts("kumquat", 6)[3:]
    got = inferrer([("kumquat", first), ("apple", _contexts("apple", 2)), ("kumquat", second), ("kumquat", [])])
    model, tokenizer = load(models["add"])
    for row, contexts in [(0, first), (2, second), (3, [])]:
        alone = infer_vectors(model, tokenizer, {"kumquat": contexts})["kumquat"]
        assert torch.allclose(got[row], alone, atol=1e-5), row
    assert not torch.allclose(got[0], got[2], atol=1e-3)


# ---------------------------------------------------------------------------------------
# Stage: the application on a local Ray, real HTTP on 127.0.0.1


def _request(port: int, method: str, path: str, body: bytes | None = None, timeout: float = 60):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def _post(port: int, words: list[dict]):
    return _request(port, "POST", "/vectors", _body({"words": words}))


@pytest.fixture(scope="module")
def server(ray_local, models):
    """The add model served by one replica on a free port (Serve on the session's local Ray)."""
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = ServeSettings(bertram=models["add"], max_contexts_per_word=16, max_batch_contexts=32,
                             batch_wait_s=0.05, max_words_per_request=8)
    serve.run(application(settings), name=APP, route_prefix="/", blocking=False)
    yield port
    serve.shutdown()


def _cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_served_vectors_equal_the_infer_jobs(server, models, tmp_path):
    data = {w: _contexts(w, n) for w, n in [("kumquat", 12), ("apple", 3), ("river", 1), ("stone", 16)]}
    data["river"] = data["river"] + ["rivers are long"]  # one context without the word: not used, by both
    words = [{"word": w, "contexts": cs} for w, cs in data.items()] + [{"word": "sweetness"}]  # form vector
    status, answer = _post(server, words)
    assert status == 200, answer
    served = {v["word"]: v for v in answer["vectors"]}
    assert [v["word"] for v in answer["vectors"]] == [*data, "sweetness"]

    tsv = tmp_path / "contexts.tsv"
    tsv.write_text("".join(w + "\t" + "\t".join(cs) + "\n" for w, cs in data.items()), encoding="utf-8")
    (tmp_path / "words.txt").write_text("\n".join([*data, "sweetness"]) + "\n", encoding="utf-8")
    infer(InferConfig(bertram=models["add"], contexts=str(tsv), words=str(tmp_path / "words.txt"),
                      output=str(tmp_path / "out"), num_actors=1))
    table = storage.read_parquet(str(tmp_path / "out" / "vectors.parquet"))
    for word, vector, n in zip(table["word"].to_pylist(), table["vector"].to_pylist(),
                               table["n_contexts"].to_pylist()):
        assert _cosine(served[word]["vector"], vector) >= 0.9999, word
        assert served[word]["contexts_used"] == n, word
    assert served["river"]["contexts_used"] == 1 and served["sweetness"]["contexts_used"] == 0


def test_healthz_and_unknown_paths(server, models):
    status, health = _request(server, "GET", "/healthz")
    assert status == 200 and health["status"] == "ok" and health["mode"] == "add" and health["dim"] == 32
    assert _request(server, "GET", "/nothing")[0] == 404
    assert _request(server, "GET", "/vectors")[0] == 405
    assert _request(server, "POST", "/healthz", b"{}")[0] == 405


def test_every_bad_request_gets_a_4xx_and_the_server_goes_on(server):
    good = [{"word": "apple", "contexts": _contexts("apple", 2)}]
    status, before = _post(server, good)
    assert status == 200
    bad = [b"\xff\xfe", b'{"words": [', _body({"nope": 1}), _body({"words": [{"word": "apple", "contexts": "x"}]}),
           _body({"words": good * 9}),  # max_words_per_request 8
           _body({"words": [{"word": "apple", "contexts": ["an apple"] * 17}]}),  # max_contexts_per_word 16
           _body({"words": [{"word": "apple", "contexts": ["an apple " + "x" * 5000]}]}),
           _body({"words": [{"word": "kumquat", "contexts": ["an apple"]}]}),
           b'{"words": "' + b"x" * 1_100_000 + b'"}']  # max_request_bytes
    for body in bad:
        status, answer = _request(server, "POST", "/vectors", body)
        assert status in (400, 413) and set(answer) == {"error"} and "\n" not in answer["error"], (body[:40], answer)
    status, after = _post(server, good)
    assert status == 200 and after == before


def test_concurrent_requests_are_batched_and_each_gets_its_own_vectors(server):
    """16 clients at once, the same word from different contexts among them: all answer, each as alone."""
    requests = [[{"word": w, "contexts": _contexts(w, 8)[i % 8:i % 8 + 1 + i % 3]}] for i, w in
                enumerate(["kumquat", "apple", "kumquat", "river"] * 4)]
    alone = [_post(server, r)[1]["vectors"][0]["vector"] for r in requests]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda r: _post(server, r), requests))
    assert all(status == 200 for status, _ in together)
    for (_, answer), vector in zip(together, alone):
        assert _cosine(answer["vectors"][0]["vector"], vector) >= 0.9999


def test_the_python_handle_answers_as_http_does(server):
    from ray import serve

    handle = serve.get_app_handle(APP)
    words = [{"word": "kumquat", "contexts": _contexts("kumquat", 3)}]
    answer = handle.vectors.remote({"words": words}).result()
    assert _cosine(answer["vectors"][0]["vector"], _post(server, words)[1]["vectors"][0]["vector"]) >= 0.9999
    with pytest.raises(BadRequest, match="unknown field 'context'"):
        handle.vectors.remote({"words": [{"word": "kumquat", "context": []}]}).result()


def test_a_killed_replica_is_replaced_and_the_service_answers_again(server):
    import ray

    words = [{"word": "apple", "contexts": _contexts("apple", 2)}]
    before = _request(server, "GET", "/healthz")[1]["replica"]
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA::") and APP in a["name"]]
    assert len(replicas) == 1
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    deadline, answered = time.time() + 120, None
    while time.time() < deadline:
        try:
            status, health = _request(server, "GET", "/healthz", timeout=10)
            if status == 200 and health["replica"] != before:
                answered = _post(server, words)
                break
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(1)
    assert answered is not None, "no new replica answered within 120 s"
    assert answered[0] == 200 and len(answered[1]["vectors"][0]["vector"]) == 32


def test_a_model_that_cannot_be_loaded_fails_the_deployment_in_one_line_without_its_credentials(
        server, ray_local, models):
    from ray import serve

    from jobs.serve import _deployment_error

    secret = "s3cr3tPassw0rdXYZ"
    uri = f"https://user:{secret}@127.0.0.1:9/bertram/fused"
    try:  # beside the running application (the fixture's Serve): it keeps serving
        with pytest.raises(RuntimeError) as caught:
            serve.run(application(ServeSettings(bertram=uri)), name="broken", route_prefix="/broken", blocking=False)
        line = str(_deployment_error(caught.value, "broken"))
        assert "cannot load --bertram https://127.0.0.1:9/bertram/fused" in line and "\n" not in line, line
        assert secret not in str(caught.value)
    finally:
        serve.delete("broken")
    assert _request(server, "GET", "/healthz")[0] == 200
    logs = os.path.join(ray_local._private.worker._global_node.get_session_dir_path(), "logs")
    leaks = [os.path.join(d, f) for d, _, files in os.walk(logs) for f in files
             if secret.encode() in open(os.path.join(d, f), "rb").read()]
    assert not leaks
    with pytest.raises(ConfigError, match="holds no BERTRAM model"):  # serve deploy's builder checks first
        build({"bertram": str(models["add"]) + "-missing"})


# ---------------------------------------------------------------------------------------
# The command


def _serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "jobs.serve", *args]


def test_the_command_refuses_a_missing_model_and_a_taken_port_in_one_line(models, tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ""}
    done = subprocess.run(_serve_command("--bertram", str(tmp_path / "none")), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.strip().startswith("error: --bertram") and \
        "holds no BERTRAM model" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(_serve_command("--bertram", models["add"], "--port", str(port)), cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in done.stderr


def test_bertram_serve_answers_curl_and_stops_on_sigterm(models):
    """The documented way: the command serves, a request from two contexts answers in under a second,
    SIGTERM stops it cleanly (exit 0)."""
    port = _free_port()
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    process = subprocess.Popen([sys.executable, "-m", "jobs.cli", "serve", "--bertram", models["context"],
                                "--port", str(port), "--num_cpus", "2"], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "Ctrl-C stops" in line or "error" in line:
                break
        assert "Ctrl-C stops" in "".join(lines), "".join(lines)
        words = [{"word": "kumquat", "contexts": ["a kumquat is a small orange fruit .", "she ate a kumquat ."]}]
        started = time.time()
        status, answer = _post(port, words)
        assert status == 200 and answer["vectors"][0]["contexts_used"] == 2
        assert time.time() - started < 1.0
        status, answer = _post(port, [{"word": "kumquat"}])  # a context-only model: a word without contexts
        assert status == 400 and "has no context" in answer["error"]
        process.send_signal(signal.SIGTERM)
        rest = process.communicate(timeout=60)[0]
        assert process.returncode == 0 and "serve: stopped" in rest, rest
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.slow
def test_ray_job_submit_deploys_on_the_cluster_and_detaches(ray_head, models):
    """The cluster way (cluster/README.md): a job deploys the application with --detach and ends; the
    application keeps answering until `serve shutdown`."""
    address, env = ray_head
    port = _free_port()
    runtime_env = {"excludes": ["/.venv", "/.cache", "/out", "/.git", ".pytest_cache", "__pycache__", "*.egg-info"]}
    done = subprocess.run(["ray", "job", "submit", "--address", address, "--working-dir", ".", "--runtime-env-json",
                           json.dumps(runtime_env), "--", "python", "-m", "jobs.serve", "--bertram", models["add"],
                           "--port", str(port), "--detach"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "left running on the cluster" in done.stdout + done.stderr, \
        done.stdout[-2000:] + done.stderr[-2000:]
    try:
        status, answer = _post(port, [{"word": "kumquat", "contexts": _contexts("kumquat", 2)}])
        assert status == 200 and answer["vectors"][0]["contexts_used"] == 2
    finally:
        subprocess.run(["serve", "shutdown", "--address", address, "-y"], env=env, capture_output=True, timeout=120)
