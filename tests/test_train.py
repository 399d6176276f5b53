"""Training: the epoch plan, batching, the parameters each stage trains, and the Ray Train stage
(local mode, 2-worker DDP on gloo, checkpoints on s3, resume, a worker fault, bad configs)."""

from __future__ import annotations

import glob
import os
import random
import tempfile
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline import manifest, storage
from pipeline.config import ConfigError
from pipeline.contexts import bucket_of
from pipeline.model import Bertram, NgramVocab
from pipeline.train import (Collate, Sampling, epoch_bucket_plan, linear_warmup_decay, repeats,
                            trainable_parameters)

WORDS = ["fruit", "tree", "river", "stone", "apple", "orange", "small", "sweet", "green", "light", "grows"]
FILLER = ["the", "a", "is", "of", "and", "on", "in"]


def _sampling(**kw) -> Sampling:
    base = dict(min_count=100, smin=4, smax=32, batch_size=64, uses_contexts=True, world_size=1, seed=7)
    return Sampling(**{**base, **kw})


# --- the epoch plan -----------------------------------------------------------------------


def test_repeats_follow_the_reference_formula():
    assert [repeats(c, 100) for c in (100, 199, 200, 499, 500, 10_000, 50)] == [1, 1, 2, 4, 5, 5, 1]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_plan_covers_every_instance_once_in_balanced_batches_for_every_rank(world):
    words = [f"w{i}" for i in range(40)]
    counts = [100 + 37 * i for i in range(40)]
    available = [0 if i == 3 else 5 + (i * 7) % 60 for i in range(40)]
    s = _sampling(world_size=world)
    plan = epoch_bucket_plan(words, counts, available, epoch=0, bucket=0, s=s)
    assert len(plan) % world == 0 and all(plan)
    seen = Counter(row for batch in plan for row, _ in batch)
    expected = {i: repeats(c, 100) for i, c in enumerate(counts) if available[i] > 0}
    assert dict(seen) == expected  # word 3 has no contexts: never an instance
    for batch in plan:
        for row, idx in batch:
            assert min(4, available[row]) <= len(idx) <= min(32, available[row])
            assert len(set(idx.tolist())) == len(idx) and idx.max() < available[row]
    units = [sum(len(idx) for _, idx in batch) for batch in plan]
    assert max(units) <= 64 + 32  # about batch_size contexts; never more than one instance over


def test_plan_is_a_function_of_seed_and_epoch():
    args = (["a", "b", "c", "d"] * 1, [300, 200, 100, 500], [50, 50, 50, 50])
    flat = lambda plan: [(r, tuple(i)) for b in plan for r, i in b]  # noqa: E731
    one = flat(epoch_bucket_plan(*args, epoch=0, bucket=1, s=_sampling()))
    assert one == flat(epoch_bucket_plan(*args, epoch=0, bucket=1, s=_sampling()))
    assert one != flat(epoch_bucket_plan(*args, epoch=1, bucket=1, s=_sampling()))
    assert one != flat(epoch_bucket_plan(*args, epoch=0, bucket=1, s=_sampling(seed=8)))


def test_a_bucket_with_fewer_instances_than_ranks_still_feeds_every_rank():
    plan = epoch_bucket_plan(["a"], [100], [10], epoch=0, bucket=0, s=_sampling(world_size=4))
    assert len(plan) == 4 and all(len(b) == 1 for b in plan)


def test_form_stage_batches_count_words():
    plan = epoch_bucket_plan([f"w{i}" for i in range(100)], [100] * 100, [0] * 100, epoch=0, bucket=0,
                             s=_sampling(uses_contexts=False, batch_size=16))
    assert len(plan) == 7 and sum(len(b) for b in plan) == 100


def test_learning_rate_warms_up_then_decays_to_zero():
    factors = [linear_warmup_decay(u, 10, 100) for u in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[55] == pytest.approx(0.5) and factors[100] == 0.0


# --- batches on the worker ----------------------------------------------------------------


def _row(epoch, position, index, owner, words, contexts, dim=32):
    return {"epoch": np.array([epoch]), "position": np.array([position]), "index": np.array([index]),
            "owner": np.array([owner]), "words": np.array([np.array(words, dtype=object)], dtype=object),
            "vectors": np.array([np.ones((len(words), dim), dtype=np.float32)], dtype=object),
            "contexts": np.array([[np.array(c, dtype=object) for c in contexts]], dtype=object)}


def test_collate_keeps_only_own_rows_after_the_resume_position(tiny_bert):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    row = _row(0, 2, 5, 1, ["fruit", "tree"], [["the fruit is sweet"], ["a tree grows"]])  # round 5 // 2 = 2
    assert Collate(tok, "context", 32, None, rank=0, world_size=2)(row) == {}
    out = Collate(tok, "context", 32, None, rank=1, world_size=2)(row)
    assert out["target"].shape == (2, 32) and out["where"].tolist() == [0, 2, 2] and int(out["num_contexts"]) == 2
    # Rank 0 checkpointed after batch 4 (round 2): rank 1's batch 5 of that round was trained in the same step.
    assert Collate(tok, "context", 32, None, rank=1, world_size=2, resume_after=(0, 2, 2))(row) == {}
    assert Collate(tok, "context", 32, None, rank=1, world_size=2, resume_after=(0, 2, 1))(row) != {}


def test_collate_drops_words_whose_contexts_all_lost_the_word(tiny_bert):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    row = _row(0, 0, 0, 0, ["fruit", "tree", "stone"], [["no such word"], ["a tree grows"], ["stone is green"]])
    out = Collate(tok, "add", 32, NgramVocab.build(WORDS * 4), rank=0)(row)
    assert out["target"].shape[0] == 2 and out["ngram_ids"].shape[0] == 2
    assert sorted(set(out["context_word"].tolist())) == [0, 1]


# --- what each stage trains ---------------------------------------------------------------


@pytest.mark.parametrize("stage,mode,expected", [
    ("form", "form", {"form"}),
    ("context", "context", {"mimicking", "context_linear"}),
    ("fused", "add", {"mimicking", "context_linear"}),
    ("fused", "shallow", {"gate"}),
])
def test_each_stage_trains_only_its_parameters(tiny_bert, stage, mode, expected):
    model = Bertram.create(mode, str(tiny_bert), NgramVocab.build(WORDS * 4) if mode != "context" else None)
    names = trainable_parameters(model, stage)
    assert {n.split(".")[0] for n in names} == expected
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all(not n.startswith(tuple(expected)) for n in frozen) and (frozen or stage == "form")


# --- the Ray Train stage ------------------------------------------------------------------


def _write_inputs(root: str, base_model: str, n_contexts: int = 24) -> tuple[str, str]:
    """A small preprocessed output and targets (the LM's own embeddings) for `base_model`."""
    from transformers import AutoModel

    rng = random.Random(0)
    pre, tgt = storage.join(root, "pre"), storage.join(root, "targets")
    counts = {w: 100 + 150 * i for i, w in enumerate(WORDS)}
    counts["rare"] = 3
    storage.write_parquet(storage.join(pre, "vocab.parquet"),
                          pa.table({"word": list(counts), "count": list(counts.values())}))
    rows = []
    for w in WORDS:
        ctxs = set()
        while len(ctxs) < n_contexts:
            words = [rng.choice(FILLER + WORDS) for _ in range(rng.randint(3, 8))]
            words.insert(rng.randint(0, len(words)), w)
            ctxs.add(" ".join(words))
        rows.append((w, counts[w], sorted(ctxs)))
    buckets = bucket_of([w for w, _, _ in rows], 2)
    for b in range(2):
        part = [r for r, k in zip(rows, buckets) if k == b]
        storage.write_parquet(storage.join(pre, "contexts", f"bucket-{b:05d}.parquet"),
                              pa.table({"word": [r[0] for r in part], "count": [r[1] for r in part],
                                        "contexts": [r[2] for r in part]}))
    manifest.write(pre, "preprocess", {"min_count_target": 100}, time.time(), target_words=len(WORDS))
    lm = AutoModel.from_pretrained(base_model)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model)
    emb = lm.get_input_embeddings().weight.detach().numpy()
    vectors = [emb[tok.convert_tokens_to_ids(w)].tolist() for w in WORDS]
    storage.write_parquet(storage.join(tgt, "targets.parquet"),
                          pa.table({"word": WORDS, "vector": pa.array(vectors, pa.list_(pa.float32())),
                                    "source": ["embedding"] * len(WORDS), "ota_loss": [None] * len(WORDS)}))
    manifest.write(tgt, "targets", {}, time.time(), min_count=100, words=len(WORDS))
    return pre, tgt


@pytest.fixture
def inputs(tmp_path, tiny_bert):
    return _write_inputs(str(tmp_path), str(tiny_bert))


def _config(stage, pre, tgt, model, output, **kw):
    from jobs.train import TrainConfig

    base = dict(stage=stage, preprocessed=pre, targets=tgt, model=str(model), output=output, num_workers=1,
                log_every=1, checkpoint_every=1000, max_seq_length=32, lr=5e-3, batch_size=32, max_failures=0,
                checkpoint_interval_s=0)  # these tests are about checkpoints: every epoch end takes one
    return TrainConfig(**{**base, **kw})


def test_form_context_fuse_fused_each_run_and_lower_the_loss(ray_local, inputs, tiny_bert, tmp_path, monkeypatch):
    from jobs.fuse import FuseConfig, fuse
    from jobs.train import train

    pre, tgt = inputs
    out = {}
    for stage, kw in (("form", dict(epochs=8, lr=0.05, batch_size=4)), ("context", dict(epochs=3))):
        out[stage] = str(tmp_path / stage)
        m = train(_config(stage, pre, tgt, tiny_bert, out[stage], num_workers=0, **kw))
        losses = [loss for _, loss in m["losses"]]
        assert m["steps"] == sum(m["steps_per_epoch"]) and m["world_size"] == 1
        assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), (stage, losses)
        assert storage.exists(storage.join(out[stage], "loss.png"))
    fuse(FuseConfig(form=out["form"], context=out["context"], mode="add", output=str(tmp_path / "fused-init")))
    # Relative paths, on a real worker (whose working directory is not ours).
    monkeypatch.chdir(tmp_path)
    m = train(_config("fused", pre, tgt, tiny_bert, "fused", init="fused-init", num_workers=1, epochs=2))
    assert m["mode"] == "add" and m["steps"] > 0
    assert {n.split(".")[0] for n in m["trained_parameters"]} == {"mimicking", "context_linear"}
    model = Bertram.from_pretrained(str(tmp_path / "fused"))
    assert model.config.mode == "add"


@pytest.mark.slow
def test_two_workers_ddp_on_gloo_split_the_data_and_stay_identical(ray_local, inputs, tiny_bert, tmp_path):
    from jobs.train import train

    pre, tgt = inputs
    one = train(_config("context", pre, tgt, tiny_bert, str(tmp_path / "one"), epochs=2, num_workers=1))
    two = train(_config("context", pre, tgt, tiny_bert, str(tmp_path / "two"), epochs=2, num_workers=2,
                        cpus_per_worker=1))
    assert two["world_size"] == 2
    # Each rank trains on its own half: the ranks together see every instance exactly once.
    assert two["steps"] * 2 == pytest.approx(one["steps"], abs=4)
    assert sum(two["steps_per_epoch"]) == two["steps"]
    progress = two["param_checksums"]
    assert len(progress) == 2 and progress[0] == progress[1]  # DDP kept the ranks' parameters identical
    assert storage.exists(storage.join(str(tmp_path / "two"), "checkpoints", "bertram-context"))
    # The form stage's sparse n-gram gradients are all-reduced too (gloo).
    form = train(_config("form", pre, tgt, tiny_bert, str(tmp_path / "form"), epochs=2, batch_size=4, num_workers=2,
                         cpus_per_worker=1))
    assert form["world_size"] == 2 and len(set(form["param_checksums"])) == 1


@pytest.mark.slow
def test_a_killed_run_resumes_where_it_stopped_with_the_same_losses(ray_local, inputs, tiny_bert, tmp_path):
    from jobs.train import train

    pre, tgt = inputs
    kw = dict(epochs=3, checkpoint_every=5, log_every=5)
    full = train(_config("context", pre, tgt, tiny_bert, str(tmp_path / "full"), **kw))
    assert full["attempts"] == [{"start_step": 0, "steps": full["steps"]}]
    out = str(tmp_path / "killed")
    with pytest.raises(Exception) as stopped:  # the worker dies at step 12; no retries allowed
        train(_config("context", pre, tgt, tiny_bert, out, fault_at_step=12, **kw))
    assert type(stopped.value).__name__ in ("WorkerGroupError", "TrainingFailedError"), repr(stopped.value)
    assert storage.read_text(f"{out}/checkpoints/bertram-context/fault-drill-done") == "rank 0 exited at step 12\n"
    assert not manifest.is_complete(out)
    resumed = train(_config("context", pre, tgt, tiny_bert, out, fault_at_step=12, **kw))
    assert resumed["steps"] == full["steps"]
    # It began at the checkpoint of step 10 and took exactly the remaining steps.
    assert resumed["attempts"] == [{"start_step": 0, "steps": 10}, {"start_step": 10, "steps": full["steps"] - 10}]
    # Loss per 5-step window after the checkpoint at step 10 (the epoch-end windows are shorter).
    after = {s: v for s, v in resumed["losses"] if s > 10}
    expected = {s: v for s, v in full["losses"] if s > 10}
    assert after.keys() == expected.keys()
    assert all(abs(after[s] - expected[s]) < 1e-5 for s in after), (after, expected)


@pytest.mark.slow
def test_a_worker_fault_restarts_from_the_last_checkpoint_and_finishes(ray_local, inputs, tiny_bert, tmp_path):
    from jobs.train import train

    pre, tgt = inputs
    out = str(tmp_path / "fault")
    m = train(_config("context", pre, tgt, tiny_bert, out, epochs=2, num_workers=2,
                      cpus_per_worker=1, checkpoint_every=4, log_every=4, fault_at_step=6, max_failures=1))
    assert m["steps"] == sum(m["steps_per_epoch"]) and manifest.is_complete(out)
    # The fault fired (rank 1 exited at step 6), and the restart began at the checkpoint of step 4.
    assert storage.read_text(f"{out}/checkpoints/bertram-context/fault-drill-done") == "rank 1 exited at step 6\n"
    assert m["attempts"] == [{"start_step": 0, "steps": 4}, {"start_step": 4, "steps": m["steps"] - 4}]


@pytest.mark.slow
def test_checkpoints_and_model_on_s3(ray_local, s3_bucket, tiny_bert, tmp_path):
    from jobs.train import train

    pre, tgt = _write_inputs(s3_bucket + "/in", str(tiny_bert))
    output = s3_bucket + "/form"
    m = train(_config("form", pre, tgt, tiny_bert, output, epochs=2, batch_size=4, checkpoint_every=3,
                      fault_at_step=4, max_failures=1))
    assert any("checkpoint_" in f.uri for f in storage.list_files(storage.join(output, "checkpoints")))
    # The worker died at step 4 and the run went on from the checkpoint of step 3, read back from S3.
    assert storage.read_text(f"{output}/checkpoints/bertram-form/fault-drill-done") == "rank 0 exited at step 4\n"
    assert m["attempts"] == [{"start_step": 0, "steps": 3}, {"start_step": 3, "steps": m["steps"] - 3}]
    model = Bertram.from_pretrained(output)
    assert model.config.mode == "form" and model.ngram_vocab is not None


def test_bad_configs_fail_before_any_worker_starts(inputs, tiny_bert, tmp_path):
    from jobs.fuse import FuseConfig  # noqa: F401
    from jobs.train import train

    pre, tgt = inputs
    with pytest.raises(ConfigError, match="--smin .* larger than --smax"):
        _config("context", pre, tgt, tiny_bert, str(tmp_path / "x"), smin=8, smax=4)
    with pytest.raises(ConfigError, match="none has count >= 100000"):
        train(_config("context", pre, tgt, tiny_bert, str(tmp_path / "x"), min_count=100_000))
    with pytest.raises(ConfigError, match="--targets .* no complete jobs.targets output"):
        train(_config("context", pre, str(tmp_path / "missing"), tiny_bert, str(tmp_path / "x")))
    form_dir = str(tmp_path / "form-model")
    Bertram.create("form", str(tiny_bert), NgramVocab.build(WORDS * 4)).save_pretrained(form_dir)
    with pytest.raises(ConfigError, match="is a 'form' model; the fused stage needs a fused one"):
        train(_config("fused", pre, tgt, tiny_bert, str(tmp_path / "x"), init=form_dir))
    with pytest.raises(ConfigError, match="needs --init"):
        _config("fused", pre, tgt, tiny_bert, str(tmp_path / "x"))


def test_gradient_clipping_handles_sparse_and_dense_gradients_alike():
    from pipeline.train import clip_gradients

    dense, sparse = torch.nn.Embedding(10, 4), torch.nn.Embedding(10, 4, sparse=True)
    sparse.weight.data.copy_(dense.weight.data)
    for emb in (dense, sparse):
        (emb(torch.tensor([1, 2, 2])).sum() * 10).backward()
        clip_gradients(list(emb.parameters()), 1.0)
    assert torch.allclose(sparse.weight.grad.to_dense(), dense.weight.grad, atol=1e-6)
    assert dense.weight.grad.norm() == pytest.approx(1.0, rel=1e-4)


@pytest.mark.slow
def test_checkpoint_interval_sets_how_often_not_what_is_learned(ray_local, inputs, tiny_bert, tmp_path):
    """Periodic checkpoints wait for checkpoint_interval_s; the result (n-gram dropout draws included) is the
    same whether a candidate point took a checkpoint or not."""
    from jobs.train import train

    pre, tgt = inputs
    kw = dict(epochs=3, batch_size=4, checkpoint_every=3, keep_checkpoints=100, log_every=1)
    runs = {}
    for interval in (0, 3600):
        out = tmp_path / f"every-{interval}"
        runs[interval] = train(_config("form", pre, tgt, tiny_bert, str(out), checkpoint_interval_s=interval, **kw))
        runs[interval]["checkpoints"] = len([d for d in (out / "checkpoints" / "bertram-form").glob("checkpoint_*")
                                             if d.is_dir()])
    assert runs[0]["checkpoints"] >= 3 and runs[3600]["checkpoints"] == 1  # only the final one
    assert runs[0]["steps"] == runs[3600]["steps"]
    assert [s for s, _ in runs[0]["losses"]] == [s for s, _ in runs[3600]["losses"]]
    assert all(abs(a - b) < 1e-6 for (_, a), (_, b) in zip(runs[0]["losses"], runs[3600]["losses"]))


def test_min_count_trains_only_the_words_seen_that_often(ray_local, inputs, tiny_bert, tmp_path):
    from jobs.train import train

    pre, tgt = inputs
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "bertram-checkpoint-*")))
    # WORDS[i] occurs 100 + 150 i times: min_count 400 keeps WORDS[2:] and drops the two below it.
    m = train(_config("form", pre, tgt, tiny_bert, str(tmp_path / "f"), epochs=3, batch_size=4, num_workers=0,
                      vocab_words=False, min_count=400))
    assert m["words"] == len(WORDS) - 2
    # Local mode (no workers) checkpoints into temporary directories: none is left behind.
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "bertram-checkpoint-*"))) == before


@pytest.fixture(scope="module")
def tiny_electra(tmp_path_factory, tiny_bert):
    """A tiny random ELECTRA whose embeddings (16) are smaller than its hidden states (32), with the
    tiny BERT's WordPiece tokenizer: the shape ALBERT and ELECTRA share."""
    from transformers import AutoTokenizer, ElectraConfig, ElectraModel

    out = tmp_path_factory.mktemp("tiny-electra")
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    ElectraModel(ElectraConfig(vocab_size=len(tokenizer), embedding_size=16, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=37, max_position_embeddings=128)
                 ).save_pretrained(out)
    return out


@pytest.mark.parametrize("stage", ["form", "context"])
def test_factorised_embeddings_train_in_the_embedding_size(ray_local, tiny_electra, tmp_path, stage):
    from jobs.train import train

    pre, tgt = _write_inputs(str(tmp_path / "in"), str(tiny_electra))
    m = train(_config(stage, pre, tgt, tiny_electra, str(tmp_path / stage), epochs=1, batch_size=4, num_workers=0,
                      vocab_words=False))
    model = Bertram.from_pretrained(str(tmp_path / stage))
    assert m["steps"] > 0 and model.config.output_size == 16  # the embedding size, not the hidden size (32)


def test_contrastive_loss_ranks_the_target_first_among_the_rows():
    import torch
    import torch.nn.functional as F

    from pipeline.train import objective

    torch.manual_seed(0)
    rows = torch.randn(300, 16)
    unit = F.normalize(rows, dim=-1)
    target = rows[:4]
    right = objective(target.clone(), target, "contrastive", unit)
    wrong = objective(rows[4:8].clone(), target, "contrastive", unit)
    centroid = objective(unit.mean(0).expand(4, -1) * rows.norm(dim=-1).mean(), target, "contrastive", unit)
    assert right < 0.05 and wrong > right + 5 and centroid > right + 1  # the row itself is not a negative
    shrunk = objective(0.4 * target, target, "contrastive", unit)  # the right direction at 40% of the norm
    assert abs(float(shrunk - right) - float(torch.log(torch.tensor(0.4)) ** 2)) < 1e-4
    with pytest.raises(ValueError, match="rows"):
        objective(target, target, "contrastive")
