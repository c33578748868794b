"""The distribution ships every package folder, and the README's commands are what CI runs."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = ("client", "server", "models", "simulations")


def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def package_folders() -> dict[str, str]:
    """Every folder holding an __init__.py under the mapped top-level folders, as fedpref.* names."""
    found = {}
    for top in TOP:
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT)
            found["fedpref." + ".".join(rel.parts)] = rel.as_posix()
    return found


def test_every_package_folder_is_in_the_distribution():
    listed = set(pyproject()["tool"]["setuptools"]["packages"])
    missing = set(package_folders()) - listed
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages and package-dir in pyproject.toml"


def test_every_listed_package_maps_to_an_existing_folder():
    tool = pyproject()["tool"]["setuptools"]
    for name in tool["packages"]:
        folder = tool["package-dir"].get(name)
        assert folder is not None, f"{name} has no package-dir entry"
        assert (ROOT / folder / "__init__.py").exists(), f"{name} -> {folder} has no __init__.py"
        expected = package_folders().get(name)
        if expected is not None:
            assert folder == expected


def test_the_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, flags=re.S)
    assert commands, "README.md must open with the set-up commands in a bash block"
    first_block = [line for line in commands[0].splitlines() if line and not line.startswith("#")]
    test_command = next(line for line in first_block if "pytest" in line)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci, ".ci/run must run the README's test command verbatim"


def test_the_readme_main_command_is_a_federated_simulation_on_the_built_in_data_set():
    readme = (ROOT / "README.md").read_text()
    block = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, flags=re.S)[0]
    assert any("fedpref simulate" in line and "movielens-small" in line for line in block.splitlines())
