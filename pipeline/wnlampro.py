"""WNLaMPro: the rare-word probing benchmark of Schick & Schütze ("Rare Words: A Major Problem
for Contextualized Embeddings and How to Fix it by Attentive Mimicking", AAAI 2020).

A masked language model fills in cloze patterns about a key word (`a kumquat is a kind of
[MASK] .`); an entry's rank is the best rank of any of its gold target words among the top
predictions. Results are the mean reciprocal rank (MRR) and P@k, per key-word frequency bucket.

    entries = select(read_dataset("WNLaMPro.txt"))
    ranks = rank_targets(model, tokenizer, entries, style="slash")
    print(report_table({"bertram-slash": score(ranks, entries)}))

Pure library: no Ray. `pipeline/evaluate.py` is where it meets the pipeline.

The dataset file (github.com/timoschick/am-for-bert, `WNLaMPro.txt`) has one entry per line,
columns separated by tabs:

    ID <TAB> SET <TAB> KEY <TAB> RELATION <TAB> TARGET_1 [<TAB> TARGET_2 ...]

SET is `dev` or `test`; RELATION one of `antonym`, `hypernym`, `cohyponym`, `corruption`;
KEY and every TARGET are annotated words `WORD (POS,ZIPF,COUNT)`, e.g. `disease (n,4.95,64105)`:
POS `n` or `a`, ZIPF the wordfreq Zipf frequency (a float), COUNT the word's count in the
Westbury Wikipedia corpus (an int). Blank lines are ignored; any other line that does not
have this form raises a ValueError naming the line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

import torch

from pipeline import storage

RELATIONS = ("antonym", "hypernym", "cohyponym", "corruption")
SETS = ("dev", "test")
BUCKETS = ("rare", "medium", "frequent")
STYLES = ("plain", "replace", "slash")
PRECISION_AT = (3, 10, 100)
WORD, MASK, ARTICLE = "<W>", "[MASK]", "<A>"  # placeholders in the patterns

# The reference patterns (am-for-bert, eval-script/patterns.py), with "a" before [MASK] only: the
# reference also tries every pattern with "an". <A> is "an" before a vowel, else "a", as there.
PATTERNS = {
    "hypernym": [
        "<W> is a [MASK] .",
        "<A> <W> is a [MASK] .",
        '" <W> " refers to a [MASK] .',
        "<W> is a kind of [MASK] .",
        "<A> <W> is a kind of [MASK] .",
    ],
    "cohyponym": [
        "<W> and [MASK] .",
        '" <W> " and " [MASK] " .',
    ],
    "antonym": [
        "<W> is the opposite of [MASK] .",
        "<W> is not [MASK] .",
        "someone who is <W> is not [MASK] .",
        "something that is <W> is not [MASK] .",
        '" <W> " is the opposite of " [MASK] " .',
    ],
    "corruption": [
        '" <W> " is a misspelling of " [MASK] " .',
        '" <W> " . did you mean " [MASK] " ?',
    ],
}

_ANNOTATED = re.compile(r"(?P<word>\S+)\s+\((?P<pos>[^,()\s]+),(?P<zipf>[^,()\s]+),(?P<count>[^,()\s]+)\)")


@dataclass
class Entry:
    """One WNLaMPro entry: a key word, a relation and the words that stand in it to the key word."""

    id: str
    set: str  # "dev" or "test"
    word: str  # the key word
    pos: str  # "n" (noun) or "a" (adjective)
    count: int  # the key word's corpus count: it decides the frequency bucket
    relation: str
    targets: list[str]
    zipf: float = 0.0  # the key word's Zipf frequency (wordfreq)


# ---------------------------------------------------------------------------------------
# The dataset


def read_dataset(uri: str) -> list[Entry]:
    """All entries of a WNLaMPro file at a local path or URI (format: see the module docstring)."""
    entries = []
    for number, line in enumerate(storage.read_text(uri).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append(parse_line(line))
        except ValueError as e:
            raise ValueError(f"{storage.redact(uri)}, line {number}: {e}: {line!r}") from None
    return entries


def parse_line(line: str) -> Entry:
    """One entry from one line of the file; a ValueError says what is wrong with it."""
    columns = [c.strip() for c in line.rstrip().split("\t")]
    if len(columns) < 5:
        raise ValueError(f"expected at least 5 tab-separated columns (ID SET KEY RELATION TARGET...), "
                         f"got {len(columns)}")
    entry_id, set_type, key, relation, targets = columns[0], columns[1], columns[2], columns[3], columns[4:]
    if not entry_id:
        raise ValueError("empty ID")
    if set_type not in SETS:
        raise ValueError(f"SET must be one of {', '.join(SETS)}, got {set_type!r}")
    if relation not in RELATIONS:
        raise ValueError(f"RELATION must be one of {', '.join(RELATIONS)}, got {relation!r}")
    word, pos, zipf, count = parse_annotated(key)
    return Entry(entry_id, set_type, word, pos, count, relation, [parse_annotated(t)[0] for t in targets], zipf)


def parse_annotated(text: str) -> tuple[str, str, float, int]:
    """(word, pos, zipf, count) of an annotated word `WORD (POS,ZIPF,COUNT)`."""
    match = _ANNOTATED.fullmatch(text)
    if match is None:
        raise ValueError(f"expected an annotated word 'WORD (POS,ZIPF,COUNT)', got {text!r}")
    try:
        return match["word"], match["pos"], float(match["zipf"]), int(match["count"])
    except ValueError:
        raise ValueError(f"ZIPF must be a number and COUNT an integer in {text!r}") from None


def frequency_bucket(count: int) -> str:
    """rare: count < 10, medium: 10..99, frequent: >= 100 (the paper's thresholds)."""
    return "rare" if count < 10 else "medium" if count < 100 else "frequent"


def select(entries: list[Entry], set_type: str | None = None, keep_frequent_corruptions: bool = False) -> list[Entry]:
    """The entries the reference evaluation scores: one set (or both), and, unless asked otherwise,
    corruption entries only for key words seen fewer than 10 times (a misspelling of a frequent
    word is a rare word itself)."""
    if set_type is not None and set_type not in SETS:
        raise ValueError(f"set_type must be one of {', '.join(SETS)} or None, got {set_type!r}")
    return [e for e in entries if (set_type is None or e.set == set_type)
            and (keep_frequent_corruptions or e.relation != "corruption" or e.count < 10)]


# ---------------------------------------------------------------------------------------
# Patterns and how the key word appears in them


def bertram_token(word: str) -> str:
    """The token that carries BERTRAM's vector for `word` in an augmented language model."""
    return f"<BERTRAM:{word}>"


def render(word: str, style: str, bertram_words: set[str] | frozenset[str] = frozenset()) -> str:
    """The key word as the model sees it: `word` (plain), `<BERTRAM:word>` (replace) or
    `word / <BERTRAM:word>` (slash). A word without a BERTRAM vector is always plain."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")
    if style == "plain" or word not in bertram_words:
        return word
    return bertram_token(word) if style == "replace" else f"{word} / {bertram_token(word)}"


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def pattern_texts(entry: Entry, style: str, bertram_words: set[str] | frozenset[str], mask_token: str) -> list[str]:
    """The entry's relation patterns, filled in with the rendered key word and the mask token."""
    shown = render(entry.word, style, bertram_words)
    return [p.replace(ARTICLE, article(entry.word)).replace(WORD, shown).replace(MASK, mask_token)
            for p in PATTERNS[entry.relation]]


# ---------------------------------------------------------------------------------------
# Ranking with a masked language model


def whole_words(tokenizer) -> list[str | None]:
    """For every token id: the word the token stands for when it is a whole word on its own, else None.

    Special and added tokens (`<BERTRAM:w>` included) are never words. WordPiece: a token is a
    word unless it is a `##` continuation. Byte-level BPE: a token is a word when it starts a
    word (`Ġ` prefix, removed); a token without it only continues a word.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__} has no `tokenizers` backend; load it with AutoTokenizer")
    excluded = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    if type(backend.model).__name__ == "WordPiece":
        prefix = backend.model.continuing_subword_prefix
        words = [None if t.startswith(prefix) else t for t in tokens]
    elif "ByteLevel" in repr(backend.pre_tokenizer):
        words = [t[1:] if t.startswith("Ġ") and len(t) > 1 else None for t in tokens]
    else:
        raise ValueError(f"unsupported tokenizer {type(tokenizer).__name__}: WNLaMPro needs WordPiece (BERT) "
                         f"or byte-level BPE (RoBERTa)")
    return [None if i in excluded else w for i, w in enumerate(words)]


def words_with_vectors(tokenizer) -> set[str]:
    """The words whose `<BERTRAM:word>` token the tokenizer knows."""
    start, end = len("<BERTRAM:"), -len(">")
    return {t[start:end] for t in tokenizer.get_added_vocab() if t.startswith("<BERTRAM:") and t.endswith(">")}


def rank_targets(model, tokenizer, entries: list[Entry], style: str = "plain", top_k: int = 100,
                 batch_size: int = 64, device: str | torch.device = "cpu",
                 bertram_words: set[str] | None = None) -> list[int | None]:
    """Each entry's rank: the best (lowest, 1-based) rank of any of its targets among the model's
    `top_k` whole-word predictions at the mask, over all its patterns; None if none is in the top k.

    `model` is a masked LM (`model(**encoding).logits`, e.g. AutoModelForMaskedLM); it is moved to
    `device` and run in eval mode. `bertram_words` defaults to the words whose `<BERTRAM:w>` token
    the tokenizer has. Targets the vocabulary has no single whole-word token for never match.
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")
    if top_k < 1 or batch_size < 1:
        raise ValueError(f"top_k and batch_size must be >= 1, got {top_k} and {batch_size}")
    bertram_words = words_with_vectors(tokenizer) if bertram_words is None else bertram_words
    words = whole_words(tokenizer)
    word_ids = {}
    for i, w in enumerate(words):
        if w is not None:
            word_ids.setdefault(w, i)
    gold = [{word_ids[t] for t in e.targets if t in word_ids} for e in entries]
    queries = [(i, text) for i, e in enumerate(entries)
               for text in pattern_texts(e, style, bertram_words, tokenizer.mask_token)]

    best: list[int | None] = [None] * len(entries)
    was_training = model.training
    model.to(device).eval()
    try:
        with torch.inference_mode():
            allowed = None
            for start in range(0, len(queries), batch_size):
                chunk = queries[start:start + batch_size]
                logits = mask_logits(model, tokenizer, [text for _, text in chunk], device)  # (B, V)
                if allowed is None:
                    allowed = _allowed(words, logits.shape[-1], logits.device)  # (V,)
                k = min(top_k, int(allowed.sum()))
                top = logits.masked_fill(~allowed, float("-inf")).topk(k, dim=-1).indices  # (B, k)
                for (i, _), row in zip(chunk, top.tolist()):
                    rank = next((r for r, token in enumerate(row, start=1) if token in gold[i]), None)
                    if rank is not None and (best[i] is None or rank < best[i]):
                        best[i] = rank
    finally:
        model.train(was_training)
    return best


def mask_logits(model, tokenizer, texts: list[str], device: str | torch.device) -> torch.Tensor:
    """(B, V) the model's logits at the one mask token of each text."""
    encoding = tokenizer(texts, padding=True, return_tensors="pt").to(device)
    is_mask = encoding["input_ids"] == tokenizer.mask_token_id  # (B, T)
    for text, n in zip(texts, is_mask.sum(dim=1).tolist()):
        if n != 1:
            raise ValueError(f"a pattern must hold exactly one mask token, {text!r} holds {n}")
    return model(**encoding).logits[is_mask].float()  # (B, V)


def _allowed(words: list[str | None], vocab_size: int, device: torch.device) -> torch.Tensor:
    """(V,) True where the token is a whole word; ids the tokenizer does not have are not."""
    flags = [w is not None for w in words[:vocab_size]] + [False] * max(0, vocab_size - len(words))
    return torch.tensor(flags, dtype=torch.bool, device=device)


# ---------------------------------------------------------------------------------------
# Scores and the report


def score(ranks: list[int | None], entries: list[Entry]) -> dict[str, dict]:
    """Per frequency bucket and "all": n, MRR (a missing rank counts 0) and P@3, P@10, P@100.

    P@k here is the fraction of entries with a target at rank <= k (a hit rate). Averages are
    computed with exact fractions, then rounded once to float; an empty bucket has None scores.
    """
    if len(ranks) != len(entries):
        raise ValueError(f"got {len(ranks)} ranks for {len(entries)} entries")
    if any(r is not None and r < 1 for r in ranks):
        raise ValueError("ranks are 1-based: every rank must be >= 1 or None")
    groups: dict[str, list[int | None]] = {name: [] for name in BUCKETS + ("all",)}
    for rank, entry in zip(ranks, entries):
        groups[frequency_bucket(entry.count)].append(rank)
        groups["all"].append(rank)
    return {name: _metrics(group) for name, group in groups.items()}


def _metrics(ranks: list[int | None]) -> dict:
    n = len(ranks)
    if n == 0:
        return {"n": 0, "MRR": None, **{f"P@{k}": None for k in PRECISION_AT}}
    mrr = sum((Fraction(1, r) for r in ranks if r is not None), Fraction(0)) / n
    hits = {k: Fraction(sum(1 for r in ranks if r is not None and r <= k), n) for k in PRECISION_AT}
    return {"n": n, "MRR": float(mrr), **{f"P@{k}": float(p) for k, p in hits.items()}}


def report_table(results: dict[str, dict], metrics: tuple[str, ...] = ("MRR", "P@10")) -> str:
    """A markdown table: one row per model variant, a column per bucket and metric."""
    columns = [(bucket, metric) for bucket in BUCKETS + ("all",) for metric in metrics]
    lines = ["| model | " + " | ".join(f"{b} {m}" for b, m in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for name, scores in results.items():
        cells = [_cell(scores.get(bucket, {}).get(metric)) for bucket, metric in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"
