"""A smoke run of the benchmark: its output format only (timings are for the full run, not for tests)."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parents[1]
LINES = [
    r"machine: \d+ cores, torch \S+, \d+ threads; 640 images an epoch, σ = 1\.0",
    r"A  Lightning fit, training epoch +median +[\d.]+ s  \[[\d.]+, [\d.]+\]",
    r"B  plain PyTorch loop +median +[\d.]+ s  \[[\d.]+, [\d.]+\]",
    r"A/B +[\d.]+   median of per-pair ratios \[[\d.]+, [\d.]+\]  \(target <= 1\.05\)",
    r"FLOP floor +[\d.]+ s at \d+ GFLOP/s SGEMM;  A/floor [\d.]+  B/floor [\d.]+",
    r"validation \(A\) +median +[\d.]+ s  \[[\d.]+, [\d.]+\]  = [\d.]+% of a training epoch \(target <= 10%\)",
    r"peak memory, fit +[\d.]+ GB   \(target <= 1\.5\)",
    r"sweep, 2 runs x 1 epoch +wall [\d.]+ s, its epochs [\d.]+ s, ratio [\d.]+   \(target <= 1\.25\)",
    r"peak memory, sweep +[\d.]+ GB   \(target <= 1\.5\)",
]


def test_the_benchmark_prints_every_figure(data_dir):
    command = [sys.executable, "benchmarks/epoch_time.py", "--pairs=1", "--batches=5", "--sweep_scales=[0, 1]", f"--data_dir={data_dir}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = result.stdout.strip().splitlines()[-len(LINES) :]
    for line, pattern in zip(report, LINES):
        assert re.fullmatch(pattern, line), (line, pattern)
