"""What every job shares: connecting to Ray and turning user errors into one clear line."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

from pipeline import console, manifest, storage
from pipeline.config import BOOL_WORDS, ConfigError, parse
from pipeline.storage import UserError, os_error_in

T = TypeVar("T")
# Set for the driver and (inherited, or propagated by Ray Train) its workers unless the user set them:
# Ray Train's print patch tees every print of a worker twice into the driver's output; the weight-loading
# bars of transformers are one more line per model load in every worker.
QUIET_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def connect_ray(num_cpus: int | None = None) -> None:
    """Attach to the cluster in RAY_ADDRESS, or start a local Ray in-process.

    `num_cpus` only applies to a local Ray (a cluster has its own resources). Progress
    bars are switched off under CI, where they would flood the log.
    """
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
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
        _stop_on_sigterm()  # ray.init installed its own handler (exit 1, or an abort mid-training)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    # Our data steps are single map operators whose outputs are small or go to storage;
    # Ray Data's per-operator resource reservation only throttles them (measured on 2
    # CPUs: ~1 task at a time with it, 1.8x more throughput without).
    ctx.op_resource_reservation_enabled = False
    if os.environ.get("CI"):
        ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # A UserError raised in a data task (a corrupt corpus file) reaches the driver as itself, so that
    # `main` prints its one line; Ray's UserCodeException wrapper would drop it.
    ctx.raise_original_map_exception = True


def _warm_up() -> None:
    import pipeline.contexts  # noqa: F401
    import pipeline.vocab  # noqa: F401


class Stopped(KeyboardInterrupt):
    """SIGTERM reached the job's driver: `ray job stop`, a pod's eviction, a spot node's preemption.

    A KeyboardInterrupt: no `except Exception` on the way swallows it, and Ray's blocking calls (`ray.get`,
    Ray Train's `fit`), which look for signals only to raise a KeyboardInterrupt, give it up. It unwinds the
    stage (its output lock is released; its output holds no manifest) and `main` says it in one line."""


_STOPPED_EXIT = 128 + signal.SIGTERM  # 143: what a shell reports for a process ended by SIGTERM
_in_main = False  # a job's command line is running (not a test, not a notebook): SIGTERM is ours to handle
_stopped_by: int | None = None  # the signal that stopped the job (Ray may re-raise a plain KeyboardInterrupt)


def _on_sigterm(signum, frame) -> None:
    global _stopped_by
    _stopped_by = signum
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Stopped()


def _stop_on_sigterm() -> None:
    if _in_main and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def complete_input(flag: str, uri: str, job: str) -> dict:
    """The manifest of a stage output a job reads, or one line naming the flag and the job to run first
    (also when the output is another stage's: `--preprocessed <a targets output>`)."""
    if not manifest.is_complete(uri):
        raise ConfigError(f"{flag} {storage.redact(uri)} holds no complete {job} output (manifest.json "
                          f"missing); run {job} first")
    found = manifest.read(uri)
    stage = str(found.get("stage", "")) if isinstance(found, dict) else ""
    if stage != job.removeprefix("jobs."):
        raise ConfigError(f"{flag} {storage.redact(uri)} is {'a ' + stage if stage else 'not a stage'} output, not "
                          f"a {job} output; give the --output of {job}")
    return found


def _pop_verbose(argv: list[str]) -> tuple[list[str], bool]:
    """argv without `--verbose [true|false]` / `--verbose=...`, and its value."""
    words = BOOL_WORDS
    rest, verbose, i = [], False, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--verbose":
            verbose = True
            if i + 1 < len(argv) and argv[i + 1].lower() in words:
                verbose = words[argv[i + 1].lower()]
                i += 1
        elif arg.startswith("--verbose="):
            verbose = words.get(arg.partition("=")[2].lower(), True)
        else:
            rest.append(arg)
        i += 1
    return rest, verbose


def main(config_cls: type[T], run: Callable[[T], object], doc: str, prog: str,
         argv: list[str] | None = None, log_under_output: bool = False,
         section: Callable[[dict], str] | None = None) -> None:
    """Parse the config, run the job in a console session (pipeline/console.py), and map user errors to one
    line + exit status 2. `log_under_output`: the full log goes to `<output>/logs/` (jobs.run)."""
    global _in_main
    argv, verbose = _pop_verbose(list(sys.argv[1:] if argv is None else argv))
    try:
        config = parse(config_cls, argv, prog=prog, description=doc, section=section)
        storage.network_timeouts()  # a bad BERTRAM_NETWORK_TIMEOUT: refused before any work
    except UserError as exc:
        _user_error(exc)
    _in_main = True
    _stop_on_sigterm()
    with console.session(prog.split(".")[-1], getattr(config, "output", None) if log_under_output else None,
                         verbose):
        try:
            run(config)
        except KeyboardInterrupt:
            if _stopped_by is None:
                print(f"error: {prog.split('.')[-1]} interrupted (Ctrl-C); complete outputs are kept and the "
                      "interrupted one holds no manifest: run the same command again to go on", file=sys.stderr,
                      flush=True)
                raise SystemExit(128 + signal.SIGINT) from None
            print(f"error: {prog.split('.')[-1]} stopped by SIGTERM (ray job stop, an eviction, a preemption); "
                  "complete outputs are kept and the stopped one holds no manifest: run the same command again "
                  "to go on (training resumes from its last checkpoint)", file=sys.stderr, flush=True)
            raise SystemExit(_STOPPED_EXIT) from None
        except Exception as exc:  # noqa: BLE001 - a user's error raised inside a Ray task arrives wrapped
            cause = user_error_in(exc) or os_error_in(exc, getattr(config, "output", None))
            if cause is None:
                raise
            _user_error(cause)  # inside the session: the line is in the log too


def user_error_in(exc: BaseException) -> UserError | None:
    """The UserError that caused `exc`, unwrapped from Ray's task errors (whose text holds the remote
    traceback), or None for an unexpected failure."""
    import ray.exceptions

    found, seen = None, set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, UserError) and not isinstance(exc, ray.exceptions.RayError):
            found = exc  # the innermost one wins
        exc = getattr(exc, "cause", None) if isinstance(exc, ray.exceptions.RayTaskError) \
            else (exc.__cause__ or exc.__context__)
    return found


def _user_error(exc: UserError) -> None:
    from pipeline.storage import scrub

    print(f"error: {scrub(str(exc))}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None
