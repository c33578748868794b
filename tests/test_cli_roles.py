"""The ``fedpref`` command mounts each role's commands: every command a user knew is still there,
each is defined once, and the operator's commands start without the research stack."""

import json
import subprocess
import sys

import click
import typer
from typer.testing import CliRunner

from fedpref.cli import COMMANDS, app

# Every command `fedpref` offered when one module held them all.
KNOWN = {"device", "data", "central", "local-only", "reference", "tune", "dev-certs", "serve", "signing-key", "population",
         "compare", "simulate", "audit", "poison", "privacy-sweep", "reliability"}
RESEARCH_STACK = ("pandas", "matplotlib", "numba", "torch", "flwr", "ray", "fedpref.simulations", "fedpref.models.preference")


def test_every_known_command_is_listed_and_runs_its_help():
    result = CliRunner().invoke(app, ["--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    listed = {line.split()[1] for line in result.output.splitlines() if line.startswith("│ ") and len(line.split()) > 1}
    assert KNOWN <= listed
    for name in sorted(KNOWN | {"crashes"}):
        result = CliRunner().invoke(app, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)


def test_each_mount_points_at_a_command_of_its_role():
    group = typer.main.get_command(app)
    ctx = click.Context(group)
    for name, mount in COMMANDS.items():
        command = group.get_command(ctx, name)
        assert command is not None and command.name == name, name
        assert mount.module.startswith({"Operator": "fedpref.server.", "Device": "fedpref.client.", "Research": "fedpref.simulations."}[mount.panel])


def test_each_role_command_is_mounted():
    """A command added to a role's app but not to the root would be unreachable."""
    for module, attribute in {(m.module, m.attribute) for m in COMMANDS.values() if not m.whole}:
        role = typer.main.get_command(getattr(__import__(module, fromlist=[attribute]), attribute))
        assert set(role.commands) <= set(COMMANDS), module


def _loaded_after(code: str) -> list[str]:
    probe = (
        "import json, sys\n" + code + "\n"
        f"print(json.dumps(sorted(m for m in sys.modules if any(m == r or m.startswith(r + '.') for r in {list(RESEARCH_STACK)!r}))))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_serve_loads_no_research_stack():
    assert _loaded_after(
        "from fedpref.cli import app\n"
        "from typer.main import get_command\n"
        "try:\n    get_command(app).main(['serve', '--help'], standalone_mode=False)\n"
        "except SystemExit:\n    pass\n"
    ) == []


def test_the_operator_api_loads_no_research_stack():
    assert _loaded_after("import fedpref.cli, fedpref.server.cli, fedpref.server.api, fedpref.server.settings") == []
