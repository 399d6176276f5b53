"""Training BERTRAM: what an epoch holds, how it reaches the workers, and the loop each worker runs.

An epoch, as in the reference: every target word with `count >= min_count` appears
`max(1, min(count // min_count, 5))` times; each appearance (an *instance*) draws
`smin..smax` of the word's contexts; the loss is the MSE between the inferred vector
and the word's target vector (the paper), or 1 - their cosine (`objective`; the default of
a gated/shallow fused stage). Everything random is a pure function of the seed:

    words of one context bucket, epoch e ─► instances (contexts drawn by (seed, e, word))
        ─► shuffled by (seed, e, bucket) ─► packed into k batches of ~`batch_size` contexts
           (k a multiple of the world size W; batch j belongs to rank j mod W)

Ray Data runs one task per (epoch, bucket) in a seeded bucket order and streams the
packed batches, in order, to every worker; each worker keeps its own batches and
tokenises them in the iterator's threads (`Collate`). So every rank takes the same
number of steps in every epoch, epoch ends line up across ranks, and a resumed run
continues at exactly the batch after its checkpoint, whatever the world size.

`train_loop` is the function each Ray Train worker runs: a plain PyTorch loop plus
`ray.train.get_dataset_shard`, `report` and `get_checkpoint`. It builds the model
(`build_model`) and optimiser (`build_optimizer`), resumes from the latest checkpoint
(pipeline.checkpoint owns their format), and runs `run_steps`: one `train_step` per batch,
with a `Reporter` for the loss curve, the progress lines and the checkpoints.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import torch
import torch.nn.functional as F
from ray.data.collate_fn import NumpyBatchCollateFn

from pipeline import storage
from pipeline.batching import encode, pad_pieces
from pipeline.checkpoint import TemporaryCheckpoints, new_progress, resume, save_checkpoint
from pipeline.model import GATED_MODES, Bertram, NgramVocab, uses_form

STAGES = ("form", "context", "fused")
MAX_REPEATS = 5
FAULT_DRILL_WAIT_S = 5.0
PRINT_EVERY_S = 10.0  # seconds between the loop's progress lines


@dataclass(frozen=True)
class Sampling:
    """How the instances of an epoch are drawn and batched (the same on the driver and in every task)."""

    min_count: int  # words with at least this count are targets; it also scales their repeats
    smin: int  # contexts per instance: at least
    smax: int  # ... and at most
    batch_size: int  # contexts per batch (words per batch when the model reads no contexts)
    uses_contexts: bool
    world_size: int
    seed: int
    features: bool = False  # the contexts are cached encoder features (a jobs.features output), not text


def repeats(count: int, min_count: int) -> int:
    """How often a word appears per epoch: max(1, min(count // min_count, 5))."""
    return max(1, min(count // min_count, MAX_REPEATS))


def _word_key(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")


def epoch_bucket_plan(words: list[str], counts: list[int], n_contexts: list[int], epoch: int, bucket: int,
                      s: Sampling) -> list[list[tuple[int, np.ndarray]]]:
    """The batches of one bucket in one epoch: lists of (word row, indices of its drawn contexts).

    The number of batches is a multiple of the world size; when a bucket has fewer
    instances than that, instances are repeated so that every rank gets a batch.
    """
    instances: list[tuple[int, np.ndarray]] = []
    for row, (word, count, available) in enumerate(zip(words, counts, n_contexts)):
        if s.uses_contexts and available == 0:
            continue
        rng = np.random.default_rng([s.seed, epoch, _word_key(word)])
        for _ in range(repeats(count, s.min_count)):
            if s.uses_contexts:
                n = min(int(rng.integers(s.smin, s.smax + 1)), available)
                instances.append((row, np.sort(rng.choice(available, n, replace=False))))
            else:
                instances.append((row, np.empty(0, dtype=np.int64)))
    if not instances:
        return []
    order = np.random.default_rng([s.seed, epoch, bucket, 1]).permutation(len(instances))
    instances = [instances[i] for i in order]
    units = np.array([max(1, len(idx)) if s.uses_contexts else 1 for _, idx in instances])
    k = max(1, math.ceil(units.sum() / s.batch_size))
    k = math.ceil(k / s.world_size) * s.world_size
    while len(instances) < k:  # too few instances for every rank: repeat some
        instances.append(instances[len(instances) % len(order)])
        units = np.append(units, units[len(units) % len(order)])
    # Cut into k consecutive batches of about equal numbers of contexts, none empty.
    cuts = np.searchsorted(np.cumsum(units), units.sum() * np.arange(1, k) / k, side="left") + 1
    for b in range(k - 1):
        cuts[b] = min(max(cuts[b], (cuts[b - 1] if b else 0) + 1), len(instances) - (k - 1 - b))
    bounds = [0, *cuts.tolist(), len(instances)]
    return [instances[bounds[b]:bounds[b + 1]] for b in range(k)]


def trainable_words(bucket: pa.Table, targets: pa.Table, min_count: int) -> pa.Table:
    """The bucket's rows whose word has a target vector and count >= min_count, with `n_contexts`
    (of its `contexts`, or of its cached `features` in a jobs.features bucket)."""
    import pyarrow.compute as pc

    keep = pc.and_(pc.is_in(bucket["word"], targets["word"]), pc.greater_equal(bucket["count"], min_count))
    bucket = bucket.filter(keep)
    column = "features" if "features" in bucket.column_names else "contexts"
    return bucket.append_column("n_contexts", pc.list_value_length(bucket[column]).fill_null(0))


def _targets(ref) -> tuple[dict[str, int], np.ndarray, list[list[int]] | None]:
    """Row index, (n, D) vectors and (with a `pieces` column: a pieces model's fused stage) piece ids of the
    training targets behind an ObjectRef (or a table), cached per process."""
    if isinstance(ref, pa.Table):
        return _index(ref)
    import ray

    key = ref.hex()
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = _index(ray.get(ref))
    return _CACHE[key]


def _index(targets: pa.Table) -> tuple[dict[str, int], np.ndarray, list[list[int]] | None]:
    vectors = targets["vector"].combine_chunks()
    matrix = vectors.values.to_numpy(zero_copy_only=False).reshape(len(vectors), -1).astype(np.float32)
    pieces = targets["pieces"].to_pylist() if "pieces" in targets.column_names else None
    return dict(zip(targets["word"].to_pylist(), range(targets.num_rows))), matrix, pieces


_CACHE: dict[str, tuple[dict[str, int], np.ndarray, list[list[int]] | None]] = {}


def epoch_bucket_batches(items: dict[str, np.ndarray], targets_ref, sampling: Sampling) -> dict[str, list]:
    """Ray Data step: the packed batches of (epoch, bucket) work items, in order.

    Output rows (one per batch): epoch, position (of the item in its epoch), index (of the
    batch in the item), owner (the rank that trains on it), words, vectors, contexts (texts,
    one list per word; with cached features, `features` (N, H') and `sizes` (contexts per word)
    instead), and `pieces` (the words' piece ids) when the targets carry them.
    """
    from pipeline.features import feature_matrix

    row_of, matrix, pieces = _targets(targets_ref)
    words_table = pa.table({"word": list(row_of)})
    columns = ("epoch", "position", "index", "owner", "words", "vectors") + (
        ("features", "sizes") if sampling.features else ("contexts",)) + (("pieces",) if pieces else ())
    out: dict[str, list] = {k: [] for k in columns}
    for epoch, position, bucket, uri in zip(items["epoch"], items["position"], items["bucket"], items["uri"]):
        table = trainable_words(storage.read_parquet(str(uri)), words_table, sampling.min_count)
        words, counts = table["word"].to_pylist(), table["count"].to_pylist()
        contexts = table["contexts"].to_pylist() if sampling.uses_contexts and not sampling.features else None
        plan = epoch_bucket_plan(words, counts, table["n_contexts"].to_pylist(), int(epoch), int(bucket), sampling)
        if sampling.features:
            cached = {r: feature_matrix(table["features"], r) for r in {r for batch in plan for r, _ in batch}}
        for j, batch in enumerate(plan):
            names = [words[r] for r, _ in batch]
            out["epoch"].append(int(epoch))
            out["position"].append(int(position))
            out["index"].append(j)
            out["owner"].append(j % sampling.world_size)
            out["words"].append(names)
            out["vectors"].append(matrix[[row_of[w] for w in names]])
            if pieces:
                out["pieces"].append([pieces[row_of[w]] for w in names])
            if sampling.features:
                out["features"].append(np.concatenate([cached[r][idx] for r, idx in batch]))  # (N, H')
                out["sizes"].append([len(idx) for _, idx in batch])
                continue
            out["contexts"].append([[contexts[r][i] for i in idx] for r, idx in batch] if contexts
                                   else [[] for _ in names])
    return out


def bucket_words(items: dict[str, np.ndarray], targets_ref, min_count: int) -> dict[str, list]:
    """Ray Data step: the trainable words of each bucket, with count and number of contexts (no text)."""
    row_of = _targets(targets_ref)[0]
    words_table = pa.table({"word": list(row_of)})
    out: dict[str, list] = {"bucket": [], "word": [], "count": [], "n_contexts": []}
    for bucket, uri in zip(items["bucket"], items["uri"]):
        table = trainable_words(storage.read_parquet(str(uri)), words_table, min_count)
        out["bucket"] += [int(bucket)] * table.num_rows
        out["word"] += table["word"].to_pylist()
        out["count"] += table["count"].to_pylist()
        out["n_contexts"] += table["n_contexts"].to_pylist()
    return out


def steps_per_epoch(sizes: pa.Table, epochs: int, sampling: Sampling) -> list[int]:
    """Steps of one rank in each epoch, from `bucket_words` output: the same plan the tasks follow."""
    steps = []
    by_bucket = sizes.group_by("bucket").aggregate([])["bucket"].to_pylist()
    for epoch in range(epochs):
        batches = 0
        for bucket in by_bucket:
            rows = sizes.filter(pa.compute.equal(sizes["bucket"], bucket))
            batches += len(epoch_bucket_plan(rows["word"].to_pylist(), rows["count"].to_pylist(),
                                             rows["n_contexts"].to_pylist(), epoch, bucket, sampling))
        steps.append(batches // sampling.world_size)
    return steps


def bucket_order(num_buckets: int, epoch: int, seed: int) -> list[int]:
    """The seeded order in which an epoch visits the context buckets."""
    return np.random.default_rng([seed, epoch, 2]).permutation(num_buckets).tolist()


# ---------------------------------------------------------------------------------------
# Batches → tensors, on the worker (in the data iterator's threads)


class Collate(NumpyBatchCollateFn):
    """One packed batch (a row) → model tensors, for the rows this rank owns after `resume_after`.

    Rows of other ranks, and rows up to the checkpoint's position (epoch, item, round),
    become `{}` (skipped).
    """

    def __init__(self, tokenizer, mode: str, max_seq_length: int, ngram_vocab: NgramVocab | None, rank: int,
                 world_size: int = 1, resume_after: tuple[int, int, int] | None = None):
        self.tokenizer, self.mode, self.max_seq_length = tokenizer, mode, max_seq_length
        self.ngram_vocab, self.rank, self.world_size, self.resume_after = ngram_vocab, rank, world_size, resume_after

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        (epoch,), (position,), (index,), (owner,) = batch["epoch"], batch["position"], batch["index"], batch["owner"]
        # Where the batch is: (epoch, item, round); the ranks train the batches of one round in the same step.
        where = (int(epoch), int(position), int(index) // self.world_size)
        if int(owner) != self.rank or (self.resume_after is not None and where <= self.resume_after):
            return {}
        words = list(batch["words"][0])
        target = np.stack(list(batch["vectors"][0])).astype(np.float32)  # (B, D)
        if "features" in batch:  # cached encoder features: no tokenising, no encoder
            sizes = torch.as_tensor(np.array(batch["sizes"][0], dtype=np.int64))  # (a copy: Arrow's is read-only)
            tensors = {"features": torch.from_numpy(np.asarray(batch["features"][0], dtype=np.float32)),
                       "context_word": torch.repeat_interleave(torch.arange(len(words)), sizes)}
            if uses_form(self.mode):
                tensors["ngram_ids"] = self.ngram_vocab.encode(words)
            if "pieces" in batch:
                tensors["piece_ids"] = pad_pieces([list(p) for p in batch["pieces"][0]])
            tensors["target"] = torch.from_numpy(target)
            tensors["where"] = torch.tensor(where)
            tensors["num_contexts"] = torch.tensor(len(tensors["features"]))
            return tensors
        contexts = [list(c) for c in batch["contexts"][0]]
        pieces = [list(p) for p in batch["pieces"][0]] if "pieces" in batch else None
        encoded = encode(words, contexts, self.tokenizer, self.mode, self.max_seq_length, self.ngram_vocab, pieces)
        tensors = dict(encoded.tensors)
        if "context_word" in tensors:  # words whose every context lost the word are dropped
            kept = torch.unique(tensors["context_word"])
            if len(kept) < len(words):
                remap = torch.full((len(words),), -1, dtype=torch.long)
                remap[kept] = torch.arange(len(kept))
                tensors["context_word"] = remap[tensors["context_word"]]
                for name in ("ngram_ids", "piece_ids"):
                    if name in tensors:
                        tensors[name] = tensors[name][kept]
                target = target[kept.numpy()]
            if len(kept) == 0:
                return {}
        tensors["target"] = torch.from_numpy(target)
        tensors["where"] = torch.tensor(where)
        tensors["num_contexts"] = torch.tensor(len(tensors.get("input_ids", ())))
        return tensors


# ---------------------------------------------------------------------------------------
# What is trained, and how fast


def trainable_parameters(model: Bertram, stage: str, finetune_encoder: bool = False,
                         optimize_only_combinator: bool = True) -> list[str]:
    """Freeze what the stage keeps fixed; returns the names of the trained parameters.

    form: the n-gram embeddings. context: attentive mimicking and the output layer (and
    the encoder with `finetune_encoder`). fused: with `optimize_only_combinator`, only what
    combines the form and the contexts: the gate (`shallow`, `gated`), or attentive mimicking and
    the output layer, which read the encoder's form-aware outputs (`add`, `replace`).
    """
    mode = model.config.mode
    if stage == "form":
        prefixes = ("form.",)
    elif stage == "context":
        prefixes = ("mimicking.", "context_linear.") + (("encoder.",) if finetune_encoder else ())
    elif not optimize_only_combinator:
        prefixes = ("",)
    else:
        prefixes = ("gate.",) if mode in GATED_MODES else ("mimicking.", "context_linear.")
    names = []
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(prefixes))
        if param.requires_grad:
            names.append(name)
    return names


LOSSES = ("mse", "cosine", "contrastive")
TEMPERATURE = 0.05  # of the contrastive loss: cosines / 0.05


def objective(predicted: torch.Tensor, target: torch.Tensor, kind: str = "mse",
              rows: torch.Tensor | None = None) -> torch.Tensor:
    """The training loss of (B, D) predictions: MSE (the paper), or 1 - cosine, which ignores the
    vectors' scale (under MSE a gate that mixes two noisy vectors is rewarded for shrinking them
    towards the mean rather than for the right direction: BENCHMARKS.md, "Quality"), or `contrastive`."""
    if kind == "contrastive":
        return contrastive(predicted, target, rows)
    if kind == "cosine":
        return (1 - F.cosine_similarity(predicted, target, dim=-1)).mean()
    return F.mse_loss(predicted, target)


def contrastive(predicted: torch.Tensor, target: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """What the evaluation ranks, as a loss: the target must be the nearest of the LM's input embeddings
    `rows` (V, D, unit length) to the prediction by cosine (InfoNCE, temperature `TEMPERATURE`; the row
    that is the target itself is left out of the negatives), plus (log |predicted| - log |target|)^2, so
    that the vector also has the norm of a row. Unlike MSE or 1 - cosine, a vector near the centroid of the
    rows, close to many of them, scores badly: the vectors keep the rows' spread."""
    if rows is None:
        raise ValueError("the contrastive loss needs the LM's input embeddings (rows)")
    unit, goal = F.normalize(predicted, dim=-1), F.normalize(target, dim=-1)  # (B, D)
    negatives = (unit @ rows.T).masked_fill(goal @ rows.T > 0.999, float("-inf"))  # (B, V)
    logits = torch.cat([(unit * goal).sum(-1, keepdim=True), negatives], dim=1) / TEMPERATURE  # (B, 1 + V)
    ranking = F.cross_entropy(logits, torch.zeros(len(unit), dtype=torch.long, device=unit.device))
    norm = (predicted.norm(dim=-1).clamp_min(1e-6).log() - target.norm(dim=-1).clamp_min(1e-6).log()).pow(2)
    return ranking + norm.mean()


def embedding_rows(model: Bertram, base_model: str) -> torch.Tensor:
    """(V, D) the LM's input embeddings at unit length (the contrastive loss's candidates): the encoder's
    when the model has one, else loaded from `base_model`."""
    if hasattr(model, "encoder"):
        rows = model.encoder.get_input_embeddings().weight
    else:
        from transformers import AutoModel

        rows = AutoModel.from_pretrained(base_model).get_input_embeddings().weight
    return F.normalize(rows.detach().float(), dim=-1)


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> None:
    """`clip_grad_norm_` that also takes sparse gradients (the form stage's n-gram table on CPU)."""
    if not any(p.grad is not None and p.grad.is_sparse for p in params):
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    squares = 0.0
    for p in params:
        if p.grad is not None:
            p.grad = p.grad.coalesce() if p.grad.is_sparse else p.grad
            squares += float((p.grad._values() if p.grad.is_sparse else p.grad).pow(2).sum())
    norm = squares ** 0.5
    if norm > max_norm:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(max_norm / (norm + 1e-6))


def linear_warmup_decay(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor: linear warm-up to 1 over `warmup_steps`, then linear decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


# ---------------------------------------------------------------------------------------
# The loop each Ray Train worker runs


@dataclass
class LoopSettings:
    """What the worker loop needs (built by jobs.train from its config)."""

    stage: str
    mode: str  # the model's mode: form, context, or a fused mode
    base_model: str  # path of the language model (context and form modes)
    init: str | None  # a saved BERTRAM model to start from (fused)
    ngram_vocab: str | None  # NgramVocab JSON (form)
    total_steps: int  # steps of one rank over all epochs (known exactly from the plan)
    epochs: int
    lr: float
    warmup_fraction: float
    weight_decay: float
    grad_accumulation: int
    max_grad_norm: float
    finetune_encoder: bool
    optimize_only_combinator: bool
    ngram_dropout: float
    max_seq_length: int
    checkpoint_every: int
    log_every: int
    seed: int
    bf16: bool
    fault_at_step: int | None = None
    checkpoint_interval_s: float = 0.0  # periodic checkpoints (epoch ends, every checkpoint_every steps) at most this often
    context_features: str = "mask"  # how a fresh context model reads a context (model.CONTEXT_FEATURES)
    loss: str = "mse"  # mse (the paper) | cosine (1 - cosine to the target) | contrastive (against the LM's rows)
    tokens_per_pass: int | None = None  # the encoder's contexts in length-sorted groups of this many padded tokens


def build_model(s: LoopSettings) -> tuple[Bertram, object]:
    """The model a stage starts from, and the base tokenizer."""
    from transformers import AutoTokenizer

    if s.init:
        model = Bertram.from_pretrained(s.init)
    else:
        torch.manual_seed(s.seed)
        vocab = NgramVocab.from_json(s.ngram_vocab) if s.ngram_vocab else None
        model = Bertram.create(s.mode, s.base_model, vocab, ngram_dropout=s.ngram_dropout,
                               context_features=s.context_features)
    model.tokens_per_pass = s.tokens_per_pass
    return model, AutoTokenizer.from_pretrained(s.base_model)


def _reseed(s: LoopSettings, rank: int, step: int) -> None:
    """Random numbers (n-gram dropout) as a function of (seed, rank, step): a resumed run draws the same."""
    torch.manual_seed((s.seed * 1_000_003 + rank * 7919 + step) % 2**63)


def build_optimizer(s: LoopSettings, model: Bertram, params: list[torch.nn.Parameter], device: torch.device):
    """The optimiser and learning-rate schedule of a stage: Adam at a fixed rate for the form stage, AdamW
    with linear warm-up and decay for the others."""
    if s.stage == "form" and device.type == "cpu":
        # A batch touches a few hundred of the (often 10^5+) n-gram rows: sparse gradients and
        # lazy Adam update only those, where dense Adam would sweep the whole table every step.
        # (gloo all-reduces sparse gradients; NCCL cannot, so GPUs keep dense Adam.)
        model.form.embedding.sparse = True
        optimizer = torch.optim.SparseAdam(params, lr=s.lr)
    elif s.stage == "form":
        optimizer = torch.optim.Adam(params, lr=s.lr)
    else:
        optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    total_updates = max(1, s.total_steps // s.grad_accumulation)
    warmup = int(s.warmup_fraction * total_updates) if s.stage != "form" else 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda u: linear_warmup_decay(u, warmup, total_updates) if s.stage != "form" else 1.0)
    return optimizer, scheduler


@dataclass
class Worker:
    """One rank's training: its settings and place in the group, what it trains, and where it stands."""

    s: LoopSettings
    rank: int
    world: int
    ddp: torch.nn.Module  # the model as Ray Train prepared it (DistributedDataParallel with several workers)
    core: Bertram  # the model itself: what a checkpoint saves
    params: list[torch.nn.Parameter]  # the trained ones
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    progress: dict  # what a checkpoint's progress.json holds (pipeline.checkpoint)
    autocast: torch.autocast
    rows: torch.Tensor | None  # the LM's input embeddings (the contrastive loss), else None


class Reporter:
    """One worker's reports: the loss curve and throughput since the last report go into the progress, a
    progress line at most every PRINT_EVERY_S, and checkpoints (`report`)."""

    def __init__(self, w: Worker, local_mode: bool):
        self.w = w
        # loss x words, words, contexts since the last report; [3]: s since the last checkpoint
        self.window = torch.zeros(4, dtype=torch.float64)
        self.window_t0 = self.last_line = self.last_checkpoint = time.time()
        self.temporary = TemporaryCheckpoints(keep_newest=local_mode)

    def add(self, loss: float, words: int, contexts: int) -> None:
        """One step's batch: its mean loss, words and contexts."""
        self.window += torch.tensor([loss * words, words, contexts, 0], dtype=torch.float64)

    def report(self, step: int, epoch: int, epoch_end: bool, with_checkpoint: bool | None) -> None:
        """Progress (and the loss curve) since the last report; a checkpoint when `with_checkpoint` is True,
        or when it is None and checkpoint_interval_s have passed since the last one (rank 0's clock: every
        rank takes the same decision)."""
        w = self.w
        self.window[3] = time.time() - self.last_checkpoint if w.rank == 0 else 0.0
        if w.world > 1:
            torch.distributed.all_reduce(self.window)
        loss_sum, words, contexts, since_checkpoint = self.window.tolist()
        if with_checkpoint is not False:
            # At every point where a checkpoint may be taken, whether or not it is: the random numbers are a
            # function of (seed, rank, step) there, so a run resumed from any checkpoint draws the same ones,
            # and when checkpoints happen (a matter of time) never changes the result.
            _reseed(w.s, w.rank, step)
        if with_checkpoint is None:
            with_checkpoint = since_checkpoint >= w.s.checkpoint_interval_s
        metrics = self._account(step, epoch, epoch_end, loss_sum, words, contexts)
        if with_checkpoint:
            self._checkpoint(metrics)
        self.window, self.window_t0 = torch.zeros(4, dtype=torch.float64), time.time()

    def _account(self, step: int, epoch: int, epoch_end: bool, loss_sum: float, words: float,
                 contexts: float) -> dict:
        """The window into the progress; the report's metrics, and (rank 0) its progress line."""
        s, progress = self.w.s, self.w.progress
        progress["train_seconds"] += time.time() - self.window_t0
        progress["examples"] += int(words)
        progress["contexts"] += int(contexts)
        loss = loss_sum / words if words else None
        if words:
            progress["losses"].append([step, loss])
            progress["best_loss"] = loss if progress["best_loss"] is None else min(progress["best_loss"], loss)
        total = s.total_steps
        seconds = max(progress["train_seconds"], 1e-9)
        metrics = {"step": step, "epoch": epoch + 1, "loss": loss, "epoch_end": epoch_end,
                   "examples_per_s": progress["examples"] / seconds, "contexts_per_s": progress["contexts"] / seconds,
                   "eta_s": seconds / max(step, 1) * max(total - step, 0), "lr": self.w.scheduler.get_last_lr()[0]}
        # A progress line at most every PRINT_EVERY_S (and at the end); the loss curve keeps every report.
        if self.w.rank == 0 and words and (time.time() - self.last_line >= PRINT_EVERY_S or step >= total):
            self.last_line = time.time()
            print(f"[train] step {step}/{total} epoch {epoch + 1}/{s.epochs} loss {loss:.5f} "
                  f"{metrics['examples_per_s']:.1f} words/s {metrics['contexts_per_s']:.1f} contexts/s "
                  f"ETA {metrics['eta_s'] / 60:.1f} min", flush=True)
        return metrics

    def _checkpoint(self, metrics: dict) -> None:
        """The parameter checksums of every rank into the progress; rank 0 saves the checkpoint.

        ray.train.report is a barrier with the controller (~1 s here): only at checkpoints. Progress
        lines in between are ours (the loss log travels in the checkpoint)."""
        import ray.train
        from ray.train import Checkpoint

        w = self.w
        self.last_checkpoint = time.time()
        checksum = torch.tensor([sum(float(p.detach().double().sum()) for p in w.params)], dtype=torch.float64)
        sums = [torch.zeros_like(checksum) for _ in range(w.world)] if w.world > 1 else [checksum]
        if w.world > 1:
            torch.distributed.all_gather(sums, checksum)
        w.progress["param_checksums"] = [float(x) for x in sums]  # identical across ranks, or DDP went wrong
        if w.rank == 0:
            with self.temporary.directory() as d:
                save_checkpoint(d, w.core, w.optimizer, w.scheduler, w.progress)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)


def train_step(w: Worker, batch: dict[str, torch.Tensor], target: torch.Tensor, step: int) -> torch.Tensor:
    """Forward and backward on one batch, and an optimiser update every grad_accumulation steps; the loss."""
    s = w.s
    update = (step + 1) % s.grad_accumulation == 0
    with w.autocast:
        predicted = w.ddp(**batch)  # (B, D)
    loss = objective(predicted.float(), target, s.loss, w.rows)
    if w.world > 1 and not update:
        with w.ddp.no_sync():
            (loss / s.grad_accumulation).backward()
    else:
        (loss / s.grad_accumulation).backward()
    if update:
        clip_gradients(w.params, s.max_grad_norm)
        w.optimizer.step()
        w.scheduler.step()
        w.optimizer.zero_grad(set_to_none=True)
    return loss


def _fault_drill(marker: str, rank: int, step: int) -> None:
    """This rank exits, once: the marker keeps the restarted group from failing again."""
    print(f"[train] fault drill: rank {rank} exits at step {step}", flush=True)
    storage.write_text(marker, f"rank {rank} exited at step {step}\n")
    # Ray Train's controller collects reports when it polls its workers (every 2 s): a worker that
    # dies sooner after a checkpoint restarts from the one before. The drill waits, like a real
    # crash minutes later, so that the restart is seen to begin at the last checkpoint.
    time.sleep(FAULT_DRILL_WAIT_S)
    os._exit(1)


def run_steps(w: Worker, batches, reporter: Reporter, fault: int | None, marker: str | None,
              just_resumed: bool) -> None:
    """The step loop over this rank's batches (`Collate`'s output), from the progress's step to the end."""
    s, progress = w.s, w.progress
    step, epoch = progress["step"], progress["epoch"]
    # Every start of the loop (the first, and each resume from a checkpoint): where it began and how many
    # steps it took. A checkpoint stores the list as of its step, so the record says what the result is made of.
    progress.setdefault("attempts", []).append({"start_step": step, "steps": 0})
    _reseed(s, w.rank, step)
    for batch in batches:
        if not batch:
            continue
        where = batch.pop("where").tolist()
        if where[0] != epoch:  # the first batch of a new epoch: the previous one ended
            if not just_resumed:  # (a checkpoint at the end of the epoch exists already)
                reporter.report(step, epoch, epoch_end=True, with_checkpoint=None)
            epoch = progress["epoch"] = where[0]
        just_resumed = False
        if fault is not None and step == fault and w.rank == w.world - 1:
            _fault_drill(marker, w.rank, step)
        target = batch.pop("target")
        n_contexts = int(batch.pop("num_contexts"))
        loss = train_step(w, batch, target, step)
        step += 1
        progress.update(step=step, position=where)
        progress["attempts"][-1]["steps"] += 1
        reporter.add(loss.item(), len(target), n_contexts)
        if step % s.checkpoint_every == 0:
            reporter.report(step, epoch, epoch_end=False, with_checkpoint=None)
        elif step % s.log_every == 0:
            reporter.report(step, epoch, epoch_end=False, with_checkpoint=False)
    reporter.report(step, epoch, epoch_end=True, with_checkpoint=True)


def train_loop(config: dict) -> None:
    """The per-worker training loop (Ray Train). `config["settings"]` is a LoopSettings as a dict."""
    import ray.train
    from ray.train.torch import get_device, prepare_model

    s = LoopSettings(**config["settings"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = get_device()
    if device.type == "cpu":  # one intra-op thread per CPU the worker holds (Ray sets 1 by default)
        torch.set_num_threads(max(1, int(config.get("cpus_per_worker") or 1)))
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    model, tokenizer = build_model(s)
    trained = trainable_parameters(model, s.stage, s.finetune_encoder, s.optimize_only_combinator)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(s, model, params, device)
    resumed = resume(ray.train.get_checkpoint(), model, optimizer, scheduler)
    progress = resumed if resumed is not None else new_progress(world, trained)
    if resumed is not None and rank == 0:
        print(f"[train] resuming at step {progress['step']} (epoch {progress['epoch'] + 1})", flush=True)
    ddp = prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
    core: Bertram = ddp.module if hasattr(ddp, "module") else ddp
    core.train()
    if s.stage != "form" and not s.finetune_encoder:
        core.encoder.eval()  # frozen: no dropout in the encoder either

    resume_after = tuple(progress["position"]) if progress["position"] else None
    rows = embedding_rows(core, s.base_model).to(device) if s.loss == "contrastive" else None
    collate = Collate(tokenizer, s.mode, s.max_seq_length, core.ngram_vocab, rank, world, resume_after)
    shard = ray.train.get_dataset_shard("train")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.bf16 and device.type == "cuda")
    w = Worker(s, rank, world, ddp, core, params, optimizer, scheduler, progress, autocast, rows)
    # Fault drill: the last rank exits once; the marker keeps the restarted group from failing again.
    marker = config.get("fault_marker")
    fault = s.fault_at_step if s.fault_at_step is not None and marker and not storage.exists(marker) else None
    reporter = Reporter(w, local_mode=bool(config.get("local_mode")))
    batches = shard.iter_torch_batches(batch_size=1, collate_fn=collate, prefetch_batches=4)
    run_steps(w, batches, reporter, fault, marker, just_resumed=resumed is not None)


def loss_plot(losses: list[list[float]], stage: str, objective: str = "mse") -> bytes:
    """loss.png of a training stage: the loss at each logged step."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if losses:
        ax.plot([s for s, _ in losses], [v for _, v in losses])
    ax.set_xlabel("step")
    ax.set_ylabel("MSE loss" if objective == "mse" else "1 - cosine")
    ax.set_title(f"BERTRAM {stage} stage")
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
