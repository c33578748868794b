"""The ``fedpref`` command: each role's commands, mounted from that role's own module.

    fedpref serve | dev-certs | signing-key       # the server's operator (fedpref.server.cli)
    fedpref device ...                            # one device (fedpref.client.cli)
    fedpref data | central | simulate | ...       # research (fedpref.simulations.cli)
    fedpref crashes store | resume                # crash trials (fedpref.simulations.experiments.crashes)

A role's module is imported only when one of its commands runs, or when ``fedpref --help`` lists
them: ``fedpref serve`` loads no data sets, plots, compiled engines or models.
"""

from __future__ import annotations

import functools
import importlib
from typing import NamedTuple

import click
import typer
from typer.core import TyperGroup


class Mount(NamedTuple):
    """Where a command of the root comes from: ``attribute`` of ``module`` is a Typer app (or a
    function that builds one); ``whole`` mounts that app as the command, else its command of the
    same name is taken."""

    module: str
    attribute: str
    panel: str
    whole: bool = False


_OPERATOR = Mount("fedpref.server.cli", "server_app", "Operator")
_RESEARCH = Mount("fedpref.simulations.cli", "app", "Research")

#: Every command of ``fedpref``, in the order ``--help`` lists them.
COMMANDS: dict[str, Mount] = {
    "serve": _OPERATOR,
    "dev-certs": _OPERATOR,
    "signing-key": _OPERATOR,
    "device": Mount("fedpref.client.cli", "device_app", "Device", whole=True),
    **{name: _RESEARCH for name in ("data", "central", "local-only", "reference", "tune", "population", "fidelity", "simulate", "compare",
                                     "audit", "poison", "privacy-sweep", "frontier", "reliability")},
    "crashes": Mount("fedpref.simulations.experiments.crashes", "build_app", "Research", whole=True),
}


@functools.cache
def _click_app(module: str, attribute: str) -> click.Command:
    app = getattr(importlib.import_module(module), attribute)
    if not isinstance(app, typer.Typer):
        app = app()
    return typer.main.get_command(app)


class RoleGroup(TyperGroup):
    """A group whose commands are loaded from their role's module when asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        mount = COMMANDS.get(cmd_name)
        if mount is None:
            return None
        app = _click_app(mount.module, mount.attribute)
        if mount.whole:
            command = app
            command.name = cmd_name
        else:
            command = app.commands.get(cmd_name) if isinstance(app, click.Group) else None
        if command is not None and hasattr(command, "rich_help_panel"):
            command.rich_help_panel = mount.panel
        return command


app = typer.Typer(cls=RoleGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False)


@app.callback()
def _root() -> None:
    """fedpref: on-device federated personalisation."""


if __name__ == "__main__":
    app()
