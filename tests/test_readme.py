"""The README's commands are the ones that run: CI's test command is the README's, to the letter."""

import re
from pathlib import Path

REPO = Path(__file__).parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"```bash\n(python3 -m venv .*)\n```", readme)
    assert len(commands) == 2  # set up and run the study; set up and run the tests
    assert commands[0].endswith("python -m noise_robustness sweep")
    assert commands[1].endswith("python -m pytest")
    assert commands[1] in (REPO / ".ci" / "run").read_text().splitlines()


def test_every_config_the_readme_names_exists():
    readme = (REPO / "README.md").read_text()
    for path in set(re.findall(r"(?:configs|scripts|benchmarks)/[\w./]+\.(?:yaml|sh|py)", readme)):
        assert (REPO / path).is_file(), path
