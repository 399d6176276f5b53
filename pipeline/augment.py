"""Give a language model the inferred vectors: new tokens whose input embeddings they are.

    from pipeline import augment
    augment.add_word_vectors_to_model(vectors, tokenizer, model)  # <BERTRAM:kumquat>: rewritten text reaches it
    augment.add_plain_words(vectors, tokenizer, model)            # kumquat itself: plain text reaches it

Two ways text reaches a word's vector:

* **`<BERTRAM:w>` tokens** (special: never split, never matched inside text by accident). The
  text must name them: `rewrite(text, words, "slash")` gives the paper's best input
  `a kumquat / <BERTRAM:kumquat> is` (the word's pieces, then its vector), `"replace"` gives
  `a <BERTRAM:kumquat> is`.
* **Plain words** (`add_plain_words`): the tokenizer maps the word itself to a new token with
  the same vector, so unmodified text, `pipeline("fill-mask")` and `SentenceTransformer.encode`
  use it. Only a *whole* word matches: never inside a longer word (`kumquats`, `akumquat`
  keep their pieces); a match needs a non-word character or the text's end on both sides,
  the rule contexts are masked by (`pipeline.batching.mask_word`), so `kumquat's`,
  `(kumquat)` and `kumquat-tree` match. Case follows the tokenizer: an uncased one
  (a lowercasing normaliser: BERT-uncased, ALBERT, the packaged MiniLM) matches any case; a
  cased one matches the word as written and, for a lowercase word, its capitalised form
  (`Kumquat` at a sentence start). A form the tokenizer already keeps as one token keeps
  its own embedding (it is not rare there) unless `set_whole_word_rows` replaces or combines
  it; `reach` names every word plain text does not reach, with the reason. The slash style then reads the vector twice
  (the plain word maps to it too); for the paper's slash input augment without plain words.

A sentence-transformers model (its `modules.json`) stays one: `sentence_transformer_layout`
finds its modules and `copy_sentence_transformer_modules` copies all but the Transformer
module, whose model and tokenizer the caller saves with the new tokens.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.words import TOKEN_PREFIX, in_token_syntax

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

STYLES = ("slash", "replace")
WHOLE_WORDS = ("keep", "replace", "combine")  # a word the tokenizer keeps as one token: its row stays, is replaced, or both averaged
ST_MODULES = "modules.json"  # what makes a directory a sentence-transformers model
ST_TOP_FILES = (ST_MODULES, "config_sentence_transformers.json")
ST_MODULE_CONFIG = "sentence_bert_config.json"  # the Transformer module's settings (max_seq_length, lower case)


def token_for(word: str) -> str:
    """The language-model token that carries the inferred vector of `word`."""
    return f"{TOKEN_PREFIX}{word}>"


def check_word(word: str) -> None:
    """A ValueError unless `word` is a non-empty string outside the token syntax `<BERTRAM:w>` (the one check of
    a word, for infer and augment): the plain token of `<BERTRAM:x>` would capture the text of the token of x."""
    if not isinstance(word, str) or not word.strip():
        raise ValueError(f"a word must be a non-empty string, got {word!r}")
    if in_token_syntax(word):
        raise ValueError(f"{word!r} is in the token syntax {TOKEN_PREFIX}w> that carries a word's vector, not a word")


def _rows(vectors: Mapping[str, torch.Tensor | np.ndarray], model: PreTrainedModel) -> list[torch.Tensor]:
    dim = model.get_input_embeddings().embedding_dim
    rows = []
    for word, vector in vectors.items():
        check_word(word)
        row = torch.as_tensor(vector).detach()  # (D,)
        if row.shape != (dim,):
            raise ValueError(f"the vector of {word!r} has shape {tuple(row.shape)} but the model's input embeddings "
                             f"have size {dim}; infer it with a BERTRAM model trained for this language model")
        rows.append(row)
    return rows


def _set_rows(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, tokens: list[str],
              rows: list[torch.Tensor]) -> None:
    """Give `tokens` (already in the tokenizer) the input-embedding rows `rows`, growing the matrix if needed."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        from pipeline.model import seeded

        # The new input rows are all overwritten below; an untied output embedding (an MLM head that does not
        # share the input rows) keeps the rows transformers draws for it: from a fixed seed, so that the same
        # vectors always give the same model.
        with seeded(0):
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = model.get_input_embeddings().weight  # (V, D)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    with torch.no_grad():
        weight[ids] = torch.stack(rows).to(weight.device, weight.dtype)  # (W, D)


def add_word_vectors_to_model(vectors: Mapping[str, torch.Tensor | np.ndarray], tokenizer: PreTrainedTokenizerBase,
                              model: PreTrainedModel) -> list[str]:
    """Add a token `<BERTRAM:w>` per word to `tokenizer` and its vector as that token's input embedding of `model`.

    Works for any transformers model with input embeddings (AutoModel, AutoModelForMaskedLM, ...).
    The tokens are special, so the tokenizer never splits them. Adding a word again overwrites
    its row. Returns the tokens, in the order of `vectors`.
    """
    rows = _rows(vectors, model)
    if not rows:
        return []
    tokens = [token_for(w) for w in vectors]
    tokenizer.add_tokens(tokens, special_tokens=True)
    _set_rows(tokenizer, model, tokens, rows)
    return tokens


def is_uncased(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer lowercases its input (then a word matches in any case)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    normalizer = getattr(backend, "normalizer", None)
    if normalizer is not None:
        return normalizer.normalize_str("Ab") == "ab"
    return bool(getattr(tokenizer, "do_lower_case", False))


def _one_token(tokenizer: PreTrainedTokenizerBase, forms: list[str]) -> list[bool]:
    from pipeline.ota import piece_ids

    return [len(p) == 1 and p[0] != tokenizer.unk_token_id for p in piece_ids(tokenizer, forms)]


def plain_forms(words: Iterable[str], tokenizer: PreTrainedTokenizerBase) -> dict[str, str]:
    """form → word: the plain forms of `words` that `add_plain_words` maps to their vectors (see the
    module docstring: the word, and for a cased tokenizer its capitalised form; nothing for a word
    the tokenizer already keeps as one token, nor a form it keeps as one, nor one with whitespace)."""
    words = [w for w in dict.fromkeys(words) if not any(ch.isspace() for ch in w)]
    forms = {w: w for w, whole in zip(words, _one_token(tokenizer, words)) if not whole}
    if not is_uncased(tokenizer):  # a cased tokenizer: also the capitalised form of a lowercase word
        capitalised = {w[:1].upper() + w[1:]: w for w in forms if w[:1].islower() and w[:1].upper() != w[:1]}
        capitalised = {f: w for f, w in capitalised.items() if f not in forms}
        forms.update({f: w for (f, w), whole in zip(capitalised.items(), _one_token(tokenizer, list(capitalised)))
                      if not whole})
    return forms


def add_plain_words(vectors: Mapping[str, torch.Tensor | np.ndarray], tokenizer: PreTrainedTokenizerBase,
                    model: PreTrainedModel) -> dict[str, str]:
    """Map each word of `vectors`, as a whole word in plain text, to a new token carrying its vector
    (`plain_forms` says which forms). Returns form → word for the forms added."""
    from tokenizers import AddedToken

    rows = dict(zip(vectors, _rows(vectors, model)))
    forms = plain_forms(list(vectors), tokenizer)
    if not forms:
        return {}
    # single_word: never inside a longer word; lstrip: the token absorbs the space before it (byte-level
    # BPE and SentencePiece would otherwise give that space a token of its own); normalized: matched
    # after the tokenizer's normaliser, so an uncased tokenizer matches any case.
    tokenizer.add_tokens([AddedToken(form, single_word=True, lstrip=True, rstrip=False, normalized=True)
                          for form in forms], special_tokens=False)
    _set_rows(tokenizer, model, list(forms), [rows[w] for w in forms.values()])
    return forms


def set_whole_word_rows(vectors: Mapping[str, torch.Tensor | np.ndarray], tokenizer: PreTrainedTokenizerBase,
                        model: PreTrainedModel, how: str) -> list[str]:
    """For the words of `vectors` the tokenizer keeps as one token (its row is their embedding): `keep` their row,
    `replace` it by the vector, or `combine` (the mean of the row and the vector). Returns the words whose row
    changed. Keeping is the default: the row is what BERTRAM learns to imitate, so on held-out single-token
    words the model's outputs with it are the reference every vector is scored against (pipeline/downstream.py)."""
    if how not in WHOLE_WORDS:
        raise ValueError(f"whole_words must be one of {', '.join(WHOLE_WORDS)}, got {how!r}")
    from pipeline.ota import piece_ids

    rows = dict(zip(vectors, _rows(vectors, model)))
    words = [w for w in rows if not any(ch.isspace() for ch in w)]
    base = tokenizer.vocab_size  # tokens added since (the plain words of add_plain_words) are not the model's own rows
    whole = {w: p[0] for w, p in zip(words, piece_ids(tokenizer, words))
             if len(p) == 1 and p[0] != tokenizer.unk_token_id and p[0] < base}
    if how == "keep" or not whole:
        return []
    weight = model.get_input_embeddings().weight  # (V, D)
    with torch.no_grad():
        for word, i in whole.items():
            new = rows[word].to(weight.device, weight.dtype)
            weight[i] = new if how == "replace" else (weight[i] + new) / 2
    return list(whole)


def reach(words: Iterable[str], plain: Mapping[str, str], whole_rows: Iterable[str] = ()) -> dict[str, str]:
    """word → why plain text does not reach its vector, for the words that plain text does not reach
    (`plain`: form → word from `add_plain_words`; `whole_rows`: the words whose own row was set)."""
    reached = set(plain.values()) | set(whole_rows)
    out = {}
    for word in words:
        if word in reached:
            continue
        if any(ch.isspace() for ch in word):
            out[word] = "holds a space: text reaches it as <BERTRAM:w> (pipeline.augment.rewrite)"
        else:
            out[word] = "one token of the tokenizer already: its own row stays (--whole_words keep)"
    return out


def describe_unreached(unreached: Mapping[str, str], k: int = 5) -> str:
    """The words of `reach` by reason, a few named: '3 one token of the tokenizer already: ...: apple, tree, pear'."""
    by_reason: dict[str, list[str]] = {}
    for word, reason in unreached.items():
        by_reason.setdefault(reason, []).append(word)
    return "; ".join(f"{len(ws)} {reason}: {', '.join(ws[:k])}{', ...' if len(ws) > k else ''}"
                     for reason, ws in by_reason.items())


def rewrite(text: str, words: Iterable[str], style: str = "slash") -> str:
    """`text` with each whole-word, case-sensitive occurrence of a word given its BERTRAM token.

    `slash` (best in the paper) keeps the word's own pieces: `a kumquat is` → `a kumquat / <BERTRAM:kumquat> is`;
    `replace` puts the token in its place: `a <BERTRAM:kumquat> is`. `words` may be the dict of vectors.
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")
    alternatives = sorted(set(words), key=len, reverse=True)  # longest first: "new york" before "new"
    if not alternatives:
        return text
    # The same whole-word rule as masking contexts (pipeline.batching.mask_word); one pass, so the
    # word inside an inserted `<BERTRAM:word>` is never rewritten again.
    pattern = re.compile(r"(?<!\w)(" + "|".join(map(re.escape, alternatives)) + r")(?!\w)")
    if style == "slash":
        return pattern.sub(lambda m: f"{m.group(1)} / {token_for(m.group(1))}", text)
    return pattern.sub(lambda m: token_for(m.group(1)), text)


# ---------------------------------------------------------------------------------------
# Sentence-transformers models


def sentence_transformer_layout(path: str) -> tuple[str, list[dict]] | None:
    """(a local directory with the model's sentence-transformers files, its modules) when the model at
    `path` (a directory or a hub name) is a sentence-transformers model, else None."""
    if os.path.isdir(path):
        local = path
    else:
        local = _hub_files(path)
        if local is None:
            return None
    if not os.path.isfile(os.path.join(local, ST_MODULES)):
        return None
    with open(os.path.join(local, ST_MODULES), encoding="utf-8") as f:
        modules = json.load(f)
    return local, modules


def _hub_files(name: str) -> str | None:
    """The hub model's sentence-transformers files (modules.json and its modules' directories), from the
    cache or the hub; None when it has no modules.json."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError

    from pipeline.storage import UserError

    try:
        with open(hf_hub_download(name, ST_MODULES), encoding="utf-8") as f:
            modules = json.load(f)
        patterns = list(ST_TOP_FILES) + [f"{m['path']}/*" if m.get("path") else ST_MODULE_CONFIG for m in modules]
        return snapshot_download(name, allow_patterns=patterns)
    except EntryNotFoundError:  # (also: not in the cache when offline)
        return None
    except Exception as exc:  # noqa: BLE001 - network errors, by huggingface_hub version
        raise UserError(f"--model {name}: cannot read its sentence-transformers files from the Hugging Face hub "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}); try again, "
                        "or give a local copy of the model") from None


def transformer_module(modules: list[dict]) -> dict | None:
    """The one Transformer module of a sentence-transformers model (None when there is not exactly one)."""
    found = [m for m in modules if str(m.get("type", "")).endswith(".Transformer")]
    return found[0] if len(found) == 1 else None


def copy_sentence_transformer_modules(local: str, modules: list[dict], out: str) -> str:
    """Copy a sentence-transformers model's files to `out`, all but its Transformer module's model and
    tokenizer; returns that module's directory under `out` (where to save them)."""
    transformer = transformer_module(modules)
    assert transformer is not None, "check transformer_module first"
    for name in ST_TOP_FILES:
        if os.path.isfile(os.path.join(local, name)):
            shutil.copy2(os.path.join(local, name), os.path.join(out, name))
    home = transformer.get("path") or ""
    os.makedirs(os.path.join(out, home), exist_ok=True)
    if os.path.isfile(os.path.join(local, home, ST_MODULE_CONFIG)):
        shutil.copy2(os.path.join(local, home, ST_MODULE_CONFIG), os.path.join(out, home, ST_MODULE_CONFIG))
    for module in modules:
        where = module.get("path") or ""
        if module is not transformer and where and os.path.isdir(os.path.join(local, where)):
            shutil.copytree(os.path.join(local, where), os.path.join(out, where), dirs_exist_ok=True)
    return os.path.join(out, home)
