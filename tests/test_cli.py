"""The `bertram` command: every job as a subcommand, one line for a job that does not exist."""

from __future__ import annotations

import os
import subprocess
import sys

from jobs.cli import JOBS
from tests.conftest import REPO


def _bertram(*args):
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_bertram_lists_every_job_and_runs_one_as_python_m_would(tmp_path):
    listed = _bertram("--help")
    assert listed.returncode == 0 and all(f"  {job} " in listed.stdout for job in JOBS)
    assert set(JOBS) == {p[:-3] for p in os.listdir(REPO / "jobs") if p.endswith(".py")} - {
        "__init__", "common", "stage", "reference", "cli"}  # a new job is a new subcommand
    unknown = _bertram("nope")
    assert unknown.returncode == 2 and unknown.stderr.strip().splitlines() == [
        f"error: bertram nope: no such job; one of {', '.join(JOBS)} (bertram --help)"]
    bad = _bertram("preprocess", "--corpus", str(tmp_path / "missing"), "--output", str(tmp_path / "out"))
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: ") and "missing" in bad.stderr
    script = os.path.join(os.path.dirname(sys.executable), "bertram")
    assert os.access(script, os.X_OK), "the package installs the bertram command (pip install -e .)"
