"""Words files and word vectors, as every stage reads and writes them.

* a words file: one word per line; blank lines skipped, surrounding space stripped, the first
  occurrence first (`read_words`; with `lowercase`, as a lowercased corpus has them);
* vectors: `vectors.parquet` (word, vector: list<float32>, n_contexts) or a parquet file with
  word and vector columns, or `<word> <v1> ... <vn>` text, optionally with word2vec's
  `<count> <dim>` header (`read_vectors`); text is written with 9 significant digits, so float32
  values read back exactly (`vector_lines`).

Errors a user can cause (an empty or non-UTF-8 words file, ragged vectors, an entry in the token
syntax `<BERTRAM:w>`) are one line naming the flag and the fix.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.storage import ConfigError

TOKEN_PREFIX = "<BERTRAM:"  # the tokens that carry a word's vector: <BERTRAM:w> (pipeline.augment.token_for)


def in_token_syntax(word: str) -> bool:
    """Whether `word` holds the token syntax `<BERTRAM:` (in any case: an uncased tokenizer reads it so). No
    corpus word does (the corpus tokeniser splits `<`, `:` and `>` off), and the plain token of such a word
    would capture that text: the token of another word, or text rewritten for it (`augment.rewrite`)."""
    return TOKEN_PREFIX.lower() in word.lower()


def token_syntax_error(where: str, entry: str) -> ConfigError:
    """The one line refusing an `entry` in the token syntax; `where` names the flag, the file and the line."""
    inner = re.fullmatch(r"<BERTRAM:(.+)>", entry, flags=re.IGNORECASE)
    fix = f"write the word itself ({inner.group(1)})" if inner else f"remove {TOKEN_PREFIX}...> from it"
    return ConfigError(f"{where}: {entry!r} is the token syntax {TOKEN_PREFIX}w> that carries a word's vector, "
                       f"not a word; {fix}")


VECTORS_SCHEMA = pa.schema([("word", pa.string()), ("vector", pa.list_(pa.float32())), ("n_contexts", pa.int32())])


def read_words(uri: str, flag: str = "--words", lowercase: bool = False) -> list[str]:
    """The words of a words file, first occurrence first; one line when it is not UTF-8, holds none, or holds an
    entry in the token syntax `<BERTRAM:w>` (`in_token_syntax`)."""
    try:
        text = storage.read_text(uri)
    except UnicodeDecodeError:
        raise ConfigError(f"{flag} {storage.redact(uri)}: not UTF-8 text; save it as UTF-8") from None
    except storage.StorageError as exc:
        raise ConfigError(f"{flag} {exc}") from None
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if in_token_syntax(line):
            raise token_syntax_error(f"{flag} {storage.redact(uri)}: line {number}", line.strip())
    words = [w.strip() for w in lines if w.strip()]
    words = list(dict.fromkeys(w.lower() for w in words) if lowercase else dict.fromkeys(words))
    if not words:
        raise ConfigError(f"{flag} {storage.redact(uri)} holds no words; put one word per line")
    return words


def read_word_set(uri: str, flag: str) -> set[str]:
    """The words of a words file as a set (`read_words`)."""
    return set(read_words(uri, flag))


def write_words(uri: str, words: list[str]) -> list[str]:
    """Write a words file; unchanged content is not rewritten (a training stage that reads it stays
    resumable). Nothing is written for no words."""
    if words:
        text = "\n".join(words) + "\n"
        if not storage.exists(uri) or storage.read_text(uri) != text:
            storage.write_text(uri, text)
    return words


def vectors_table(words: list[str], vectors: np.ndarray, n_contexts: list[int]) -> pa.Table:
    """The vectors.parquet table of `words`, their vectors (W, D) and context counts."""
    dim = vectors.shape[1]
    offsets = pa.array(np.arange(0, len(words) * dim + 1, dim, dtype=np.int32))
    flat = pa.array(vectors.astype(np.float32).reshape(-1))
    return pa.table({"word": pa.array(words, pa.string()), "vector": pa.ListArray.from_arrays(offsets, flat),
                     "n_contexts": pa.array(n_contexts, pa.int32())}, schema=VECTORS_SCHEMA)


def vector_lines(words: list[str], vectors) -> tuple[list[str], int]:
    """`<word> <v1> ... <vn>` lines (9 significant digits: float32 values read back exactly) and the number
    of words left out because they hold whitespace, which the format cannot carry."""
    lines, skipped = [], 0
    for word, vector in zip(words, vectors):
        if word.split() != [word]:
            skipped += 1
            continue
        lines.append(f"{word} " + " ".join(f"{x:.9g}" for x in np.asarray(vector).tolist()))
    return lines, skipped


def read_vectors(uri: str, flag: str = "--vectors") -> tuple[list[str], np.ndarray]:
    """Words and their vectors (W, D) from a jobs.infer output, a parquet file or `<word> <v1> ... <vn>` text
    (which may start with a word2vec `<count> <dim>` header line); one line for a word in the token syntax."""
    where = f"{flag} {storage.redact(uri)}"
    if storage.exists(storage.join(uri, "vectors.parquet")):
        uri = storage.join(uri, "vectors.parquet")
    elif storage.exists(storage.join(uri, "vectors.txt")):
        uri = storage.join(uri, "vectors.txt")
    if uri.endswith(".parquet"):
        table = storage.read_parquet(uri)
        if not {"word", "vector"} <= set(table.column_names):
            raise ConfigError(f"{where} has columns {table.column_names}; a vectors parquet needs 'word' and "
                            "'vector' (list of floats)")
        words, rows = table["word"].to_pylist(), table["vector"].to_pylist()
        places = [f"row {i + 1}" for i in range(len(words))]
    else:
        numbered = [(n, line.split()) for n, line in enumerate(storage.read_text(uri).splitlines(), 1) if line.strip()]
        if numbered and len(numbered[0][1]) == 2 and all(x.isdigit() for x in numbered[0][1]):
            numbered = numbered[1:]  # the word2vec header
        lines = [line for _, line in numbered]
        places = [f"line {n}" for n, _ in numbered]
        try:
            words, rows = [line[0] for line in lines], [[float(x) for x in line[1:]] for line in lines]
        except ValueError as exc:
            raise ConfigError(f"{where}: not `<word> <v1> ... <vn>` text ({exc})") from None
    for word, place in zip(words, places):
        if isinstance(word, str) and in_token_syntax(word):
            raise token_syntax_error(f"{where}: {place}", word)
    if not words:
        raise ConfigError(f"{where} holds no vectors")
    dims = {len(r) for r in rows}
    if len(dims) > 1 or 0 in dims:
        raise ConfigError(f"{where}: the vectors have different sizes {sorted(dims)[:5]}; every word needs a "
                        "vector of the same size")
    return words, np.asarray(rows, dtype=np.float32)  # (W, D)
