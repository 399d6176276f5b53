"""The evaluation library (pipeline/evaluate.py): held-out word accounting, key-word vectors, PCA, tables.

    .venv/bin/python -m pytest -q tests/test_evaluate.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from pipeline import evaluate as ev
from pipeline import infer
from pipeline.model import Bertram, NgramVocab

WORDS = ["apple", "orange", "river", "stone", "kumquat", "tree"]


def _model(mode: str, base: str) -> Bertram:
    torch.manual_seed(0)
    return Bertram.create(mode, base, NgramVocab.build(WORDS * 4, min_count=4), ngram_dropout=0.0).eval()


def test_split_heldout_keeps_usable_contexts_and_accounts_for_every_word(tiny_bert):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    contexts = {"river": ["rivers flow", "the river is green"], "kumquat": ["a kumquat is sweet"],
                "stone": ["stones only"], "apple": ["an apple", "apple tree"]}
    usable, not_single, no_contexts = ev.split_heldout(["river", "kumquat", "stone", "tree", "apple"], contexts,
                                                       tokenizer)
    assert usable == {"river": ["the river is green"], "apple": ["an apple", "apple tree"]}
    assert list(usable) == ["river", "apple"]  # the order of the held-out words
    assert not_single == ["kumquat"]  # kum ##quat
    assert no_contexts == ["stone", "tree"]


def test_key_word_vectors_come_from_contexts_else_the_form_else_none(tiny_bert):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    contexts = {"river": ["the river is green", "a river of stone", "rivers"], "stone": ["stones only"]}
    words = ["river", "stone", "apple"]
    context_model = _model("context", str(tiny_bert))
    vectors, sources = ev.key_word_vectors(context_model, tokenizer, words, contexts, max_contexts=1, seed=3)
    assert sources == {"contexts": ["river"], "form": [], "none": ["stone", "apple"]}
    sample = ev.sample_contexts({"river": ["the river is green", "a river of stone"]}, 1, 3)["river"]
    assert list(vectors) == ["river"] and len(sample) == 1
    assert torch.allclose(vectors["river"], infer.infer_vector(context_model, tokenizer, "river", sample), atol=1e-5)

    add_model = _model("add", str(tiny_bert))
    vectors, sources = ev.key_word_vectors(add_model, tokenizer, words, contexts, max_contexts=8, seed=3)
    assert sources == {"contexts": ["river"], "form": ["stone", "apple"], "none": []}
    form = add_model.form(add_model.ngram_vocab.encode(["stone"]))[0]
    assert torch.allclose(vectors["stone"], form, atol=1e-6)

    form_model = _model("form", str(tiny_bert))
    assert ev.key_word_vectors(form_model, tokenizer, words, contexts, 8, 3)[1]["form"] == words


def test_pca_2d_finds_the_plane_the_points_lie_in():
    rng = np.random.default_rng(0)
    plane = rng.normal(size=(2, 7))  # two directions in 7-D
    coords = rng.normal(size=(30, 2)) * [5.0, 1.0]
    points = coords @ plane + rng.normal(size=7)  # (30, 7), offset from the origin
    xy = ev.pca_2d(points)
    assert xy.shape == (30, 2)
    centered = points - points.mean(0)
    # Two components keep every pairwise distance of points that lie in a plane.
    dist = lambda a: np.linalg.norm(a[:, None] - a[None], axis=-1)  # noqa: E731
    assert np.allclose(dist(xy), dist(centered), atol=1e-8)
    assert xy[:, 0].var() > xy[:, 1].var()  # the first component has the most variance


def test_tables_show_a_dash_for_a_missing_number():
    row = {"model": "m", "contexts": 1, "n": 0, "cosine": float("nan"), "median_rank": float("nan"),
           "hits@10": float("nan")}
    table = ev.markdown_table([row]).splitlines()
    assert table[2] == "| m | 1 | 0 | – | – | – | – | – | – |"  # no MRR, no profile, no spread
    scores = {b: {"n": 0, "MRR": None, "P@3": None, "P@10": None, "P@100": None}
              for b in ("rare", "medium", "frequent")}
    scores["all"] = {"n": 2, "MRR": 0.75, "P@3": 1.0, "P@10": 1.0, "P@100": 1.0}
    lines = ev.wnlampro_table({"plain": scores}).splitlines()
    assert lines[2] == "| plain | rare | 0 | – | – | – | – |"
    assert lines[-1] == "| plain | all | 2 | 0.750 | 1.000 | 1.000 | 1.000 |"


@pytest.mark.parametrize("fixture, wordpiece", [("tiny_bert", True), ("tiny_roberta", False)])
def test_the_baseline_needs_a_wordpiece_tokenizer(request, fixture, wordpiece):
    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue(fixture))
    assert ev.is_wordpiece(tokenizer) is wordpiece


def test_cosine_and_rank_on_hand_made_vectors_with_known_ranks():
    """Five unit-axis embeddings; each prediction's rank of the true word is known by construction."""
    from pipeline.evaluate import cosine_and_rank

    embedding = torch.eye(5) * torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])[:, None]  # norms differ: cosines ignore them
    predicted = {
        "a": torch.tensor([1.0, 0, 0, 0, 0]),        # true word 0: exactly it -> rank 1, cosine 1
        "b": torch.tensor([0, 0.6, 0.8, 0, 0]),      # true word 1: word 2 is nearer -> rank 2, cosine 0.6
        "c": torch.tensor([0.5, 0.6, 0, 0, 0.7]),    # true word 3: cosine 0, three nearer -> rank 4
        "unknown": torch.ones(5),                     # no true id: not counted
    }
    m = cosine_and_rank(predicted, {"a": 0, "b": 1, "c": 3}, embedding)
    assert m["n"] == 3
    assert m["cosine"] == pytest.approx((1.0 + 0.6 + 0.0) / 3, abs=1e-6)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 4) / 3, abs=1e-6)
    assert 1 / 4 <= m["mrr_ci"][0] < m["mrr"] < m["mrr_ci"][1] <= 1  # 95% over resampled words
    assert (m["median_rank"], m["mean_rank"], m["hits@10"]) == (2.0, pytest.approx(7 / 3), 1.0)
    assert m["spread_true"] == pytest.approx(0.0, abs=1e-6)  # orthogonal true embeddings
    cos_ab, cos_ac, cos_bc = 0.0, 0.5 / (0.5**2 + 0.6**2 + 0.7**2) ** 0.5, 0.36 / (0.5**2 + 0.6**2 + 0.7**2) ** 0.5
    assert m["spread"] == pytest.approx((cos_ab + cos_ac + cos_bc) / 3, abs=1e-6)


def test_similarity_profile_sees_geometry_not_only_identity():
    import torch.nn.functional as F

    from pipeline.evaluate import cosine_and_rank

    torch.manual_seed(0)
    embedding = torch.randn(500, 16)
    true_ids = {"a": 3, "b": 7}
    exact = cosine_and_rank({w: embedding[i] for w, i in true_ids.items()}, true_ids, embedding)
    assert exact["profile"] > 0.999 and exact["mrr"] == 1.0
    noisy = cosine_and_rank({w: embedding[i] + 0.5 * torch.randn(16) for w, i in true_ids.items()}, true_ids, embedding)
    random = cosine_and_rank({w: torch.randn(16) for w in true_ids}, true_ids, embedding)
    assert 0.3 < noisy["profile"] < 0.999 and abs(random["profile"]) < 0.2
    # the centroid of the rows: near everything, its profile is not the true row's
    centroid = cosine_and_rank({w: F.normalize(embedding, dim=-1).mean(0) + 0.01 * embedding[i]
                                for w, i in true_ids.items()}, true_ids, embedding)
    assert centroid["profile"] < noisy["profile"]


def test_similarity_profile_is_spearman_over_the_other_rows():
    import torch.nn.functional as F

    from pipeline.evaluate import similarity_profile

    torch.manual_seed(1)
    table = F.normalize(torch.randn(8, 4), dim=-1)
    pred = F.normalize(torch.randn(2, 4), dim=-1)
    ids = torch.tensor([2, 5])
    got = similarity_profile(pred @ table.T, table, ids)

    def ranks(x):
        return np.argsort(np.argsort(x)).astype(float)

    for w in range(2):
        others = [i for i in range(8) if i != int(ids[w])]  # the word's own row left out
        a = ranks((pred[w] @ table.T).numpy()[others])
        b = ranks((table[ids[w]] @ table.T).numpy()[others])
        assert float(got[w]) == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-5)
