"""The configuration reference of `jobs.run` in README.md, generated from the config dataclasses' docstrings.

    python -m jobs.reference            rewrite the reference section of README.md
    python -m jobs.reference --check    exit 1 if README.md is out of date (tests/test_run_job.py checks this)
"""

from __future__ import annotations

import sys
from pathlib import Path

from jobs.run import RunConfig
from pipeline.config import reference_markdown

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- config-reference: start (python -m jobs.reference) -->", "<!-- config-reference: end -->"


def updated(text: str) -> str:
    """`text` (README.md) with the section between the markers regenerated."""
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    if not rest or not tail and END not in rest:
        raise SystemExit(f"README.md needs the markers {START} and {END}")
    return f"{head}{START}\n{reference_markdown(RunConfig, heading='####')}{END}{tail}"


if __name__ == "__main__":
    text = README.read_text(encoding="utf-8")
    new = updated(text)
    if "--check" in sys.argv[1:]:
        if new != text:
            raise SystemExit("README.md's configuration reference is out of date: run python -m jobs.reference")
    else:
        README.write_text(new, encoding="utf-8")
