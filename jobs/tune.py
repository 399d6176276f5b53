"""Tune a fused BERTRAM model for how its vectors are used: the behaviour objective (pipeline/behaviour.py).

    python -m jobs.tune --bertram out/fused --preprocessed out/pre --targets out/targets \\
        --exclude_words out/heldout.txt --output out/tuned --steps 150

For the single-token training words (targets with their own row; never --exclude_words),
BERTRAM infers a vector from a few contexts, and the frozen language model runs on other
contexts of the word with that vector as the word's input row and with the word's true token;
the loss is 1 - cosine of the word-position states plus that of the sentence embeddings.
Runs in one process (the driver; a GPU when there is one is not used yet). Writes the tuned
model (loadable wherever a fused model is: `jobs.infer --bertram out/tuned`) and
`manifest.json` last. Opt-in: on the demo it moves the language model's outputs towards
the true token's at a cost in the embedding table (BENCHMARKS.md, "The user's model").
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import pyarrow.compute as pc

from pipeline.console import PROGRESS_EVERY_S, log
from jobs.stage import Stage, upstream
from pipeline import infer, storage
from pipeline import behaviour
from pipeline.behaviour import TRAINABLE, BehaviourSettings
from pipeline.config import ConfigError
from pipeline.model import FUSED_MODES, saved_config, uses_context
from pipeline.words import read_word_set

OUTPUT_NAMES = ("config.json", "model.safetensors", "ngram_vocab.json", "tokenizer")


@dataclass(kw_only=True)
class TuneOptions(BehaviourSettings):
    """Settings of the behaviour stage (the part of its config a pipeline preset holds); the rest of the
    fields are pipeline.behaviour.BehaviourSettings'."""

    steps: int = 0
    """Optimizer steps of the behaviour objective; 0: no such stage (jobs.run infers with fused/)."""

    def __post_init__(self) -> None:
        if self.steps < 0 or self.words_per_step < 1 or self.read < 1 or self.sentences < 1:
            raise ConfigError(f"--steps must be >= 0 and --words_per_step, --read, --sentences >= 1; got {self.steps}, "
                              f"{self.words_per_step}, {self.read}, {self.sentences}")
        if self.trainable not in TRAINABLE:
            raise ConfigError(f"--trainable must be one of {', '.join(TRAINABLE)}, got {self.trainable!r}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")


@dataclass(kw_only=True)
class TuneConfig(TuneOptions):
    """Tune a fused BERTRAM model with the behaviour objective."""

    steps: int = 150
    """Optimizer steps of the behaviour objective."""
    bertram: str
    """URI of the fused BERTRAM model to tune (jobs.train --stage fused)."""
    preprocessed: str
    """URI of the jobs.preprocess output: the training words' contexts."""
    targets: str
    """URI of the jobs.targets output: which words are single tokens (source embedding)."""
    exclude_words: str | None = None
    """Words file (one per line) never trained on (held-out words)."""
    output: str
    """Output URI of the tuned model."""
    overwrite: bool = False
    """Redo even if --output already holds a complete result."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {self.steps}")


def _inputs(config: TuneConfig) -> dict:
    stamps = upstream(preprocessed=(config.preprocessed, "jobs.preprocess"), targets=(config.targets, "jobs.targets"))
    saved_config(config.bertram, fix="give a jobs.train --stage fused output",
                 modes=tuple(m for m in FUSED_MODES if uses_context(m)),
                 wanted="the behaviour objective tunes a fused model (it runs the model's own encoder as the language "
                        "model)")
    excluded = read_word_set(config.exclude_words, "--exclude_words") if config.exclude_words else set()
    return {"bertram_at": upstream(bertram=(config.bertram, None))["bertram_at"], **stamps,
            "excluded_words": len(excluded)}


def _tune(config: TuneConfig, ready: None) -> dict:
    bertram, tokenizer = infer.load(config.bertram)
    excluded = read_word_set(config.exclude_words, "--exclude_words") if config.exclude_words else set()
    targets = storage.read_parquet(storage.join(config.targets, "targets.parquet"))
    words = [w for w in targets.filter(pc.equal(targets["source"], "embedding"))["word"].to_pylist()
             if w not in excluded]
    contexts = infer.read_contexts(config.preprocessed, words=words)
    settings = BehaviourSettings(**{f.name: getattr(config, f.name) for f in fields(BehaviourSettings)})
    log(f"tune: behaviour objective on {len(words)} single-token training words ({len(excluded)} excluded), "
        f"{config.steps} steps of {config.words_per_step} words")
    shown = [0.0]

    def report(step: int, loss: float, seconds: float) -> None:
        if seconds - shown[0] >= PROGRESS_EVERY_S or step == config.steps:
            shown[0] = seconds
            log(f"tune: step {step}/{config.steps}, loss {loss:.4f}, {seconds / step:.2f} s per step, ETA "
                f"{(config.steps - step) * seconds / step:.0f} s")

    try:
        history = behaviour.tune(bertram, tokenizer, words, contexts, settings, on_step=report)
    except ValueError as exc:
        raise ConfigError(f"tune: {exc}") from None
    bertram.save_pretrained(config.output, tokenizer)
    last = history[-10:]
    return dict(words=len(words), steps=len(history), first_loss=history[0] if history else None,
                final_loss=sum(last) / len(last) if last else None, mode=bertram.config.mode)


def _done(config: TuneConfig, out: dict) -> str:
    if out["steps"]:
        return (f"loss {out['first_loss']:.4f} -> {out['final_loss']:.4f} (mean of the last 10 steps) -> "
                f"{storage.redact(config.output)}")
    return f"no step -> {storage.redact(config.output)}"


STAGE = Stage(name="tune", config=TuneConfig, outputs=OUTPUT_NAMES, inputs=_inputs, work=_tune, done=_done,
              summary=lambda m: f"{m['steps']} steps, loss {m['first_loss']:.4g} -> {m['final_loss']:.4g}")
tune = STAGE.run

if __name__ == "__main__":
    STAGE.main(__doc__, "tune")
