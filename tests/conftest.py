"""Shared fixtures: a local Ray, a real S3-compatible endpoint (moto) on 127.0.0.1, small corpora."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray for all stage tests. 4 logical CPUs on 2 cores: actor pools and a training worker
    with its data tasks fit at once (with 2, a worker and the data tasks feeding it can starve each other).

    Started after the S3 endpoint so that its workers inherit AWS_ENDPOINT_URL and the
    test credentials, as workers on a cluster get them from the runtime_env.
    """
    import ray

    if ray.is_initialized() and ray.cluster_resources().get("CPU", 0) < 4:
        ray.shutdown()  # a job called in-process started its own (2 CPUs here): these tests need the 4
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, object_store_memory=512 * 1024**2)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 and the environment that points boto3/pyarrow/Ray at it."""
    port = _free_port()
    exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    deadline = time.time() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start")
            time.sleep(0.2)
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket on the moto server; yields its s3:// URI."""
    import boto3

    name = "t-" + request.node.name.lower().replace("_", "-")[:50].strip("-")
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


# A tiny vocabulary with known frequencies; lines are sentences of 4..12 words.
_WORDS = ["alpha", "beta", "gamma", "delta", "kumquat", "river", "stone", "light", "quick", "table"]


def make_corpus(path: Path, n_lines: int = 3000, seed: int = 0, files: int = 3) -> list[str]:
    """Write a deterministic corpus of `files` .txt files under `path`; returns all its lines."""
    import random

    rng = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS[:5]) if rng.random() < 0.5 else rng.choice(_WORDS) for _ in range(rng.randint(4, 12))]
        if rng.random() < 0.3:
            words.insert(rng.randint(1, len(words) - 1), ".")
        lines.append(" ".join(words) + " .")
    per = -(-n_lines // files)
    for i in range(files):
        (path / f"part-{i}.txt").write_text("\n".join(lines[i * per:(i + 1) * per]) + "\n", encoding="utf-8")
    return lines


@pytest.fixture
def small_corpus(tmp_path) -> tuple[Path, list[str]]:
    corpus = tmp_path / "corpus"
    return corpus, make_corpus(corpus)


# Tiny language models for unit tests (hidden 32, 2 layers), built locally: no network.
TINY_WORDS = ["the", "a", "is", "of", "and", "fruit", "tree", "river", "stone", "kum", "quat", "apple",
              "orange", "small", "sweet", "grows", "on", "in", "green", "light"]


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A tiny random BERT + WordPiece tokenizer saved to a directory (a valid `base_model`)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ":", '"', ".", ",", "!"] + TINY_WORDS + \
        ["##s", "##ing", "##quat", "##ly", "##e", "##r"]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(out)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=128)
    BertModel(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_roberta(tmp_path_factory) -> Path:
    """A tiny random RoBERTa + byte-level BPE tokenizer trained on a few sentences."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast

    out = tmp_path_factory.mktemp("tiny-roberta")
    bpe = ByteLevelBPETokenizer()
    text = [" ".join(TINY_WORDS) + ' : " , .'] * 20
    bpe.train_from_iterator(text, vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    vocab_file, merges_file = bpe.save_model(str(out))
    merges = [tuple(m.split()) for m in open(merges_file, encoding="utf-8").read().splitlines()
              if m and not m.startswith("#")]
    tokenizer = RobertaTokenizerFast(vocab=json.loads(open(vocab_file, encoding="utf-8").read()), merges=merges)
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=37, max_position_embeddings=130)
    RobertaModel(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_families(tmp_path_factory):
    """family -> directory of its tiny random masked-LM model (tests/families.py), built on first use."""
    from tests.families import build

    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return built[family]

    return get
