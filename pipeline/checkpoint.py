"""Training checkpoints: the files one holds, and how they are written, resumed from and read back.

A checkpoint is one directory:

    config.json, model.safetensors, ngram_vocab.json    the model, as `Bertram.save_pretrained` writes it
                                                        (so `Bertram.from_pretrained` reads a checkpoint)
    training_state.pt   {"optimizer": ..., "scheduler": ...}: their state_dicts (`torch.save`; loaded
                        `weights_only`)
    progress.json       where training stands and what it has done (`new_progress`): step, epoch,
                        position (epoch, item, round) of the last batch trained, losses ([step, loss] per
                        report), best_loss, examples, contexts, train_seconds, world_size,
                        trained_parameters, attempts (start_step and steps of every start of the loop) and,
                        once a checkpoint has been taken, param_checksums (one per rank)

Rank 0 writes it (`save_checkpoint`) into a fresh temporary directory (`TemporaryCheckpoints`) and hands
it to Ray Train, which copies it to `<checkpoints>/<run_name>/checkpoint_*`; the directory is then
removed. In local mode (no workers) Ray Train keeps that directory itself as the checkpoint: only the
newest is kept, and the job removes it once it has read the model back (`read_final`). A restarted or
resumed run loads the latest one into a freshly built model, optimiser and scheduler (`resume`,
`load_checkpoint`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager

import torch

from pipeline import storage
from pipeline.model import WEIGHTS_NAME, Bertram

PROGRESS_NAME, STATE_NAME = "progress.json", "training_state.pt"
TEMP_PREFIX = "bertram-checkpoint-"  # of the temporary directories checkpoints are written into


# What Ray Train writes into a run's directory (`<--checkpoints>/<--run_name>/`), and the fault drill's marker:
# a directory holding anything else is not a checkpoint directory of ours, and is never deleted.
RUN_DIR_NAMES = ("checkpoint_*", "checkpoint_manager_snapshot.json", ".validate_storage_marker", "fault-drill-done")


def has_checkpoint(run_dir: str) -> bool:
    """Whether a run's directory holds a checkpoint to resume from (not only Ray Train's markers)."""
    return storage.exists(run_dir) and any("/checkpoint_" in f.uri for f in storage.list_files(run_dir))


def new_progress(world_size: int, trained_parameters: list[str]) -> dict:
    """The progress of a run that has not taken a step yet."""
    return {"step": 0, "epoch": 0, "position": None, "losses": [], "best_loss": None, "examples": 0,
            "contexts": 0, "train_seconds": 0.0, "world_size": world_size, "trained_parameters": trained_parameters}


def save_checkpoint(directory: str, model: Bertram, optimizer, scheduler, progress: dict) -> None:
    """A checkpoint is a saved model (`Bertram.from_pretrained` reads it) plus the training state."""
    model.save_pretrained(directory)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               os.path.join(directory, STATE_NAME))
    with open(os.path.join(directory, PROGRESS_NAME), "w") as f:
        json.dump(progress, f)


def load_checkpoint(directory: str, model: Bertram, optimizer, scheduler) -> dict:
    """What `save_checkpoint` wrote, loaded into `model`, `optimizer` and `scheduler`; returns the progress.

    A file that is missing raises FileNotFoundError (what was loaded before it stays loaded)."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(os.path.join(directory, WEIGHTS_NAME)))
    state = torch.load(os.path.join(directory, STATE_NAME), weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return read_progress(directory)


def read_progress(directory: str) -> dict:
    """The progress.json of a checkpoint directory."""
    with open(os.path.join(directory, PROGRESS_NAME)) as f:
        return json.load(f)


def resume(checkpoint, model: Bertram, optimizer, scheduler) -> dict | None:
    """Load a Ray Train `Checkpoint` (`ray.train.get_checkpoint()`) into model, optimizer and scheduler and
    return its progress; None, and nothing loaded, when there is none (a fresh start)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return load_checkpoint(d, model, optimizer, scheduler)


def read_final(checkpoint, local_mode: bool) -> tuple[Bertram, dict]:
    """The model and progress of a run's last checkpoint (a Ray Train `Checkpoint`). In local mode the
    checkpoint is a temporary directory of this process (`TemporaryCheckpoints`): it is removed once read."""
    with checkpoint.as_directory() as d:
        model = Bertram.from_pretrained(d)
        progress = read_progress(d)
    if local_mode:
        _remove_temporary(checkpoint.path)
    return model, progress


def _remove_temporary(path: str) -> None:
    """Delete a checkpoint directory `TemporaryCheckpoints` made, and nothing else (a checkpoint in the run's
    storage, or any other path, is left alone)."""
    path = os.path.realpath(path)
    if (os.path.basename(path).startswith(TEMP_PREFIX)
            and os.path.dirname(path) == os.path.realpath(tempfile.gettempdir())):
        shutil.rmtree(path, ignore_errors=True)


class TemporaryCheckpoints:
    """The temporary directories rank 0 writes its checkpoints into.

    With workers, Ray Train has copied a checkpoint to storage when `ray.train.report` returns: its
    directory is removed at once. In local mode (`keep_newest`), Ray Train keeps the directory instead:
    only the newest is kept (`read_final` removes the last one).
    """

    def __init__(self, keep_newest: bool):
        self.keep_newest = keep_newest
        self.kept: list[str] = []  # local mode: the directory of the newest checkpoint

    @contextmanager
    def directory(self):
        """A new temporary directory for one checkpoint, cleaned up as above when the block ends."""
        d = tempfile.mkdtemp(prefix=TEMP_PREFIX)
        try:
            yield d
        finally:
            if not self.keep_newest:
                _remove_temporary(d)
            else:
                for old in self.kept:
                    _remove_temporary(old)
                self.kept[:] = [d]
