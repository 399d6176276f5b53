"""The shape of the code: the figures a newcomer would measure before changing it.

    python benchmarks/code_shape.py [--output benchmarks/results/code-shape.md]

Prints and writes: lines in jobs/ and pipeline/, the longest functions in jobs/ and in
pipeline/train.py, import circles among the project's modules (imports inside functions
included), the floors of pipeline/ (the longest chain of pipeline-internal imports: a module
that imports nothing of pipeline/ is floor 1), and the `duplicates` pairs outside tests (when
the `duplicates` tool is installed).
"""
from __future__ import annotations

import argparse
import ast
import functools
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("jobs", "pipeline")


def modules() -> dict[str, pathlib.Path]:
    return {f"{pkg}.{p.stem}": p for pkg in PACKAGES for p in sorted((ROOT / pkg).glob("*.py"))
            if p.stem != "__init__"}


def imports(path: pathlib.Path, known: set[str], top_level_only: bool = False) -> set[str]:
    """The project modules `path` imports (`from pipeline import x` counts as pipeline.x)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # also imports under `if TYPE_CHECKING` are not run: skip them; try/except blocks are
        nodes = [n for b in tree.body for n in ([b] + (list(ast.walk(b)) if isinstance(b, ast.Try) else []))]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in known:
                found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known}
    return found - {path_module(path)}


def path_module(path: pathlib.Path) -> str:
    return f"{path.parent.name}.{path.stem}"


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    @functools.lru_cache(None)
    def floor(m: str, seen: frozenset = frozenset()) -> int:
        below = [d for d in graph[m] if d not in seen]
        return 1 + max((floor(d, seen | {m}) for d in below), default=0)
    return {m: floor(m) for m in graph}


def functions(path: pathlib.Path) -> list[tuple[int, str]]:
    """(lines, name) of every function and method, nested ones counted inside their parent too."""
    tree = ast.parse(path.read_text())
    return [(n.end_lineno - n.lineno + 1, f"{path_module(path)}:{n.name}") for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def duplicate_pairs() -> str:
    if not shutil.which("duplicates"):
        return "n/a (no duplicates tool)"
    out = subprocess.run(["duplicates", "--most", "200"], cwd=ROOT, capture_output=True, text=True).stdout
    pairs = [line for line in out.splitlines() if line[:1] == "D" and " ~ " in line]
    outside = [p for p in pairs if "tests/" not in p]
    return f"{len(outside)} ({len(pairs)} with tests)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=None, help="also write the table to this markdown file")
    args = p.parse_args()
    mods = modules()
    known = set(mods)
    every = {m: imports(p, known) for m, p in mods.items()}
    top = {m: imports(p, known, top_level_only=True) for m, p in mods.items()}
    inner = {m: {d for d in top[m] if d.startswith("pipeline.")} for m in mods if m.startswith("pipeline.")}
    fl = floors(inner)
    lines = {pkg: sum(len(p.read_text().splitlines()) for m, p in mods.items() if m.startswith(pkg + "."))
             for pkg in PACKAGES}
    jobs_fn = max(f for m, p in mods.items() if m.startswith("jobs.") for f in functions(p))
    train_fn = max(functions(mods["pipeline.train"]))
    pipe_fn = max(f for m, p in mods.items() if m.startswith("pipeline.") for f in functions(p))
    deepest = max(fl.values())
    chain = sorted((m for m in fl if fl[m] == deepest))
    rows = [
        ("lines in jobs/", lines["jobs"]),
        ("lines in pipeline/", lines["pipeline"]),
        ("longest function in jobs/", f"{jobs_fn[0]} ({jobs_fn[1]})"),
        ("longest function in pipeline/train.py", f"{train_fn[0]} ({train_fn[1]})"),
        ("longest function in pipeline/", f"{pipe_fn[0]} ({pipe_fn[1]})"),
        ("import circles (function-level imports included)", f"{len(circles(every))} {circles(every) or ''}"),
        ("pipeline/ floors", f"{deepest} (top: {', '.join(chain)})"),
        ("duplicates pairs outside tests", duplicate_pairs()),
    ]
    table = "| figure | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
    print(table, end="")
    if args.output:
        pathlib.Path(args.output).write_text(table)


if __name__ == "__main__":
    main()
