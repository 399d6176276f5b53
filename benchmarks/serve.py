"""Benchmark: vectors on demand (`bertram serve`, real HTTP on loopback) vs the batch job (`jobs.infer`).

    python benchmarks/serve.py --bertram out/demo-s3/run/fused --contexts_from out/demo-s3/run/preprocessed

Both infer the same words (--words, each from its first --contexts usable contexts of a
jobs.preprocess output) with the same model and the same CPUs (--cpus: jobs.infer's actors,
the server's replicas of one CPU each), one after the other:

* jobs.infer on a local Ray, on 2 words (its start-up: Ray, actors, the model in each) and on
  all the words; its steady rate is (N - 2) / (t_N - t_2), its end-to-end rate N / t_N;
* `bertram serve` started as a user starts it (a subprocess; its start-up until it serves is
  reported apart), then, for each of --clients, that many client threads on keep-alive HTTP
  connections, each sending one word and its contexts per request (POST /vectors) for
  --seconds after a warm-up: words/s, p50/p99 latency, failed requests.

The served vectors are compared with the job's (cosine). Writes a markdown report (--report).
The clients run on the same cores as the server: their JSON work is part of the load.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(REPO), str(REPO / "benchmarks")) if p not in sys.path]

import numpy as np  # noqa: E402

from infer import choose_words, loadavg, say  # noqa: E402  (benchmarks/infer.py)
from pipeline import storage  # noqa: E402


def run_job(bertram: str, words: dict[str, list[str]], cpus: int, bf16: bool, tmp: str) -> tuple[float, dict]:
    """jobs.infer on a fresh local Ray (a subprocess, as a user runs it): wall seconds and the vectors."""
    tag = f"job-{len(words)}"
    contexts = Path(tmp, f"{tag}.tsv")
    contexts.write_text("".join(w + "\t" + "\t".join(cs) + "\n" for w, cs in words.items()), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.time()
    subprocess.run([sys.executable, "-m", "jobs.infer", "--bertram", bertram, "--contexts", str(contexts),
                    "--output", str(Path(tmp, tag)), "--num_cpus", str(cpus), "--write_text", "false", "--bf16", str(bf16).lower()],
                   cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.time() - started
    table = storage.read_parquet(str(Path(tmp, tag, "vectors.parquet")))
    return seconds, dict(zip(table["word"].to_pylist(), np.asarray(table["vector"].to_pylist())))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bertram: str, port: int, cpus: int, bf16: bool, extra: list[str]
                 ) -> tuple[subprocess.Popen, float, str]:
    """`bertram serve` as a subprocess; returns it once it serves, with its start-up seconds and ready line."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.time()
    process = subprocess.Popen([sys.executable, "-m", "jobs.cli", "serve", "--bertram", bertram, "--port", str(port),
                                "--num_cpus", str(cpus), "--num_replicas", str(cpus), "--cpus_per_replica", "1",
                                "--bf16", str(bf16).lower(), *extra], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    ready = ""
    for line in process.stdout:
        if "ready in" in line:
            ready = line.strip()
        if "Ctrl-C stops" in line:
            threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()  # drain
            return process, time.time() - started, ready
        if line.startswith("error"):
            break
    process.kill()
    raise SystemExit(f"the server did not start: {line.strip()}")


class Client(threading.Thread):
    """One client: its own keep-alive connection, one word per request, until the deadline."""

    def __init__(self, port: int, bodies: list[bytes], deadline: float) -> None:
        super().__init__(daemon=True)
        self.port, self.bodies, self.deadline = port, bodies, deadline
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.answers: list[dict] = []

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        i = 0
        while time.time() < self.deadline or not self.latencies and not self.failures:
            body = self.bodies[i % len(self.bodies)]
            i += 1
            started = time.perf_counter()
            try:
                conn.request("POST", "/vectors", body=body, headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                data = response.read()
                if response.status != 200:
                    self.failures.append(f"{response.status}: {data[:200]!r}")
                    continue
                self.latencies.append(time.perf_counter() - started)
                self.answers.extend(json.loads(data)["vectors"])
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        conn.close()


def load_test(port: int, words: dict[str, list[str]], clients: int, seconds: float, per_request: int) -> dict:
    items = list(words.items())
    bodies = [json.dumps({"words": [{"word": w, "contexts": cs} for w, cs in items[i:i + per_request]]}).encode()
              for i in range(0, len(items) - per_request + 1, per_request)]
    warm = Client(port, bodies[:4], 0)  # one request: every replica's first pass is not measured
    warm.run()
    started = time.perf_counter()
    deadline = time.time() + seconds
    pool = [Client(port, bodies[i::clients] or bodies[i % len(bodies):][:1], deadline) for i in range(clients)]
    for client in pool:
        client.start()
    for client in pool:
        client.join()
    elapsed = time.perf_counter() - started
    latencies = sorted(x for c in pool for x in c.latencies)
    failures = [f for c in pool for f in c.failures]
    return {"clients": clients, "per_request": per_request, "requests": len(latencies) + len(failures),
            "failed": len(failures), "failures": failures[:3], "seconds": elapsed,
            "words_per_s": len(latencies) * per_request / elapsed,
            "p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * float(np.percentile(latencies, 99)),
            "answers": {a["word"]: a["vector"] for c in pool for a in c.answers}}


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bertram", default="out/demo-s3/run/fused", help="trained BERTRAM model (%(default)s)")
    parser.add_argument("--contexts_from", default="out/demo-s3/run/preprocessed",
                        help="jobs.preprocess output the words and contexts come from (%(default)s)")
    parser.add_argument("--words", type=int, default=2048, help="number of words (%(default)s)")
    parser.add_argument("--contexts", type=int, default=2, help="contexts per word (%(default)s)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of each side: actors / replicas (%(default)s)")
    parser.add_argument("--clients", default="1,8,32", help="concurrent clients per load level (%(default)s)")
    parser.add_argument("--words_per_request", default="1", help="words per request, one load test each (%(default)s)")
    parser.add_argument("--seconds", type=float, default=20, help="seconds per load level (%(default)s)")
    parser.add_argument("--bf16", default="true", choices=["true", "false"],
                        help="bf16 autocast on both sides, where the CPU has bf16 units (%(default)s: both defaults)")
    parser.add_argument("--no_job", action="store_true", help="skip jobs.infer (server settings sweeps)")
    parser.add_argument("--serve_args", default="", help="more `bertram serve` flags, e.g. '--batch_wait_s 0.02'")
    parser.add_argument("--report", default="benchmarks/results/serve.md", help="markdown file to write")
    args = parser.parse_args(argv)

    words = choose_words(args.contexts_from, args.words, args.contexts)
    bf16 = args.bf16 == "true"
    start_up = job_s = float("nan")
    job_vectors: dict = {}
    if not args.no_job:
        with tempfile.TemporaryDirectory() as tmp:
            say(f"jobs.infer, 2 words (start-up), load {loadavg()}")
            start_up, _ = run_job(args.bertram, dict(list(words.items())[:2]), args.cpus, bf16, tmp)
            say(f"jobs.infer, {len(words)} words, load {loadavg()}")
            job_s, job_vectors = run_job(args.bertram, words, args.cpus, bf16, tmp)
    job_rate = len(words) / job_s
    steady = (len(words) - 2) / (job_s - start_up) if job_s > start_up else float("nan")

    port = free_port()
    say(f"bertram serve on 127.0.0.1:{port}, load {loadavg()}")
    process, serve_start, ready = start_server(args.bertram, port, args.cpus, bf16, args.serve_args.split())
    levels, served = [], {}
    try:
        for clients, per_request in [(int(c), int(k)) for k in args.words_per_request.split(",")
                                     for c in args.clients.split(",")]:
            say(f"{clients} clients, {per_request} words per request, for {args.seconds:.0f} s, load {loadavg()}")
            level = load_test(port, words, clients, args.seconds, per_request)
            served.update(level.pop("answers"))
            levels.append(level)
            say(f"  {level['words_per_s']:.1f} words/s, p50 {level['p50_ms']:.0f} ms, p99 {level['p99_ms']:.0f} ms, "
                f"{level['failed']} failed of {level['requests']}")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    worst = min((cosine(served[w], job_vectors[w]) for w in served if w in job_vectors), default=float("nan"))

    command = "python benchmarks/serve.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "## Serving benchmark", "",
        f"Command: `{command}`", "",
        f"Machine: {os.cpu_count()} cores, {platform.platform()}, CPU; the clients share the cores with the "
        f"server. Model `{args.bertram}`; {len(words)} words x {args.contexts} contexts from "
        f"`{args.contexts_from}`; {args.cpus} CPUs on each side; bf16 autocast {args.bf16}.", "",
        "| run | words/s | vs jobs.infer steady | p50 ms | p99 ms | failed / requests |",
        "|---|---:|---:|---:|---:|---:|",
        f"| jobs.infer, {len(words)} words end to end ({job_s:.1f} s) | {job_rate:.1f} | {job_rate / steady:.2f}x "
        "| | | |",
        f"| jobs.infer steady ({len(words)} words minus the 2-word run's {start_up:.1f} s) | {steady:.1f} | 1.00x "
        "| | | |",
    ]
    for level in levels:
        lines.append(f"| serve, {level['clients']} client{'s' if level['clients'] > 1 else ''}, "
                     f"{level['per_request']} word{'s' if level['per_request'] > 1 else ''} per request "
                     f"| {level['words_per_s']:.1f} | {level['words_per_s'] / steady:.2f}x | {level['p50_ms']:.0f} | "
                     f"{level['p99_ms']:.0f} | {level['failed']} / {level['requests']} |")
    lines += ["", f"Server start-up (process start to serving, Ray included): {serve_start:.1f} s ({ready}).",
              f"Served vectors vs jobs.infer's for the same words and contexts: min cosine {worst:.6f} over "
              f"{len(served)} words."]
    failures = [f for level in levels for f in level["failures"]]
    if failures:
        lines.append("First failures: " + "; ".join(failures[:3]))
    text = "\n".join(lines) + "\n"
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
