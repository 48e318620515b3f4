"""Fixtures and helpers every test file shares: real MNIST once per session, and real commands shrunk to seconds."""

import contextlib
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from noise_robustness.cli import cli_main
from noise_robustness.data import mnist
from noise_robustness.engine.precision import fast_precision

os.environ.setdefault("PL_DISABLE_FORK", "1")
# Training in bf16 is fast where the hardware multiplies bf16 (AVX512-BF16, AMX, a recent GPU) and ~100x slower where
# torch emulates it (an AVX2-only CPU). Tests that train through the Trainer in bf16 run where it is native; where it
# is not, `precision auto` trains in fp32 and the same properties are checked there by the fp32 tests.
needs_native_bf16 = pytest.mark.skipif(
    fast_precision() != "bf16-mixed", reason="trains in bf16, which this machine emulates (~100x slower than native)"
)
METRICS = ("train_acc", "val_acc", "train_loss", "val_loss")  # a member's final metrics in results.csv


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """MNIST unpacked once per test session from the files the package ships."""
    return str(mnist.prepare(tmp_path_factory.mktemp("data")))


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    """In-process CLI calls get their arguments from ``args``, not from pytest's command line."""
    monkeypatch.setattr("sys.argv", ["noise_robustness"])


def short_run(data_dir, tmp_path, subcommand: str, *args: str, batches: int = 2) -> list[str]:
    """Arguments that shrink a real run to a few batches, writing under ``tmp_path``; ``args`` come last and win."""
    return [
        subcommand,
        f"--data.data_dir={data_dir}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'tb_logs'}",
        "--trainer.max_epochs=1",
        f"--trainer.limit_train_batches={batches}",
        f"--trainer.limit_val_batches={batches}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *args,
    ]


def tiny(data_dir, out: Path, *args: str, scales: str = "[0, 1.0]", seeds: str = "[0]", batches: int | None = 5):
    """A real ``sweep`` of one epoch of ``batches`` batches into ``out``; ``args`` come last and win."""
    return [
        "sweep",
        f"--scales={scales}",
        f"--seeds={seeds}",
        "--epochs=1",
        f"--out={out}",
        f"--data.data_dir={data_dir}",
        *([f"--trainer.limit_train_batches={batches}"] if batches else []),
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *args,
    ]


def rows(path: Path) -> list[dict[str, str]]:
    """A csv file's rows, each with its file's header under ``_columns``."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames is not None
        return [r | {"_columns": reader.fieldnames} for r in reader]


def member_rows(out: Path) -> dict[tuple[float, int], dict[str, str]]:
    """A study's ``results.csv`` rows by (σ, seed)."""
    return {(float(r["noise_scale"]), int(r["seed"])): r for r in rows(out / "results.csv")}


def events(run_dir: Path) -> EventAccumulator:
    """Everything a TensorBoard run holds, read as TensorBoard reads it."""
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def exits_with_error(args: list[str], capsys) -> str:
    """Runs the CLI in-process; asserts a non-zero exit; returns what it wrote to stderr."""
    with pytest.raises(SystemExit) as exit:
        cli_main(args)
    assert exit.value.code not in (0, None)
    return capsys.readouterr().err


def fails_cleanly(args: list[str], cwd: Path) -> str:
    """Runs the real command line; asserts a non-zero exit without a traceback; returns stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "noise_robustness", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return result.stderr


@torch.inference_mode()
def independent_accuracy(model, batches, precision=None) -> torch.Tensor:
    """``[K]`` accuracy of each member over ``batches``, dropout off: counted here, outside Lightning's loops, in
    ``precision`` (a trainer's ``precision_plugin``: the products in the precision the run used) or fp32."""
    model.eval()
    with precision.forward_context() if precision else contextlib.nullcontext():  # no grad: inference mode
        correct = sum((model(images).argmax(-1) == labels).sum(dim=1) for images, labels in batches)
    count = sum(labels.shape[1] for _, labels in batches)
    return correct.double() / count
