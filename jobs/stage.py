"""One idea of a stage, for every job: check, skip or reset, work, commit.

A stage declares its name, the config class its flags fill, the names it writes under
`--output`, what it reads (the fingerprint of its inputs), the checks that must pass before
its output is touched, and its work. `Stage.run` does the rest, the same way for every job:

0. the output's lock is taken (pipeline/lock.py): a second run on the same output is one line naming the
   first; SIGTERM unwinds the stage, releasing it (jobs/common.py);
1. fingerprint the inputs (`inputs`; an upstream output that is not complete is one line);
2. a complete output made from the same inputs with the same settings is reused ("skipping");
   one made with other settings is one line, never silently replaced (pipeline/manifest.py);
3. the checks (`check`: load the model, read the words...) run before anything is deleted,
   and what they return is handed to the work;
4. the output is reset: only names the stage writes (`outputs`) are deleted, never a user's file
   (a training stage that resumes from its checkpoints resets by itself: `reset=False`);
5. the work writes the data and returns the manifest's fields;
6. the manifest is written last, with the settings, the inputs and the time it took: from then
   on the output is complete; the stage's end line (`done`) follows. A full disk (or a read-only output)
   during the work is one line, and what the work wrote is removed again.

    STAGE = Stage(name="fuse", config=FuseConfig, outputs=OUTPUT_NAMES, inputs=_inputs, check=_load, work=_fuse,
                  done=lambda c, m: f"{m['mode']} model -> {m['output']}")
    fuse = STAGE.run                      # the job's function (jobs.run and the tests call it)
    if __name__ == "__main__":
        STAGE.main(__doc__)               # python -m jobs.fuse --help
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from jobs.common import complete_input, main
from pipeline.console import log
from pipeline import lock, manifest, storage
from pipeline.config import to_dict

C = TypeVar("C")


def _nothing(config: Any) -> Any:
    return None


def _no_inputs(config: Any) -> dict:
    return {}


@dataclass(frozen=True)
class Stage(Generic[C]):
    """A stage of the pipeline: what it is called, reads, checks, does and writes."""

    name: str
    """Its name in the manifest and in log lines; `{field}` is filled from the config ("train {stage}")."""
    config: type
    """The config dataclass its flags fill (`python -m jobs.<job> --help` lists its fields)."""
    outputs: tuple[str, ...]
    """Top-level names (glob patterns) it writes under --output; a reset deletes only these."""
    work: Callable[[C, Any], dict]
    """Writes the output's data from (config, what `check` returned); returns the manifest's fields."""
    inputs: Callable[[C], dict] = _no_inputs
    """The fingerprint of what it reads (upstream manifests' finished_at, file sizes): a change redoes it."""
    check: Callable[[C], Any] = _nothing
    """What must hold before the output is touched (raises one line); returns what the work needs."""
    keep: tuple[str, ...] = ()
    """Top-level names under --output a reset keeps (a sub-output the stage reuses: jobs.infer's preprocessed/)."""
    reset: bool = True
    """False: the work resets (or resumes) its output itself (training continues from its checkpoints)."""
    settings: Callable[[C], dict] = to_dict
    """The settings recorded in the manifest and compared on a re-run."""
    done: Callable[[C, dict], str] | None = None
    """The stage's end line, from its config and its committed manifest."""
    summary: Callable[[dict], str] = lambda result: ""
    """What jobs.run's summary says of a finished output (from its manifest)."""
    preset: Callable[[dict], str] | None = None
    """Its section of a jobs.run preset given with --config, from its flags (default: the job's name)."""

    def label(self, config: C) -> str:
        return self.name.format(**vars(config))

    def run(self, config: C) -> dict:
        """Run the stage (or reuse its complete output) holding its output's lock; returns its manifest."""
        with lock.hold(config.output, self.label(config)):
            return self._run(config)

    def _run(self, config: C) -> dict:
        output, name = config.output, self.label(config)
        inputs = self.inputs(config)
        if manifest.reusable(output, name, self.settings(config), config.overwrite, inputs):
            log(f"{name}: {storage.redact(output)} is complete (manifest.json); skipping. Use --overwrite to redo.")
            return manifest.read(output)
        started = time.time()
        ready = self.check(config)
        if self.reset:
            manifest.reset(output, name, self.outputs, self.keep)
        try:
            fields = self.work(config, ready)
        except Exception as exc:  # noqa: BLE001 - a full disk or a read-only output: one line, space freed
            problem = storage.os_error_in(exc)
            if problem is None:
                raise
            raise self._failed_on_output(config, exc) from None
        result = manifest.write(output, name, self.settings(config), started, inputs=inputs, **fields)
        if self.done is not None:
            log(f"{name}: {self.done(config, result)}")
        return result

    def _failed_on_output(self, config: C, exc: Exception) -> storage.StorageError:
        """The one line for an OS error on the output; a stage that reset its output removes what it wrote (a
        full disk gets its space back; nothing complete is lost: the output held no manifest)."""
        output = config.output
        written = sum(f.size for f in storage.list_files(output, hidden=True) if not f.uri.endswith(lock.LOCK)) \
            if storage.exists(output) else 0
        problem = storage.os_error_in(exc, output, written)  # (the free space before what it wrote is removed)
        if self.reset:
            manifest.clear(output, self.outputs, self.keep)
        return problem

    def main(self, doc: str, job: str, argv: list[str] | None = None) -> None:
        """The job's command line: parse the flags into the config, run, one line per user error (exit 2)."""
        main(self.config, self.run, doc, prog=f"python -m jobs.{job}", argv=argv, section=self.preset)


def upstream(**flags: tuple[str, str | None]) -> dict[str, Any]:
    """`{name}_at` of each upstream output a stage reads: `name=(uri, job)`; a job's output must be complete
    (else one line naming the flag and the job to run first); `job=None`: any output, None when incomplete."""
    stamps = {}
    for name, (uri, job) in flags.items():
        if job is not None:
            stamps[f"{name}_at"] = complete_input(f"--{name}", uri, job)["finished_at"]
        else:
            stamps[f"{name}_at"] = manifest.read(uri).get("finished_at") if manifest.is_complete(uri) else None
    return stamps
