"""Quality: the held-out reconstruction table of a jobs.run output, regenerated.

    python benchmarks/quality.py --run out/demo-s3/run      # after `make demo` (the bucket's local copy)
    python benchmarks/quality.py --run out/demo             # a local jobs.run output

The run's held-out words (`heldout.txt`, never trained on) are inferred by its fused,
form and context models from 1, 4 and 16 of their contexts and compared with their true
input embeddings, next to the mean-of-word-pieces baseline: cosine, MRR of the true token
among all rows, median rank, hits@10, and the spread (mean pairwise cosine among a model's
vectors; the true embeddings' own is printed under the table: a collapsed model is far
above it). Runs jobs.evaluate into `<run>/evaluation-quality/` (report.md, reconstruction.png,
pca.png) and writes the table to benchmarks/results/quality.md.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobs.evaluate import EvaluateConfig, evaluate  # noqa: E402
from pipeline import manifest, storage  # noqa: E402
from pipeline import evaluate as ev  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results", "quality.md")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a jobs.run output (local directory or s3://)")
    p.add_argument("--counts", default="1,4,16")
    p.add_argument("--results", default=RESULTS)
    args = p.parse_args()
    run = args.run
    fused = manifest.read(storage.join(run, "fused"))
    model = manifest.read(storage.join(run, "targets"))["config"]["model"]
    out = storage.join(run, "evaluation-quality")
    report = evaluate(EvaluateConfig(
        bertram=storage.join(run, "fused"), compare=[f"form={storage.join(run, 'form')}",
                                                     f"context={storage.join(run, 'context')}"],
        model=model, output=out, heldout=storage.join(run, "heldout.txt"), contexts=storage.join(run, "preprocessed"),
        counts=[int(c) for c in args.counts.split(",")], max_seq_length=fused["config"]["max_seq_length"],
        overwrite=True))
    rows = storage.read_json(storage.join(out, "report.json"))["reconstruction"]["rows"]
    text = "\n".join([
        f"# Quality: held-out reconstruction of `{storage.redact(run)}`", "",
        f"`python benchmarks/quality.py --run {storage.redact(run)}`; fused mode {fused['mode']}, model {model}.", "",
        ev.markdown_table(rows), "",
        f"Plots: {storage.redact(storage.join(out, 'reconstruction.png'))}, {storage.redact(storage.join(out, 'pca.png'))}",
        ""])
    print(text)
    with open(args.results, "w") as f:
        f.write(text)
    del report


if __name__ == "__main__":
    main()
