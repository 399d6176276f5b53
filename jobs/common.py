"""What every job shares: connecting to Ray and turning user errors into one clear line."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import TypeVar

from pipeline import manifest, storage
from pipeline.config import ConfigError, parse
from pipeline.storage import UserError

T = TypeVar("T")


def connect_ray(num_cpus: int | None = None) -> None:
    """Attach to the cluster in RAY_ADDRESS, or start a local Ray in-process.

    `num_cpus` only applies to a local Ray (a cluster has its own resources). Progress
    bars are switched off under CI, where they would flood the log.
    """
    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=True)
        else:
            # address="local": never attach to a `ray start` head that happens to run on this machine
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
            # Warm the local workers while the driver plans: their first task would
            # otherwise spend ~1 s importing Arrow and the pipeline.
            warm_up = ray.remote(_warm_up)
            for _ in range(int(ray.cluster_resources().get("CPU", 1))):
                warm_up.remote()
    from ray.data import DataContext

    ctx = DataContext.get_current()
    # Our data steps are single map operators whose outputs are small or go to storage;
    # Ray Data's per-operator resource reservation only throttles them (measured on 2
    # CPUs: ~1 task at a time with it, 1.8x more throughput without).
    ctx.op_resource_reservation_enabled = False
    if os.environ.get("CI"):
        ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def _warm_up() -> None:
    import pipeline.contexts  # noqa: F401
    import pipeline.vocab  # noqa: F401


def complete_input(flag: str, uri: str, job: str) -> dict:
    """The manifest of a stage output a job reads, or one line naming the flag and the job to run first."""
    if not manifest.is_complete(uri):
        raise ConfigError(f"{flag} {storage.redact(uri)} holds no complete {job} output (manifest.json "
                          f"missing); run {job} first")
    return manifest.read(uri)


def read_word_set(uri: str, flag: str) -> set[str]:
    """The words of a words file (one per line), or one line saying it holds none."""
    words = {w.strip() for w in storage.read_text(uri).splitlines() if w.strip()}
    if not words:
        raise ConfigError(f"{flag} {storage.redact(uri)} holds no words; give one word per line")
    return words


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(config_cls: type[T], run: Callable[[T], object], doc: str, prog: str,
         argv: list[str] | None = None) -> None:
    """Parse the config, run the job, and map user errors to one line + exit status 2."""
    try:
        config = parse(config_cls, argv, prog=prog, description=doc)
        run(config)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
