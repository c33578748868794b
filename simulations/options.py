"""Command-line options derived from the run-config schema (:class:`fedpref.models.config.FederatedConfig`).

A command offers run-config keys as options without declaring them again: each option takes its
type, default and help from the schema, and the command receives the chosen values keyed by
run-config key, ready for :meth:`FederatedConfig.from_run_config`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import typer

from fedpref.models.config import RUN_CONFIG_DEFAULTS, RUN_CONFIG_HELP, RUN_CONFIG_TYPES

#: The parameter of a command decorated with :func:`run_config_options` that receives the values.
VALUES = "run_config_values"


def option(key: str, *, name: str | None = None, note: str = "") -> Any:
    """The type of a command parameter that offers run-config ``key`` as ``--<name>`` (default: the
    key): its type and help from the schema, ``note`` added to the help; a switch is ``--x/--no-x``."""
    kind = RUN_CONFIG_TYPES[key]  # KeyError: not a run-config key
    flag = f"--{name or key}"
    declarations = (f"{flag}/--no-{(name or key)}",) if kind is bool else (flag,)
    text = RUN_CONFIG_HELP[key] + (f" ({note})" if note else "")
    return Annotated[kind, typer.Option(*declarations, help=text)]


def run_config_options(
    *keys: str,
    names: Mapping[str, str] | None = None,
    defaults: Mapping[str, object] | None = None,
    notes: Mapping[str, str] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command: one option per run-config key in ``keys`` (see :func:`option`), shown
    where the command declares its parameter ``run_config_values``, which receives ``{key: value}``.
    ``names`` renames an option (key -> option name), ``defaults`` gives a command its own default
    (else the schema's) and ``notes`` adds to a key's help what it means for this command."""
    names, defaults, notes = dict(names or {}), dict(defaults or {}), dict(notes or {})
    unknown = sorted((set(names) | set(defaults) | set(notes)) - set(keys))
    if unknown:
        raise ValueError(f"names, defaults or notes for keys that are not offered: {unknown}")
    params = {key: (names.get(key, key)).replace("-", "_") for key in keys}

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(command, eval_str=True)
        before = list(signature.parameters.values())
        at = [p.name for p in before].index(VALUES)
        added = [
            inspect.Parameter(params[key], inspect.Parameter.POSITIONAL_OR_KEYWORD,
                              default=defaults.get(key, RUN_CONFIG_DEFAULTS[key]),
                              annotation=option(key, name=names.get(key), note=notes.get(key, "")))
            for key in keys
        ]
        parameters = before[:at] + added + before[at + 1:]

        @functools.wraps(command)
        def offered(**kwargs: Any) -> Any:
            values = {key: kwargs.pop(param) for key, param in params.items()}
            return command(**kwargs, **{VALUES: values})

        offered.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        offered.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": signature.return_annotation}
        return offered

    return decorate
