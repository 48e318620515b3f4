"""Faults inside a study's folder or a run's checkpoints: each ends in one message, a non-zero exit and nothing lost.

The cases of issue "Faults end in a clear message", numbered as there; real files, real signals.
"""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from noise_robustness.cli import cli_main
from noise_robustness.files import write_atomic
from noise_robustness.study.folder import Study
from noise_robustness.study.members import study_members
from noise_robustness.study.spec import identity_of
from noise_robustness.training.checkpoints import FileCheckpointIO, verify
from tests.conftest import METRICS, exits_with_error, member_rows, rows, short_run, tiny

REPO = Path(__file__).parents[1]
B = ["--epochs=2", "--data.val_holdout=2000"]  # a short study: 2 epochs of 5 batches, validated on 2000 images


def study_args(data_dir, out: Path, *args: str, scales: str = "[0, 0.5]") -> list[str]:
    return tiny(data_dir, out, *B, "--trainer.callbacks+=tests.signal_probe.SignalAt", *args, scales=scales)


def signal_at(signum: int, epoch: int, batch: int) -> list[str]:
    """Options that send this process ``signum`` after training batch ``batch`` of ``epoch``."""
    return [
        f"--trainer.callbacks.signum={signum}",
        f"--trainer.callbacks.epoch={epoch}",
        f"--trainer.callbacks.batch={batch}",
    ]


def metrics(out: Path) -> dict:
    return {key: {m: row[m] for m in METRICS} for key, row in member_rows(out).items()}


# 1. A study stopped after its last epoch's checkpoint and before its results is finished by a rerun.


@pytest.mark.slow  # a whole study: seconds; CI runs the slow tier
def test_a_study_whose_member_results_are_gone_is_finished_by_rerunning_it(data_dir, tmp_path):
    out = tmp_path / "study"
    cli_main(tiny(data_dir, out, *B))
    before = metrics(out)
    shutil.rmtree(out / "members")  # or a kill -9 after the last checkpoint, a disk error on members/
    cli_main(tiny(data_dir, out, *B))  # resumes the final checkpoint: trains nothing, reports from it
    assert metrics(out) == before


@pytest.mark.slow  # a whole study: seconds; CI runs the slow tier
def test_a_study_whose_tables_figures_and_tensorboard_are_gone_gets_them_back_by_rerunning_it(data_dir, tmp_path):
    out = tmp_path / "study"
    cli_main(tiny(data_dir, out, *B))
    before = {name: (out / name).read_bytes() for name in ("results.csv", "robustness.csv", "summary.md")}
    for name in before:
        (out / name).unlink()
    shutil.rmtree(out / "tensorboard")
    cli_main(tiny(data_dir, out, *B))  # trains nothing: every member has its result file
    assert {name: (out / name).read_bytes() for name in before} == before
    assert list((out / "tensorboard").glob("events.*"))  # the study's figures (per-epoch curves are history)


@pytest.mark.slow  # a whole study or a child process: seconds; CI runs the slow tier
def test_sigterm_as_the_last_epoch_ends_stops_with_143_and_a_rerun_finishes_the_study(data_dir, tmp_path, capsys):
    reference, out = tmp_path / "reference", tmp_path / "study"
    cli_main(study_args(data_dir, reference, *signal_at(0, 99, 0)))  # signal 0 at an epoch never reached: no signal
    command = study_args(data_dir, out, *signal_at(int(signal.SIGTERM), 1, -1))  # as the last epoch ends
    message = exits_with_error(command, capsys)
    assert "[sweep] stopped by SIGTERM: rerun the same command to resume" in message
    assert list(out.glob("checkpoints/*/epoch=1-*.ckpt")) and not (out / "members").exists()
    cli_main(command)  # the same command: its final checkpoint holds the last epoch's metrics
    assert metrics(out) == metrics(reference)


# 2. One folder, one study.


def test_two_studies_started_at_once_on_one_folder_one_is_refused(data_dir, tmp_path):
    out = tmp_path / "study"
    members = study_members([0.0], [0])
    first = Study(out, {"model.lr": 0.001}, members, {})
    second = Study(out, {"model.lr": 0.01}, members, {})
    first.check(), second.check()  # both see a new folder, as two commands started at the same instant do
    first.start(members)
    with pytest.raises(ValueError, match=r"holds a study made with other options \(model.lr: 0.001 there, 0.01 now\)"):
        second.start(members)


def test_a_gather_refuses_members_of_another_study_naming_them(data_dir, tmp_path, capsys):
    out = tmp_path / "study"
    cli_main(tiny(data_dir, out, *B))
    path = out / "members" / "sigma=1" / "seed=0.json"
    record = json.loads(path.read_text())
    record["result"]["study_id"] = "0badc0de"  # written by another study in the same folder
    path.write_text(json.dumps(record))
    message = exits_with_error([*tiny(data_dir, out, *B), "--gather=true"], capsys)
    assert f"1 member(s) of {out} were written by another study" in message and "sigma=1/seed=0" in message


# 3. and 4. Checkpoints are what they claim.


@pytest.mark.parametrize(
    ("change", "differs"),
    [("--model.lr=0.01", "model.lr: 0.001 there, 0.01 now"), ("--scales=[1.0]", "scales: [0.5] there, [1.0] now")],
    ids=["lr", "sigma"],
)
def test_a_fit_never_resumes_a_checkpoint_of_other_options(change, differs, data_dir, tmp_path, capsys):
    named = ["--scales=[0.5]", "--trainer.logger.init_args.name=run"]  # both runs in one experiment folder
    cli_main(short_run(data_dir, tmp_path, "fit", *named))
    message = exits_with_error(short_run(data_dir, tmp_path, "fit", *named, change, "--ckpt_path=last"), capsys)
    checkpoint = tmp_path / "tb_logs" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    assert f"{checkpoint} was written by a run with other options" in message and differs in message
    assert not (tmp_path / "tb_logs" / "run" / "version_1").exists()  # refused before a folder was made


def damage(path: Path, how: str) -> None:
    """Damages a checkpoint as a disk, a copy or a person might."""
    if how == "flipped weights":  # the file still loads: only the checksum can tell
        checkpoint = torch.load(path, weights_only=True)
        weights = next(iter(checkpoint["state_dict"].values()))
        weights.view(torch.int32)[0, 0] ^= 1 << 20
        torch.save(checkpoint, path)
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # random bytes
        path.write_bytes(os.urandom(4096))


@pytest.mark.parametrize("how", ["flipped weights", "truncated", "random bytes"])
def test_a_damaged_checkpoint_is_never_trained_on(how, data_dir, tmp_path, capsys):
    cli_main(short_run(data_dir, tmp_path, "fit", "--scales=[0.5]"))
    checkpoint = (tmp_path / "tb_logs" / "scale_0.5" / "version_0" / "checkpoints" / "last.ckpt").resolve()
    damage(checkpoint, how)
    message = exits_with_error(short_run(data_dir, tmp_path, "fit", "--scales=[0.5]", "--ckpt_path=last"), capsys)
    assert "damaged" in message and str(checkpoint.parent) in message and "Traceback" not in message


def test_a_study_never_resumes_a_damaged_checkpoint(data_dir, tmp_path, capsys):
    out = tmp_path / "study"
    command = study_args(data_dir, out, *signal_at(int(signal.SIGTERM), 0, -1))  # stop as epoch 0 ends
    exits_with_error(command, capsys)
    (checkpoint,) = out.glob("checkpoints/*/last.ckpt")
    damage(checkpoint.resolve(), "flipped weights")
    message = exits_with_error(command, capsys)
    assert f"{checkpoint.parent}" in message and "is damaged" in message
    assert f"delete {checkpoint.parent} to train 2 member(s) from their first epoch" in message


# 5. Members are named exactly.


def test_sigma_values_equal_to_six_digits_are_two_members(data_dir, tmp_path):
    out = tmp_path / "study"
    cli_main(tiny(data_dir, out, *B, scales="[0.1234567, 0.1234568]", batches=2))
    assert sorted(p.name for p in (out / "members").iterdir()) == ["sigma=0.1234567", "sigma=0.1234568"]
    assert sorted(member_rows(out)) == [(0.1234567, 0), (0.1234568, 0)]


@pytest.mark.slow  # a whole study or a child process: seconds; CI runs the slow tier
def test_a_new_sigma_close_to_a_finished_one_is_trained(data_dir, tmp_path, capsys):
    out = tmp_path / "study"
    cli_main(tiny(data_dir, out, *B, scales="[0, 0.5]", batches=2))
    capsys.readouterr()
    cli_main(tiny(data_dir, out, *B, scales="[0, 0.5000001]", batches=2))
    assert "training 1 member(s)" in capsys.readouterr().err
    assert {float(r["eval_noise_scale"]) for r in rows(out / "robustness.csv")} == {0.0, 0.5000001}


# 6. Exit codes tell the truth: a fit stopped by a signal (tests/test_reliability.py: resumes exactly).


@pytest.mark.slow  # a whole study or a child process: seconds; CI runs the slow tier
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_fit_stopped_by_a_signal_exits_non_zero_and_says_how_to_resume(signum, data_dir, tmp_path):
    command = short_run(data_dir, tmp_path, "fit", "--scales=[0.5]", "--trainer.max_epochs=2", batches=10)
    command += ["--trainer.callbacks+=tests.signal_probe.SignalAt", *signal_at(int(signum), 1, 4)]
    result = subprocess.run(
        [sys.executable, "-m", "noise_robustness", *command],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a terminal's Ctrl-C would have it
    )
    assert result.returncode == 128 + signum and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"[fit] stopped by {signum.name}: rerun it with --ckpt_path last to resume" in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_study_stopped_by_a_signal_exits_non_zero_and_says_how_to_resume(signum, data_dir, tmp_path, capsys):
    message = exits_with_error(study_args(data_dir, tmp_path / "study", *signal_at(int(signum), 0, 2)), capsys)
    assert f"[sweep] stopped by {signum.name}: rerun the same command to resume the study" in message


# 7. Tracebacks become messages.


@pytest.mark.parametrize(
    ("text", "what"),
    [("model.lr: [unclosed\n", "it is not YAML"), ("", "it holds NoneType"), ("- a\n- list\n", "it holds list")],
    ids=["not YAML", "empty", "a list"],
)
def test_a_damaged_study_yaml_is_named(text, what, data_dir, tmp_path, capsys):
    out = tmp_path / "study"
    out.mkdir()
    (out / "study.yaml").write_text(text)
    message = exits_with_error(tiny(data_dir, out, *B), capsys)
    assert (
        f"{out / 'study.yaml'} is damaged: {what}" in message
        and "restore it from a copy, or use a new --out" in message
    )


@pytest.mark.slow  # a whole study: seconds; CI runs the slow tier
def test_a_truncated_member_result_is_named_at_gather(data_dir, tmp_path, capsys):
    out = tmp_path / "study"
    cli_main(tiny(data_dir, out, *B))
    path = out / "members" / "sigma=0" / "seed=0.json"
    path.write_text(path.read_text()[:50])
    message = exits_with_error([*tiny(data_dir, out, *B), "--gather=true"], capsys)
    assert "have no results: sigma=0/seed=0" in message and f"damaged result files: {path}" in message


@pytest.mark.slow  # a whole study: seconds; CI runs the slow tier
def test_a_folder_that_cannot_be_written_mid_run_is_named_and_nothing_finished_is_lost(data_dir, tmp_path, capsys):
    out = tmp_path / "study"
    cli_main(tiny(data_dir, out, *B, scales="[0]"))
    finished = (out / "members" / "sigma=0" / "seed=0.json").read_text()
    (out / "members" / "sigma=1").write_text("a file where the member's folder goes")  # like an unwritable folder
    message = exits_with_error(tiny(data_dir, out, *B, scales="[0, 1.0]"), capsys)
    assert f"({out / 'members' / 'sigma=1'}" in message and "then rerun the same command to resume" in message
    assert (out / "members" / "sigma=0" / "seed=0.json").read_text() == finished
    (out / "members" / "sigma=1").unlink()
    cli_main(tiny(data_dir, out, *B, scales="[0, 1.0]"))  # fixed: the rerun finishes from the final checkpoint
    assert sorted(member_rows(out)) == [(0.0, 0), (1.0, 0)]


def test_a_report_that_cannot_be_written_is_named(data_dir, tmp_path, capsys):
    out = tmp_path / "study"
    cli_main(tiny(data_dir, out, *B))
    (out / "summary.md").unlink()
    (out / "summary.md").mkdir()  # the report's file cannot be replaced
    message = exits_with_error(tiny(data_dir, out, *B), capsys)
    assert "error: " in message and "summary.md" in message and "rerun the same command" in message


@pytest.mark.slow  # a whole study or a child process: seconds; CI runs the slow tier
def test_a_full_disk_while_saving_a_checkpoint_is_named(data_dir, tmp_path):
    """A size-limited file stands in for a full disk: writes past the limit fail as on a full one."""
    out = tmp_path / "study"

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # 1 MB: a checkpoint is ~16 MB

    result = subprocess.run(
        [sys.executable, "-m", "noise_robustness", *tiny(data_dir, out, *B)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=small_files,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "error: File too large (" in result.stderr and ".ckpt)" in result.stderr  # the checkpoint, named
    assert "rerun the same command to resume" in result.stderr
    cli_main(tiny(data_dir, out, *B))  # room again: the same command finishes the study
    assert len(member_rows(out)) == 2


# 9. Smaller.


def test_deleting_locks_does_not_let_a_second_command_train_the_same_members(tmp_path):
    out, members = tmp_path / "study", study_members([0.0], [0])
    identity = identity_of({"model": {"lr": 0.001}})
    first = Study(out, identity, members, {})
    first.start(members)
    shutil.rmtree(out / "locks")
    with pytest.raises(ValueError, match="Another command is training member sigma=0/seed=0"):
        Study(out, identity, members, {}).start(members)


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "results.csv"
    write_atomic(path, "old\n")

    def fails_halfway(file) -> None:
        file.write(b"half of the new")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left on device: .*results.csv"):  # named
        write_atomic(path, fails_halfway)
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]


def test_checkpoints_are_written_to_their_files_as_they_go_and_whole(data_dir, tmp_path):
    """Not Lightning's default writer, which first builds the whole file in memory (the main job's peak)."""
    out = tmp_path / "study"
    cli = cli_main(tiny(data_dir, out, *B))
    assert isinstance(cli.trainer.strategy.checkpoint_io, FileCheckpointIO)
    saved = sorted(p for p in (out / "checkpoints").rglob("*") if p.is_file())
    assert saved and not [p for p in saved if p.name.startswith(".")]  # no temporary file left
    for path in saved:
        verify(path, None, set(), "")  # loads, and its checksum holds
