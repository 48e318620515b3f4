"""The real LightningCLI, in-process and as a subprocess, on real MNIST with few batches."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from noise_robustness.cli import cli_main

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("scale_*.yaml")) + [Path(__file__).parents[1] / "configs" / "cnn.yaml"]


def short_run(data_dir, tmp_path, subcommand: str, *args: str, batches: int = 2) -> list[str]:
    """Arguments that shrink a real run to a few batches, writing under ``tmp_path``; ``args`` come last and win."""
    return [
        subcommand,
        f"--data.data_dir={data_dir}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'tb_logs'}",
        "--trainer.max_epochs=1",
        f"--trainer.limit_train_batches={batches}",
        f"--trainer.limit_val_batches={batches}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *args,
    ]


def events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_config_fits_and_writes_a_tensorboard_run(config, data_dir, tmp_path):
    cli = cli_main(short_run(data_dir, tmp_path, "fit", f"--config={config}"))
    run_dir = tmp_path / "tb_logs" / config.stem / "version_0"
    assert Path(cli.trainer.log_dir) == run_dir
    assert (run_dir / "config.yaml").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best-epoch=0.ckpt", "last.ckpt"]
    tags = events(run_dir).Tags()
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(tags["scalars"])
    assert set(tags["images"]) == {"samples/train_clean_above_noisy", "samples/val_clean_above_noisy"}


def test_a_run_logs_noisy_samples_and_its_hparams(data_dir, tmp_path):
    cli_main(short_run(data_dir, tmp_path, "fit", "--data.noise_scale=0.5", "--data.noise_mode=resample"))
    run_dir = tmp_path / "tb_logs" / "scale_0.5" / "version_0"
    acc = events(run_dir)
    grid = acc.Images("samples/train_clean_above_noisy")[0]
    assert (grid.width, grid.height) >= (8 * 30, 4 * 30)  # 16 clean above 16 noisy, 8 a row
    hparams_file = next(run_dir.glob("events.out.tfevents.*")).read_bytes()
    for text in (b"noise_scale", b"noise_mode", b"resample", b"val/acc", b"train/acc"):
        assert text in hparams_file
    assert acc.Scalars("val/acc")[0].step > 0  # no placeholder written at step 0


def test_runs_never_overwrite_each_other(data_dir, tmp_path):
    for _ in range(2):
        cli_main(short_run(data_dir, tmp_path, "fit", "--data.noise_scale=0.1"))
    assert sorted(p.name for p in (tmp_path / "tb_logs" / "scale_0.1").iterdir()) == ["version_0", "version_1"]


def test_a_short_clean_run_learns_and_test_validate_predict_work(data_dir, tmp_path):
    fit = cli_main(short_run(data_dir, tmp_path, "fit", batches=150))
    assert fit.trainer.callback_metrics["val/acc"] > 0.9  # 150 batches; chance is 0.1
    ckpt = tmp_path / "tb_logs" / "scale_0.0" / "version_0" / "checkpoints" / "last.ckpt"
    test = cli_main(short_run(data_dir, tmp_path, "test", f"--ckpt_path={ckpt}", batches=150))
    assert test.trainer.callback_metrics["test/acc"] > 0.9
    validate = cli_main(short_run(data_dir, tmp_path, "validate", f"--ckpt_path={ckpt}", batches=150))
    assert validate.trainer.callback_metrics["val/acc"] == test.trainer.callback_metrics["test/acc"]
    predict = cli_main(short_run(data_dir, tmp_path, "predict", f"--ckpt_path={ckpt}", "--return_predictions=true", "--trainer.limit_predict_batches=2"))
    predictions = torch.cat(predict.trainer.predict_loop.predictions)
    assert predictions.shape == (256,) and predictions.dtype == torch.int64


def test_val_acc_matches_an_independent_evaluation(data_dir, tmp_path):
    cli = cli_main(short_run(data_dir, tmp_path, "fit", "--data.noise_scale=1.0", batches=20))
    model, dm = cli.model.eval(), cli.datamodule
    with torch.no_grad():
        logits = model(dm.eval_images["val"][: 20 * 128])
    expected = (logits.argmax(1) == dm.split_labels("val")[: 20 * 128]).float().mean()
    assert torch.isclose(cli.trainer.callback_metrics["val/acc"], expected)
    loss = torch.nn.functional.cross_entropy(logits, dm.split_labels("val")[: 20 * 128])
    assert torch.isclose(cli.trainer.callback_metrics["val/loss"], loss, rtol=1e-5)  # batch-size weighted mean


BAD_INPUT = [
    (["--data.noise_scale=-1"], "Expected `noise_scale` to be a finite number >= 0, but got -1.0"),
    (["--data.noise_scale=.nan"], "Expected `noise_scale` to be a finite number >= 0, but got nan"),
    (["--data.noise_scale=.inf"], "Expected `noise_scale` to be a finite number >= 0, but got inf"),
    (["--data.noise_scale=nan"], 'key "data.noise_scale":\n  Expected a <class \'float\'>. Got value: nan'),
    (["--data.noise_scale=lots"], "noise_scale"),
    (["--data.noise_mode=often"], "Expected `noise_mode` to be one of ('fixed', 'resample'), but got 'often'"),
    (["--data.batch_size=0"], "Expected `batch_size` to be a positive integer, but got 0"),
    (["--config=no_such.yaml"], "no_such.yaml"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUT)
def test_bad_input_is_one_clear_error_before_training(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit:
        cli_main(["fit", *args])
    assert exit.value.code != 0
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no data unpacked, no run folder: nothing started


def test_bad_input_from_the_shell_exits_non_zero_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "noise_robustness", "fit", "--data.noise_scale=-0.5"], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 2
    assert result.stderr.strip().endswith("error: Expected `noise_scale` to be a finite number >= 0, but got -0.5")
    assert "Traceback" not in result.stderr


def test_mixed_precision_is_selectable(data_dir, tmp_path):
    cli = cli_main(short_run(data_dir, tmp_path, "fit", "--trainer.precision=bf16-mixed", batches=20))
    assert cli.trainer.precision == "bf16-mixed"
    assert 0.3 < cli.trainer.callback_metrics["val/acc"] <= 1  # it learns under autocast too
