"""Preprocess a corpus: vocabulary with counts, and sampled contexts per word in buckets.

    python -m jobs.preprocess --corpus data/corpus/ --output out/preprocessed
    python -m jobs.preprocess --corpus s3://bucket/corpus/*.txt.gz --output s3://bucket/pre
    python -m jobs.preprocess --corpus data/corpus --words my_words.txt --output out/my-words

Writes to --output: `vocab.parquet` (word, count) and `train.vwcN` text files;
`contexts/bucket-XXXXX.parquet` (word, count, contexts) for every word with count >=
min_count_target (or, with --words, for every word in that file, any count); and
`manifest.json` last, which accounts for every input line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from jobs.common import connect_ray
from pipeline.console import log, progress
from jobs.stage import Stage
from pipeline import contexts, corpus, storage, vocab
from pipeline.config import ConfigError
from pipeline.words import read_words


# What this stage writes under --output (top-level names); nothing else is ever deleted.
OUTPUT_NAMES = ("vocab.parquet", "train.vwc*", "contexts", "_work")


@dataclass(kw_only=True)
class PreprocessOptions:
    """Settings of the preprocessing stage (the part of its config a pipeline preset holds)."""

    min_count_target: int = 100
    """Words occurring at least this often get contexts (training targets)."""
    num_buckets: int = 25
    """Number of parquet buckets the target words are split into (stable hash of the word)."""
    max_contexts_per_word: int = 1000
    """At most this many distinct contexts per word: a uniform, seeded sample of them."""
    context_window: int = 25
    """A context is up to this many tokens either side of the word, within its sentence."""
    lowercase: bool = True
    """Lowercase the corpus before tokenising (switch off for cased models)."""
    oversample: float = 2.0
    """Occurrences kept per word before dedup, as a multiple of max_contexts_per_word."""
    seed: int = 1234
    """Seed of the context sample; the same seed and corpus give the same output."""
    max_line_bytes: int = 1_000_000
    """Lines longer than this (bytes) are skipped and counted as too_long."""
    split_mb: float = 16.0
    """Uncompressed files are read in parallel in byte ranges of about this many MB."""

    def __post_init__(self) -> None:
        for name in ("min_count_target", "num_buckets", "max_contexts_per_word", "context_window",
                     "max_line_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.oversample < 1:
            raise ConfigError(f"--oversample must be >= 1 (a multiple of the cap), got {self.oversample}")
        if self.split_mb <= 0:
            raise ConfigError(f"--split_mb must be > 0, got {self.split_mb}")


@dataclass(kw_only=True)
class PreprocessConfig(PreprocessOptions):
    """Preprocess a corpus into a vocabulary and per-word context buckets."""

    corpus: str
    """Corpus URI: a file, a directory/prefix or a glob of .txt/.gz/.bz2/.zst files (local, s3://, gs://, http)."""
    output: str
    """Output URI (local directory, s3://, gs://)."""
    words: str | None = None
    """Optional file of words (one per line): collect contexts for exactly these, any count."""
    overwrite: bool = False
    """Recompute even if --output already holds a complete result."""
    num_cpus: int | None = None
    """CPUs of a local Ray (ignored when attaching to a cluster through RAY_ADDRESS)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.corpus:
            raise ConfigError("--corpus is empty; give a file, directory, glob or s3:// URI")
        if not self.output:
            raise ConfigError("--output is empty; give a local directory or an s3:// URI")
        out, src = self.output.rstrip("/"), self.corpus.rstrip("/")
        if out == src or out.startswith(src + "/"):
            raise ConfigError("--output must not be --corpus or inside it (the output would be read as corpus); "
                              "choose a location outside the corpus")


def unmatchable_words(words: list[str], lowercase: bool) -> list[str]:
    """Words that the corpus tokenizer splits (or changes), so no corpus token can equal them."""
    tokens = corpus.tokenize(pa.array(words), lowercase).to_pylist()
    return [w for w, t in zip(words, tokens) if t != [w]]


def _inputs(config: PreprocessConfig) -> dict:
    files = storage.list_files(config.corpus)  # inputs are checked before the output is touched
    if not files:
        raise storage.StorageError(f"--corpus {storage.redact(config.corpus)}: no input files found; "
                                   "check the path or glob")
    return {"files": [[storage.redact(f.uri), f.size] for f in files]}


def _check(config: PreprocessConfig) -> list[str] | None:
    return read_words(config.words, "--words", config.lowercase) if config.words else None


def _preprocess(config: PreprocessConfig, words: list[str] | None) -> dict:
    output = config.output
    started = time.time()
    files = storage.list_files(config.corpus)
    connect_ray(config.num_cpus)
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    # At most split_mb per task, and ~4 tasks per CPU (splits of >= 1 MB) so that uneven files balance.
    total = sum(max(f.size, 0) for f in files)
    split_bytes = min(int(config.split_mb * (1 << 20)), max(1 << 20, -(-total // (4 * cpus))))
    splits = corpus.make_splits(files, split_bytes)
    log(f"preprocess: {len(files)} files, {total / 1e6:.1f} MB, {len(splits)} splits, {cpus} CPUs")

    t0 = time.time()
    counts, lines, tokens = vocab.count_vocab(splits, config.lowercase, config.max_line_bytes, progress)
    count_s = time.time() - t0
    vocab_files = vocab.write_vocab(counts, output, [0, config.min_count_target])
    log(f"preprocess: {lines.read} lines ({lines.used} used), {tokens} tokens, {counts.num_rows} words "
        f"in {count_s:.1f}s")
    if not lines.used:
        skipped = ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in lines.skipped.items() if n)
        raise storage.UserError(f"--corpus {storage.redact(config.corpus)}: none of its {lines.read} lines is usable "
                                f"text ({skipped or 'no lines'}); give UTF-8 text with one or more sentences per "
                                "line (.gz/.bz2/.zst named by their suffix)")
    targets, unmatchable, not_targets = _targets(config, counts, words)

    t0 = time.time()
    buckets = contexts.build_buckets(
        splits, targets, output, num_buckets=config.num_buckets, cap=config.max_contexts_per_word,
        lowercase=config.lowercase, max_line_bytes=config.max_line_bytes, window=config.context_window,
        seed=config.seed, progress=progress)
    sample_s = time.time() - t0
    n_contexts = sum(b["contexts"] for b in buckets)
    without = sum(b["words_without_contexts"] for b in buckets)
    log(f"preprocess: {targets.num_rows} target words, {n_contexts} contexts in {config.num_buckets} buckets "
        f"in {sample_s:.1f}s")
    if without:
        log(f"preprocess: warning: {without} words have no context in the corpus (kept with an empty list)")
    log(f"preprocess: done in {time.time() - started:.1f}s -> {storage.redact(output)}")
    return dict(mode="words" if words is not None else "train", words_not_single_tokens=unmatchable,
                lines=lines.as_dict(), tokens=tokens, words=counts.num_rows, target_words=targets.num_rows,
                not_targets=not_targets, contexts_written=n_contexts, words_without_contexts=without,
                files={"vocab": [storage.redact(u) for u in vocab_files],
                       "contexts": [storage.redact(contexts.bucket_uri(output, b)) for b in range(config.num_buckets)]},
                buckets=buckets, timings={"count_s": round(count_s, 3), "sample_s": round(sample_s, 3)},
                ray={"cpus": cpus})


def _targets(config: PreprocessConfig, counts: pa.Table, words: list[str] | None) -> tuple[pa.Table, list, dict]:
    """The words that get contexts (every word with count >= min_count_target, or --words), the --words the
    corpus tokenizer cannot match, and the frequent tokens that are no target (the sentence end)."""
    unmatchable = unmatchable_words(words, config.lowercase) if words is not None else []
    not_targets: dict[str, list[str]] = {}
    if words is None:
        chosen = counts.filter(pc.greater_equal(counts["count"], config.min_count_target))
        is_end = pc.equal(chosen["word"], corpus.SENTENCE_END)
        if pc.any(is_end).as_py():  # the sentence boundary the corpus tokenizer inserts: never a target
            not_targets["sentence_end_token"] = [corpus.SENTENCE_END]
        chosen = chosen.filter(pc.invert(is_end))
        if not chosen.num_rows:
            top = pc.max(counts["count"]).as_py() if counts.num_rows else 0
            raise storage.UserError(
                f"--corpus {storage.redact(config.corpus)}: no word occurs --min_count_target "
                f"{config.min_count_target} times ({counts.num_rows} distinct words, the most frequent {top} "
                "times); lower --min_count_target or give a larger corpus")
        target_words, target_counts = chosen["word"].to_pylist(), chosen["count"].to_numpy()
    else:
        known = dict(zip(counts["word"].to_pylist(), counts["count"].to_pylist()))
        target_words, target_counts = words, [known.get(w, 0) for w in words]
        if unmatchable:
            log(f"preprocess: warning: {len(unmatchable)} --words entries are not single tokens for the corpus "
                f"tokenizer and cannot have contexts, e.g. {unmatchable[:5]}")
    targets = contexts.targets_table(target_words, target_counts, config.num_buckets,
                                     config.max_contexts_per_word, config.oversample)
    return targets, unmatchable, not_targets


STAGE = Stage(name="preprocess", config=PreprocessConfig, outputs=OUTPUT_NAMES, inputs=_inputs, check=_check,
              work=_preprocess,
              summary=lambda m: f"{m['lines']['used']} lines, {m['tokens']} tokens, {m['target_words']} target words")
preprocess = STAGE.run

if __name__ == "__main__":
    STAGE.main(__doc__, "preprocess")
