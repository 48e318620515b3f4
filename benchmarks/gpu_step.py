"""One training step of a study's 18 stacked networks on a CUDA GPU, outside Lightning: eager against graphed
(``graphs.StepGraphs`` and the graphed RMSprop update), bf16 autocast, batch 128, median ms a step over 500 steps
(CUDA synchronised around each block of 100); the MLP, and the CNN with cuDNN's deterministic algorithms (what the
command uses) and without. What is left of a study's time beyond this is Lightning's loop, composing the batches,
validation and the report. Run from the repository root: ``python3 benchmarks/gpu_step.py``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import statistics
import time

import torch
from torch.nn import functional as F

from noise_robustness.classifier import StepSums, member_sums
from noise_robustness.graphs import StepGraphs
from noise_robustness.models import DropoutMLP, KerasCNN
from noise_robustness.stacked import StackedRMSprop, build_member, stack

K, BATCH, BLOCKS, STEPS = 18, 128, 5, 100


def timed(graphed: bool, network=DropoutMLP) -> float:
    seeds = list(range(K))
    net = stack([build_member(network, s) for s in seeds], seeds, masks="counter").cuda().train()
    optimizer = StackedRMSprop(net.parameters(), 1e-3, 0.9, 1e-7, bf16_copies=net.bf16_copies, graphed=graphed)
    sums = StepSums()
    net.start_epoch(0, 0)
    images = torch.rand(K, BATCH, 1, 28, 28, device="cuda")
    labels = torch.randint(0, 10, (K, BATCH), device="cuda")

    def step(images, labels):
        logits = net(images)
        losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
        sums.add(*member_sums(logits.detach().argmax(-1) == labels, losses.detach()))
        losses.mean(dim=1).sum().backward()

    graphs = StepGraphs(step, lambda: [*net.parameters(), *net.bf16_copies.copies], optimizer.zero_grad)
    times = []
    for block in range(BLOCKS + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(STEPS):
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                if graphed:
                    step_index = net.step
                    net.counter.hold_keys(step_index, torch.device("cuda"))
                    graphs(images, labels)
                    net.step = step_index + 1
                else:
                    optimizer.zero_grad()
                    step(images, labels)
            optimizer.step()
        torch.cuda.synchronize()
        if block:  # the first block warms up and captures
            times.append((time.perf_counter() - start) / STEPS * 1e3)
    return statistics.median(times)


if __name__ == "__main__":
    eager, graphed = timed(False), timed(True)
    print(
        f"18-member MLP step, bf16, outside Lightning: eager {eager:.3f} ms, graphed {graphed:.3f} ms "
        f"({eager / graphed:.1f}x); 9380 steps (the main job's training) {9380 * graphed / 1e3:.1f} s graphed"
    )
    for deterministic in (True, False):
        torch.backends.cudnn.deterministic = deterministic
        eager, graphed = timed(False, KerasCNN), timed(True, KerasCNN)
        print(
            f"18-member CNN step, bf16, cuDNN deterministic {deterministic}: eager {eager:.3f} ms, graphed "
            f"{graphed:.3f} ms; 9380 steps {9380 * graphed / 1e3:.1f} s graphed"
        )
