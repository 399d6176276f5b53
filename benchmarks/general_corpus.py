"""A second English corpus, of another domain than the demo's docstrings: general English.

The demo corpus (`python -m pipeline.demo_corpus`) is technical prose about Python code. This one is
built from two Debian packages, none of it about software:

* WordNet 3.0 (`wordnet-base`, /usr/share/wordnet/data.{noun,verb,adj,adv}): every synset's gloss
  (the definition) and its quoted example sentences, one per line;
* the fortune cookie databases (`fortunes`, /usr/share/games/fortunes/): quotations, literature,
  jokes, definitions; the technical categories (computers, debian, linux, ascii-art, ...) left out.

    apt-get install -y wordnet-base fortunes
    .venv/bin/python benchmarks/general_corpus.py --output .cache/general-corpus

~1.8 M words; a line per gloss, example or fortune paragraph. Used to score a run's held-out words with
contexts from another domain (`jobs.run --eval_corpus .cache/general-corpus`) and to train on one
domain and evaluate on the other (BENCHMARKS.md, "Out of domain").
"""

from __future__ import annotations

import argparse
import os
import re
import sys

WORDNET = "/usr/share/wordnet"
FORTUNES = "/usr/share/games/fortunes"
TECHNICAL = {"computers", "debian", "linux", "ascii-art", "art", "perl", "miscellaneous"}  # fortune files left out


def wordnet_lines(root: str = WORDNET) -> list[str]:
    """Glosses and example sentences of every synset (`data.*` files; the text after '| ')."""
    out = []
    for part in ("noun", "verb", "adj", "adv"):
        with open(os.path.join(root, f"data.{part}"), encoding="latin-1") as f:
            for line in f:
                if line.startswith("  ") or " | " not in line:
                    continue  # the licence header
                gloss = line.split(" | ", 1)[1].strip()
                examples = re.findall(r'"([^"]+)"', gloss)
                definition = re.sub(r'"[^"]*"', "", gloss).strip(" ;")
                out += [s.strip() for s in [definition, *examples] if len(s.split()) > 2]
    return out


def fortune_lines(root: str = FORTUNES) -> list[str]:
    """Each fortune of the non-technical databases as one line (its lines joined)."""
    out = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if "." in name or name in TECHNICAL or not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for fortune in f.read().split("\n%\n"):
                text = " ".join(fortune.split())
                if len(text.split()) > 2:
                    out.append(text)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=".cache/general-corpus")
    args = parser.parse_args(argv)
    missing = [p for p in (os.path.join(WORDNET, "data.noun"), FORTUNES) if not os.path.exists(p)]
    if missing:
        print(f"error: {missing[0]} is missing; install it with: apt-get install -y wordnet-base fortunes",
              file=sys.stderr)
        return 2
    lines = wordnet_lines() + fortune_lines()
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, "general.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
    words = sum(len(line.split()) for line in lines)
    print(f"{path}: {len(lines)} lines, {words} words")
    return 0


if __name__ == "__main__":
    sys.exit(main())
