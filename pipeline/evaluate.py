"""Evaluation: how well inferred vectors reconstruct the language model's own embeddings, and
how much they help the language model on WNLaMPro.

**Reconstruction.** For words the tokenizer keeps as one token we know the true answer
(their row of the input embedding matrix). Held out of training (`jobs.train
--exclude_words`), such words show how well BERTRAM infers an embedding from 1, 4, 16
contexts: the cosine to the true embedding, and the rank of the true word among all input
embeddings by cosine to the inferred vector (1 = the nearest). The baseline is what the
language model would do if the word were not in its vocabulary: the mean embedding of the
word pieces it would be split into (WordPiece tokenizers only).

    usable, not_single, no_contexts = split_heldout(words, contexts, tokenizer)
    rows = reconstruction({"fused": infer.load("out/fused")}, usable, tokenizer, embedding)
    print(markdown_table(rows))

**WNLaMPro** (`pipeline/wnlampro.py`): the masked language model ranks the relatives of
key words, plain and with BERTRAM vectors for the key words (`wnlampro_results`).

Pure library, no Ray: `jobs/evaluate.py` loads the models and writes the report.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from pipeline import augment, downstream, infer, wnlampro
from pipeline.batching import mask_word
from pipeline.model import uses_context, uses_form
from pipeline.targets import split_by_pieces, whole_word_tokens, wordpiece_without

# ---------------------------------------------------------------------------------------
# Reconstruction of held-out words


def is_wordpiece(tokenizer) -> bool:
    """Whether the tokenizer is WordPiece (BERT): the mean-of-pieces baseline needs `##` continuations."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.model).__name__ == "WordPiece"


def mean_of_pieces(words: Sequence[str], tokenizer, embedding: torch.Tensor) -> dict[str, torch.Tensor]:
    """The baseline vector of each word: the mean embedding of its pieces without it (WordPiece models)."""
    vocab = tokenizer.get_vocab()
    out = {}
    for word in words:
        pieces = wordpiece_without(word, vocab)
        if pieces:
            out[word] = embedding[pieces].mean(0)
    return out


def single_token_ids(words: Sequence[str], tokenizer) -> dict[str, int]:
    """word → its token id, for the words the tokenizer keeps as one token in running text (the
    words the targets stage gives their embedding row as target)."""
    single, ids, _, _ = split_by_pieces(list(words), tokenizer)
    return dict(zip(single, ids))


def split_heldout(words: Sequence[str], contexts: dict[str, list[str]],
                  tokenizer) -> tuple[dict[str, list[str]], list[str], list[str]]:
    """(word → usable contexts, words that are not single tokens, single-token words without a usable context).

    A usable context holds the word as a whole word (what BERTRAM masks). The first part is
    in the order of `words`: reconstruction samples contexts in that order.
    """
    ids = single_token_ids(words, tokenizer)
    usable, not_single, no_contexts = {}, [], []
    for word in words:
        found = [c for c in contexts.get(word, []) if mask_word(word, c, "[MASK]") is not None]
        if word not in ids:
            not_single.append(word)
        elif not found:
            no_contexts.append(word)
        else:
            usable[word] = found
    return usable, not_single, no_contexts


def sample_contexts(contexts: dict[str, list[str]], n: int, seed: int) -> dict[str, list[str]]:
    """`n` contexts per word (all of them when it has fewer), the same for the same seed."""
    rng = random.Random(seed)
    return {w: rng.sample(c, min(n, len(c))) for w, c in contexts.items()}


def inferred_at(model, tokenizer, contexts: dict[str, list[str]], n: int, seed: int,
                words: Sequence[str] | None = None, max_seq_length: int = 128) -> dict[str, torch.Tensor]:
    """The vectors a model infers from `n` sampled contexts per word, as `reconstruction` draws them
    (the sample is drawn over all of `contexts`, then restricted to `words`)."""
    chosen = sample_contexts(contexts, n, seed + n)
    if words is not None:
        chosen = {w: chosen[w] for w in words}
    with torch.inference_mode():
        return infer.infer_vectors(model, tokenizer, chosen, max_seq_length=max_seq_length)


def cosine_and_rank(predicted: dict[str, torch.Tensor], true_ids: dict[str, int],
                    embedding: torch.Tensor) -> dict[str, float]:
    """Mean cosine of predicted to true embeddings; median and mean rank of the true word among all
    embeddings (1 = nearest), its mean reciprocal rank (MRR), the share with the true word in the
    nearest 10; the mean pairwise cosine among the predicted vectors (`spread`: near 1 when
    they all collapse to one point; compare `spread_true`, the same among the true embeddings); and the
    similarity profile (`profile`, `similarity_profile`): geometry, not only identity."""
    words = [w for w in predicted if w in true_ids]
    if not words:
        return {"n": 0, "cosine": float("nan"), "mrr": float("nan"), "median_rank": float("nan"),
                "mean_rank": float("nan"), "hits@10": float("nan"), "spread": float("nan"),
                "spread_true": float("nan"), "profile": float("nan"), "mrr_ci": [float("nan"), float("nan")]}
    pred = torch.stack([predicted[w].float() for w in words])  # (W, D)
    ids = torch.tensor([true_ids[w] for w in words])
    table = F.normalize(embedding.float(), dim=-1)  # (V, D)
    with torch.autocast(pred.device.type, enabled=False):  # ranks in float32, also inside a bf16 region
        sims = F.normalize(pred, dim=-1) @ table.T  # (W, V)
    true_sim = sims[torch.arange(len(words)), ids]  # (W,)
    ranks = (sims > true_sim[:, None]).sum(1) + 1  # (W,)
    reciprocal = 1.0 / ranks.float()
    return {"n": len(words), "cosine": float(true_sim.mean()), "mrr": float(reciprocal.mean()),
            "mrr_ci": bootstrap_interval(reciprocal),
            "median_rank": float(ranks.float().median()), "mean_rank": float(ranks.float().mean()),
            "hits@10": float((ranks <= 10).float().mean()), "spread": mean_pairwise_cosine(pred),
            "spread_true": mean_pairwise_cosine(embedding[ids].float()),
            "profile": float(similarity_profile(sims, table, ids).mean())}


def bootstrap_interval(values: torch.Tensor, resamples: int = 1000, seed: int = 0) -> list[float]:
    """95% bootstrap interval of the mean of per-word `values` (resampling words; seeded)."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(values), (resamples, len(values)), generator=generator)
    means = values.float().cpu()[picks].mean(1)
    return [float(means.quantile(0.025)), float(means.quantile(0.975))]


def similarity_profile(sims: torch.Tensor, table: torch.Tensor, ids: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """(W,) per word, the Spearman correlation between the predicted vector's cosines to every row of the
    vocabulary (`sims`, (W, V)) and the true row's own cosines to them (`table`: unit rows, (V, D)), the
    word's own row left out: 1 when the vector sees the vocabulary as the true embedding does (which words
    are near, which far), whatever its rank of the word itself."""
    out = []
    for start in range(0, len(ids), chunk):
        rows, own = sims[start:start + chunk].float(), ids[start:start + chunk]
        with torch.autocast(rows.device.type, enabled=False):
            true = table[own] @ table.T  # (w, V)
        keep = torch.ones_like(rows, dtype=torch.bool)
        keep[torch.arange(len(own)), own] = False
        a = _ranks(rows[keep].view(len(own), -1))
        b = _ranks(true[keep].view(len(own), -1))
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        out.append((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12))
    return torch.cat(out) if out else torch.zeros(0)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dimension (ties broken by position)."""
    ranks = torch.empty_like(x)
    ranks.scatter_(1, x.argsort(1), torch.arange(x.shape[1], dtype=x.dtype, device=x.device).expand_as(x))
    return ranks


def mean_pairwise_cosine(vectors: torch.Tensor) -> float:
    """Mean cosine over all pairs of distinct rows of (W, D) `vectors` (nan for fewer than 2)."""
    if len(vectors) < 2:
        return float("nan")
    unit = F.normalize(vectors.float(), dim=-1)
    with torch.autocast(unit.device.type, enabled=False):
        sims = unit @ unit.T  # (W, W)
    n = len(vectors)
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


def reconstruction(models: dict[str, tuple], contexts: dict[str, list[str]], tokenizer, embedding: torch.Tensor,
                   counts: Sequence[int] = (1, 4, 16), seed: int = 0,
                   on_row: Callable[[dict], None] | None = None, max_seq_length: int = 128) -> list[dict]:
    """Rows (model, contexts, n, cosine, ranks) for each model and number of contexts, after the
    baseline's row (only for a WordPiece `tokenizer`: see `is_wordpiece`).

    `models` maps a name to (Bertram, its tokenizer); `contexts` holds the evaluation
    words (single tokens of `tokenizer`) and their contexts. `on_row` is called with each
    row as soon as it is computed (progress).
    """
    true_ids = single_token_ids(list(contexts), tokenizer)
    rows = []
    if is_wordpiece(tokenizer):
        rows.append({"model": "mean of word pieces (baseline)", "contexts": "-",
                     **cosine_and_rank(mean_of_pieces(list(true_ids), tokenizer, embedding), true_ids, embedding)})
    evaluated = {w: c for w, c in contexts.items() if w in true_ids}
    for name, (model, model_tokenizer) in models.items():
        for n in counts:
            vectors = inferred_at(model, model_tokenizer, evaluated, n, seed, max_seq_length=max_seq_length)
            rows.append({"model": name, "contexts": n, **cosine_and_rank(vectors, true_ids, embedding)})
            if on_row is not None:
                on_row(rows[-1])
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The reconstruction table; `spread` is the mean pairwise cosine among a row's vectors (the
    true embeddings' own is in the caption line under the table)."""
    lines = ["| model | contexts | words | cosine | MRR | median rank | hits@10 | profile | spread |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['contexts']} | {r['n']} | {_number(r['cosine'], '.3f')} | "
                     f"{_number(r.get('mrr'), '.3f')}{_interval(r.get('mrr_ci'))} | {_number(r['median_rank'], '.0f')} | "
                     f"{_number(r['hits@10'], '.2f')} | {_number(r.get('profile'), '.3f')} | "
                     f"{_number(r.get('spread'), '.3f')} |")
    lines.append("")
    lines.append("MRR: mean reciprocal rank of the true word, with its 95% bootstrap interval over the words.")
    lines.append("profile: Spearman correlation, per word then averaged, between the vector's cosines to every "
                 "vocabulary row and the true embedding's (geometry: which words it is near).")
    true_spread = next((r["spread_true"] for r in rows if r.get("spread_true") == r.get("spread_true")
                        and r.get("spread_true") is not None), None)
    if true_spread is not None:
        lines.append("")
        lines.append(f"spread: mean pairwise cosine among a row's vectors; among the true embeddings of these "
                     f"words it is {true_spread:.3f} (far above it: the vectors collapse towards one point).")
    return "\n".join(lines)


def _interval(ci: list[float] | None) -> str:
    """' (lo-hi)' for a table cell, or nothing (no interval, or no words)."""
    if not ci or ci[0] != ci[0]:
        return ""
    return f" ({ci[0]:.2f}-{ci[1]:.2f})"


def _number(value: float | None, spec: str) -> str:
    """A table cell; a missing value (None, or NaN when no word could be scored) is a dash."""
    return "–" if value is None or value != value else format(value, spec)


def hold_out(words: Sequence[str], fraction: float, seed: int) -> list[str]:
    """A seeded sample of `fraction` of `words` (sorted), e.g. single-token targets to keep out of training."""
    rng = np.random.default_rng(seed)
    k = max(1, int(round(fraction * len(words))))
    return sorted(rng.choice(sorted(words), size=k, replace=False).tolist())


# ---------------------------------------------------------------------------------------
# WNLaMPro with BERTRAM vectors


def key_word_vectors(model, tokenizer, words: Sequence[str], contexts: dict[str, list[str]], max_contexts: int,
                     seed: int) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """(vectors, the words by where their vector came from: "contexts", "form", "none").

    A word's vector is inferred from at most `max_contexts` of its usable contexts (a
    seeded sample); a word without any gets its form vector when the model has a form part,
    else no vector (it stays plain in every style).
    """
    mode = model.config.mode
    usable = {w: [c for c in contexts.get(w, []) if mask_word(w, c, "[MASK]") is not None] if uses_context(mode)
              else [] for w in words}
    chosen = sample_contexts(usable, max_contexts, seed)
    if not uses_form(mode):
        chosen = {w: c for w, c in chosen.items() if c}
    with torch.inference_mode():
        vectors = infer.infer_vectors(model, tokenizer, chosen)
    sources = {"contexts": [w for w in words if usable[w] and w in vectors],
               "form": [w for w in words if not usable[w] and w in vectors],
               "none": [w for w in words if w not in vectors]}
    return vectors, sources


def wnlampro_results(lm, tokenizer, entries: list[wnlampro.Entry], vectors: dict[str, torch.Tensor],
                     styles: Sequence[str] = ("replace", "slash"), device: str | torch.device = "cpu",
                     batch_size: int = 64) -> dict[str, dict]:
    """WNLaMPro scores (`wnlampro.score`) of the plain masked LM, then of the LM given `vectors`
    as `<BERTRAM:w>` tokens in each style. Adds those tokens to `lm` and `tokenizer`."""
    plain = wnlampro.rank_targets(lm, tokenizer, entries, "plain", batch_size=batch_size, device=device)
    results = {"plain": wnlampro.score(plain, entries)}
    augment.add_word_vectors_to_model(vectors, tokenizer, lm)
    for style in styles:
        ranks = wnlampro.rank_targets(lm, tokenizer, entries, style, batch_size=batch_size, device=device,
                                      bertram_words=set(vectors))
        results[f"bertram {style}"] = wnlampro.score(ranks, entries)
    return results


def wnlampro_table(results: dict[str, dict]) -> str:
    """A markdown table: a row per variant and frequency bucket, a column per metric."""
    metrics = ("MRR",) + tuple(f"P@{k}" for k in wnlampro.PRECISION_AT)
    lines = ["| model | bucket | entries | " + " | ".join(metrics) + " |", "|---|---|---:|" + "---:|" * len(metrics)]
    for name, scores in results.items():
        for bucket in wnlampro.BUCKETS + ("all",):
            s = scores[bucket]
            lines.append(f"| {name} | {bucket} | {s['n']} | " + " | ".join(_number(s[m], '.3f') for m in metrics)
                         + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Plots (PNG bytes, so that they can be written to any URI)


def pca_2d(points: np.ndarray) -> np.ndarray:
    """(N, 2) coordinates of (N, D) points on their first two principal components."""
    centered = points - points.mean(axis=0)  # (N, D)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)  # vt: (min(N, D), D)
    return centered @ vt[:2].T  # (N, 2)


def cosine_plot(rows: list[dict]) -> bytes:
    """Cosine and median rank against the number of contexts, a line per model; the baseline is a
    dashed horizontal line."""
    plt = _pyplot()
    fig, (cos_ax, rank_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    models = list(dict.fromkeys(r["model"] for r in rows if r["contexts"] != "-"))
    for name in models:
        mine = [r for r in rows if r["model"] == name]
        counts = [r["contexts"] for r in mine]
        cos_ax.plot(counts, [r["cosine"] for r in mine], marker="o", label=name)
        rank_ax.plot(counts, [r["median_rank"] for r in mine], marker="o", label=name)
    for r in rows:
        if r["contexts"] == "-":
            cos_ax.axhline(r["cosine"], color="gray", linestyle="--", label=r["model"])
            rank_ax.axhline(r["median_rank"], color="gray", linestyle="--", label=r["model"])
    counts = sorted({r["contexts"] for r in rows if r["contexts"] != "-"})
    for ax, label in ((cos_ax, "cosine to the true embedding (higher is better)"),
                      (rank_ax, "median rank of the true word (lower is better)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.set_xlabel("contexts per word")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    rank_ax.set_yscale("log")
    cos_ax.legend(fontsize=8)
    fig.suptitle(f"Reconstruction of {rows[0]['n']} held-out words")
    return _png(plt, fig)


def pca_plot(words: Sequence[str], inferred: np.ndarray, true: np.ndarray, title: str) -> bytes:
    """Inferred (W, D) and true (W, D) vectors on the first two principal components of all of
    them, a line from each inferred point to its word's true point."""
    plt = _pyplot()
    xy = pca_2d(np.concatenate([inferred, true]).astype(np.float64))  # (2W, 2)
    guessed, actual = xy[:len(words)], xy[len(words):]
    fig, ax = plt.subplots(figsize=(8, 7))
    for (x0, y0), (x1, y1) in zip(guessed, actual):
        ax.plot([x0, x1], [y0, y1], color="gray", linewidth=0.8, alpha=0.6)
    ax.scatter(actual[:, 0], actual[:, 1], marker="o", color="tab:blue", label="true embedding")
    ax.scatter(guessed[:, 0], guessed[:, 1], marker="x", color="tab:red", label="inferred by BERTRAM")
    for word, (x, y) in zip(words, actual):
        ax.annotate(word, (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("principal component 1")
    ax.set_ylabel("principal component 2")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(plt, fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def nearest_tokens(vectors: pa.Table, model_path: str, k: int = 5) -> dict[str, list[str]]:
    """For each word of a vectors table (word, vector), the `k` whole-word vocabulary tokens of the model at
    `model_path` whose input embeddings are nearest (cosine) to its vector."""
    from transformers import AutoModel, AutoTokenizer

    if vectors.num_rows == 0:
        return {}
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    embedding = AutoModel.from_pretrained(model_path).get_input_embeddings().weight.detach()  # (V, D)
    # whole words only, by the family's word-start mark (kumquat, Ġkumquat, ▁kumquat): no pieces or specials
    words, ids = whole_word_tokens(tokenizer)
    rows = torch.tensor(vectors["vector"].to_pylist())  # (W, D)
    sims = F.normalize(rows, dim=-1) @ F.normalize(embedding[ids], dim=-1).T  # (W, V')
    top = sims.topk(min(k, len(ids)), dim=-1).indices.tolist()
    return {w: [words[i] for i in row] for w, row in zip(vectors["word"].to_pylist(), top)}


def masked_lm(path: str):
    """The masked LM at `path` and the names of its head's weights the checkpoint lacks (random: no MLM head)."""
    from transformers import AutoModelForMaskedLM
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()  # the caller's message says what matters
    logging.disable_progress_bar()
    try:
        lm, info = AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True)
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
    return lm, sorted(k for k in info["missing_keys"] if not k.startswith(lm.base_model_prefix + "."))


def json_ready(value):
    """NaN (no word could be scored) as null: report.json stays strict JSON."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_ready(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    return value


def _some(words: list[str], k: int = 10) -> str:
    return ", ".join(words[:k]) + (f" and {len(words) - k} more" if len(words) > k else "")


def report_markdown(report: dict, bertram: str, model: str, counts: Sequence[int], plots: list[str],
                    main: str = "bertram") -> str:
    """report.md of jobs.evaluate: the models, the reconstruction table and plots, the downstream table, WNLaMPro."""
    lines = [f"# BERTRAM evaluation: {bertram}", "", f"Language model: `{model}`. Models:", ""]
    lines += [f"* **{name}**: `{m['uri']}` (mode {m['mode']})" for name, m in report["models"].items()]
    if "reconstruction" in report:
        rec = report["reconstruction"]
        words = rec["words"]
        lines += ["", "## Reconstruction of held-out words", "",
                  "Cosine of the inferred to the true input embedding, and the rank of the true word among all "
                  f"{rec['embedding_rows']} input embeddings by cosine to the inferred vector (1 = nearest), for "
                  f"vectors inferred from 1..{max(counts)} sampled contexts.", "",
                  f"{words['evaluated']} of {words['heldout']} held-out words evaluated; "
                  f"{len(words['not_single_token'])} are not single tokens"
                  + (f" ({_some(words['not_single_token'])})" if words['not_single_token'] else "")
                  + f", {len(words['no_contexts'])} have no context that contains them"
                  + (f" ({_some(words['no_contexts'])})" if words['no_contexts'] else "") + ". "
                  + "".join(f"{k} words have fewer than {n} contexts and use all they have. "
                            for n, k in words["fewer_contexts_than"].items() if k)
                  + f"Baseline: {rec['baseline']}.", "",
                  markdown_table(rec["rows"])]
        if "reconstruction.png" in plots:
            lines += ["", "![cosine and median rank vs contexts](reconstruction.png)"]
        if "pca.png" in plots:
            lines += ["", f"PCA of inferred ({main}, {max(counts)} contexts) and true vectors of a sample "
                      "of held-out words; a line joins each word's two points.", "", "![PCA](pca.png)"]
    if report.get("downstream", {}).get("rows"):
        lines += ["", "## Downstream: the language model's outputs", "",
                  "What the language model computes with each held-out word in sentences BERTRAM did not read: the "
                  "word as the pieces it would get without its token (the model without BERTRAM), as one token "
                  "carrying the mean of those pieces' rows (control), and as one token carrying its BERTRAM vector "
                  "(what the augmented model does with the plain word).", "",
                  downstream.markdown_table(report["downstream"]["rows"], report["downstream"]["pooling"],
                                            report["downstream"]["row_norm"])]
    if "wnlampro" in report:
        wn = report["wnlampro"]
        lines += ["", "## WNLaMPro", "",
                  "Mean reciprocal rank of the best gold relative among the masked LM's whole-word predictions "
                  "(0 when none is in the top 100) and P@k (share of entries with a gold word in the top k), by "
                  "key-word count: rare < 10 <= medium < 100 <= frequent.", "",
                  f"{wn['entries']} {wn['set']} entries of `{wn['file']}`, {wn['key_words']} key words; "
                  f"BERTRAM vectors from contexts for {wn['vectors']['contexts']}, from the form only for "
                  f"{wn['vectors']['form']}, none for {wn['vectors']['none']} (those stay plain).", "",
                  wnlampro_table(wn["results"])]
    return "\n".join(lines) + "\n"
