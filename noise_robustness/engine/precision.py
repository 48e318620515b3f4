"""``--trainer.precision auto``: the precision this machine runs the study's matrix products fastest in.

bf16 products are several times faster than fp32 only where the hardware multiplies bf16 itself: on x86 CPUs
with AVX512-BF16 or AMX-BF16 (measured here: 4.5x on an AMD EPYC, 5x on an Intel Xeon with AMX, on the study's
own batched product), and on CUDA GPUs that compute in bf16 natively (Ampere and later). Elsewhere torch
emulates bf16, slower than fp32, so ``auto`` stays fp32 there. The choice is made from what the machine *is*
(CPU flags as this process may use them, the GPU's generation), never from a timing.

``auto`` is what a study records as its identity: its members may be trained on machines that resolve it
differently (a cluster whose nodes differ), and each member records the precision it was trained in and the
machine (``machine.fingerprint``). An explicit precision is the study's identity as given.
"""

import platform

import torch

from noise_robustness.machine import CPU_BF16_FLAGS, lowered_caps, native_cpu_bf16

AUTO = "auto"
FAST_BF16, FP32 = "bf16-mixed", "32-true"


def uses_cuda(accelerator: str | None) -> bool:
    """Whether a trainer with this ``accelerator`` option runs on a CUDA GPU here (Lightning's ``auto`` takes one
    when there is one)."""
    return str(accelerator or AUTO) in (AUTO, "gpu", "cuda") and torch.cuda.is_available()


def auto_choice(accelerator: str | None = AUTO, flags: set[str] | None = None) -> tuple[str, str]:
    """What ``auto`` resolves to on the device the trainer will use, and why, in words."""
    if uses_cuda(accelerator):
        name = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return FAST_BF16, f"{name} multiplies bf16 natively"
        return FP32, f"{name} does not multiply bf16 natively"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return FP32, f"bf16 is emulated on {platform.machine()} CPUs"
    found = native_cpu_bf16(flags)
    if found:
        return FAST_BF16, f"the CPU multiplies bf16 natively ({found} in /proc/cpuinfo)"
    if caps := lowered_caps():
        caps = ", ".join(f"{k}={v}" for k, v in caps.items())
        return FP32, f"the process is lowered ({caps}), so bf16 would be emulated"
    return FP32, f"no {' or '.join(CPU_BF16_FLAGS)} in /proc/cpuinfo, so bf16 would be emulated (slower than fp32)"


def auto_line(accelerator: str | None = AUTO) -> str:
    """``precision auto resolves to bf16-mixed here, as ...``: what a command says first, and ``--print_config``."""
    return "precision auto resolves to {} here, as {}".format(*auto_choice(accelerator))


def fast_precision(accelerator: str | None = AUTO, flags: set[str] | None = None) -> str:
    """``bf16-mixed`` where the device the trainer will use multiplies bf16 natively, else ``32-true``."""
    return auto_choice(accelerator, flags)[0]


def resolve(precision, accelerator: str | None = AUTO):
    """``precision`` as the trainer takes it: ``auto`` becomes this machine's fast precision, the rest stays."""
    return fast_precision(accelerator) if precision == AUTO else precision
