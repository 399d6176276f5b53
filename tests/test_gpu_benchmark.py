"""benchmarks/gpu.py runs end to end at a small size on the CPU (what a GPU run prints, for every part)."""

from __future__ import annotations

import importlib.util
import re

from tests.conftest import REPO


def test_the_gpu_benchmark_prints_every_part_on_a_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_benchmark", REPO / "benchmarks" / "gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "gpu.md"
    text = bench.main(["--size", "mini", "--device", "cpu", "--contexts", "256", "--ota_steps", "4",
                       "--ota_batches", "4,8", "--train_words", "4", "--train_steps", "1", "--group_tokens", "64", "--out", str(out)])
    assert out.read_text() == text
    for part in ("## Features pass", "## OTA", "## Training step, add mode"):
        assert part in text
    rates = [float(m.replace(",", "")) for m in re.findall(r"\| ([\d,]+) \| [\d.]+% \|", text)]
    assert len(rates) == 7 and all(r > 0 for r in rates)  # 3 features passes, 4 training steps: contexts/s, MFU
    assert len(re.findall(r"\| \d+ \| 4 \| [\d.]+ \|", text)) == 2  # OTA seconds per word at 2 batch sizes
