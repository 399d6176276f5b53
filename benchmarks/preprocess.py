"""Benchmark: preprocessing (`jobs.preprocess` on Ray Data) against the reference preprocessing.

    python benchmarks/preprocess.py --tokens 20000000 --buckets 25

1. Builds the benchmark corpus: the demo corpus (`python -m pipeline.demo_corpus`)
   repeated, whole copies, until it holds at least `--tokens` tokens (counted with our
   tokenizer). Copy k is written as its own file, its lines shuffled with seed k, so
   the copies repeat contents but not line order.
2. Times the reference: a single Python process doing what the reference preprocessing
   of form-context-model (Schick & Schütze) does with an already shuffled, tokenised and
   lowercased corpus file (that preparation is not timed): one counting pass (a
   `Counter` over `line.split()`), the targets (count >= 100) shuffled with seed 1234
   into `--buckets` equal groups, then one full pass over the corpus per bucket that
   keeps the first 1000 distinct contexts (up to 25 tokens either side, within a
   `' .'`-separated sentence) of each of the bucket's words and writes
   `word<TAB>context<TAB>...` lines. `--reference_buckets K` times only K of those
   passes and extrapolates linearly (the report says so).
3. Times ours: `preprocess(PreprocessConfig(...))` end to end (imports and Ray start-up
   included) in a fresh Python process per `--cpus` setting, so `ray.init(num_cpus=n)`
   really applies.
4. Prints a markdown table and writes it, with the command line, to `--report`.

Each measurement is repeated `--repeat` times; the table shows the median.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/preprocess.py` from anywhere, without PYTHONPATH
    sys.path.insert(0, str(REPO))

import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

from pipeline.corpus import tokenize  # noqa: E402

# The preprocessing settings, the same on both sides (they are PreprocessConfig's defaults).
MIN_COUNT_TARGET = 100
MAX_CONTEXTS_PER_WORD = 1000
CONTEXT_WINDOW = 25
SEED = 1234

DEMO_CORPORA = (Path("/tmp/demo-corpus"), Path(".cache/demo-corpus"))
RESULT_MARKER = "BENCH_RESULT "  # prefix of the JSON line a `--_ours` child prints
TOKENIZE_BATCH = 20_000  # lines per Arrow batch when tokenising the demo corpus


# --- the benchmark corpus ---------------------------------------------------------------

def demo_corpus_dir(given: str | None) -> Path:
    """The demo corpus: `given`, else an existing build, else built into .cache/demo-corpus."""
    if given:
        return Path(given)
    for path in DEMO_CORPORA:
        if (path / "_SUCCESS").exists():
            return path
    target = DEMO_CORPORA[-1]
    print(f"building the demo corpus in {target} ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "pipeline.demo_corpus", "--output", str(target.resolve())],
                   check=True, cwd=REPO, env=child_env())
    return target


def read_lines(corpus_dir: Path) -> list[str]:
    """All lines of the corpus's .txt files, in file order (split on '\\n' only, as ours reads)."""
    lines = []
    for path in sorted(corpus_dir.glob("*.txt")):
        text = path.read_bytes().decode("utf-8")
        lines.extend(text[:-1].split("\n") if text.endswith("\n") else text.split("\n"))
    return lines


def pretokenize(lines: list[str]) -> tuple[list[str], int]:
    """The lines both sides use (more than one word), tokenised, lowercased and space-joined.

    Returns (tokenised lines, number of tokens). Lines of one word or none are dropped,
    as the reference (`remove_one_word_lines`) and ours (`one_word`, `empty`) do, and so
    are lines with NUL bytes, which ours skips as `binary`: both sides see the same text.
    """
    used = [line for line in lines if len(line.split()) > 1 and "\x00" not in line]
    joined, n_tokens = [], 0
    for start in range(0, len(used), TOKENIZE_BATCH):
        tokens = tokenize(pa.array(used[start:start + TOKENIZE_BATCH], pa.string()), lowercase=True)
        n_tokens += len(pc.list_flatten(tokens))
        joined.extend(pc.binary_join(tokens, " ").to_pylist())
    return joined, n_tokens


def write_copies(lines: list[str], copies: int, out_dir: Path) -> int:
    """Write `copies` files of `lines`, copy k shuffled with seed k; returns the bytes written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.txt"):
        old.unlink()
    size = 0
    for k in range(copies):
        order = list(lines)
        random.Random(k).shuffle(order)
        data = ("\n".join(order) + "\n").encode("utf-8")
        (out_dir / f"copy-{k:03d}.txt").write_bytes(data)
        size += len(data)
    return size


def write_reference_input(tokenized: list[str], copies: int, path: Path) -> None:
    """The reference's input: the tokenised lines of all copies, shuffled as one file (seed 1234)."""
    lines = tokenized * copies
    random.Random(SEED).shuffle(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def build_corpus(demo_dir: Path, workdir: Path, min_tokens: int) -> dict:
    """Write the benchmark corpus (for ours) and the reference's prepared input; returns its sizes."""
    lines = read_lines(demo_dir)
    tokenized, tokens_per_copy = pretokenize(lines)
    copies = max(1, math.ceil(min_tokens / tokens_per_copy))
    size = write_copies(lines, copies, workdir / "corpus")
    write_reference_input(tokenized, copies, workdir / "reference" / "train.shuffled.tokenized")
    return {"demo_corpus": str(demo_dir), "copies": copies, "tokens": tokens_per_copy * copies,
            "bytes": size, "lines": len(lines) * copies, "lines_used": len(tokenized) * copies}


# --- the reference (single process) -----------------------------------------------------

def reference_count(path: Path) -> Counter:
    """Counting pass: occurrences of every whitespace-separated token."""
    counts: Counter = Counter()
    with open(path, encoding="utf-8") as f:
        for line in f:
            counts.update(line.split())
    return counts


def reference_buckets(counts: Counter, num_buckets: int) -> list[list[str]]:
    """Targets (count >= MIN_COUNT_TARGET, by count), shuffled with SEED, in equal groups."""
    targets = [word for word, count in counts.most_common() if count >= MIN_COUNT_TARGET]
    random.seed(SEED)
    random.shuffle(targets)
    per_bucket = len(targets) // num_buckets + 1
    return [targets[i * per_bucket:(i + 1) * per_bucket] for i in range(num_buckets)]


def reference_bucket_pass(path: Path, words: list[str], out_path: Path) -> int:
    """One pass over the corpus collecting the first distinct contexts of `words`; returns contexts."""
    wanted = set(words)
    contexts: dict[str, set[str]] = {word: set() for word in wanted}
    with open(path, encoding="utf-8") as f:
        for composite_line in f:
            for sentence in composite_line[:-1].split(" ."):
                tokens = sentence.split()
                for idx, token in enumerate(tokens):
                    if token in wanted and len(contexts[token]) < MAX_CONTEXTS_PER_WORD:
                        contexts[token].add(" ".join(tokens[max(0, idx - CONTEXT_WINDOW):idx + CONTEXT_WINDOW]))
    with open(out_path, "w", encoding="utf-8") as out:
        for word, found in contexts.items():
            out.write(word + "\t" + "\t".join(found) + "\n")
    return sum(len(found) for found in contexts.values())


def run_reference(workdir: Path, num_buckets: int, timed_buckets: int | None) -> dict:
    """Time the reference: the counting pass and (the first `timed_buckets` of) the bucket passes.

    Empty buckets are skipped, as the reference does. When only some passes are timed,
    `seconds` extrapolates their mean to every non-empty bucket.
    """
    path = workdir / "reference" / "train.shuffled.tokenized"
    for old in path.parent.glob("train.bucket*.txt"):
        old.unlink()
    t0 = time.perf_counter()
    counts = reference_count(path)
    buckets = [b for b in reference_buckets(counts, num_buckets) if b]
    count_s = time.perf_counter() - t0
    n_timed = len(buckets) if timed_buckets is None else min(timed_buckets, len(buckets))
    pass_s, n_contexts = [], 0
    for i, words in enumerate(buckets[:n_timed]):
        t0 = time.perf_counter()
        n_contexts += reference_bucket_pass(path, words, path.parent / f"train.bucket{i}.txt")
        pass_s.append(time.perf_counter() - t0)
    contexts_s = statistics.mean(pass_s) * len(buckets) if pass_s else 0.0
    return {"seconds": count_s + contexts_s, "count_s": count_s, "contexts_s": contexts_s,
            "tokens": sum(counts.values()), "target_words": sum(len(b) for b in buckets),
            "dot_is_target": counts["."] >= MIN_COUNT_TARGET, "contexts_written": n_contexts,
            "buckets": len(buckets), "timed_buckets": n_timed, "extrapolated": n_timed < len(buckets)}


# --- ours (Ray Data, one fresh process per CPU setting) ---------------------------------

def child_env() -> dict[str, str]:
    """Environment of child processes: this repo importable, a local Ray, no progress bars."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # a local Ray, so that num_cpus applies
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    return env


def ours_output(workdir: Path, cpus: int) -> Path:
    return workdir / f"ours-{cpus}cpu"


def ours_child(workdir: Path, num_buckets: int, cpus: int) -> None:
    """`--_ours N` mode: run the stage once on a fresh local Ray with N CPUs; print a JSON result line."""
    t0 = time.perf_counter()
    from jobs.preprocess import PreprocessConfig, preprocess

    config = PreprocessConfig(corpus=str(workdir / "corpus"), output=str(ours_output(workdir, cpus)),
                              overwrite=True, num_buckets=num_buckets, num_cpus=cpus,
                              min_count_target=MIN_COUNT_TARGET, max_contexts_per_word=MAX_CONTEXTS_PER_WORD,
                              context_window=CONTEXT_WINDOW, seed=SEED)
    manifest = preprocess(config)
    seconds = time.perf_counter() - t0
    result = {"seconds": seconds, "count_s": manifest["timings"]["count_s"],
              "contexts_s": manifest["timings"]["sample_s"], "tokens": manifest["tokens"],
              "lines": manifest["lines"], "target_words": manifest["target_words"],
              "contexts_written": manifest["contexts_written"], "ray_cpus": manifest["ray"]["cpus"]}
    print(RESULT_MARKER + json.dumps(result), flush=True)
    import ray

    ray.shutdown()


def run_ours(workdir: Path, num_buckets: int, cpus: int, log_path: Path) -> dict:
    """Run `--_ours cpus` in a fresh Python process; its stderr goes to `log_path`."""
    command = [sys.executable, str(Path(__file__).resolve()), "--_ours", str(cpus),
               "--workdir", str(workdir), "--buckets", str(num_buckets)]
    with open(log_path, "w") as log:
        proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO, env=child_env())
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if proc.returncode != 0 or not lines:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"ours with {cpus} CPUs failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    return json.loads(lines[-1][len(RESULT_MARKER):])


# --- measuring and reporting ------------------------------------------------------------

def median_run(runs: list[dict]) -> dict:
    """The run with the median wall time (the lower middle one for an even count), with all times."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    return {**ordered[(len(ordered) - 1) // 2], "all_seconds": [r["seconds"] for r in runs]}


def cpu_label(n: int) -> str:
    return f"ours, {n} CPU{'s' if n > 1 else ''}"


def fmt_rate(tokens: float, seconds: float) -> str:
    rate = tokens / seconds
    return f"{rate / 1e6:.2f} M" if rate >= 1e6 else f"{rate / 1e3:.0f} k"


def render_report(command: str, corpus: dict, reference: dict, ours: dict[int, dict], num_buckets: int,
                  repeat: int) -> str:
    """The markdown report: setup, the table, the CPU scaling and the notes."""
    tokens = corpus["tokens"]
    ref_s = reference["seconds"]
    star = "*" if reference["extrapolated"] else ""
    rows = [("reference (1 process)" + star, reference)] + [
        (cpu_label(n), ours[n]) for n in sorted(ours)]
    out = [
        "## Preprocessing benchmark", "",
        f"Command: `{command}`", "",
        f"Machine: {os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}; "
        f"{time.strftime('%Y-%m-%d')}.",
        f"Corpus: {tokens:,} tokens, {corpus['bytes'] / 1e6:.1f} MB, {corpus['lines']:,} lines "
        f"({corpus['copies']} line-shuffled cop{'y' if corpus['copies'] == 1 else 'ies'} of the demo corpus, "
        "one file each); "
        f"{num_buckets} buckets, min count {MIN_COUNT_TARGET}, up to {MAX_CONTEXTS_PER_WORD} contexts "
        f"per word, window {CONTEXT_WINDOW}. Median of {repeat} run(s).", "",
        "| run | wall s | tokens/s | speed-up vs reference | counting s | contexts s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        out.append(f"| {name} | {r['seconds']:.1f} | {fmt_rate(tokens, r['seconds'])} | "
                   f"{ref_s / r['seconds']:.2f}× | {r['count_s']:.1f} | {r['contexts_s']:.1f} |")
    out.append("")
    cpus = sorted(ours)
    for n in cpus[1:]:
        out.append(f"{n} CPUs vs {cpus[0]} CPU{'s' if cpus[0] > 1 else ''}: "
                   f"{ours[cpus[0]]['seconds'] / ours[n]['seconds']:.2f}×")
    out.append("")
    if reference["extrapolated"]:
        out.append(f"\\* Extrapolated: {reference['timed_buckets']} of the {reference['buckets']} bucket passes "
                   f"were timed (mean {reference['contexts_s'] / reference['buckets']:.1f} s each) and "
                   f"multiplied by {reference['buckets']}; counting was timed in full.")
        out.append("")
    out += [
        "Ours is timed end to end in a fresh process (imports, Ray start-up, both passes, parquet "
        "output); its counting and contexts columns are the stage's own timings, the rest of the wall "
        "time is start-up and planning. The reference is timed from its prepared input (shuffled, "
        "tokenised with our tokenizer, lowercased; preparation not timed) and counts once, where the "
        "original counts once per vocabulary file it writes (four times).", "",
        "| | reference | " + " | ".join(cpu_label(n) for n in cpus) + " |",
        "|---|---:|" + "---:|" * len(cpus),
        f"| tokens | {reference['tokens']:,} | " + " | ".join(f"{ours[n]['tokens']:,}" for n in cpus) + " |",
        f"| target words | {reference['target_words']:,} | "
        + " | ".join(f"{ours[n]['target_words']:,}" for n in cpus) + " |",
        f"| contexts written | {reference['contexts_written']:,}{star} | "
        + " | ".join(f"{ours[n]['contexts_written']:,}" for n in cpus) + " |", "",
        f"Target words differ by {reference['target_words'] - ours[cpus[0]]['target_words']:+,}: ours never "
        f"makes the sentence end '.' a target (the reference "
        f"{'does' if reference['dot_is_target'] else 'does not here'}), and the reference splits "
        "sentences on the substring ' .' and takes 25 tokens left, 24 right, ours on '.' tokens and "
        "25 either side, so contexts differ slightly."
        + (f" \\* Contexts of the {reference['timed_buckets']} timed reference buckets only."
           if reference["extrapolated"] else ""), "",
        "Wall seconds of every run: reference "
        + ", ".join(f"{s:.1f}" for s in reference["all_seconds"]) + "; "
        + "; ".join(cpu_label(n) + " " + ", ".join(f"{s:.1f}" for s in ours[n]["all_seconds"]) for n in cpus) + ".",
    ]
    return "\n".join(out) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=20_000_000,
                        help="at least this many corpus tokens, in whole copies of the demo corpus "
                             "(default: %(default)s)")
    parser.add_argument("--buckets", type=int, default=25,
                        help="number of context buckets, both sides (default: %(default)s)")
    parser.add_argument("--cpus", default="1,2",
                        help="comma-separated Ray CPU counts to time ours with (default: %(default)s)")
    parser.add_argument("--reference_buckets", type=int, default=None,
                        help="time only this many reference bucket passes and extrapolate (default: all)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per measurement; the median is reported (default: %(default)s)")
    parser.add_argument("--workdir", default=".cache/bench-preprocess",
                        help="directory for the corpus and every output (default: %(default)s)")
    parser.add_argument("--demo_corpus", default=None,
                        help="demo corpus directory (default: /tmp/demo-corpus or .cache/demo-corpus, "
                             "built there if missing)")
    parser.add_argument("--report", default="benchmarks/results/preprocess.md",
                        help="markdown report to write (default: %(default)s)")
    parser.add_argument("--_ours", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.buckets < 1 or args.repeat < 1:
        parser.error("--tokens, --buckets and --repeat must be >= 1")
    if args.reference_buckets is not None and args.reference_buckets < 1:
        parser.error("--reference_buckets must be >= 1")
    try:
        args.cpu_list = sorted({int(n) for n in args.cpus.split(",") if n.strip()})
    except ValueError:
        parser.error(f"--cpus: expected comma-separated integers, got {args.cpus!r}")
    if not args.cpu_list or min(args.cpu_list) < 1:
        parser.error("--cpus: give at least one CPU count, each >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workdir = Path(args.workdir).resolve()
    if args._ours is not None:
        ours_child(workdir, args.buckets, args._ours)
        return
    command = "python benchmarks/preprocess.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731

    say(f"building a corpus of >= {args.tokens:,} tokens in {workdir} ...")
    corpus = build_corpus(demo_corpus_dir(args.demo_corpus), workdir, args.tokens)
    say(f"corpus: {corpus['copies']} copies, {corpus['tokens']:,} tokens, {corpus['bytes'] / 1e6:.1f} MB")

    runs = []
    for i in range(args.repeat):
        runs.append(run_reference(workdir, args.buckets, args.reference_buckets))
        say(f"reference run {i + 1}/{args.repeat}: {runs[-1]['seconds']:.1f}s"
            + (" (extrapolated)" if runs[-1]["extrapolated"] else ""))
    reference = median_run(runs)

    ours = {}
    for n in args.cpu_list:
        runs = []
        for i in range(args.repeat):
            runs.append(run_ours(workdir, args.buckets, n, workdir / f"ours-{n}cpu-run{i}.log"))
            say(f"ours {n} CPU run {i + 1}/{args.repeat}: {runs[-1]['seconds']:.1f}s")
        ours[n] = median_run(runs)

    report = render_report(command, corpus, reference, ours, args.buckets, args.repeat)
    print(report)
    report_path = Path(args.report)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(report, encoding="utf-8")
    say(f"report written to {report_path}")


if __name__ == "__main__":
    main()
