"""Use a trained BERTRAM model: infer word vectors and give them to a language model.

    from pipeline import augment, infer
    bertram, tokenizer = infer.load("s3://bucket/bertram-add")  # or a local directory
    vectors = infer.infer_vectors(bertram, tokenizer, {"kumquat": ["a kumquat is a small orange fruit ."]})
    lm, lm_tokenizer = AutoModelForMaskedLM.from_pretrained(name), AutoTokenizer.from_pretrained(name)
    augment.add_plain_words(vectors, lm_tokenizer, lm)  # plain "kumquat" now carries its vector
    lm(**lm_tokenizer("a kumquat is sweet", return_tensors="pt"))

(`name` is the language model BERTRAM was trained for, `bertram.config.base_model`. Or
`augment.add_word_vectors_to_model` adds the token <BERTRAM:kumquat> for rewritten text:
`augment.rewrite` gives "a kumquat / <BERTRAM:kumquat> is sweet", the paper's input;
pipeline/augment.py says how the two differ.)

A word's vector comes from its form (character n-grams) and/or its contexts, depending on
the model's mode. Contexts that do not contain the word as a whole word are skipped. A
model with a form part (form, add, add-quotes, replace, shallow, gated) gives the form vector to a
word without usable contexts; a context-only model cannot, and says so.

Pure library, no Ray: the Ray Data batch inference job calls `infer_vectors` per block.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from pipeline import storage
from pipeline.augment import check_word
from pipeline.batching import encode, usable_contexts
from pipeline.model import Bertram, uses_context, uses_form
from pipeline.targets import word_pieces

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TOKENIZER_DIR = "tokenizer"  # where `Bertram.save_pretrained(uri, tokenizer=...)` puts the tokenizer

WordsWithContexts = Mapping[str, Sequence[str]] | Iterable[tuple[str, Sequence[str]]]


# ---------------------------------------------------------------------------------------
# Loading


def load(uri: str, device: str | torch.device = "cpu") -> tuple[Bertram, PreTrainedTokenizerBase]:
    """A saved BERTRAM model (in eval mode, on `device`) and its tokenizer.

    The tokenizer is the one saved under `<uri>/tokenizer` when there is one, else the
    base model's (`AutoTokenizer.from_pretrained(config.base_model)`).
    """
    model = Bertram.from_pretrained(uri, device)
    return model, load_tokenizer(uri, model.config.base_model)


def load_tokenizer(uri: str, base_model: str) -> PreTrainedTokenizerBase:
    """The tokenizer saved with the BERTRAM model at `uri`, else the one of `base_model`."""
    from transformers import AutoTokenizer

    saved = storage.join(uri, TOKENIZER_DIR)
    if storage.is_local(uri):
        return AutoTokenizer.from_pretrained(saved if os.path.isdir(saved) else base_model)
    try:
        files = storage.list_files(saved)
    except storage.StorageError:
        files = []
    if not files:
        return AutoTokenizer.from_pretrained(base_model)
    with tempfile.TemporaryDirectory() as tmp:  # transformers reads local directories only
        for f in files:
            path = os.path.join(tmp, *f.uri[len(saved):].strip("/").split("/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as out:
                out.write(storage.read_bytes(f.uri))
        return AutoTokenizer.from_pretrained(tmp)


def read_words(uri: str) -> list[str]:
    """Words of a words file (one per line; blank lines skipped, surrounding space stripped), first occurrence first."""
    words = [line.strip() for line in storage.read_text(uri).splitlines()]
    words = list(dict.fromkeys(w for w in words if w))
    if not words:
        raise storage.UserError(f"the words file {storage.redact(uri)} holds no words; write one word per line")
    return words


def read_contexts(uri: str, words: Iterable[str] | None = None) -> dict[str, list[str]]:
    """word → contexts from a contexts dataset, optionally only for `words`.

    `uri` is a `jobs.preprocess` output (its `contexts/` buckets are read), a parquet file
    or directory of parquet files with `word` and `contexts` columns, or the reference
    bucket text format (`word<TAB>context1<TAB>context2...`, one word per line; any file
    not ending in `.parquet`). A word listed twice gets the union of its contexts.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    wanted = None if words is None else pa.array(sorted(set(words)), pa.string())
    base = storage.join(uri, "contexts") if storage.exists(storage.join(uri, "manifest.json")) else uri
    files = storage.list_files(base)
    if not files:
        raise storage.UserError(f"--contexts {storage.redact(uri)} holds no files; give a jobs.preprocess output, "
                                "parquet with word and contexts columns, or word<TAB>context... text")
    merged: dict[str, dict[str, None]] = {}
    for f in files:
        if f.uri.endswith(".parquet"):
            table = storage.read_parquet(f.uri)
            if not {"word", "contexts"} <= set(table.column_names):
                raise storage.UserError(f"{storage.redact(f.uri)} has columns {table.column_names}; a contexts "
                                        "parquet needs 'word' and 'contexts' (list of strings)")
            if wanted is not None:
                table = table.filter(pc.is_in(table["word"], wanted))
            pairs = zip(table["word"].to_pylist(), table["contexts"].to_pylist())
        else:
            rows = (line.split("\t") for line in storage.read_text(f.uri).splitlines() if line.strip())
            pairs = ((r[0].strip(), [c for c in r[1:] if c.strip()]) for r in rows)
            if wanted is not None:
                keep = set(wanted.to_pylist())
                pairs = ((w, cs) for w, cs in pairs if w in keep)
        for word, contexts in pairs:
            merged.setdefault(word, {}).update(dict.fromkeys(contexts or []))
    return {w: list(cs) for w, cs in merged.items()}


# ---------------------------------------------------------------------------------------
# Inference


@torch.inference_mode()
def infer_vector(model: Bertram, tokenizer: PreTrainedTokenizerBase, word: str, contexts: Sequence[str] = (),
                 max_seq_length: int = 128) -> torch.Tensor:
    """The inferred vector (D,) of one word from all its contexts in one forward pass (on the CPU)."""
    _check(word, contexts)
    model.eval()
    return _infer(model, tokenizer, [word], [list(contexts)], max_seq_length)[0].float().cpu()  # (D,)


@torch.inference_mode()
def infer_vectors(model: Bertram, tokenizer: PreTrainedTokenizerBase, words_with_contexts: WordsWithContexts,
                  batch_contexts: int = 64, max_contexts_per_chunk: int = 32,
                  max_seq_length: int = 128, tokens_per_pass: int | None = None) -> dict[str, torch.Tensor]:
    """Inferred vectors (D,) of many words, many words per forward pass; on the CPU, in input order.

    Words are packed into one forward pass until their contexts reach `batch_contexts` (64 is
    best on CPU, where larger passes are slower per token; on a GPU use e.g. 1024). A
    word with more than `max_contexts_per_chunk` usable contexts is split into chunks of
    that size, and its vector is the mean of the chunk vectors weighted by chunk size (this
    bounds the (C, C) attentive-mimicking matrix and the batch). With `tokens_per_pass`, a pass
    also holds no more contexts than fit in that many padded tokens (chunks are sorted by their
    longest context). A word that occurs several times is inferred once from the union of its
    contexts (duplicates dropped, order kept).
    """
    if batch_contexts < 1 or max_contexts_per_chunk < 1:
        raise ValueError(f"batch_contexts and max_contexts_per_chunk must be >= 1, got {batch_contexts} and "
                         f"{max_contexts_per_chunk}")
    model.eval()
    merged = _merge(words_with_contexts)
    mode = model.config.mode
    if uses_context(mode):
        # Keep only the contexts that contain the word, so that chunks hold usable contexts
        # and a context-only model fails before any work when a word has none.
        merged = {w: usable_contexts(w, cs) for w, cs in merged.items()}
        if not uses_form(mode):
            _require_contexts([w for w, cs in merged.items() if not cs])
    else:
        merged = {w: [] for w in merged}  # a form model reads no contexts
    if model.config.pieces:
        word_pieces(tokenizer, list(merged))  # every word's pieces at once (memoised): one reduced vocabulary
    chunks = [(w, cs[i:i + max_contexts_per_chunk]) for w, cs in merged.items()
              for i in range(0, max(len(cs), 1), max_contexts_per_chunk)]
    # A pass is padded to its longest context: passes of chunks whose longest contexts are
    # alike keep the encoder on real tokens (in input order, 2/3 of the demo's were padding).
    flat = [c for _, cs in chunks for c in cs]
    lengths = iter(tokenizer(flat, add_special_tokens=False, return_length=True)["length"] if flat else [])
    longest = [max((next(lengths) for _ in cs), default=0) for _, cs in chunks]
    by_length = sorted(range(len(chunks)), key=longest.__getitem__)
    chunks, longest = [chunks[i] for i in by_length], [min(longest[i] + 2, max_seq_length) for i in by_length]

    sums: dict[str, torch.Tensor] = {}  # word -> sum over its chunks of size * vector
    sizes: dict[str, int] = {}
    for batch in _pack(chunks, batch_contexts, longest, tokens_per_pass):
        words = [w for w, _ in batch]
        vectors = _infer(model, tokenizer, words, [cs for _, cs in batch], max_seq_length)  # (B, D)
        for (word, cs), vector in zip(batch, vectors.float().cpu()):
            size = max(len(cs), 1)
            sums[word] = sums.get(word, 0) + size * vector  # (D,)
            sizes[word] = sizes.get(word, 0) + size
    return {w: sums[w] / sizes[w] for w in merged}


def _infer(model: Bertram, tokenizer: PreTrainedTokenizerBase, words: list[str], contexts: list[list[str]],
           max_seq_length: int) -> torch.Tensor:
    """Vectors (B, D) of `words` from one forward pass (word b reads `contexts[b]`).

    A word none of whose contexts could be used gets its form vector; in context mode
    that is a ValueError.
    """
    mode = model.config.mode
    device = next(model.parameters()).device
    pieces = word_pieces(tokenizer, words) if model.config.pieces else None
    t = encode(words, contexts, tokenizer, mode, max_seq_length, model.ngram_vocab, pieces).to(device).tensors
    if not uses_context(mode) or model.config.pieces:  # (a pieces model weighs form and pieces alone itself)
        return model(**t)  # (B, D)
    used = torch.bincount(t["context_word"], minlength=len(words)).cpu()  # (B,)
    if not uses_form(mode):
        _require_contexts([w for w, n in zip(words, used.tolist()) if n == 0])
        return model(**t)  # (B, D)
    # The forward pass gives a word without contexts a vector from nothing (the context
    # layer's bias); replace it with the form vector.
    form = model.form(t["ngram_ids"])  # (B, D)
    if int(used.sum()) == 0:
        return form
    vectors = model(**t)  # (B, D)
    return torch.where((used > 0).to(device).unsqueeze(-1), vectors, form)  # (B, D)


def _require_contexts(missing: list[str]) -> None:
    if missing:
        shown = ", ".join(repr(w) for w in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"no usable context for {shown}: a context-only BERTRAM model needs at least one context "
                         "that contains the word as a whole word; pass such contexts, or use a model with a form "
                         "part (form, add, add-quotes, replace, shallow, gated)")


def _check(word: str, contexts: Sequence[str]) -> None:
    check_word(word)
    if isinstance(contexts, str):
        raise ValueError(f"the contexts of {word!r} must be a list of strings, got one string; wrap it in a list")


def _merge(words_with_contexts: WordsWithContexts) -> dict[str, list[str]]:
    """word → its contexts, duplicate words merged and duplicate contexts dropped, first occurrence first."""
    items = words_with_contexts.items() if isinstance(words_with_contexts, Mapping) else words_with_contexts
    merged: dict[str, dict[str, None]] = {}
    for word, contexts in items:
        _check(word, contexts)
        merged.setdefault(word, {}).update(dict.fromkeys(contexts))
    return {w: list(cs) for w, cs in merged.items()}


def _pack(chunks: list[tuple[str, list[str]]], batch_contexts: int, widths: list[int] | None = None,
          tokens_per_pass: int | None = None) -> Iterator[list[tuple[str, list[str]]]]:
    """Consecutive chunks, grouped while their contexts fit in `batch_contexts` (a chunk without any counts 1)
    and, with `tokens_per_pass`, in that many padded tokens (`widths`: each chunk's longest context, ascending)."""
    batch: list[tuple[str, list[str]]] = []
    size = 0
    for i, (word, contexts) in enumerate(chunks):
        n = max(len(contexts), 1)
        over = tokens_per_pass is not None and widths is not None and (size + n) * widths[i] > tokens_per_pass
        if batch and (size + n > batch_contexts or over):
            yield batch
            batch, size = [], 0
        batch.append((word, contexts))
        size += n
    if batch:
        yield batch


class Inferrer:
    """A loaded BERTRAM model and how to run it: the one inference function of `jobs.infer` (its Ray Data actors)
    and `jobs.serve` (its Serve replicas), so that both give a word the same vector from the same contexts.

    `items` are (word, contexts) pairs; a word may come twice with other contexts (two requests on a server):
    each pair gets the vector of its own contexts (the pairs run in rounds of distinct words)."""

    def __init__(self, bertram: str, device: str = "cpu", bf16: bool = True, threads: int | None = None,
                 **settings: int | None):
        from pipeline.model import autocast

        if threads:  # actors side by side must not oversubscribe the cores
            torch.set_num_threads(max(1, int(threads)))
        self.model, self.tokenizer = load(bertram, device)
        self.settings = settings  # batch_contexts, max_contexts_per_chunk, max_seq_length, tokens_per_pass
        self.autocast = autocast(device, bf16)

    def __call__(self, items: Sequence[tuple[str, Sequence[str]]]) -> torch.Tensor:
        """The vectors (N, D), float32 on the CPU, of the N (word, contexts) pairs, in their order."""
        out: list[torch.Tensor | None] = [None] * len(items)
        for round_ in _rounds([word for word, _ in items]):
            with self.autocast:
                vectors = infer_vectors(self.model, self.tokenizer, [items[i] for i in round_], **self.settings)
            for i in round_:
                out[i] = vectors[items[i][0]]
        dim = self.model.config.output_size
        return torch.stack(out) if out else torch.zeros(0, dim)  # (N, D)


def _rounds(words: Sequence[str]) -> list[list[int]]:
    """Positions of `words` in rounds where no word is twice (its first occurrences first)."""
    rounds: list[list[int]] = []
    taken: list[set[str]] = []
    for i, word in enumerate(words):
        k = next((k for k, seen in enumerate(taken) if word not in seen), len(rounds))
        if k == len(rounds):
            rounds.append([])
            taken.append(set())
        rounds[k].append(i)
        taken[k].add(word)
    return rounds


class InferActor:
    """Ray Data actor (jobs.infer): loads the BERTRAM model and its tokenizer once (an `Inferrer`), infers a
    batch of words (a pyarrow table of word, contexts) per call into vectors.parquet's rows."""

    def __init__(self, bertram: str, use_gpu: bool, bf16: bool = True, **settings: int):
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)  # intra-op threads: its CPUs
        self.inferrer = Inferrer(bertram, "cuda" if use_gpu else "cpu", bf16, threads=int(cpus), **settings)

    def __call__(self, batch):
        from pipeline.words import vectors_table

        words, contexts = batch["word"].to_pylist(), batch["contexts"].to_pylist()
        vectors = self.inferrer(list(zip(words, contexts)))  # (W, D)
        return vectors_table(words, vectors.numpy(), [len(cs) for cs in contexts])
