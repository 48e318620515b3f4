"""The README's and docs/results.md's commands are the ones that run, and their numbers are the committed results':
CI's test command is the README's, to the letter."""

import csv
import io
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from noise_robustness.attacks.attack import Attack
from noise_robustness.attacks.attack import Setting as AttackSetting
from noise_robustness.attacks.report import NORMS
from noise_robustness.attacks.report import summary_markdown as attack_summary
from noise_robustness.certify.certification import Certification, Setting
from noise_robustness.certify.report import gathered, summary_markdown
from noise_robustness.cli import NoiseCLI, cli_main
from noise_robustness.study.folder import Study, compared_rows

REPO = Path(__file__).parents[1]
FRONT = ("README.md", "docs/results.md")  # the front door and the findings it links to: what a reader copies
MEAN_STD = re.compile(r"(\d+\.\d\d) ± (\d+\.\d\d)")  # a result as the tables print it: "98.38 ± 0.08"


def front_text() -> str:
    return "\n".join((REPO / name).read_text() for name in FRONT)


def readme_commands() -> list[str]:
    """Every command line in the bash blocks of the README and docs/results.md."""
    blocks = re.findall(r"```bash\n(.*?)```", front_text(), flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command():
    tests = [c for c in readme_commands() if c.endswith("python -m pytest")]
    assert len(tests) == 1 and tests[0].startswith("python3 -m venv .venv && .venv/bin/pip install")
    assert tests[0] in (REPO / ".ci" / "run").read_text().splitlines()


def test_every_study_command_in_the_readme_parses(capsys):
    """What a reader copies runs: each ``python -m noise_robustness ...`` in the README is a valid command."""
    studies = [c.split("python -m noise_robustness ", 1)[1] for c in readme_commands() if "-m noise_robustness " in c]
    assert studies[0] == "sweep"  # the main job needs no committed folder
    for command in studies:
        with pytest.raises(SystemExit) as exit:
            cli_main([*shlex.split(command, comments=True), "--print_config"])
        assert exit.value.code in (0, None), command
        assert "out:" in capsys.readouterr().out


def test_every_config_the_readme_names_exists():
    readme = front_text()
    for path in set(re.findall(r"(?:configs|scripts|benchmarks|examples)/[\w./]+\.(?:yaml|sh|py|ipynb)", readme)):
        assert (REPO / path).is_file(), path


def test_the_compared_cnn_study_is_the_main_study_with_the_other_network():
    """The main command's CNN partner (made on this machine type by the same command with ``--model.net``) differs
    from the main job's study in the network only, recipe included, so the summary names no difference."""
    mlp, cnn = (
        yaml.safe_load((REPO / "docs" / "results" / name / "study.yaml").read_text()) for name in ("noise_sweep", "cnn")
    )
    assert mlp.pop("model.net")["class_path"] == "noise_robustness.models.DropoutMLP"
    assert cnn.pop("model.net")["class_path"] == "noise_robustness.models.KerasCNN"
    assert cnn == mlp  # same data, optimizer, epochs, precision and masks: the networks differ in architecture only
    assert (REPO / "docs" / "results" / "cnn" / "results.csv").read_text().count("KerasCNN,") == 18
    results, _, _ = compared_rows(REPO / "docs" / "results" / "cnn", mlp | {"model.net": {"class_path": "x"}})
    assert len(results) == 18  # what the main command reads: every member's file, of that study
    summary = (REPO / "docs" / "results" / "noise_sweep" / "summary.md").read_text()
    assert "KerasCNN" in summary and "trained otherwise" not in summary


def test_the_h100_cnn_study_is_the_first_recipe():
    """The CNN study the main command compared with before (fp32, a dropout generator per member, on an H100)."""
    first, h100 = (
        yaml.safe_load((REPO / "docs" / "results" / name / "study.yaml").read_text())
        for name in ("first_recipe", "cnn_h100")
    )
    assert h100.pop("model.net")["class_path"] == "noise_robustness.models.KerasCNN"
    assert first.pop("model.net")["class_path"] == "noise_robustness.models.DropoutMLP"
    assert h100 == first


FIRST_RECIPE = "--config=configs/first_recipe.yaml"  # fp32, a dropout generator per member: studies made before
# How each committed study was made: the command its README (or the README) gives, the folder left out. Where the
# command leaves the precision to `auto`, the precision it chose there is named, so that a machine that chooses
# otherwise checks the same study.
COMMITTED_STUDIES = {
    "noise_sweep": ["--trainer.precision=bf16-mixed"],  # the main job, made where `auto` chose bf16
    "noise_sweep_fp32": ["--trainer.precision=32-true"],
    "resample": ["--data.noise_mode=resample", "--trainer.precision=bf16-mixed"],
    "original_units": ["--config=configs/sweep_original_units.yaml", "--trainer.precision=bf16-mixed"],
    "fast": ["--config=configs/fast.yaml", "--trainer.precision=bf16-mixed"],
    "fast_fp32": ["--config=configs/fast.yaml", "--trainer.precision=32-true"],
    "first_recipe": [FIRST_RECIPE],
    "noise_sweep_h100": [FIRST_RECIPE],
    "cnn": ["--model.net=noise_robustness.models.KerasCNN", "--trainer.precision=bf16-mixed"],
    "cnn_h100": [FIRST_RECIPE, "--model.net=noise_robustness.models.KerasCNN"],
    "cnn_h200": ["--model.net=noise_robustness.models.KerasCNN", "--trainer.precision=bf16-mixed"],
    "cnn_h200_fp32": ["--model.net=noise_robustness.models.KerasCNN", "--trainer.precision=32-true"],
    "corruptions": [FIRST_RECIPE, "--config=configs/corruptions.yaml"],
    "corruptions_cnn": [FIRST_RECIPE, "--config=configs/corruptions.yaml", "--config=configs/corruptions_cnn.yaml"],
    "smoothing_mlp": [FIRST_RECIPE, "--config=configs/smoothing_mlp.yaml"],
    "smoothing_cnn": [FIRST_RECIPE, "--config=configs/smoothing_cnn.yaml"],
    # the same two commands remade on another CPU, with the robustness pass's calibration, then attacked
    "noise_sweep_epyc": ["--trainer.precision=bf16-mixed"],
    "smoothing_mlp_epyc": [FIRST_RECIPE, "--config=configs/smoothing_mlp.yaml"],
}


@pytest.mark.slow  # 16 studies planned, 9 s: the default tier's time (CI runs it)
def test_every_committed_study_is_what_its_command_makes_today(tmp_path, monkeypatch):
    """A default or a config that moved under a committed study (its command would now make another) fails here."""
    assert sorted(COMMITTED_STUDIES) == sorted(p.parent.name for p in (REPO / "docs" / "results").glob("*/study.yaml"))
    monkeypatch.setattr(NoiseCLI, "sweep", lambda self, *args, **kwargs: None)  # the real command, planned, not run
    for folder, options in COMMITTED_STUDIES.items():
        cli = cli_main(["sweep", *options, f"--out={tmp_path / folder}"])
        recorded = yaml.safe_load((REPO / "docs" / "results" / folder / "study.yaml").read_text())
        assert cli.plan.study.identity == recorded, folder


def test_every_result_the_readme_quotes_is_in_a_committed_summary():
    """A number the README or docs/results.md quotes that is not in the committed results (stale, mistyped,
    hand-made) fails here."""
    quoted = set(MEAN_STD.findall(front_text()))
    committed = {
        pair for path in (REPO / "docs" / "results").glob("*/summary.md") for pair in MEAN_STD.findall(path.read_text())
    }
    assert len(quoted) > 30
    assert quoted <= committed, sorted(quoted - committed)


CERTIFIED = re.compile(
    r"(\d+\.\d) ± (\d+\.\d)(?!\d)"
)  # certified accuracy as certify's summary prints it: "97.2 ± 0.3"


def test_every_certified_accuracy_the_readme_quotes_is_in_the_committed_certification():
    section = front_text().split("## Certified robustness", 1)[1].split("\n## ", 1)[0]
    quoted = set(CERTIFIED.findall(section))
    committed = {
        pair
        for path in (REPO / "docs" / "results").glob("smoothing_*/certify/*/summary.md")
        for pair in CERTIFIED.findall(path.read_text())
    }
    assert len(quoted) >= 10
    assert quoted <= committed, sorted(quoted - committed)


# the studies each committed `certify` command named: its summary covers them all, side by side
CERTIFY_COMMANDS = [("smoothing_mlp", "smoothing_cnn"), ("smoothing_mlp_epyc",)]


def test_the_committed_certification_summary_is_what_its_member_rows_give():
    """summary.md recomputed from the committed per-image rows: a hand-edited or stale number fails here."""
    folders = sorted((REPO / "docs" / "results").glob("smoothing_*/certify/*"))
    assert sorted(f.parents[1].name for f in folders) == sorted(n for names in CERTIFY_COMMANDS for n in names)
    for names in CERTIFY_COMMANDS:
        certifications = []
        for folder in [f for f in folders if f.parents[1].name in names]:
            recorded = yaml.safe_load((folder / "certify.yaml").read_text())
            setting = Setting(recorded["n0"], recorded["n"], recorded["alpha"], recorded["images"], recorded["sigma"])
            study = Study.open(folder.parents[1])
            members = [m for m in study.members if m.noise_scale > 0]
            certification = Certification(study, setting, members, [m.noise_scale for m in members], [])
            assert certification.folder == folder
            certifications.append(certification)
        for certification in certifications:
            assert (certification.folder / "summary.md").read_text() == summary_markdown(gathered(certifications))


def committed_attacks() -> list[tuple[Attack, list[dict], list[dict]]]:
    """Every committed attack, its setting read back from its record and rows, with its accuracy and SmoothAdv rows."""
    attacks = []
    for record in sorted((REPO / "docs" / "results").glob("*/attack/*/attack.yaml")):
        recorded = yaml.safe_load(record.read_text())
        rows = list(csv.DictReader(io.StringIO((record.parent / "accuracy.csv").read_text())))
        epsilons = {norm: tuple(dict.fromkeys(float(r["eps"]) for r in rows if r["norm"] == norm)) for norm in NORMS}
        fields = {k: recorded[k] for k in ("steps", "linf_step", "l2_step", "random_start", "images")}
        smoothadv = (recorded["smoothadv_steps"], recorded["smoothadv_samples"])
        setting = AttackSetting(epsilons["linf"], epsilons["l2"], **fields, losses=tuple(recorded["losses"]),
                                smoothadv_steps=smoothadv[0], smoothadv_samples=smoothadv[1])  # fmt: skip
        attack = Attack(Study.open(record.parents[2]), setting, [], [])
        assert attack.folder == record.parent and recorded == setting.record(attack.study.study_id)
        attacks.append((attack, rows, attack.read("smoothadv.csv")))
    return attacks


def test_each_committed_attack_summary_is_what_its_rows_give_and_smoothadv_holds():
    """summary.md recomputed from the committed accuracy and SmoothAdv rows: a hand-edited or stale number fails
    here; and certified accuracy never exceeds the accuracy under SmoothAdv."""
    attacks = committed_attacks()
    assert len(attacks) == 2
    for attack, rows, smoothadv in attacks:
        assert (attack.folder / "summary.md").read_text() == attack_summary(attack, rows, smoothadv)
        assert all(float(r["certified_acc"]) <= float(r["smoothadv_acc"]) for r in smoothadv)
    assert sum(bool(smoothadv) for _, _, smoothadv in attacks) == 1  # the smoothing study's


CERTIFIED_ATTACKED = re.compile(r"(\d+\.\d) / (\d+\.\d)(?!\d)")  # SmoothAdv's table: "86.8 / 93.0"


def test_every_attacked_accuracy_the_front_quotes_is_in_a_committed_attack_summary():
    """In the README's and docs/results.md's sections on attacks: every accuracy under attack (mean ± std) and every
    certified / attacked pair is in a committed attack's summary.md."""
    summaries = "\n".join((attack.folder / "summary.md").read_text() for attack, _, _ in committed_attacks())
    for name in FRONT:
        section = (REPO / name).read_text().split("## Under attack", 1)[1].split("\n## ", 1)[0]
        for pattern in (CERTIFIED, CERTIFIED_ATTACKED):
            quoted = set(pattern.findall(section))
            assert quoted <= set(pattern.findall(summaries)), (name, sorted(quoted - set(pattern.findall(summaries))))
        assert len(CERTIFIED.findall(section)) >= 4


CHI2_6_99 = 16.81  # the 99th percentile of the chi-square distribution with 6 degrees of freedom


def mean_differences(folder: str, other: str) -> list[tuple[float, float]]:
    """Two committed 3-seed studies of the same σ: per σ, the difference d of their mean validation accuracies
    (``folder`` minus ``other``) and its standard error se (of a difference of two 3-seed means)."""
    from noise_robustness.study.measures import aggregate
    from noise_robustness.study.text import mean_std
    from tests.conftest import rows

    (cells,), (other_cells,) = (
        aggregate(rows(REPO / "docs" / "results" / name / "results.csv")).values() for name in (folder, other)
    )
    assert len(cells) == len(other_cells) == 6
    pairs = []
    for cell, accuracies in other_cells.items():
        (mean, std), (folder_mean, folder_std) = mean_std(accuracies["val_acc"]), mean_std(cells[cell]["val_acc"])
        pairs.append((folder_mean - mean, ((std**2 + folder_std**2) / len(accuracies["val_acc"])) ** 0.5))
    return pairs


def precision_pair(bf16_folder: str, fp32_folder: str) -> list[tuple[float, float]]:
    """``mean_differences`` of two committed studies that differ in ``trainer.precision`` alone (bf16-mixed,
    32-true)."""
    identities = [
        yaml.safe_load((REPO / "docs" / "results" / name / "study.yaml").read_text())
        for name in (bf16_folder, fp32_folder)
    ]
    assert [identity.pop("trainer.precision") for identity in identities] == ["bf16-mixed", "32-true"]
    assert identities[0] == identities[1]
    return mean_differences(bf16_folder, fp32_folder)


def quoted_table(bf16_folder: str, fp32_folder: str) -> None:
    """The bf16 folder's README quotes both summaries' mean ± std per σ (12 of them), as they are."""
    bf16, fp32 = (REPO / "docs" / "results" / name for name in (bf16_folder, fp32_folder))
    table = [line for line in (bf16 / "README.md").read_text().splitlines() if line.startswith("| ")]
    quoted = {pair for line in table for pair in MEAN_STD.findall(line)}
    summaries = {pair for folder in (bf16, fp32) for pair in MEAN_STD.findall((folder / "summary.md").read_text())}
    assert len(quoted) == 12 and quoted <= summaries


@pytest.mark.parametrize("bf16_folder, fp32_folder", [("noise_sweep", "noise_sweep_fp32"), ("fast", "fast_fp32")])
def test_bf16_moves_no_mean_accuracy_beyond_seed_noise_from_the_same_study_in_fp32(bf16_folder, fp32_folder):
    """The main job (and the fast recipe) in bf16-mixed and the same command with --trainer.precision 32-true
    differ in that option only, and their mean validation accuracies differ by no more than seed noise: each
    difference d under 3 standard errors of a difference of two 3-seed means (se), and the six together
    consistent with noise alone (the sum of (d / se)^2 under chi-square's 99th percentile: a shift of half a
    point at every σ fails). The bf16 folder's README quotes their summaries."""
    pairs = precision_pair(bf16_folder, fp32_folder)
    assert all(abs(d) < 3 * se for d, se in pairs), pairs
    assert sum((d / se) ** 2 for d, se in pairs) < CHI2_6_99
    quoted_table(bf16_folder, fp32_folder)


CNN_COMPARED = ("cnn_h200", "cnn_h200_fp32", "cnn_h100")  # the CNN's other studies, the CPU's is compared with


def test_the_cnn_study_of_this_cpu_is_compared_with_the_others_as_its_readme_says():
    """``docs/results/cnn`` (the default recipe, this CPU) is the H200's bf16 study on another device (the same
    ``study.yaml``); its README's table gives, for each of the CNN's other studies, the sum of (d / se)^2 that
    their mean validation accuracies give, and quotes means that are in the summaries."""
    here, h200 = (
        yaml.safe_load((REPO / "docs" / "results" / name / "study.yaml").read_text()) for name in ("cnn", "cnn_h200")
    )
    assert here == h200
    readme = (REPO / "docs" / "results" / "cnn" / "README.md").read_text()
    for other in CNN_COMPARED:
        chi2 = sum((d / se) ** 2 for d, se in mean_differences("cnn", other))
        (row,) = [line for line in readme.splitlines() if line.startswith(f"| [`../{other}/`]")]
        assert row.endswith(f"| {chi2:.1f} |"), (row, chi2)
    quoted = {pair for line in readme.splitlines() if line.startswith("| ") for pair in MEAN_STD.findall(line)}
    summaries = {
        pair
        for name in ("cnn", *CNN_COMPARED)
        for pair in MEAN_STD.findall((REPO / "docs" / "results" / name / "summary.md").read_text())
    }
    assert len(quoted) >= 18 and quoted <= summaries


def test_the_cnns_bf16_shift_is_what_its_readme_says():
    """The CNN's pair on an H200 is the exception its README reports: bf16 moves its accuracy beyond seed noise at
    high σ. The sum of (d / se)^2 it quotes is the one its folders give, and above chi-square's 99th percentile."""
    pairs = precision_pair("cnn_h200", "cnn_h200_fp32")
    chi2 = sum((d / se) ** 2 for d, se in pairs)
    readme = (REPO / "docs" / "results" / "cnn_h200" / "README.md").read_text()
    assert f"Σ (d / se)² = {chi2:.1f}" in readme and chi2 > CHI2_6_99
    quoted_table("cnn_h200", "cnn_h200_fp32")


def git(*args: str) -> str:
    result = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else ""


def test_every_committed_study_is_in_the_index_with_its_machine_and_commit():
    history = git("rev-parse", "--is-shallow-repository") == "false"
    index = (REPO / "docs" / "results" / "README.md").read_text()
    rows = {line.split("`")[1].rstrip("/"): line for line in index.splitlines() if line.startswith("| [`")}
    assert sorted(rows) == sorted(COMMITTED_STUDIES)
    for folder, row in rows.items():
        commit = row.rstrip(" |").rsplit("| ", 1)[1]
        assert re.fullmatch(r"[0-9a-f]{7}", commit), row
        if history:  # the commit that last wrote the folder's results (a copy without git history checks the form)
            made = git("log", "-1", "--format=%H", "--", f"docs/results/{folder}/results.csv")
            assert made.startswith(commit), (row, made)
