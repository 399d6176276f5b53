"""Benchmark: batched BERTRAM inference (jobs.infer's way) vs one word at a time (the reference API's way).

    python benchmarks/infer.py --words 128 --contexts 8 --wait_quiet 900

All runs infer the same words from the same contexts (8 per word by default, taken from a
jobs.preprocess output) with the same trained model, in one process, one after another:

* one word at a time: `pipeline.infer.infer_vector` per word, what the reference
  `BertramWrapper.infer_vector` loop does: one forward pass over one word's contexts;
* batched: `pipeline.infer.infer_vectors` at a few `batch_contexts`, what each jobs.infer
  actor runs per block (several words per pass, passes packed by context length);
* the Ray job end to end: `jobs.infer` on a local Ray (one actor per CPU, one thread each;
  its time includes starting the actors and loading the model in each).

Prints words/s, the ratio to one word at a time, and the tokens the encoder computed
(padded) vs the real ones; writes the table to --report.
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pipeline import infer  # noqa: E402


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def wait_for_quiet(threshold: float, max_wait: float) -> bool:
    """Wait until the 1-minute load average is below `threshold`; False if it never was within `max_wait` s."""
    deadline = time.time() + max_wait
    while (load := float(loadavg().split()[0])) >= threshold:
        if time.time() >= deadline:
            say(f"load average still {load:.2f} after {max_wait:.0f} s: running on a busy machine")
            return False
        say(f"load average {load:.2f} >= {threshold}: waiting")
        time.sleep(30)
    return True


def choose_words(contexts_uri: str, n_words: int, n_contexts: int) -> dict[str, list[str]]:
    """The first `n_words` words with at least `n_contexts` usable contexts, and their first `n_contexts`."""
    chosen = {}
    for word, contexts in infer.read_contexts(contexts_uri).items():
        usable = infer.usable_contexts(word, contexts, n_contexts)
        if len(usable) == n_contexts:
            chosen[word] = usable
        if len(chosen) == n_words:
            return chosen
    raise SystemExit(f"only {len(chosen)} words have {n_contexts} usable contexts in {contexts_uri}")


class TokenCount:
    """Tokens the encoder computes (N * T, padding included) and the real ones, over all its calls."""

    def __init__(self, model) -> None:
        self.padded = self.real = 0
        model.encoder.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output) -> None:
        mask = kwargs["attention_mask"]  # (N, T)
        self.padded += mask.numel()
        self.real += int(mask.sum())

    def take(self) -> tuple[int, int]:
        counts, self.padded, self.real = (self.padded, self.real), 0, 0
        return counts


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (all processes), from /proc/stat."""
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def our_cpu_s() -> float:
    """CPU seconds of this process and its descendants (a local Ray's daemons and workers; exited ones
    count in their parent's children times), from /proc/<pid>/stat."""
    used, children = {}, defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            used[int(entry.name)] = sum(map(int, fields[11:15]))  # utime, stime, cutime, cstime
            children[int(fields[1])].append(int(entry.name))  # by parent
    ours, todo = [], [os.getpid()]
    while todo:
        ours.append(todo.pop())
        todo += children[ours[-1]]
    return sum(used.get(pid, 0) for pid in ours) / os.sysconf("SC_CLK_TCK")


def time_runs(fn, repeats: int) -> tuple[float, float, object]:
    """The median seconds of `repeats` calls of `fn`, the cores other processes kept busy meanwhile
    (Ray's workers, which run at nice 15, yield to them), and the last call's result."""
    seconds = []
    machine, ours, start_all = busy_cpu_s(), our_cpu_s(), time.perf_counter()
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - start)
    others = (busy_cpu_s() - machine) - (our_cpu_s() - ours)
    return statistics.median(seconds), max(0.0, others / (time.perf_counter() - start_all)), result


def run_ray_job(bertram: str, words: dict[str, list[str]], cpus: int) -> dict:
    """jobs.infer on a local Ray from a reference-format contexts file of `words`; returns its manifest."""
    from jobs.infer import InferConfig
    from jobs.infer import infer as infer_job

    with tempfile.TemporaryDirectory() as tmp:
        contexts = Path(tmp, "contexts.tsv")
        contexts.write_text("".join(w + "\t" + "\t".join(cs) + "\n" for w, cs in words.items()), encoding="utf-8")
        return infer_job(InferConfig(bertram=bertram, contexts=str(contexts), output=str(Path(tmp, "out")),
                                     num_cpus=cpus, write_text=False))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bertram", default="out/quality/fused", help="trained BERTRAM model (default: %(default)s)")
    parser.add_argument("--contexts_from", default="out/demo/preprocessed",
                        help="where the words and contexts come from (default: %(default)s)")
    parser.add_argument("--words", type=int, default=128, help="number of words (default: %(default)s)")
    parser.add_argument("--contexts", type=int, default=8, help="contexts per word (default: %(default)s)")
    parser.add_argument("--batch_contexts", default="16,64,256", help="batched runs (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per run, median kept")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in-process (0: torch's default)")
    parser.add_argument("--no_ray", action="store_true", help="skip the Ray job run")
    parser.add_argument("--wait_quiet", type=float, default=0, help="wait up to this many s for load < --quiet_load")
    parser.add_argument("--quiet_load", type=float, default=0.5, help="1-minute load average that counts as quiet")
    parser.add_argument("--report", default="benchmarks/results/infer.md", help="markdown file to write")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = infer.load(args.bertram)
    words = choose_words(args.contexts_from, args.words, args.contexts)
    tokens = TokenCount(model)
    first = next(iter(words))
    infer.infer_vector(model, tokenizer, first, words[first])  # warm-up
    tokens.take()
    quiet = wait_for_quiet(args.quiet_load, args.wait_quiet) if args.wait_quiet else None

    rows = []  # (run, seconds, padded tokens, real tokens, load before, cores busy with other processes)
    per_run = lambda counts: [c // args.repeats for c in counts]  # noqa: E731
    load = loadavg()
    say(f"one word at a time ({len(words)} words x {args.contexts} contexts), load {load}")
    single, others, _ = time_runs(lambda: [infer.infer_vector(model, tokenizer, w, cs) for w, cs in words.items()],
                               args.repeats)
    rows.append(("one word at a time (`infer_vector` per word)", single, *per_run(tokens.take()), load, others))
    reference = {w: infer.infer_vector(model, tokenizer, w, cs) for w, cs in words.items()}
    tokens.take()
    for batch in [int(b) for b in args.batch_contexts.split(",")]:
        load = loadavg()
        say(f"batched, batch_contexts {batch}, load {load}")
        seconds, others, _ = time_runs(lambda: infer.infer_vectors(model, tokenizer, words, batch_contexts=batch),
                                    args.repeats)
        rows.append((f"batched (`infer_vectors`, batch_contexts {batch})", seconds, *per_run(tokens.take()), load,
                     others))
        batched = infer.infer_vectors(model, tokenizer, words, batch_contexts=batch)
        tokens.take()
        worst = max(float((batched[w] - reference[w]).abs().max()) for w in words)
        assert worst < 1e-4, f"batched vectors differ from one at a time by {worst}"
    ray_note = ""
    if not args.no_ray:
        import ray

        cpus = torch.get_num_threads()
        say(f"jobs.infer on a local Ray with {cpus} CPUs: 2 words (start-up), then all, load {loadavg()}")
        _, others_start, start_up = time_runs(lambda: run_ray_job(args.bertram, dict(list(words.items())[:2]), cpus),
                                              1)
        load = loadavg()
        _, others, result = time_runs(lambda: run_ray_job(args.bertram, words, cpus), 1)
        ray.shutdown()
        seconds, start_up = result["timings"]["infer_s"], start_up["timings"]["infer_s"]
        name = (f"jobs.infer on Ray ({result['actors']} actors x 1 thread, batch_contexts "
                f"{result['config']['batch_contexts']})")
        rows.append((name, seconds, None, None, load, others))
        if seconds > start_up:  # else too few words to tell the start-up from the work
            rows.append((name + ", start-up of 2 words taken off", seconds - start_up, None, None, load,
                         max(others, others_start)))
        ray_note = (f" The Ray job's time is its actor pool's (`timings.infer_s`: starting {result['actors']} actors, "
                    f"loading the model in each, inferring); the same job on 2 words took {start_up:.1f} s, "
                    "which the last row takes off to estimate the steady rate.")

    command = "python benchmarks/infer.py " + " ".join(sys.argv[1:] if argv is None else argv)
    real_tokens = rows[0][3]
    lines = [
        "## Inference benchmark", "",
        f"Command: `{command}`", "",
        f"Machine: {torch.get_num_threads()} torch threads in-process, {platform.platform()}, torch "
        f"{torch.__version__}, CPU. 1-minute load average before each run in the table"
        + ("" if quiet is None else " (waited for a quiet machine)" if quiet else
           " (**busy machine**: did not get quiet)") + ".",
        f"Model: `{args.bertram}` ({model.config.mode}, {model.config.output_size}-d); "
        f"{len(words)} words x {args.contexts} contexts from `{args.contexts_from}`; median of {args.repeats}.", "",
        "| run | seconds | words/s | vs one word at a time | encoder tokens (padded) | padding | load before "
        "| others' cores |",
        "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, seconds, padded, real, load, others in rows:
        work = f"{padded:,} | {1 - real / padded:.0%}" if padded else "- | -"
        lines.append(f"| {name} | {seconds:.2f} | {len(words) / seconds:.2f} | {single / seconds:.2f}× | {work} | "
                     f"{load.split()[0]} | {'-' if others is None else f'{others:.2f}'} |")
    lines += ["", f"Real tokens: {real_tokens:,} (the same words and contexts in every run). Batched vectors equal "
              f"the one-at-a-time ones (max abs difference < 1e-4). Load before: the 1-minute load average when "
              "the run started (it includes the previous run); others' cores: CPU that other processes used "
              "during the run, on average (from /proc/stat, minus this process and its descendants, Ray's "
              f"included). Ray's workers run at nice 15 and yield the CPU to other processes.{ray_note}", ""]
    table = "\n".join(lines)
    print(table)
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(table)


if __name__ == "__main__":
    main()
