"""The codebase's shape, as facts a reader can check: module sizes, one exit, one declaration of identity, the front
door's length."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "noise_robustness"
MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_fits_a_few_screens_and_the_cli_is_a_thin_layer():
    sizes = {path.relative_to(PACKAGE).as_posix(): len(path.read_text().splitlines()) for path in MODULES}
    assert {name: n for name, n in sizes.items() if n > 400} == {}
    assert sizes["cli.py"] <= 250


def test_only_the_command_line_exits_the_process():
    exits = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                if name in ("sys.exit", "exit", "quit", "os._exit"):
                    exits.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert exits and all(place.startswith("cli.py:") for place in exits), exits


def test_what_a_study_is_is_declared_once():
    """No table of option keys outside ``study/spec.py`` (a set, list or dict of ``"trainer.…"``, ``"model.…"``,
    ``"data.…"``) decides identity, resume, the recipe or what a command takes: ``spec.OPTIONS`` does."""
    option_key = re.compile(r"^(trainer|model|data)\.\w+$")
    tables = []
    for path in MODULES:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(
                node.value, (ast.Set, ast.List, ast.Tuple, ast.Dict)
            ):
                items = node.value.keys if isinstance(node.value, ast.Dict) else node.value.elts
                keys = [i.value for i in items if isinstance(i, ast.Constant) and option_key.match(str(i.value))]
                if len(keys) >= 2:
                    tables.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert tables and all(place.startswith("study/spec.py:") for place in tables), tables


def test_the_readme_is_a_front_door():
    readme = (PACKAGE.parent / "README.md").read_text()
    assert len(readme.splitlines()) <= 120
    assert "## Two commands" in readme and "## Layout" in readme and "docs/extending.md" in readme
