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


def test_the_package_folder_lets_any_tool_follow_the_imports():
    """``fedpref/`` is the package root; its links ``client``, ``server``, ``models`` and
    ``simulations`` point at the top-level folders, so that ``fedpref.client.app`` is the file
    ``fedpref/client/app.py`` for a reader, an editor or a type checker, without the install's
    package-dir mapping."""
    for top in TOP:
        link = ROOT / "fedpref" / top
        assert link.is_symlink() and link.resolve() == (ROOT / top).resolve(), f"fedpref/{top} must link to ../{top}"
    import subprocess
    import sys

    found = subprocess.run(
        [sys.executable, "-I", "-c", "import sys, importlib.machinery as m; sys.path.insert(0, sys.argv[1]);"
         "spec = m.PathFinder.find_spec('fedpref'); print(spec.origin)", str(ROOT)],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert Path(found).resolve() == (ROOT / "fedpref" / "__init__.py").resolve()
    for top in TOP:
        spec = __import__("importlib.machinery").machinery.PathFinder.find_spec(top, [str(ROOT / "fedpref")])
        assert spec is not None and Path(spec.origin).resolve() == (ROOT / top / "__init__.py").resolve()
