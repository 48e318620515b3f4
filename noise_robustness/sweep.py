"""``python -m noise_robustness sweep``: the whole study in one command, resumable.

Trains every (model, σ, seed) as an ordinary ``fit`` run under ``<out>/tb_logs/``, one after the
other in this process (MNIST is read once), evaluates each trained model at every σ of the sweep,
and writes ``results.csv``, ``robustness.csv``, ``summary.md`` and the figures into ``<out>``.
Each run's rows are written atomically as soon as it finishes; rerunning the same command skips
finished runs, so an interrupted sweep loses at most the run in progress.
"""

import csv
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from torch import nn

from noise_robustness.cli import cli_main
from noise_robustness.noise import check_noise_mode, check_noise_scale
from noise_robustness.report import write_report

RESULT_COLUMNS = ["model", "noise_scale", "noise_mode", "seed", "epochs", "train_acc", "val_acc", "train_loss", "val_loss", "seconds"]
ROBUSTNESS_COLUMNS = ["model", "seed", "train_noise_scale", "eval_noise_scale", "acc"]
PASSTHROUGH = ("--trainer.", "--data.", "--model.", "--seed_everything", "--optimizer", "--lr_scheduler")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m noise_robustness sweep",
        description=(
            "Train every model at every noise level and seed, then tabulate and plot train and validation "
            "accuracy against σ. Any other fit option (--trainer.*, --data.*, --model.*) is passed to every run, "
            "e.g. --trainer.limit_train_batches 20."
        ),
    )
    parser.add_argument("--config", action=ActionConfigFile, help="A sweep YAML holding any of the options below.")
    parser.add_argument("--scales", type=list[float], default=[0.0, 0.1, 0.5, 1.0, 2.0, 4.0], help="Noise levels σ, in units of the [0, 1] pixel range.")
    parser.add_argument("--seeds", type=list[int], default=[0], help="Seeds; each sets the run's seed_everything and noise_seed.")
    parser.add_argument("--epochs", type=int, default=20, help="Epochs per run.")
    parser.add_argument("--models", type=list[str], default=["noise_robustness.models.DropoutMLP"], help="Networks (class paths of nn.Modules).")
    parser.add_argument("--noise_mode", type=str, default="fixed", help="fixed (one draw per image) or resample (a new draw each epoch).")
    parser.add_argument("--clip", type=bool, default=False, help="Clip noisy pixels to [0, 1].")
    parser.add_argument("--out", type=str, default="sweeps/noise_sweep", help="Output folder; rerun with the same one to resume.")
    return parser


def resolve_model(path: str) -> type[nn.Module]:
    """The ``nn.Module`` class at ``path`` (``package.module.Class``, or a class of ``noise_robustness.models``)."""
    module_name, _, class_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name or "noise_robustness.models"), class_name)
    except (ImportError, AttributeError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"Expected each of `models` to be the class path of an nn.Module, but got {path!r}")
    return cls


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """Splits ``argv`` into (sweep options, options passed to every run)."""
    own, passed = [], []
    tokens = iter(argv)
    for token in tokens:
        if token.startswith(PASSTHROUGH):
            passed.append(token)
            if "=" not in token:
                passed.append(next(tokens, ""))
        else:
            own.append(token)
    return own, passed


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, columns: list[str], rows: list[dict]) -> None:
    """Writes a CSV atomically: a crash leaves the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_key(model: str, noise_scale: float, noise_mode: str, seed: int, epochs: int) -> tuple:
    return (model, float(noise_scale), noise_mode, int(seed), int(epochs))


def evaluate_at(model: nn.Module, dm, noise_scale: float, batch_size: int = 1000) -> float:
    """Accuracy of ``model`` on the validation split with noise at ``noise_scale``."""
    images, labels = dm.noisy("val", noise_scale), dm._labels("val")
    device = next(model.parameters()).device
    model.eval()
    with torch.inference_mode():
        correct = sum((model(images[i : i + batch_size].to(device)).argmax(1) == labels[i : i + batch_size].to(device)).sum().item() for i in range(0, len(labels), batch_size))
    return correct / len(labels)


def run_args(model: str, scale: float, seed: int, args, passed: list[str]) -> list[str]:
    """The ``fit`` arguments of one run of the sweep."""
    name = f"{model.rpartition('.')[2]}_scale_{scale:g}_seed_{seed}"
    return [
        "fit",
        f"--model.net={model}",
        f"--data.noise_scale={scale}",
        f"--data.noise_mode={args.noise_mode}",
        f"--data.clip={args.clip}",
        f"--data.noise_seed={seed}",
        f"--seed_everything={seed}",
        f"--trainer.max_epochs={args.epochs}",
        f"--trainer.logger.init_args.save_dir={Path(args.out) / 'tb_logs'}",
        f"--trainer.logger.init_args.name={name}",
        *passed,
    ]


def run_sweep(argv: list[str] | None = None) -> Path:
    """Runs (or resumes) the sweep described by ``argv``; returns its output folder."""
    own, passed = split_passthrough(sys.argv[1:] if argv is None else argv)
    sys.argv[1:] = []  # each run gets its arguments from the sweep, not from this command line
    parser = build_parser()
    args = parser.parse_args(own)
    try:
        if not args.scales:
            raise ValueError("Expected `scales` to be a non-empty list of noise levels, but got []")
        scales = [check_noise_scale(s, "scales") for s in args.scales]
        if not args.seeds:
            raise ValueError("Expected `seeds` to be a non-empty list of integers, but got []")
        if args.epochs <= 0:
            raise ValueError(f"Expected `epochs` to be a positive integer, but got {args.epochs}")
        check_noise_mode(args.noise_mode)
        models = {path: resolve_model(path).__name__ for path in args.models}
        if not models:
            raise ValueError("Expected `models` to be a non-empty list of class paths, but got []")
    except ValueError as err:
        parser.error(str(err))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_csv, robustness_csv = out / "results.csv", out / "robustness.csv"
    plan = [(path, s, seed) for path in models for seed in args.seeds for s in scales]
    for number, (path, scale, seed) in enumerate(plan, 1):
        name = models[path]
        key = run_key(name, scale, args.noise_mode, seed, args.epochs)
        label = f"run {number}/{len(plan)}: {name}, noise_scale={scale:g}, noise_mode={args.noise_mode}, seed={seed}"
        results = read_rows(results_csv)
        if any(run_key(r["model"], r["noise_scale"], r["noise_mode"], r["seed"], r["epochs"]) == key for r in results):
            print(f"[sweep] {label}: finished earlier, skipped", file=sys.stderr, flush=True)
            continue
        print(f"[sweep] {label}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        cli = cli_main(run_args(path, scale, seed, args, passed))
        seconds = time.perf_counter() - start
        metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
        robustness = [
            r for r in read_rows(robustness_csv) if (r["model"], int(r["seed"]), float(r["train_noise_scale"])) != (name, seed, scale)
        ] + [
            {"model": name, "seed": seed, "train_noise_scale": scale, "eval_noise_scale": s, "acc": evaluate_at(cli.model, cli.datamodule, s)}
            for s in scales
        ]
        write_rows(robustness_csv, ROBUSTNESS_COLUMNS, robustness)
        row = dict(zip(RESULT_COLUMNS, (*key, metrics["train/acc"], metrics["val/acc"], metrics["train/loss"], metrics["val/loss"], round(seconds, 2))))
        write_rows(results_csv, RESULT_COLUMNS, read_rows(results_csv) + [row])  # the run's "finished" mark, last

    # The preview's DataModule is built exactly as the runs' are (data options included), not trained.
    dm = cli_main(run_args(args.models[0], 0.0, args.seeds[0], args, passed)[1:], run=False).datamodule
    dm.prepare_data()
    dm.setup("fit")
    write_report(out, read_rows(results_csv), read_rows(robustness_csv), dm, scales)
    print(f"[sweep] done: {out}/summary.md, accuracy_vs_noise.png, noise_preview.png, robustness.png", file=sys.stderr)
    return out
