"""Bad input ends early and clearly; interrupted runs resume exactly; runs never share a folder."""

import shutil
import signal
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from noise_robustness.cli import cli_main
from noise_robustness.training.run_logger import claim_run_folder
from tests.conftest import fails_cleanly, short_run

REPO = Path(__file__).parents[1]


# Every bad input: (subcommand and options, a part of the one message it must give). Each is refused
# before any data is read or any folder is made, in `fit` and in `sweep` alike where both take it.
BAD_INPUT = [
    (["fit", "--scales=[-1]"], "Expected `scales` to be a finite number >= 0, but got -1.0"),
    (["fit", "--scales=[.nan]"], "Expected `scales` to be a finite number >= 0, but got nan"),
    (["fit", "--scales=[.inf]"], "Expected `scales` to be a finite number >= 0, but got inf"),
    (["fit", "--scales=[lots]"], "scales"),
    (["sweep", "--scales=[]"], "Expected `scales` to be a non-empty list of noise levels, but got []"),
    (["sweep", "--seeds=[0, 0]"], "Expected `seeds` to hold each value once, but got [0, 0]"),
    (["fit", "--data.noise_mode=often"], "Expected `noise_mode` to be one of ('fixed', 'resample'), but got 'often'"),
    (["fit", "--data.batch_size=0"], "Expected `batch_size` to be a positive integer, but got 0"),
    (
        ["fit", "--data.batch_size=60001"],
        "Expected `batch_size` to be at most the 60000 training images, but got 60001",
    ),
    (["fit", "--data.val_holdout=-5"], "Expected `val_holdout` to be in [0, 60000), but got -5"),
    (["fit", "--data.val_holdout=60000"], "Expected `val_holdout` to be in [0, 60000), but got 60000"),
    (
        ["sweep", "--compare=[blocker]"],
        "Expected each `compare` folder to be a finished study, but blocker is not a study folder "
        "(with study.yaml and config.yaml)",
    ),
    (
        ["sweep", "--compare=[nowhere]"],
        "Expected each `compare` folder to be a finished study, but nowhere is not a study folder "
        "(with study.yaml and config.yaml)",
    ),
    (["fit", "--trainer.max_epochs=0"], "Expected `trainer.max_epochs` to be a positive integer, but got 0"),
    (["sweep", "--epochs=0"], "Expected `trainer.max_epochs` to be a positive integer, but got 0"),
    (["fit", "--model.net=noise_robustness.models.Transformer"], "model.net"),
    (["sweep", "--model.net=noise_robustness.models.Transformer"], "model.net"),
    (["fit", "--optimizer=torch.optim.Nonesuch"], "optimizer"),
    (["fit", "--data.noise_scle=1"], "unrecognized arguments: --data.noise_scle=1"),
    # options the study sets per member: named, with the study option to use instead
    (["fit", "--data.noise_scale=0.5"], "`data.noise_scale` is set per member by the study: use `--scales`"),
    (["sweep", "--data.noise_seed=3"], "`data.noise_seed` is set per member by the study: use `--seeds`"),
    (["sweep", "--seed_everything=3"], "`seed_everything` is set per member by the study: use `--seeds`"),
    (
        ["sweep", "--models=[noise_robustness.models.KerasCNN]"],
        "`models` is set per member by the study: use `--model.net`",
    ),
    (["sweep", "--data.scales=[1]"], 'Linked "data.scales" must be given via "scales"'),
    (["fit", "--model.seeds=[1]"], 'Linked "model.seeds" must be given via "seeds"'),
    (
        ["sweep", "--trainer.devices=3"],
        "Expected the training batches (128 images, the last 96) to split evenly over 3",
    ),
    (["sweep", "--task=3"], "Expected `task` to be in [0, 3), one task per seed of [0, 1, 2], but got 3"),
    (["sweep", "--ckpt_path=x.ckpt"], "`ckpt_path` is chosen by the study: rerun the same sweep command to resume it"),
    # files and folders
    (
        ["fit", "--trainer.logger.init_args.save_dir=blocker/tb_logs"],
        "Expected `trainer.logger.init_args.save_dir` to be a folder this user can write",
    ),
    (["sweep", "--out=blocker"], "Expected `out` to be a study folder, but blocker is a file"),
    (["sweep", "--out=blocker/study"], "Expected `out` to be a folder this user can write"),
    (
        ["sweep", "--out=."],
        "Expected `out` to be a new folder or a study folder, but . holds other files and no study.yaml",
    ),
    (["fit", "--data.data_dir=blocker/data"], "is `data_dir` writable?"),
    (["fit", "--ckpt_path=last"], "Expected a checkpoint to resume with `--ckpt_path last`, but found no"),
    (
        ["test", "--ckpt_path=missing.ckpt"],
        "Expected `ckpt_path` to be a checkpoint file (or `last`), but missing.ckpt does not exist",
    ),
    (["validate", "--ckpt_path=blocker"], "Expected `ckpt_path` to be a checkpoint file, but blocker is not one"),
    (["fit", "--config=no_such.yaml"], "no_such.yaml"),
    (["fit", "--config=empty.yaml"], "Expected the config file empty.yaml to hold options, but it is empty"),
    (["sweep", "--config=broken.yaml"], "Expected the config file broken.yaml to be YAML, but it does not parse"),
    (["fit", "--config=old.yaml"], "`data.noise_scale` is set per member by the study: use `--scales`"),
    (
        ["sweep", "--out=s", "--reliability_member=sigma=3/seed=0"],
        "Expected `reliability_member` to name a member of the study",
    ),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_is_one_clear_error_before_anything_starts(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    files = {
        "blocker": "a file where a folder should be",
        "empty.yaml": "",
        "broken.yaml": "data: [unclosed\n",
        "old.yaml": "data:\n  noise_scale: 0.5\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(SystemExit) as exit:
        cli_main(args)
    assert exit.value.code not in (0, None)
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)  # no data unpacked, no run or study folder


@pytest.mark.slow  # a whole study or a child process: seconds; CI runs the slow tier
def test_bad_input_from_the_shell_exits_non_zero_without_a_traceback(tmp_path):
    stderr = fails_cleanly(["fit", "--scales=[-0.5]"], tmp_path)
    assert stderr.strip().endswith("error: Expected `scales` to be a finite number >= 0, but got -0.5")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "corrupt", "wrong_shape"])
def test_a_damaged_data_file_is_named_with_its_fix(damage, data_dir, tmp_path):
    shutil.copytree(f"{data_dir}/MNIST", tmp_path / "data" / "MNIST")
    raw = tmp_path / "data" / "MNIST" / "raw"
    labels = raw / "train-labels-idx1-ubyte"
    if damage == "truncate":
        labels.write_bytes(labels.read_bytes()[:1000])
    elif damage == "corrupt":
        labels.write_bytes(labels.read_bytes()[:-1] + b"\x07")
    else:  # a real MNIST label file, of the test split's length
        shutil.copy(raw / "t10k-labels-idx1-ubyte", labels)
    stderr = fails_cleanly(["fit", "--data.data_dir=data"], tmp_path)
    assert f"error: MNIST file {labels} is corrupt or truncated" in stderr
    assert "delete it and run again" in stderr
    assert not (tmp_path / "tb_logs").exists()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_fit_resumes_to_the_same_result(signum, data_dir, tmp_path):
    args = ["--scales=[0.5]", "--data.noise_mode=resample", "--trainer.max_epochs=3"]
    reference = cli_main(short_run(data_dir, tmp_path / "reference", "fit", *args, batches=10))
    interrupted = tmp_path / "interrupted"
    stop = [
        "--trainer.callbacks+=tests.signal_probe.SignalAt",
        f"--trainer.callbacks.signum={int(signum)}",
        "--trainer.callbacks.epoch=1",
        "--trainer.callbacks.batch=4",
    ]
    command = [
        sys.executable,
        "-m",
        "noise_robustness",
        *short_run(data_dir, interrupted, "fit", *args, *stop, batches=10),
    ]
    # A terminal's Ctrl-C: a test suite started in the background (`cmd &`) ignores SIGINT, and Python
    # keeps that ignored in its children; the default disposition lets Python raise KeyboardInterrupt.
    result = subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    checkpoints = interrupted / "tb_logs" / "scale_0.5" / "version_0" / "checkpoints"
    assert (checkpoints / "last.ckpt").is_file()  # saved at the end of epoch 0, before the signal
    resumed = cli_main(short_run(data_dir, interrupted, "fit", *args, "--ckpt_path=last", batches=10))
    assert resumed.trainer.current_epoch == 3 and Path(resumed.trainer.log_dir).name == "version_1"
    for key in ("train/acc", "val/acc", "train/loss", "val/loss"):
        assert resumed.trainer.callback_metrics[key].item() == reference.trainer.callback_metrics[key].item(), key


def test_the_same_config_gives_identical_metrics(data_dir, tmp_path):
    runs = [cli_main(short_run(data_dir, tmp_path, "fit", "--scales=[1.0]", batches=10)) for _ in range(2)]
    first, second = ({k: v.item() for k, v in run.trainer.callback_metrics.items()} for run in runs)
    assert first == second


def _claim_many(root: str) -> list[int]:
    return [claim_run_folder(root) for _ in range(20)]


def test_runs_started_together_never_share_a_folder(tmp_path):
    with ProcessPoolExecutor(max_workers=4) as pool:
        claims = [v for vs in pool.map(_claim_many, [str(tmp_path)] * 4) for v in vs]
    assert sorted(claims) == list(range(80))
