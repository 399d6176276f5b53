"""The generated parts of README.md and docs/DESIGN.md: the configuration reference of `jobs.run` (from
the config dataclasses' docstrings) and the tables of a run's outputs (from `jobs.run.PIPELINE`).

    python -m jobs.reference            rewrite those sections
    python -m jobs.reference --check    exit 1 if one is out of date (tests/test_run_job.py checks this)
"""

from __future__ import annotations

import sys
from pathlib import Path

from jobs.run import PIPELINE, RunConfig
from pipeline.config import reference_markdown

ROOT = Path(__file__).resolve().parents[1]
README, DESIGN = ROOT / "README.md", ROOT / "docs" / "DESIGN.md"
START, END = "<!-- config-reference: start (python -m jobs.reference) -->", "<!-- config-reference: end -->"
OUTPUTS = "<!-- outputs: start (python -m jobs.reference) -->", "<!-- outputs: end -->"


def outputs_table() -> str:
    """README's table: each output of a run, what it holds, its format."""
    rows = [f"| `{o.name}` | {o.what} | {o.form} |" for o in PIPELINE]
    return "\n".join(["| under `--output` | what | format |", "|---|---|---|", *rows]) + "\n"


def layout_table() -> str:
    """DESIGN's table: each output of a run, what writes it, where that runs, what it reads."""
    rows = [f"| `{o.name}` | `{o.by}` | {o.runs_on} | {o.reads} |" for o in PIPELINE]
    return "\n".join(["| output | written by | runs on | reads |", "|---|---|---|---|", *rows]) + "\n"


def _replace(text: str, markers: tuple[str, str], body: str, name: str) -> str:
    start, end = markers
    head, found, rest = text.partition(start)
    if not found or end not in rest:
        raise SystemExit(f"{name} needs the markers {start} and {end}")
    return f"{head}{start}\n{body}{end}{rest.partition(end)[2]}"


def updated(text: str) -> str:
    """`text` (README.md) with its generated sections regenerated."""
    text = _replace(text, (START, END), reference_markdown(RunConfig, heading="####"), "README.md")
    return _replace(text, OUTPUTS, outputs_table(), "README.md")


def updated_design(text: str) -> str:
    """`text` (docs/DESIGN.md) with its outputs table regenerated."""
    return _replace(text, OUTPUTS, layout_table(), "docs/DESIGN.md")


if __name__ == "__main__":
    stale = []
    for path, update in ((README, updated), (DESIGN, updated_design)):
        text = path.read_text(encoding="utf-8")
        new = update(text)
        if new != text:
            stale.append(path.name)
            if "--check" not in sys.argv[1:]:
                path.write_text(new, encoding="utf-8")
    if stale and "--check" in sys.argv[1:]:
        raise SystemExit(f"{', '.join(stale)}: generated sections out of date: run python -m jobs.reference")
