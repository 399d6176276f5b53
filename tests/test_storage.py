"""URIs: local paths, globs, s3:// on a real S3-compatible endpoint, http(s) reads, compression, redaction."""

import gzip
import http.server
import threading

import pytest

from pipeline import storage


def test_local_file_dir_and_glob(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt.gz").write_bytes(gzip.compress(b"b"))
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / ".hidden").write_text("")
    names = lambda files: sorted(f.uri.rsplit("/", 1)[1] for f in files)  # noqa: E731
    assert names(storage.list_files(str(tmp_path))) == ["a.txt", "b.txt.gz"]
    assert names(storage.list_files(str(tmp_path / "a.txt"))) == ["a.txt"]
    assert names(storage.list_files(str(tmp_path / "*.txt"))) == ["a.txt"]
    assert names(storage.list_files(str(tmp_path / "sub" / "*.gz"))) == ["b.txt.gz"]
    with pytest.raises(storage.StorageError, match="not found; check the path"):
        storage.list_files(str(tmp_path / "missing"))


def test_local_write_is_atomic_and_reads_back(tmp_path):
    uri = str(tmp_path / "deep" / "x.json")
    storage.write_json(uri, {"a": 1})
    assert storage.read_json(uri) == {"a": 1}
    assert [p.name for p in (tmp_path / "deep").iterdir()] == ["x.json"]  # no temp file left
    storage.delete(str(tmp_path / "deep"))
    assert not storage.exists(str(tmp_path / "deep"))


def test_s3_round_trip_list_and_glob(s3_bucket):
    storage.write_bytes(f"{s3_bucket}/corpus/a.txt", b"hello")
    storage.write_bytes(f"{s3_bucket}/corpus/b.txt.gz", gzip.compress(b"world"))
    storage.write_bytes(f"{s3_bucket}/other/c.txt", b"!")
    files = storage.list_files(f"{s3_bucket}/corpus/")
    assert [f.uri for f in files] == [f"{s3_bucket}/corpus/a.txt", f"{s3_bucket}/corpus/b.txt.gz"]
    assert [f.uri for f in storage.list_files(f"{s3_bucket}/corpus/*.gz")] == [f"{s3_bucket}/corpus/b.txt.gz"]
    with storage.open_read(f"{s3_bucket}/corpus/b.txt.gz") as f:
        assert f.read() == b"world"  # decompressed transparently
    with storage.open_read(f"{s3_bucket}/corpus/a.txt", compression="disable", offset=2) as f:
        assert f.read() == b"llo"
    storage.delete(f"{s3_bucket}/corpus")
    assert not storage.exists(f"{s3_bucket}/corpus/a.txt")


def test_s3_missing_bucket_is_a_clear_error(s3_server):
    with pytest.raises(storage.StorageError, match="not found|does not exist"):
        storage.list_files("s3://no-such-bucket-here/corpus/")


def test_http_read(tmp_path):
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress(b"served over http\n"))
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_port}/c.txt.gz"
        assert [f.uri for f in storage.list_files(uri)] == [uri]
        with storage.open_read(uri) as f:
            assert f.read() == b"served over http\n"
    finally:
        server.shutdown()


def test_redact_strips_credentials():
    assert storage.redact("https://user:secret@host:8080/p?token=abc") == "https://host:8080/p"
    assert storage.redact("s3://bucket/key") == "s3://bucket/key"
    assert storage.redact("/local/path") == "/local/path"
