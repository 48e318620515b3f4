"""``--trainer.precision auto``: the precision this machine runs the study's matrix products fastest in.

bf16 products are several times faster than fp32 only where the hardware multiplies bf16 itself: on x86 CPUs
with AVX512-BF16 or AMX-BF16 (measured here: 4.5x on an AMD EPYC, 5x on an Intel Xeon with AMX, on the study's
own batched product), and on CUDA GPUs that compute in bf16 natively (Ampere and later). Elsewhere torch
emulates bf16, slower than fp32, so ``auto`` stays fp32 there. The choice is made from what the machine *is*
(CPU flags, the GPU's generation), never from a timing: a timing could choose differently on a busy machine,
and the precision is part of a study's identity. The command records the choice, not ``auto``: a study's
``study.yaml`` and ``config.yaml`` name the precision its members were trained in.
"""

import platform
from pathlib import Path

import torch

AUTO = "auto"
FAST_BF16, FP32 = "bf16-mixed", "32-true"
CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}  # /proc/cpuinfo's names of the x86 bf16 instructions


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags as Linux lists them (empty where there is no ``/proc/cpuinfo``)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def uses_cuda(accelerator: str | None) -> bool:
    """Whether a trainer with this ``accelerator`` option runs on a CUDA GPU here (Lightning's ``auto`` takes one
    when there is one)."""
    return str(accelerator or AUTO) in (AUTO, "gpu", "cuda") and torch.cuda.is_available()


def fast_precision(accelerator: str | None = AUTO, flags: set[str] | None = None) -> str:
    """``bf16-mixed`` where the device the trainer will use multiplies bf16 natively, else ``32-true``."""
    if uses_cuda(accelerator):
        return FAST_BF16 if torch.cuda.is_bf16_supported(including_emulation=False) else FP32
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return FP32
    return FAST_BF16 if (cpu_flags() if flags is None else flags) & CPU_BF16_FLAGS else FP32


def resolve(precision, accelerator: str | None = AUTO):
    """``precision`` as the trainer takes it: ``auto`` becomes this machine's fast precision, the rest stays."""
    return fast_precision(accelerator) if precision == AUTO else precision
