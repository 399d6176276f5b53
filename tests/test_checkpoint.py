"""Training checkpoints (pipeline.checkpoint): save and load round-trip the model, optimiser, scheduler and
progress exactly; a missing or partial checkpoint; the read-back of a run's last one; temporary directories."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import (PROGRESS_NAME, STATE_NAME, TEMP_PREFIX, TemporaryCheckpoints, load_checkpoint,
                                 new_progress, read_final, resume, save_checkpoint)
from pipeline.model import Bertram, NgramVocab
from pipeline.train import linear_warmup_decay

WORDS = ["fruit", "tree", "river", "stone", "apple", "orange", "kumquat"]


def _training(base_model, seed: int, steps: int):
    """A form model, AdamW and a warm-up schedule after `steps` updates on seeded random gradients."""
    torch.manual_seed(seed)
    model = Bertram.create("form", str(base_model), NgramVocab.build(WORDS * 4, min_count=4), ngram_dropout=0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: linear_warmup_decay(u, 3, 10))
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
        scheduler.step()
    return model, optimizer, scheduler


def _progress() -> dict:
    progress = new_progress(2, ["form.embedding.weight"])
    progress.update(step=7, epoch=1, position=[1, 0, 3], losses=[[5, 0.25], [7, 0.125]], best_loss=0.125,
                    examples=56, contexts=0, train_seconds=1.5, attempts=[{"start_step": 0, "steps": 7}],
                    param_checksums=[3.25, 3.25])
    return progress


def _same(a, b) -> bool:
    """Nested state dicts equal, tensors element for element."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_save_then_load_restores_model_optimizer_scheduler_and_progress_exactly(tiny_bert, tmp_path):
    model, optimizer, scheduler = _training(tiny_bert, seed=0, steps=3)
    save_checkpoint(str(tmp_path), model, optimizer, scheduler, _progress())
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors", "ngram_vocab.json", PROGRESS_NAME,
                                            STATE_NAME]
    assert _same(Bertram.from_pretrained(str(tmp_path)).state_dict(), model.state_dict())  # a checkpoint is a model

    other, other_optimizer, other_scheduler = _training(tiny_bert, seed=1, steps=1)  # another state entirely
    progress = load_checkpoint(str(tmp_path), other, other_optimizer, other_scheduler)
    assert progress == _progress()
    assert _same(other.state_dict(), model.state_dict())
    assert _same(other_optimizer.state_dict(), optimizer.state_dict())
    assert _same(other_scheduler.state_dict(), scheduler.state_dict())
    # ... so that training goes on exactly as it would have.
    for opt, sched, m in ((optimizer, scheduler, model), (other_optimizer, other_scheduler, other)):
        torch.manual_seed(5)
        for p in m.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        sched.step()
    assert _same(other.state_dict(), model.state_dict())
    assert other_scheduler.get_last_lr() == scheduler.get_last_lr()


def test_resume_loads_a_ray_checkpoint_and_returns_none_without_one(tiny_bert, tmp_path):
    from ray.train import Checkpoint

    model, optimizer, scheduler = _training(tiny_bert, seed=0, steps=2)
    save_checkpoint(str(tmp_path), model, optimizer, scheduler, _progress())
    fresh, fresh_optimizer, fresh_scheduler = _training(tiny_bert, seed=1, steps=0)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    # No checkpoint (a fresh start): nothing is loaded.
    assert resume(None, fresh, fresh_optimizer, fresh_scheduler) is None
    assert _same(fresh.state_dict(), before) and fresh_optimizer.state_dict()["state"] == {}
    assert fresh_scheduler.last_epoch == 0
    assert resume(Checkpoint.from_directory(str(tmp_path)), fresh, fresh_optimizer, fresh_scheduler) == _progress()
    assert _same(fresh.state_dict(), model.state_dict())
    assert _same(fresh_optimizer.state_dict(), optimizer.state_dict())
    assert fresh_scheduler.last_epoch == 2


def test_new_progress_starts_at_step_zero():
    assert new_progress(3, ["a", "b"]) == {
        "step": 0, "epoch": 0, "position": None, "losses": [], "best_loss": None, "examples": 0, "contexts": 0,
        "train_seconds": 0.0, "world_size": 3, "trained_parameters": ["a", "b"]}


@pytest.mark.parametrize("missing", ["model.safetensors", STATE_NAME, PROGRESS_NAME])
def test_a_partial_checkpoint_fails_on_the_missing_file(tiny_bert, tmp_path, missing):
    model, optimizer, scheduler = _training(tiny_bert, seed=0, steps=2)
    save_checkpoint(str(tmp_path), model, optimizer, scheduler, _progress())
    os.remove(tmp_path / missing)
    with pytest.raises(FileNotFoundError, match=missing):
        load_checkpoint(str(tmp_path), *_training(tiny_bert, seed=1, steps=0))
    with pytest.raises(FileNotFoundError):
        load_checkpoint(str(tmp_path / "none"), *_training(tiny_bert, seed=1, steps=0))


@pytest.mark.parametrize("local_mode", [False, True])
def test_read_final_returns_model_and_progress_and_removes_a_local_checkpoint(tiny_bert, tmp_path, local_mode):
    from ray.train import Checkpoint

    model, optimizer, scheduler = _training(tiny_bert, seed=0, steps=2)
    directory = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))  # as TemporaryCheckpoints makes them: the only kind removed
    save_checkpoint(str(directory), model, optimizer, scheduler, _progress())
    read, progress = read_final(Checkpoint.from_directory(str(directory)), local_mode=local_mode)
    assert progress == _progress()
    assert _same(read.state_dict(), model.state_dict())
    assert directory.exists() != local_mode  # local mode: a temporary directory of the job, removed once read
    shutil.rmtree(directory, ignore_errors=True)


def test_read_final_never_removes_a_directory_it_did_not_make(tiny_bert, tmp_path):
    from ray.train import Checkpoint

    model, optimizer, scheduler = _training(tiny_bert, seed=0, steps=1)
    directory = tmp_path / "checkpoint"  # e.g. a checkpoint in the run's storage: not a temporary one
    directory.mkdir()
    save_checkpoint(str(directory), model, optimizer, scheduler, _progress())
    read_final(Checkpoint.from_directory(str(directory)), local_mode=True)
    assert (directory / PROGRESS_NAME).exists()


def test_temporary_directories_are_removed_or_only_the_newest_kept(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with TemporaryCheckpoints(keep_newest=False).directory() as d:
        assert os.path.basename(d).startswith(TEMP_PREFIX) and os.path.isdir(d)
    assert not os.path.exists(d)
    with pytest.raises(RuntimeError):  # removed when the checkpoint fails too
        with TemporaryCheckpoints(keep_newest=False).directory() as d:
            raise RuntimeError("report failed")
    assert not os.path.exists(d)

    local = TemporaryCheckpoints(keep_newest=True)  # local mode: Ray Train keeps the directory as the checkpoint
    made = []
    for _ in range(3):
        with local.directory() as d:
            made.append(d)
    assert [os.path.exists(d) for d in made] == [False, False, True]
    assert os.listdir(tmp_path) == [os.path.basename(made[-1])]
