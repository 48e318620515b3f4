"""What decides a run's arithmetic, as a fingerprint: two runs whose fingerprints are equal give the same numbers
bit for bit; two whose fingerprints differ may differ in the last bits, and after 20 epochs by about a seed's spread.

The fingerprint names the device (a CUDA GPU's name and compute capability; or the CPU's vendor, model name and the
instruction sets torch, oneDNN and MKL choose their kernels by), torch's CPU kernel level
(``torch.backends.cpu.get_cpu_capability()``), whether bf16 is native, the threads, the torch build and the precision
the run used. The CPU's model name alone decides nothing: virtual machines give different CPUs one generic name.

**The lowered machine.** ``LOWERED`` caps torch's kernels, oneDNN's and MKL's at AVX2, the level of an AVX2-only
CPU, so that one's own CPU computes what an older one computes, and ``auto`` then sees no native bf16, as there
(``python -m noise_robustness.machine --lowered <command>`` runs a command so; CI runs the tests so too).
A lowered run's fingerprint names the caps beside the real CPU, so it never passes for an AVX2-only CPU: BLAS
libraries choose their kernels by vendor and cache sizes as well, and only that same CPU lowered the same way
computes its numbers.
"""

import json
import os
import platform
import sys
from pathlib import Path

# The environment that lowers a process to an AVX2-only CPU: each library reads its cap when it first computes.
LOWERED = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo's names of the x86 instructions that multiply bf16
# the instruction sets BLAS and oneDNN choose kernels by (/proc/cpuinfo's names), as far as this machine has them
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_fp16", *CPU_BF16_FLAGS, "amx_tile")
NATIVE_BF16_ISA = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512",
                   "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "DEFAULT", "ALL")  # fmt: skip
CPUINFO = Path("/proc/cpuinfo")
# what tells two CPUs of one model name apart (/proc/cpuinfo's keys on x86 and on ARM)
GENERATION = ("cpu family", "model", "stepping", "cache size", "CPU part", "CPU variant", "CPU revision")


def cpu_info(cpuinfo: Path = CPUINFO) -> dict[str, object]:
    """The first processor as Linux lists it: its vendor, model name, generation (x86: family, model, stepping and
    cache size; ARM: implementer, part, variant and revision) and instruction-set flags (empty where there is no
    ``/proc/cpuinfo``)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return {"vendor": "", "model": "", "generation": "", "flags": set()}
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    generation = " ".join(f"{key} {fields[key]}" for key in GENERATION if fields.get(key))
    vendor, flags = (
        fields.get("vendor_id", fields.get("CPU implementer", "")),
        fields.get("flags", fields.get("Features")),
    )
    return {"vendor": vendor, "model": fields.get("model name", ""), "generation": generation,
            "flags": set((flags or "").split())}  # fmt: skip


def lowered_caps() -> dict[str, str]:
    """The caps of ``LOWERED`` (or others of those variables) this process runs under."""
    return {name: os.environ[name] for name in LOWERED if os.environ.get(name)}


def native_cpu_bf16(flags: set[str] | None = None, kernels: str | None = None, onednn: str | None = None) -> str | None:
    """The instruction by which this CPU multiplies bf16 natively as this process may use it, or None: the CPU has it
    (``flags``), torch's kernels run at AVX512 (``kernels``, not capped below) and oneDNN is not capped below it
    (``onednn``, its ``ONEDNN_MAX_CPU_ISA``). Each defaults to this process's."""
    import torch  # here, not at the top: `--lowered` starts its command before torch loads

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    flags = cpu_info()["flags"] if flags is None else flags
    kernels = torch.backends.cpu.get_cpu_capability() if kernels is None else kernels
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL") if onednn is None else onednn
    found = [flag for flag in CPU_BF16_FLAGS if flag in flags]
    return found[0] if found and kernels == "AVX512" and onednn.upper() in NATIVE_BF16_ISA else None


def fingerprint(device, precision: str | None) -> dict[str, object]:
    """What decides the arithmetic of a run on ``device`` (a ``torch.device`` or its name) in ``precision`` in this
    process (plain values)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        where = f"{torch.cuda.get_device_name(device)}, sm_{major}{minor}"
        bf16 = "sm_80+" if major >= 8 else None  # Ampere and later multiply bf16 natively
    else:
        cpu = cpu_info()
        flags = " ".join(flag for flag in KERNEL_FLAGS if flag in cpu["flags"]) or " ".join(sorted(cpu["flags"]))
        named = " ".join(str(part) for part in (cpu["vendor"], cpu["model"] or platform.processor()) if part)
        where = f"{platform.machine()} {named} ({cpu['generation']}) [{flags}]"
        bf16 = native_cpu_bf16(cpu["flags"])
    caps = lowered_caps()
    return {
        "device": where,
        "kernels": torch.backends.cpu.get_cpu_capability(),
        "lowered": ", ".join(f"{name}={value}" for name, value in caps.items()) or None,
        "native_bf16": bf16,
        "threads": torch.get_num_threads(),
        "torch": str(torch.__version__),  # a plain string: checkpoints are loaded weights_only
        "precision": str(precision or "32-true"),
    }


UNRECORDED = "unrecorded"  # the precision of epochs trained before machines were recorded


def describe(machine: dict) -> str:
    """One line for a reader: ``bf16-mixed on x86_64 AuthenticAMD AMD EPYC [...], AVX512 kernels, 2 threads, torch
    2.14.1+cu130`` (``lowered to ...`` where it was)."""
    if "device" not in machine:
        return "a machine not recorded (a checkpoint written before machines were)"
    lowered = f" lowered ({machine['lowered']})" if machine.get("lowered") else ""
    return (
        f"{machine['precision']} on {machine['device']}, {machine['kernels']} kernels{lowered}, "
        f"{machine['threads']} threads, torch {machine['torch']}"
    )


def main(argv: list[str]) -> None:
    """``--lowered COMMAND ...``: runs COMMAND under ``LOWERED`` (x86 CPUs with AVX2 only: elsewhere there is nothing
    to lower to); with no argument, prints this process's fingerprint (the precision left out: a run's own)."""
    if argv[:1] == ["--lowered"]:
        if not argv[1:] or platform.machine().lower() not in ("x86_64", "amd64") or "avx2" not in cpu_info()["flags"]:
            sys.exit("usage: python -m noise_robustness.machine --lowered COMMAND ... (on an x86 CPU with AVX2)")
        try:
            os.execvpe(argv[1], argv[1:], {**os.environ, **LOWERED})
        except OSError as err:
            sys.exit(f"error: {argv[1]}: {err.strerror}")
    machine = fingerprint("cpu", None)
    del machine["precision"]
    print(json.dumps(machine, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
