"""Evaluation: how well inferred vectors reconstruct the language model's own embeddings.

For words the tokenizer keeps as one token we know the true answer (their row of the
input embedding matrix). Held out of training (`jobs.train --exclude_words`), such words
show how well BERTRAM infers an embedding from 1, 4, 16 contexts: the cosine to the true
embedding, and the rank of the true word among all input embeddings by cosine to the
inferred vector (1 = the nearest). The baseline is what the language model would do if
the word were not in its vocabulary: the mean embedding of the word pieces it would be
split into.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def wordpiece_without(word: str, vocab: dict[str, int]) -> list[int] | None:
    """WordPiece pieces of `word` (greedy longest match, `##` continuations) as if `word` itself
    were not a token; None when some part cannot be matched."""
    pieces, start = [], 0
    while start < len(word):
        end = len(word)
        while end > start:
            piece = word[start:end] if start == 0 else "##" + word[start:end]
            if piece in vocab and not (start == 0 and end == len(word)):
                pieces.append(vocab[piece])
                break
            end -= 1
        if end == start:
            return None
        start = end
    return pieces


def mean_of_pieces(words: Sequence[str], tokenizer, embedding: torch.Tensor) -> dict[str, torch.Tensor]:
    """The baseline vector of each word: the mean embedding of its pieces without it (WordPiece models)."""
    vocab = tokenizer.get_vocab()
    out = {}
    for word in words:
        pieces = wordpiece_without(word, vocab)
        if pieces:
            out[word] = embedding[pieces].mean(0)
    return out


def sample_contexts(contexts: dict[str, list[str]], n: int, seed: int) -> dict[str, list[str]]:
    """`n` contexts per word (all of them when it has fewer), the same for the same seed."""
    rng = random.Random(seed)
    return {w: rng.sample(c, min(n, len(c))) for w, c in contexts.items()}


def cosine_and_rank(predicted: dict[str, torch.Tensor], true_ids: dict[str, int],
                    embedding: torch.Tensor) -> dict[str, float]:
    """Mean cosine of predicted to true embeddings; median and mean rank of the true word among all
    embeddings (1 = nearest); share with the true word in the nearest 10."""
    words = [w for w in predicted if w in true_ids]
    if not words:
        return {"n": 0, "cosine": float("nan"), "median_rank": float("nan"), "mean_rank": float("nan"),
                "hits@10": float("nan")}
    pred = torch.stack([predicted[w].float() for w in words])  # (W, D)
    ids = torch.tensor([true_ids[w] for w in words])
    table = F.normalize(embedding.float(), dim=-1)  # (V, D)
    sims = F.normalize(pred, dim=-1) @ table.T  # (W, V)
    true_sim = sims[torch.arange(len(words)), ids]  # (W,)
    ranks = (sims > true_sim[:, None]).sum(1) + 1  # (W,)
    return {"n": len(words), "cosine": float(true_sim.mean()), "median_rank": float(ranks.float().median()),
            "mean_rank": float(ranks.float().mean()), "hits@10": float((ranks <= 10).float().mean())}


def reconstruction(models: dict[str, tuple], contexts: dict[str, list[str]], tokenizer, embedding: torch.Tensor,
                   counts: Sequence[int] = (1, 4, 16), seed: int = 0) -> list[dict]:
    """Rows (model, contexts, n, cosine, ranks) for each model and number of contexts, plus the baseline.

    `models` maps a name to (Bertram, its tokenizer); `contexts` holds the evaluation
    words (single tokens of `tokenizer`) and their contexts.
    """
    from pipeline.infer import infer_vectors

    vocab = tokenizer.get_vocab()
    true_ids = {w: vocab[w] for w in contexts if w in vocab}
    rows = [{"model": "mean of word pieces (baseline)", "contexts": "-",
             **cosine_and_rank(mean_of_pieces(list(true_ids), tokenizer, embedding), true_ids, embedding)}]
    for name, (model, model_tokenizer) in models.items():
        for n in counts:
            chosen = {w: c for w, c in sample_contexts(contexts, n, seed + n).items() if w in true_ids}
            with torch.inference_mode():
                vectors = infer_vectors(model, model_tokenizer, chosen)
            rows.append({"model": name, "contexts": n, **cosine_and_rank(vectors, true_ids, embedding)})
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | contexts | words | cosine | median rank | hits@10 |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['contexts']} | {r['n']} | {r['cosine']:.3f} | {r['median_rank']:.0f} | "
                     f"{r['hits@10']:.2f} |")
    return "\n".join(lines)


def hold_out(words: Sequence[str], fraction: float, seed: int) -> list[str]:
    """A seeded sample of `fraction` of `words` (sorted), e.g. single-token targets to keep out of training."""
    rng = np.random.default_rng(seed)
    k = max(1, int(round(fraction * len(words))))
    return sorted(rng.choice(sorted(words), size=k, replace=False).tolist())
