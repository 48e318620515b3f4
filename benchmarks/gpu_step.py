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

from noise_robustness.engine.graphs import StepGraphs, graphed_step
from noise_robustness.engine.rmsprop import StackedRMSprop
from noise_robustness.engine.stacked import build_member, stack
from noise_robustness.models import DropoutMLP, KerasCNN
from noise_robustness.training.classifier import StepSums, member_sums

K, BATCH, BLOCKS, STEPS = 18, 128, 5, 100


class StackedTraining:
    """``k`` stacked members of ``network`` (counter masks) trained outside Lightning under bf16 autocast, the step
    eager or through ``StepGraphs`` and the graphed update: what the classifier's graphed step does, bare."""

    def __init__(self, device: str, graphed: bool, network=DropoutMLP, k: int = K):
        seeds = list(range(k))
        self.device, self.graphed = device, graphed
        self.net = stack([build_member(network, s) for s in seeds], seeds, masks="counter").to(device).train()
        self.optimizer = StackedRMSprop(
            self.net.parameters(), 1e-3, 0.9, 1e-7, bf16_copies=self.net.bf16_copies, graphed=graphed
        )
        self.sums = StepSums()
        self.net.start_epoch(0, 0)
        holders = lambda: [*self.net.parameters(), *self.net.bf16_copies.copies]  # noqa: E731
        self.graphs = StepGraphs(self.forward_backward, holders, self.optimizer.zero_grad)

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        logits = self.net(images)
        losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
        self.sums.add(*member_sums(logits.detach().argmax(-1) == labels, losses.detach()))
        losses.mean(dim=1).sum().backward()

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.autocast(self.device, dtype=torch.bfloat16, cache_enabled=False):
            if self.graphed:
                graphed_step(self.net, self.graphs, images, labels)
            else:
                self.optimizer.zero_grad()
                self.forward_backward(images, labels)
        self.optimizer.step()


def timed(graphed: bool, network=DropoutMLP) -> float:
    training = StackedTraining("cuda", graphed, network)
    images = torch.rand(K, BATCH, 1, 28, 28, device="cuda")
    labels = torch.randint(0, 10, (K, BATCH), device="cuda")
    times = []
    for block in range(BLOCKS + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(STEPS):
            training.step(images, labels)
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
