"""``python -m noise_robustness certify``: on a real (tiny) study, through the real CLI; its outputs, its resume,
and every bad input refused before anything is created."""

import csv
import shutil
from pathlib import Path

import pytest
import torch

from noise_robustness.certify.certification import COLUMNS
from noise_robustness.certify.smoothing import ABSTAIN
from noise_robustness.cli import cli_main
from noise_robustness.evaluation import subset
from tests.conftest import events, exits_with_error, rows, tiny

N = ["--n0=20", "--n=60", "--images=6"]  # a certification of seconds


@pytest.fixture(scope="module")
def study(data_dir, tmp_path_factory) -> Path:
    """A finished study of two seeds at σ = 0 and 0.5 (one epoch of 5 batches), certified once."""
    out = tmp_path_factory.mktemp("certify") / "study"
    cli_main(tiny(data_dir, out, "--data.noise_mode=resample", scales="[0, 0.5]", seeds="[0, 1]"))
    cli_main(certify(data_dir, out))
    return out


def certify(data_dir, *folders: Path, args: tuple[str, ...] = tuple(N)) -> list[str]:
    out = str(folders[0]) if len(folders) == 1 else f"[{', '.join(map(str, folders))}]"
    return ["certify", f"--out={out}", f"--data.data_dir={data_dir}", *args]


def folder(study: Path) -> Path:
    return study / "certify" / "n0=20,n=60,alpha=0.001,images=6,sigma=trained"


def test_certify_writes_a_row_per_image_for_each_noisy_member(study):
    for seed in (0, 1):
        certified = rows(folder(study) / "members" / "sigma=0.5" / f"seed={seed}.csv")
        assert certified[0]["_columns"] == list(COLUMNS)
        assert [int(r["image"]) for r in certified] == subset(10_000, 6)
        for row in certified:
            counts = [int(c) for c in row["counts"].split()]
            assert sum(counts) == 60 and len(counts) == 10
            abstained = int(row["prediction"]) == ABSTAIN
            assert (float(row["radius"]) == 0) == abstained or float(row["p_lower"]) > 0.5
            assert int(row["correct"]) == (int(row["prediction"]) == int(row["label"]))
    assert not (folder(study) / "members" / "sigma=0").exists()  # trained clean: nothing to smooth with


def test_certify_reports_certified_accuracy_against_radius_and_logs_each_member(study):
    summary = (folder(study) / "summary.md").read_text()
    assert "| trained at σ | r = 0 |" in summary and "| 0.5 |" in summary
    assert (folder(study) / "certified_accuracy.png").stat().st_size > 10_000
    run = events(study / "tensorboard" / "sigma=0.5" / "seed=0")
    tag = "certify/n0=20,n=60,alpha=0.001,images=6,sigma=trained/certified_acc"
    certified = rows(folder(study) / "members" / "sigma=0.5" / "seed=0.csv")
    at_zero = sum(int(r["correct"]) for r in certified) / len(certified)
    assert run.Scalars(tag)[0].step == 0 and run.Scalars(tag)[0].value == pytest.approx(at_zero)


def test_a_certification_resumes_to_the_same_numbers_and_a_finished_one_certifies_nothing(study, data_dir, capsys):
    member = folder(study) / "members" / "sigma=0.5" / "seed=1.csv"
    before = member.read_text()
    lines = before.splitlines(keepends=True)
    member.write_text("".join(lines[:3]))  # interrupted after two images
    capsys.readouterr()
    cli_main(certify(data_dir, study))
    assert "images 3 to 6" in capsys.readouterr().err
    assert member.read_text() == before
    cli_main(certify(data_dir, study))
    assert "every member certified earlier" in capsys.readouterr().err


def test_a_named_sigma_smooths_every_member_clean_ones_too(study, data_dir, tmp_path):
    copy = tmp_path / "study"
    shutil.copytree(study, copy, ignore=shutil.ignore_patterns("certify", "tensorboard"))
    cli_main(certify(data_dir, copy, args=(*N, "--sigma=0.25")))
    smoothed = copy / "certify" / "n0=20,n=60,alpha=0.001,images=6,sigma=0.25" / "members"
    assert sorted(p.relative_to(smoothed).as_posix() for p in smoothed.rglob("*.csv")) == [
        "sigma=0.5/seed=0.csv", "sigma=0.5/seed=1.csv", "sigma=0/seed=0.csv", "sigma=0/seed=1.csv"
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--sigma=0",), "Expected `sigma` to be a finite number > 0"),
        (("--sigma=-1",), "Expected `sigma` to be a finite number > 0"),
        (("--sigma=nan",), 'key "sigma"'),  # jsonargparse's own message, naming the option
        (("--n0=0",), "Expected `n0` to be a positive integer"),
        (("--n=-5",), "Expected `n` to be a positive integer"),
        (("--alpha=1",), "Expected `alpha` to be in (0, 1)"),
        (("--alpha=0",), "Expected `alpha` to be in (0, 1)"),
        (("--images=10001",), "Expected `images` to be at most the 10000 validation images"),
        (("--model.lr=0.1",), "`model.lr` is not an option of `certify`"),
        (("--scales=[1.0]",), "`scales` is not an option of `certify`"),
    ],
    ids=["sigma0", "sigma-negative", "sigma-nan", "n0", "n", "alpha1", "alpha0", "images", "model", "scales"],
)
def test_bad_options_are_refused_naming_them_before_anything_is_created(args, message, study, data_dir, capsys):
    before = sorted(study.rglob("*"))
    assert message in exits_with_error(certify(data_dir, study, args=(*N, *args)), capsys)
    assert sorted(study.rglob("*")) == before


def test_a_folder_that_is_no_finished_study_with_weights_is_refused(study, data_dir, tmp_path, capsys):
    assert "is not a study folder" in exits_with_error(certify(data_dir, tmp_path), capsys)
    copy = tmp_path / "copy"
    shutil.copytree(study, copy, ignore=shutil.ignore_patterns("certify"))
    (copy / "members" / "sigma=0.5" / "seed=1.pt").unlink()  # a study trained before weights were kept
    message = exits_with_error(certify(data_dir, copy), capsys)
    assert f"{copy}/members/sigma=0.5/seed=1.pt does not exist" in message and "train the study anew" in message
    weights = copy / "members" / "sigma=0.5" / "seed=0.pt"
    saved = torch.load(weights, weights_only=True)
    saved["weights"]["1.weight"][0, 0] += 1  # a flipped weight
    torch.save(saved, weights)
    assert f"{weights} is damaged" in exits_with_error(certify(data_dir, copy), capsys)
    (copy / "members" / "sigma=0.5" / "seed=0.json").unlink()
    message = exits_with_error(certify(data_dir, copy), capsys)
    assert "Expected `out` to name finished studies" in message and "sigma=0.5/seed=0" in message
    assert not (copy / "certify").exists()


def test_the_rows_agree_with_the_summary(study):
    """The summary's certified accuracy at r = 0, recomputed from the member files."""
    summary = (folder(study) / "summary.md").read_text()
    shares = []
    for seed in (0, 1):
        with open(folder(study) / "members" / "sigma=0.5" / f"seed={seed}.csv", newline="") as f:
            certified = list(csv.DictReader(f))
        shares.append(100 * sum(int(r["correct"]) for r in certified) / len(certified))
    mean = sum(shares) / 2
    assert f"| 0.5 | {mean:.1f} ± " in summary
