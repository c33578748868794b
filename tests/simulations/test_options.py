"""Run-config options on the command line come from the schema: type, default and help once."""

import pytest
import typer
from typer.testing import CliRunner

from fedpref.models.config import RUN_CONFIG_DEFAULTS, RUN_CONFIG_HELP
from fedpref.simulations.options import run_config_options


def _app(**kwargs):
    seen = {}
    app = typer.Typer()

    @app.command()
    @run_config_options("num-server-rounds", "clip-norm", "secagg", "strategy", **kwargs)
    def command(name: str = "x", run_config_values: dict = None, after: int = 0) -> None:  # type: ignore[assignment]  # noqa: RUF013
        seen.update(name=name, values=run_config_values, after=after)

    return app, seen


def test_options_take_the_schemas_defaults_and_pass_values_by_key():
    app, seen = _app()
    result = CliRunner().invoke(app, [])
    assert result.exit_code == 0, result.output
    assert seen["values"] == {k: RUN_CONFIG_DEFAULTS[k] for k in ("num-server-rounds", "clip-norm", "secagg", "strategy")}
    result = CliRunner().invoke(app, ["--num-server-rounds", "7", "--clip-norm", "0.5", "--secagg", "--strategy", "fedavg", "--after", "2"])
    assert result.exit_code == 0, result.output
    assert seen == {"name": "x", "after": 2, "values": {"num-server-rounds": 7, "clip-norm": 0.5, "secagg": True, "strategy": "fedavg"}}
    assert CliRunner().invoke(app, ["--clip-norm", "much"]).exit_code == 2  # the schema's type


def test_help_is_the_schemas_and_a_command_may_rename_redefault_and_annotate():
    app, seen = _app(names={"num-server-rounds": "rounds"}, defaults={"clip-norm": 0.25}, notes={"clip-norm": "for this command"})
    options = {p.name: p for p in typer.main.get_command(app).params}
    assert options["rounds"].opts == ["--rounds"] and "num_server_rounds" not in options
    assert options["secagg"].secondary_opts == ["--no-secagg"]
    assert options["clip_norm"].help == RUN_CONFIG_HELP["clip-norm"] + " (for this command)"
    assert options["strategy"].help == RUN_CONFIG_HELP["strategy"] and options["clip_norm"].default == 0.25
    assert CliRunner().invoke(app, ["--rounds", "3"]).exit_code == 0
    assert seen["values"]["num-server-rounds"] == 3 and seen["values"]["clip-norm"] == 0.25


def test_only_schema_keys_can_be_offered():
    with pytest.raises(KeyError):
        _app_with("clip-nrom")
    with pytest.raises(ValueError, match="not offered"):
        run_config_options("clip-norm", names={"lr": "step"})


def _app_with(key):
    @run_config_options(key)
    def command(run_config_values: dict = None) -> None:  # type: ignore[assignment]  # noqa: RUF013
        pass
