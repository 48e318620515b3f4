"""The study from Python: ``sweep``, ``certify``, ``attack`` and ``load`` take plain arguments and return what a study
wrote.

Each call runs the same command as ``python -m noise_robustness ...`` in this process (the same parser, checks,
folder and numbers), so a study started in a notebook can be resumed, extended or gathered from a shell and back::

    from noise_robustness import api
    study = api.sweep("sweeps/quick", scales=[0, 1.0], seeds=[0], epochs=1)
    [(row["noise_scale"], row["train_acc"], row["val_acc"]) for row in study.results]
    images = api.noisy_images([0, 0.5, 1.0], count=8)  # [3 σ, 8 images, 1, 28, 28]

``examples/noise_study.ipynb`` is the seed study through these calls.
"""

import csv
from dataclasses import dataclass
from pathlib import Path

import torch

from noise_robustness.cli import cli_main
from noise_robustness.data.datamodule import NoisyMNISTDataModule
from noise_robustness.study.measures import robustness_matrix, with_ece


@dataclass
class StudyResults:
    """What a finished study's folder holds: one row per member (``results``: σ, seed, final train and validation
    accuracy and loss), one per member and evaluation cell (``robustness``), and ``summary.md``'s tables."""

    out: Path
    results: list[dict]
    robustness: list[dict]
    summary: str

    def matrix(self) -> dict[tuple[str, float], dict[tuple[str, float], float]]:
        """The robustness pass as a train × evaluation matrix: (training corruption, severity) -> (evaluation
        corruption, severity) -> validation accuracy, the mean over the members' seeds."""
        return robustness_matrix(self.robustness)

    def calibration(self) -> dict[tuple[str, float], dict[tuple[str, float], float]]:
        """The same matrix of each member's expected calibration error (ECE), the mean over the members' seeds."""
        return robustness_matrix(with_ece(self.robustness), value="ece")

    def figure(self, name: str = "accuracy_vs_noise.png") -> Path:
        """A figure of the study's report (``accuracy_vs_noise.png``, ``robustness.png``, ``noise_preview.png``,
        ``calibration.png``)."""
        return self.out / name

    def _repr_markdown_(self) -> str:  # a notebook shows the summary's tables
        return self.summary


def load(out: str | Path) -> StudyResults:
    """The results of the finished study in ``out``, as its ``results.csv``, ``robustness.csv`` and ``summary.md``."""
    out = Path(out)

    def table(name: str) -> list[dict]:
        with open(out / name, newline="") as f:
            return [{key: value_of(key, text) for key, text in row.items()} for row in csv.DictReader(f)]

    return StudyResults(out, table("results.csv"), table("robustness.csv"), (out / "summary.md").read_text())


TEXT = {
    "network",
    "corruption",
    "train_corruption",
    "eval_corruption",
    "noise_mode",
    "study_id",
    "precision",
}  # csv columns


def value_of(column: str, text: str):
    """A csv cell as the value it was written from: text, a bool (``clip``), an int (``seed``, ``epochs``), a float;
    None for an empty cell (the ``ece`` of a member trained before it was measured)."""
    if column in TEXT:
        return text
    if text == "":
        return None
    if column == "clip":
        return text == "True"
    return int(text) if column in ("seed", "epochs") else float(text)


def sweep(
    out: str | Path,
    scales: list[float] | None = None,
    seeds: list[int] | None = None,
    epochs: int | None = None,
    net: str | None = None,
    data_dir: str | Path | None = None,
    options: list[str] = (),
) -> StudyResults:
    """Trains the study in ``out`` (resuming or extending it) and returns its results: ``python -m noise_robustness
    sweep`` with these options. None leaves an option at the command's default (6 σ, 3 seeds, 20 epochs, the dropout
    MLP); ``options`` are further command-line options, ``["--data.noise_mode=resample"]``.

    Raises:
        RuntimeError: the command stopped (bad options, a study that cannot go on); the message above says why.
    """
    args = ["sweep", f"--out={out}"]
    args += [] if scales is None else [f"--scales={list(scales)}"]
    args += [] if seeds is None else [f"--seeds={list(seeds)}"]
    args += [] if epochs is None else [f"--epochs={epochs}"]
    args += [] if net is None else [f"--model.net={net}"]
    args += [] if data_dir is None else [f"--data.data_dir={data_dir}"]
    run(args + list(options))
    return load(out)


def certify(out: str | Path | list, options: list[str] = ()) -> str:
    """Certifies the finished studies in ``out`` (a folder or a list of them) by randomized smoothing: ``python -m
    noise_robustness certify``; returns the certification's ``summary.md`` (of the first study)."""
    folders = [str(f) for f in out] if isinstance(out, list) else [str(out)]
    cli = run(["certify", f"--out=[{', '.join(folders)}]", *options])
    return (cli.evaluations[0].folder / "summary.md").read_text()


def attack(out: str | Path | list, options: list[str] = ()) -> str:
    """Attacks every member of the finished studies in ``out`` (a folder or a list of them) with PGD, and their
    certified members with SmoothAdv: ``python -m noise_robustness attack``; returns the attack's ``summary.md`` (of the
    first study)."""
    folders = [str(f) for f in out] if isinstance(out, list) else [str(out)]
    cli = run(["attack", f"--out=[{', '.join(folders)}]", *options])
    return (cli.evaluations[0].folder / "summary.md").read_text()


def run(args: list[str]):
    """``cli_main(args)``, its exit turned into an exception a notebook shows without ending the kernel."""
    try:
        return cli_main(args)
    except SystemExit as stop:
        raise RuntimeError(f"`{args[0]}` stopped with exit code {stop.code}: the message above says why") from None


def noisy_images(
    scales: list[float], count: int = 8, seed: int = 0, data_dir: str | Path = "data", split: str = "val"
) -> torch.Tensor:
    """The first ``count`` images of ``split`` with each σ's noise as the study's members of ``seed`` see them:
    ``[len(scales), count, 1, 28, 28]``, pixels in [0, 1] before the noise (noisy values are not clipped)."""
    data = NoisyMNISTDataModule(scales=list(scales), seeds=[seed], data_dir=str(data_dir))
    data.prepare_data()
    data.setup()
    images, _ = data.noisy_images(split, {seed: torch.arange(count)})
    return images
