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

from dataclasses import dataclass

from jobs.stage import Stage, upstream
from pipeline import storage
from pipeline.config import ConfigError, to_dict
from pipeline.features import shared_context_vectors
from pipeline.infer import load_tokenizer
from pipeline.model import FUSED_MODES, GATED_MODES, Bertram, fresh_gate, saved_config

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
    seed: int = 42
    """Seed of what is initialised afresh: the gate of shallow/gated without --pieces (jobs.run: the fused stage's seed)."""
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


def _inputs(config: FuseConfig) -> dict:
    return upstream(form=(config.form, None), context=(config.context, None),
                    **({"features": (config.features, None)} if config.features else {}))


def _settings(config: FuseConfig) -> dict:
    """The settings the manifest records and a re-run compares: the seed only where it changes the model
    (`fresh_gate`), so that it never makes a complete output of another mode one "made with other settings"."""
    settings = to_dict(config)
    if not fresh_gate(config.mode, config.pieces):
        del settings["seed"]
    return settings


def _load(config: FuseConfig) -> tuple[Bertram, Bertram]:
    """The form and the context model, each checked to be one."""
    parts = []
    for flag, uri in (("form", config.form), ("context", config.context)):
        saved_config(uri, f"--{flag}", fix=f"run jobs.train --stage {flag} first", modes=(flag,),
                     wanted=f"give a {flag} model")
        parts.append(Bertram.from_pretrained(uri))
    return parts[0], parts[1]


def _fuse(config: FuseConfig, parts: tuple[Bertram, Bertram]) -> dict:
    form, context = parts
    vectors = shared_context_vectors(context, config.features, config.direction_words) \
        if config.pieces and config.features else None
    fused = Bertram.fuse(form, context, config.mode, pieces=config.pieces, context_vectors=vectors,
                         shared=config.shared_directions, seed=config.seed)
    fused.save_pretrained(config.output, load_tokenizer(config.context, context.config.base_model))
    return {"mode": config.mode, "pieces": config.pieces}


STAGE = Stage(name="fuse", config=FuseConfig, outputs=OUTPUT_NAMES, inputs=_inputs, check=_load, work=_fuse,
              settings=_settings,
              done=lambda c, m: f"{c.mode} model of {storage.redact(c.form)} + {storage.redact(c.context)} -> "
                                f"{storage.redact(c.output)}",
              summary=lambda m: f"mode {m['mode']}{' + pieces' if m.get('pieces') else ''}")
fuse = STAGE.run

if __name__ == "__main__":
    STAGE.main(__doc__, "fuse")
