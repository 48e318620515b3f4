"""What a study of another dataset costs on this machine: synthetic data at full size, written in the real formats.

Writes a Fashion-MNIST-shaped dataset (IDX files in torchvision's layout: 60,000 + 10,000 images, 1 x 28 x 28) and a
CIFAR-10-shaped image folder (50,000 + 10,000 PNGs, 3 x 32 x 32, ten class folders) of real MNIST digits
(``tests/datasets.py``), then runs one epoch of the default study (6 σ x 3 seeds = 18 members) through the real CLI
twice per network, with ``--trainer.limit_train_batches`` at ``--short`` and ``--long`` batches, each in a fresh
process. The difference of the two epoch lines is (long - short) training steps, so a step costs
``(t_long - t_short) / (long - short)``, and a whole epoch (every batch, and the full validation pass that both runs
made) ``t_long + (batches - long) x step``; 20 epochs, 20 of those. Estimated from measured steps, so labelled so.

    python benchmarks/dataset_cost.py                          # MLP on Fashion-MNIST, LeNet and a ResNet on CIFAR-10
    python benchmarks/dataset_cost.py --short 10 --long 30
"""

import argparse
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.datasets import image_folder, mnist_family  # noqa: E402

CASES = {  # name -> (dataset, folder maker, network, training images)
    "Fashion-MNIST, DropoutMLP": ("torchvision.datasets.FashionMNIST", "fashion", "noise_robustness.models.DropoutMLP"),
    "CIFAR-10 shape, LeNet (stacked)": ("torchvision.datasets.ImageFolder", "cifar", "colournets.LeNet"),
    "CIFAR-10 shape, SmallResNet (looped)": ("torchvision.datasets.ImageFolder", "cifar", "colournets.SmallResNet"),
}
TRAIN = {"fashion": 60_000, "cifar": 50_000}


def epoch_seconds(root: Path, data: Path, dataset: str, net: str, batches: int) -> float:
    """The epoch line's seconds of a one-epoch study limited to ``batches`` training batches (a fresh process)."""
    out = Path(tempfile.mkdtemp(dir=root)) / "study"
    command = [
        sys.executable, "-m", "noise_robustness", "sweep", f"--out={out}", "--epochs=1", f"--data.data_dir={data}",
        f"--data.dataset={dataset}", f"--model.net={net}", f"--trainer.limit_train_batches={batches}",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    ]  # fmt: skip
    env = {"PYTHONPATH": f"{root}:{REPO}", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=root, env=env, check=True)
    return float(re.search(r"epoch 1/1: ([0-9.]+) s", result.stderr).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", type=int, default=10)
    parser.add_argument("--long", type=int, default=40)
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data" / "mnist"), help="MNIST's files")
    args = parser.parse_args()
    cpuinfo = Path("/proc/cpuinfo").read_text()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "?")
    flags = [flag for flag in ("avx512_bf16", "amx_bf16") if flag in cpuinfo]
    print(f"CPU: {cpu} ({', '.join(flags) or 'AVX2, no native bf16'}), {len(cpuinfo.split('processor')) - 1} cores")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "colournets.py").write_text((REPO / "tests" / "user_networks.py").read_text())
        began = time.perf_counter()
        data = {
            "fashion": mnist_family(root / "fashion", "FashionMNIST", args.data_dir, train=60_000, test=10_000),
            "cifar": image_folder(root / "cifar", args.data_dir, train=50_000, test=10_000),
        }
        print(f"synthetic data written in {time.perf_counter() - began:.0f} s")
        print("| study (18 members, batch 128) | step | epoch (estimated) | 20 epochs (estimated) |")
        print("|---|---|---|---|")
        for name, (dataset, kind, net) in CASES.items():
            short, long = (epoch_seconds(root, data[kind], dataset, net, n) for n in (args.short, args.long))
            step = (long - short) / (args.long - args.short)
            epoch = long + (math.ceil(TRAIN[kind] / 128) - args.long) * step
            print(f"| {name} | {step * 1000:.0f} ms | {epoch:.0f} s | {20 * epoch / 60:.0f} min |", flush=True)


if __name__ == "__main__":
    main()
