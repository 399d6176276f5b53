"""What a person sees when a job runs: a readable console, and the full log behind it.

A job run from the command line (`jobs.common.main`) holds a console session: everything
the process writes to its stdout and stderr — our lines, Python warnings, Ray's own
logging, the lines Ray forwards from every worker, C++ log lines — goes through one pipe
into a reader thread, which writes every line to the full log file and passes to the
terminal only what a person acts on:

* our lines (`[HH:MM:SS] stage: ...`, `error: ...`) and the training loop's `[train] ...`
  lines, the latter without Ray's `(RayTrainWorker pid=...)` prefix;
* a Python traceback of the driver (an unexpected failure is never hidden);
* nothing twice in a row.

Ray's internals, credential-provider chatter, deprecation warnings, weight-loading bars
and per-report dumps stay in the log file. `--verbose` (or BERTRAM_VERBOSE=1) passes
every line through. Progress of the long steps is a tqdm bar when the terminal is a
TTY, else a line every PROGRESS_EVERY_S seconds with the rate and the ETA (`progress`).

The log file: `<output>/logs/<job>-<UTC time>.log` for a jobs.run with a local --output;
otherwise `$BERTRAM_LOG_DIR` (default `.cache/logs/`) — and a jobs.run with a remote
--output uploads it to `<output>/logs/` when it ends. A job started in the same second as
another gets its own file: `-2`, `-3`, ... after the time. The run's last console line says
where it is (not after a one-line user error).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import IO, TypeVar

T = TypeVar("T")

PROGRESS_EVERY_S = 10.0
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_WORKER_PREFIX = re.compile(r"^\((?P<who>.+?) pid=\d+(?:, ip=[\d.]+)?\)\s?(?P<line>.*?)"
                            r"(?:\s*\[repeated \d+x across cluster\])?$")
_OURS = re.compile(r"^(\[\d\d:\d\d:\d\d\] |\[train\] |error: )")
_VERBATIM = "\x1e"  # marks a `say` line in the pipe
_active: _Session | None = None


def log(message: str) -> None:
    """One line of a job: `[HH:MM:SS] stage: ...` on stderr (the console session passes it to the terminal)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def scrub(line: str) -> str:
    """A log line without secrets (`pipeline.storage.scrub`)."""
    from pipeline import storage

    return storage.scrub(line)


def for_console(line: str) -> str | None:
    """What the terminal shows of one output line (ANSI codes stripped), or None to keep it in the log only."""
    line = _ANSI.sub("", line).rstrip()
    worker = _WORKER_PREFIX.match(line)
    if worker:  # a line a Ray worker printed: without Ray's prefix
        line = worker.group("line")
    return line if _OURS.match(line) else None


class _Session:
    """The fd-level capture of one process's output (see the module docstring)."""

    def __init__(self, log_path: str, verbose: bool):
        os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
        self.verbose = verbose
        self.log_path, self.log = _create_log(log_path)
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = (os.dup(1), os.dup(2))
        self.terminal: IO[str] = os.fdopen(os.dup(self._saved[1]), "w", encoding="utf-8", errors="replace",
                                           buffering=1)
        self.tty = self.terminal.isatty()
        read_end, self._write_end = os.pipe()
        os.dup2(self._write_end, 1)
        os.dup2(self._write_end, 2)
        sys.stdout.reconfigure(line_buffering=True)
        sys.stderr.reconfigure(line_buffering=True)
        self._lock = threading.Lock()
        self._bar = None
        self._last: str | None = None
        self._in_traceback = False
        self._held: list[str] = []  # traceback lines printed by the libraries, shown when the session ends
        self._sentinel = f"--bertram-console-end-{os.getpid()}-{time.time_ns()}--"
        self._reader = threading.Thread(target=self._read, args=(read_end,), name="bertram-console", daemon=True)
        self._reader.start()

    def _read(self, fd: int) -> None:
        with os.fdopen(fd, "rb") as pipe:
            for raw in pipe:
                text = raw.decode("utf-8", errors="replace").rstrip("\n")
                if text == self._sentinel:
                    return
                text = scrub(text.rsplit("\r", 1)[-1] if "\r" in text.rstrip("\r") else text.rstrip("\r"))
                verbatim = text.startswith(_VERBATIM)
                text = text.removeprefix(_VERBATIM)
                self.log.write(text + "\n")
                self.show(text, raw=not verbatim)

    def show(self, text: str, raw: bool = False) -> None:
        """Write a line to the terminal (raw: an output line, filtered unless verbose)."""
        if raw and not self.verbose:
            shown = self._filter(text)
            if shown is None:
                return
        else:
            shown = _ANSI.sub("", text).rstrip() if raw else text
        if shown == self._last:
            return
        self._last = shown
        with self._lock:
            if self._bar is not None:
                self._bar.clear()
            self.terminal.write(shown + "\n")
            if self._bar is not None:
                self._bar.refresh()

    def _filter(self, text: str) -> str | None:
        plain = _ANSI.sub("", text).rstrip()
        if plain.startswith("Traceback (most recent call last):"):
            self._in_traceback = True
        if self._in_traceback:  # a traceback Ray or a library logged, up to its exception line
            if not plain.startswith((" ", "\t", "Traceback (most recent call last):")) and plain:
                self._in_traceback = plain.startswith(("During handling", "The above exception"))
            self._held.append(plain)  # shown at the end, unless the run ends with a user's error
            return None
        return for_console(text)

    def close(self, show_held: bool = True, last_line: str | None = None) -> None:
        """End the capture. `show_held`: the tracebacks logged during the run go to the terminal now (the
        run failed unexpectedly, or survived a failure); not after a user's error, whose one line says it all."""
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        os.write(self._write_end, f"\n{self._sentinel}\n".encode())
        self._reader.join(timeout=10)
        if show_held and self._held:
            self.terminal.write("\n".join(self._held[-200:]) + "\n")
        if last_line:
            self.log.write(last_line + "\n")
            self.terminal.write(last_line + "\n")
        os.close(self._write_end)
        for fd in self._saved:
            os.close(fd)
        self.log.close()
        self.terminal.close()


def _create_log(path: str) -> tuple[str, IO[str]]:
    """A new log file at `path`, or at `<path stem>-2.log`, `-3`, ... when another job took that name (one started
    in the same second): created exclusively, so no two jobs ever write to one file."""
    stem, suffix = os.path.splitext(path)
    candidate, n = path, 1
    while True:
        try:
            return candidate, open(candidate, "x", encoding="utf-8", buffering=1)
        except FileExistsError:
            n += 1
            candidate = f"{stem}-{n}{suffix}"


def say(text: str) -> None:
    """A line exactly as given (no time stamp, never filtered): what a user copies, like a code snippet.
    In a session it travels the pipe like every other line, marked, so that the order stays."""
    print((_VERBATIM if _active is not None else "") + text, file=sys.stderr, flush=True)


def literal(value: str) -> str:
    """`value` as a Python string literal, for a snippet a user copies and runs: repr's escapes (quotes,
    backslashes, line breaks, unprintable characters), so a word or a path is always one string and never code;
    in double quotes when it holds no quote."""
    text = repr(value)
    return f'"{text[1:-1]}"' if text[0] == "'" and "'" not in value and '"' not in value else text


def log_path(job: str, run_output: str | None = None) -> str:
    """Where the full log of this job goes (see the module docstring; `_create_log` makes the name unique)."""
    from pipeline import storage

    name = f"{job}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.log"
    if run_output and storage.is_local(run_output):
        return os.path.join(storage.local_path(run_output), "logs", name)
    return os.path.join(os.environ.get("BERTRAM_LOG_DIR", os.path.join(".cache", "logs")), name)


@contextlib.contextmanager
def session(job: str, run_output: str | None = None, verbose: bool = False) -> Iterator[str]:
    """Hold the console for the job; yields the log file's path. Uploads it to `<run_output>/logs/` at the end
    when that is remote."""
    global _active
    from pipeline import storage

    verbose = verbose or os.environ.get("BERTRAM_VERBOSE", "") not in ("", "0", "false")
    _active = _Session(log_path(job, run_output), verbose)
    path = _active.log_path  # (the name a job started in the same second took has -2, -3, ... added)
    remote = storage.join(run_output, "logs", os.path.basename(path)) \
        if run_output and not storage.is_local(run_output) else None
    failed_by_user = False
    ray_was_up = _ray_is_up()  # a Ray this session did not start (a notebook's, a test's) is left running
    try:
        yield path
    except (storage.UserError, SystemExit) as exc:  # one line says what to fix: no more lines around it
        failed_by_user = isinstance(exc, storage.UserError) or exc.code in (2, 130, 143)  # 130, 143: Ctrl-C, SIGTERM
        raise
    finally:
        if not ray_was_up:
            _shutdown_ray()
        last = None
        if not failed_by_user:
            where = path if remote is None else f"{path} (and {storage.local_copy(remote) or storage.redact(remote)})"
            last = f"[{time.strftime('%H:%M:%S')}] full log: {where}" + \
                ("" if verbose else " (--verbose shows all of it here)")
        active, _active = _active, None
        active.close(show_held=not failed_by_user, last_line=last)
        if remote is not None:
            try:
                with open(path, "rb") as f:
                    storage.write_bytes(remote, f.read())
            except Exception as exc:  # noqa: BLE001 - the log is a copy: say so, never fail a run for it
                print(f"warning: the log stays at {path}; uploading it to {storage.redact(remote)} failed: "
                      f"{scrub(str(exc).splitlines()[0][:200]) if str(exc) else type(exc).__name__}",
                      file=sys.stderr, flush=True)


def _ray_is_up() -> bool:
    if "ray" not in sys.modules:
        return False
    import ray

    return ray.is_initialized()


def _shutdown_ray() -> None:
    """Stop a local Ray inside the session, so that its last lines go to the log too."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            with contextlib.suppress(Exception):
                ray.shutdown()


def progress(items: Iterable[T], total: int, unit: str, desc: str, count=lambda item: 1) -> Iterator[T]:
    """Yield `items`, showing how many `unit`s of `total` are done, the rate and the ETA: a tqdm bar on a
    terminal, a line every PROGRESS_EVERY_S seconds otherwise (and in the log). `count(item)` is an
    item's units."""
    bar = None
    active = _active
    if active is not None and active.tty and not active.verbose:
        from tqdm import tqdm

        bar = tqdm(total=total, unit=f" {unit}", desc=desc, file=active.terminal, leave=False,
                   dynamic_ncols=True, mininterval=0.5, unit_scale=total > 10_000)
        active._bar = bar
    done, t0 = 0, time.time()
    last = t0
    try:
        for item in items:
            n = count(item)
            done += n
            now = time.time()
            if bar is not None:
                with active._lock:
                    bar.update(n)
            if now - last >= PROGRESS_EVERY_S and done < total:
                last = now
                line = f"{desc}: {format_progress(done, total, now - t0, unit)}"
                if bar is None:
                    log(line)
                else:
                    active.log.write(line + "\n")
            yield item
    finally:
        if bar is not None:
            with active._lock:
                active._bar = None
                bar.close()


def format_progress(done: int, total: int, seconds: float, unit: str) -> str:
    """`12,480/46,720 contexts (27%), 236/s, ETA 2m25s`."""
    total = max(total, done)  # (a stream may hold more items than planned: never "110%")
    rate = done / max(seconds, 1e-9)
    eta = (total - done) / rate if rate > 0 else float("inf")
    share = f" ({100 * done / total:.0f}%)" if total else ""
    return f"{done:,}/{total:,} {unit}{share}, {rate:,.1f}/s, ETA {_duration(eta)}"


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
