"""What subnormal floats cost an fp32 training step on this CPU, and what flushing them buys, on how many threads.

An x86 core takes a slow microcode path for every subnormal float (below 1.2e-38) an instruction reads or writes,
unless its thread's MXCSR register says to flush them (``torch.set_flush_denormal(True)``: FTZ and DAZ). In an fp32
study the gradients of the logits of confident members go subnormal as training goes on (the softmax of a logit 88
below the largest underflows), and the backward pass's products read them: the main job's fp32 epochs grow from ~26
to ~34 s over its 20 epochs, where the bf16 job's, whose products run on AMX (which flushes), stay flat. Each case
runs in a fresh process:

- ``ieee``: as torch comes (and as a study runs: only its optimizer step flushes, ``rmsprop.denormals_flushed``);
- ``flushed_first``: ``torch.set_flush_denormal(True)`` before any other torch operation, and never undone;
- ``flushed_later``: the same flag set once products and elementwise operations have run on subnormals, as in a
  process that decided to flush while running.

For each: the batched products of the MLP's backward pass at the main job's shape (18 members, batch 128) with a
share of the gradient operand subnormal, and an elementwise pass over subnormals, each a median of ``--repeats``.
With ``--checkpoints EARLY LATE`` (two of a fp32 study's ``epoch=*.ckpt``, e.g. from the second and last epoch of
``sweep --trainer.precision 32-true``) it also times the study's training step on real batches from each checkpoint's
weights and optimizer state, and counts the subnormal gradients of the logits.

    python benchmarks/subnormals.py [--share 0.05] [--checkpoints EARLY LATE --data_dir data]
"""

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time

CASES = ("ieee", "flushed_first", "flushed_later")


def median_ms(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def products(share: float, repeats: int) -> dict:
    """The backward pass's batched products, their gradient operand normal and ``share`` subnormal (ms)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    shapes = {  # (the saved operand, the gradient operand) of the three layers' weight and input gradients
        "layer 1 weights [18,784,128]x[18,128,512]": ((18, 784, 128), (18, 128, 512)),
        "layer 2 weights [18,512,128]x[18,128,512]": ((18, 512, 128), (18, 128, 512)),
        "layer 2 inputs [18,128,512]x[18,512,512]": ((18, 128, 512), (18, 512, 512)),
        "layer 3 weights [18,512,128]x[18,128,10]": ((18, 512, 128), (18, 128, 10)),
    }
    times = {}
    for name, (a_shape, g_shape) in shapes.items():
        a, gradient = torch.randn(a_shape, generator=generator), torch.randn(g_shape, generator=generator)
        subnormal = gradient.clone()
        subnormal[torch.rand(g_shape, generator=generator) < share] = 1e-40
        times[name] = {
            "normal": median_ms(lambda a=a, g=gradient: torch.bmm(a, g), repeats),
            "subnormal": median_ms(lambda a=a, g=subnormal: torch.bmm(a, g), repeats),
        }
    values = torch.full((20_000_000,), 1e-39)
    times["20 M subnormals x 0.9 (elementwise)"] = {
        "normal": median_ms(lambda: torch.mul(torch.ones_like(values), 0.9), repeats),
        "subnormal": median_ms(lambda: torch.mul(values, 0.9), repeats),
    }
    return times


def flushed_share() -> float:
    """The share of 20 M subnormals that a multiplication flushes to zero: each of torch's threads does a part."""
    import torch

    return (torch.full((20_000_000,), 1e-39).mul_(0.9) == 0).float().mean().item()


def load_study_step(path: str):
    """The main job's fp32 training step from a checkpoint's weights and optimizer state, and its epoch."""
    import torch

    from noise_robustness.commands import STUDY_SCALES
    from noise_robustness.training.classifier import NoiseClassifier

    checkpoint = torch.load(path, weights_only=False, map_location="cpu")
    model = NoiseClassifier(scales=STUDY_SCALES, seeds=[0, 1, 2])
    model.load_state_dict(checkpoint["state_dict"])
    optimizer = model.configure_optimizers()
    optimizer.load_state_dict(checkpoint["optimizer_states"][0])
    model.net.start_epoch(checkpoint["epoch"], 0)

    def step(images, labels):  # the study's own loss (the members' summed mean losses), as its training step
        loss, _ = model.member_losses(images, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def subnormal_share_of_logit_gradients(images, labels) -> float:
        shares = []
        tiny = torch.finfo(torch.float32).tiny  # the smallest normal fp32
        hook = model.net.register_full_backward_hook(
            lambda module, grad_input, grad_output: shares.append(
                ((grad_output[0] != 0) & (grad_output[0].abs() < tiny)).float().mean().item()
            )
        )
        step(images, labels)
        hook.remove()
        return shares[0]

    return step, subnormal_share_of_logit_gradients, checkpoint["epoch"]


def training_steps(checkpoints: list[str], data_dir: str, repeats: int) -> dict:
    """The main job's fp32 training step (ms, median over ``repeats`` passes of 20 batches) from each checkpoint."""
    from noise_robustness.commands import STUDY_SCALES
    from noise_robustness.data.datamodule import NoisyMNISTDataModule

    datamodule = NoisyMNISTDataModule(scales=STUDY_SCALES, seeds=[0, 1, 2], data_dir=data_dir)
    datamodule.setup("fit")
    batches = [batch for _, batch in zip(range(20), datamodule.loader("train", shuffle=True))]
    results = {}
    for path in checkpoints:
        step, subnormal_share_of_logit_gradients, epoch = load_study_step(path)
        share = subnormal_share_of_logit_gradients(*batches[0])
        results[f"epoch {epoch} ({path})"] = {
            "ms_per_step": median_ms(lambda step=step: [step(*batch) for batch in batches], repeats) / len(batches),
            "subnormal_share_of_logit_gradients": share,
        }
    return results


def child(case: str, share: float, repeats: int, checkpoints: list[str], data_dir: str) -> None:
    import torch

    if case == "flushed_first":
        assert torch.set_flush_denormal(True)
    if case == "flushed_later":  # the work of a running process first, in IEEE arithmetic
        gradient = torch.randn(18, 128, 512)
        gradient[torch.rand(gradient.shape) < share] = 1e-40
        for _ in range(3):
            torch.bmm(torch.randn(18, 784, 128), gradient)
            torch.full((20_000_000,), 1e-39).mul_(0.9)
        assert torch.set_flush_denormal(True)
    if case != "ieee":  # the optimizer step's own flush would hand the calling thread back to IEEE arithmetic after it
        import noise_robustness.engine.rmsprop

        noise_robustness.engine.rmsprop.denormals_flushed = lambda device: contextlib.nullcontext()
    result = {"threads": torch.get_num_threads(), "products_ms": products(share, repeats), "flushed": flushed_share()}
    if checkpoints:
        result["training_steps"] = training_steps(checkpoints, data_dir, max(1, repeats // 4))
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--share", type=float, default=0.05, help="share of the gradient operand made subnormal")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--checkpoints", nargs=2, metavar=("EARLY", "LATE"), default=[])
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.share, args.repeats, args.checkpoints, args.data_dir)
        return
    results = {}
    for case in CASES:  # one after the other, each in a fresh process
        command = [sys.executable, __file__, "--child", case, "--share", str(args.share)]
        command += ["--repeats", str(args.repeats), "--data_dir", args.data_dir]
        command += ["--checkpoints", *args.checkpoints] if args.checkpoints else []
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results[case] = json.loads(output.strip().splitlines()[-1])
    print(f"share of the gradient operand subnormal: {args.share}; threads: {results['ieee']['threads']}")
    print(f"{'product (ms, median)':48s}" + "".join(f"{case:>16s}" for case in CASES))
    for name in results["ieee"]["products_ms"]:
        for kind in ("normal", "subnormal"):
            row = [results[case]["products_ms"][name][kind] for case in CASES]
            print(f"{name + ', ' + kind:48s}" + "".join(f"{value:16.2f}" for value in row))
    print(f"{'share of the subnormals flushed (elementwise)':48s}" + "".join(
        f"{results[case]['flushed']:16.2f}" for case in CASES
    ))  # fmt: skip
    if args.checkpoints:
        for name in results["ieee"]["training_steps"]:
            row = [results[case]["training_steps"][name]["ms_per_step"] for case in CASES]
            share = results["ieee"]["training_steps"][name]["subnormal_share_of_logit_gradients"]
            print(f"training step from {name}: subnormal logit gradients {share:.2%}; ms a step " + ", ".join(
                f"{case} {value:.1f}" for case, value in zip(CASES, row)
            ))  # fmt: skip


if __name__ == "__main__":
    main()
