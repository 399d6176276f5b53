"""Stage outputs and their `manifest.json`: the commit record of a stage.

A stage writes its data first and its manifest last. An output *is complete* exactly
when its manifest exists, so a crash at any point leaves an output that is never
mistaken for a finished one; the next run clears it and starts the stage again.
"""

from __future__ import annotations

import fnmatch
import platform
import time
from importlib import metadata
from typing import Any

from pipeline import storage

MANIFEST = "manifest.json"
LOCK_FILES = ".bertram-lock.json*"  # the output's lock (pipeline/lock.py), and its transient names
_PACKAGES = ("bertram-ray", "ray", "torch", "transformers", "pyarrow", "numpy", "smart-open")


def manifest_uri(output: str) -> str:
    return storage.join(output, MANIFEST)


def is_complete(output: str) -> bool:
    return storage.exists(manifest_uri(output))


def read(output: str) -> dict[str, Any]:
    return storage.read_json(manifest_uri(output))


# Config keys that do not change a stage's result: a complete output made with other
# values of these is still the same result.
_NOT_RESULT_KEYS = {"overwrite", "num_cpus", "output"}


def reusable(output: str, stage: str, config: dict[str, Any], overwrite: bool,
             inputs: dict[str, Any] | None = None) -> bool:
    """Whether `output` already holds this stage's complete result for `config` and `inputs`.

    `inputs` identifies what the stage read (e.g. the upstream manifest's `finished_at`):
    when it changed, the output is stale and is redone. A complete output made with other
    *settings* is an error, never silently reused or replaced.
    """
    if overwrite or not is_complete(output):
        return False
    previous = read(output)
    if inputs is not None and previous.get("inputs") != inputs:
        return False  # the stage's input was rebuilt since: this output is stale
    old = previous.get("config", {})
    config = storage.scrub_all(config)  # as it was written
    changed = {k: (old.get(k), v) for k, v in config.items() if k not in _NOT_RESULT_KEYS and old.get(k) != v}
    if changed:
        what = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items())[:4])
        raise storage.UserError(f"{storage.redact(output)} holds a complete {stage} output made with other "
                                f"settings ({what}); pass --overwrite to replace it, or choose another --output")
    return True


def reset(output: str, stage: str, owned: tuple[str, ...], keep: tuple[str, ...] = ()) -> None:
    """Clear `output` for a fresh run of the stage, so stale files can never mix with new ones.

    Only a directory whose every top-level name matches `owned` or `keep` (or is the manifest) is
    cleared, and of it only what `keep` does not name (a sub-output the stage reuses): a user's
    directory is never deleted.
    """
    if storage.exists(output):
        check_owned(output, owned + keep, f"{'an' if stage[0] in 'aeiou' else 'a'} {stage}")
        clear(output, owned, keep)
    storage.make_dirs(output)


def clear(output: str, owned: tuple[str, ...], keep: tuple[str, ...] = ()) -> None:
    """Delete the manifest (first: from then on the output is partial) and every top-level name of `output`
    that matches `owned` and not `keep`; the output's lock (pipeline/lock.py) stays with its holder."""
    storage.delete(manifest_uri(output))
    for top in _top_level_names(output):
        if any(fnmatch.fnmatchcase(top, p) for p in owned) and not any(fnmatch.fnmatchcase(top, p) for p in keep):
            storage.delete(storage.join(output, top))


def check_owned(output: str, owned: tuple[str, ...], what: str, flag: str = "--output") -> None:
    """One line, and nothing deleted, when `output` holds a file whose top-level name matches none of
    `owned` (or the manifest): then it is a user's directory. Hidden and `_`-named files count too."""
    for top in _top_level_names(output):
        if not any(fnmatch.fnmatchcase(top, pattern) for pattern in owned + (MANIFEST, LOCK_FILES)):
            example = storage.join(output, top)
            raise storage.UserError(f"{flag} {storage.redact(output)} holds files that are not {what} output "
                                    f"(e.g. {storage.redact(example)}); choose a new or empty location")


def _top_level_names(output: str) -> list[str]:
    """The top-level names under `output` that hold files (hidden and `_`-named files count too)."""
    prefix = storage.join(storage.absolute(output), "")  # list_files gives local paths absolute
    names = [f.uri[len(prefix):].lstrip("/").split("/", 1)[0] if f.uri.startswith(prefix) else f.uri
             for f in storage.list_files(output, hidden=True)]
    return list(dict.fromkeys(names))


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def write(output: str, stage: str, config: dict[str, Any], started: float, **fields: Any) -> dict[str, Any]:
    """Commit a stage output: write its manifest (last). Returns it as written: secrets scrubbed."""
    manifest = storage.scrub_all({"stage": stage, "output": storage.redact(output), "config": config, **fields,
                                  "wall_time_s": round(time.time() - started, 3),
                                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                  "versions": versions()})
    storage.write_json(manifest_uri(output), manifest)
    return manifest
