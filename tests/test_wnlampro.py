"""WNLaMPro: reading the published format, patterns, ranking with a controlled tiny MLM, scores.

    .venv/bin/python -m pytest -q tests/test_wnlampro.py

The ranking tests zero the MLM head's weight and set its bias, so that the logits at the mask
are a known vector whatever the input: ranks are then exact and known in advance.
"""

from __future__ import annotations

from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch

from pipeline import wnlampro
from pipeline.wnlampro import Entry

# Six entries in the published format: tabs between columns, annotated words `WORD (POS,ZIPF,COUNT)`.
DATASET = "\n".join([
    "0\ttest\tkumquat (n,2.01,7)\thypernym\tfruit (n,4.87,40876)\ttree (n,5.03,77412)",
    "1\tdev\triver (n,4.99,42)\tcohyponym\tstone (n,4.71,33210)",
    "2\ttest\tsweet (a,4.63,900)\tantonym\tsmall (a,5.15,81273)\tgreen (a,5.03,70211)\tlight (a,5.10,90233)",
    "3\ttest\tkumqaut (n,0.00,3)\tcorruption\tkumquat (n,2.01,7)",
    "4\tdev\tapple (n,4.74,120)\tcorruption\tapple (n,4.74,120)",
    "5\ttest\torange (n,4.61,99)\thypernym\tfruit (n,4.87,40876)",
]) + "\n\n"


def entry(word: str, relation: str, targets: list[str], count: int = 5, set_type: str = "test") -> Entry:
    return Entry(id=word, set=set_type, word=word, pos="n", count=count, relation=relation, targets=targets)


# ---------------------------------------------------------------------------------------
# Reading the dataset


def test_read_dataset_parses_the_published_format(tmp_path):
    path = tmp_path / "WNLaMPro.txt"
    path.write_text(DATASET, encoding="utf-8")
    entries = wnlampro.read_dataset(f"file://{path}")
    assert [e.id for e in entries] == ["0", "1", "2", "3", "4", "5"]
    assert entries[0] == Entry("0", "test", "kumquat", "n", 7, "hypernym", ["fruit", "tree"], 2.01)
    assert entries[2] == Entry("2", "test", "sweet", "a", 900, "antonym", ["small", "green", "light"], 4.63)
    assert {e.relation for e in entries} == set(wnlampro.RELATIONS)
    assert [wnlampro.frequency_bucket(e.count) for e in entries] == \
        ["rare", "medium", "frequent", "rare", "frequent", "medium"]
    assert [e.set for e in entries] == ["test", "dev", "test", "test", "dev", "test"]


def test_frequency_buckets_at_their_edges():
    assert [wnlampro.frequency_bucket(c) for c in (0, 9, 10, 99, 100, 10**6)] == \
        ["rare", "rare", "medium", "medium", "frequent", "frequent"]


@pytest.mark.parametrize("line, reason", [
    ("7\ttest\tkumquat (n,2.01,7)\thypernym", "at least 5 tab-separated columns"),
    ("7 test kumquat (n,2.01,7) hypernym fruit (n,4.87,9)", "at least 5 tab-separated columns"),
    ("7\ttest\tkumquat (n,2.01)\thypernym\tfruit (n,4.87,9)", "annotated word"),
    ("7\ttest\tkumquat (n,2.01,7)\thypernym\tfruit", "annotated word"),
    ("7\ttest\tkumquat (n,2.01,seven)\thypernym\tfruit (n,4.87,9)", "COUNT an integer"),
    ("7\ttest\tkumquat (n,2.01,7)\tmeronym\tfruit (n,4.87,9)", "RELATION must be one of"),
    ("7\ttrain\tkumquat (n,2.01,7)\thypernym\tfruit (n,4.87,9)", "SET must be one of"),
])
def test_a_malformed_line_raises_naming_its_number_and_the_problem(tmp_path, line, reason):
    path = tmp_path / "bad.txt"
    lines = DATASET.splitlines()
    path.write_text("\n".join(lines[:2] + [line] + lines[2:]), encoding="utf-8")
    with pytest.raises(ValueError, match="line 3: ") as error:
        wnlampro.read_dataset(str(path))
    assert reason in str(error.value)


def test_select_keeps_a_set_and_corruptions_of_rare_words_only():
    entries = [entry("a", "corruption", ["x"], count=9), entry("b", "corruption", ["x"], count=10),
               entry("c", "hypernym", ["x"], count=500), entry("d", "hypernym", ["x"], set_type="dev")]
    assert [e.word for e in wnlampro.select(entries)] == ["a", "c", "d"]
    assert [e.word for e in wnlampro.select(entries, keep_frequent_corruptions=True)] == ["a", "b", "c", "d"]
    assert [e.word for e in wnlampro.select(entries, set_type="dev")] == ["d"]
    with pytest.raises(ValueError, match="set_type"):
        wnlampro.select(entries, set_type="train")


# ---------------------------------------------------------------------------------------
# Patterns and rendering


def test_render_styles():
    has_vector = {"kumquat"}
    assert wnlampro.render("kumquat", "plain", has_vector) == "kumquat"
    assert wnlampro.render("kumquat", "replace", has_vector) == "<BERTRAM:kumquat>"
    assert wnlampro.render("kumquat", "slash", has_vector) == "kumquat / <BERTRAM:kumquat>"
    assert wnlampro.render("river", "replace", has_vector) == "river"  # no vector: plain
    assert wnlampro.render("river", "slash", has_vector) == "river"
    with pytest.raises(ValueError, match="style must be one of"):
        wnlampro.render("river", "quotes", has_vector)


def test_pattern_texts_fill_in_word_article_and_mask():
    texts = wnlampro.pattern_texts(entry("apple", "hypernym", ["fruit"]), "slash", {"apple"}, "<mask>")
    assert "apple / <BERTRAM:apple> is a <mask> ." in texts
    assert "an apple / <BERTRAM:apple> is a kind of <mask> ." in texts
    assert wnlampro.pattern_texts(entry("kumquat", "hypernym", []), "plain", set(), "[MASK]")[1] == \
        "a kumquat is a [MASK] ."
    assert wnlampro.pattern_texts(entry("kumqaut", "corruption", []), "plain", set(), "[MASK]") == \
        ['" kumqaut " is a misspelling of " [MASK] " .', '" kumqaut " . did you mean " [MASK] " ?']
    for relation in wnlampro.RELATIONS:
        for pattern in wnlampro.PATTERNS[relation]:
            assert pattern.count("<W>") == 1 and pattern.count("[MASK]") == 1, pattern


# ---------------------------------------------------------------------------------------
# Ranking with a controlled MLM


def controlled_mlm(path, order: list[str], added: tuple[str, ...] = ()):
    """(model, tokenizer): the tiny MLM at `path` whose logits at every position are fixed:
    the tokens in `order` score 100, 99, 98, ... in that order; every other token scores below."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_tokens(list(added))
    model = AutoModelForMaskedLM.from_pretrained(path)
    model.resize_token_embeddings(len(tokenizer))
    head = model.get_output_embeddings()
    bias = torch.linspace(-2, -1, head.out_features)  # below any token in `order`, all distinct
    for position, token in enumerate(order):
        bias[tokenizer.convert_tokens_to_ids(token)] = 100.0 - position
    head.weight = torch.nn.Parameter(torch.zeros_like(head.weight))  # untied: the input embeddings stay
    head.bias = torch.nn.Parameter(bias)
    return model, tokenizer


class Boosted(torch.nn.Module):
    """A masked LM plus `boost[token]` on every row whose input holds `trigger`; records its inputs."""

    def __init__(self, mlm, trigger: int, boost: torch.Tensor):
        super().__init__()
        self.mlm, self.trigger, self.boost = mlm, trigger, boost
        self.inputs: list[torch.Tensor] = []

    def forward(self, **encoding):
        self.inputs.append(encoding["input_ids"].clone())
        logits = self.mlm(**encoding).logits  # (B, T, V)
        triggered = (encoding["input_ids"] == self.trigger).any(dim=1)  # (B,)
        return SimpleNamespace(logits=logits + triggered[:, None, None] * self.boost)


# Specials, continuations and added tokens score highest; among whole words: fruit 1, tree 2, kum 3, apple 4, stone 5.
BERT_ORDER = ["[MASK]", "##s", "<BERTRAM:kumquat>", "fruit", "[CLS]", "tree", "##quat", "kum", "apple", "stone"]


@pytest.fixture(scope="module")
def bert(tiny_bert):
    return controlled_mlm(tiny_bert, BERT_ORDER, added=("<BERTRAM:kumquat>",))


def test_logits_at_the_mask_are_the_controlled_vector(bert):
    model, tokenizer = bert
    logits = wnlampro.mask_logits(model.eval(), tokenizer, ["kumquat is a [MASK] .", "river and [MASK] ."], "cpu")
    top = logits.topk(len(BERT_ORDER)).indices  # (2, 10)
    assert top.tolist() == [tokenizer.convert_tokens_to_ids(BERT_ORDER)] * 2


def test_rank_targets_exact_ranks_with_bert(bert):
    model, tokenizer = bert
    entries = [entry("kumquat", "hypernym", ["fruit"]),  # top whole word despite specials above it
               entry("river", "cohyponym", ["apple", "tree"]),  # best target
               entry("sweet", "antonym", ["stone"]),
               entry("kumquat", "hypernym", ["kumquat", "s", "[CLS]"]),  # multi-piece, continuation, special
               entry("orange", "corruption", ["the"])]
    assert wnlampro.rank_targets(model, tokenizer, entries, "plain", top_k=100) == [1, 2, 5, None, 20]
    assert wnlampro.rank_targets(model, tokenizer, entries, "plain", top_k=4) == [1, 2, None, None, None]


def test_the_best_rank_over_patterns_counts(bert):
    model, tokenizer = bert
    quote = tokenizer.convert_tokens_to_ids('"')
    boost = torch.zeros(model.get_output_embeddings().out_features)
    boost[tokenizer.convert_tokens_to_ids("stone")] = 50.0  # rank 1 in the quoted pattern only
    boost[tokenizer.convert_tokens_to_ids("apple")] = -500.0  # out of the top in the quoted pattern only
    boosted = Boosted(model, quote, boost)
    entries = [entry("river", "cohyponym", ["stone"]), entry("river", "cohyponym", ["apple"])]
    # cohyponym patterns: `<W> and [MASK] .` (stone 5, apple 4) and `" <W> " and " [MASK] " .` (stone 1, apple -)
    assert wnlampro.rank_targets(boosted, tokenizer, entries, "plain") == [1, 4]
    assert wnlampro.rank_targets(model, tokenizer, entries, "plain") == [5, 4]


def test_batches_hold_many_patterns_and_do_not_change_ranks(bert):
    model, tokenizer = bert
    boosted = Boosted(model, -1, torch.zeros(1))  # never triggered: only counts the forward passes
    entries = [entry(w, r, ["tree", "apple"]) for w in ("kumquat", "river", "sweet") for r in wnlampro.RELATIONS]
    n_patterns = 3 * sum(len(wnlampro.PATTERNS[r]) for r in wnlampro.RELATIONS)
    one_batch = wnlampro.rank_targets(boosted, tokenizer, entries, "plain", batch_size=64)
    assert len(boosted.inputs) == 1 and boosted.inputs[0].shape[0] == n_patterns
    small = wnlampro.rank_targets(boosted, tokenizer, entries, "plain", batch_size=5)
    assert len(boosted.inputs) == 1 + -(-n_patterns // 5)
    assert one_batch == small == [2] * len(entries)


def test_replace_and_slash_feed_the_bertram_token(bert):
    model, tokenizer = bert
    boosted = Boosted(model, -1, torch.zeros(1))
    token = tokenizer.convert_tokens_to_ids("<BERTRAM:kumquat>")
    kum = tokenizer.convert_tokens_to_ids("kum")
    entries = [entry("kumquat", "cohyponym", ["fruit"]), entry("river", "cohyponym", ["fruit"])]
    assert wnlampro.words_with_vectors(tokenizer) == {"kumquat"}
    for style, with_pieces in (("replace", False), ("slash", True)):
        boosted.inputs.clear()
        assert wnlampro.rank_targets(boosted, tokenizer, entries, style) == [1, 1]
        ids = boosted.inputs[0]  # rows: kumquat's 2 patterns, then river's 2 (no vector: plain)
        assert (ids[:2] == token).sum(dim=1).tolist() == [1, 1]
        assert (ids[:2] == kum).any(dim=1).tolist() == [with_pieces] * 2
        assert not (ids[2:] == token).any()
    assert wnlampro.rank_targets(boosted, tokenizer, entries, "replace", bertram_words=set()) == [1, 1]
    assert not (boosted.inputs[-1] == token).any()  # an explicit empty set means plain everywhere


def test_rank_targets_with_byte_level_bpe(tiny_roberta):
    # "a" without Ġ continues a word and "Ġ" alone is no word: among words Ġo is 1, Ġa 2, Ġs 3.
    model, tokenizer = controlled_mlm(tiny_roberta, ["a", "Ġ", "<mask>", "Ġo", "Ġa", "Ġs"])
    entries = [entry("kumquat", "hypernym", ["a"]), entry("river", "cohyponym", ["s"]),
               entry("sweet", "antonym", ["Ġa"])]  # gold words are compared without the Ġ
    assert wnlampro.rank_targets(model, tokenizer, entries, "plain", top_k=100) == [2, 3, None]
    assert wnlampro.rank_targets(model, tokenizer, entries, "plain", top_k=2) == [2, None, None]


def test_rank_targets_rejects_bad_arguments(bert):
    model, tokenizer = bert
    with pytest.raises(ValueError, match="style"):
        wnlampro.rank_targets(model, tokenizer, [], "quotes")
    with pytest.raises(ValueError, match="top_k"):
        wnlampro.rank_targets(model, tokenizer, [], "plain", top_k=0)
    with pytest.raises(ValueError, match="exactly one mask token"):
        wnlampro.mask_logits(model, tokenizer, ["no mask here ."], "cpu")


# ---------------------------------------------------------------------------------------
# Scores


def test_score_is_exact():
    counts = [3, 50, 7, 500, 8, 99]  # rare, medium, rare, frequent, rare, medium
    entries = [entry(f"w{i}", "hypernym", ["x"], count=c) for i, c in enumerate(counts)]
    ranks = [1, 2, None, 10, 4, None]  # the last one was at 101: outside the top 100
    scores = wnlampro.score(ranks, entries)
    # all: MRR = (1 + 1/2 + 1/10 + 1/4) / 6 = 37/120; ranks <= 3: 2 of 6, <= 10 and <= 100: 4 of 6
    assert scores["all"] == {"n": 6, "MRR": float(Fraction(37, 120)), "P@3": float(Fraction(1, 3)),
                             "P@10": float(Fraction(2, 3)), "P@100": float(Fraction(2, 3))}
    assert scores["rare"] == {"n": 3, "MRR": float(Fraction(5, 4) / 3), "P@3": float(Fraction(1, 3)),
                              "P@10": float(Fraction(2, 3)), "P@100": float(Fraction(2, 3))}
    assert scores["medium"] == {"n": 2, "MRR": 0.25, "P@3": 0.5, "P@10": 0.5, "P@100": 0.5}
    assert scores["frequent"] == {"n": 1, "MRR": 0.1, "P@3": 0.0, "P@10": 1.0, "P@100": 1.0}


def test_score_of_an_empty_bucket_and_bad_input():
    scores = wnlampro.score([3], [entry("w", "hypernym", ["x"], count=5)])
    assert scores["frequent"] == {"n": 0, "MRR": None, "P@3": None, "P@10": None, "P@100": None}
    with pytest.raises(ValueError, match="2 ranks for 1 entries"):
        wnlampro.score([1, 2], [entry("w", "hypernym", ["x"])])
    with pytest.raises(ValueError, match="1-based"):
        wnlampro.score([0], [entry("w", "hypernym", ["x"])])


def test_report_table():
    entries = [entry("a", "hypernym", ["x"], count=5), entry("b", "hypernym", ["x"], count=50)]
    table = wnlampro.report_table({"plain": wnlampro.score([None, 2], entries),
                                   "bertram-slash": wnlampro.score([1, 20], entries)})
    assert table == (
        "| model | rare MRR | rare P@10 | medium MRR | medium P@10 | frequent MRR | frequent P@10 "
        "| all MRR | all P@10 |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        "| plain | 0.000 | 0.000 | 0.500 | 1.000 | – | – | 0.250 | 0.500 |\n"
        "| bertram-slash | 1.000 | 1.000 | 0.050 | 0.000 | – | – | 0.525 | 0.500 |\n")
