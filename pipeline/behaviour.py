"""Train for how the vectors are used: the frozen language model's outputs with the inferred vector in a
word's place against its outputs with the word's true token, in real sentences.

    settings = BehaviourSettings(steps=200)
    history = tune(bertram, tokenizer, words, contexts, settings)   # words: single-token training words

The paper's One-Token-Approximation idea applied to BERTRAM's own output, with real contexts instead of
random templates. For a training word whose token exists, BERTRAM infers its vector from up to `read` of
its contexts; the language model (BERTRAM's own frozen encoder, which *is* the model the vectors are for)
runs on `sentences` other contexts twice: with the word's true token (the reference, no gradient) and with
the vector as that token's input row. The loss is 1 - cosine between the two last hidden states at the
word's position, plus `sentence_weight` x (1 - cosine) between the mean-pooled sentence embeddings, and
optionally `row_weight` x (1 - cosine) to the true row (today's objective). Gradients reach BERTRAM's
trainable parts through the language model; the encoder stays frozen.

Costs a forward and backward pass of the language model per (word, sentence): an opt-in final stage, see
BENCHMARKS.md ("Training for how the vectors are used"). Pure library, no Ray.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.batching import encode, mask_word
from pipeline.model import Bertram
from pipeline.targets import word_pieces

TRAINABLE = ("gate", "all")


@dataclass
class BehaviourSettings:
    """How long and on what the behaviour objective trains."""

    steps: int = 200
    """Optimizer steps."""
    words_per_step: int = 16
    """Training words per step."""
    read: int = 8
    """At most this many of a word's contexts BERTRAM reads per step (a fresh sample each time)."""
    sentences: int = 2
    """Sentences per word the language model runs on per step (never among those BERTRAM reads that step)."""
    lr: float = 1e-4
    """Adam learning rate."""
    sentence_weight: float = 1.0
    """Weight of the sentence-embedding term next to the word-position term."""
    row_weight: float = 0.0
    """Weight of 1 - cosine to the true row (the embedding objective) added to the loss."""
    trainable: str = "all"
    """all: every trainable part of BERTRAM (not the encoder) | gate: only the gate that mixes the parts."""
    max_length: int = 64
    """Tokens per sentence the language model reads."""
    max_seq_length: int = 48
    """Tokens per context BERTRAM reads."""
    seed: int = 0
    """Seed of the words and contexts drawn per step."""


def trainable_parameters(model: Bertram, which: str) -> list[torch.nn.Parameter]:
    """The parameters the behaviour objective trains (the frozen encoder never)."""
    if which not in TRAINABLE:
        raise ValueError(f"trainable must be one of {', '.join(TRAINABLE)}, got {which!r}")
    encoder = {id(p) for p in model.encoder.parameters()} if hasattr(model, "encoder") else set()
    named = [(n, p) for n, p in model.named_parameters() if id(p) not in encoder]
    if which == "gate":
        named = [(n, p) for n, p in named if n.startswith("gate.")]
    return [p for _, p in named]


def sentence_inputs(tokenizer, word: str, own: int, sentences: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of the sentences whose first `max_length` tokens hold the word's own token."""
    out = []
    for s in sentences:
        ids = tokenizer(s, truncation=True, max_length=max_length)["input_ids"]
        if own in ids:
            out.append(ids)
    return out


def _pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return ids, mask


def lm_outputs(lm, embeds: torch.Tensor, mask: torch.Tensor, at: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) mean last hidden state at the word's positions `at` (N, L bool) and (N, D) mean-pooled sentence."""
    h = lm(inputs_embeds=embeds, attention_mask=mask).last_hidden_state  # (N, L, D)
    word = (h * at.unsqueeze(-1)).sum(1) / at.sum(1, keepdim=True).clamp(min=1)
    sentence = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    return word, sentence


def behaviour_loss(lm, table: torch.Tensor, vectors: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                   own: torch.Tensor, owner: torch.Tensor, reference: tuple[torch.Tensor, torch.Tensor],
                   sentence_weight: float = 1.0) -> torch.Tensor:
    """Mean over sentences of (1 - cos) at the word's position + sentence_weight x (1 - cos) of the sentence
    embedding, with `vectors[owner]` (B, D) as the input row wherever the sentence holds its word's token `own`."""
    at = ids == own[owner].unsqueeze(-1)  # (N, L) the word's positions
    embeds = torch.where(at.unsqueeze(-1), vectors[owner].unsqueeze(1).to(table.dtype), table[ids])  # (N, L, D)
    word, sentence = lm_outputs(lm, embeds, mask, at)
    loss = 1 - F.cosine_similarity(word, reference[0], dim=-1)
    if sentence_weight:
        loss = loss + sentence_weight * (1 - F.cosine_similarity(sentence, reference[1], dim=-1))
    return loss.mean()


def tune(model: Bertram, tokenizer, words: Sequence[str], contexts: Mapping[str, Sequence[str]],
         settings: BehaviourSettings, on_step: Callable[[int, float, float], None] | None = None) -> list[float]:
    """Train `model` in place with the behaviour objective on single-token `words` and their `contexts`;
    returns the loss per step. `on_step(step, loss, seconds)` reports progress."""
    lm = model.encoder
    lm.requires_grad_(False)  # frozen: the gradient flows through it to the vectors only
    table = lm.get_input_embeddings().weight.detach()  # (V, D)
    own_ids = dict(zip(words, tokenizer.convert_tokens_to_ids(list(words))))
    usable = {w: [c for c in dict.fromkeys(contexts.get(w, ())) if mask_word(w, c, "[MASK]") is not None]
              for w in words}
    usable = {w: cs for w, cs in usable.items() if len(cs) >= 2}
    pool = sorted(usable)
    if not pool:
        raise ValueError("behaviour: no training word has two contexts that hold it")
    word_pieces(tokenizer, pool)  # memoised once: the pieces part reads them every step
    params = trainable_parameters(model, settings.trainable)
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    rng = random.Random(settings.seed)
    torch.manual_seed(settings.seed)
    history, started = [], time.time()
    model.train()
    lm.eval()
    for step in range(settings.steps):
        batch = rng.sample(pool, min(settings.words_per_step, len(pool)))
        read, rows, owner = [], [], []
        for b, w in enumerate(batch):
            cs = usable[w][:]
            rng.shuffle(cs)
            n_score = max(1, min(settings.sentences, len(cs) // 2))
            read.append(cs[n_score:n_score + settings.read])
            sentences = sentence_inputs(tokenizer, w, own_ids[w], cs[:n_score], settings.max_length)
            rows += sentences
            owner += [b] * len(sentences)
        if not rows:
            continue
        ids, mask = _pad(rows, tokenizer.pad_token_id)
        owner_t = torch.tensor(owner)
        own = torch.tensor([own_ids[w] for w in batch])
        with torch.no_grad():
            reference = lm_outputs(lm, table[ids], mask, ids == own[owner_t].unsqueeze(-1))
        pieces = word_pieces(tokenizer, batch) if model.config.pieces else None
        t = encode(list(batch), read, tokenizer, model.config.mode, settings.max_seq_length, model.ngram_vocab,
                   pieces).tensors
        vectors = model(**t)  # (B, D)
        loss = behaviour_loss(lm, table, vectors, ids, mask, own, owner_t, reference, settings.sentence_weight)
        if settings.row_weight:
            loss = loss + settings.row_weight * (1 - F.cosine_similarity(vectors, table[own], dim=-1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
        if on_step is not None:
            on_step(step + 1, history[-1], time.time() - started)
    model.eval()
    return history
