"""Probe: does a word's vector depend on the other words in its forward pass (its batch mates)?

    python benchmarks/batch_invariance.py --bertram out/demo-s3/run/fused --contexts_from out/demo-s3/run/preprocessed

A server batches the words of whatever requests wait together, jobs.infer the words of a block, so the
same word and contexts meet other batch mates on each side. Per precision (bf16 autocast, float32):
the min and mean cosine between each word's vector inferred alone and inside one batched call of all
the words (`pipeline.infer.Inferrer`, 1 thread). Writes a markdown table (--report).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import torch  # noqa: E402

from pipeline.infer import Inferrer  # noqa: E402
from pipeline.precision import bf16_available  # noqa: E402
from serve import choose_words  # noqa: E402  (benchmarks/serve.py)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bertram", default="out/demo-s3/run/fused")
    parser.add_argument("--contexts_from", default="out/demo-s3/run/preprocessed")
    parser.add_argument("--words", type=int, default=128)
    parser.add_argument("--contexts", type=int, default=2)
    parser.add_argument("--report", default="benchmarks/results/batch_invariance.md")
    args = parser.parse_args()
    items = list(choose_words(args.contexts_from, args.words, args.contexts).items())
    lines = [f"Command: `python benchmarks/batch_invariance.py {' '.join(sys.argv[1:])}`", "",
             f"{len(items)} words x {args.contexts} contexts, `{args.bertram}`; CPU bf16 units: {bf16_available('cpu')}",
             "", "| precision | min cosine alone vs batched | mean |", "|---|---:|---:|"]
    for bf16 in (True, False):
        inferrer = Inferrer(args.bertram, "cpu", bf16, threads=1, batch_contexts=64)
        together = inferrer(items)
        alone = torch.stack([inferrer([item])[0] for item in items])
        cos = torch.nn.functional.cosine_similarity(together.double(), alone.double())
        lines.append(f"| {'bf16 autocast' if bf16 else 'float32'} | {float(cos.min()):.7f} | {float(cos.mean()):.7f} |")
    text = "\n".join(lines) + "\n"
    Path(args.report).write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
