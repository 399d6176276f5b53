"""One place that turns a URI into readers, writers and a filesystem.

Every input and output of the pipeline is a URI:

* a local path (`data/corpus`, `/abs/path`, `file:///abs/path`);
* `s3://bucket/key` — AWS S3, or any S3-compatible store when `AWS_ENDPOINT_URL`
  (or `AWS_ENDPOINT_URL_S3`) names its endpoint, e.g. `http://127.0.0.1:9000`;
* `gs://bucket/key` — Google Cloud Storage;
* `http://` / `https://` — read only.

Credentials come from the standard provider chains (environment, config files,
instance roles) and never appear in messages: `redact()` strips them from URIs. Nor do they
reach Ray's own files: what this module raises holds no raw cause, `secrets_scrubbed()` guards
the functions that run in Ray tasks, and corpus splits travel without their URIs'
credentials (pipeline/corpus.py `split_rows`).

Every network read and write has connect and read timeouts (`network_timeouts()`,
`BERTRAM_NETWORK_TIMEOUT`): a server that stops answering fails the job with one line.

Streaming reads go through `smart_open`, which decompresses `.gz`, `.bz2` and `.zst`
transparently; Ray Data and Ray Train get a `pyarrow.fs.FileSystem` from `filesystem()`.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import math
import os
import posixpath
import re
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

COMPRESSED_SUFFIXES = (".gz", ".bz2", ".zst")
_GLOB_CHARS = re.compile(r"[*?\[]")


class UserError(Exception):
    """An error the user can fix; jobs print its message as one line and exit with status 2."""


class ConfigError(UserError):
    """A config value, flag or input that is wrong; the message names the field and the fix (pipeline.config)."""


class StorageError(UserError):
    """A URI that cannot be read or written: missing, unreachable, or not allowed."""


@dataclass(frozen=True)
class FileInfo:
    """A file found under a URI: its full URI and size in bytes."""

    uri: str
    size: int


def scheme(uri: str) -> str:
    """`''` for local paths, else the lower-case URI scheme (`s3`, `gs`, `http`, ...)."""
    parsed = urlsplit(uri)
    # A Windows drive letter or a bare path has no real scheme.
    return parsed.scheme.lower() if len(parsed.scheme) > 1 else ""


def is_local(uri: str) -> bool:
    return scheme(uri) in ("", "file")


def local_path(uri: str) -> str:
    """The filesystem path of a local URI (`file://` stripped)."""
    return urlsplit(uri).path if scheme(uri) == "file" else uri


def absolute(uri: str) -> str:
    """`uri` with a local path made absolute: what Ray workers, whose working directory differs, can open."""
    return os.path.abspath(local_path(uri)) if is_local(uri) else uri


def redact(uri: str) -> str:
    """The URI without user:password@ or query-string secrets, safe to print and to store."""
    parsed = urlsplit(uri)
    if not parsed.scheme or (not parsed.username and not parsed.query):
        return uri
    host = parsed.hostname or ""
    if parsed.port:
        host = f"{host}:{parsed.port}"
    return urlunsplit((parsed.scheme, host, parsed.path, "", ""))


# Secrets as they appear in text: a URL's user:password@ (with or without its scheme: Arrow and
# botocore quote paths without it), a presigned URL's signature, and the values of the
# credential variables of the environment.
_SECRET_URL = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/\s:@]+:[^/\s@]+@", re.IGNORECASE)
_SECRET_USERINFO = re.compile(r"(?<![\w:/.@-])[\w.~%+-]+:[^/\s@'\"]+@(?=[\w.-]+(?:[/:]|\b))")
_SECRET_QUERY = re.compile(r"(?P<key>(X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature|sig|"
                           r"token|access_token|AWSAccessKeyId|Expires|X-Goog-Signature|X-Goog-Credential)=)"
                           r"[^&\s\"']+", re.IGNORECASE)
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "HF_TOKEN",
              "HUGGING_FACE_HUB_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS_JSON", "AZURE_STORAGE_KEY",
              "RAY_JOB_HEADERS")


def scrub(text: str) -> str:
    """`text` without secrets: URL credentials and signatures, and the values of the environment's
    credential variables (`SECRET_ENV`, values of 12+ characters). What every log line, error line and written record goes through."""
    text = _SECRET_URL.sub(r"\g<scheme>REDACTED@", text)
    text = _SECRET_USERINFO.sub("REDACTED@", text)
    text = _SECRET_QUERY.sub(r"\g<key>REDACTED", text)
    for name in SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= 12 and value in text:  # real keys are 20-40+ characters; short test values are not secrets
            text = text.replace(value, "REDACTED")
    return text


@contextmanager
def secrets_scrubbed() -> Iterator[None]:
    """Re-raise what the block raises without the secrets its text, or the text of its causes, holds.

    For code that runs in Ray tasks: Ray writes a task's error, traceback and causes included, into its
    own log files (`logs/ray-data/` of the session: world-readable), which `scrub` never sees. A
    UserError keeps its class (the job still prints its one line); any other error becomes a
    RuntimeError holding its scrubbed traceback.
    """
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - every error a task raises reaches Ray's logs
        text = "".join(traceback.format_exception(exc))
        if scrub(text) == text:
            raise
        if isinstance(exc, UserError):
            raise type(exc)(scrub(str(exc))) from None
        raise RuntimeError(scrub(text).rstrip()) from None


def scrub_all(value: Any) -> Any:
    """`scrub` applied to every string in a JSON-like value (dict keys included)."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {scrub_all(k): scrub_all(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub_all(v) for v in value]
    return value


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with `/`, keeping the scheme and bucket."""
    if is_local(uri):
        return os.path.join(local_path(uri), *parts)
    return posixpath.join(uri.rstrip("/"), *parts)


def s3_endpoint() -> str | None:
    """The custom S3 endpoint from the environment, if any (S3-compatible stores)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A `pyarrow.fs` filesystem for `uri` and the path inside it (for Ray Data / Ray Train)."""
    kind = scheme(uri)
    if kind in ("", "file"):
        return pafs.LocalFileSystem(), os.path.abspath(local_path(uri))
    parsed = urlsplit(uri)
    path = (parsed.netloc + parsed.path).rstrip("/")
    if kind == "s3":
        # allow_delayed_open: a small file is one PutObject instead of a multipart upload
        # (cheaper, and the multipart path fails on some S3-compatible servers, e.g. moto).
        connect, read = network_timeouts()
        kwargs: dict[str, Any] = {"connect_timeout": connect, "request_timeout": read, "allow_delayed_open": True,
                                  "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3)}
        endpoint = s3_endpoint()
        if endpoint:
            ep = urlsplit(endpoint)
            kwargs.update(endpoint_override=ep.netloc or ep.path, scheme=ep.scheme or "https")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), path
    if kind == "gs":
        return pafs.GcsFileSystem(), path
    raise StorageError(f"{redact(uri)}: scheme '{kind}://' cannot be listed or written; "
                       "use a local path, s3:// or gs:// (http(s):// is for single-file reads)")


def _transport_params(uri: str) -> dict[str, Any]:
    connect, read = network_timeouts()
    if scheme(uri) in ("http", "https"):
        return {"timeout": (connect, read)}  # requests: (connect, between two bytes of the response)
    if scheme(uri) != "s3":
        return {}
    import boto3
    from botocore.config import Config

    # Fail fast on an unreachable endpoint instead of retrying for minutes.
    config = Config(connect_timeout=connect, read_timeout=read, retries={"max_attempts": 3, "mode": "standard"})
    return {"client": boto3.client("s3", endpoint_url=s3_endpoint(), config=config)}


NETWORK_TIMEOUT_ENV = "BERTRAM_NETWORK_TIMEOUT"
_CONNECT_TIMEOUT_S, _READ_TIMEOUT_S = 10.0, 60.0


def network_timeouts() -> tuple[float, float]:
    """(connect, read) timeouts in seconds of every network read and write (http(s), S3).

    `BERTRAM_NETWORK_TIMEOUT` seconds is how long a server may send nothing (the connect timeout is at
    most 10 s of it); default 10 s / 60 s. Workers read it from their environment, as the AWS settings.
    """
    raw = os.environ.get(NETWORK_TIMEOUT_ENV, "").strip()
    if not raw:
        return _CONNECT_TIMEOUT_S, _READ_TIMEOUT_S
    try:
        read = float(raw)
    except ValueError:
        read = math.nan
    if not (math.isfinite(read) and read > 0):
        raise ConfigError(f"{NETWORK_TIMEOUT_ENV} must be a number of seconds > 0, got {raw!r}")
    return min(_CONNECT_TIMEOUT_S, read), read


def _timeout_in(exc: BaseException | None) -> BaseException | None:
    """The timeout (socket, requests, urllib3, botocore, Arrow) that is `exc` or one of its causes, if any."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc).lower()
        if any("timeout" in k.__name__.lower() for k in type(exc).__mro__) or "timed out" in text \
                or "timeout was reached" in text:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def is_timeout(exc: BaseException) -> bool:
    """Whether `exc` or one of its causes is a timeout: a server that did not answer in `network_timeouts()`."""
    return _timeout_in(exc) is not None


def timed_out(uri: str, exc: BaseException) -> StorageError:
    """The one line for a network read of `uri` that timed out (`is_timeout`): how long it waited, and the fix."""
    cause = _timeout_in(exc) or exc
    connecting = any("connect" in k.__name__.lower() and "timeout" in k.__name__.lower()
                     for k in type(cause).__mro__)
    connect, read = network_timeouts()
    waited = f"timed out after {connect:g} s connecting" if connecting else \
        f"timed out after {read:g} s without data from the server"
    endpoint = s3_endpoint() if scheme(uri) == "s3" else None
    text = scrub(f"{type(cause).__name__}: {cause}".splitlines()[0][:200])
    return StorageError(f"{redact(uri)}: {waited}{f' at {endpoint}' if endpoint else ''} ({text}); check the "
                        f"server/network or raise {NETWORK_TIMEOUT_ENV} (seconds)")


def _explain(uri: str, exc: BaseException) -> StorageError:
    """Turn a low-level I/O exception into one line that names the cause and the fix (scrubbed: it may be
    raised in a Ray task, whose errors Ray logs as they are)."""
    if is_timeout(exc):
        return timed_out(uri, exc)
    text = scrub(f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
    where = redact(uri)
    lowered = text.lower()
    if isinstance(exc, FileNotFoundError) or "nosuchkey" in lowered or "not found" in lowered or "404" in lowered:
        return StorageError(f"{where}: not found; check the path or URI")
    if "nosuchbucket" in lowered:
        return StorageError(f"{where}: the bucket does not exist; create it or fix the URI")
    if any(s in lowered for s in ("connect", "endpoint", "resolve", "unreachable")):
        endpoint = s3_endpoint() if scheme(uri) == "s3" else None
        hint = f" at {endpoint}" if endpoint else ""
        return StorageError(f"{where}: storage unreachable{hint} ({text}); check the network and "
                            "AWS_ENDPOINT_URL / credentials")
    if any(s in lowered for s in ("accessdenied", "forbidden", "403", "credentials", "permission")):
        return StorageError(f"{where}: access denied ({text}); check the credentials and permissions")
    return StorageError(f"{where}: {text}")


def _open_zstd(file_obj: IO[bytes], mode: str) -> IO[bytes]:
    import io

    import zstandard

    if "r" not in mode:
        raise StorageError("writing .zst through storage.open_read is not supported")
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(file_obj, closefd=True))


_zstd_registered = False


def _register_zstd() -> None:
    """Decompress `.zst` with `zstandard` (smart_open's own handler needs Python 3.14's zstd)."""
    global _zstd_registered
    if not _zstd_registered:
        import logging

        import smart_open

        # Replacing its handler is the point: not worth smart_open's "overriding" warning in every worker.
        logger = logging.getLogger("smart_open.compression")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            smart_open.register_compressor(".zst", _open_zstd)
        finally:
            logger.setLevel(level)
        _zstd_registered = True


def open_read(uri: str, compression: str = "infer", offset: int = 0) -> IO[bytes]:
    """A binary stream over `uri`; `.gz/.bz2/.zst` are decompressed unless compression='disable'.

    `offset` seeks before the first read (uncompressed files only).
    """
    import smart_open

    _register_zstd()
    mode = "infer_from_extension" if compression == "infer" else "disable"
    try:
        stream = smart_open.open(uri, "rb", compression=mode, transport_params=_transport_params(uri))
        if offset:
            stream.seek(offset)
        return stream
    except Exception as exc:  # noqa: BLE001 - every backend raises its own types
        raise _explain(uri, exc) from None


def read_bytes(uri: str) -> bytes:
    with open_read(uri, compression="disable") as f:
        try:
            return f.read()
        except Exception as exc:  # noqa: BLE001 - a server that stalls or drops mid-body: one line, not a traceback
            raise _explain(uri, exc) from None


def read_text(uri: str) -> str:
    """The file as UTF-8 text, or one line naming the file and the first byte that is not UTF-8."""
    data = read_bytes(uri)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{redact(uri)} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                        "convert it, e.g. iconv -f latin1 -t utf-8") from None


def read_json(uri: str) -> Any:
    return json.loads(read_text(uri))


def write_bytes(uri: str, data: bytes) -> None:
    """Write `data` to `uri`, creating parent directories; replaces an existing object."""
    if is_local(uri):
        path = local_path(uri)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # atomic on one filesystem: readers never see half a file
        return
    try:
        if scheme(uri) == "s3":
            # boto3's transfer manager (multipart when large) works with every S3-compatible
            # store we tried; Arrow's multipart upload fails on some (moto).
            import io

            parsed = urlsplit(uri)
            client = _transport_params(uri)["client"]
            client.upload_fileobj(io.BytesIO(data), parsed.netloc, parsed.path.lstrip("/"))
            return
        fs, path = filesystem(uri)
        with fs.open_output_stream(path) as f:  # object stores publish on close: also atomic
            f.write(data)
    except Exception as exc:  # noqa: BLE001
        raise _explain(uri, exc) from None


def write_if_absent(uri: str, data: bytes) -> bool:
    """Write `data` to `uri` only if nothing is there, as one atomic step where the store has one; False when
    something is. Local: the whole file is hard-linked into place (exclusive like O_EXCL, never seen half
    written; O_EXCL itself where links are not supported). S3: a conditional put (`If-None-Match: *`). Other
    stores: written when absent (not atomic: callers read back)."""
    if is_local(uri):
        import uuid

        path = local_path(uri)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        whole = f"{path}.new-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        with open(whole, "wb") as f:
            f.write(data)
        try:
            os.link(whole, path)
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        finally:
            os.unlink(whole)
        return True
    if scheme(uri) == "s3":
        parsed = urlsplit(uri)
        try:
            _transport_params(uri)["client"].put_object(Bucket=parsed.netloc, Key=parsed.path.lstrip("/"), Body=data,
                                                        IfNoneMatch="*")
        except Exception as exc:  # noqa: BLE001
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise _explain(uri, exc) from None
        return True
    if exists(uri):
        return False
    write_bytes(uri, data)
    return True


def write_dir(local_dir: str, uri: str) -> None:
    """Write every file under the local directory `local_dir` to the same relative path under `uri`."""
    for root, _, files in os.walk(local_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), local_dir)
            with open(os.path.join(root, name), "rb") as f:
                write_bytes(join(uri, *rel.split(os.sep)), f.read())


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str, obj: Any) -> None:
    """Write `obj` as JSON, every string in it scrubbed of secrets (`scrub_all`): records never hold one."""
    write_text(uri, json.dumps(scrub_all(json.loads(json.dumps(obj, default=str))), indent=2) + "\n")


def write_parquet(uri: str, table: Any, compression: str = "zstd") -> None:
    """Write a pyarrow Table as one parquet file (atomically, like `write_bytes`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=compression)
    write_bytes(uri, sink.getvalue().to_pybytes())


def read_parquet(uri: str) -> Any:
    """A parquet file as a pyarrow Table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.read_table(pa.BufferReader(read_bytes(uri)))


def exists(uri: str) -> bool:
    if is_local(uri):
        return os.path.exists(local_path(uri))
    fs, path = filesystem(uri)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except Exception as exc:  # noqa: BLE001
        raise _explain(uri, exc) from None


def delete(uri: str) -> None:
    """Delete a file or a whole directory/prefix; a missing one is fine."""
    fs, path = filesystem(uri)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)
    except Exception as exc:  # noqa: BLE001
        raise _explain(uri, exc) from None


def make_dirs(uri: str) -> None:
    if is_local(uri):
        os.makedirs(local_path(uri), exist_ok=True)


def _uri_of(uri: str, fs_path: str) -> str:
    """Map a path inside the filesystem of `uri` back to a URI of the same kind."""
    if is_local(uri):
        return fs_path
    return f"{scheme(uri)}://{fs_path}"


def copy_tree(src: str, dst: str) -> int:
    """Copy every file under `src` to the same relative path under `dst` (any two URIs); returns how many."""
    files = list_files(src)
    prefix = join(absolute(src), "")
    for f in files:
        write_bytes(join(dst, f.uri[len(prefix):] if f.uri.startswith(prefix) else os.path.basename(f.uri)),
                    read_bytes(f.uri))
    return len(files)


def local_copy(uri: str) -> str | None:
    """Where a local copy of the remote `uri` will be, when BERTRAM_LOCAL_COPY (`s3://bucket=dir`, set by
    cluster/local-s3.sh, which copies its in-memory bucket there when it stops) covers it; else None."""
    remote, _, local = os.environ.get("BERTRAM_LOCAL_COPY", "").partition("=")
    if not remote or not local or is_local(uri) or not uri.startswith(remote.rstrip("/") + "/"):
        return None
    return os.path.join(local, uri[len(remote.rstrip("/")) + 1:])


def list_files(uri: str, hidden: bool = False) -> list[FileInfo]:
    """Files named by `uri`: one file, everything under a directory/prefix, or a glob.

    Hidden files and `_`-prefixed markers (`_SUCCESS`) are ignored unless `hidden` (what
    may be deleted must be seen whole: `manifest.reset`). Sorted by URI, so the order (and
    every index derived from it) is stable across runs.
    """
    if scheme(uri) in ("http", "https"):
        return [FileInfo(uri, -1)]
    glob = _GLOB_CHARS.search(uri)
    base = uri[:glob.start()].rsplit("/", 1)[0] if glob else uri
    fs, base_path = filesystem(base or ".")
    try:
        info = fs.get_file_info(base_path)
        if info.type == pafs.FileType.File and not glob:
            return [FileInfo(uri, info.size)]
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(base_path)
        infos = fs.get_file_info(pafs.FileSelector(base_path, recursive=True))
    except Exception as exc:  # noqa: BLE001
        raise _explain(uri, exc) from None
    files = []
    for item in infos:
        if item.type != pafs.FileType.File or (not hidden and item.base_name.startswith((".", "_"))):
            continue
        full = _uri_of(uri, item.path)
        if glob and not fnmatch.fnmatchcase(full if not is_local(uri) else item.path,
                                            uri if not is_local(uri) else os.path.abspath(local_path(uri))):
            continue
        files.append(FileInfo(full, item.size))
    return sorted(files, key=lambda f: f.uri)


# What an OS error the user can fix means, and the fix (the rest are bugs: a traceback).
_OS_ERRORS = {
    errno.ENOSPC: ("no space left on the device", "free space there or choose another --output"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space there or choose another --output"),
    errno.EROFS: ("the filesystem is read-only", "choose a writable --output"),
    errno.EACCES: ("permission denied", "check the file's permissions or choose another --output"),
    errno.EPERM: ("operation not permitted", "check the file's permissions or choose another --output"),
    errno.ENAMETOOLONG: ("a file name is too long", "choose a shorter --output"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n) and run again"),
}
_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\][^'\n]*?(?:: '([^'\n]+)')?(?:$|\n|\))")


def _os_errors(exc: BaseException):
    """(errno, filename) of every OS error in the chain of `exc`, Ray's task errors (whose cause may only
    be in their text) included."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _OS_ERRORS:
            yield exc.errno, exc.filename if isinstance(exc.filename, str) else None
        for match in _ERRNO_TEXT.finditer(str(exc)):
            if int(match.group(1)) in _OS_ERRORS:
                yield int(match.group(1)), match.group(2)
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__


def os_error_in(exc: BaseException, output: str | None = None, written: int | None = None) -> StorageError | None:
    """One line for an OS error the user can fix (a full disk, a read-only or forbidden path, a quota) found
    in `exc`: what happened, where (the file, the --output and, for a full disk, the space left there and what
    the stage had written), and the fix; None for any other failure."""
    found = next(_os_errors(exc), None)
    if found is None:
        return None
    number, filename = found
    what, fix = _OS_ERRORS[number]
    where = f" at {redact(filename)}" if filename else ""  # (a write, or a read: EACCES on an input)
    if output is not None:
        where += f" (--output {redact(output)})"
    if number in (errno.ENOSPC, errno.EDQUOT) and output is not None and is_local(output):
        import shutil

        probe = filename or local_path(output)  # the device that is full: the file's (Ray's /tmp, say) or the output's
        while probe and not os.path.exists(probe):
            probe = os.path.dirname(probe)
        free = shutil.disk_usage(probe or ".").free
        needs = f"; it needs more than the {_size(written)} it had written" if written else ""
        where += f": {_size(free)} free there{needs}"
    return StorageError(f"{what}{where}; {fix}")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
