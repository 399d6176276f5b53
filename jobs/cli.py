"""The `bertram` command: every job as a subcommand (`bertram run ...` is `python -m jobs.run ...`).

    bertram run --config jobs/configs/demo.yaml --output out/run
    bertram infer --bertram out/run/fused --words words.txt --corpus data/ --output out/vectors
    bertram <job> --help        # the job's own flags, as `python -m jobs.<job> --help`
"""

from __future__ import annotations

import importlib
import runpy
import sys

JOBS = ("run", "preprocess", "targets", "features", "train", "fuse", "tune", "infer", "augment", "evaluate",
        "serve")


def _summary(job: str) -> str:
    doc = importlib.import_module(f"jobs.{job}").__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def usage() -> str:
    width = max(map(len, JOBS))
    lines = [__doc__.strip(), "", "jobs:"] + [f"  {job:<{width}}  {_summary(job)}" for job in JOBS]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        raise SystemExit(0 if args else 2)
    job, rest = args[0], args[1:]
    if job not in JOBS:
        print(f"error: bertram {job}: no such job; one of {', '.join(JOBS)} (bertram --help)", file=sys.stderr)
        raise SystemExit(2)
    sys.argv = [f"bertram {job}", *rest]
    runpy.run_module(f"jobs.{job}", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
