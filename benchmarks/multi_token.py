"""Do OTA targets help? Train the same run with OTA, mean-of-pieces and no multi-token targets.

    python -m jobs.run --config jobs/configs/demo.yaml --output out/demo       # the OTA run (the preset)
    python benchmarks/multi_token.py --run out/demo --variants mean skip

Words the tokenizer splits into pieces need a target vector to be trained on: their
One-Token-Approximation (`jobs.targets --multi_token ota`, the paper), the mean of their
pieces' embeddings (`mean`), or none (`skip`: they are not trained on). For each variant
this script computes the targets into `--output/<variant>/targets` and trains form, context
and fused exactly as `jobs.run` does with the same preset (the run's own preprocessed
corpus, held-out words, fusion words and cached features, so only the targets differ),
then evaluates on the run's held-out words. The run itself is the row of its own
`targets.multi_token`. Writes the table to --report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from jobs.evaluate import EvaluateConfig, evaluate  # noqa: E402
from jobs.fuse import FuseConfig, fuse  # noqa: E402
from jobs.run import RunConfig  # noqa: E402
from jobs.targets import TargetsConfig, compute_targets  # noqa: E402
from jobs.train import TrainConfig, train  # noqa: E402
from pipeline import storage  # noqa: E402
from pipeline.config import parse  # noqa: E402
from pipeline.model import reads_cached_features  # noqa: E402


def train_variant(config: RunConfig, run: str, out: str, multi_token: str) -> str:
    """Targets with `multi_token`, then form, context, fuse and fused as jobs.run trains them; the evaluation URI."""
    files = {name: storage.join(run, name) for name in ("preprocessed", "features", "heldout.txt", "fusion_words.txt",
                                                        "excluded_from_parts.txt")}
    path = {name: storage.join(out, name) for name in ("targets", "form", "context", "fused-init", "fused", "evaluation")}
    targets = vars(config.targets) | {"multi_token": multi_token}
    compute_targets(TargetsConfig(**targets, preprocessed=files["preprocessed"], model=config.model,
                                  output=path["targets"]))
    base = dict(preprocessed=files["preprocessed"], targets=path["targets"], model=config.model)
    features = files["features"] if config.cache_features else None
    excluded = files["excluded_from_parts.txt"] if storage.exists(files["excluded_from_parts.txt"]) else None
    train(TrainConfig(**vars(config.form), stage="form", output=path["form"], exclude_words=excluded, **base))
    train(TrainConfig(**vars(config.context), stage="context", output=path["context"], exclude_words=excluded,
                      features=features, **base))
    fuse(FuseConfig(form=path["form"], context=path["context"], mode=config.fuse_mode, output=path["fused-init"]))
    fusion = files["fusion_words.txt"] if storage.exists(files["fusion_words.txt"]) else None
    train(TrainConfig(**vars(config.fused), stage="fused", init=path["fused-init"], output=path["fused"],
                      exclude_words=files["heldout.txt"], only_words=fusion,
                      features=features if reads_cached_features(config.fuse_mode) else None, **base))
    evaluate(EvaluateConfig(**vars(config.evaluate), bertram=path["fused"],
                            compare=[f"form={path['form']}", f"context={path['context']}"], model=config.model,
                            output=path["evaluation"], heldout=files["heldout.txt"], contexts=files["preprocessed"]))
    return path["evaluation"]


def rows_of(evaluation: str) -> dict[tuple[str, str], dict]:
    report = storage.read_json(storage.join(evaluation, "report.json"))
    return {(r["model"], str(r["contexts"])): r for r in report["reconstruction"]["rows"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a finished jobs.run output (its preset is --config)")
    parser.add_argument("--config", default="jobs/configs/demo.yaml", help="the preset the run was made with")
    parser.add_argument("--variants", nargs="+", default=["mean", "skip"], choices=["ota", "mean", "skip"])
    parser.add_argument("--output", default="out/multi-token", help="where the variants are trained")
    parser.add_argument("--report", default="benchmarks/results/multi_token.md")
    args = parser.parse_args(argv)
    config = parse(RunConfig, ["--config", args.config, "--output", args.run])
    own = storage.read_json(storage.join(args.run, "targets", "manifest.json"))
    evaluations = {own["config"]["multi_token"] if "multi_token" in own["config"] else "ota":
                   storage.join(args.run, "evaluation")}
    for variant in args.variants:
        if variant not in evaluations:
            evaluations[variant] = train_variant(config, args.run, storage.join(args.output, variant), variant)
    counts = [str(k) for k in config.evaluate.counts]
    lines = ["## Multi-token targets: OTA vs mean of pieces vs none", "",
             f"Command: `python benchmarks/multi_token.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
             f"Run: `{args.run}` (preset `{args.config}`); held-out single-token words, cosine / MRR to the "
             "true input embedding.", "",
             "| multi-token targets | targets | form cosine | form MRR | "
             + " | ".join(f"fused cosine k={k} | fused MRR k={k}" for k in counts) + " |",
             "|---|---|---:|---:|" + "---:|---:|" * len(counts)]
    for variant, evaluation in evaluations.items():
        rows = rows_of(evaluation)
        made = storage.read_json(storage.join(evaluation.rsplit("/", 1)[0], "targets", "manifest.json"))
        what = (f"{made['embedding_targets']} embedding + {made.get('ota_targets', 0) or made.get('mean_targets', 0)}"
                f" {variant}" if variant != "skip" else f"{made['embedding_targets']} embedding, "
                f"{made.get('skipped_multi_token')} skipped")
        form = rows[("form", counts[0])]
        cells = [f"{rows[('bertram', k)]['cosine']:.3f} | {rows[('bertram', k)]['mrr']:.3f}" for k in counts]
        lines.append(f"| {variant} | {what} | {form['cosine']:.3f} | {form['mrr']:.3f} | " + " | ".join(cells) + " |")
    baseline = next(r for (m, _), r in rows_of(next(iter(evaluations.values()))).items() if m.startswith("mean"))
    lines += ["", f"Baseline (mean of word pieces): cosine {baseline['cosine']:.3f}, MRR {baseline['mrr']:.3f}.", ""]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(text)


if __name__ == "__main__":
    main()
