"""``python -m noise_robustness sweep``: the whole study in one command, resumable.

Trains every (model, σ, seed) as an ordinary ``fit`` run under ``<out>/tb_logs/``, one after the
other in this process (MNIST is read once), evaluates each trained model at every σ of the sweep,
and writes ``results.csv``, ``robustness.csv``, ``summary.md`` and the figures into ``<out>``.
Each run's rows are written atomically as soon as it finishes; rerunning the same command skips
finished runs, so an interrupted sweep loses at most the run in progress.
"""

import csv
import gc
import importlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

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
    parser.add_argument(
        "--run_index",
        type=Optional[int],
        default=None,
        help="Train only this run of the sweep (0-based), e.g. $SLURM_ARRAY_TASK_ID; a plain call afterwards gathers the report.",
    )
    parser.add_argument("--report_only", type=bool, default=False, help="Train nothing: gather the finished runs into the tables and figures.")
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
    """Splits ``argv`` into (sweep options, ``--key=value`` options passed to every run)."""
    own, passed = [], []
    tokens = iter(argv)
    for token in tokens:
        if not token.startswith(PASSTHROUGH):
            own.append(token)
        elif "=" in token:
            passed.append(token)
        else:
            passed.append(f"{token}={next(tokens, '')}")
    return own, passed


def write_atomic(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` atomically: a crash leaves the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def csv_text(columns: list[str], rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def gather(out: Path) -> tuple[list[dict], list[dict]]:
    """Rebuilds ``results.csv`` and ``robustness.csv`` from the finished runs' files; returns their rows."""
    runs = [json.loads(path.read_text()) for path in sorted((out / "runs").glob("*.json"))]
    runs.sort(key=lambda run: (run["result"]["model"], run["result"]["seed"], run["result"]["noise_scale"]))
    results = [run["result"] for run in runs]
    robustness = [row for run in runs for row in run["robustness"]]
    write_atomic(out / "results.csv", csv_text(RESULT_COLUMNS, results))
    write_atomic(out / "robustness.csv", csv_text(ROBUSTNESS_COLUMNS, robustness))
    return results, robustness


def evaluate_at(model: nn.Module, dm, noise_scale: float, batch_size: int = 1000) -> float:
    """Accuracy of ``model`` on the validation split with noise at ``noise_scale``."""
    images, labels = dm.noisy("val", noise_scale), dm.split_labels("val")
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
        "--trainer.devices=1",  # one process: "auto" would start DDP on a many-GPU machine
        f"--trainer.logger.init_args.save_dir={Path(args.out) / 'tb_logs'}",
        f"--trainer.logger.init_args.name={name}",
        *passed,
    ]


def check_options(args, passed: list[str]) -> tuple[list[float], dict[str, str]]:
    """Checks the sweep's options before anything runs; returns (σ list, {class path: model name})."""
    if not args.scales:
        raise ValueError("Expected `scales` to be a non-empty list of noise levels, but got []")
    scales = [check_noise_scale(s, "scales") for s in args.scales]
    if not args.seeds:
        raise ValueError("Expected `seeds` to be a non-empty list of integers, but got []")
    if args.epochs <= 0:
        raise ValueError(f"Expected `epochs` to be a positive integer, but got {args.epochs}")
    check_noise_mode(args.noise_mode)
    if not args.models:
        raise ValueError("Expected `models` to be a non-empty list of class paths, but got []")
    models = {path: resolve_model(path).__name__ for path in args.models}
    runs = len(models) * len(args.seeds) * len(scales)
    if args.run_index is not None and not 0 <= args.run_index < runs:
        raise ValueError(f"Expected `run_index` to be in [0, {runs}), the runs of this sweep, but got {args.run_index}")
    options = dict(token[2:].split("=", 1) for token in passed)
    for key in ("trainer.devices", "trainer.num_nodes"):
        if options.get(key, "1") != "1":
            raise ValueError(
                f"Expected `{key}` to be 1 in a sweep, which trains its runs one after another in one process, "
                f"but got {options[key]}. For many devices, run each fit with DDP, or the sweep as a SLURM job "
                "array (scripts/slurm_sweep_array.sh)"
            )
    return scales, models


def run_sweep(argv: list[str] | None = None) -> Path:
    """Runs (or resumes) the sweep described by ``argv``; returns its output folder."""
    own, passed = split_passthrough(sys.argv[1:] if argv is None else argv)
    sys.argv[1:] = []  # each run gets its arguments from the sweep, not from this command line
    parser = build_parser()
    args = parser.parse_args(own)
    try:
        scales, models = check_options(args, passed)
    except ValueError as err:
        parser.error(str(err))
    plan = [(path, s, seed) for path in models for seed in args.seeds for s in scales]
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    for number, (path, scale, seed) in enumerate(plan, 1):
        if args.run_index is not None and number - 1 != args.run_index:
            continue
        name = models[path]
        # One file per finished run, written last and atomically: it is the run's "finished" mark.
        done = out / "runs" / f"{name}_scale_{scale:g}_{args.noise_mode}_seed_{seed}_epochs_{args.epochs}.json"
        label = f"run {number}/{len(plan)}: {name}, noise_scale={scale:g}, noise_mode={args.noise_mode}, seed={seed}"
        if done.exists():
            print(f"[sweep] {label}: finished earlier, skipped", file=sys.stderr, flush=True)
            continue
        if args.report_only:
            print(f"[sweep] {label}: not finished, left out of the report", file=sys.stderr, flush=True)
            continue
        print(f"[sweep] {label}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        cli = cli_main(run_args(path, scale, seed, args, passed))
        seconds = time.perf_counter() - start
        metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
        result = [name, scale, args.noise_mode, seed, args.epochs, *(metrics[k] for k in ("train/acc", "val/acc", "train/loss", "val/loss")), round(seconds, 2)]
        robustness = [
            {"model": name, "seed": seed, "train_noise_scale": scale, "eval_noise_scale": s, "acc": evaluate_at(cli.model, cli.datamodule, s)}
            for s in scales
        ]
        write_atomic(done, json.dumps({"result": dict(zip(RESULT_COLUMNS, result)), "robustness": robustness}, indent=1))
        gather(out)
        del cli  # free this run's model and noisy data before the next run makes its own
        gc.collect()  # the Trainer, module and DataModule refer to each other

    results, robustness = gather(out)
    if args.run_index is not None:  # one task of a job array: the last, plain `sweep` call draws the figures
        return out
    # The preview's DataModule is built exactly as the runs' are (data options included), not trained.
    dm = cli_main(run_args(args.models[0], 0.0, args.seeds[0], args, passed)[1:], run=False).datamodule
    dm.prepare_data()
    dm.setup("fit")
    write_report(out, results, robustness, dm, scales)
    print(f"[sweep] done: {out}/summary.md, accuracy_vs_noise.png, noise_preview.png, robustness.png", file=sys.stderr)
    return out
