"""How fast is PGD against every member at once? Images per second per member, against torchattacks attacking the
same members one at a time, in one run on this machine.

The default study's 18 members (6 σ x 3 seeds; the MLP, or with ``--net cnn`` the CNN; their weights as built: an
attack step's cost does not depend on them), ``--images`` validation images, PGD L∞ (ε 0.1, ``--steps`` steps of
0.01, no random start), fp32, eval mode:
(A) ``noise_robustness.attacks.pgd`` on the stacked members, one batched pass per step;
(B) torchattacks' ``PGD`` on each member's own network in turn (what a user of torchattacks does).
Interleaved A B A B ..., medians of ``--repeats``. The adversarial images of both are the same up to the stacked
products' last bits (``tests/test_attacks.py``). Then the default evaluation of the main study (1,000 images,
L∞ ε 0.05, 0.1, 0.2, 0.3 and L2 ε 0.5, 1, 1.5, 2, each with two losses, 40 steps) estimated from (A)'s rate.

    python benchmarks/attack_speed.py
    python benchmarks/attack_speed.py --net cnn --images 100 --repeats 1   # the Keras CNN's members
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from noise_robustness.attacks.pgd import PGD, pgd  # noqa: E402
from noise_robustness.data import mnist  # noqa: E402
from noise_robustness.engine.stacked import build_member, stack  # noqa: E402
from noise_robustness.models import DropoutMLP, KerasCNN  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=250)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--net", choices=["mlp", "cnn"], default="mlp", help="the dropout MLP or the Keras CNN")
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data" / "mnist"))
    args = parser.parse_args()
    import torchattacks

    cpuinfo = Path("/proc/cpuinfo").read_text()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "?")
    flags = [flag for flag in ("avx512_bf16", "amx_bf16") if flag in cpuinfo]
    print(f"CPU: {cpu} ({', '.join(flags) or 'AVX2'}), torch {torch.__version__}, {torch.get_num_threads()} threads")
    seeds = [seed for seed in range(3) for _ in range(6)]  # 18 members
    network = {"mlp": DropoutMLP, "cnn": KerasCNN}[args.net]
    nets = [build_member(network, 100 + k).eval() for k in range(len(seeds))]
    stacked = stack(nets, seeds).eval()
    images, labels = mnist.load(str(mnist.prepare(args.data_dir)), train=False)
    images, labels = images[: args.images].float() / 255, labels[: args.images]
    attack = PGD("linf", 0.1, steps=args.steps, step_size=0.01)
    clean = images.expand(len(nets), *images.shape).contiguous()
    targets = labels.expand(len(nets), len(labels))

    def ours() -> None:
        pgd(stacked, clean, targets, attack)

    def theirs() -> None:
        for net in nets:
            torchattacks.PGD(net, eps=0.1, alpha=0.01, steps=args.steps, random_start=False)(images, labels)

    times = {"ours": [], "torchattacks": []}
    for _ in range(args.repeats):
        for name, run in (("ours", ours), ("torchattacks", theirs)):
            began = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - began)
    rate = {name: args.images * len(nets) / statistics.median(t) for name, t in times.items()}
    print(f"{network.__name__}: PGD L∞, {args.steps} steps, {args.images} images, {len(nets)} members "
          f"(medians of {args.repeats}):")  # fmt: skip
    for name, t in times.items():
        print(f"  {name:13s} {statistics.median(t):7.2f} s   {rate[name] / len(nets):8.1f} images/s per member")
    print(f"  ours / torchattacks: {rate['ours'] / rate['torchattacks']:.2f}x the images per second")
    evaluation = 1000 * 16 * 40 / args.steps * len(nets) / rate["ours"]  # images x attacks x steps / this run's
    print(
        "the main study's default evaluation (1,000 images, 8 radii x 2 losses of 40 steps), estimated: "
        f"{evaluation / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
