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

Words are assigned to `num_buckets` buckets by a stable hash of the word.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.corpus import SENTENCE_END, Split, decode_lines, read_split, tokenize

SAMPLE_SCHEMA = pa.schema([("bucket", pa.int32()), ("word", pa.string()), ("count", pa.int64()),
                           ("u", pa.float64()), ("context", pa.string())])
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
        h = _splitmix64(np.full(len(positions), seed, dtype=np.uint64) ^ np.uint64(file_id))
        h = _splitmix64(h ^ line_offsets.astype(np.uint64))
        h = _splitmix64(h ^ positions.astype(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def extract_contexts(tokens: pa.ListArray, line_offsets: np.ndarray, file_id: int, targets: pa.Table,
                     window: int, seed: int) -> pa.Table:
    """Sampled (bucket, word, u, context) rows for the target occurrences in a batch of lines.

    `tokens` holds one token list per line, `line_offsets` each line's byte offset in
    file `file_id` (its stable identity for the hash).
    """
    flat = pc.list_flatten(tokens)
    if len(flat) == 0:
        return SAMPLE_SCHEMA.empty_table()
    line_of = pc.list_parent_indices(tokens).to_numpy()
    line_first_token = tokens.offsets.to_numpy()[:-1]
    is_end = pc.equal(flat, SENTENCE_END).to_numpy(zero_copy_only=False)

    # Sentence id of every token: a new one at each line start and after each ".".
    new_sentence = np.ones(len(flat), dtype=bool)
    new_sentence[1:] = (line_of[1:] != line_of[:-1]) | is_end[:-1]
    sentence = np.cumsum(new_sentence)

    # Drop the "." tokens; windows are runs of equal sentence id in what is left.
    kept = np.flatnonzero(~is_end)
    words = flat.take(pa.array(kept))
    sentence = sentence[kept]
    run_start = np.ones(len(kept), dtype=bool)
    run_start[1:] = sentence[1:] != sentence[:-1]
    starts = np.flatnonzero(run_start)
    run = np.cumsum(run_start) - 1
    first = starts[run]
    end = np.append(starts[1:], len(kept))[run]

    # Which tokens are targets, and which of those occurrences the sample keeps.
    index = pc.fill_null(pc.index_in(words, value_set=targets["word"]), -1).to_numpy(zero_copy_only=False)
    candidates = np.flatnonzero(index >= 0)
    if len(candidates) == 0:
        return SAMPLE_SCHEMA.empty_table()
    original = kept[candidates]
    line = line_of[original]
    u = uniform_hash(seed, file_id, line_offsets[line], original - line_first_token[line])
    keep_prob = targets["keep_prob"].to_numpy()
    chosen = u < keep_prob[index[candidates]]
    sel, u = candidates[chosen], u[chosen]

    # Gather each window's tokens in one `take`, then join each window with spaces.
    lo = np.maximum(first[sel], sel - window)
    hi = np.minimum(end[sel], sel + window + 1)
    lengths = hi - lo
    list_offsets = np.concatenate(([0], np.cumsum(lengths)))
    gather = np.arange(list_offsets[-1]) - np.repeat(list_offsets[:-1] - lo, lengths)
    windows = pa.ListArray.from_arrays(pa.array(list_offsets.astype(np.int64)).cast(pa.int32())
                                       if list_offsets[-1] < 2**31 else pa.array(list_offsets),
                                       words.take(pa.array(gather)))
    context = pc.binary_join(windows, " ")
    bucket = targets["bucket"].to_numpy()[index[sel]]
    return pa.table({"bucket": pa.array(bucket, pa.int32()), "word": words.take(pa.array(sel)),
                     "count": pa.nulls(len(sel), pa.int64()), "u": u, "context": context}, schema=SAMPLE_SCHEMA)


def sample_split(split: Split, targets: pa.Table, lowercase: bool, max_line_bytes: int,
                 window: int, seed: int) -> pa.Table:
    """All sampled context rows of one split."""
    parts = []
    for raw_lines, offsets, _too_long in read_split(split, max_line_bytes):
        lines, index, _stats = decode_lines(raw_lines, max_line_bytes)
        parts.append(extract_contexts(tokenize(lines, lowercase), offsets[index], split.file_id,
                                      targets, window, seed))
    return pa.concat_tables(parts) if parts else SAMPLE_SCHEMA.empty_table()


class ContextSampler:
    """Ray Data actor: holds the target table once, samples contexts for each split row."""

    def __init__(self, targets: pa.Table, lowercase: bool, max_line_bytes: int, window: int, seed: int):
        self.targets = targets
        self.kwargs = dict(lowercase=lowercase, max_line_bytes=max_line_bytes, window=window, seed=seed)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.concat_tables([sample_split(Split(**row), self.targets, **self.kwargs)
                                 for row in batch.to_pylist()])


def select_contexts(rows: pa.Table, cap: int) -> pa.Table:
    """One bucket's rows → (word, count, contexts): dedup, then the `cap` smallest-`u` contexts.

    `rows` mixes sampled rows (with `context`) and one placeholder row per target word
    (with `count`, no context), so words without any sampled context are kept too.
    """
    has_context = pc.is_valid(rows["context"])
    words = rows.filter(pc.invert(has_context)).select(["word", "count"])
    samples = rows.filter(has_context)
    distinct = samples.group_by(["word", "context"], use_threads=False).aggregate([("u", "min")])
    ordered = distinct.sort_by([("word", "ascending"), ("u_min", "ascending")])
    n = ordered.num_rows
    if n:
        w = ordered["word"]
        new_word = np.ones(n, dtype=bool)
        new_word[1:] = ~pc.equal(w.slice(1), w.slice(0, n - 1)).to_numpy(zero_copy_only=False)
        starts = np.flatnonzero(new_word)
        rank = np.arange(n) - starts[np.cumsum(new_word) - 1]
        ordered = ordered.filter(pa.array(rank < cap))
    grouped = ordered.group_by("word", use_threads=False).aggregate([("context", "list")])
    position = pc.index_in(words["word"], value_set=grouped["word"])
    contexts = grouped["context_list"].take(position)  # null where a word has no context
    contexts = pc.if_else(pc.is_null(contexts), pa.scalar([], pa.list_(pa.string())), contexts)
    out = pa.table({"word": words["word"], "count": words["count"], "contexts": contexts}, schema=BUCKET_SCHEMA)
    return out.sort_by([("count", "descending"), ("word", "ascending")])


def bucket_uri(output: str, bucket: int) -> str:
    return storage.join(output, "contexts", f"bucket-{bucket:05d}.parquet")


def write_table(uri: str, table: pa.Table) -> None:
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    storage.write_bytes(uri, sink.getvalue().to_pybytes())


def finalize_bucket(rows: pa.Table, output: str, cap: int) -> pa.Table:
    """Ray Data `map_groups` step: select one bucket's contexts and write its parquet file."""
    bucket = int(rows["bucket"][0].as_py())
    table = select_contexts(rows, cap)
    write_table(bucket_uri(output, bucket), table)
    n_contexts = pc.list_value_length(table["contexts"]).to_numpy(zero_copy_only=False)
    return pa.table({"bucket": [bucket], "words": [table.num_rows], "contexts": [int(n_contexts.sum())],
                     "words_without_contexts": [int((n_contexts == 0).sum())]})


def build_buckets(splits: list[Split], targets: pa.Table, output: str, *, num_buckets: int, cap: int,
                  lowercase: bool, max_line_bytes: int, window: int, seed: int,
                  num_actors: int, num_partitions: int) -> list[dict]:
    """The distributed sampling pass; writes `contexts/bucket-XXXXX.parquet`, returns per-bucket counts."""
    import ray

    placeholders = pa.table({"bucket": targets["bucket"], "word": targets["word"], "count": targets["count"],
                             "u": pa.nulls(targets.num_rows, pa.float64()),
                             "context": pa.nulls(targets.num_rows, pa.string())}, schema=SAMPLE_SCHEMA)
    # --- Ray: an actor pool samples the splits; a groupby on the bucket selects and writes.
    ds = ray.data.from_items([s.__dict__ for s in splits], override_num_blocks=len(splits))
    samples = ds.map_batches(ContextSampler, batch_size=1, batch_format="pyarrow",
                             compute=ray.data.ActorPoolStrategy(min_size=1, max_size=num_actors),
                             fn_constructor_kwargs=dict(targets=targets, lowercase=lowercase,
                                                        max_line_bytes=max_line_bytes, window=window, seed=seed))
    every_word = samples.union(ray.data.from_arrow(placeholders))
    summary = every_word.groupby("bucket", num_partitions=num_partitions).map_groups(
        finalize_bucket, batch_format="pyarrow", fn_kwargs={"output": output, "cap": cap})
    written = {row["bucket"]: row for row in summary.take_all()}
    # ---
    for bucket in range(num_buckets):  # a bucket that got no word still gets its (empty) file
        if bucket not in written:
            write_table(bucket_uri(output, bucket), BUCKET_SCHEMA.empty_table())
            written[bucket] = {"bucket": bucket, "words": 0, "contexts": 0, "words_without_contexts": 0}
    return [written[b] for b in range(num_buckets)]
