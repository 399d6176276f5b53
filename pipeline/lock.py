"""One run at a time on an output: a lock file (object) inside it, taken before anything is read or deleted.

`hold(output, what)` takes the lock `<output>/.bertram-lock.json` for the length of a `with`, or raises one
line naming its holder (host, pid, what it runs, since when). A lock is created so that two runs can never
both take it:

* local path: created exclusively (`O_CREAT | O_EXCL`): of two runs, one gets it;
* `s3://`: a conditional put (`If-None-Match: *`), which S3 and the S3-compatible stores that support
  conditional writes refuse when the object exists; a store that ignores it is caught by reading the lock back
  (the last writer wins, the other backs off);
* other stores (`gs://`): written if absent and read back: best effort.

A crashed run does not leave its lock stuck forever: a lock whose holder is gone is taken over, with a line
saying so. On the same host the holder is gone when its pid is not running (or runs another process: the
start time is recorded); on another host (a shared filesystem, object storage) when its heartbeat —
refreshed every `HEARTBEAT_S` by the holder — is older than `STALE_S`. Locks are re-entrant within a
process (jobs.run holds its run directory while each stage holds its own output).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pipeline import storage

LOCK = ".bertram-lock.json"
HEARTBEAT_S = 30.0
"""How often the holder refreshes its lock's heartbeat."""
STALE_S = 300.0
"""A lock from another host whose heartbeat is older than this is taken over (its holder is gone)."""

_held: dict[str, int] = {}  # lock URI -> how many times this process holds it
_guard = threading.Lock()


class OutputInUse(storage.UserError):
    """Another run holds the output's lock."""


def lock_uri(output: str) -> str:
    """Where the lock of `output` is (a local path made absolute: `out` and `./out` are one output)."""
    return storage.join(storage.absolute(output), LOCK)


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    now = _process_start(pid)
    return start is None or now is None or now == start


def _record(what: str, token: str, started: float) -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "process_start": _process_start(pid), "what": what,
            "token": token, "started_at": started, "heartbeat_at": time.time(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))}


def holder_gone(record: dict[str, Any], now: float | None = None) -> bool:
    """Whether the run that wrote `record` has ended without releasing its lock."""
    if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
        return not _alive(record["pid"], record.get("process_start"))
    beat = record.get("heartbeat_at")
    return not isinstance(beat, (int, float)) or (now or time.time()) - beat > STALE_S


def describe(record: dict[str, Any]) -> str:
    return (f"{record.get('what', 'a run')} (host {record.get('host', '?')}, pid {record.get('pid', '?')}, "
            f"started {record.get('started', '?')})")


def _read(uri: str) -> dict[str, Any] | None:
    """The lock's record; None when there is none; {} when it cannot be parsed (a half-written lock)."""
    try:
        if not storage.exists(uri):
            return None
        found = json.loads(storage.read_bytes(uri))
        return found if isinstance(found, dict) else {}
    except storage.StorageError:
        if not storage.exists(uri):
            return None
        raise
    except ValueError:
        return {}


class _Holding:
    """A lock this process took: its record, and the heartbeat thread that keeps it fresh."""

    def __init__(self, uri: str, record: dict[str, Any]):
        self.uri, self.record = uri, record
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="bertram-lock-heartbeat", daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            try:
                if (_read(self.uri) or {}).get("token") != self.record["token"]:
                    return  # taken over (we were thought gone): nothing of ours to refresh
                self.record["heartbeat_at"] = time.time()
                storage.write_bytes(self.uri, json.dumps(self.record).encode())
            except Exception:  # noqa: BLE001 - a missed heartbeat only makes the lock look older
                pass

    def release(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        try:
            if (_read(self.uri) or {}).get("token") == self.record["token"]:
                storage.delete(self.uri)
        except storage.StorageError:
            pass  # the lock stays; its holder (this pid) is gone after exit, so the next run takes it over


_holdings: dict[str, _Holding] = {}


def acquire(output: str, what: str) -> _Holding | None:
    """Take the lock of `output` (None when this process already holds it), or raise `OutputInUse`."""
    uri = lock_uri(output)
    with _guard:
        if _held.get(uri):
            _held[uri] += 1
            return None
    token, started = uuid.uuid4().hex, time.time()
    for _ in range(5):
        record = _record(what, token, started)
        if storage.write_if_absent(uri, json.dumps(record).encode()):
            if not storage.is_local(uri) and storage.scheme(uri) != "s3":
                time.sleep(0.2)  # a store without conditional writes: the last writer wins; read back
            if (_read(uri) or {}).get("token") == token:
                holding = _Holding(uri, record)
                with _guard:
                    _held[uri], _holdings[uri] = 1, holding
                return holding
            continue
        found = _read(uri)
        if found is None:
            continue  # released meanwhile: try again
        if found and not holder_gone(found):
            raise OutputInUse(f"--output {storage.redact(output)} is in use by {describe(found)}; wait for it to "
                              f"end or choose another --output (the lock {LOCK} is released when it ends, and "
                              f"taken over when its holder is gone)")
        from pipeline.console import log

        log(f"{what}: taking over the lock of {storage.redact(output)} from {describe(found) if found else 'a run'}"
            ", which is gone")
        _remove_if(uri, found)
    raise OutputInUse(f"--output {storage.redact(output)}: could not take its lock {LOCK} (other runs keep "
                      "taking it); try again")


def _remove_if(uri: str, expected: dict[str, Any]) -> None:
    """Delete the lock if it still holds `expected` (a gone holder's), so two takers do not delete each other's."""
    if storage.is_local(uri):
        path = storage.local_path(uri)
        aside = f"{path}.stale-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        try:
            os.rename(path, aside)  # atomic: only one taker moves the stale lock away
        except FileNotFoundError:
            return
        try:
            with open(aside, "rb") as f:
                moved = json.loads(f.read() or b"{}")
        except ValueError:
            moved = {}
        if expected and moved.get("token") != expected.get("token"):
            os.replace(aside, path)  # someone else's fresh lock: put it back
            return
        os.unlink(aside)
        return
    if (_read(uri) or {}).get("token") == expected.get("token"):
        storage.delete(uri)


def release(holding: _Holding | None, output: str) -> None:
    uri = lock_uri(output)
    with _guard:
        _held[uri] = _held.get(uri, 1) - 1
        if _held[uri] > 0:
            return
        _held.pop(uri, None)
        holding = _holdings.pop(uri, holding)
    if holding is not None:
        holding.release()


@contextmanager
def hold(output: str, what: str) -> Iterator[None]:
    """Hold the lock of `output` for the block (see the module's doc); a directory it had to create for the
    lock and that is still empty at the end is removed again."""
    created = storage.is_local(output) and not os.path.exists(storage.local_path(output))
    holding = acquire(output, what)
    try:
        yield
    finally:
        release(holding, output)
        if created:
            try:
                os.rmdir(storage.local_path(output))  # only when empty: what a failed check leaves
            except OSError:
                pass
