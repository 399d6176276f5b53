"""Infer word vectors with a trained BERTRAM model, on a Ray Data actor pool.

    python -m jobs.infer --bertram out/fused --words my_words.txt --corpus data/corpus --output out/vectors
    python -m jobs.infer --bertram s3://bucket/fused --contexts s3://bucket/pre --output s3://bucket/vectors
    python -m jobs.infer --bertram out/fused --contexts contexts.tsv --words my_words.txt --output out/vectors

Contexts come from a corpus (`--words` + `--corpus`: jobs.preprocess gathers them into
`<output>/preprocessed`, for every listed word whatever its count) or from `--contexts` (a
jobs.preprocess output, parquet with word and contexts columns, or the reference
`word<TAB>context1<TAB>context2...` text); `--words` with `--contexts` keeps only those
words. A word without contexts gets its form vector from a model with a form part.

Writes `vectors.parquet` (word, vector, n_contexts = the contexts read, those that contain
the word), `vectors.txt` (`<word> <v1> ... <vn>`) and `manifest.json` last; words in the
order of the words file, else of --contexts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from jobs.common import connect_ray
from pipeline.console import log, progress
from jobs import preprocess
from jobs.stage import Stage, upstream
from pipeline.infer import InferActor, read_contexts, usable_contexts
from pipeline import manifest, storage
from pipeline.config import ConfigError
from pipeline.model import saved_config, uses_context, uses_form
from pipeline.words import in_token_syntax, read_words, token_syntax_error
from pipeline.words import vector_lines

OUTPUT_NAMES = ("vectors.parquet", "vectors.txt")
PREPROCESSED = "preprocessed"  # the sub-output where --corpus contexts are gathered
PREPROCESS_BUCKETS = 8  # an inference word list is small next to a training vocabulary


@dataclass(kw_only=True)
class InferOptions:
    """Settings of the inference stage (the part of its config a pipeline preset holds)."""

    batch_contexts: int | None = None
    """Most contexts per forward pass (several words per pass); default 64 on CPU (the fastest there, BENCHMARKS.md), 4096 with --use_gpu."""
    tokens_per_pass: int | None = None
    """Padded tokens per forward pass (words sorted by their longest context, as many as fit, at most batch_contexts contexts); default: no limit on CPU, 262144 with --use_gpu."""
    max_contexts_per_chunk: int = 32
    """A word with more contexts is inferred in chunks of this many; its vector is their size-weighted mean."""
    max_seq_length: int = 128
    """Tokens per encoder input; a longer context is cut around the word."""
    max_contexts_per_word: int = 64
    """At most this many contexts per word are read: a seeded sample of --corpus, the first ones of --contexts."""
    context_window: int = 25
    """With --corpus: a context is up to this many tokens either side of the word, within its sentence."""
    lowercase: bool = True
    """With --corpus: lowercase the corpus and the words (switch off for cased models)."""
    num_actors: int | None = None
    """Inference actors (each loads the model once); default: CPUs / cpus_per_actor, or one per GPU with --use_gpu."""
    cpus_per_actor: int = 1
    """CPUs (intra-op threads) of each actor."""
    use_gpu: bool = False
    """Give each actor a GPU and infer there."""
    bf16: bool = True
    """Run the model under bf16 autocast on a GPU or a CPU with bf16 units (AMX / AVX-512 BF16); vectors are float32."""
    write_text: bool = True
    """Also write vectors.txt in the `<word> <v1> ... <vn>` text format."""

    def __post_init__(self) -> None:
        if self.batch_contexts is None:  # resolved here: the manifest records the size the passes had
            self.batch_contexts = 4096 if self.use_gpu else 64
        if self.tokens_per_pass is None and self.use_gpu:
            self.tokens_per_pass = 262_144
        for name in ("batch_contexts", "tokens_per_pass", "max_contexts_per_chunk", "max_contexts_per_word",
                     "context_window", "cpus_per_actor"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.max_seq_length < 8:
            raise ConfigError(f"--max_seq_length must be >= 8, got {self.max_seq_length}")
        if self.num_actors is not None and self.num_actors < 1:
            raise ConfigError(f"--num_actors must be >= 1, got {self.num_actors}")


@dataclass(kw_only=True)
class InferConfig(InferOptions):
    """Infer vectors for words (rare ones above all) from their form and contexts."""

    bertram: str
    """URI of a trained BERTRAM model (jobs.train or jobs.fuse output)."""
    output: str
    """Output URI (local directory, s3://, gs://)."""
    words: str | None = None
    """File of words (one per line) to infer vectors for; needed with --corpus, optional with --contexts."""
    corpus: str | None = None
    """Corpus URI to gather the contexts of --words from: file, directory/prefix or glob (local, s3://, gs://, http)."""
    contexts: str | None = None
    """Contexts instead of --corpus: a jobs.preprocess output, parquet (word, contexts) or word<TAB>context... text."""
    overwrite: bool = False
    """Recompute even if --output already holds a complete result."""
    num_cpus: int | None = None
    """CPUs of a local Ray (ignored when attaching to a cluster through RAY_ADDRESS)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.output:
            raise ConfigError("--output is empty; give a local directory or an s3:// URI")
        if self.corpus and self.contexts:
            raise ConfigError("give either --words with --corpus (contexts gathered from the corpus) or --contexts, "
                              "not both")
        if self.corpus and not self.words:
            raise ConfigError("--corpus needs --words, the file of words (one per line) to gather contexts for")
        if not self.corpus and not self.contexts:
            raise ConfigError("no contexts: give --words FILE --corpus URI (contexts gathered from a corpus) or "
                              "--contexts URI (a jobs.preprocess output, parquet or word<TAB>context... text)")


def _shown(words: list[str]) -> str:
    return ", ".join(repr(w) for w in words[:5]) + (f" and {len(words) - 5} more" if len(words) > 5 else "")


def _no_contexts_error(uri: str, words: list[str]) -> ConfigError:
    return ConfigError(f"--bertram {storage.redact(uri)} is a context-only model, and {len(words)} words have no "
                       f"context that contains them: {_shown(words)}; give contexts for them, or use a model with "
                       "a form part (form, add, add-quotes, replace, shallow, gated)")


def _words(config: InferConfig, mode: str) -> list[str] | None:
    """The words of --words (lowercased with --corpus and --lowercase, as the corpus is), or None."""
    if not config.corpus:
        return read_words(config.words) if config.words else None
    words = read_words(config.words, lowercase=config.lowercase)
    if not uses_form(mode) and (never := preprocess.unmatchable_words(words, config.lowercase)):
        raise _no_contexts_error(config.bertram, never)  # they can never have contexts: fail before the corpus
    return words


def gather(config: InferConfig, mode: str, words: list[str] | None) -> tuple[list[str], dict[str, list[str]]]:
    """The words, in input order, and the contexts inference reads for each (those containing it, capped).

    Words from --corpus are gathered into the `preprocessed/` sub-output by the preprocess stage, which this
    stage runs as a sub-stage (its reset keeps that sub-output: `STAGE.keep`).
    A context-only model fails here for words without contexts, before any inference.
    """
    if config.corpus:
        source = storage.join(config.output, PREPROCESSED)
        # The sub-output is reused unless the words file now holds other words (same name, new content).
        stale = manifest.is_complete(source) and set(read_contexts(source)) != set(words)
        preprocess.STAGE.run(preprocess.PreprocessConfig(
            corpus=config.corpus, output=source, words=config.words, num_buckets=PREPROCESS_BUCKETS,
            max_contexts_per_word=config.max_contexts_per_word, context_window=config.context_window,
            lowercase=config.lowercase, overwrite=config.overwrite or stale, num_cpus=config.num_cpus))
    else:
        source = config.contexts
    found = read_contexts(source, words)
    if words is None and (syntax := [w for w in found if in_token_syntax(w)]):  # (--words are checked as read)
        raise token_syntax_error(f"--contexts {storage.redact(config.contexts)}", syntax[0])
    words = words if words is not None else list(found)
    if not words:
        raise storage.UserError(f"--contexts {storage.redact(config.contexts)} holds no words")
    contexts = {w: usable_contexts(w, found.get(w, []), config.max_contexts_per_word)
                if uses_context(mode) else [] for w in words}  # a form model reads no contexts
    if uses_context(mode) and not uses_form(mode) and (without := [w for w in words if not contexts[w]]):
        raise _no_contexts_error(config.bertram, without)
    return words, contexts


def infer_on_ray(config: InferConfig, words: list[str], contexts: dict[str, list[str]]) -> tuple[pa.Table, int]:
    """vectors.parquet's table, in the order of `words`, from an actor pool; and the number of actors."""
    import ray

    resources = ray.cluster_resources()
    if config.use_gpu and not resources.get("GPU"):
        raise ConfigError("--use_gpu: the Ray cluster has no GPU; add GPU workers or pass --use_gpu false")
    per_actor = 1 if config.use_gpu else config.cpus_per_actor
    actors = config.num_actors or max(1, int(resources.get("GPU", 0)) if config.use_gpu
                                      else int(resources.get("CPU", 1)) // per_actor)
    # Blocks of about 8 forward passes each (a block's passes are packed by length), and at
    # least 2 blocks per actor so that the actors share the work.
    weight = sum(max(len(cs), 1) for cs in contexts.values())
    blocks = min(len(words), max(2 * actors, -(-weight // (8 * config.batch_contexts))))
    actors = min(actors, blocks)
    # --- Ray: a dataset of (word, contexts) rows through an actor pool, each actor holding the model.
    ds = ray.data.from_items([{"word": w, "contexts": contexts[w]} for w in words], override_num_blocks=blocks)
    vectors = ds.map_batches(InferActor, batch_size=-(-len(words) // blocks), batch_format="pyarrow",
                             compute=ray.data.ActorPoolStrategy(size=actors),
                             num_cpus=per_actor, num_gpus=1 if config.use_gpu else 0,
                             fn_constructor_kwargs={"bertram": storage.absolute(config.bertram),
                                                    "use_gpu": config.use_gpu, "bf16": config.bf16,
                                                    "batch_contexts": config.batch_contexts,
                                                    "tokens_per_pass": config.tokens_per_pass,
                                                    "max_contexts_per_chunk": config.max_contexts_per_chunk,
                                                    "max_seq_length": config.max_seq_length})
    done = vectors.iter_batches(batch_size=None, batch_format="pyarrow")
    table = pa.concat_tables(list(progress(done, len(words), "words", "infer", count=lambda t: t.num_rows)))
    # ---
    return in_order(table, words), actors


def in_order(table: pa.Table, words: list[str]) -> pa.Table:
    """The rows of `table` in the order of `words`, whatever order the actors finished in."""
    position = {w: i for i, w in enumerate(words)}
    return table.take(np.argsort([position[w] for w in table["word"].to_pylist()]))


def _inputs(config: InferConfig) -> dict:
    saved_config(config.bertram)
    inputs = upstream(bertram=(config.bertram, None))
    for flag in ("words", "corpus", "contexts"):  # inputs are checked before the output is touched
        uri = getattr(config, flag)
        if uri:
            inputs[flag] = [[storage.redact(f.uri), f.size] for f in storage.list_files(uri)]
    return inputs


def _check(config: InferConfig) -> tuple[str, dict, list[str] | None]:
    model = saved_config(config.bertram)
    return model["mode"], model, _words(config, model["mode"])


def _infer(config: InferConfig, ready: tuple[str, dict, list[str] | None]) -> dict:
    mode, model, words = ready
    started = time.time()
    words, contexts = gather(config, mode, words)
    without = [w for w in words if not contexts[w]]
    n_contexts = sum(len(cs) for cs in contexts.values())
    gather_s = time.time() - started
    if uses_context(mode):
        log(f"infer: {len(words)} words, {n_contexts} contexts, {len(without)} words without contexts"
            + (" (they get their form vectors)" if without else ""))
    else:
        log(f"infer: {len(words)} words; a form model reads no contexts")

    connect_ray(config.num_cpus)
    t0 = time.time()  # the actor pool's time: starting the actors, loading the model in each, inferring
    table, actors = infer_on_ray(config, words, contexts)
    infer_s = time.time() - t0

    t0 = time.time()
    storage.write_parquet(storage.join(config.output, "vectors.parquet"), table)
    not_in_text = 0
    if config.write_text:
        lines, not_in_text = vector_lines(table["word"].to_pylist(), table["vector"].to_numpy(zero_copy_only=False))
        storage.write_text(storage.join(config.output, "vectors.txt"), "".join(line + "\n" for line in lines))
        if not_in_text:
            log(f"infer: warning: {not_in_text} words hold whitespace and are only in vectors.parquet")
    return dict(mode=mode, base_model=model["base_model"], dim=model["output_size"],
                words=table.num_rows, contexts=n_contexts, words_without_contexts=len(without),
                words_without_contexts_sample=without[:20], words_not_in_text=not_in_text, actors=actors,
                words_per_s=round(table.num_rows / infer_s, 2),
                timings={"gather_s": round(gather_s, 3), "infer_s": round(infer_s, 3),
                         "write_s": round(time.time() - t0, 3)})


STAGE = Stage(name="infer", config=InferConfig, outputs=OUTPUT_NAMES, keep=(PREPROCESSED,), inputs=_inputs,
              check=_check, work=_infer,
              done=lambda c, m: f"{m['words']} vectors ({m['words_per_s']:.1f} words/s on {m['actors']} actors) -> "
                                f"{storage.redact(c.output)}",
              summary=lambda m: f"{m.get('words')} words")
infer = STAGE.run

if __name__ == "__main__":
    STAGE.main(__doc__, "infer")
