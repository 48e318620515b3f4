"""Bad input ends early and clearly; interrupted runs resume exactly; runs never share a folder."""

import shutil
import signal
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from noise_robustness.cli import cli_main
from noise_robustness.run_logger import claim_run_folder
from tests.test_cli import short_run

REPO = Path(__file__).parents[1]


def fails_cleanly(args: list[str], cwd: Path) -> str:
    """Runs the real command line; asserts a non-zero exit without a traceback; returns stderr."""
    result = subprocess.run([sys.executable, "-m", "noise_robustness", *args], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.net=noise_robustness.models.Transformer"], "model.net"),
        (["--optimizer=torch.optim.Nonesuch"], "optimizer"),
        (["--data.noise_scle=1"], "unrecognized arguments: --data.noise_scle=1"),
        (["--data.batch_size=60001"], "Expected `batch_size` to be at most the 60000 training images, but got 60001"),
        (["--data.val_holdout=-5"], "Expected `val_holdout` to be in [0, 60000), but got -5"),
        (["--data.val_holdout=60000"], "Expected `val_holdout` to be in [0, 60000), but got 60000"),
        (["--trainer.max_epochs=0"], "Expected `trainer.max_epochs` to be a positive integer, but got 0"),
        (["--trainer.logger.init_args.save_dir=blocker/tb_logs"], "Expected `trainer.logger.init_args.save_dir` to be a folder this user can write"),
        (["--data.data_dir=blocker/data"], "is `data_dir` writable?"),
        (["--ckpt_path=last"], "Expected a checkpoint to resume with `--ckpt_path last`, but found no"),
    ],
)
def test_bad_input_is_refused_before_training(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "blocker").write_text("a file where a folder should be")
    with pytest.raises(SystemExit) as exit:
        cli_main(["fit", *args])
    assert exit.value.code not in (0, None)
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) in (["blocker"], ["blocker", "data"])  # no run folder


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "Expected the config file run.yaml to hold options, but it is empty"), ("data: [unclosed\n", "Problems parsing config")],
)
def test_an_empty_or_broken_config_file_is_refused(content, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text(content)
    with pytest.raises(SystemExit) as exit:
        cli_main(["fit", "--config=run.yaml"])
    assert exit.value.code != 0 and message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]


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


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_fit_resumes_to_the_same_result(signum, data_dir, tmp_path):
    args = ["--data.noise_scale=0.5", "--data.noise_mode=resample", "--trainer.max_epochs=3"]
    reference = cli_main(short_run(data_dir, tmp_path / "reference", "fit", *args, batches=10))
    interrupted = tmp_path / "interrupted"
    stop = ["--trainer.callbacks+=tests.signal_probe.SignalAt", f"--trainer.callbacks.signum={int(signum)}", "--trainer.callbacks.epoch=1", "--trainer.callbacks.batch=4"]
    result = subprocess.run([sys.executable, "-m", "noise_robustness", *short_run(data_dir, interrupted, "fit", *args, *stop, batches=10)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    checkpoints = interrupted / "tb_logs" / "scale_0.5" / "version_0" / "checkpoints"
    assert (checkpoints / "last.ckpt").is_file()  # saved at the end of epoch 0, before the signal
    resumed = cli_main(short_run(data_dir, interrupted, "fit", *args, "--ckpt_path=last", batches=10))
    assert resumed.trainer.current_epoch == 3 and Path(resumed.trainer.log_dir).name == "version_1"
    for key in ("train/acc", "val/acc", "train/loss", "val/loss"):
        assert resumed.trainer.callback_metrics[key].item() == reference.trainer.callback_metrics[key].item(), key


def test_the_same_config_gives_identical_metrics(data_dir, tmp_path):
    runs = [cli_main(short_run(data_dir, tmp_path, "fit", "--data.noise_scale=1.0", batches=10)) for _ in range(2)]
    first, second = (dict((k, v.item()) for k, v in run.trainer.callback_metrics.items()) for run in runs)
    assert first == second


def _claim_many(root: str) -> list[int]:
    return [claim_run_folder(root) for _ in range(20)]


def test_runs_started_together_never_share_a_folder(tmp_path):
    with ProcessPoolExecutor(max_workers=4) as pool:
        claims = [v for vs in pool.map(_claim_many, [str(tmp_path)] * 4) for v in vs]
    assert sorted(claims) == list(range(80))
