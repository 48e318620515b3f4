"""A user's Lightning loggers in a study: one run per member of each, beside the study's own TensorBoard runs."""

import csv
from pathlib import Path

import pytest
import yaml

from noise_robustness.cli import cli_main
from tests.conftest import events, exits_with_error, short_run, tiny

NAMELESS_LOGGER = '''
from pytorch_lightning.loggers import Logger


class Nameless(Logger):
    """A logger whose runs cannot be told apart: it takes no version, run_name or name."""

    def __init__(self, where: str = "nowhere"):
        super().__init__()

    name = version = None

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass
'''


def metrics_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def logged(data_dir, tmp_path_factory) -> Path:
    """A two-epoch study of two members with a CSVLogger and a TensorBoardLogger of the user's, from a config file."""
    root = tmp_path_factory.mktemp("logged")
    config = {
        "trainer": {
            "logger": [
                {"class_path": "CSVLogger", "init_args": {"save_dir": str(root / "csv")}},
                {"class_path": "TensorBoardLogger", "init_args": {"save_dir": str(root / "tb"), "name": "mine"}},
            ]
        }
    }
    (root / "loggers.yaml").write_text(yaml.safe_dump(config))
    cli_main(tiny(data_dir, root / "study", f"--config={root / 'loggers.yaml'}", "--epochs=2"))
    return root


def test_a_csv_logger_gets_one_metrics_file_per_member_with_each_epochs_metrics(logged):
    results = {(float(r["noise_scale"]), r["seed"]): r for r in metrics_rows(logged / "study" / "results.csv")}
    for run, key in (("sigma=0/seed=0", (0.0, "0")), ("sigma=1/seed=0", (1.0, "0"))):
        folder = logged / "csv" / "lightning_logs" / run
        epochs = metrics_rows(folder / "metrics.csv")
        assert [row["step"] for row in epochs] == ["1", "2"]
        assert {"train/acc", "train/loss", "val/acc", "val/loss"} <= set(epochs[0])
        # the last epoch's validation accuracy is the member's result, the same number
        assert float(epochs[-1]["val/acc"]) == pytest.approx(float(results[key]["val_acc"]), abs=1e-6)
        hparams = yaml.safe_load((folder / "hparams.yaml").read_text())
        assert (hparams["sigma"], hparams["seed"], hparams["network"]) == (key[0], 0, "DropoutMLP")


def test_with_two_loggers_both_are_written_and_the_study_keeps_its_own_runs(logged):
    for runs in (logged / "tb" / "mine", logged / "study" / "tensorboard"):
        for run in ("sigma=0/seed=0", "sigma=1/seed=0"):
            tags = events(runs / run).Tags()
            assert {"train/acc", "val/acc"} <= set(tags["scalars"]), (runs, tags)
            assert "val/samples_clean_above_noisy" in tags["images"]


def test_a_logger_that_takes_images_gets_the_studys_figures_in_a_run_of_their_own(logged):
    images = set(events(logged / "tb" / "mine" / "study").Tags()["images"])
    assert {"study/accuracy_vs_noise", "study/noise_preview", "study/robustness"} <= images, images
    assert not (logged / "csv" / "lightning_logs" / "study").exists()  # CSV takes numbers only


def test_a_new_study_does_not_write_into_another_studys_runs(logged, data_dir, capsys):
    out = logged / "another"
    message = exits_with_error(tiny(data_dir, out, f"--config={logged / 'loggers.yaml'}"), capsys)
    assert "Expected `trainer.logger` to write new runs, but" in message and "sigma=0/seed=0" in message, message
    assert not out.exists()


@pytest.mark.parametrize(
    "option, named",
    [
        ("--trainer.logger=false", "a study always writes each member's TensorBoard run"),
        ("--trainer.logger=lognames.Nameless", "lognames.Nameless to name a run"),
        ("--trainer.logger=WandbLogger", "WandbLogger to hold a run per member, but it logs every logger"),
    ],
)
def test_a_logger_the_study_cannot_serve_is_refused_before_anything_is_made(
    option, named, data_dir, tmp_path, monkeypatch, capsys
):
    (tmp_path / "lognames.py").write_text(NAMELESS_LOGGER)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "study"
    message = exits_with_error(tiny(data_dir, out, option), capsys)
    assert "Expected `trainer.logger`" in message and named in message, message
    assert not out.exists()


def test_a_fit_logs_its_members_metrics_to_a_users_logger(data_dir, tmp_path):
    cli_main(
        short_run(data_dir, tmp_path, "fit", "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={tmp_path}")
    )
    (metrics,) = tmp_path.glob("scale_0.0/version_0/metrics.csv")  # named after the run, as TensorBoard runs are
    assert {"train/acc", "val/acc"} <= set(metrics_rows(metrics)[0])
