"""How much does Lightning cost? One MLP epoch of our real ``fit`` against a hand-written loop.

Times, interleaved (A B A B ...): (A) one training epoch of ``python -m noise_robustness fit``
(our DataModule and LightningModule through the Trainer, logging on, progress bar off) and (B) a
plain PyTorch eager loop with the same math: same model, RMSprop update, noisy images and batches
of 128 from a ``randperm``. Prints medians [min, max], A/B, the FLOP floor, validation's share of an
epoch, peak memory of a ``fit`` and of a ``sweep``, and the sweep's wall time against its epochs.

    python benchmarks/epoch_time.py                  # the full benchmark, about 3 minutes
    python benchmarks/epoch_time.py --pairs 1 --batches 5 --sweep_scales '[0, 1]'   # a smoke run
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # so that the runs can load benchmarks.epoch_timer by its class path

from benchmarks.epoch_timer import EpochTimer  # noqa: E402
from noise_robustness.cli import cli_main  # noqa: E402
from noise_robustness.models import DropoutMLP  # noqa: E402

MLP_FLOP_PER_IMAGE = 3 * 2 * (784 * 512 + 512 * 512 + 512 * 10)  # forward + backward (2x forward), multiply-adds x 2
SIGMA = 1.0


def shrink(batches: int | None) -> list[str]:
    return [f"--trainer.limit_train_batches={batches}", f"--trainer.limit_val_batches={batches}"] if batches else []


def lightning_epoch(data_dir: str, out: str, batches: int | None) -> tuple[float, float, object]:
    """(A): one epoch of the real fit; returns (training seconds, validation seconds, datamodule)."""
    cli = cli_main(
        [
            "fit",
            f"--data.noise_scale={SIGMA}",
            f"--data.data_dir={data_dir}",
            "--trainer.max_epochs=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.num_sanity_val_steps=0",
            f"--trainer.logger.init_args.save_dir={out}",
            "--trainer.callbacks+=benchmarks.epoch_timer.EpochTimer",
            *shrink(batches),
        ]
    )
    timer = next(cb for cb in cli.trainer.callbacks if isinstance(cb, EpochTimer))
    return timer.epochs[0]["train"], timer.epochs[0]["val"], cli.datamodule


def plain_epoch(images: torch.Tensor, labels: torch.Tensor, batches: int | None, seed: int = 0) -> float:
    """(B): the same epoch as a hand-written eager loop; returns its seconds."""
    torch.manual_seed(seed)
    model = DropoutMLP().train()
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.9, eps=1e-7)
    start = time.perf_counter()
    order = torch.randperm(len(labels)).split(128)[:batches]
    correct, loss_sum = torch.zeros(()), torch.zeros(())
    for idx in order:
        x, y = images[idx], labels[idx]
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        correct += (logits.argmax(1) == y).sum()  # the running train accuracy and loss, as (A) logs
        loss_sum += loss.detach() * len(y)
    (correct / len(labels)).item(), (loss_sum / len(labels)).item()
    return time.perf_counter() - start


def sgemm_gflops(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


# Linux counts the memory a process had when it was forked into its child's peak, so a child of this
# (large) process would report this process's size. A small launcher forks the command instead.
LAUNCHER = """
import os, subprocess, sys, time
start = time.perf_counter()
process = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
_, status, usage = os.wait4(process.pid, 0)
wall = time.perf_counter() - start
if os.waitstatus_to_exitcode(status):
    sys.exit(process.stderr.read().decode()[-3000:])
print(wall, usage.ru_maxrss)
"""


def run_measured(command: list[str]) -> tuple[float, float]:
    """Runs ``command``; returns (wall seconds, peak resident memory in GB) of that process."""
    result = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, *command], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr}")
    wall, kib = result.stdout.split()
    return float(wall), int(kib) / 1e6  # ru_maxrss is in KiB on Linux


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):7.3f} s  [{min(values):.3f}, {max(values):.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=5, help="interleaved (A, B) pairs")
    parser.add_argument("--batches", type=int, default=None, help="limit each epoch to this many batches (smoke runs)")
    parser.add_argument("--sweep_scales", default="[0, 0.1, 0.5, 1, 2, 4]", help="σ list of the timed 1-epoch sweep")
    parser.add_argument("--data_dir", default=str(REPO / "data"))
    args = parser.parse_args()
    sys.argv[1:] = []  # the in-process fits take their arguments from cli_main's list

    with tempfile.TemporaryDirectory() as tmp:
        a_train, a_val, b_train = [], [], []
        dm = None
        for _ in range(args.pairs):
            train, val, dm = lightning_epoch(args.data_dir, tmp, args.batches)
            a_train.append(train)
            a_val.append(val)
            b_train.append(plain_epoch(dm.train_images(0), dm.split_labels("train"), args.batches))
        gflops = sgemm_gflops()
        images = 128 * args.batches if args.batches else len(dm.split_labels("train"))
        floor = MLP_FLOP_PER_IMAGE * images / (gflops * 1e9)

        fit_command = [sys.executable, "-m", "noise_robustness", "fit", f"--data.data_dir={args.data_dir}", "--trainer.max_epochs=1",
                       "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp}/fit", *shrink(args.batches)]  # fmt: skip
        _, fit_rss = run_measured(fit_command)
        epochs_log = Path(tmp) / "sweep_epochs.jsonl"
        sweep_command = [sys.executable, "-m", "noise_robustness", "sweep", f"--scales={args.sweep_scales}", "--epochs=1", f"--out={tmp}/sweep",
                         f"--data.data_dir={args.data_dir}", "--trainer.enable_progress_bar=false",
                         "--trainer.callbacks+=benchmarks.epoch_timer.EpochTimer", f"--trainer.callbacks.log_file={epochs_log}",
                         *shrink(args.batches)]  # fmt: skip
        sweep_wall, sweep_rss = run_measured(sweep_command)
        sweep_epochs = [json.loads(line) for line in epochs_log.read_text().splitlines()]
        epoch_sum = sum(e["train"] + e["val"] for e in sweep_epochs)

    a, b = statistics.median(a_train), statistics.median(b_train)
    ratios = [x / y for x, y in zip(a_train, b_train)]  # per pair: both halves saw the same machine state
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; {images} images an epoch, σ = {SIGMA}")
    print(f"A  Lightning fit, training epoch   {spread(a_train)}")
    print(f"B  plain PyTorch loop              {spread(b_train)}")
    print(f"A/B                                {statistics.median(ratios):.3f}   median of per-pair ratios [{min(ratios):.3f}, {max(ratios):.3f}]  (target <= 1.05)")
    print(f"FLOP floor                         {floor:.3f} s at {gflops:.0f} GFLOP/s SGEMM;  A/floor {a / floor:.2f}  B/floor {b / floor:.2f}")
    print(f"validation (A)                     {spread(a_val)}  = {statistics.median(a_val) / a:.1%} of a training epoch (target <= 10%)")
    print(f"peak memory, fit                   {fit_rss:.2f} GB   (target <= 1.5)")
    print(f"sweep, {len(sweep_epochs)} runs x 1 epoch            wall {sweep_wall:.1f} s, its epochs {epoch_sum:.1f} s, ratio {sweep_wall / epoch_sum:.2f}   (target <= 1.25)")
    print(f"peak memory, sweep                 {sweep_rss:.2f} GB   (target <= 1.5)")


if __name__ == "__main__":
    main()
