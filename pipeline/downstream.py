"""Downstream fidelity: what the user's model computes when a word reaches it through its vector,
against what it computes when it truly knows the word.

    own, pieces = downstream.word_inputs(tokenizer, words)            # single-token words and their pieces without it
    split = downstream.split_sentences(contexts, sentences=8, seed=0)  # word -> (what BERTRAM reads, what is scored)
    vectors = infer.infer_vectors(bertram, btok, {w: pool[:8] for w, (pool, _) in split.items()})
    pooling = downstream.pooling_of(model_path)                       # the model's own (sentence-transformers), else mean
    result = downstream.fidelity(lm, tokenizer, {"bertram, 8 contexts": vectors},
                                 {w: scored for w, (_, scored) in split.items()}, pieces, own, pooling)
    print(downstream.markdown_table(downstream.summary_rows(result), pooling, result["row_norm"]))

A held-out word is a single token of the language model that BERTRAM never trained on, so in a
sentence with it the model's output with the word's own token is the **reference**: what the model
gives when it knows the word. What reaches the model in the word's place:

* `pieces`: the pieces the word would get without its own token (`pieces_without_own_token`): the
  model without BERTRAM, as it sees a rare word it splits;
* `mean of pieces (one token)`: one token whose input row is the mean of those pieces' rows (a
  naive control: does a vector need BERTRAM at all?);
* each BERTRAM vector set (e.g. from 1, 8, 16 contexts): one token whose input row is the vector,
  exactly what the augmented model does with the plain word (`pipeline.augment.add_plain_words`).

Two outputs are compared with the reference by cosine, per (word, sentence): the **sentence
embedding** users compute (the model's own pooling: a sentence-transformers model's Pooling module,
otherwise the mean over the tokens) and the **word-position** last hidden state (at the word's
last token). Differences between inputs come with 95% bootstrap intervals over words, and
`gap_closed` says how much of the word-position distance between pieces (0) and the true token (1)
an input closes. The sentences scored are never the ones the vectors were inferred from
(`split_sentences`). Pure library, no Ray: `jobs.evaluate` calls it.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.batching import mask_word
from pipeline.targets import pieces_without_own_token, split_by_pieces

PIECES = "pieces"
MEAN = "mean of pieces (one token)"
REFERENCE = "reference"
POOLINGS = ("mean", "cls", "max")


def pooling_of(model_path: str) -> str:
    """How the model's users pool a sentence: its sentence-transformers Pooling module's mode (mean, cls or
    max) when `model_path` is a local sentence-transformers model, otherwise `mean` (mean over the tokens)."""
    try:
        with open(os.path.join(model_path, "modules.json"), encoding="utf-8") as f:
            modules = json.load(f)
        pooling = next(m for m in modules if str(m.get("type", "")).endswith(".Pooling"))
        with open(os.path.join(model_path, pooling.get("path", ""), "config.json"), encoding="utf-8") as f:
            settings = json.load(f)
    except (OSError, StopIteration, ValueError):
        return "mean"
    for mode in ("cls", "max", "mean"):
        if settings.get(f"pooling_mode_{mode}_token" if mode == "cls" else f"pooling_mode_{mode}_tokens"):
            return mode
    return "mean"


def word_inputs(tokenizer, words: Sequence[str]) -> tuple[dict[str, int], dict[str, list[int]]]:
    """(word → its token id in running text, word → the pieces it would get without that token) for the words
    the tokenizer keeps as one token and can split without an unknown piece."""
    single, ids, _, _ = split_by_pieces(list(words), tokenizer)
    try:
        pieces = pieces_without_own_token(tokenizer, single) if single else []
    except ValueError:  # a tokenizer model whose vocabulary cannot be reduced
        return {}, {}
    kept = [(w, i, p) for w, i, p in zip(single, ids, pieces) if p]
    return {w: i for w, i, _ in kept}, {w: p for w, _, p in kept}


def split_sentences(contexts: Mapping[str, Sequence[str]], sentences: int = 8,
                    seed: int = 0) -> dict[str, tuple[list[str], list[str]]]:
    """word → (contexts BERTRAM may read, sentences to score): each word's distinct contexts that hold it as a
    whole word, shuffled (seeded), the first min(`sentences`, half) kept for scoring and never read by
    BERTRAM. Words with fewer than 2 such contexts are left out."""
    out = {}
    for word, cs in contexts.items():
        cs = [c for c in dict.fromkeys(cs) if mask_word(word, c, "[MASK]") is not None]
        if len(cs) < 2:
            continue
        random.Random(f"{seed}:{word}").shuffle(cs)
        n = min(sentences, len(cs) // 2)
        out[word] = (cs[n:], cs[:n])
    return out


def splice(ids: Sequence[int], own: int, table: torch.Tensor,
           parts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Input rows (L', D) of token `ids` with every `own` token replaced by the rows `parts` (each (D,)), and
    the positions of the word's last row."""
    rows, last = [], []
    for i in ids:
        rows += parts if i == own else [table[i]]
        if i == own:
            last.append(len(rows) - 1)
    return torch.stack(rows), last


@torch.inference_mode()
def encode(lm, rows: Sequence[torch.Tensor], at: Sequence[Sequence[int]], pooling: str = "mean",
           batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit sentence embeddings (N, D) of input rows (L_i, D) through `inputs_embeds`, and the mean last hidden
    state (N, D) at each input's positions `at`; inputs of alike length share a pass (little padding)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    device = next(lm.parameters()).device
    dim = rows[0].shape[1]
    sentences, hidden = torch.zeros(len(rows), dim), torch.zeros(len(rows), dim)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        longest = max(len(rows[i]) for i in idx)
        embeds = torch.zeros(len(idx), longest, dim, device=device)  # (B, L, D); padding rows are masked
        mask = torch.zeros(len(idx), longest, dtype=torch.long, device=device)  # (B, L)
        for b, i in enumerate(idx):
            embeds[b, :len(rows[i])], mask[b, :len(rows[i])] = rows[i].to(device), 1
        h = lm(inputs_embeds=embeds, attention_mask=mask).last_hidden_state.float()  # (B, L, D)
        if pooling == "cls":
            pooled = h[:, 0]
        elif pooling == "max":
            pooled = h.masked_fill(mask.unsqueeze(-1) == 0, float("-inf")).max(1).values
        else:
            pooled = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)  # (B, D)
        for b, i in enumerate(idx):
            sentences[i] = F.normalize(pooled[b], dim=-1).cpu()
            hidden[i] = h[b, list(at[i])].mean(0).cpu()
    return sentences, hidden


def fidelity(lm, tokenizer, vectors: Mapping[str, Mapping[str, torch.Tensor]], sentences: Mapping[str, Sequence[str]],
             pieces: Mapping[str, Sequence[int]], own: Mapping[str, int], pooling: str = "mean",
             max_length: int = 64, batch: int = 64) -> dict:
    """Per input style, per word, the cosines of its sentences' outputs to the reference's.

    `vectors`: label → word → vector (D,) (e.g. {"bertram, 8 contexts": ...}); `sentences`: word → the
    sentences to score; `pieces`: word → its pieces without its own token; `own`: word → its token id in
    running text. A sentence is scored when its first `max_length` tokens hold the word's own token.
    Returns {"words": [...], "sentences": n, "scores": {style: {word: (sentence cosines, word-position
    cosines)}}, "norms": {label: median vector norm}, "row_norm": median norm of the words' true rows}.
    """
    table = lm.get_input_embeddings().weight.detach().float().cpu()  # (V, D)
    words = [w for w in sentences if w in own and pieces.get(w) and all(w in v for v in vectors.values())]
    keys, rows, lasts = [], [], []
    for w in words:
        piece_rows = [table[i] for i in pieces[w]]
        parts = {REFERENCE: [table[own[w]]], PIECES: piece_rows, MEAN: [torch.stack(piece_rows).mean(0)],
                 **{label: [torch.as_tensor(v[w]).float().cpu()] for label, v in vectors.items()}}
        for s, sentence in enumerate(sentences[w]):
            ids = tokenizer(sentence, truncation=True, max_length=max_length)["input_ids"]
            if own[w] not in ids:
                continue  # the word fell beyond the truncation, or is tokenized differently here
            for style, part in parts.items():
                r, last = splice(ids, own[w], table, part)
                keys.append((w, s, style)), rows.append(r), lasts.append(last)
    if not rows:
        return {"words": [], "sentences": 0, "pooling": pooling, "scores": {}, "norms": {}, "row_norm": float("nan")}
    sent, hid = encode(lm, rows, lasts, pooling, batch)
    at = {k: i for i, k in enumerate(keys)}
    scored = [w for w in words if any((w, s, REFERENCE) in at for s in range(len(sentences[w])))]
    styles = [PIECES, MEAN, *vectors]
    scores: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {style: {} for style in styles}
    for w in scored:
        refs = [at[(w, s, REFERENCE)] for s in range(len(sentences[w])) if (w, s, REFERENCE) in at]
        for style in styles:
            mine = [at[(w, s, style)] for s in range(len(sentences[w])) if (w, s, REFERENCE) in at]
            scores[style][w] = ((sent[mine] * sent[refs]).sum(-1).numpy(),
                                F.cosine_similarity(hid[mine], hid[refs], dim=-1).numpy())
    norms = {label: float(torch.stack([torch.as_tensor(v[w]).float() for w in scored]).norm(dim=-1).median())
             for label, v in vectors.items()} if scored else {}
    return {"words": scored, "sentences": sum(len(scores[PIECES][w][0]) for w in scored), "pooling": pooling,
            "scores": scores, "norms": norms,
            "row_norm": float(table[[own[w] for w in scored]].norm(dim=-1).median()) if scored else float("nan")}


def score_model(bertram, bertram_tokenizer, lm, tokenizer, contexts: Mapping[str, Sequence[str]],
                counts: Sequence[int] = (1, 8, 16), sentences: int = 8, seed: int = 0, pooling: str = "mean",
                max_length: int = 64, max_seq_length: int = 128, label: str = "bertram") -> dict:
    """`fidelity` of a BERTRAM model's vectors from `counts` contexts for the single-token words of `contexts`
    (word → its contexts): what `jobs.evaluate` reports. Returns the `fidelity` result with its `rows`."""
    from pipeline import infer

    own, pieces = word_inputs(tokenizer, list(contexts))
    split = split_sentences({w: contexts[w] for w in own}, sentences, seed)
    with torch.inference_mode():
        vectors = {f"{label}, {n} contexts": infer.infer_vectors(bertram, bertram_tokenizer,
                                                                 {w: pool[:n] for w, (pool, _) in split.items()},
                                                                 max_seq_length=max_seq_length)
                   for n in counts}
    result = fidelity(lm, tokenizer, vectors, {w: s for w, (_, s) in split.items()}, pieces, own, pooling, max_length)
    result["rows"] = summary_rows(result)
    return result


def paired_interval(diffs: Sequence[np.ndarray], resamples: int = 1000, seed: int = 0) -> list[float]:
    """95% bootstrap interval of the sentence-weighted mean of per-word differences, words resampled."""
    if not diffs:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    sums, counts = np.array([d.sum() for d in diffs]), np.array([len(d) for d in diffs])
    picks = rng.integers(0, len(diffs), size=(resamples, len(diffs)))
    means = sums[picks].sum(1) / counts[picks].sum(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def summary_rows(result: dict) -> list[dict]:
    """One row per input style: mean sentence and word-position cosines to the reference, the sentence
    gain over pieces and over the mean-of-pieces control with their 95% intervals, and the share of the
    word-position gap (pieces → true token) closed."""
    scores, words = result["scores"], result["words"]
    if not words:
        return []

    def mean(style: str, which: int) -> float:
        return float(np.concatenate([scores[style][w][which] for w in words]).mean())

    base_token = mean(PIECES, 1)
    rows = []
    for style in scores:
        row = {"input": style, "words": len(words), "sentences": result["sentences"],
               "sentence_cosine": mean(style, 0), "token_cosine": mean(style, 1),
               "gap_closed": (mean(style, 1) - base_token) / (1 - base_token) if base_token < 1 else float("nan")}
        if style != PIECES:
            row["minus_pieces"] = row["sentence_cosine"] - mean(PIECES, 0)
            row["minus_pieces_ci"] = paired_interval([scores[style][w][0] - scores[PIECES][w][0] for w in words])
        if style not in (PIECES, MEAN):
            row["minus_mean"] = row["sentence_cosine"] - mean(MEAN, 0)
            row["minus_mean_ci"] = paired_interval([scores[style][w][0] - scores[MEAN][w][0] for w in words])
            row["norm"] = result["norms"].get(style)
        rows.append(row)
    return rows


def _gain(value: float | None, ci: list[float] | None) -> str:
    if value is None:
        return ""
    return f"{value:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]"


def markdown_table(rows: list[dict], pooling: str, row_norm: float) -> str:
    """The downstream table and its caption."""
    lines = ["| in the word's place | words | sentences | sentence cosine | − pieces (95% CI) | "
             "− mean of pieces (95% CI) | word-position cosine | gap closed | vector norm |",
             "|---|---:|---:|---:|---|---|---:|---:|---:|"]
    for r in rows:
        norm = f"{r['norm']:.2f}" if r.get("norm") is not None else ""
        lines.append(f"| {r['input']} | {r['words']} | {r['sentences']} | {r['sentence_cosine']:.4f} | "
                     f"{_gain(r.get('minus_pieces'), r.get('minus_pieces_ci'))} | "
                     f"{_gain(r.get('minus_mean'), r.get('minus_mean_ci'))} | {r['token_cosine']:.3f} | "
                     f"{r['gap_closed']:.2f} | {norm} |")
    lines += ["", f"Cosine to the model's output with the word's true token (1 = as if the model knew the word), per "
              f"(word, sentence); sentence embedding by {pooling} pooling, word position = the last "
              "hidden state at the word. gap closed: share of the word-position distance from pieces (0) to the true "
              "token (1). 95% intervals: bootstrap over words. vector norm: median; the true rows' median is "
              f"{row_norm:.2f}."]
    return "\n".join(lines)
