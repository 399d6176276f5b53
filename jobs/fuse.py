"""Fuse a form model and a context model into one fused BERTRAM model (before the fused stage).

    python -m jobs.fuse --form out/form --context out/context --mode add --output out/fused-init
    python -m jobs.fuse --form out/form --context out/context --mode gated --pieces true \
        --features out/features --output out/fused-init

The fused model takes the form model's n-gram embeddings and the context model's
encoder, attentive mimicking and output layer; `--mode` says how the form vector enters:
`add` / `add-quotes` (as an extra input token), `replace` (in place of the mask token),
`shallow` (a learned gate mixes the two vectors after the encoder), `gated` (the same gate,
which also reads the number of contexts). With `--pieces` (shallow, gated) the word's pieces are a
third part, and with `--features` the directions all context vectors share are projected out of the
context part (`Bertram.fuse`, `model.PiecesGate`). Writes the model and `manifest.json`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from jobs.common import log, main
from pipeline import manifest, storage
from pipeline.config import ConfigError, to_dict
from pipeline.infer import load_tokenizer
from pipeline.model import FUSED_MODES, GATED_MODES, Bertram

OUTPUT_NAMES = ("config.json", "model.safetensors", "ngram_vocab.json", "tokenizer")


@dataclass(kw_only=True)
class FuseConfig:
    """Combine a trained form model and a trained context model into a fused model."""

    form: str
    """URI of a trained form model (jobs.train --stage form)."""
    context: str
    """URI of a trained context model (jobs.train --stage context)."""
    mode: str = "add"
    """How the form vector enters: add | add-quotes | replace | shallow | gated."""
    pieces: bool = False
    """shallow/gated: the word's pieces (the mean of their input embeddings) are a third part the gate weighs."""
    features: str | None = None
    """With --pieces: cached features of training words (jobs.features); the few directions their context vectors share (their mean, top principal directions) are projected out of the context part."""
    shared_directions: int = 3
    """With --features: how many shared directions (their mean, then the top principal ones) are projected out."""
    direction_words: int = 2000
    """With --features: at most this many words (the first of each bucket) give those directions."""
    output: str
    """Output URI of the fused model."""
    overwrite: bool = False
    """Redo even if --output already holds a complete result."""

    def __post_init__(self) -> None:
        if self.mode not in FUSED_MODES:
            raise ConfigError(f"--mode must be one of {', '.join(FUSED_MODES)}, got {self.mode!r}")
        if self.shared_directions < 1:
            raise ConfigError(f"--shared_directions must be >= 1, got {self.shared_directions}")
        if self.pieces and self.mode not in GATED_MODES:
            raise ConfigError(f"--pieces is a third part of the gated and shallow modes, not of {self.mode!r}; "
                              "pass --pieces false or --mode gated")


def _load(uri: str, flag: str, expected: str) -> Bertram:
    if not storage.exists(storage.join(uri, "config.json")):
        raise ConfigError(f"{flag} {storage.redact(uri)} holds no BERTRAM model (config.json missing); "
                          f"run jobs.train --stage {expected} first")
    mode = storage.read_json(storage.join(uri, "config.json"))["mode"]
    if mode != expected:
        raise ConfigError(f"{flag} {storage.redact(uri)} is a {mode!r} model; give a {expected} model")
    return Bertram.from_pretrained(uri)


def training_context_vectors(context: Bertram, features: str, max_words: int):
    """(W, D) the context vectors of up to `max_words` training words, from their cached features."""
    import torch

    from pipeline.features import feature_matrix

    if not manifest.is_complete(features):
        raise ConfigError(f"--features {storage.redact(features)} is not a complete jobs.features output "
                          "(manifest.json missing); run jobs.features first")
    tables = [storage.read_parquet(f.uri) for f in storage.list_files(features) if "bucket-" in f.uri]
    per_bucket = max(1, max_words // max(1, len(tables)))
    chosen = [torch.from_numpy(feature_matrix(t["features"], r)) for t in tables for r in range(min(per_bucket,
                                                                                                      t.num_rows))]
    return context.context_vectors(chosen)


def fuse(config: FuseConfig) -> dict:
    """Run the step; returns its manifest."""
    sources = (("form_at", config.form), ("context_at", config.context)) + (
        (("features_at", config.features),) if config.features else ())
    inputs = {name: manifest.read(uri)["finished_at"] if manifest.is_complete(uri) else None for name, uri in sources}
    if manifest.reusable(config.output, "fuse", to_dict(config), config.overwrite, inputs):
        log(f"fuse: {storage.redact(config.output)} is complete (manifest.json); skipping. Use --overwrite to redo.")
        return manifest.read(config.output)
    started = time.time()
    form, context = _load(config.form, "--form", "form"), _load(config.context, "--context", "context")
    vectors = training_context_vectors(context, config.features, config.direction_words) \
        if config.pieces and config.features else None
    fused = Bertram.fuse(form, context, config.mode, pieces=config.pieces, context_vectors=vectors,
                         shared=config.shared_directions)
    tokenizer = load_tokenizer(config.context, context.config.base_model)
    manifest.reset(config.output, "fuse", OUTPUT_NAMES)
    fused.save_pretrained(config.output, tokenizer)
    out = manifest.write(config.output, "fuse", to_dict(config), started, inputs=inputs, mode=config.mode,
                         pieces=config.pieces)
    log(f"fuse: {config.mode} model of {storage.redact(config.form)} + {storage.redact(config.context)} -> "
        f"{storage.redact(config.output)}")
    return out


if __name__ == "__main__":
    main(FuseConfig, fuse, __doc__, prog="python -m jobs.fuse")
