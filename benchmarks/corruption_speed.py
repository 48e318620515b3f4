"""What composing a batch costs, per corruption, against Gaussian noise's (the study's reference corruption).

One batch is 128 training images for 3 members (one per seed) of one corruption at its middle MNIST-C level,
composed by the data module as training does (one gather of the pixels and of each pattern the corruption
reads, then the corruption); the patterns are drawn before timing. Prints the median of interleaved rounds
(ms per batch) and the ratio to Gaussian noise, and what composing costs an epoch of the corruption study
(``configs/corruptions.yaml``: its seven training corruptions and the clean member, 469 batches).

    python benchmarks/corruption_speed.py --data_dir /tmp/mnistdata
"""

import argparse
import statistics
import time

import torch

from noise_robustness.corruptions import BUILT_IN
from noise_robustness.data.datamodule import NoisyMNISTDataModule
from noise_robustness.study.members import Member

LEVEL = {
    "gaussian": 0.3, "uniform": 0.3, "impulse": 0.1, "shot": 0.3, "speckle": 0.35, "blur": 2.0, "brightness": 0.3,
    "contrast": 0.8, "rotate": 0.6, "shear": 0.6, "scale": 0.3, "translate": 3.0, "stripe": 5,
}  # fmt: skip
SEEDS = [0, 1, 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    dm = NoisyMNISTDataModule(seeds=SEEDS, noise_mode="resample", data_dir=args.data_dir)
    dm.prepare_data()
    dm.setup("fit")
    groups = {name: [Member(LEVEL[name], seed, cls()) for seed in SEEDS] for name, cls in BUILT_IN.items()}
    positions = [torch.randperm(60_000, generator=torch.Generator().manual_seed(b))[:128] for b in range(args.batches)]
    for members in groups.values():  # draw the patterns before timing
        dm.noisy_images("train", dict.fromkeys(SEEDS, positions[0]), members, epoch=1)
    times = {name: [] for name in groups}
    for _ in range(args.rounds):
        for name, members in groups.items():  # interleaved: every corruption sees the same machine state
            start = time.perf_counter()
            for batch in positions:
                dm.noisy_images("train", dict.fromkeys(SEEDS, batch), members, epoch=1)
            times[name].append((time.perf_counter() - start) / len(positions) * 1000)
    reference = statistics.median(times["gaussian"])
    print(f"{'corruption':<12} {'ms/batch':>9} {'× Gaussian':>11}   (3 members x 128 images, median of {args.rounds})")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<12} {median:9.2f} {median / reference:11.2f}")
    trained = ("gaussian", "impulse", "shot", "blur", "contrast", "rotate", "translate")  # configs/corruptions.yaml
    per_epoch = sum(statistics.median(times[name]) for name in trained) * 469 / 1000
    print(f"composing an epoch of the corruption study's training batches: about {per_epoch:.1f} s (upper bound:")
    print("the study composes all its members in one call, sharing the gather of the clean pixels)")


if __name__ == "__main__":
    main()
