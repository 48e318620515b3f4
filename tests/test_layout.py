"""The codebase's shape, as facts a reader can check: module sizes, one exit, one declaration of identity, the front
door's length."""

import ast
import re
from pathlib import Path

from noise_robustness.study.spec import OPTIONS

PACKAGE = Path(__file__).parents[1] / "noise_robustness"
MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_fits_a_few_screens_and_the_cli_is_a_thin_layer():
    sizes = {path.relative_to(PACKAGE).as_posix(): len(path.read_text().splitlines()) for path in MODULES}
    assert {name: n for name, n in sizes.items() if n > 400} == {}
    assert sizes["cli.py"] <= 250


# The layers, lowest first (docs/architecture.md): a module imports from its own layer or those before it, never
# from a later one. `study/` is plain values: it imports neither Lightning nor jsonargparse.
LAYERS = [
    (
        "models",
        "machine",
        "corruptions",
        "calibration",
        "files",
        "classpaths",
        "data.noise",
        "data.mnist",
        "data.datasets",
        "data.batches",
    ),  # fmt: skip
    ("study.",),
    ("data.datamodule",),
    ("engine.",),
    ("training.",),
    ("evaluation", "certify.", "attacks."),
    ("commands", "options", "stops", "cli", "api", "__main__"),
]


def layer(module: str) -> int:
    return next(i for i, names in enumerate(LAYERS) for name in names if module == name or module.startswith(name))


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("noise_robustness"):
            package = PACKAGE.parent.joinpath(*node.module.split(".")).is_dir()  # `from package import module`
            found |= {f"{node.module}.{alias.name}" for alias in node.names} if package else {node.module}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def test_imports_flow_one_way_through_the_layers():
    upward = []
    for path in MODULES:
        if path.name == "__init__.py":
            continue
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        for imported in imports(path):
            if imported.startswith("noise_robustness."):
                target = imported.removeprefix("noise_robustness.")
                if layer(target) > layer(module):
                    upward.append(f"{module} -> {target}")
            elif module.startswith("study.") and imported.split(".")[0] in (
                "pytorch_lightning",
                "lightning",
                "jsonargparse",
            ):
                upward.append(f"{module} -> {imported}")
    assert upward == []


def test_only_the_command_line_exits_the_process():
    exits = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                if name in ("sys.exit", "exit", "quit", "os._exit"):
                    exits.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    # and __main__.py, for a Ctrl-C while torch and Lightning load, before the command line exists, and the little
    # command line of machine.py (its usage and a command it cannot start)
    assert exits and all(place.startswith(("cli.py:", "__main__.py:", "machine.py:")) for place in exits), exits
    assert len([place for place in exits if place.startswith("__main__.py:")]) == 1


def test_what_a_study_is_is_declared_once():
    """No table of option keys outside ``study/spec.py`` (a set, list, tuple or dict anywhere in the package that names
    two ``"trainer.…"``, ``"model.…"``, ``"data.…"`` keys, or three of the keys ``spec.OPTIONS`` declares) decides
    identity, resume, the recipe or what a command takes: ``spec.OPTIONS`` does."""
    declared = set(OPTIONS)
    prefixed = re.compile(r"^(trainer|model|data)\.\w+$")
    tables = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Set, ast.List, ast.Tuple, ast.Dict)):
                items = node.keys if isinstance(node, ast.Dict) else node.elts
                keys = [i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)]
                if sum(bool(prefixed.match(k)) for k in keys) >= 2 or sum(k in declared for k in keys) >= 3:
                    tables.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert tables and all(place.startswith("study/spec.py:") for place in tables), tables


def test_the_readme_is_a_front_door():
    readme = (PACKAGE.parent / "README.md").read_text()
    assert len(readme.splitlines()) <= 120
    assert "## Two commands" in readme and "## Layout" in readme and "docs/extending.md" in readme
