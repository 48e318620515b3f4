"""The README's commands are the ones that run: CI's test command is the README's, to the letter."""

import re
from pathlib import Path

import yaml

REPO = Path(__file__).parents[1]
MEAN_STD = re.compile(r"(\d+\.\d\d) ± (\d+\.\d\d)")  # a result as the tables print it: "98.38 ± 0.08"


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"```bash\n(python3 -m venv .*)\n```", readme)
    assert len(commands) == 2  # set up and run the study; set up and run the tests
    assert commands[0].endswith("python -m noise_robustness sweep --compare '[docs/results/cnn]'")
    assert commands[1].endswith("python -m pytest")
    assert commands[1] in (REPO / ".ci" / "run").read_text().splitlines()


def test_every_config_the_readme_names_exists():
    readme = (REPO / "README.md").read_text()
    for path in set(re.findall(r"(?:configs|scripts|benchmarks)/[\w./]+\.(?:yaml|sh|py)", readme)):
        assert (REPO / path).is_file(), path


def test_the_compared_cnn_study_is_the_main_study_with_the_other_network():
    mlp, cnn = (
        yaml.safe_load((REPO / "docs" / "results" / name / "study.yaml").read_text()) for name in ("noise_sweep", "cnn")
    )
    assert mlp.pop("model.net")["class_path"] == "noise_robustness.models.DropoutMLP"
    assert cnn.pop("model.net")["class_path"] == "noise_robustness.models.KerasCNN"
    assert cnn == mlp  # same data, optimizer, epochs: the networks differ in architecture only
    assert (REPO / "docs" / "results" / "cnn" / "results.csv").read_text().count("KerasCNN,") == 18


def test_every_result_the_readme_quotes_is_in_a_committed_summary():
    """A README number that is not in the committed results (stale, mistyped, hand-made) fails here."""
    quoted = set(MEAN_STD.findall((REPO / "README.md").read_text()))
    committed = {
        pair for path in (REPO / "docs" / "results").glob("*/summary.md") for pair in MEAN_STD.findall(path.read_text())
    }
    assert len(quoted) > 30
    assert quoted <= committed, sorted(quoted - committed)
