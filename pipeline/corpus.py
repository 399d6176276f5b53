"""Reading a corpus: files → splits → clean lines → tokens.

A corpus is one file, a directory/prefix, or a glob of plain-text files (optionally
`.gz`, `.bz2`, `.zst`), one or more sentences per line. It is cut into *splits* (byte
ranges of uncompressed files, whole compressed files) that Ray Data tasks read in
parallel. Every line is accounted for: it is either used, or skipped for one reason
in `SKIP_REASONS`, and `LineStats` counts both, so a manifest can prove that
`lines_read == lines_used + sum(skipped)`.

Tokenisation is vectorised over whole batches with Arrow's RE2 kernels (no Python loop
over characters or tokens): lowercase (optional), split off punctuation, split English
clitics the Penn-Treebank way (`don't` → `do n't`, `it's` → `it 's`), keep decimal
numbers (`3.14`) and unicode letters together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage

SKIP_REASONS = ("empty", "one_word", "bad_encoding", "binary", "too_long")
SENTENCE_END = "."
_CONTROL = r"[\x00-\x08\x0e-\x1f\x7f]"  # control bytes other than \t \n \v \f \r

# One RE2 pattern, matched left to right; every match becomes its own token.
#   numbers with inner . or , ("3.14", "1,000", "v2.0") | dotted abbreviations ("e.g.",
#   "u.s.") | Treebank clitics | any other non-word, non-space character (punctuation,
#   symbols) | a bare apostrophe.
_WORD = r"[\p{L}\p{M}\p{N}_]"
TOKEN_PATTERN = (
    rf"{_WORD}*\p{{N}}(?:[.,]\p{{N}}+)+{_WORD}*"
    r"|\b\p{L}\.(?:\p{L}\.)+"
    r"|(?i:n't)\b|'(?i:s|re|ve|ll|d|m)\b"
    r"|[^\p{L}\p{M}\p{N}_\s']|'"
)


@dataclass(frozen=True)
class Split:
    """A piece of the corpus one task reads: lines *starting* in [start, end) of one file."""

    file_id: int
    uri: str
    start: int
    end: int  # -1: to the end of the file (compressed files, unknown sizes)


@dataclass
class LineStats:
    """How many lines were read, used, and skipped (by reason)."""

    read: int = 0
    used: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))

    def add(self, other: "LineStats") -> None:
        self.read += other.read
        self.used += other.used
        for k, v in other.skipped.items():
            self.skipped[k] = self.skipped.get(k, 0) + v

    def as_dict(self) -> dict:
        return {"read": self.read, "used": self.used, "skipped": dict(self.skipped)}


def make_splits(files: list[storage.FileInfo], split_bytes: int) -> list[Split]:
    """Cut files into byte-range splits of about `split_bytes` (compressed files stay whole)."""
    splits = []
    for file_id, f in enumerate(files):
        if f.uri.endswith(storage.COMPRESSED_SUFFIXES) or f.size < 0 or f.size <= split_bytes:
            splits.append(Split(file_id, f.uri, 0, -1))
            continue
        for start in range(0, f.size, split_bytes):
            end = min(start + split_bytes, f.size)
            splits.append(Split(file_id, f.uri, start, -1 if end == f.size else end))
    return splits


def split_rows(splits: list[Split]) -> tuple[list[dict], Any]:
    """Rows of a Ray dataset of `splits` that hold no credential, and an object ref to their files' URIs.

    A corpus URL's user:password@ or signed query would otherwise reach Ray's own files (the dataset's
    logs and blocks); the rows carry the redacted URI, and a task gets the real one with `split_of`.
    """
    import ray

    rows = [{**s.__dict__, "uri": storage.redact(s.uri)} for s in splits]
    return rows, ray.put({s.file_id: s.uri for s in splits})


def split_of(row: dict, uris_ref: Any) -> Split:
    """The split of a `split_rows` row, with its file's real URI (in a Ray task)."""
    import ray

    return Split(**{**row, "uri": ray.get(uris_ref)[row["file_id"]]})


def unreadable(uri: str, exc: Exception) -> storage.UserError:
    """The one-line error for a corpus file that fails while it is read (truncated or corrupt archive, or a
    server that stops sending: `storage.timed_out`)."""
    if storage.is_timeout(exc):
        return storage.timed_out(uri, exc)
    detail = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}" if str(exc) else type(exc).__name__
    detail = storage.scrub(detail)
    kind = next((s for s in storage.COMPRESSED_SUFFIXES if uri.lower().endswith(s)), None)
    if kind:
        return storage.UserError(f"--corpus file {storage.redact(uri)} cannot be decompressed ({detail}): it is "
                                 f"truncated or not a {kind} file; re-create it, or remove it from the corpus")
    return storage.UserError(f"--corpus file {storage.redact(uri)} failed while being read ({detail}); "
                             "check the file and re-run")


def read_split(split: Split, max_line_bytes: int, chunk_bytes: int = 8 << 20):
    """Yield `(raw_lines, offsets, too_long)` chunks of the lines owned by `split`.

    A split owns the lines whose first byte lies in [start, end). `raw_lines` is a list of
    `bytes` without the newline, `offsets` their byte offsets in the (decompressed) file:
    a stable identity of each line that does not depend on how the corpus was split. A
    line longer than `max_line_bytes` is never held in memory: it is skipped while
    streaming and only counted in `too_long`.
    """
    end = split.end if split.end != -1 else float("inf")
    seekable = split.end != -1 or split.start > 0
    first = max(split.start - 1, 0)
    with storage.open_read(split.uri, compression="disable" if seekable else "infer", offset=first) as f:
        pos = first                   # file offset of the next unread byte
        skipping = split.start > 0    # discard through the next newline (the line before ours)
        carry, carry_start = b"", pos  # the current unfinished line and its offset
        too_long = 0
        while True:
            try:
                chunk = f.read(chunk_bytes)
            except Exception as exc:  # noqa: BLE001 - gzip/bz2/zstandard/botocore each raise their own
                raise unreadable(split.uri, exc) from None
            if skipping and chunk:
                nl = chunk.find(b"\n")
                if nl < 0:
                    pos += len(chunk)
                    continue
                pos += nl + 1
                chunk, carry, carry_start, skipping = chunk[nl + 1:], b"", pos, False
            if carry_start >= end:
                break  # the next line starts in the following split
            if not chunk:  # end of file: an unterminated last line is still a line
                if carry:
                    yield [carry], np.array([carry_start], dtype=np.int64), too_long
                    too_long = 0
                break
            data = carry + chunk
            pos += len(chunk)
            lines = data.split(b"\n")
            carry = lines.pop()
            if lines:
                lengths = np.fromiter(map(len, lines), dtype=np.int64, count=len(lines))
                ends = carry_start + np.cumsum(lengths + 1)
                offsets = ends - lengths - 1
                owned = int(np.searchsorted(offsets, end, side="left"))
                yield lines[:owned], offsets[:owned], too_long
                too_long = 0
                if owned < len(lines):
                    return
                carry_start = int(ends[-1])
            if len(carry) > max_line_bytes and not skipping:
                if carry_start >= end:
                    break
                too_long += 1
                skipping = True
                carry = b""
        if too_long:
            yield [], np.zeros(0, dtype=np.int64), too_long


def decode_lines(raw_lines: list[bytes], max_line_bytes: int) -> tuple[pa.Array, np.ndarray, LineStats]:
    """Decode and filter raw lines; returns (used lines, their indices into raw_lines, stats).

    Skips lines that are not UTF-8, contain NUL or other control bytes (binary junk), exceed
    `max_line_bytes`, are blank, or hold a single whitespace-separated word (the
    reference preprocessing drops those: they carry no context).
    """
    stats = LineStats(read=len(raw_lines))
    if not raw_lines:
        return pa.array([], pa.string()), np.zeros(0, dtype=np.int64), stats
    binary = pa.array(raw_lines, pa.binary())
    keep = np.ones(len(raw_lines), dtype=bool)

    lengths = pc.binary_length(binary).to_numpy(zero_copy_only=False)
    too_long = lengths > max_line_bytes
    stats.skipped["too_long"] += int(too_long.sum())
    keep &= ~too_long

    try:
        text = binary.cast(pa.string())  # validates UTF-8 for the whole batch at once
    except pa.ArrowInvalid:
        bad = np.zeros(len(raw_lines), dtype=bool)
        for i, line in enumerate(raw_lines):  # slow path: only for batches with bad bytes
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                bad[i] = True
        bad &= keep
        stats.skipped["bad_encoding"] += int(bad.sum())
        keep &= ~bad
        text = pa.array([line.decode("utf-8", "replace") for line in raw_lines], pa.string())

    # NUL and the other control bytes that text never holds (tab, line/form feed and CR it may):
    # a binary file read as text; its "words" would become vocabulary and targets.
    junk = pc.match_substring_regex(binary, _CONTROL).to_numpy(zero_copy_only=False) & keep
    stats.skipped["binary"] += int(junk.sum())
    keep &= ~junk

    stripped = pc.utf8_trim_whitespace(text)
    empty = (pc.binary_length(stripped).to_numpy(zero_copy_only=False) == 0) & keep
    stats.skipped["empty"] += int(empty.sum())
    keep &= ~empty

    one_word = ~pc.match_substring_regex(stripped, r"\s").to_numpy(zero_copy_only=False) & keep
    stats.skipped["one_word"] += int(one_word.sum())
    keep &= ~one_word

    index = np.flatnonzero(keep)
    stats.used = len(index)
    return stripped.take(pa.array(index)), index, stats


def tokenize(lines: pa.Array, lowercase: bool = True) -> pa.ListArray:
    """Tokenise a batch of lines: one list of string tokens per line, no empty tokens."""
    text = pc.utf8_lower(lines) if lowercase else lines
    spaced = pc.replace_substring_regex(text, TOKEN_PATTERN, r" \0 ")
    # Trimming first is not only tidy: utf8_split_whitespace (pyarrow 26) can keep a
    # trailing space inside the last token when a string ends on a 64-byte boundary.
    pieces = pc.utf8_split_whitespace(pc.utf8_trim_whitespace(spaced))
    # Neighbouring separators leave empty strings: drop them and rebuild the list offsets.
    flat = pc.list_flatten(pieces)
    nonempty = pc.greater(pc.binary_length(flat), 0).to_numpy(zero_copy_only=False)
    if nonempty.all():
        return pieces
    parents = pc.list_parent_indices(pieces).to_numpy()
    counts = np.bincount(parents[nonempty], minlength=len(pieces))
    offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), flat.filter(pa.array(nonempty)))


def tokenize_text(text: str, lowercase: bool = True) -> list[str]:
    """Tokenise one string (convenience for tests and small inputs)."""
    return tokenize(pa.array([text]), lowercase)[0].as_py()
