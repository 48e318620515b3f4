"""A short fixed study against its committed numbers: a change that moves a result fails here, on this machine type.

The numbers are bit for bit the same on one machine type and torch build (idle or busy); another CPU
sums in another order. On another machine type the test is skipped, naming both. After a change that
is meant to move the numbers, rewrite the reference (`UPDATE_REFERENCE=1 pytest tests/test_reproducible.py`)
and regenerate the committed results with the README's command.
"""

import csv
import json
import os
import platform
from pathlib import Path

import pytest
import torch

from noise_robustness.cli import cli_main

REFERENCE = Path(__file__).parent / "reference" / "short_study.json"
STUDY = ["--scales=[0, 0.5, 2.0]", "--seeds=[0, 1]", "--epochs=2", "--trainer.limit_train_batches=30", "--data.noise_mode=resample"]


def machine() -> str:
    """The machine type: what decides the floating-point summation order of the kernels."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "?")
    return f"{platform.machine()} {cpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def test_a_short_fixed_study_reproduces_its_committed_numbers(data_dir, tmp_path):
    out = tmp_path / "study"
    cli_main(["sweep", *STUDY, f"--out={out}", f"--data.data_dir={data_dir}", "--trainer.enable_progress_bar=false"])
    with open(out / "results.csv", newline="") as f:
        rows = [{k: r[k] for k in ("noise_scale", "seed", "train_acc", "val_acc", "train_loss", "val_loss")} for r in csv.DictReader(f)]
    if os.environ.get("UPDATE_REFERENCE"):
        REFERENCE.write_text(json.dumps({"machine": machine(), "study": STUDY, "results": rows}, indent=1) + "\n")
    reference = json.loads(REFERENCE.read_text())
    assert reference["study"] == STUDY
    if reference["machine"] != machine():
        pytest.skip(f"the reference was made on {reference['machine']}; this is {machine()}")
    assert rows == reference["results"]
