"""The sampling pass: corpus splits → per-word context samples → parquet buckets.

A *context* of an occurrence is the window of up to `window` tokens either side of it
inside its sentence (`.` tokens end sentences and are dropped), joined by spaces; it
contains the word itself. For each target word we want a uniform random sample of at
most `cap` of its distinct contexts, reproducible from a seed, without ever
materialising all occurrences of frequent words. How:

1. Every occurrence gets a uniform number `u` from a seeded hash of its identity
   (file, byte offset of its line, token position). Ordering a word's occurrences by
   `u` is a random permutation of them, the same for any split of the corpus.
2. Occurrences with `u < keep_prob(word) = min(1, cap · oversample / count(word))` are
   kept and turned into context strings, so a word yields ~`cap · oversample`
   occurrences however frequent it is ("the" keeps ~2000 of its millions).
3. Per word: deduplicate contexts (each keeps its smallest `u`), keep the `cap`
   smallest. This is exactly "the first `cap` distinct contexts in a random shuffle of
   the corpus" — the reference's rule, made reproducible and order-free — as long as the
   kept occurrences hold `cap` distinct contexts.

Words are assigned to `num_buckets` buckets by a stable hash of the word. On Ray Data,
step 1 samples each split and writes its rows as one Arrow fragment per bucket under
`<output>/_work/`; step 2 reads one bucket's fragments, selects, and writes the bucket's
parquet file. The exchange goes through storage rather than a Ray shuffle: it scales past
the object store and costs no shuffle actors.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.corpus import SENTENCE_END, Split, decode_lines, read_split, split_of, split_rows, tokenize

# A sampled occurrence: `target` is the word's row in the targets table.
SAMPLE_SCHEMA = pa.schema([("bucket", pa.int32()), ("target", pa.int32()), ("u", pa.float64()),
                           ("context", pa.string())])
BUCKET_SCHEMA = pa.schema([("word", pa.string()), ("count", pa.int64()), ("contexts", pa.list_(pa.string()))])


def bucket_of(words: list[str], num_buckets: int) -> np.ndarray:
    """A stable bucket for each word: blake2b-64 of its UTF-8 bytes, mod `num_buckets`."""
    digests = (int.from_bytes(hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest(), "little") for w in words)
    return np.fromiter((d % num_buckets for d in digests), dtype=np.int32, count=len(words))


def targets_table(words: list[str], counts: list[int] | np.ndarray, num_buckets: int,
                  cap: int, oversample: float) -> pa.Table:
    """The words to collect contexts for, with their bucket and keep probability."""
    counts = np.asarray(counts, dtype=np.int64)
    keep_prob = np.minimum(1.0, cap * oversample / np.maximum(counts, 1))
    return pa.table({"word": pa.array(words, pa.string()), "count": counts,
                     "bucket": bucket_of(words, num_buckets), "keep_prob": keep_prob})


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniform_hash(seed: int, file_id: int, line_offsets: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """A uniform number in [0, 1) for each occurrence, from its identity and the seed."""
    with np.errstate(over="ignore"):
        base = _splitmix64(_splitmix64(np.array([seed], dtype=np.uint64)) ^ np.uint64(file_id))[0]
        h = _splitmix64(base ^ line_offsets.astype(np.uint64))
        h = _splitmix64(h ^ positions.astype(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _string_views(data: pa.Buffer, start: np.ndarray, length: np.ndarray) -> pa.Array:
    """Strings that are byte ranges of one buffer, built as Arrow string views (no per-row copy).

    A view is 16 bytes: the length, then either the string inline (<= 12 bytes) or its
    first 4 bytes, the buffer index (0) and the offset. Ranges may overlap.
    """
    raw = np.concatenate((np.frombuffer(data, dtype=np.uint8), np.zeros(12, dtype=np.uint8)))  # pad reads
    views = np.zeros((len(start), 4), dtype="<i4")
    views[:, 0] = length
    long, short = np.flatnonzero(length > 12), np.flatnonzero(length <= 12)
    views[long, 1] = raw[start[long, None] + np.arange(4)].view("<i4")[:, 0]
    views[long, 3] = start[long]
    inline = raw[start[short, None] + np.arange(12)]
    inline[np.arange(12) >= length[short, None]] = 0
    views[short, 1:4] = inline.view("<i4")
    return pa.Array.from_buffers(pa.string_view(), len(start), [None, pa.py_buffer(views), data])


def extract_contexts(tokens: pa.ListArray, line_offsets: np.ndarray, file_id: int, targets: pa.Table,
                     window: int, seed: int) -> pa.Table:
    """Sampled (bucket, target, u, context) rows for the target occurrences in a batch of lines.

    `tokens` holds one token list per line, `line_offsets` each line's byte offset in
    file `file_id` (its stable identity for the hash). Full-length work is limited to
    a few vectorised passes; everything else is done for the kept occurrences only.
    """
    flat = pc.list_flatten(tokens)
    if len(flat) == 0:
        return SAMPLE_SCHEMA.empty_table()
    offsets = tokens.offsets.to_numpy().astype(np.int64)
    offsets -= offsets[0]  # token index where each line starts (and, last, ends)
    is_end = pc.equal(flat, SENTENCE_END).to_numpy(zero_copy_only=False)

    # Which tokens are targets, and which of those occurrences the sample keeps.
    index = pc.fill_null(pc.index_in(flat, value_set=targets["word"]), -1).to_numpy(zero_copy_only=False)
    candidates = np.flatnonzero((index >= 0) & ~is_end)
    if len(candidates) == 0:
        return SAMPLE_SCHEMA.empty_table()
    line = np.searchsorted(offsets, candidates, side="right") - 1
    u = uniform_hash(seed, file_id, line_offsets[line], candidates - offsets[line])
    chosen = u < targets["keep_prob"].to_numpy()[index[candidates]]
    at, u, line = candidates[chosen], u[chosen], line[chosen]

    # The window: up to `window` tokens either side, inside the sentence (between ".").
    dots = np.concatenate(([-1], np.flatnonzero(is_end), [len(flat)]))  # with sentinels
    after = np.searchsorted(dots, at)  # index of the first "." after each occurrence
    lo = np.maximum.reduce([dots[after - 1] + 1, offsets[line], at - window])
    hi = np.minimum.reduce([dots[after], offsets[line + 1], at + window + 1]) - 1  # last token, inclusive

    # Each line with its tokens joined by single spaces; a window is one byte range of it.
    normalized = pc.binary_join(tokens, " ")
    token_len = pc.binary_length(flat).to_numpy(zero_copy_only=False).astype(np.int64)
    step = np.concatenate(([0], np.cumsum(token_len + 1)))  # byte position if all lines were one
    value_offsets = np.frombuffer(normalized.buffers()[1], dtype=np.int32)
    line_start = value_offsets[normalized.offset + line].astype(np.int64) - step[offsets[line]]
    start = line_start + step[lo]
    length = line_start + step[hi] + token_len[hi] - start
    context = _string_views(normalized.buffers()[2], start, length).cast(pa.string())
    target = index[at]
    return pa.table({"bucket": targets["bucket"].to_numpy()[target], "target": target.astype(np.int32),
                     "u": u, "context": context}, schema=SAMPLE_SCHEMA)


def sample_split(split: Split, targets: pa.Table, lowercase: bool, max_line_bytes: int,
                 window: int, seed: int) -> pa.Table:
    """All sampled context rows of one split."""
    parts = []
    for raw_lines, offsets, _too_long in read_split(split, max_line_bytes):
        lines, index, _stats = decode_lines(raw_lines, max_line_bytes)
        parts.append(extract_contexts(tokenize(lines, lowercase), offsets[index], split.file_id,
                                      targets, window, seed))
    return pa.concat_tables(parts) if parts else SAMPLE_SCHEMA.empty_table()


def select_contexts(samples: pa.Table, targets: pa.Table, bucket: int, cap: int) -> pa.Table:
    """One bucket → (word, count, contexts): dedup, then each word's `cap` smallest-`u` contexts.

    `samples` are the bucket's sampled (target, u, context) rows; every target word of
    the bucket is in the result, a word without any sampled context with an empty list.
    """
    members = np.flatnonzero(targets["bucket"].to_numpy() == bucket)
    # Distinct (target, context) pairs, each with the smallest u among its occurrences.
    distinct = samples.group_by(["target", "context"], use_threads=False).aggregate([("u", "min")])
    target = distinct["target"].to_numpy()
    order = np.lexsort((distinct["u_min"].to_numpy(), target))  # by word, then u
    target = target[order]
    new_word = np.ones(len(order), dtype=bool)
    new_word[1:] = target[1:] != target[:-1]
    rank = np.arange(len(order)) - np.flatnonzero(new_word)[np.cumsum(new_word) - 1]
    order, target = order[rank < cap], target[rank < cap]
    # Rows are grouped by target now: list offsets follow from per-word counts.
    slot = np.searchsorted(members, target)  # the word's row among the bucket's members
    offsets = np.concatenate(([0], np.cumsum(np.bincount(slot, minlength=len(members)))))
    contexts = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                        distinct["context"].take(pa.array(order)).combine_chunks())
    out = pa.table({"word": targets["word"].take(pa.array(members)),
                    "count": targets["count"].take(pa.array(members)), "contexts": contexts},
                   schema=BUCKET_SCHEMA)
    return out.sort_by([("count", "descending"), ("word", "ascending")])


def bucket_uri(output: str, bucket: int) -> str:
    return storage.join(output, "contexts", f"bucket-{bucket:05d}.parquet")


def fragment_dir(work: str, bucket: int) -> str:
    return storage.join(work, f"bucket-{bucket:05d}")


def write_fragment(uri: str, table: pa.Table) -> None:
    """Intermediate data: Arrow IPC with lz4, much cheaper to write and read than parquet."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="lz4")) as writer:
        writer.write_table(table)
    storage.write_bytes(uri, sink.getvalue().to_pybytes())


def read_fragment(uri: str) -> pa.Table:
    return pa.ipc.open_file(pa.BufferReader(storage.read_bytes(uri))).read_all()


def _targets(ref) -> pa.Table:
    """The target table behind an ObjectRef, fetched once per worker process."""
    import ray

    key = ref.hex()
    if key not in _TARGETS_CACHE:
        _TARGETS_CACHE.clear()
        _TARGETS_CACHE[key] = ray.get(ref)
    return _TARGETS_CACHE[key]


_TARGETS_CACHE: dict[str, pa.Table] = {}


def sample_splits_batch(batch: pa.Table, targets_ref, uris_ref, work: str, lowercase: bool, max_line_bytes: int,
                        window: int, seed: int) -> pa.Table:
    """Ray Data step 1: sample each split and write its rows as one fragment per bucket.

    The fragments under `work/bucket-XXXXX/` are the exchange between the two steps: a
    shuffle through storage, which scales past the object store and needs no shuffle
    actors. A retried task rewrites the same fragment names, so retries are harmless.
    """
    with storage.secrets_scrubbed():
        return _sample_splits(batch, targets_ref, uris_ref, work, lowercase, max_line_bytes, window, seed)


def _sample_splits(batch: pa.Table, targets_ref, uris_ref, work: str, lowercase: bool, max_line_bytes: int,
                   window: int, seed: int) -> pa.Table:
    targets = _targets(targets_ref)
    written = []
    for row in batch.to_pylist():
        split = split_of(row, uris_ref)  # (a `split_rows` row)
        rows = sample_split(split, targets, lowercase, max_line_bytes, window, seed).sort_by("bucket")
        buckets = rows["bucket"].to_numpy()
        bounds = np.flatnonzero(np.diff(buckets)) + 1
        for lo, hi in zip(np.concatenate(([0], bounds)), np.concatenate((bounds, [len(buckets)]))):
            if hi > lo:
                name = f"split-{split.file_id:06d}-{split.start:015d}.arrow"
                write_fragment(storage.join(fragment_dir(work, int(buckets[lo])), name),
                               rows.slice(lo, hi - lo).drop_columns(["bucket"]))
        written.append(rows.num_rows)
    return pa.table({"sampled": written})


def write_buckets_batch(batch: pa.Table, targets_ref, work: str, output: str, cap: int) -> pa.Table:
    """Ray Data step 2: gather each bucket's fragments, select its contexts, write its parquet file."""
    targets = _targets(targets_ref)
    rows = []
    for bucket in batch["bucket"].to_pylist():
        where = fragment_dir(work, bucket)
        fragments = [read_fragment(f.uri) for f in storage.list_files(where)] if storage.exists(where) else []
        samples = pa.concat_tables(fragments) if fragments else SAMPLE_SCHEMA.empty_table().drop_columns(["bucket"])
        table = select_contexts(samples, targets, bucket, cap)
        storage.write_parquet(bucket_uri(output, bucket), table)
        n = pc.list_value_length(table["contexts"]).to_numpy(zero_copy_only=False)
        rows.append({"bucket": bucket, "words": table.num_rows, "contexts": int(n.sum()),
                     "words_without_contexts": int((n == 0).sum())})
    return pa.Table.from_pylist(rows)


def build_buckets(splits: list[Split], targets: pa.Table, output: str, *, num_buckets: int, cap: int,
                  lowercase: bool, max_line_bytes: int, window: int, seed: int, progress=None) -> list[dict]:
    """The distributed sampling pass; writes `contexts/bucket-XXXXX.parquet`, returns per-bucket counts.

    `progress(items, total, unit, desc)` wraps each pass's stream of finished tasks (a job's progress bar)."""
    progress = progress or (lambda items, total, unit, desc: items)
    import ray

    work = storage.join(output, "_work")
    # --- Ray: the target table goes to the object store once; tasks fetch it by reference.
    targets_ref = ray.put(targets)
    items, uris_ref = split_rows(splits)  # (no credential of a URI in Ray's logs)
    ds = ray.data.from_items(items, override_num_blocks=len(splits))
    sampled = ds.map_batches(sample_splits_batch, batch_size=1, batch_format="pyarrow",
                             fn_kwargs=dict(targets_ref=targets_ref, uris_ref=uris_ref, work=work, lowercase=lowercase,
                                            max_line_bytes=max_line_bytes, window=window, seed=seed))
    for _ in progress(sampled.iter_batches(batch_size=None, batch_format="pyarrow"), len(splits), "splits",
                      "preprocess: sampling contexts"):
        pass
    buckets = ray.data.from_items([{"bucket": b} for b in range(num_buckets)], override_num_blocks=num_buckets)
    summary = buckets.map_batches(write_buckets_batch, batch_size=1, batch_format="pyarrow",
                                  fn_kwargs=dict(targets_ref=targets_ref, work=work, output=output, cap=cap))
    rows = [row for block in progress(summary.iter_batches(batch_size=None, batch_format="pyarrow"), num_buckets,
                                      "buckets", "preprocess: writing buckets") for row in block.to_pylist()]
    rows.sort(key=lambda r: r["bucket"])
    # ---
    storage.delete(work)
    return rows
