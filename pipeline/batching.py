"""(word, contexts) → BERTRAM model tensors.

Each context has every whole-word occurrence of the word replaced by the tokenizer's
mask token, is tokenised, truncated around the (first) mask to `max_seq_length`, and
wrapped as `[CLS] context [SEP]` — or, in the `add` modes, `[CLS] <form> : context [SEP]`
/ `[CLS] " <form> " : context [SEP]` with a placeholder where the form vector goes.
Contexts that do not contain the word are skipped and counted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from pipeline.model import NgramVocab, form_slot, uses_context, uses_form


@dataclass
class Batch:
    """Model inputs for B words and their N contexts (see `Bertram.forward`)."""

    tensors: dict[str, torch.Tensor]
    skipped_contexts: int  # contexts that did not contain their word

    def to(self, device) -> "Batch":
        return Batch({k: v.to(device) for k, v in self.tensors.items()}, self.skipped_contexts)


def mask_word(word: str, context: str, mask_token: str) -> str | None:
    """`context` with each whole-word occurrence of `word` replaced by `mask_token`, or None if absent."""
    pattern = re.compile(rf"(?<![\w]){re.escape(word)}(?![\w])")
    masked, n = pattern.subn(mask_token, context)
    return masked if n else None


def usable_contexts(word: str, contexts: Iterable[str], limit: int | None = None) -> list[str]:
    """The distinct contexts that contain `word` as a whole word (those inference reads), at most the first `limit`."""
    usable = [c for c in dict.fromkeys(contexts) if mask_word(word, c, "[MASK]") is not None]
    return usable[:limit]


def pad_pieces(pieces: list[list[int]]) -> torch.Tensor:
    """(B, P) piece ids, padded with -1 (a word without pieces is a row of -1)."""
    out = torch.full((len(pieces), max((len(p) for p in pieces), default=0) or 1), -1, dtype=torch.long)
    for row, p in enumerate(pieces):
        out[row, :len(p)] = torch.tensor(p, dtype=torch.long)
    return out


def _prefix(tokenizer, mode: str) -> list[int]:
    """Token ids between [CLS] and the context in the add modes (the form placeholder is UNK)."""
    slot = form_slot(mode)
    if slot is None:
        return []
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    placeholder = [tokenizer.unk_token_id]
    prefix = placeholder + ids(" :") if mode == "add" else ids(' "') + placeholder + ids(' "') + ids(" :")
    if prefix.index(tokenizer.unk_token_id) + 1 != slot:
        raise ValueError(f"{mode}: the tokenizer splits the quote into several tokens; the form slot would move")
    return prefix


@dataclass
class Tokenized:
    """The contexts of B words as token rows, before padding: what the CPU does for the encoder.

    `rows[i]` is `[CLS] (prefix) context [SEP]` of context i, `positions[i]` its mask's index, `owner[i]` the
    word (0..B-1) it belongs to; `skipped` counts the contexts without their word. A plain function makes it
    (`tokenize_contexts`): the Ray Data actors, the training collate and a served request all call it.
    """

    rows: list[list[int]]
    positions: list[int]
    owner: list[int]
    skipped: int

    @property
    def lengths(self) -> list[int]:
        return [len(r) for r in self.rows]


def tokenize_contexts(words: list[str], contexts: list[list[str]], tokenizer, mode: str = "context",
                      max_seq_length: int = 128) -> Tokenized:
    """Mask each word in its contexts, tokenise them (one call of the fast tokenizer for all), and cut each to
    `max_seq_length` around its mask; contexts without their word, or whose mask the tokenizer merged into a
    neighbour, are skipped (counted)."""
    texts, owner = [], []
    skipped = 0
    for b, (word, ctxs) in enumerate(zip(words, contexts)):
        for ctx in ctxs:
            masked = mask_word(word, ctx, tokenizer.mask_token)
            if masked is None:
                skipped += 1
            else:
                texts.append(masked)
                owner.append(b)
    prefix = _prefix(tokenizer, mode)
    budget = max_seq_length - 2 - len(prefix)
    rows, positions, kept_owner = [], [], []
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    for ids, b in zip(encoded, owner):
        if tokenizer.mask_token_id not in ids:
            skipped += 1  # the tokenizer merged the mask into a neighbour: nothing to read out
            continue
        pos = ids.index(tokenizer.mask_token_id)
        if len(ids) > budget:  # keep a window of the context centred on the mask
            start = max(0, min(pos - budget // 2, len(ids) - budget))
            ids, pos = ids[start:start + budget], pos - start
        rows.append([tokenizer.cls_token_id] + prefix + ids + [tokenizer.sep_token_id])
        positions.append(1 + len(prefix) + pos)
        kept_owner.append(b)
    return Tokenized(rows, positions, kept_owner, skipped)


def pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T) input ids padded with `pad_id` to the longest row, and the (N, T) attention mask."""
    width = max((len(r) for r in rows), default=0)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (N, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (N, T)
    for i, r in enumerate(rows):
        input_ids[i, :len(r)] = torch.tensor(r)
        attention_mask[i, :len(r)] = 1
    return input_ids, attention_mask


def token_batches(lengths: list[int] | torch.Tensor, token_budget: int, max_rows: int | None = None) -> list[torch.Tensor]:
    """Passes over rows of these `lengths`: each a tensor of row indices, the rows sorted by length (little
    padding), as many per pass as fit in `token_budget` padded tokens (rows x the pass's longest row; at least
    one row), and at most `max_rows`. Every row is in exactly one pass; `torch.cat(passes)` is a permutation
    (scatter results back by it to restore the input order)."""
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    order = torch.argsort(lengths, stable=True)
    passes, start, n = [], 0, len(order)
    sorted_lengths = lengths[order].tolist()
    while start < n:
        end = start + 1
        while end < n and (end + 1 - start) * sorted_lengths[end] <= token_budget and \
                (max_rows is None or end - start < max_rows):
            end += 1
        passes.append(order[start:end])
        start = end
    return passes


def encode(words: list[str], contexts: list[list[str]], tokenizer, mode: str, max_seq_length: int = 128,
           ngram_vocab: NgramVocab | None = None, pieces: list[list[int]] | None = None) -> Batch:
    """Tensors for `Bertram.forward`: n-grams of `words` and their `contexts` (one list per word); with
    `pieces` (a pieces model's `targets.word_pieces` of the words) also `piece_ids`."""
    tensors: dict[str, torch.Tensor] = {}
    if pieces is not None:
        tensors["piece_ids"] = pad_pieces(pieces)
    if uses_form(mode):
        if ngram_vocab is None:
            raise ValueError(f"mode {mode!r} uses the word form: pass the model's ngram_vocab")
        tensors["ngram_ids"] = ngram_vocab.encode(words)  # (B, G)
    if not uses_context(mode):
        return Batch(tensors, 0)
    t = tokenize_contexts(words, contexts, tokenizer, mode, max_seq_length)
    input_ids, attention_mask = pad(t.rows, tokenizer.pad_token_id)
    tensors.update(input_ids=input_ids, attention_mask=attention_mask,
                   mask_positions=torch.tensor(t.positions, dtype=torch.long),
                   context_word=torch.tensor(t.owner, dtype=torch.long))
    return Batch(tensors, t.skipped)
