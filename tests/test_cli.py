"""The real LightningCLI, in-process and as a subprocess, on real MNIST with few batches."""

from pathlib import Path

import pytest
import torch

from noise_robustness.cli import cli_main
from noise_robustness.commands import StudyTrainer
from noise_robustness.engine.rmsprop import StackedRMSprop
from noise_robustness.engine.stacked import MemberLoop
from noise_robustness.training.classifier import NoiseClassifier
from tests.conftest import events, needs_native_bf16, short_run

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("scale_*.yaml")) + [
    Path(__file__).parents[1] / "configs" / "cnn.yaml"
]
METRIC_TAGS = {"train/loss", "train/acc", "val/loss", "val/acc"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_config_fits_and_writes_a_tensorboard_run(config, data_dir, tmp_path):
    cli = cli_main(short_run(data_dir, tmp_path, "fit", f"--config={config}"))
    run_dir = tmp_path / "tb_logs" / config.stem / "version_0"
    assert Path(cli.trainer.log_dir) == run_dir
    assert (run_dir / "config.yaml").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    tags = events(run_dir).Tags()
    assert set(tags["scalars"]) == METRIC_TAGS  # per epoch; no `epoch` ramp, no per-step noise
    assert set(tags["images"]) == {"train/samples_clean_above_noisy", "val/samples_clean_above_noisy"}


def test_a_run_logs_per_epoch_metrics_noisy_samples_and_its_hparams(data_dir, tmp_path):
    cli_main(
        short_run(
            data_dir,
            tmp_path,
            "fit",
            "--scales=[0.5]",
            "--seeds=[2]",
            "--data.noise_mode=resample",
            "--trainer.max_epochs=2",
        )
    )
    run_dir = tmp_path / "tb_logs" / "scale_0.5" / "version_0"
    acc = events(run_dir)
    grid = acc.Images("train/samples_clean_above_noisy")[0]
    assert (grid.width, grid.height) >= (8 * 30, 4 * 30)  # 16 clean above 16 noisy, 8 a row
    assert [s.step for s in acc.Scalars("val/acc")] == [1, 2]  # plotted against the epoch
    hparams = acc.summary_metadata
    assert "_hparams_/experiment" in hparams and "_hparams_/session_start_info" in hparams


def test_runs_never_overwrite_each_other(data_dir, tmp_path):
    for _ in range(2):
        cli_main(short_run(data_dir, tmp_path, "fit", "--scales=[0.1]"))
    assert sorted(p.name for p in (tmp_path / "tb_logs" / "scale_0.1").iterdir()) == ["version_0", "version_1"]


def test_a_short_clean_run_learns_and_test_validate_predict_work(data_dir, tmp_path):
    fit = cli_main(short_run(data_dir, tmp_path, "fit", batches=150))
    assert fit.trainer.callback_metrics["val/acc"] > 0.9  # 150 batches; chance is 0.1
    ckpt = tmp_path / "tb_logs" / "scale_0.0" / "version_0" / "checkpoints" / "last.ckpt"
    test = cli_main(short_run(data_dir, tmp_path, "test", f"--ckpt_path={ckpt}", batches=150))
    assert test.trainer.callback_metrics["test/acc"] > 0.9
    validate = cli_main(short_run(data_dir, tmp_path, "validate", f"--ckpt_path={ckpt}", batches=150))
    assert validate.trainer.callback_metrics["val/acc"] == test.trainer.callback_metrics["test/acc"]
    predict = cli_main(
        short_run(
            data_dir,
            tmp_path,
            "predict",
            f"--ckpt_path={ckpt}",
            "--return_predictions=true",
            "--trainer.limit_predict_batches=2",
        )
    )
    predictions = torch.cat(predict.trainer.predict_loop.predictions, dim=1)
    assert predictions.shape == (1, 256) and predictions.dtype == torch.int64  # [members, images]


def test_val_acc_matches_an_independent_evaluation(data_dir, tmp_path):
    cli = cli_main(short_run(data_dir, tmp_path, "fit", "--scales=[1.0]", batches=20))
    dm = cli.datamodule
    net = (
        cli.model.net.member(0).to(dm.device).eval()
    )  # the member as a plain DropoutMLP, where the images are (a GPU too)
    images, labels = dm.noisy_images("val", {0: torch.arange(20 * 128, device=dm.device)})
    with torch.no_grad(), cli.trainer.precision_plugin.forward_context():  # in the precision the run used
        logits = net(images[0]).float()
    expected = (logits.argmax(1) == labels[0]).float().mean().cpu()
    assert torch.isclose(cli.trainer.callback_metrics["val/acc"].cpu(), expected)
    loss = torch.nn.functional.cross_entropy(logits, labels[0]).cpu()
    assert torch.isclose(cli.trainer.callback_metrics["val/loss"].cpu(), loss, rtol=1e-5)  # batch-size weighted mean


def test_the_reference_path_is_a_switch(data_dir, tmp_path):
    fast = cli_main(short_run(data_dir, tmp_path, "fit", "--scales=[0.5]", batches=30))
    reference = cli_main(short_run(data_dir, tmp_path, "fit", "--scales=[0.5]", "--model.fast=false", batches=30))
    assert isinstance(reference.model.net, MemberLoop)  # torch's own modules, one member after another
    assert isinstance(reference.trainer.optimizers[0], type(torch.optim.RMSprop([torch.zeros(1)])))
    # other dropout draws, the same learning: both well above chance after 30 batches
    assert abs(fast.trainer.callback_metrics["val/acc"] - reference.trainer.callback_metrics["val/acc"]) < 0.05


@needs_native_bf16
def test_mixed_precision_is_selectable(data_dir, tmp_path):
    cli = cli_main(short_run(data_dir, tmp_path, "fit", "--trainer.precision=bf16-mixed", batches=20))
    assert cli.trainer.precision == "bf16-mixed"
    assert 0.3 < cli.trainer.callback_metrics["val/acc"] <= 1  # it learns under autocast too


@needs_native_bf16
def test_gradient_clipping_applies_under_bf16(data_dir, tmp_path):
    """Clipping reads the parameters' own gradients, so under bf16 the step takes autocast's casts, not the bf16
    copies (bf16.Bf16Copies): clipped to a norm of 1e-9, RMSprop's steps shrink far below its epsilon's scale."""
    options = ["--scales=[0.5]", "--trainer.precision=bf16-mixed", "--trainer.gradient_clip_val=1e-9"]
    cli = cli_main(short_run(data_dir, tmp_path, "fit", *options, batches=5))
    initial = NoiseClassifier(scales=[0.5]).net.weights[0]
    assert cli.model.net.weights[0].sub(initial).abs().max() < 1e-6  # unclipped: about 1e-3 a step


@needs_native_bf16
def test_another_optimizer_trains_under_bf16(data_dir, tmp_path):
    """The bf16 copies serve only the fast RMSprop, which updates from their gradients: another `--optimizer`
    reads the parameters' own, so under bf16 the forward pass takes autocast's casts and the weights move."""
    options = ["--scales=[0.5]", "--trainer.precision=bf16-mixed", "--optimizer=torch.optim.SGD", "--optimizer.lr=0.1"]
    cli = cli_main(short_run(data_dir, tmp_path, "fit", *options, batches=5))
    assert not isinstance(cli.trainer.optimizers[0], StackedRMSprop) and not cli.model.net.bf16_copies.enabled
    initial = NoiseClassifier(scales=[0.5]).net.weights[0]
    assert cli.model.net.weights[0].sub(initial).abs().max() > 1e-4


def test_the_sweep_takes_its_options_from_the_trainers_signature_and_runs_the_clis_method(capsys):
    """LightningCLI builds a subcommand's parser from the Trainer's method of that name and runs the CLI's
    method of that name when there is one; the study relies on both (the study tests run NoiseCLI.sweep)."""
    with pytest.raises(SystemExit):
        cli_main(["sweep", "--help"])
    text = capsys.readouterr().out
    assert "--out OUT" in text and "--task TASK" in text and "--gather {true,false}" in text and "--compare" in text
    assert "the study's folder. Rerunning the same command resumes" in text  # its docstring, as the option's help
    with pytest.raises(NotImplementedError, match="NoiseCLI.sweep"):
        StudyTrainer(logger=False, enable_checkpointing=False).sweep(None, None)


def test_certify_takes_its_options_from_the_trainers_signature_too(capsys):
    with pytest.raises(SystemExit):
        cli_main(["certify", "--help"])
    text = capsys.readouterr().out
    assert all(f"--{option} " in text for option in ("out", "sigma", "n0", "n", "alpha", "images"))
    assert "noise samples that select the class to certify" in text
    with pytest.raises(NotImplementedError, match="NoiseCLI.certify"):
        StudyTrainer(logger=False, enable_checkpointing=False).certify(None, None, "out")


def test_attack_takes_its_options_from_the_trainers_signature_too(capsys):
    with pytest.raises(SystemExit):
        cli_main(["attack", "--help"])
    text = capsys.readouterr().out
    options = ("out", "linf", "l2", "steps", "linf_step", "l2_step", "random_start", "losses", "images")
    assert all(f"--{option} " in text for option in options)
    assert "Carlini & Wagner's: does not saturate" in text
    with pytest.raises(NotImplementedError, match="NoiseCLI.attack"):
        StudyTrainer(logger=False, enable_checkpointing=False).attack(None, None, "out")


@needs_native_bf16
def test_bf16_with_counter_masks_is_bit_reproducible_and_learns_as_fp32(data_dir, tmp_path):
    """Two bf16 fits with counter masks end on the same bits; fp32 with the same masks, one option away, learns
    as much (the committed 20-epoch comparison is docs/results/fast)."""
    fast = ["--scales=[0.5]", "--seeds=[0, 1]", "--model.dropout_masks=counter", "--trainer.precision=bf16-mixed"]
    runs = [cli_main(short_run(data_dir, tmp_path / f"run{i}", "fit", *fast, batches=30)) for i in range(2)]
    fp32 = cli_main(short_run(data_dir, tmp_path / "fp32", "fit", *fast, "--trainer.precision=32-true", batches=30))
    assert runs[0].trainer.precision == "bf16-mixed" and fp32.trainer.precision == "32-true"
    for a, b in zip(runs[0].model.parameters(), runs[1].model.parameters()):
        assert torch.equal(a, b)
    accuracy = [cli.trainer.callback_metrics["val/acc"].item() for cli in (runs[0], fp32)]
    assert accuracy[0] > 0.5 and abs(accuracy[0] - accuracy[1]) < 0.02, accuracy  # chance: 0.1


def test_the_compiled_step_is_the_fast_paths(data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        cli_main(short_run(data_dir, tmp_path, "fit", "--model.compiled=true", "--model.fast=false"))
    assert exit.value.code != 0 and "`compiled` compiles the fast path's RMSprop step" in capsys.readouterr().err
    assert not (tmp_path / "tb_logs").exists()


def test_the_compiled_step_needs_a_compiler_and_says_so(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))  # no g++, c++ or clang++ to be found
    with pytest.raises(SystemExit) as exit:
        cli_main(short_run(data_dir, tmp_path, "fit", "--model.compiled=true"))
    assert exit.value.code != 0
    message = capsys.readouterr().err
    assert "`compiled`" in message and "C++ compiler" in message
    assert not (tmp_path / "tb_logs").exists()  # refused before any run folder was made


USER_NETWORKS = """
from torch import nn


class SevenLogits(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Flatten(), nn.Linear(784, 7))


class ColourImages(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
"""


@pytest.mark.parametrize(
    "network, message",
    [
        (
            "SevenLogits",
            "to map MNIST's images, [B, 1, 28, 28], to its 10 classes' logits, [B, 10], but it gave [2, 7] for B = 2",
        ),
        ("ColourImages", "to take MNIST's images, [B, 1, 28, 28], but it raised RuntimeError"),
    ],
)
def test_a_users_network_that_does_not_fit_mnist_is_named_before_anything_runs(
    network, message, data_dir, tmp_path, monkeypatch, capsys
):
    (tmp_path / "usernets.py").write_text(USER_NETWORKS)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit) as exit:
        cli_main(short_run(data_dir, tmp_path, "fit", f"--model.net=usernets.{network}"))
    assert exit.value.code == 2
    assert f"Expected `model.net` (usernets.{network}) {message}" in capsys.readouterr().err
    assert not (tmp_path / "tb_logs").exists()


def test_normalize_feeds_each_member_the_normalised_noisy_images():
    model = NoiseClassifier(scales=[0.0, 0.5], seeds=[0], normalize={"mean": [0.1307], "std": [0.3081]}).eval()
    images = torch.rand(2, 4, 1, 28, 28)
    torch.testing.assert_close(model(images), model.net((images - 0.1307) / 0.3081))
    with pytest.raises(ValueError, match="a mean and a std > 0 per channel"):
        NoiseClassifier(normalize={"mean": [0.5], "std": [0.0]})
