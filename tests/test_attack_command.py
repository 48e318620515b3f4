"""``python -m noise_robustness attack``: on a real (tiny) certified study, through the real CLI; its numbers against
their properties, its resume, SmoothAdv against the certification, and every bad input refused before anything is
created."""

import shutil
from pathlib import Path

import pytest
import yaml

from noise_robustness.attacks.attack import ACCURACY_COLUMNS, SMOOTHADV_COLUMNS
from noise_robustness.cli import cli_main
from noise_robustness.study.folder import Study
from tests.conftest import exits_with_error, rows, tiny

SMALL = ["--images=24", "--steps=5", "--linf=[0.1, 0.3]", "--l2=[1.0, 3.0]", "--smoothadv_steps=2",
         "--smoothadv_samples=4"]  # fmt: skip
NAME = "images=24,steps=5,linf_step=0.01,l2_step=2.5eps_over_steps,random_start=false,losses=ce+margin,smoothadv=2x4"


@pytest.fixture(scope="module")
def study(data_dir, tmp_path_factory) -> Path:
    """A finished study of two seeds at σ = 0 and 0.5 (one epoch of 20 batches), certified, then attacked."""
    out = tmp_path_factory.mktemp("attack") / "study"
    cli_main(tiny(data_dir, out, "--data.noise_mode=resample", scales="[0, 0.5]", seeds="[0, 1]", batches=20))
    cli_main(["certify", f"--out={out}", f"--data.data_dir={data_dir}", "--n0=20", "--n=100", "--images=12"])
    cli_main(attack(data_dir, out))
    return out


def attack(data_dir, out: Path, *args: str) -> list[str]:
    return ["attack", f"--out={out}", f"--data.data_dir={data_dir}", *SMALL, *args]


def accuracy(study: Path, loss: str = "worst") -> dict[tuple, dict[tuple, float]]:
    """(σ, seed) -> (norm, ε) -> accuracy under ``loss``'s attack (and clean), from ``accuracy.csv``."""
    table: dict = {}
    for r in rows(study / "attack" / NAME / "accuracy.csv"):
        if r["loss"] not in (loss, "none"):
            continue
        table.setdefault((float(r["noise_scale"]), int(r["seed"])), {})[r["norm"], float(r["eps"])] = float(r["acc"])
    return table


def test_every_member_is_attacked_at_every_eps_and_never_gains_accuracy(study):
    written = rows(study / "attack" / NAME / "accuracy.csv")
    # clean, then two L∞ and two L2 attacks, each with either loss and the worst of them
    assert written[0]["_columns"] == list(ACCURACY_COLUMNS) and len(written) == 4 * (1 + 4 * 3)
    assert all(int(r["images"]) == 24 and float(r["acc"]) == int(r["correct"]) / 24 for r in written)
    ce, margin = accuracy(study, "ce"), accuracy(study, "margin")
    for member, acc in accuracy(study).items():
        for attack, value in acc.items():  # an image counts if neither attack flipped it
            assert value <= min(ce[member][attack], margin[member][attack])
        clean = acc["none", 0.0]
        assert clean > 0.3, member  # trained: far above chance, so the attack has something to take
        for norm in ("linf", "l2"):
            curve = [clean] + [acc[norm, eps] for eps in sorted(e for n, e in acc if n == norm)]
            assert curve == sorted(curve, reverse=True), (member, norm, curve)
        assert acc["l2", 3.0] < clean  # a large ball: some images flip


def test_the_clean_accuracy_is_the_members_own_prediction_on_those_images(study, data_dir):
    """The attack's clean row: each member's network alone, loaded from its weights file, on the same images."""
    import torch

    from noise_robustness import evaluation

    opened = Study.open(study)
    data = evaluation.study_data(opened, data_dir, 24)
    images, labels = evaluation.subset_images(data, evaluation.subset(data.split_size("val"), 24))
    nets = evaluation.member_networks(opened, evaluation.member_weights(opened, opened.members))
    table = accuracy(study)
    for member, net in zip(opened.members, nets):
        with torch.no_grad():
            right = (net(images).argmax(-1) == labels).sum().item() / len(labels)
        assert table[member.noise_scale, member.seed]["none", 0.0] == pytest.approx(right, abs=1e-12)


def test_the_report_has_a_row_per_training_sigma_with_its_area_and_a_figure(study):
    summary = (study / "attack" / NAME / "summary.md").read_text()
    assert "| trained on | clean | L∞ 0.1 | L∞ 0.3 | L∞ AUC | L2 1 | L2 3 | L2 AUC |" in summary
    assert "### DropoutMLP: PGD with every loss (ce and margin" in summary and "the cross-entropy alone" in summary
    assert "| σ = 0 |" in summary and "| σ = 0.5 |" in summary
    assert (study / "attack" / NAME / "robust_accuracy.png").stat().st_size > 10_000
    recorded = yaml.safe_load((study / "attack" / NAME / "attack.yaml").read_text())
    assert recorded["study_id"] == Study.open(study).study_id and recorded["steps"] == 5


def test_smoothadv_never_finds_less_accuracy_than_the_certificate_guarantees(study):
    written = rows(study / "attack" / NAME / "smoothadv.csv")
    assert written[0]["_columns"] == list(SMOOTHADV_COLUMNS)
    assert {float(r["noise_scale"]) for r in written} == {0.5}  # the certified members: trained with noise
    assert {int(r["images"]) for r in written} == {12}  # the certification's images
    radii = sorted({float(r["radius"]) for r in written})
    assert radii[0] == 0 and all(b - a == 0.25 for a, b in zip(radii, radii[1:]))
    assert all(float(r["certified_acc"]) <= float(r["smoothadv_acc"]) for r in written)
    summary = (study / "attack" / NAME / "summary.md").read_text()
    assert "## Certified against empirical" in summary and "| yes |" in summary and "**no**" not in summary


def test_an_attack_resumes_after_its_last_written_attack_and_more_eps_add_rows(study, data_dir, capsys):
    file = study / "attack" / NAME / "accuracy.csv"
    before = file.read_text()
    lines = before.splitlines(keepends=True)
    file.write_text("".join(lines[: 1 + 4 + 2 * 12 + 5]))  # stopped after the L∞ attacks and one L2 member row
    capsys.readouterr()
    cli_main(attack(data_dir, study))
    err = capsys.readouterr().err
    assert "PGD l2 ε = 1" in err and "PGD linf" not in err
    assert file.read_text() == before  # the same numbers: PGD from the clean image is deterministic
    cli_main(attack(data_dir, study))
    assert "every attack of this command written earlier" in capsys.readouterr().err
    cli_main(attack(data_dir, study, "--linf=[0.1, 0.2, 0.3]"))
    assert "PGD linf ε = 0.2" in capsys.readouterr().err
    assert file.read_text().startswith(before) and len(rows(file)) == 4 * (1 + 5 * 3)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--linf=[-0.1]",), "Expected every ε of `linf` to be a finite number >= 0"),
        (("--l2=[inf]",), 'key "l2"'),  # jsonargparse's own message, naming the option
        (("--steps=0",), "Expected `steps` to be a positive integer"),
        (("--linf_step=0",), "Expected `linf_step` to be a finite number > 0"),
        (("--images=0",), "Expected `images` to be a positive integer"),
        (("--images=10001",), "Expected `images` to be at most the 10000 validation images"),
        (("--smoothadv_samples=0",), "Expected `smoothadv_samples` to be a positive integer"),
        (("--losses=[ce, dlr]",), "Expected `losses` to name some of ('ce', 'margin'), each once"),
        (("--losses=[]",), "Expected `losses` to name some of ('ce', 'margin'), each once"),
        (("--linf=[]", "--l2=[]"), "Expected `linf` or `l2` to name some ε, but both are empty"),
        (("--norm=l1",), "`norm` is not an option of `attack`"),
        (("--model.lr=0.1",), "`model.lr` is not an option of `attack`"),
    ],
    ids=[
        "linf-negative",
        "l2-inf",
        "steps",
        "linf-step",
        "images0",
        "images",
        "samples",
        "loss",
        "no-loss",
        "no-eps",
        "norm",
        "model",
    ],  # fmt: skip
)
def test_bad_options_are_refused_naming_them_before_anything_is_created(args, message, study, data_dir, capsys):
    before = sorted(study.rglob("*"))
    assert message in exits_with_error(attack(data_dir, study, *args), capsys)
    assert sorted(study.rglob("*")) == before


def test_a_study_without_finished_members_or_with_another_attack_recorded_is_refused(study, data_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(study, copy, ignore=shutil.ignore_patterns("attack", "certify", "tensorboard"))
    (copy / "members" / "sigma=0.5" / "seed=0.json").unlink()
    message = exits_with_error(attack(data_dir, copy), capsys)
    assert "Expected `out` to name finished studies" in message and "sigma=0.5/seed=0" in message
    assert not (copy / "attack").exists()
    other = tmp_path / "other"
    shutil.copytree(study, other, ignore=shutil.ignore_patterns("tensorboard"))
    record = other / "attack" / NAME / "attack.yaml"
    record.write_text(record.read_text().replace("study_id:", "study_id: x"))
    assert "records another evaluation" in exits_with_error(attack(data_dir, other), capsys)


@pytest.mark.slow  # three attack commands: the default tier's time (CI runs it)
def test_random_starts_are_each_attacks_own_whatever_ran_before_it(study, data_dir, tmp_path):
    """With random starts, an ε's rows are the same whether it came alone or after another ε (as a resumed command
    skips the ε written before it)."""
    copies = []
    for name, commands in (("alone", [["--linf=[0.3]"]]), ("after another", [["--linf=[0.1, 0.3]"]])):
        copy = tmp_path / name
        shutil.copytree(study, copy, ignore=shutil.ignore_patterns("attack", "certify", "tensorboard"))
        for args in commands:
            cli_main(attack(data_dir, copy, *args, "--l2=[]", "--random_start=true", "--losses=[ce]"))
        folder = copy / "attack" / NAME.replace("random_start=false,losses=ce+margin", "random_start=true,losses=ce")
        copies.append([r for r in rows(folder / "accuracy.csv") if r["eps"] == "0.3"])
    assert copies[0] == copies[1] and len(copies[0]) == 2 * 4  # the ce row and the worst row of each member
