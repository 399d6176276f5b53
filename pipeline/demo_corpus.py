"""The embedded demo corpus: English prose from the docstrings of installed Python code.

Every machine that can run this project has the Python standard library and the
project's dependencies installed, and their docstrings are tens of MB of real,
edited English about programming and machine learning. That is what `make demo`
trains on when no network is available.

    python -m pipeline.demo_corpus --output .cache/demo-corpus

The corpus is written as `num_shards` plain-text files, one paragraph per line, in a
deterministic order (sorted source files), so two builds on the same installation
are byte-identical.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import inspect
import multiprocessing
import os
import sys
import sysconfig
from pathlib import Path

# Lines of a docstring that are code or markup, not prose.
_NON_PROSE_PREFIXES = (">>>", "...", "$ ", "|", "+-", "==", "--", "..", ":param", ":return", ":type", ":rtype")


def source_roots() -> list[Path]:
    """The standard library and site-packages directories of this interpreter."""
    paths = sysconfig.get_paths()
    roots = {Path(paths["stdlib"]), Path(paths["purelib"]), Path(paths["platlib"])}
    return sorted(p for p in roots if p.is_dir())


def python_files(roots: list[Path]) -> list[Path]:
    """All `.py` files under `roots`, sorted, skipping tests and vendored copies of this corpus."""
    files = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in {"tests", "test", "__pycache__", "site-packages"}
                                 or Path(dirpath) == root and d == "site-packages")
            files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return files


def docstrings(source: str) -> list[str]:
    """Module, class and function docstrings of one Python source file."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return [doc for n in nodes if (doc := ast.get_docstring(n, clean=True))]


def paragraphs(docstring: str) -> list[str]:
    """Split a cleaned docstring into one-line prose paragraphs (code and tables dropped)."""
    out, current = [], []
    for line in inspect.cleandoc(docstring).splitlines() + [""]:
        stripped = line.strip()
        if not stripped or line.startswith((" ", "\t")) or stripped.startswith(_NON_PROSE_PREFIXES):
            # A blank line ends a paragraph; indented lines are code blocks or parameter tables.
            if len(current) > 0:
                text = " ".join(current)
                if len(text.split()) > 3:
                    out.append(text)
            current = []
            continue
        current.append(stripped)
    return out


def file_paragraphs(path: Path) -> list[str]:
    """The prose paragraphs of one source file's docstrings."""
    try:
        source = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return []
    return [para for doc in docstrings(source) for para in paragraphs(doc)]


def build(output: Path, num_shards: int = 8) -> dict:
    """Write the corpus to `output/docstrings-XX.txt`; returns counts. Skips work if already built."""
    marker = output / "_SUCCESS"
    if marker.exists():
        return {"output": str(output), "cached": True}
    output.mkdir(parents=True, exist_ok=True)
    seen: set[bytes] = set()  # many packages vendor the same code: keep each paragraph once
    lines: list[str] = []
    with multiprocessing.Pool() as pool:  # parsing is CPU-bound; order is kept by imap
        for found in pool.imap(file_paragraphs, python_files(source_roots()), chunksize=64):
            for para in found:
                key = hashlib.blake2b(para.encode(), digest_size=12).digest()
                if key not in seen:
                    seen.add(key)
                    lines.append(para)
    per_shard = -(-len(lines) // num_shards)
    for i in range(num_shards):
        shard = lines[i * per_shard:(i + 1) * per_shard]
        (output / f"docstrings-{i:02d}.txt").write_text("\n".join(shard) + "\n", encoding="utf-8")
    marker.write_text(f"{len(lines)} paragraphs\n")
    return {"output": str(output), "cached": False, "paragraphs": len(lines)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=".cache/demo-corpus", help="directory to write the corpus to")
    parser.add_argument("--num_shards", type=int, default=8, help="number of text files to split it into")
    args = parser.parse_args(argv)
    result = build(Path(args.output), args.num_shards)
    print(f"demo corpus: {result}", file=sys.stderr)


if __name__ == "__main__":
    main()
