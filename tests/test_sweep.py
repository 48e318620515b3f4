"""The sweep, in-process and as a killed subprocess, on real MNIST with few batches."""

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from noise_robustness.sweep import RESULT_COLUMNS, ROBUSTNESS_COLUMNS, run_sweep


def tiny(data_dir, out: Path, scales: str = "[0, 1.0]") -> list[str]:
    return [
        f"--scales={scales}",
        "--epochs=1",
        f"--out={out}",
        f"--data.data_dir={data_dir}",
        "--trainer.limit_train_batches=5",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames is not None
        return [r | {"_columns": reader.fieldnames} for r in reader]


def test_a_tiny_sweep_writes_every_table_and_figure_and_resumes(data_dir, tmp_path, capsys):
    out = run_sweep(tiny(data_dir, tmp_path / "sweep"))
    results = rows(out / "results.csv")
    assert [r["_columns"] for r in results] == [RESULT_COLUMNS] * 2
    assert [(r["model"], float(r["noise_scale"]), r["noise_mode"], r["seed"], r["epochs"]) for r in results] == [
        ("DropoutMLP", 0.0, "fixed", "0", "1"),
        ("DropoutMLP", 1.0, "fixed", "0", "1"),
    ]
    for r in results:
        assert all(0 <= float(r[k]) <= 1 for k in ("train_acc", "val_acc")) and float(r["seconds"]) > 0
    robustness = rows(out / "robustness.csv")
    assert robustness[0]["_columns"] == ROBUSTNESS_COLUMNS and len(robustness) == 4
    for r in results:  # the matrix's diagonal is the run's own val/acc, computed independently
        own = next(m for m in robustness if m["train_noise_scale"] == m["eval_noise_scale"] == r["noise_scale"])
        assert float(own["acc"]) == pytest.approx(float(r["val_acc"]), abs=1e-6)
    for name in ("accuracy_vs_noise", "noise_preview", "robustness"):
        with Image.open(out / f"{name}.png") as image:
            assert image.format == "PNG" and image.size[0] > 300
    summary = (out / "summary.md").read_text()
    assert "| 0 (clean) |" in summary and summary.index("| 0 (clean) |") < summary.index("| 1 |")
    assert (out / "tb_logs" / "DropoutMLP_scale_1_seed_0" / "version_0" / "config.yaml").is_file()
    assert "run 2/2: DropoutMLP, noise_scale=1" in capsys.readouterr().err

    run_sweep(tiny(data_dir, tmp_path / "sweep"))  # again: nothing to train
    assert "run 2/2: DropoutMLP, noise_scale=1, noise_mode=fixed, seed=0: finished earlier, skipped" in capsys.readouterr().err
    assert rows(out / "results.csv") == results
    assert not (out / "tb_logs" / "DropoutMLP_scale_1_seed_0" / "version_1").exists()


def test_a_killed_sweep_resumes_without_losing_or_repeating_runs(data_dir, tmp_path):
    out = tmp_path / "sweep"
    args = tiny(data_dir, out, scales="[0, 0.5, 1.0]")
    sweep = subprocess.Popen([sys.executable, "-m", "noise_robustness", "sweep", *args], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not ((out / "results.csv").exists() and len(rows(out / "results.csv")) == 1):
        assert sweep.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    sweep.send_signal(signal.SIGKILL)  # while the second run trains
    sweep.wait()
    first = rows(out / "results.csv")
    assert len(first) == 1
    run_sweep(args)
    results = rows(out / "results.csv")
    assert results[0] == first[0]
    assert [float(r["noise_scale"]) for r in results] == [0.0, 0.5, 1.0]
    assert len(rows(out / "robustness.csv")) == 9


def test_job_array_tasks_each_train_one_run_and_a_last_call_reports(data_dir, tmp_path, capsys):
    args = tiny(data_dir, tmp_path / "sweep", scales="[0, 0.5, 1.0]")
    run_sweep([*args, "--run_index=2"])
    assert [float(r["noise_scale"]) for r in rows(tmp_path / "sweep" / "results.csv")] == [1.0]
    assert not (tmp_path / "sweep" / "summary.md").exists()  # a task leaves the report to the last call
    for index in (1, 0):  # tasks finish in any order
        run_sweep([*args, f"--run_index={index}"])
    capsys.readouterr()
    run_sweep([*args, "--report_only=true"])
    assert capsys.readouterr().err.count("finished earlier, skipped") == 3
    assert [float(r["noise_scale"]) for r in rows(tmp_path / "sweep" / "results.csv")] == [0.0, 0.5, 1.0]
    assert (tmp_path / "sweep" / "accuracy_vs_noise.png").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--run_index=6"], "Expected `run_index` to be in [0, 6), the runs of this sweep, but got 6"),
        (["--trainer.devices", "2"], "Expected `trainer.devices` to be 1 in a sweep"),
        (["--scales=[]"], "Expected `scales` to be a non-empty list of noise levels, but got []"),
        (["--scales=[0, -0.5]"], "Expected `scales` to be a finite number >= 0, but got -0.5"),
        (["--models=[noise_robustness.models.Transformer]"], "Expected each of `models` to be the class path of an nn.Module"),
        (["--models=[os.path]"], "but got 'os.path'"),
        (["--epochs=0"], "Expected `epochs` to be a positive integer, but got 0"),
        (["--noise_mode=sometimes"], "`noise_mode`"),
    ],
)
def test_bad_sweep_options_fail_before_any_training(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        run_sweep([*args, f"--out={tmp_path / 'sweep'}"])
    assert exit.value.code != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()
