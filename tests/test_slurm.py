"""The cluster scripts on a live single-node Slurm (scripts/start_slurm.sh), on the CPU, as users submit them."""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from noise_robustness.machine import LOWERED
from tests.conftest import rows

pytestmark = pytest.mark.slurm
REPO = Path(__file__).parents[1]
LOCAL = {**os.environ, "OMP_NUM_THREADS": "1"}  # what a Slurm task gets from scripts/*.sbatch: one CPU


@pytest.fixture(scope="module")
def slurm() -> dict[str, str]:
    """The environment jobs are submitted with: this Python first on PATH, and Slurm's config."""
    if not shutil.which("sbatch"):
        pytest.skip("no Slurm here: install Debian's slurm-wlm and munge, then run scripts/start_slurm.sh")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    if subprocess.run(["sinfo", "-h"], env=env, capture_output=True).returncode:
        pytest.skip('Slurm is installed but not running: eval "$(bash scripts/start_slurm.sh)" first')
    return env


def run(command: list[str], env: dict[str, str], cwd: Path) -> str:
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def job_state(job: str, env: dict[str, str]) -> dict[str, str]:
    line = run(["scontrol", "show", "job", "-o", job], env, REPO)
    return dict(field.split("=", 1) for field in line.split() if "=" in field)


def wait_for(jobs: list[str], env: dict[str, str], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while run(["squeue", "-h", "-o", "%i", "-j", ",".join(jobs)], env, REPO).strip():
        assert time.monotonic() < deadline, f"jobs {jobs} still queued or running"
        time.sleep(1)


def study_options(data_dir, out: Path) -> list[str]:
    return [
        "--scales=[0, 1.0]",
        "--seeds=[0, 1]",
        "--epochs=1",
        f"--out={out}",
        f"--data.data_dir={data_dir}",
        "--trainer.limit_train_batches=5",
    ]


def submit_study(env, cwd: Path, *options: str) -> tuple[str, str]:
    output = run(["bash", str(REPO / "scripts" / "slurm_study.sh"), *options], env, cwd)
    array, gather = re.fullmatch(
        r"array job (\d+): 2 task\(s\), one per seed; gather job (\d+) after it\n", output
    ).groups()
    return array, gather


def test_the_study_runs_as_a_job_array_and_its_gather_matches_a_local_run(slurm, data_dir, tmp_path):
    array, gather = submit_study(slurm, tmp_path, "--", *study_options(data_dir, tmp_path / "cluster"))
    wait_for([array, gather], slurm)
    assert job_state(gather, slurm)["JobState"] == "COMPLETED"
    local = tmp_path / "local"
    for role in (["--task=0"], ["--task=1"], ["--gather=true"]):  # the same groups of members, here
        run(
            [sys.executable, "-m", "noise_robustness", "sweep", *study_options(data_dir, local), *role], LOCAL, tmp_path
        )
    cluster = rows(tmp_path / "cluster" / "results.csv")
    assert len(cluster) == 4 and cluster == rows(local / "results.csv")
    assert (tmp_path / "cluster" / "accuracy_vs_noise.png").is_file()
    log = (tmp_path / f"slurm-noise-study-{array}_0.out").read_text()
    assert "epoch 1/1:" in log and "\r" not in log  # one line per epoch, no progress bar redrawn in the log


def test_a_failed_task_makes_the_gather_fail_naming_what_is_missing(slurm, data_dir, tmp_path):
    array, gather = submit_study(slurm, tmp_path, "--hold", "--", *study_options(data_dir, tmp_path / "cluster"))
    run(["scontrol", "release", f"{array}_0"], slurm, tmp_path)
    run(["scancel", f"{array}_1"], slurm, tmp_path)  # task 1 never ran: its members have no results
    run(["scontrol", "release", gather], slurm, tmp_path)
    wait_for([array, gather], slurm)
    state = job_state(gather, slurm)
    assert state["JobState"] == "FAILED" and state["ExitCode"] != "0:0"
    log = next(tmp_path.glob(f"slurm-noise-study-{gather}_*.out")).read_text()
    assert "2 of 4 members of" in log and "have no results: sigma=0/seed=1, sigma=1/seed=1" in log
    assert not (tmp_path / "cluster" / "results.csv").exists()


def test_array_tasks_on_machines_that_differ_are_one_study_whose_gather_names_them(slurm, data_dir, tmp_path):
    """A partition whose nodes differ: task 1 and the gather run under the lowered machine (an AVX2-only node, where
    `auto` is fp32), task 0 natively; the gather succeeds and its summary names both machines."""
    options, script = study_options(data_dir, tmp_path / "cluster"), str(REPO / "scripts" / "study.sbatch")
    lowered = "--export=ALL," + ",".join(f"{name}={value}" for name, value in LOWERED.items())
    jobs = [
        run(["sbatch", "--parsable", "--array=0", script, *options], slurm, tmp_path).strip(),
        run(["sbatch", "--parsable", "--array=1", lowered, script, *options], slurm, tmp_path).strip(),
    ]
    after = f"--dependency=afterany:{':'.join(jobs)}"
    gather = run(["sbatch", "--parsable", after, lowered, script, *options], slurm, tmp_path).strip()
    wait_for([*jobs, gather], slurm)
    log = next(tmp_path.glob(f"slurm-noise-study-{gather}_*.out")).read_text()
    assert job_state(gather, slurm)["JobState"] == "COMPLETED", log[-3000:]
    assert {row["seed"]: row["precision"] for row in rows(tmp_path / "cluster" / "results.csv")}["1"] == "32-true"
    summary = (tmp_path / "cluster" / "summary.md").read_text()
    assert "Trained on 2 machines: " in summary and "lowered (ATEN_CPU_CAPABILITY=avx2" in summary


def fit_options(data_dir, save_dir: Path, epochs: int = 2, batches: int = 10) -> list[str]:
    return [
        "--scales=[0.5]", f"--trainer.max_epochs={epochs}", f"--trainer.limit_train_batches={batches}",
        "--trainer.limit_val_batches=10", f"--data.data_dir={data_dir}",
        f"--trainer.logger.init_args.save_dir={save_dir}",
    ]  # fmt: skip


def final_val_acc(run_dir: Path) -> float:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return events.Scalars("val/acc")[-1].value


def test_a_two_task_ddp_fit_is_one_job_with_one_run_folder(slurm, data_dir, tmp_path):
    job = run(
        [
            "sbatch",
            "--parsable",
            "--ntasks-per-node=2",
            str(REPO / "scripts" / "fit.sbatch"),
            *fit_options(data_dir, tmp_path / "cluster"),
        ],
        slurm,
        tmp_path,
    ).strip()
    wait_for([job], slurm)
    log = (tmp_path / f"slurm-noise-fit-{job}.out").read_text()
    assert job_state(job, slurm)["JobState"] == "COMPLETED", log[-3000:]
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log
    runs = list((tmp_path / "cluster").glob("*/version_*"))
    assert [p.name for p in runs] == ["version_0"]
    local = [
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        *fit_options(data_dir, tmp_path / "local"),
    ]
    run([sys.executable, "-m", "noise_robustness", "fit", *local], LOCAL, tmp_path)
    assert final_val_acc(runs[0]) == final_val_acc(next((tmp_path / "local").glob("*/version_0")))


def test_a_fit_warned_before_its_time_limit_requeues_and_ends_with_the_same_numbers(slurm, data_dir, tmp_path):
    options = fit_options(data_dir, tmp_path / "cluster", epochs=4, batches=60)
    job = run(["sbatch", "--parsable", str(REPO / "scripts" / "fit.sbatch"), *options], slurm, tmp_path).strip()
    deadline = time.monotonic() + 300
    while not list((tmp_path / "cluster").glob("*/version_0/checkpoints/last.ckpt")):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    run(["scancel", "--batch", "--signal=USR1", job], slurm, tmp_path)  # the warning --signal=B:USR1@120 sends
    wait_for([job], slurm)
    state = job_state(job, slurm)
    log = (tmp_path / f"slurm-noise-fit-{job}.out").read_text()
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", log[-3000:]
    resumed = sorted((tmp_path / "cluster").glob("*/version_*"))
    assert [p.name for p in resumed] == ["version_0", "version_1"]  # the requeued run resumed into a new folder
    run(
        [
            sys.executable,
            "-m",
            "noise_robustness",
            "fit",
            *fit_options(data_dir, tmp_path / "local", epochs=4, batches=60),
        ],
        LOCAL,
        tmp_path,
    )
    assert final_val_acc(resumed[1]) == final_val_acc(next((tmp_path / "local").glob("*/version_0")))
