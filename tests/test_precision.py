"""`--trainer.precision auto`: the machine's fast precision, chosen from what the machine is and recorded as chosen."""

import platform

import pytest
import torch
import yaml

from noise_robustness.cli import cli_main
from noise_robustness.engine.precision import cpu_flags, fast_precision
from tests.conftest import tiny

X86 = platform.machine().lower() in ("x86_64", "amd64")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f amx_bf16\nbogomips\t: 4000\n\nflags\t\t: fpu avx2\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx512f", "amx_bf16", "avx2"}
    assert cpu_flags(tmp_path / "missing") == set()


@pytest.mark.skipif(not X86, reason="the bf16 instructions auto looks for are x86's")
def test_a_cpu_runs_bf16_where_it_multiplies_bf16_natively_and_fp32_elsewhere():
    assert fast_precision("cpu", {"avx512f", "avx512_bf16"}) == "bf16-mixed"  # e.g. AMD Zen 4
    assert fast_precision("cpu", {"avx512f", "amx_tile", "amx_bf16"}) == "bf16-mixed"  # Intel Sapphire Rapids
    assert fast_precision("cpu", {"avx512f", "avx2"}) == "32-true"  # bf16 emulated: slower than fp32
    assert fast_precision("cpu", set()) == "32-true"


def test_auto_is_recorded_as_the_precision_it_chose_and_is_part_of_the_identity(data_dir, tmp_path, capsys):
    """The study's config and identity name the precision its members were trained in, never `auto`; a rerun
    with `auto` is the same study, and one with the other precision is refused, naming the option."""
    chosen = fast_precision("cpu")
    out = tmp_path / "study"
    cli_main(tiny(data_dir, out, "--trainer.precision=auto", "--trainer.accelerator=cpu", batches=2))
    assert yaml.safe_load((out / "study.yaml").read_text())["trainer.precision"] == chosen
    assert f"precision: {chosen}" in (out / "config.yaml").read_text()
    capsys.readouterr()
    cli_main(tiny(data_dir, out, "--trainer.precision=auto", "--trainer.accelerator=cpu", batches=2))
    assert "every member of this command finished earlier" in capsys.readouterr().err
    other = "32-true" if chosen == "bf16-mixed" else "bf16-mixed"
    with pytest.raises(SystemExit) as exit:
        cli_main(tiny(data_dir, out, f"--trainer.precision={other}", "--trainer.accelerator=cpu", batches=2))
    assert exit.value.code != 0 and "trainer.precision" in capsys.readouterr().err


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
