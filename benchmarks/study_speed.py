"""How fast is the study? Our member-epoch against a plain PyTorch loop, the FLOP floors, ops per step, whole studies.

Times, interleaved (A A' B B' A A' B B' ...):
  (A) one training epoch of the default study's 6 members side by side, through the real CLI
      (``fit --scales [0, 0.1, 0.5, 1, 2, 4]``: our DataModule, LightningModule and Trainer, the default
      recipe: precision auto, counter masks, the eager RMSprop step), divided by 6: one member-epoch;
  (A') the same with the fast recipe (``configs/fast.yaml``: the step's elementwise passes compiled);
  (B) the obvious hand-written loop for one network: ``DropoutMLP`` with torch's own ``nn.Dropout``
      and ``torch.optim.RMSprop``, the same noisy images, ``randperm`` batches of 128;
  (B') the same loop under ``torch.autocast(dtype=torch.bfloat16)``: what bf16 gives a plain loop;
  (C) when a Python with TensorFlow is given (``--keras_python``), the original notebook's Keras
      recipe on the same images (``benchmarks/keras_epoch.py``, in a child process).
Then this run's fp32 and bf16 rates of the study's own batched product (18 members' first layer), the
FLOP floors at both, the aten operations one training step dispatches at K = 1, 6 and 18 members
(``benchmarks/op_count.py``), and whole studies run as users run them (``python -m noise_robustness
sweep ...`` in a child process): wall time, from the command to the figures, peak memory, and the
main job (``three``; ``fast``, its fast recipe; ``first``, its first recipe) against its floors, and
whether the main job's ``results.csv`` is the committed one byte for byte.

    python benchmarks/study_speed.py                  # pairs, the main job and its fast recipe
    python benchmarks/study_speed.py --studies one    # pairs and the 1-seed study
    python benchmarks/study_speed.py --studies three,fast,first --pairs 3 --cnn_batches 0   # the main job, 3 recipes
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
import yaml
from torch.nn import functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # so that the runs can load benchmarks.epoch_timer by its class path

from benchmarks.epoch_timer import EpochTimer  # noqa: E402
from benchmarks.op_count import STUDIES_BY_K, ops_per_step  # noqa: E402
from noise_robustness.cli import cli_main  # noqa: E402
from noise_robustness.commands import STUDY_SCALES, STUDY_SEEDS  # noqa: E402
from noise_robustness.engine.memory import SWITCH, tune_allocator  # noqa: E402
from noise_robustness.models import DropoutMLP  # noqa: E402

MLP_FLOP_PER_IMAGE = 3 * 2 * (784 * 512 + 512 * 512 + 512 * 10)  # forward + backward (2x forward), multiply-adds x 2
# The main job: 18 members x 20 epochs of 60,000 training images, validation (10,000) after each epoch,
# and the robustness pass (each member at 6 σ on the validation split); forward passes are a third of a step.
MAIN_JOB_FLOP = 18 * MLP_FLOP_PER_IMAGE * (20 * 60_000 + (20 + 6) * 10_000 / 3)
CNN_FLOP_PER_IMAGE = 3 * 2 * (26 * 26 * 32 * 9 + 24 * 24 * 64 * 32 * 9 + 9216 * 128 + 128 * 10)
SIGMA = 1.0  # the plain loop's noise level


def recipe_options(config: Path) -> list[str]:
    """A recipe's config file (``configs/fast.yaml``) as command-line options, its ``out`` left out."""

    def flat(tree: dict, prefix: str = "") -> list[str]:
        options = []
        for key, value in tree.items():
            if isinstance(value, dict):
                options += flat(value, f"{prefix}{key}.")
            elif prefix or key != "out":
                options.append(f"--{prefix}{key}={json.dumps(value) if isinstance(value, bool) else value}")
        return options

    return flat(yaml.safe_load(config.read_text()))


# The fast recipe: the default (precision auto, one mask draw a step) with the step's elementwise passes compiled
FAST = recipe_options(REPO / "configs" / "fast.yaml")
FIRST = recipe_options(REPO / "configs" / "first_recipe.yaml")  # fp32, a dropout generator per member: the reference
DEFAULT_ALLOCATOR = {SWITCH: "default"}  # malloc as it comes (noise_robustness.engine.memory)
STUDIES = {  # name: (extra sweep options, target seconds (None: at most BF16_TARGET x the bf16 floor), environment)
    "one": (["--seeds=[0]"], None, {}),
    "three": ([], None, {}),  # the main job
    "fast": (FAST, None, {}),  # the main job with the fast recipe
    "first": (FIRST, 720, {}),  # the main job in the first recipe
    "three_default_allocator": ([], None, DEFAULT_ALLOCATOR),  # the main job without tune_allocator's settings
}
BF16_TARGET = 2.4  # issue 16: the main job at most 2.4x its floor at this CPU's bf16 rate
MAIN_JOB_RESULTS = REPO / "docs" / "results" / "noise_sweep" / "results.csv"  # the README's main job


def member_epoch(
    data_dir: str,
    out: str,
    net: str = "noise_robustness.models.DropoutMLP",
    batches: int | None = None,
    options: tuple[str, ...] = (),
    seeds: list[int] = [0],
) -> tuple[float, float]:
    """(A): one training epoch of the default study's members, one per σ (A': with the fast recipe's ``options``),
    or of every (σ, seed) of ``seeds``.

    Returns:
        (seconds per member-epoch, validation seconds).
    """
    cli = cli_main(
        [
            "fit",
            f"--scales={STUDY_SCALES}",
            f"--seeds={seeds}",
            f"--model.net={net}",
            f"--data.data_dir={data_dir}",
            "--trainer.max_epochs=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.logger.init_args.save_dir={out}",
            "--trainer.callbacks+=benchmarks.epoch_timer.EpochTimer",
            *([f"--trainer.limit_train_batches={batches}"] if batches else []),
            *options,
        ]
    )
    timer = next(cb for cb in cli.trainer.callbacks if isinstance(cb, EpochTimer))
    return timer.epochs[0]["train"] / (len(STUDY_SCALES) * len(seeds)), timer.epochs[0]["val"]


def plain_epoch(images: torch.Tensor, labels: torch.Tensor, seed: int = 0, bf16: bool = False) -> float:
    """(B), or (B') with ``bf16``: one epoch of the obvious eager loop; returns its seconds."""
    if bf16:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return plain_epoch(images, labels, seed)
    torch.manual_seed(seed)
    model = DropoutMLP().train()
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.9, eps=1e-7)
    start = time.perf_counter()
    correct, loss_sum = torch.zeros(()), torch.zeros(())
    for idx in torch.randperm(len(labels)).split(128):
        x, y = images[idx], labels[idx]
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        correct += (logits.argmax(1) == y).sum()  # the running train accuracy and loss, as (A) keeps
        loss_sum += loss.detach() * len(y)
    (correct / len(labels)).item(), (loss_sum / len(labels)).item()
    return time.perf_counter() - start


def keras_epoch(python: str, images: torch.Tensor, labels: torch.Tensor, folder: str) -> float:
    """(C): one epoch of the Keras recipe (after a warm-up epoch), in a child process; returns its seconds."""
    import numpy as np

    paths = [Path(folder, "keras_images.npy"), Path(folder, "keras_labels.npy")]
    if not paths[0].exists():
        np.save(paths[0], images.flatten(1).numpy())
        np.save(paths[1], labels.numpy())
    command = [python, str(REPO / "benchmarks" / "keras_epoch.py"), *map(str, paths), "1"]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if result.returncode:
        raise RuntimeError(f"the Keras recipe failed:\n{result.stderr[-3000:]}")
    return float(result.stdout.split()[-1])


def bmm_gflops(dtype: torch.dtype, repeats: int = 30) -> float:
    """The rate of the study's own batched product, ``[18, 128, 784] x [18, 784, 512]``, in ``dtype``."""
    a, b = torch.randn(18, 128, 784, dtype=dtype), torch.randn(18, 784, 512, dtype=dtype)
    for _ in range(5):
        torch.bmm(a, b)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            torch.bmm(a, b)
        times.append((time.perf_counter() - start) / repeats)
    return 2 * 18 * 128 * 784 * 512 / statistics.median(times) / 1e9


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


def run_measured(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Runs ``command`` with ``env`` added to the environment; returns (wall seconds, peak resident memory in GB)
    of that process."""
    result = subprocess.run(
        [sys.executable, "-S", "-c", LAUNCHER, *command],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
    )
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr}")
    wall, kib = result.stdout.split()
    return float(wall), int(kib) / 1e6  # ru_maxrss is in KiB on Linux


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):7.3f} s  [{min(values):.3f}, {max(values):.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=5, help="interleaved (A, B) pairs")
    parser.add_argument(
        "--studies",
        default="three,fast",
        help="whole studies to time: one (1 seed), three (the main job), fast (its fast recipe), first (its first "
        "recipe), three_default_allocator (the main job, the allocator as it comes), or none",
    )
    parser.add_argument(
        "--cnn_batches", type=int, default=100, help="training batches of the timed CNN member-epoch (0: skip)"
    )
    parser.add_argument("--data_dir", default=str(REPO / "data"))
    parser.add_argument(
        "--keras_python", default=None, help="a Python with TensorFlow: also time the original Keras recipe (C)"
    )
    args = parser.parse_args()
    tune_allocator()  # as `python -m noise_robustness` does: the in-process fits run so too
    sys.argv[1:] = []  # the in-process fits take their arguments from cli_main's list

    from noise_robustness.data.datamodule import NoisyMNISTDataModule

    dm = NoisyMNISTDataModule(scales=[SIGMA], data_dir=args.data_dir)
    dm.prepare_data()
    dm.setup("fit")
    images, labels = dm.noisy_images("train", {0: torch.arange(dm.split_size("train"))})
    images, labels = images[0], labels[0]
    print(
        f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{len(labels)} images an epoch",
        flush=True,
    )

    with tempfile.TemporaryDirectory() as tmp:
        a_train, a_val, fast_train, b_train, b16_train, c_train = [], [], [], [], [], []
        for _ in range(args.pairs):
            train, val = member_epoch(args.data_dir, tmp)
            a_train.append(train)
            a_val.append(val)
            fast_train.append(member_epoch(args.data_dir, tmp, options=tuple(FAST))[0])
            b_train.append(plain_epoch(images, labels))
            b16_train.append(plain_epoch(images, labels, bf16=True))
            if args.keras_python:
                c_train.append(keras_epoch(args.keras_python, images, labels, tmp))
        gflops, bf16_gflops = bmm_gflops(torch.float32), bmm_gflops(torch.bfloat16)
        print(f"rates of the study's batched product  fp32 {gflops:.0f} GFLOP/s, bf16 {bf16_gflops:.0f} GFLOP/s")
        floor = MLP_FLOP_PER_IMAGE * len(labels) / (gflops * 1e9)
        a, b = statistics.median(a_train), statistics.median(b_train)
        ratios = [x / y for x, y in zip(a_train, b_train)]  # per pair: both halves saw the same machine state
        ratios16 = [x / y for x, y in zip(a_train, b16_train)]
        print(f"A  our member-epoch (6 members / 6)  {spread(a_train)}")
        print(f"A' the same, the fast recipe         {spread(fast_train)}")
        print(f"B  plain PyTorch loop, one network   {spread(b_train)}")
        print(f"B' the same loop under bf16 autocast {spread(b16_train)}   A/B' {statistics.median(ratios16):.3f}")
        fast_ratios = [(x / y, x / z) for x, y, z in zip(fast_train, b_train, b16_train)]
        print(
            f"A'/B, A'/B'                          {statistics.median(r for r, _ in fast_ratios):.3f}, "
            f"{statistics.median(r for _, r in fast_ratios):.3f}   medians of per-round ratios"
        )
        if c_train:
            a_over_c = statistics.median([x / y for x, y in zip(a_train, c_train)])
            print(f"C  the original Keras recipe         {spread(c_train)}   A/C {a_over_c:.3f}")
        else:
            print("C  the original Keras recipe         not timed: pass --keras_python (a Python with TensorFlow)")
        print(
            f"A/B                                  {statistics.median(ratios):.3f}   "
            f"median of per-pair ratios [{min(ratios):.3f}, {max(ratios):.3f}]  (target <= 1.0)"
        )
        print(
            f"FLOP floor of a member-epoch         {floor:.3f} s at the fp32 rate;  "
            f"A/floor {a / floor:.2f}  B/floor {b / floor:.2f}"
        )
        print(
            f"validation of 6 members (A)          {spread(a_val)}  "
            f"= {statistics.median(a_val) / (6 * a):.1%} of their training epoch",
            flush=True,
        )
        if args.cnn_batches:
            # the study's 18 members side by side: a step of 6 takes well under a third of one of 18 (caches)
            cnn, _ = member_epoch(
                args.data_dir, tmp, "noise_robustness.models.KerasCNN", args.cnn_batches, seeds=STUDY_SEEDS
            )
            epoch = cnn * len(labels) / (128 * args.cnn_batches)
            floors = [CNN_FLOP_PER_IMAGE * len(labels) / (rate * 1e9) for rate in (gflops, bf16_gflops)]
            print(
                f"CNN member-epoch (18 members, from {args.cnn_batches} batches)  {epoch:.1f} s; floor "
                f"{floors[0]:.1f} s at the fp32 rate, {floors[1]:.1f} s at the bf16 rate (ratio "
                f"{epoch / floors[1]:.1f}); a 6 σ x 3 seed x 20 epoch study ~ {18 * 20 * epoch / 60:.0f} min of "
                "training",
                flush=True,
            )

        for precision, masks in (("32-true", "per_member"), ("32-true", "counter"), ("bf16-mixed", "counter")):
            for members, (scales, seeds) in STUDIES_BY_K.items():
                options = f"--trainer.precision={precision}", f"--model.dropout_masks={masks}"
                ops = ops_per_step(args.data_dir, scales, seeds, *options)
                top = ", ".join(f"{name} {count:g}" for name, count in ops.most_common(5))
                print(
                    f"ops per training step, {precision}, {masks} masks, K = {members:2d}  {sum(ops.values()):4.0f}  "
                    f"({top}, ...)",
                    flush=True,
                )

        for name in [s for s in args.studies.split(",") if s in STUDIES]:
            options, target, env = STUDIES[name]
            command = [
                sys.executable,
                "-m",
                "noise_robustness",
                "sweep",
                *options,
                f"--out={tmp}/{name}",
                f"--data.data_dir={args.data_dir}",
            ]
            wall, rss = run_measured(command, env)
            described = " ".join([*options, *(f"{key}={value}" for key, value in env.items())]) or "defaults"
            flop = MAIN_JOB_FLOP / (3 if name == "one" else 1)  # one seed of the main job's three
            fp32_floor, bf16_floor = (flop / (rate * 1e9) for rate in (gflops, bf16_gflops))
            if target is None:
                target = BF16_TARGET * bf16_floor
            verdict = "met" if wall <= target else "NOT met"
            print(
                f"study {name} ({described}), 6 σ x 20 epochs   wall {wall:.1f} s "
                f"(target <= {target:.0f}: {verdict}), peak memory {rss:.2f} GB (target <= 2)",
                flush=True,
            )
            print(  # the study against the floors of its arithmetic, at this run's rates
                f"study {name} against its floors   fp32 floor {fp32_floor:.0f} s ({wall / fp32_floor:.2f}x), "
                f"bf16 floor {bf16_floor:.0f} s ({wall / bf16_floor:.2f}x)",
                flush=True,
            )
            if name == "three":  # and its numbers: on the machine type that made them, the committed ones exactly
                same = (Path(tmp) / name / "results.csv").read_bytes() == MAIN_JOB_RESULTS.read_bytes()
                print(
                    f"study three's results.csv {'is byte for byte' if same else 'DIFFERS from'} the committed "
                    f"{MAIN_JOB_RESULTS.relative_to(REPO)}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
