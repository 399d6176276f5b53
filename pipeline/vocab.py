"""The counting pass: corpus splits → (word, count) for every token, on Ray Data.

Each Ray Data task reads one split, tokenises it in Arrow and counts its tokens
(`pc.value_counts`: what travels is distinct words, not occurrences); the driver merges
the partial counts as they stream back (Arrow `group_by().aggregate`), which is far
cheaper on small clusters than a Ray Data hash shuffle and keeps driver memory at about
one vocabulary. Line statistics travel in the same rows under keys that start with a
space — a token never contains whitespace, so they cannot collide with a word.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.corpus import SKIP_REASONS, LineStats, Split, decode_lines, read_split, split_of, split_rows, tokenize

_STAT = " stat:"  # prefix of the line-statistics rows; see the module docstring
VOCAB_SCHEMA = pa.schema([("word", pa.string()), ("count", pa.int64())])


def count_tokens(tokens: pa.ListArray) -> pa.Table:
    """(word, count) for the tokens of a batch of lines."""
    counts = pc.value_counts(pc.list_flatten(tokens))
    return pa.table({"word": counts.field("values"), "count": counts.field("counts").cast(pa.int64())})


def _stats_rows(stats: LineStats, tokens: int) -> pa.Table:
    names = ["read", "used", "tokens"] + [f"skipped.{r}" for r in SKIP_REASONS]
    values = [stats.read, stats.used, tokens] + [stats.skipped[r] for r in SKIP_REASONS]
    return pa.table({"word": [_STAT + n for n in names], "count": pa.array(values, pa.int64())})


def count_split(split: Split, lowercase: bool, max_line_bytes: int) -> pa.Table:
    """Partial counts of one split, plus its line-statistics rows."""
    stats, tokens, parts = LineStats(), 0, []
    for raw_lines, _offsets, too_long in read_split(split, max_line_bytes):
        lines, _index, chunk_stats = decode_lines(raw_lines, max_line_bytes)
        chunk_stats.read += too_long
        chunk_stats.skipped["too_long"] += too_long
        stats.add(chunk_stats)
        token_lists = tokenize(lines, lowercase)
        tokens += len(pc.list_flatten(token_lists))
        parts.append(count_tokens(token_lists))
    partial = pa.concat_tables(parts) if parts else VOCAB_SCHEMA.empty_table()
    if len(parts) > 1:
        partial = partial.group_by("word").aggregate([("count", "sum")]).rename_columns(["word", "count"])
    return pa.concat_tables([partial.cast(VOCAB_SCHEMA), _stats_rows(stats, tokens)])


def count_splits_batch(batch: pa.Table, uris_ref, lowercase: bool, max_line_bytes: int) -> pa.Table:
    """Ray Data `map_batches` step: a batch of `split_rows` rows → partial counts."""
    with storage.secrets_scrubbed():
        return pa.concat_tables([count_split(split_of(row, uris_ref), lowercase, max_line_bytes)
                                 for row in batch.to_pylist()])


def split_stats(counts: pa.Table) -> tuple[pa.Table, LineStats, int]:
    """Separate summed counts into (vocab sorted by count desc then word, line stats, tokens)."""
    is_stat = pc.starts_with(counts["word"], _STAT)
    stat_rows = dict(zip(counts.filter(is_stat)["word"].to_pylist(), counts.filter(is_stat)["count"].to_pylist()))
    get = lambda name: int(stat_rows.get(_STAT + name, 0))  # noqa: E731
    stats = LineStats(read=get("read"), used=get("used"),
                      skipped={r: get(f"skipped.{r}") for r in SKIP_REASONS})
    vocab = counts.filter(pc.invert(is_stat)).sort_by([("count", "descending"), ("word", "ascending")])
    return vocab.select(["word", "count"]).cast(VOCAB_SCHEMA), stats, get("tokens")


def _no_progress(items, total, unit, desc):
    return items


def count_vocab(splits: list[Split], lowercase: bool, max_line_bytes: int,
                progress=_no_progress) -> tuple[pa.Table, LineStats, int]:
    """The distributed counting pass. Returns (vocab, line stats, number of tokens).

    Partial counts stream back to the driver and are merged there in Arrow every few
    blocks, so driver memory stays at about one vocabulary (which it needs anyway to
    write `vocab.parquet` and choose the targets), however large the corpus.
    """
    import ray

    # --- Ray: one task per split; partial counts stream back as they finish.
    items, uris_ref = split_rows(splits)  # (no credential of a URI in Ray's logs)
    ds = ray.data.from_items(items, override_num_blocks=len(splits))
    partial = ds.map_batches(count_splits_batch, batch_size=1, batch_format="pyarrow",
                             fn_kwargs={"uris_ref": uris_ref, "lowercase": lowercase, "max_line_bytes": max_line_bytes})
    total, pending = VOCAB_SCHEMA.empty_table(), []
    # (`progress(items, total, unit, desc)` wraps the stream, one item per split: the job's progress bar)
    for block in progress(partial.iter_batches(batch_size=None, batch_format="pyarrow"), len(splits), "splits",
                          "preprocess: counting"):
        # ---
        pending.append(block)
        if sum(t.num_rows for t in pending) > 4 * max(total.num_rows, 1_000_000):
            total, pending = _merge([total, *pending]), []
    return split_stats(_merge([total, *pending]))


def _merge(tables: list[pa.Table]) -> pa.Table:
    summed = pa.concat_tables(tables).group_by("word").aggregate([("count", "sum")])
    return summed.rename_columns(["word", "count"]).cast(VOCAB_SCHEMA)


def write_vocab(vocab: pa.Table, output: str, min_counts: list[int]) -> list[str]:
    """Write `vocab.parquet` and the reference text formats `train.vwcN` (`<word> <count>`)."""
    uri = storage.join(output, "vocab.parquet")
    storage.write_parquet(uri, vocab)
    written = [uri]
    counts = vocab["count"].to_numpy()
    words = vocab["word"].to_pylist()
    for n in sorted(set(min_counts)):
        keep = int(np.searchsorted(-counts, -n, side="right"))  # vocab is sorted by count desc
        text = "".join(f"{w} {c}\n" for w, c in zip(words[:keep], counts[:keep].tolist()))
        uri = storage.join(output, f"train.vwc{n}")
        storage.write_text(uri, text)
        written.append(uri)
    return written


def read_vocab(preprocessed: str) -> pa.Table:
    """`vocab.parquet` of a preprocessed output."""
    return storage.read_parquet(storage.join(preprocessed, "vocab.parquet"))


WORD_LIKE = r"^[^\W\d_][\w'-]*[^\W_]$"  # words, not numbers or punctuation


def rare_words(table: pa.Table, min_count: int, below: int, n: int,
               whole: Callable[[list[str]], set[str]] | None = None) -> tuple[pa.Table, int]:
    """The `n` most frequent word-like entries of a vocabulary table with min_count <= count < below (ties by
    word), without those `whole` names (the words a model keeps as one token), and how many it named."""
    rare = table.filter(pc.and_(pc.greater_equal(table["count"], min_count), pc.less(table["count"], below)))
    rare = rare.filter(pc.match_substring_regex(rare["word"], WORD_LIKE))
    rare = rare.sort_by([("count", "descending"), ("word", "ascending")])
    passed = 0
    if whole is not None and rare.num_rows:
        kept = whole(rare["word"].to_pylist())
        passed, rare = len(kept), rare.filter(pc.invert(pc.is_in(rare["word"], pa.array(sorted(kept), pa.string()))))
    return rare.slice(0, n), passed
