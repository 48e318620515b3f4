"""`--trainer.precision auto`: the machine's fast precision, chosen from what the machine is; a study records `auto`,
each member the precision and machine it was trained on (``noise_robustness.machine``)."""

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from noise_robustness.cli import cli_main
from noise_robustness.engine.precision import fast_precision
from noise_robustness.machine import LOWERED, cpu_info, describe, fingerprint, lowered_caps, native_cpu_bf16
from tests.conftest import exits_with_error, rows, tiny

REPO = Path(__file__).parents[1]
X86 = platform.machine().lower() in ("x86_64", "amd64")


def test_the_cpu_is_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\n"
        "flags\t\t: fpu avx512f amx_bf16\n\nprocessor\t: 1\nflags\t\t: fpu avx2\n"
    )
    assert cpu_info(cpuinfo) == {
        "vendor": "GenuineIntel", "model": "Intel(R) Xeon(R) Processor", "generation": "",
        "flags": {"fpu", "avx512f", "amx_bf16"},
    }  # fmt: skip
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: "
                       "AMD EPYC\nstepping\t: 1\ncache size\t: 1024 KB\nflags\t\t: avx2\n")  # fmt: skip
    assert cpu_info(cpuinfo)["generation"] == "cpu family 25 model 17 stepping 1 cache size 1024 KB"
    cpuinfo.write_text("processor\t: 0\nFeatures\t: fp asimd sve\nCPU implementer\t: 0x41\nCPU part\t: 0xd40\n")
    assert cpu_info(cpuinfo) == {
        "vendor": "0x41",
        "model": "",
        "generation": "CPU part 0xd40",
        "flags": {"fp", "asimd", "sve"},
    }  # fmt: skip  an ARM Neoverse V1
    assert cpu_info(tmp_path / "missing") == {"vendor": "", "model": "", "generation": "", "flags": set()}


@pytest.mark.skipif(not X86, reason="the bf16 instructions auto looks for are x86's")
def test_bf16_is_native_where_the_cpu_has_it_and_nothing_caps_the_kernels_below_it():
    assert native_cpu_bf16({"avx512f", "avx512_bf16"}, "AVX512", "ALL") == "avx512_bf16"  # e.g. AMD Zen 4
    assert native_cpu_bf16({"avx512f", "amx_tile", "amx_bf16"}, "AVX512", "ALL") == "amx_bf16"  # Sapphire Rapids
    assert native_cpu_bf16({"avx512f", "avx512_vnni"}, "AVX512", "ALL") is None  # Ice Lake: bf16 emulated
    assert native_cpu_bf16(set(), "AVX2", "ALL") is None
    assert native_cpu_bf16({"avx512f", "avx512_bf16"}, "AVX2", "ALL") is None  # torch's kernels lowered
    assert native_cpu_bf16({"avx512f", "avx512_bf16"}, "AVX512", "AVX2") is None  # oneDNN's lowered
    assert native_cpu_bf16({"avx512f", "avx512_bf16"}, "AVX512", "avx512_core_bf16") == "avx512_bf16"


def test_the_fingerprint_names_what_decides_the_arithmetic_and_never_lets_a_lowered_process_pass_for_another():
    here = fingerprint("cpu", "32-true")
    assert set(here) == {"device", "kernels", "lowered", "native_bf16", "threads", "torch", "precision"}
    assert here["kernels"] == torch.backends.cpu.get_cpu_capability() and here["threads"] == torch.get_num_threads()
    assert here["torch"] == torch.__version__ and here["native_bf16"] == native_cpu_bf16()
    assert fingerprint("cpu", None)["precision"] == "32-true"  # null: Lightning's default
    cpu = cpu_info()  # the vendor, the generation and the instruction sets, not a model name alone
    assert all(str(part) in here["device"] for part in (cpu["vendor"], cpu["generation"], *cpu["flags"] & {"avx2"}))
    # the lowered machine names its caps beside the real CPU (a reference made so matches only that CPU, so lowered),
    # and torch's kernels really are at AVX2 there
    if os.environ.get("ATEN_CPU_CAPABILITY") == LOWERED["ATEN_CPU_CAPABILITY"]:
        assert here["kernels"] == "AVX2" and "ATEN_CPU_CAPABILITY=avx2" in here["lowered"]
        assert here["native_bf16"] is None and fast_precision("cpu") == "32-true"
    else:
        assert here["lowered"] is None and not lowered_caps()
    assert describe(here).startswith("32-true on ")


def test_a_study_records_auto_and_each_member_the_precision_and_machine_it_was_trained_on(data_dir, tmp_path, capsys):
    """`auto` is the study's identity as asked; a rerun that trains nothing takes any precision; an explicit other
    precision that would train is another study, refused naming the option."""
    chosen = fast_precision("cpu")
    out = tmp_path / "study"
    cli_main(tiny(data_dir, out, "--trainer.accelerator=cpu", batches=2))
    assert (
        f"[sweep] precision auto resolves to {chosen} here, as " in capsys.readouterr().err
    )  # said before anything else is
    assert yaml.safe_load((out / "study.yaml").read_text())["trainer.precision"] == "auto"
    for path in out.glob("members/*/*.json"):
        (machine,) = json.loads(path.read_text())["result"]["trained_on"]
        assert machine == {"from_epoch": 1, **fingerprint("cpu", chosen)}
    assert {row["precision"] for row in rows(out / "results.csv")} == {chosen}
    assert describe(fingerprint("cpu", chosen)) in (out / "summary.md").read_text()
    other = "32-true" if chosen == "bf16-mixed" else "bf16-mixed"
    cli_main(tiny(data_dir, out, f"--trainer.precision={other}", "--trainer.accelerator=cpu", batches=2))
    assert "every member of this command finished earlier" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit:  # a new member, in another precision than the study's `auto`
        cli_main(tiny(data_dir, out, f"--trainer.precision={other}", "--trainer.accelerator=cpu", batches=2,
                      scales="[0, 1.0, 2.0]"))  # fmt: skip
    assert exit.value.code != 0 and f"trainer.precision: 'auto' there, '{other}' now" in capsys.readouterr().err


def test_print_config_names_what_auto_resolves_to_here(capsys):
    with pytest.raises(SystemExit):
        cli_main(["sweep", "--print_config"])
    printed = capsys.readouterr().out
    assert printed.startswith(f"# precision auto resolves to {fast_precision()} here, as ")
    assert yaml.safe_load(printed)["trainer"]["precision"] == "auto"


def test_an_unknown_precision_is_refused_naming_auto_among_the_choices(data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        cli_main(tiny(data_dir, tmp_path / "study", "--trainer.precision=fast"))
    message = capsys.readouterr().err
    assert exit.value.code == 2 and "trainer.precision" in message and "auto" in message
    assert not (tmp_path / "study").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
def test_a_gpu_runs_bf16_where_it_computes_bf16_natively():
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    assert fast_precision("auto") == ("bf16-mixed" if native else "32-true")


def command(args: list[str], cwd: Path, lowered: bool = False, env: dict | None = None) -> str:
    """Runs ``python -m noise_robustness ARGS`` in a child process (under the lowered machine if asked, with ``env``
    added); asserts it succeeded; returns what it wrote to stderr."""
    prefix = [sys.executable, "-m", "noise_robustness.machine", "--lowered"] if lowered else []
    result = subprocess.run(
        [*prefix, sys.executable, "-m", "noise_robustness", *args],
        capture_output=True, text=True, cwd=cwd, timeout=600, env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def precisions(out: Path) -> dict[tuple[str, str], str]:
    return {(row["noise_scale"], row["seed"]): row["precision"] for row in rows(out / "results.csv")}


@pytest.mark.slow  # six commands in child processes, four of them lowered
def test_a_study_trained_on_two_machines_gathers_extends_and_is_evaluated_where_bf16_is_not_native(data_dir, tmp_path):
    """Seed 0's members train natively (bf16 where the CPU multiplies it), seed 1's under the lowered machine (fp32),
    as the array tasks of a mixed partition would; the gather, an extension, `certify` and `attack` then run under
    the lowered machine, where `auto` is fp32."""
    out = tmp_path / "study"
    study = ["sweep", "--scales=[0, 1.0]", "--seeds=[0, 1]", "--epochs=1", "--trainer.limit_train_batches=5",
             "--data.val_holdout=2000", f"--out={out}", f"--data.data_dir={data_dir}"]  # fmt: skip
    command([*study, "--task=0"], tmp_path)
    said = command([*study, "--task=1"], tmp_path, lowered=True)
    assert "precision auto resolves to 32-true here, as the process is lowered (ATEN_CPU_CAPABILITY=avx2" in said
    command([*study, "--gather=true", "--trainer.accelerator=cpu"], tmp_path, lowered=True)
    native = fast_precision("cpu")
    assert precisions(out) == {("0.0", "0"): native, ("1.0", "0"): native, ("0.0", "1"): "32-true",
                               ("1.0", "1"): "32-true"}  # fmt: skip
    summary = (out / "summary.md").read_text()
    assert "Trained on 2 machines: " in summary and "lowered (ATEN_CPU_CAPABILITY=avx2" in summary
    if native != "32-true":
        assert f"Trained with precision `auto`: {native} for sigma=0/seed=0, sigma=1/seed=0; 32-true for" in summary
    extended = [arg.replace("[0, 1.0]", "[0, 1.0, 2.0]") for arg in study]
    command(extended, tmp_path, lowered=True)  # the new members only, in fp32 here
    assert precisions(out)[("2.0", "0")] == precisions(out)[("2.0", "1")] == "32-true"
    assert {k: v for k, v in precisions(out).items() if k[0] != "2.0"} == {
        ("0.0", "0"): native, ("1.0", "0"): native, ("0.0", "1"): "32-true", ("1.0", "1"): "32-true"
    }  # fmt: skip
    evaluated = [f"--out={out}", f"--data.data_dir={data_dir}", "--images=10"]
    command(["certify", *evaluated, "--n0=10", "--n=50"], tmp_path, lowered=True)
    command(["attack", *evaluated, "--steps=2", "--linf=[0.1]", "--l2=[1.0]"], tmp_path, lowered=True)
    assert len(list(out.glob("certify/*/summary.md"))) == len(list(out.glob("attack/*/summary.md"))) == 1


@pytest.mark.slow  # a child process gathering a committed 18-member study
def test_the_cluster_recipes_gather_of_a_study_trained_in_bf16_runs_where_auto_is_fp32(data_dir, tmp_path):
    """The CNN's committed study recorded bf16 (`docs/results/cnn`); its gather as `scripts/study.sbatch` runs it
    (on the CPU, `auto`), under the lowered machine, gathers the same rows."""
    out = shutil.copytree(REPO / "docs" / "results" / "cnn", tmp_path / "cnn")
    gather = ["sweep", "--model.net=noise_robustness.models.KerasCNN", f"--out={out}", f"--data.data_dir={data_dir}",
              "--gather=true", "--trainer.accelerator=cpu"]  # fmt: skip
    command(gather, tmp_path, lowered=True)
    for name in ("results.csv", "robustness.csv"):  # a gather now adds columns (`precision`, `ece`): empty here
        committed = rows(REPO / "docs" / "results" / "cnn" / name)
        columns = committed[0]["_columns"]
        assert [{k: r[k] for k in columns} for r in rows(out / name)] == [{k: r[k] for k in columns} for r in committed]


@pytest.mark.slow  # a child process under the lowered machine
def test_a_member_resumed_where_auto_resolves_otherwise_continues_and_records_both(data_dir, tmp_path, capsys):
    """Stopped after its first epoch (a requeued task, say) and resumed on a machine whose `auto` is fp32, a study
    trains on from its checkpoint in fp32, and each member records both machines and the epoch the second began."""
    out = tmp_path / "study"
    stop = ["--trainer.callbacks+=tests.signal_probe.SignalAt", f"--trainer.callbacks.signum={int(signal.SIGTERM)}",
            "--trainer.callbacks.epoch=0", "--trainer.callbacks.batch=-1"]  # fmt: skip
    study = tiny(data_dir, out, "--epochs=2", "--data.val_holdout=2000", *stop, batches=3)
    exits_with_error(study, capsys)
    command(study, tmp_path, lowered=True, env={"PYTHONPATH": str(REPO)})  # the callback, importable there
    for path in out.glob("members/*/*.json"):
        first, then = json.loads(path.read_text())["result"]["trained_on"]
        assert (first["from_epoch"], first["lowered"], then["from_epoch"], then["precision"]) == (1, None, 2, "32-true")
        assert then["lowered"].startswith("ATEN_CPU_CAPABILITY=avx2")
    assert set(precisions(out).values()) == {"+".join(dict.fromkeys([fast_precision("cpu"), "32-true"]))}
