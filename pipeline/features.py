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
import torch

from pipeline import manifest, storage
from pipeline.batching import encode, usable_contexts
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


@torch.inference_mode()
def compute_features(model, tokenizer, words: list[str], contexts: list[list[str]], max_seq_length: int,
                     batch_contexts: int = 64) -> list[np.ndarray]:
    """(n_w, H') features of each word's contexts through `model.encode_contexts`.

    Contexts are independent here, so passes pack contexts of *all* words sorted by length
    (little padding), then the features are regrouped by word. A context in which the
    tokenizer loses the word is dropped (as in training and inference).
    """
    device = next(model.parameters()).device
    t = encode(words, contexts, tokenizer, "context", max_seq_length).tensors
    n = len(t.get("input_ids", ()))
    dim = model.mimicking.linear.in_features
    if n == 0:
        return [np.zeros((0, dim), np.float32) for _ in words]
    lengths = t["attention_mask"].sum(1)  # (N,)
    order = torch.argsort(lengths, stable=True)
    out = torch.empty((n, dim), dtype=torch.float32)
    for i in range(0, n, batch_contexts):
        rows = order[i:i + batch_contexts]
        width = int(lengths[rows].max())
        feats = model.encode_contexts(t["input_ids"][rows, :width].to(device),
                                      t["attention_mask"][rows, :width].to(device),
                                      t["mask_positions"][rows].to(device))
        out[rows] = feats.float().cpu()
    owner = t["context_word"]
    return [out[owner == b].numpy() for b in range(len(words))]


class FeatureActor:
    """Ray Data actor: loads the frozen encoder once (as a context-mode BERTRAM model, so that the
    features are computed by the very code inference runs); a block of words per call."""

    def __init__(self, model: str, context_features: str, max_seq_length: int, batch_contexts: int,
                 use_gpu: bool, bf16: bool = True):
        import ray
        from transformers import AutoTokenizer

        from pipeline.model import Bertram

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))
        self.device = "cuda" if use_gpu else "cpu"
        self.model = Bertram.create("context", model, context_features=context_features).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.max_seq_length, self.batch_contexts = max_seq_length, batch_contexts
        self.autocast = autocast(self.device, bf16)

    def __call__(self, batch: pa.Table) -> pa.Table:
        words, counts = batch["word"].to_pylist(), batch["count"].to_pylist()
        with self.autocast:
            feats = compute_features(self.model, self.tokenizer, words, batch["contexts"].to_pylist(),
                                     self.max_seq_length, self.batch_contexts)
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
