"""Are two jobs.run outputs the same in content? Every file of every stage, compared by what it holds.

    python benchmarks/compare_runs.py OLD_RUN NEW_RUN [--output benchmarks/results/compare.md]

Parquet tables must be equal (schema and values), safetensors equal tensor by tensor, JSON and text
equal after the run's root path is replaced by <run> and the keys that record *when* or *how fast* are
dropped (finished_at, wall_time_s, timings, train_seconds, *_per_s, versions, ...), text equal
line by line. Checkpoint directories and logs are left out (they hold times); PNG plots are
compared byte for byte but reported apart (matplotlib may stamp them). Writes one row per stage.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import pyarrow.parquet as pq

WHEN = {"finished_at", "wall_time_s", "timings", "train_seconds", "versions", "started_at", "attempts"}
SKIP_DIRS = {"checkpoints", "logs", "_work"}


def _clean(value, roots: tuple[str, str]):
    if isinstance(value, dict):
        return {k: _clean(v, roots) for k, v in value.items()
                if k not in WHEN and not k.endswith("_per_s") and not k.endswith("_at")}
    if isinstance(value, list):
        return [_clean(v, roots) for v in value]
    if isinstance(value, str):
        for root in roots:
            value = value.replace(root, "<run>")
        return value
    return value


def same(a: pathlib.Path, b: pathlib.Path, roots: tuple[str, str]) -> str | None:
    """None when the two files hold the same content, else what differs."""
    if a.suffix == ".parquet":
        ta, tb = pq.read_table(a), pq.read_table(b)
        return None if ta.equals(tb) else f"table differs ({ta.num_rows} vs {tb.num_rows} rows)"
    if a.suffix == ".safetensors":
        from safetensors.torch import load_file

        import torch

        sa, sb = load_file(a), load_file(b)
        if sa.keys() != sb.keys():
            return "tensor names differ"
        bad = [k for k in sa if not torch.equal(sa[k], sb[k])]
        return None if not bad else f"{len(bad)} tensors differ, e.g. {bad[0]}"
    if a.suffix == ".json":
        ja, jb = _clean(json.loads(a.read_text()), roots), _clean(json.loads(b.read_text()), roots)
        if ja == jb:
            return None
        keys = sorted(k for k in set(ja) | set(jb) if ja.get(k) != jb.get(k)) if isinstance(ja, dict) else []
        return f"differs in {keys[:6]}"
    if a.suffix in (".md", ".txt", ".csv", ".tsv"):
        ta, tb = (_clean(f.read_text(encoding="utf-8"), roots) for f in (a, b))
        return None if ta == tb else "text differs"
    return None if a.read_bytes() == b.read_bytes() else "bytes differ"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--output", default=None)
    args = p.parse_args()
    old, new = pathlib.Path(args.old).resolve(), pathlib.Path(args.new).resolve()
    roots = (str(old), str(new))

    def files(root: pathlib.Path) -> set[str]:
        return {str(f.relative_to(root)) for f in root.rglob("*") if f.is_file()
                and not SKIP_DIRS & set(f.relative_to(root).parts)}

    fa, fb = files(old), files(new)
    stages: dict[str, list[str]] = {}
    for rel in sorted(fa | fb):
        stage = rel.split("/", 1)[0]
        rows = stages.setdefault(stage, [])
        if rel not in fa or rel not in fb:
            rows.append(f"{rel}: only in {'new' if rel not in fa else 'old'}")
            continue
        why = same(old / rel, new / rel, roots)
        if why:
            rows.append(f"{rel}: {why}{' (plot)' if rel.endswith('.png') else ''}")
    lines = ["| output | files | identical in content | differences |", "|---|---:|---|---|"]
    for stage, diffs in stages.items():
        n = len([r for r in fa | fb if r.split("/", 1)[0] == stage])
        lines.append(f"| `{stage}` | {n} | {'yes' if not diffs else 'no'} | {'; '.join(diffs) or ''} |")
    table = "\n".join(lines) + "\n"
    print(table, end="")
    if args.output:
        pathlib.Path(args.output).write_text(table)
    sys.exit(0 if all(not d or all(x.endswith("(plot)") for x in d) for d in stages.values()) else 1)


if __name__ == "__main__":
    main()
