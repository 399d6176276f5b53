"""Context features of a frozen encoder, computed once and cached (`jobs.features`).

With the encoder frozen, the encoder's output for a (word, context) pair never changes
during training. So instead of running the encoder in every step of every epoch, one
batch-inference pass computes each context's feature vector (`Bertram.encode_contexts`:
the [MASK] state, optionally with more layers or the pooled context, per
`model.CONTEXT_FEATURES`) for a fixed, seeded subset of each training word's contexts, and
the context stage and a shallow or gated fused stage train attentive mimicking, the output layer and the gate on
those vectors for as many epochs as they need.

A features output holds one parquet file per context bucket, `bucket-XXXXX.parquet`, with
the columns `word`, `count` and `features` (a list of float32 vectors per word, one per
sampled context) — the same shape as the preprocessed context buckets, so the training
plan (`pipeline/train.py`) draws instances from it in exactly the same way.

Pure library, no Ray: `jobs/features.py` runs `FeatureActor` on a Ray Data actor pool.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline import manifest, storage
from pipeline.batching import pad, token_batches, tokenize_contexts, usable_contexts
from pipeline.model import autocast

FEATURES_SCHEMA = pa.schema([("word", pa.string()), ("count", pa.int64()),
                             ("features", pa.list_(pa.list_(pa.float32())))])


def sample_contexts(word: str, contexts: list[str], n: int, seed: int) -> list[str]:
    """A seeded sample of at most `n` of the word's usable contexts (those holding it as a whole
    word), in corpus order; the same for the same (seed, word) whatever else is sampled."""
    usable = usable_contexts(word, contexts)
    if len(usable) <= n:
        return usable
    key = int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")
    chosen = np.sort(np.random.default_rng([seed, key]).choice(len(usable), n, replace=False))
    return [usable[i] for i in chosen]


def features_table(words: list[str], counts: list[int], features: list[np.ndarray]) -> pa.Table:
    """A features table: per word its (n, H') float32 feature matrix (n >= 0)."""
    dim = next((f.shape[1] for f in features if f.size), 0)
    flat = pa.array(np.concatenate([f.reshape(-1) for f in features]).astype(np.float32) if features
                    else np.zeros(0, np.float32))
    rows = np.cumsum([0] + [len(f) for f in features]) * dim
    inner = pa.ListArray.from_arrays(pa.array(np.arange(0, rows[-1] + 1, max(dim, 1), dtype=np.int32)
                                              if dim else np.zeros(1, np.int32)), flat)
    outer = pa.ListArray.from_arrays(pa.array(np.cumsum([0] + [len(f) for f in features]), pa.int32()), inner)
    return pa.table({"word": pa.array(words, pa.string()), "count": pa.array(counts, pa.int64()),
                     "features": outer}, schema=FEATURES_SCHEMA)


def feature_matrix(column: pa.ChunkedArray | pa.Array, row: int) -> np.ndarray:
    """The (n, H') float32 features of one row of a `features` column."""
    vectors = column[row].values  # list<float32> of n vectors
    if len(vectors) == 0:
        return np.zeros((0, 0), np.float32)
    return vectors.flatten().to_numpy(zero_copy_only=False).reshape(len(vectors), -1)  # (.values ignores slices)


def tokenize_rows(batch: pa.Table, model: str, max_seq_length: int) -> pa.Table:
    """Ray Data step on CPU workers (`jobs.features` with GPU actors): a block of (word, contexts) rows with
    their contexts as token rows instead (`rows`, list<list<int32>>) and the mask's index in each (`positions`),
    so that the GPU actors receive ready token ids (`batching.tokenize_contexts`: the same function)."""
    tokenizer = _tokenizer(model)
    words, contexts = batch["word"].to_pylist(), batch["contexts"].to_pylist()
    t = tokenize_contexts(words, contexts, tokenizer, "context", max_seq_length)
    owner = np.asarray(t.owner, dtype=np.int64)
    bounds = np.searchsorted(owner, np.arange(len(words) + 1))  # owners are ascending: word b's rows are a range
    rows = pa.array(t.rows, pa.list_(pa.int32()))
    positions = pa.array(np.asarray(t.positions, np.int32))
    return batch.drop_columns(["contexts"]).append_column(
        "rows", pa.ListArray.from_arrays(pa.array(bounds, pa.int32()), rows)).append_column(
        "positions", pa.ListArray.from_arrays(pa.array(bounds, pa.int32()), positions))


_TOKENIZERS: dict[str, object] = {}


def _tokenizer(model: str):
    if model not in _TOKENIZERS:  # once per worker process
        from transformers import AutoTokenizer

        _TOKENIZERS[model] = AutoTokenizer.from_pretrained(model)
    return _TOKENIZERS[model]


@torch.inference_mode()
def compute_features(model, tokenizer, words: list[str], contexts: list[list[str]], max_seq_length: int,
                     batch_contexts: int = 64, tokens_per_pass: int | None = None) -> list[np.ndarray]:
    """(n_w, H') features of each word's contexts through `model.encode_contexts`.

    Contexts are independent here, so passes pack contexts of *all* words sorted by length (little
    padding): at most `batch_contexts` per pass and, with `tokens_per_pass`, as many as fit in that many
    padded tokens; then the features are regrouped by word. A context in which the tokenizer loses the word
    is dropped (as in training and inference).
    """
    t = tokenize_contexts(words, contexts, tokenizer, "context", max_seq_length)
    return features_of_tokens(model, t.rows, t.positions, t.owner, len(words), tokenizer.pad_token_id,
                              batch_contexts, tokens_per_pass)


@torch.inference_mode()
def features_of_tokens(model, rows: list[list[int]], positions: list[int], owner: list[int], n_words: int,
                       pad_id: int, batch_contexts: int = 64, tokens_per_pass: int | None = None) -> list[np.ndarray]:
    """(n_w, H') features of tokenised contexts (`batching.Tokenized`), context i belonging to word owner[i]:
    passes sized by `token_batches`, each context encoded once, regrouped by word in input order."""
    device = next(model.parameters()).device
    dim = model.mimicking.linear.in_features
    n = len(rows)
    if n == 0:
        return [np.zeros((0, dim), np.float32) for _ in range(n_words)]
    lengths = [len(r) for r in rows]
    budget = tokens_per_pass if tokens_per_pass is not None else batch_contexts * max(lengths)
    out = torch.empty((n, dim), dtype=torch.float32)
    positions_t = torch.as_tensor(positions, dtype=torch.long)
    for chosen in token_batches(lengths, budget, max_rows=batch_contexts):
        input_ids, attention_mask = pad([rows[i] for i in chosen.tolist()], pad_id)
        feats = model.encode_contexts(input_ids.to(device), attention_mask.to(device), positions_t[chosen].to(device))
        out[chosen] = feats.float().cpu()
    owner_np = np.asarray(owner, dtype=np.int64)
    order = np.argsort(owner_np, kind="stable")  # word by word, each word's contexts in input order
    return np.split(out.numpy()[order], np.cumsum(np.bincount(owner_np, minlength=n_words))[:-1])


class FeatureActor:
    """Ray Data actor: loads the frozen encoder once (as a context-mode BERTRAM model, so that the
    features are computed by the very code inference runs); a block of words per call, given as contexts or
    as token rows already (`tokenize_rows` on CPU workers, when the actor holds a GPU)."""

    def __init__(self, model: str, context_features: str, max_seq_length: int, batch_contexts: int,
                 use_gpu: bool, bf16: bool = True, tokens_per_pass: int | None = None):
        import ray
        from transformers import AutoTokenizer

        from pipeline.model import Bertram

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))
        self.device = "cuda" if use_gpu else "cpu"
        self.model = Bertram.create("context", model, context_features=context_features).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.max_seq_length, self.batch_contexts, self.tokens_per_pass = max_seq_length, batch_contexts, tokens_per_pass
        self.autocast = autocast(self.device, bf16)

    def __call__(self, batch: pa.Table) -> pa.Table:
        words, counts = batch["word"].to_pylist(), batch["count"].to_pylist()
        with self.autocast:
            if "rows" in batch.column_names:  # tokenised on CPU workers
                per_word = batch["rows"].to_pylist()
                owner = [b for b, rows in enumerate(per_word) for _ in rows]
                feats = features_of_tokens(self.model, [r for rows in per_word for r in rows],
                                           pc.list_flatten(batch["positions"]).to_pylist(), owner, len(words),
                                           self.tokenizer.pad_token_id, self.batch_contexts, self.tokens_per_pass)
            else:
                feats = compute_features(self.model, self.tokenizer, words, batch["contexts"].to_pylist(),
                                         self.max_seq_length, self.batch_contexts, self.tokens_per_pass)
        table = features_table(words, counts, feats)
        return table.append_column("bucket", batch["bucket"])


def shared_context_vectors(context, features: str, max_words: int) -> torch.Tensor:
    """(W, D) the context model's vectors of up to `max_words` training words (the first of each bucket), from
    their cached features: what jobs.fuse takes the directions all context vectors share from."""
    if not manifest.is_complete(features):
        raise storage.ConfigError(f"--features {storage.redact(features)} is not a complete jobs.features output "
                                  "(manifest.json missing); run jobs.features first")
    tables = [storage.read_parquet(f.uri) for f in storage.list_files(features) if "bucket-" in f.uri]
    per_bucket = max(1, max_words // max(1, len(tables)))
    chosen = [torch.from_numpy(feature_matrix(t["features"], r)) for t in tables
              for r in range(min(per_bucket, t.num_rows))]
    return context.context_vectors(chosen)
