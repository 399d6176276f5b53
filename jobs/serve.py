"""Serve word vectors of a trained BERTRAM model over HTTP (Ray Serve): vectors for new words, on demand.

    bertram serve --bertram out/demo-s3/run/fused          # http://127.0.0.1:8000, until Ctrl-C
    curl -s localhost:8000/vectors -H 'Content-Type: application/json' \\
      -d '{"words": [{"word": "kumquat", "contexts": ["a kumquat is a small orange fruit .", "she ate a kumquat ."]}]}'

`POST /vectors` {"words": [{"word": w, "contexts": [...]}, ...]} answers {"vectors": [{"word": w,
"vector": [...], "contexts_used": k}, ...]} in the request's order (k: the contexts that hold the word
as a whole word; a form model needs no contexts). `GET /healthz` answers the model's mode and size.
A bad request is a 4xx with {"error": "<one line>"} and never reaches the model (pipeline/serving.py);
the limits are the `max_*` flags. The words of concurrent requests are batched on each replica
(`serve.batch`, up to --max_batch_contexts contexts per forward pass) and inferred by the function
`jobs.infer` uses (`pipeline.infer.Inferrer`): the same word and contexts give the same vector (exactly
in float32; under bf16 autocast the other words of a forward pass move it slightly, cosine >= 0.9997).

Replicas: --num_replicas, or autoscaling between --min_replicas and --max_replicas; each holds
--cpus_per_replica CPUs and --gpus_per_replica GPUs and loads the model once. Without RAY_ADDRESS a
local Ray is started and the server stops with Ctrl-C (or SIGTERM); with RAY_ADDRESS the application is
deployed on that cluster, and --detach leaves it running there (`serve shutdown` removes it). On a
cluster, `serve deploy cluster/serve.yaml` deploys the same application from a config file
(`build`); callers inside the cluster use the handle:
`await serve.get_app_handle("bertram").vectors.remote({"words": [...]})`.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ray import serve

from pipeline import storage
from pipeline.config import ConfigError, build as build_config
from pipeline.console import log
from pipeline.serving import BadRequest, Limits, answer, read_request, read_words, too_large

APP = "bertram"


@dataclass(kw_only=True)
class ServeSettings(Limits):
    """What a replica needs: the model, how to run it, how to batch, and the request limits."""

    bertram: str
    """URI of a trained BERTRAM model (jobs.train or jobs.fuse output: local directory, s3://, gs://)."""
    max_batch_contexts: int = 64
    """Most contexts in one server-side batch (words of concurrent requests inferred in one forward pass)."""
    batch_wait_s: float = 0.01
    """How long a replica waits for more words before it runs a batch that is not full."""
    max_ongoing_requests: int = 64
    """Requests a replica takes at once (the rest wait in Serve's queue); batches form from these."""
    max_seq_length: int = 128
    """Tokens per encoder input; a longer context is cut around the word (as jobs.infer)."""
    max_contexts_per_chunk: int = 32
    """A word with more contexts is inferred in chunks of this many (as jobs.infer)."""
    bf16: bool = True
    """Run the model under bf16 autocast on a GPU or a CPU with bf16 units (as jobs.infer; ~2x faster on such a CPU);
    vectors are float32. Under bf16 a vector moves a little with its batch mates (cosine >= 0.9997); false: exact."""
    cpus_per_replica: float = 1
    """CPUs of each replica (its intra-op threads)."""
    gpus_per_replica: float = 0
    """GPUs of each replica (1: the model runs there; a fraction shares a GPU between replicas)."""
    num_replicas: int = 1
    """Replicas (each loads the model once); ignored when --max_replicas turns autoscaling on."""
    min_replicas: int = 1
    """With --max_replicas: the fewest replicas autoscaling keeps."""
    max_replicas: int | None = None
    """Autoscale between --min_replicas and this many replicas on ongoing requests per replica."""
    target_ongoing_requests: float = 16
    """With autoscaling: the ongoing requests per replica it aims at."""

    def __post_init__(self) -> None:
        if not self.bertram:
            raise ConfigError("--bertram is empty; give the URI of a trained BERTRAM model (e.g. <run>/fused)")
        try:
            super().__post_init__()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        for name in ("max_batch_contexts", "max_ongoing_requests", "max_seq_length", "max_contexts_per_chunk",
                     "num_replicas", "min_replicas"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.max_seq_length < 8:
            raise ConfigError(f"--max_seq_length must be >= 8, got {self.max_seq_length}")
        if self.max_batch_contexts < self.max_contexts_per_word:
            raise ConfigError(f"--max_batch_contexts {self.max_batch_contexts} is below --max_contexts_per_word "
                              f"{self.max_contexts_per_word}: one word's contexts must fit in a batch")
        if self.batch_wait_s < 0 or self.cpus_per_replica <= 0 or self.gpus_per_replica < 0:
            raise ConfigError("--batch_wait_s and --gpus_per_replica must be >= 0, --cpus_per_replica > 0")
        if self.max_replicas is not None and not 1 <= self.min_replicas <= self.max_replicas:
            raise ConfigError(f"autoscaling needs 1 <= --min_replicas <= --max_replicas, got {self.min_replicas} "
                              f"and {self.max_replicas}")
        if self.target_ongoing_requests <= 0:
            raise ConfigError(f"--target_ongoing_requests must be > 0, got {self.target_ongoing_requests}")

    @property
    def limits(self) -> Limits:
        return Limits(**{k: getattr(self, k) for k in Limits.__dataclass_fields__})


@dataclass(kw_only=True)
class ServeConfig(ServeSettings):
    """Serve vectors of a trained BERTRAM model over HTTP (Ray Serve)."""

    host: str = "127.0.0.1"
    """Address the HTTP proxy listens on (0.0.0.0: every interface)."""
    port: int = 8000
    """Port of the HTTP proxy."""
    route_prefix: str = "/"
    """Path the application answers under (/ gives /vectors and /healthz)."""
    name: str = APP
    """Name of the Serve application (serve.get_app_handle(name) in the cluster)."""
    detach: bool = False
    """With RAY_ADDRESS: deploy on the cluster and return, leaving the application running."""
    num_cpus: int | None = None
    """CPUs of a local Ray (ignored when attaching to a cluster through RAY_ADDRESS)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be 1..65535, got {self.port}")
        if not self.route_prefix.startswith("/"):
            raise ConfigError(f"--route_prefix must start with /, got {self.route_prefix!r}")


def settings_of(config: ServeSettings) -> dict:
    """The ServeSettings fields of a config (what each replica is built from)."""
    return {k: getattr(config, k) for k in ServeSettings.__dataclass_fields__}


# ---------------------------------------------------------------------------------------
# The replica


def _json(content: dict, status: int = 200):
    from starlette.responses import JSONResponse

    return JSONResponse(content, status_code=status)


def _contexts_in(pairs: list) -> int:
    """A server batch's size: its contexts (a word without any counts one), as jobs.infer packs passes."""
    return sum(max(len(contexts), 1) for _, contexts in pairs)


@serve.deployment(name="VectorServer", health_check_period_s=10, health_check_timeout_s=60,
                  graceful_shutdown_timeout_s=20)
class VectorServer:
    """A Serve replica: the model loaded once (an `Inferrer`), HTTP requests read by pipeline/serving.py, the
    words of concurrent requests batched into forward passes run off the event loop (one at a time)."""

    def __init__(self, settings: dict):
        from pipeline.infer import Inferrer
        from pipeline.model import uses_context, uses_form

        self.settings = ServeSettings(**settings)
        s = self.settings
        self.limits = s.limits
        device = "cuda" if s.gpus_per_replica > 0 else "cpu"
        try:
            with storage.secrets_scrubbed():
                self.inferrer = Inferrer(s.bertram, device, s.bf16, threads=max(1, int(s.cpus_per_replica)),
                                         batch_contexts=s.max_batch_contexts,
                                         max_contexts_per_chunk=s.max_contexts_per_chunk,
                                         max_seq_length=s.max_seq_length)
        except Exception as exc:  # noqa: BLE001 - one line in Serve's status and logs, no credentials
            raise RuntimeError(f"cannot load --bertram {storage.redact(s.bertram)}: "
                               f"{storage.scrub(str(exc)).strip().splitlines()[-1]}") from None
        config = self.inferrer.model.config
        self.mode = config.mode
        self.needs_contexts = uses_context(config.mode) and not uses_form(config.mode)
        self.reads_contexts = uses_context(config.mode)
        self.info = {"status": "ok", "model": storage.redact(s.bertram), "mode": config.mode,
                     "dim": config.output_size, "base_model": storage.redact(config.base_model),
                     "replica": serve.get_replica_context().replica_tag}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="bertram-infer")  # the model runs off the event loop
        self._batched.set_max_batch_size(s.max_batch_contexts)
        self._batched.set_batch_wait_timeout_s(s.batch_wait_s)

    async def __call__(self, request):
        """HTTP: POST /vectors, GET /healthz; anything else a 404/405 with one line."""
        path = request.url.path[len(request.scope.get("root_path", "")):].rstrip("/") or "/"
        try:
            if path == "/healthz":
                if request.method != "GET":
                    raise BadRequest(f"{request.method} /healthz: use GET", status=405)
                return _json(self.info)
            if path != "/vectors":
                raise BadRequest(f"no {path}: POST /vectors (the vectors of words) or GET /healthz", status=404)
            if request.method != "POST":
                raise BadRequest(f"{request.method} /vectors: use POST with a JSON body", status=405)
            items = read_request(await self._body(request), self.limits, self.needs_contexts,
                                 self.reads_contexts)
        except BadRequest as exc:
            return _json({"error": str(exc)}, exc.status)
        return _json(answer(items, await self._infer(items)))

    async def vectors(self, request: dict) -> dict:
        """The Python handle's call: `request` as the JSON body of POST /vectors, the answer as its JSON; a bad
        request raises BadRequest (a ValueError's kin: storage.UserError) with the HTTP answer's line."""
        items = read_words(request, self.limits, self.needs_contexts, self.reads_contexts)
        return answer(items, await self._infer(items))

    async def _body(self, request) -> bytes:
        limit = self.limits.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large(int(declared), self.limits)
        body = bytearray()
        async for chunk in request.stream():  # read up to the limit, never the whole of a huge body
            body += chunk
            if len(body) > limit:
                raise too_large(None, self.limits)
        return bytes(body)

    async def _infer(self, items: list[tuple[str, list[str], int]]):
        import numpy as np

        vectors = await asyncio.gather(*(self._batched((word, usable)) for word, usable, _ in items))
        return np.stack(vectors)  # (N, D)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.01, batch_size_fn=_contexts_in)
    async def _batched(self, pairs: list[tuple[str, list[str]]]) -> list:
        """One forward pass (or a few) for the words of the requests waiting now (`serve.batch`)."""
        loop = asyncio.get_running_loop()
        vectors = await loop.run_in_executor(self.pool, self.inferrer, pairs)  # (N, D)
        return list(vectors.numpy())

    def check_health(self) -> None:
        """Serve's periodic health check: the replica answers when its model is loaded (its constructor ran)."""


def application(config: ServeSettings):
    """The Serve application (a bound deployment) serving `config`'s model with its replicas and limits."""
    options = dict(max_ongoing_requests=config.max_ongoing_requests,
                   ray_actor_options={"num_cpus": config.cpus_per_replica, "num_gpus": config.gpus_per_replica})
    if config.max_replicas is not None:
        options["autoscaling_config"] = {"min_replicas": config.min_replicas, "max_replicas": config.max_replicas,
                                         "target_ongoing_requests": config.target_ongoing_requests}
    else:
        options["num_replicas"] = config.num_replicas
    return VectorServer.options(**options).bind(settings_of(config))


def build(args: dict):
    """The application builder of `serve deploy` / `serve run jobs.serve:build bertram=URI` (cluster/serve.yaml):
    `args` are ServeSettings' fields; the model is checked before any replica starts."""
    from pipeline.model import saved_config

    config = build_config(ServeSettings, dict(args))
    saved_config(config.bertram)
    return application(config)


# ---------------------------------------------------------------------------------------
# The command


def _port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}; choose another --port (or "
                              "--host)") from None


def _deployment_error(exc: Exception, name: str) -> ConfigError:
    """One line for a failed deployment: the replica's own RuntimeError line (e.g. "cannot load --bertram ...")
    from Serve's status, where serve.run's exception says only that the deployment failed."""
    texts = [str(exc)]
    try:
        texts += [d.message for d in serve.status().applications[name].deployments.values()]
    except Exception:  # noqa: BLE001 - the status is a better line when there is one, not a condition
        pass
    lines = [ln.strip() for text in texts for ln in storage.scrub(text).splitlines() if ln.strip()]
    cause = next((ln.partition("RuntimeError: ")[2] for ln in reversed(lines) if "RuntimeError: " in ln
                  and not ln.endswith("RuntimeError: Traceback (most recent call last):")),
                 lines[0] if lines else type(exc).__name__)
    return ConfigError(f"the deployment failed: {cause}")


def serve_model(config: ServeConfig) -> None:
    """Check the model, start Serve, deploy the application and serve until stopped (or return: --detach)."""
    from jobs.common import connect_ray
    from pipeline.model import saved_config

    local = not os.environ.get("RAY_ADDRESS")
    if config.detach and local:
        raise ConfigError("--detach needs a Ray cluster (RAY_ADDRESS, as in a `ray job submit` job): a local Ray "
                          "ends with this command")
    model = saved_config(config.bertram)  # one line before Ray starts: no model, a damaged one
    if local:
        _port_free(config.host, config.port)
    connect_ray(config.num_cpus)
    started = time.time()
    serve.start(http_options={"host": config.host, "port": config.port})
    try:
        serve.run(application(config), name=config.name, route_prefix=config.route_prefix, blocking=False)
    except RuntimeError as exc:
        raise _deployment_error(exc, config.name) from None
    where = f"http://{config.host}:{config.port}{config.route_prefix.rstrip('/')}"
    replicas = (f"{config.min_replicas}..{config.max_replicas} replicas" if config.max_replicas is not None
                else f"{config.num_replicas} replica{'s' if config.num_replicas > 1 else ''}")
    log(f"serve: {model['mode']} model {storage.redact(config.bertram)} ({replicas}, ready in "
        f"{time.time() - started:.1f} s) on {where}: POST {where}/vectors, GET {where}/healthz")
    if config.detach:
        log(f"serve: left running on the cluster as application {config.name!r}; `serve shutdown` removes it")
        return
    log("serve: Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (jobs.common.Stopped)
        log("serve: stopping")
        serve.shutdown()
        log("serve: stopped")


def main() -> None:
    from jobs.common import main as job_main

    job_main(ServeConfig, serve_model, __doc__, "serve")


if __name__ == "__main__":
    main()
