"""Stage outputs and their `manifest.json`: the commit record of a stage.

A stage writes its data first and its manifest last. An output *is complete* exactly
when its manifest exists, so a crash at any point leaves an output that is never
mistaken for a finished one; the next run clears it and starts the stage again.
"""

from __future__ import annotations

import platform
import time
from importlib import metadata
from typing import Any

from pipeline import storage

MANIFEST = "manifest.json"
_PACKAGES = ("bertram-ray", "ray", "torch", "transformers", "pyarrow", "numpy", "smart-open")


def manifest_uri(output: str) -> str:
    return storage.join(output, MANIFEST)


def is_complete(output: str) -> bool:
    return storage.exists(manifest_uri(output))


def read(output: str) -> dict[str, Any]:
    return storage.read_json(manifest_uri(output))


def prepare(output: str, overwrite: bool) -> bool:
    """Get `output` ready for a stage. Returns False when a complete output should be kept.

    A complete output is kept unless `overwrite`; a partial one (no manifest) is always
    cleared, so stale files of an interrupted run can never mix with the new ones.
    """
    if storage.exists(output):
        if is_complete(output) and not overwrite:
            return False
        storage.delete(manifest_uri(output))  # first: from here on the output is partial
        storage.delete(output)
    storage.make_dirs(output)
    return True


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def write(output: str, stage: str, config: dict[str, Any], started: float, **fields: Any) -> dict[str, Any]:
    """Commit a stage output: write its manifest (last)."""
    manifest = {"stage": stage, "output": storage.redact(output), "config": config, **fields,
                "wall_time_s": round(time.time() - started, 3),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "versions": versions()}
    storage.write_json(manifest_uri(output), manifest)
    return manifest
