"""The main job's training step (18 dropout MLPs, a batch of 128 each) four ways, in one run, interleaved:

  engine     the study's stacked engine, as ``sweep`` runs it (``NoiseClassifier``: stacked members, counter masks,
             the multi-tensor RMSprop, bf16 copies where bf16 is native);
  reference  the same LightningModule with ``--model.fast false``: torch's own dropout and ``torch.optim.RMSprop``
             on the stacked products (the switch the engine is tested against);
  torch.func ``stack_module_state`` + ``vmap(functional_call)`` over 18 ``DropoutMLP``s (``randomness="different"``)
             and ``torch.optim.RMSprop`` on the stacked parameters: torch's own way to run many models as one;
  loop       the plain PyTorch loop: 18 ``DropoutMLP``s, one after another, each with its ``torch.optim.RMSprop``.

Every way trains in this machine's ``precision auto`` (bf16 autocast where the CPU multiplies bf16 natively, fp32
elsewhere; ``--fp32``: fp32 anyway). Milliseconds a step: the median of ``--repeats`` rounds, each way timed over
``--steps`` steps in turn (so that a busy moment hurts all of them), after two warm-up steps each.

    python benchmarks/step_peers.py [--fp32]
"""

import argparse
import contextlib
import statistics
import time

import torch
from torch.func import functional_call, grad_and_value, stack_module_state, vmap
from torch.nn import functional as F

from noise_robustness.commands import STUDY_SCALES, STUDY_SEEDS
from noise_robustness.engine.precision import fast_precision
from noise_robustness.models import DropoutMLP
from noise_robustness.training.classifier import NoiseClassifier

K, BATCH = len(STUDY_SCALES) * len(STUDY_SEEDS), 128
RMSPROP = {"lr": 1e-3, "alpha": 0.9, "eps": 1e-7}


def module_step(fast: bool, autocast):
    """One step of the study's LightningModule (its ``member_losses`` and its optimizer), outside the Trainer."""
    model = NoiseClassifier(scales=STUDY_SCALES, seeds=STUDY_SEEDS, fast=fast)
    optimizer = model.configure_optimizers()
    model.net.start_epoch(0, 0)

    def step(images, labels):
        optimizer.zero_grad()
        with autocast():
            loss, _ = model.member_losses(images, labels)
        loss.backward()
        optimizer.step()

    return step


def vmap_step(autocast):
    """One step of 18 networks as one through ``torch.func``."""
    nets = [DropoutMLP() for _ in range(K)]
    params, buffers = stack_module_state(nets)
    params = {name: p.detach().requires_grad_() for name, p in params.items()}
    optimizer = torch.optim.RMSprop(params.values(), **RMSPROP)
    base = DropoutMLP().to("meta")

    def loss(p, b, x, y):
        return F.cross_entropy(functional_call(base, (p, b), (x,)).float(), y)

    grads = vmap(grad_and_value(loss), randomness="different")

    def step(images, labels):
        with autocast():
            g, _ = grads(params, buffers, images, labels)
        for name, p in params.items():
            p.grad = g[name]
        optimizer.step()

    return step


def loop_step(autocast):
    """One step of 18 networks, one after another."""
    nets = [DropoutMLP().train() for _ in range(K)]
    optimizers = [torch.optim.RMSprop(net.parameters(), **RMSPROP) for net in nets]

    def step(images, labels):
        for net, optimizer, x, y in zip(nets, optimizers, images, labels):
            optimizer.zero_grad()
            with autocast():
                loss = F.cross_entropy(net(x).float(), y)
            loss.backward()
            optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="steps a way is timed over, each round")
    parser.add_argument("--repeats", type=int, default=5, help="rounds; the median is reported")
    parser.add_argument("--fp32", action="store_true", help="fp32 even where bf16 is native (as on an AVX2 CPU)")
    args = parser.parse_args()
    bf16 = fast_precision("cpu") == "bf16-mixed" and not args.fp32

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    torch.manual_seed(0)
    images, labels = torch.rand(K, BATCH, 1, 28, 28), torch.randint(10, (K, BATCH))
    ways = {
        "engine": module_step(True, autocast),
        "reference": module_step(False, autocast),
        "torch.func": vmap_step(autocast),
        "loop": loop_step(autocast),
    }
    for step in ways.values():
        for _ in range(2):
            step(images, labels)
    times = {name: [] for name in ways}
    for _ in range(args.repeats):
        for name, step in ways.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step(images, labels)
            times[name].append(1000 * (time.perf_counter() - start) / args.steps)
    engine = statistics.median(times["engine"])
    print(f"{K} members, batch {BATCH}, {'bf16 autocast' if bf16 else 'fp32'}, {torch.get_num_threads()} threads")
    for name, values in times.items():
        median = statistics.median(values)
        spread = f"{min(values):.1f}-{max(values):.1f}"
        print(f"{name:11s} {median:7.1f} ms a step  {median / engine:5.2f}x the engine's  (rounds: {spread})")


if __name__ == "__main__":
    main()
