"""The operator API (FastAPI): health, runs and their rounds, privacy spend, model versions,
starting and stopping runs through Flower's own control interface, Prometheus metrics, and
the dashboard.

    app = create_app(OperatorSettings())          # or: serve(OperatorSettings())

Who may call what:

- public: ``GET /health`` (liveness, no operator data), the OpenAPI document and its viewers
  (``/openapi.json``, ``/docs``, ``/redoc``: they describe the API, they hold no data), the
  dashboard's page and its script (``/dashboard``: an empty shell that asks for a key and then
  calls the API with it), and the published models (``/models/...``, only when
  ``publish_dir`` is set: devices trust the signature, not the transport);
- everything else (``/api/...``, ``/metrics`` and any path no route serves) needs one of the
  configured keys, either as ``X-API-Key: <key>`` or as ``Authorization: Bearer <key>`` (what
  Prometheus scrapers send). An operator key (``FEDPREF_API_KEYS``) may do everything; a
  read-only key (``FEDPREF_READ_API_KEYS``) may only ``GET`` (runs, rounds, ``/metrics``, what
  the dashboard shows) and gets 403 on a route that starts or stops a run.

An ASGI guard in front of every route checks the key, and the size a request declares for its
body, before anything reads the body: a request without a right key is answered 401 unread, a
body declared or streamed beyond ``max_body_bytes`` 413 (a streamed one stops being read at
the limit). Paths in a run config sent to ``POST /api/runs`` (``history-dir``, ``results-dir``,
``run-store``, ``checkpoint-dir``, ``publish-dir``, ``publish-key``, ``store-dir``) must
resolve inside ``run_config_roots``; none configured, the server's own defaults apply and any
path is refused (403). Error answers say what went wrong without naming local files: the
details go to the server's log.

Runs are started, stopped and listed by running Flower's own CLI (``flwr run``, ``flwr stop``,
``flwr ls`` with ``--format json``) against the SuperLink connection named in the settings:
fedpref does not speak Flower's control protocol itself, so it follows Flower's
authentication, TLS and federation handling as they are.

Rows of the run store hold aggregates only (means, counts, ε), never anything per device.
"""

# No "from __future__ import annotations": FastAPI reads the route functions' annotations as objects.

import json
import logging
import math
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Path as PathParam, Request, Response, Security
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, create_model
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session
from starlette._utils import get_route_path
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from typing_extensions import TypedDict  # pydantic reads TypedDicts from typing_extensions on Python < 3.12

from fedpref import __version__

from .dashboard import dashboard_router
from .model_http import model_router
from .runstore import RoundRow, Run, RunStore, RunStoreError
from .settings import OperatorSettings

log = logging.getLogger(__name__)

API_KEY_HEADER = "X-API-Key"
SQLITE_MAX_INT = 2**63 - 1  # run ids are SQLite / SQL BIGINT integers
FLOWER_MAX_RUN_ID = 2**64 - 1  # Flower run ids are unsigned 64-bit integers
WWW_AUTHENTICATE = 'Bearer realm="fedpref-operator"'
UNAUTHORIZED = f"missing or wrong API key: send it as '{API_KEY_HEADER}: <key>' or 'Authorization: Bearer <key>' (keys are set in FEDPREF_API_KEYS)"
FORBIDDEN = "this key is read-only (FEDPREF_READ_API_KEYS): starting and stopping runs needs an operator key (FEDPREF_API_KEYS)"
OPERATOR, READ = "operator", "read"  # what a key may do
READ_METHODS = frozenset({"GET", "HEAD"})  # all a read-only key may send
# Paths that answer without a key (the dashboard's shell, the API's description, liveness);
# /models/... too when the server serves published models. Everything else needs a key.
PUBLIC_PATHS = frozenset({"/", "/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc",
                          "/dashboard", "/dashboard/app.js", "/dashboard/app.css", "/dashboard/favicon.svg"})
MODELS_PREFIX = "/models"
# Run-config keys whose value names a file, a folder or a database: from the API they must
# resolve inside the configured roots. (Values that name none: "" is the server's default,
# checkpoint-dir "none" turns checkpoints off.)
# Simulation settings a real run must not take: noise computable from the run's seed, refused
# when the ServerApp would read the value as on. That reading is
# fedpref.models.config.run_config_bool, written again here because importing that module
# would load PyTorch into the operator API.
SIMULATION_ONLY = ("reproducible-noise",)


def _switched_on(value: object) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


PATH_KEYS = ("history-dir", "store-dir", "results-dir", "run-store", "checkpoint-dir", "publish-dir", "publish-key")
NO_PATH_VALUES = {"checkpoint-dir": frozenset({"none"})}


# -- Flower's control interface, through its CLI ----------------------------------------------

class FlowerControlError(RuntimeError):
    """``flwr`` could not do what was asked. ``status_code`` is the HTTP status the API answers:
    404 unknown run, 409 run already finished, 422 bad run config, 502 the SuperLink refused,
    503 the SuperLink or the ``flwr`` command cannot be reached, 504 ``flwr`` timed out.

    ``message`` is what the API answers (no local file paths); ``details`` is what only the
    server's log gets (the CLI's own output, paths and all)."""

    def __init__(self, message: str, status_code: int = 502, details: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.details = details


_FLOWER_CODE = re.compile(r"\[code: (\d+)\]")
# An absolute file-system path in a message: /x/y, ~/x, C:\x (not a URL's //host/..., nor a/b).
_LOCAL_PATH = re.compile(r"(?<![\w:/.~-])(?:~|[A-Za-z]:)?[/\\][^\s'\"()<>\[\]{},;|]*")
_FLOWER_CODE_STATUS = {16: 404, 17: 404, 30: 404, 31: 404, 18: 409, 15: 422, 33: 422}  # flwr.supercore.error.ApiErrorCode
_RUN_CONFIG_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")


def without_paths(message: str) -> str:
    """``message`` with every absolute file-system path replaced by ``<path>``: what an error
    answer may say (the full message goes to the server's log)."""
    return _LOCAL_PATH.sub("<path>", message)


def _status_for(message: str) -> int:
    """The HTTP status for a message of the ``flwr`` CLI (Flower's API error codes first)."""
    code = _FLOWER_CODE.search(message)
    if code:
        return _FLOWER_CODE_STATUS.get(int(code.group(1)), 502)
    lowered = message.lower()
    if "unavailable" in lowered or "flower configuration file" in lowered or "authentication failed" in lowered:
        return 503  # the SuperLink is down, or this server's flwr configuration is wrong
    return 502


def toml_value(value: object) -> str:
    """``value`` as a TOML value that survives ``flwr --run-config 'key=value'``.

    Flower cuts a quoted value at the next quote of the same kind, so a string is written as a
    TOML basic string whose quotes, backslashes and control characters are ``\\uXXXX``
    escapes. Raises ValueError for what TOML cannot hold (non-finite floats, integers beyond 64
    bits, unpaired surrogates)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if not -(2**63) <= value <= 2**63 - 1:
            raise ValueError("integer outside the 64-bit range that TOML and Flower hold")
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("a run-config float must be finite")
        return repr(value)
    if isinstance(value, str):
        out = []
        for char in value:
            point = ord(char)
            if 0xD800 <= point <= 0xDFFF:
                raise ValueError("the string holds an unpaired surrogate, which no file or command line can carry")
            if char in '"\\\'' or point < 0x20 or point == 0x7F:
                out.append(f"\\u{point:04X}")
            else:
                out.append(char)
        return '"' + "".join(out) + '"'
    raise ValueError(f"run-config values are str, int, float or bool, not {type(value).__name__}")


def _first_json_object(text: str) -> dict | None:
    """The first JSON object in ``text`` (the CLI may print other lines around it)."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


class FlowerControl:
    """Start, stop and list runs with Flower's own CLI against one SuperLink connection.

    ``connection`` names a ``[superlink.<name>]`` table of ``$FLWR_HOME/config.toml`` (address,
    TLS root certificates, or ``insecure = true`` in development); ``app_dir`` is the Flower app
    ``flwr run`` submits. The CLI is found on ``PATH`` with this Python's ``bin`` folder first,
    so the ``flwr`` installed beside fedpref is the one that runs.
    """

    def __init__(self, connection: str = "fedpref", *, app_dir: str | Path | None = None, flwr_home: str | Path | None = None,
                 executable: str = "flwr", timeout: float = 60.0, run_timeout: float = 300.0) -> None:
        self.connection = connection
        self.app_dir = Path(app_dir).resolve() if app_dir is not None else None
        self.flwr_home = Path(flwr_home).resolve() if flwr_home is not None else None
        self.executable = executable
        self.timeout = timeout
        self.run_timeout = run_timeout
        self._defaults: tuple[int, dict[str, Any] | None] | None = None

    @classmethod
    def from_settings(cls, settings: OperatorSettings) -> "FlowerControl":
        return cls(settings.superlink_connection, app_dir=settings.app_dir, flwr_home=settings.flwr_home,
                   timeout=settings.flwr_timeout_seconds, run_timeout=settings.flwr_run_timeout_seconds)

    # -- the command lines ------------------------------------------------------------------
    def environment(self) -> dict[str, str]:
        """The CLI's environment: this one, with FLWR_HOME set and this Python's bin folder first on PATH."""
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        if self.flwr_home is not None:
            env["FLWR_HOME"] = str(self.flwr_home)
        env.setdefault("NO_COLOR", "1")
        return env

    def resolve_executable(self) -> str:
        found = shutil.which(self.executable, path=self.environment()["PATH"])
        if found is None:
            raise FlowerControlError(f"the Flower CLI {Path(self.executable).name!r} is not on PATH: install flwr beside fedpref (pip install 'flwr[simulation]')",
                                     503, details=f"not found: {self.executable}")
        return found

    def run_config_defaults(self) -> dict[str, Any] | None:
        """The app's declared run config (``[tool.flwr.app.config]``, flattened), or None when unknown."""
        if self.app_dir is None:
            return None
        path = self.app_dir / "pyproject.toml"
        try:
            stamp = path.stat().st_mtime_ns
            if self._defaults is not None and self._defaults[0] == stamp:
                return self._defaults[1]  # read again only when the file changes
            project = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError):
            return None
        config = project.get("tool", {}).get("flwr", {}).get("app", {}).get("config")
        defaults = _flatten(config) if isinstance(config, Mapping) else None
        self._defaults = (stamp, defaults)
        return defaults

    def check_run_config(self, run_config: Mapping[str, object]) -> list[tuple[str, str]]:
        """Problems of a run-config override, as ``(key, message)``: keys the app does not
        declare, values of another type than the app's default, values TOML cannot hold."""
        defaults = self.run_config_defaults()
        problems = []
        for key, value in run_config.items():
            if not isinstance(key, str) or not _RUN_CONFIG_KEY.fullmatch(key):
                problems.append((str(key), "a run-config key is 1 to 200 letters, digits, '_', '-' or '.'"))
                continue
            if defaults is not None and key not in defaults:
                problems.append((key, f"the Flower app declares no run-config key {key!r} (see [tool.flwr.app.config] in its pyproject.toml)"))
                continue
            try:
                toml_value(value)
            except ValueError as exc:
                problems.append((key, str(exc)))
                continue
            if defaults is not None:
                expected = defaults[key]
                kind = type(expected)
                fits = (isinstance(value, bool) if kind is bool else
                        isinstance(value, int) and not isinstance(value, bool) if kind is int else
                        isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
                        isinstance(value, kind))
                if not fits:
                    problems.append((key, f"{key!r} takes a {kind.__name__} (its default is {expected!r}), not a {type(value).__name__}"))
        return problems

    def start_command(self, run_config: Mapping[str, object] | None = None) -> list[str]:
        if self.app_dir is None:
            raise FlowerControlError("no Flower app folder is configured: set FEDPREF_APP_DIR to the folder that holds the app's pyproject.toml", 503)
        command = [self.resolve_executable(), "run", str(self.app_dir), self.connection, "--format", "json"]
        defaults = self.run_config_defaults() or {}
        for key, value in (run_config or {}).items():
            if isinstance(defaults.get(key), float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)  # 3 for a float setting: Flower would otherwise read an int
            command += ["--run-config", f"{key}={toml_value(value)}"]
        return command

    def stop_command(self, flower_run_id: int) -> list[str]:
        return [self.resolve_executable(), "stop", str(int(flower_run_id)), self.connection, "--format", "json"]

    def list_command(self) -> list[str]:
        return [self.resolve_executable(), "ls", self.connection, "--format", "json"]

    def _call(self, command: list[str], timeout: float) -> dict:
        """Run one ``flwr`` command and return its JSON answer, or raise FlowerControlError with its message."""
        what = " ".join(command[1:2])
        name = Path(command[0]).name
        try:
            done = subprocess.run(command, env=self.environment(), capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL, errors="replace")
        except FileNotFoundError:
            raise FlowerControlError(f"the Flower CLI {name!r} is not installed: install flwr beside fedpref", 503, details=f"not found: {command[0]}") from None
        except OSError as exc:  # e.g. not executable
            raise FlowerControlError(f"the Flower CLI {name!r} cannot be run ({type(exc).__name__}): check the flwr installation", 503,
                                     details=f"{command[0]}: {exc}") from None
        except subprocess.TimeoutExpired:
            raise FlowerControlError(f"flwr {what} did not answer within {timeout:g} s: is the SuperLink of connection {self.connection!r} overloaded?", 504) from None
        answer = _first_json_object(done.stdout)
        if answer is None:
            tail = (done.stderr.strip() or done.stdout.strip())[-2000:]
            raise FlowerControlError(f"flwr {what} answered no JSON (exit status {done.returncode}): its output is in the operator API's log", 502,
                                     details=tail or "no output")
        if not answer.get("success", False):
            raw = str(answer.get("error-message") or "no message")
            message = raw.strip().split("\n\n")[-1].strip() or raw.strip()
            raise FlowerControlError(f"flwr {what}: {without_paths(message)}", _status_for(message), details=raw)
        return answer

    # -- the operations -----------------------------------------------------------------------
    def start(self, run_config: Mapping[str, object] | None = None) -> dict:
        """``flwr run <app_dir> <connection> --run-config k=v ...``: submit a run; returns
        ``{"flower_run_id": str, "federation", "fab_id", "fab_version", "fab_hash", "note"}``."""
        problems = self.check_run_config(run_config or {})
        if problems:
            raise FlowerControlError("; ".join(f"{key}: {message}" for key, message in problems), 422)
        answer = self._call(self.start_command(run_config), self.run_timeout)
        if answer.get("run-id") in (None, ""):
            raise FlowerControlError("flwr run reported success but no run id", 502)
        return {
            "flower_run_id": str(answer["run-id"]),
            "federation": answer.get("federation-id") or None,
            "fab_id": answer.get("fab-id"),
            "fab_version": answer.get("fab-version"),
            "fab_hash": answer.get("fab-hash"),
            "note": answer.get("note"),
        }

    def stop(self, flower_run_id: int) -> dict:
        """``flwr stop <run_id> <connection>``; returns ``{"flower_run_id": str, "stopped": True}``."""
        self._call(self.stop_command(flower_run_id), self.timeout)
        return {"flower_run_id": str(int(flower_run_id)), "stopped": True}

    def list(self) -> list[dict]:  # defined last: inside the class body, `list` is this method after it
        """``flwr ls <connection>``: the SuperLink's runs, with Flower's keys in snake_case
        (``flower_run_id``, ``status``, ``fab_id``, ``elapsed``, ...)."""
        answer = self._call(self.list_command(), self.timeout)
        runs = answer.get("runs") or []
        out = []
        for run in runs if isinstance(runs, Iterable) else []:
            if isinstance(run, dict):
                row = {key.replace("-", "_"): value for key, value in run.items()}
                row["flower_run_id"] = str(row.pop("run_id", ""))
                out.append(row)
        return out


# -- response and request bodies -----------------------------------------------------------

class Problem(BaseModel):
    """An error: what was wrong and, where it helps, how to fix it."""

    detail: str


class Health(BaseModel):
    status: str = Field(description="`ok` while the process serves requests.", examples=["ok"])


class PrivacySpend(BaseModel):
    """User-level differential privacy spent by a run, as its ServerApp's accountant reported it."""

    dp: bool = Field(description="Whether the run trains with differential privacy.")
    epsilon: float | None = Field(description="ε spent so far (None without DP).")
    delta: float | None = Field(description="δ of the guarantee.")
    target_epsilon: float | None = Field(description="The budget: the ε the run may spend, if one was set.")
    budget_left: float | None = Field(description="target_epsilon - epsilon, never below 0 (None without a budget).")
    budget_used: float | None = Field(description="epsilon / target_epsilon (None without a budget).")


class EpsilonPoint(BaseModel):
    round: int
    epsilon: float


class PrivacyReport(PrivacySpend):
    run_id: int
    rounds: list[EpsilonPoint] = Field(description="ε spent after each round that reported one.")


class RunSummary(BaseModel):
    id: int = Field(description="The run store's id of the run.")
    name: str
    flower_run_id: str | None = Field(description="Flower's run id (an unsigned 64-bit integer, as a string so that JavaScript keeps every digit).")
    status: str = Field(description="running, completed, failed or stopped.")
    started_at: datetime
    finished_at: datetime | None
    devices: int = Field(description="The population of devices.")
    items: int
    rounds_planned: int
    rounds_done: int = Field(description="The latest round with a record.")
    secure_aggregation: bool
    privacy: PrivacySpend
    resumed_from_round: int | None
    note: str | None


class RunDetail(RunSummary):
    config: dict[str, Any] = Field(description="The run config the ServerApp ran with.")
    latest_model_version: str | None


class RoundRecord(BaseModel):
    round: int
    finished_at: datetime
    seconds: float | None = Field(description="Seconds since the run started.")
    participants: int | None = Field(description="Devices whose update was aggregated.")
    dropped: int | None = Field(description="Devices sampled that did not contribute.")
    epsilon: float | None = Field(description="ε spent after this round.")
    metrics: dict[str, Any] = Field(description="Aggregated metrics (means over the devices that replied): train-loss, val-hr, val-ndcg, ...")
    model_version: str | None


class ModelRecord(BaseModel):
    version: str
    round: int
    created_at: datetime
    sha256: str
    signature: str | None
    size: int
    url: str | None = Field(description="Where devices download it (when this server serves the published models).")


RunConfigValue = StrictBool | StrictInt | StrictFloat | StrictStr
JsonInt = Annotated[StrictInt, Field(ge=-(2**53 - 1), le=2**53 - 1)]  # exact in JSON (and JavaScript), within TOML's 64 bits
FiniteFloat = Annotated[StrictFloat, Field(allow_inf_nan=False)]


def run_config_type(defaults: Mapping[str, Any] | None) -> Any:
    """The body type of a run-config override: with the app's declared config known, an object
    whose keys are exactly the declared ones, each typed like its default (so that the OpenAPI
    document says what may be sent); otherwise any mapping of scalars."""
    if not defaults:
        return dict[str, RunConfigValue]
    fields: dict[str, Any] = {}
    for key, default in defaults.items():
        if not _RUN_CONFIG_KEY.fullmatch(key):
            continue
        if isinstance(default, bool):
            kind: Any = StrictBool
        elif isinstance(default, int):
            kind = JsonInt
        elif isinstance(default, float):
            kind = FiniteFloat | JsonInt
        elif isinstance(default, str):
            kind = StrictStr
        else:
            continue  # arrays and tables: not overridable here
        description = f"Default: {default!r}."
        if key in PATH_KEYS:
            description += " A path: refused (403) unless it resolves inside a folder of FEDPREF_RUN_CONFIG_ROOTS."
        fields[key] = Annotated[kind, Field(description=description)]
    config = TypedDict("RunConfig", fields, total=False)  # type: ignore[misc]  # keys like "num-server-rounds" need the functional form
    config.__pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[attr-defined]
    return config


def start_request_model(defaults: Mapping[str, Any] | None) -> type[BaseModel]:
    """The body of POST /api/runs for an app with these run-config defaults."""
    return create_model(
        "StartRunRequest", __config__=ConfigDict(extra="forbid"),
        run_config=(run_config_type(defaults), Field(
            default_factory=dict, description="Overrides of the app's [tool.flwr.app.config]; keys it does not declare are refused.",
            examples=[{"num-server-rounds": 20, "run-name": "nightly"}])),
    )


class StartedRun(BaseModel):
    flower_run_id: str
    federation: str | None
    fab_id: str | None
    fab_version: str | None
    fab_hash: str | None
    note: str | None


class StoppedRun(BaseModel):
    flower_run_id: str
    stopped: bool
    store_runs_marked_stopped: list[int] = Field(description="Run-store runs of this Flower run that were running and are now marked stopped.")


class FlowerRun(BaseModel):
    model_config = ConfigDict(extra="allow")

    flower_run_id: str
    status: str | None = None
    fab_id: str | None = None
    fab_version: str | None = None
    federation_id: str | None = None


# -- helpers -----------------------------------------------------------------------------------

def _utc(value: str | datetime | None) -> datetime | None:
    """Stored times are UTC; SQLite returns them without a zone."""
    if value is None:
        return None
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _privacy(row: dict) -> PrivacySpend:
    epsilon, target = row.get("epsilon"), row.get("target_epsilon")
    has_budget = bool(target) and epsilon is not None
    return PrivacySpend(
        dp=bool(row.get("dp")), epsilon=epsilon, delta=row.get("delta"), target_epsilon=target,
        budget_left=max(0.0, target - epsilon) if has_budget else None,
        budget_used=epsilon / target if has_budget else None,
    )


def _summary(row: dict, rounds_done: int) -> dict:
    return {
        "id": row["id"], "name": row["name"],
        "flower_run_id": None if row.get("flower_run_id") is None else str(row["flower_run_id"]),
        "status": row["status"], "started_at": _utc(row["started_at"]), "finished_at": _utc(row.get("finished_at")),
        "devices": row["devices"], "items": row["items"], "rounds_planned": row["rounds_planned"], "rounds_done": rounds_done,
        "secure_aggregation": bool(row.get("secure_aggregation")), "privacy": _privacy(row),
        "resumed_from_round": row.get("resumed_from_round"), "note": row.get("note"),
    }


def _rounds_done(store: RunStore) -> dict[int, int]:
    """The latest recorded round of every run, in one query."""
    with Session(store.engine) as session:
        return {int(run_id): int(latest) for run_id, latest in session.execute(select(RoundRow.run_id, func.max(RoundRow.round)).group_by(RoundRow.run_id))}


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by its name ("nan", "inf", "-inf") and
    every unpaired surrogate (a JSON body may spell one, UTF-8 cannot) by its escape."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, dict):
        return {_json_safe(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _all_routes(app: FastAPI) -> list:
    """Every route of the app, those of included routers too."""
    try:
        from fastapi.routing import iter_route_contexts  # FastAPI keeps included routers as branches
        return list(iter_route_contexts(app.routes))
    except ImportError:  # older FastAPI copies included routes into app.routes
        return list(app.routes)


def _route_methods(app: FastAPI) -> list[tuple[re.Pattern, set[str]]]:
    """(path regex, methods) of every route, those of included routers too."""
    table = []
    for route in _all_routes(app):
        regex, methods = getattr(route, "path_regex", None), getattr(route, "methods", None)
        if regex is not None and methods:
            table.append((regex, set(methods)))
    return table


def _route_templates(app: FastAPI) -> list[tuple[re.Pattern, str]]:
    """(path regex, path template) of every route."""
    return [(route.path_regex, route.path) for route in _all_routes(app) if getattr(route, "path_regex", None) is not None and getattr(route, "path", None)]


def _store_call(function: Callable, *args: Any) -> Any:
    """Call the run store: an unknown run is a 404, a database that cannot be read a 503."""
    try:
        return function(*args)
    except RunStoreError as exc:
        raise HTTPException(404, detail=f"{exc}: GET /api/runs lists the runs") from None
    except SQLAlchemyError as exc:
        log.warning("the run store cannot be read: %s", exc)
        raise HTTPException(503, detail=f"the run store cannot be read right now ({type(exc).__name__}): check FEDPREF_RUN_STORE and the database") from None


def _flower_call(function: Callable, *args: Any) -> Any:
    try:
        return function(*args)
    except FlowerControlError as exc:
        log.warning("Flower control failed (%s): %s%s", exc.status_code, exc.message, f"\n{exc.details}" if exc.details else "")
        raise HTTPException(exc.status_code, detail=without_paths(exc.message)) from None


class _RunStoreCollector:
    """Prometheus gauges read from the run store at each scrape: runs by status, and ε and
    rounds of the running runs. A store that cannot be read gives ``fedpref_run_store_up 0``."""

    def __init__(self, store: RunStore) -> None:
        self.store = store

    def collect(self):
        up = GaugeMetricFamily("fedpref_run_store_up", "1 when the run store could be read at this scrape")
        try:
            runs = self.store.runs()
            done = _rounds_done(self.store)
        except Exception as exc:  # a scrape must never fail because the database is down
            log.warning("metrics: the run store cannot be read: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        by_status = GaugeMetricFamily("fedpref_runs", "Runs in the run store, by status", labels=["status"])
        counts: dict[str, int] = {s: 0 for s in ("running", "completed", "failed", "stopped")}
        for run in runs:
            counts[run["status"]] = counts.get(run["status"], 0) + 1
        for status, count in sorted(counts.items()):
            by_status.add_metric([status], count)
        yield by_status
        epsilon = GaugeMetricFamily("fedpref_run_epsilon", "Privacy spent (epsilon) by each running run", labels=["run_id", "name"])
        rounds = GaugeMetricFamily("fedpref_run_rounds_done", "Latest recorded round of each running run", labels=["run_id", "name"])
        for run in runs:
            if run["status"] == "running":
                if run.get("epsilon") is not None:
                    epsilon.add_metric([str(run["id"]), run["name"]], run["epsilon"])
                rounds.add_metric([str(run["id"]), run["name"]], done.get(run["id"], 0))
        yield epsilon
        yield rounds


# -- who may call what, and how much they may send ----------------------------------------------

class KeyRing:
    """The accepted API keys and what each may do: operator keys everything, read-only keys
    ``GET`` and ``HEAD``. Every offered value is compared with every key in constant time."""

    def __init__(self, operator: Iterable[bytes], read: Iterable[bytes] = ()) -> None:
        self.operator = tuple(operator)
        self.read = tuple(read)
        if not self.operator:
            raise ValueError("the operator API needs at least one API key: set FEDPREF_API_KEYS")

    @staticmethod
    def offered(headers: Mapping[str, str]) -> list[bytes]:
        """The values a request offers as keys: its ``X-API-Key`` header and its bearer token."""
        values = [headers.get(API_KEY_HEADER.lower()) or ""]
        scheme, token = get_authorization_scheme_param(headers.get("authorization"))
        if scheme.lower() == "bearer":
            values.append(token)
        return [value.encode("utf-8", "surrogateescape") for value in values if value]

    def grant(self, offered: Iterable[bytes]) -> str | None:
        """OPERATOR, READ or None (no offered value is a key)."""
        operator = read = False
        for value in offered:
            for known in self.operator:
                operator |= secrets.compare_digest(value, known)
            for known in self.read:
                read |= secrets.compare_digest(value, known)
        return OPERATOR if operator else READ if read else None


class _BodyTooLarge(StarletteHTTPException):
    """A request body beyond the limit (raised from ``receive``: FastAPI passes HTTP errors on)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, detail=f"the request body is larger than {limit} bytes (FEDPREF_MAX_BODY_BYTES): send less",
                         headers={"Connection": "close"})


class _Guard:
    """Pure ASGI middleware in front of every route: the key and the body's size are checked
    before anything reads the body.

    - a path that is not public, without a right key: 401, ``receive`` never called;
    - a read-only key on a method other than GET and HEAD: 403, ``receive`` never called;
    - a ``Content-Length`` beyond ``max_body_bytes``: 413, ``receive`` never called;
    - a body streamed (chunked) beyond ``max_body_bytes``: 413 as soon as the bytes counted so
      far pass the limit; nothing after that is read.

    A refusal of a request that announced a body closes the connection (``Connection: close``),
    so the server does not go on receiving what it will never read."""

    def __init__(self, app, *, keys: KeyRing, is_public: Callable[[str], bool], max_body_bytes: int) -> None:
        self.app = app
        self.keys = keys
        self.is_public = is_public
        self.limit = max_body_bytes

    async def _refuse(self, scope, send, status: int, detail: str, headers: Mapping[str, str] | None = None, *, close: bool = False) -> None:
        extra = dict(headers or {})
        if close:
            extra["Connection"] = "close"
        await JSONResponse({"detail": detail}, status_code=status, headers=extra)(scope, _never_receive, send)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        announced = "transfer-encoding" in headers or headers.get("content-length", "0") not in ("0", "")
        path = get_route_path(scope)
        if not self.is_public(path):
            offered = KeyRing.offered(headers)
            granted = self.keys.grant(offered)
            if granted is None:
                client = scope.get("client") or ("?",)
                log.info("refused an operator request to %s from %s: %s", path, client[0], "wrong key" if offered else "no key")
                await self._refuse(scope, send, 401, UNAUTHORIZED, {"WWW-Authenticate": WWW_AUTHENTICATE}, close=announced)
                return
            if granted == READ and scope["method"] not in READ_METHODS:
                await self._refuse(scope, send, 403, FORBIDDEN, close=announced)
                return
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                await self._refuse(scope, send, 400, "Content-Length is not a number of bytes", close=True)
                return
            if int(declared) > self.limit:
                await self._refuse(scope, send, 413, _BodyTooLarge(self.limit).detail, close=True)
                return
        counted = 0
        started = False

        async def limited_receive():
            nonlocal counted
            if counted > self.limit:
                raise _BodyTooLarge(self.limit)
            message = await receive()
            if message["type"] == "http.request":
                counted += len(message.get("body", b""))
                if counted > self.limit:
                    raise _BodyTooLarge(self.limit)
            return message

        async def noted_send(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, noted_send)
        except _BodyTooLarge as exc:  # (FastAPI answers it itself; this is for a reader that lets it through)
            if started:
                raise
            await self._refuse(scope, send, 413, exc.detail, close=True)


async def _never_receive():
    raise RuntimeError("the guard answers without reading the request")


class PathPolicy:
    """Which paths the run config of ``POST /api/runs`` may name: those that resolve (symbolic
    links and ``..`` followed) inside one of ``roots``; for ``run-store`` also the server's own
    run store (``own_run_store``, exactly as configured). With no roots every path is refused
    and the ServerApp's defaults apply."""

    def __init__(self, roots: Iterable[str | Path], own_run_store: str = "") -> None:
        self.roots = tuple(Path(root).resolve() for root in roots)
        self.own_run_store = own_run_store

    def _inside(self, key: str, value: str) -> tuple[str | None, str | None]:
        """(the resolved path, None) or (None, why it is refused)."""
        if not self.roots:
            return None, (f"{key}: the operator API accepts no paths (FEDPREF_RUN_CONFIG_ROOTS is not set): leave it out and the "
                          "server's own default applies, or ask the operator to set FEDPREF_RUN_CONFIG_ROOTS")
        if "\x00" in value or not os.path.isabs(value):
            return None, f"{key}: {value!r} is not an absolute path: name it from / inside one of the folders of FEDPREF_RUN_CONFIG_ROOTS"
        try:
            resolved = Path(value).resolve()
        except (OSError, RuntimeError):  # a loop of symbolic links
            return None, f"{key}: {value!r} cannot be resolved (a loop of symbolic links?)"
        if not any(resolved.is_relative_to(root) for root in self.roots):
            return None, f"{key}: {value!r} lies outside the folders of FEDPREF_RUN_CONFIG_ROOTS (after following links and '..')"
        return str(resolved), None

    def check(self, run_config: Mapping[str, object]) -> tuple[dict[str, object], list[str]]:
        """(the run config with every accepted path resolved, a problem per refused key)."""
        checked, problems = dict(run_config), []
        for key in PATH_KEYS:
            value = run_config.get(key)
            if not isinstance(value, str) or value == "" or value in NO_PATH_VALUES.get(key, ()):
                continue
            if key == "run-store":
                if self.own_run_store and value == self.own_run_store:
                    continue
                if "://" in value:
                    try:
                        url = make_url(value)
                    except ArgumentError:
                        problems.append(f"run-store: {value!r} is not a SQLAlchemy URL")
                        continue
                    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:" or url.query or url.host:
                        problems.append("run-store: the operator API accepts the server's own run store (FEDPREF_RUN_STORE) or a SQLite "
                                        "file inside the folders of FEDPREF_RUN_CONFIG_ROOTS, nothing else")
                        continue
                    resolved, problem = self._inside(key, url.database)
                    if problem is None:
                        checked[key] = f"sqlite:///{resolved}"
                else:
                    resolved, problem = self._inside(key, value)
                    if problem is None:
                        checked[key] = resolved
            else:
                resolved, problem = self._inside(key, value)
                if problem is None:
                    checked[key] = resolved
            if problem is not None:
                problems.append(problem)
        return checked, problems


class _RequestMetrics:
    """ASGI middleware counting requests and their latency by method, route template and status
    (the template, not the path, so that ids and fuzzed paths do not explode the label set)."""

    def __init__(self, app, requests: Counter, latency: Histogram) -> None:
        self.app = app
        self.requests = requests
        self.latency = latency
        self.templates: list[tuple[re.Pattern, str]] | None = None

    def _template(self, scope) -> str:
        route = scope.get("route")
        if getattr(route, "path", None):
            return route.path
        if self.templates is None:  # a request answered before routing (the guard): the template its path matches
            self.templates = _route_templates(scope["app"])
        path = get_route_path(scope)
        return next((template for regex, template in self.templates if regex.match(path)), "unmatched")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def send_and_note(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            template = self._template(scope)
            self.requests.labels(scope["method"], template, str(status["code"])).inc()
            self.latency.labels(scope["method"], template).observe(time.perf_counter() - started)


# -- the app -----------------------------------------------------------------------------------

TAGS = [
    {"name": "health", "description": "Liveness (public, no operator data)."},
    {"name": "runs", "description": "Runs, their rounds with aggregated metrics, privacy spend and model versions (from the run store)."},
    {"name": "flower", "description": "Start, stop and list runs through Flower's own CLI and control API."},
    {"name": "monitoring", "description": "Prometheus metrics."},
    {"name": "dashboard", "description": "The operator dashboard (the page is public and empty; its data comes from the API with a key)."},
    {"name": "models", "description": "Published, signed models for devices (public)."},
]

DESCRIPTION = """Operate a fedpref aggregation server: follow runs round by round (aggregated metrics,
participation, privacy spent), see the model versions a run published, and start and stop
runs through Flower's control API.

Every `/api` route and `/metrics` needs an API key, sent as `X-API-Key: <key>` or as
`Authorization: Bearer <key>`. A read-only key may read (GET); starting and stopping runs needs
an operator key. Paths in a run config must lie inside the folders the operator allows.
The run store holds aggregates only: nothing here is per device."""

API_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "Missing or wrong API key."},
    413: {"model": Problem, "description": "The request body is larger than FEDPREF_MAX_BODY_BYTES."},
    503: {"model": Problem, "description": "The run store or the SuperLink cannot be reached."},
}
RUN_RESPONSES: dict[int | str, dict[str, Any]] = {404: {"model": Problem, "description": "No such run in the run store."}}
FLOWER_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "The request body is not valid JSON (for example, not UTF-8)."},
    403: {"model": Problem, "description": "A read-only key; a path in the run config outside FEDPREF_RUN_CONFIG_ROOTS; or reproducible-noise=true."},
    404: {"model": Problem, "description": "The SuperLink knows no such run."},
    409: {"model": Problem, "description": "The run has already finished."},
    502: {"model": Problem, "description": "The SuperLink refused the request (its message is the detail)."},
    504: {"model": Problem, "description": "The flwr CLI did not answer in time."},
}

MODEL_RESPONSES: dict[int | str, dict[str, Any]] = {
    304: {"description": "The model named by If-None-Match is still current (no body)."},
    404: {"model": Problem, "description": "No such published model (or nothing published yet)."},
}

RunId = Annotated[int, PathParam(ge=1, le=SQLITE_MAX_INT, description="The run store's id of a run (GET /api/runs).")]
FlowerRunId = Annotated[int, PathParam(ge=0, le=FLOWER_MAX_RUN_ID, description="Flower's id of a run (GET /api/flower/runs).")]


def create_app(settings: OperatorSettings, *, run_store: RunStore | None = None, flower: FlowerControl | None = None) -> FastAPI:
    """The operator API over ``run_store`` (default: ``RunStore(settings.run_store)``) and
    ``flower`` (default: ``FlowerControl.from_settings(settings)``)."""
    own_store = run_store is None
    store = run_store if run_store is not None else RunStore(settings.run_store)
    control = flower if flower is not None else FlowerControl.from_settings(settings)
    keys = KeyRing(settings.key_values(), settings.read_key_values())
    publish_dir = settings.publish_dir
    paths = PathPolicy(settings.run_config_roots, settings.run_store)

    def is_public(path: str) -> bool:
        return path in PUBLIC_PATHS or (publish_dir is not None and (path == MODELS_PREFIX or path.startswith(MODELS_PREFIX + "/")))

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        if own_store:
            store.close()

    app = FastAPI(title="fedpref operator API", version=__version__, description=DESCRIPTION, openapi_tags=TAGS, lifespan=lifespan)
    app.state.settings, app.state.run_store, app.state.flower = settings, store, control

    registry = CollectorRegistry(auto_describe=True)
    requests = Counter("fedpref_api_requests", "HTTP requests answered by the operator API", ["method", "route", "status"], registry=registry)
    latency = Histogram("fedpref_api_request_duration_seconds", "Time to answer a request", ["method", "route"], registry=registry)
    registry.register(_RunStoreCollector(store))
    app.state.metrics_registry = registry
    # The last added runs first: the metrics count every answer, the guard's refusals too.
    app.add_middleware(_Guard, keys=keys, is_public=is_public, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(_RequestMetrics, requests=requests, latency=latency)

    api_key = APIKeyHeader(name=API_KEY_HEADER, scheme_name="ApiKey", auto_error=False, description="An operator API key (FEDPREF_API_KEYS).")
    bearer = HTTPBearer(scheme_name="BearerToken", auto_error=False, description="An operator API key as a bearer token (what Prometheus sends).")

    def require_operator(
        request: Request,
        key: Annotated[str | None, Security(api_key)],
        credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
    ) -> None:
        """Accept the request if the X-API-Key header or the bearer token is a configured key
        (compared in constant time, every key every time) that may use this method: any key
        GET and HEAD, an operator key anything. (The guard has checked this already, before
        the body was read; this declares the credentials in the OpenAPI document and holds
        should a route ever be reached another way.)"""
        offered = [value.encode("utf-8", "surrogateescape") for value in (key, credentials.credentials if credentials else None) if value]
        granted = keys.grant(offered)
        if granted is None:
            log.info("refused an operator request to %s from %s: %s", request.url.path, request.client.host if request.client else "?",
                     "wrong key" if offered else "no key")
            raise HTTPException(401, detail=UNAUTHORIZED, headers={"WWW-Authenticate": WWW_AUTHENTICATE})
        if granted == READ and request.method not in READ_METHODS:
            raise HTTPException(403, detail=FORBIDDEN)

    operator = [Depends(require_operator)]

    allowed_methods: list[tuple[re.Pattern, set[str]]] = []

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """FastAPI's own answer, except that a 405's ``Allow`` lists the methods of every route
        of the path (Starlette lists only those of the first route it tried)."""
        if exc.status_code == 405:
            if not allowed_methods:
                allowed_methods.extend(_route_methods(app))
            path = request.scope.get("path", "")
            allowed = sorted({m for regex, methods in allowed_methods if regex.match(path) for m in methods})
            if allowed:
                exc.headers = {**(exc.headers or {}), "Allow": ", ".join(allowed)}
        return await http_exception_handler(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's 422, except that inputs JSON cannot carry (NaN, Infinity, 1e400: Python's
        JSON parser accepts them) are echoed as strings instead of failing the answer with a 500."""
        return JSONResponse(status_code=422, content={"detail": _json_safe(jsonable_encoder(exc.errors()))})

    # -- public ---------------------------------------------------------------------------------
    @app.get("/health", tags=["health"], summary="Liveness", response_model=Health)
    def health() -> Health:
        """`{"status": "ok"}` while the process answers: no operator data, no credentials needed."""
        return Health(status="ok")

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/dashboard")

    app.include_router(dashboard_router(settings.dashboard_refresh_seconds))
    if publish_dir is not None:
        app.include_router(model_router(publish_dir), responses=MODEL_RESPONSES)

    # -- runs (the run store) -------------------------------------------------------------------
    runs = APIRouter(prefix="/api/runs", tags=["runs"], dependencies=operator, responses=API_RESPONSES)

    @runs.get("", summary="All runs, newest first", response_model=list[RunSummary])
    def list_runs() -> list[dict]:
        rows = _store_call(store.runs)
        done = _store_call(_rounds_done, store)
        return [_summary(row, done.get(row["id"], 0)) for row in rows]

    @runs.get("/{run_id}", summary="One run, with its privacy spend and config", response_model=RunDetail, responses=RUN_RESPONSES)
    def get_run(run_id: RunId) -> dict:
        row = _store_call(store.run, run_id)
        config = _store_call(store.run_config, run_id)
        rounds = _store_call(store.rounds, run_id)
        models = _store_call(store.models, run_id)
        done = max((r["round"] for r in rounds), default=0)
        return {**_summary(row, done), "config": config, "latest_model_version": models[-1]["version"] if models else None}

    @runs.get("/{run_id}/rounds", summary="The rounds of a run: aggregated metrics, participation, epsilon", response_model=list[RoundRecord], responses=RUN_RESPONSES)
    def get_rounds(run_id: RunId) -> list[dict]:
        return [{**r, "finished_at": _utc(r["finished_at"])} for r in _store_call(store.rounds, run_id)]

    @runs.get("/{run_id}/privacy", summary="Privacy spent by a run: epsilon, delta, budget left, epsilon per round", response_model=PrivacyReport, responses=RUN_RESPONSES)
    def get_privacy(run_id: RunId) -> dict:
        row = _store_call(store.run, run_id)
        rounds = _store_call(store.rounds, run_id)
        points = [{"round": r["round"], "epsilon": r["epsilon"]} for r in rounds if r.get("epsilon") is not None]
        return {**_privacy(row).model_dump(), "run_id": run_id, "rounds": points}

    @runs.get("/{run_id}/models", summary="Model versions a run published", response_model=list[ModelRecord], responses=RUN_RESPONSES)
    def get_models(run_id: RunId) -> list[dict]:
        return [{**m, "created_at": _utc(m["created_at"]), "url": f"/models/{m['version']}" if publish_dir is not None else None}
                for m in _store_call(store.models, run_id)]

    # -- Flower's control interface -------------------------------------------------------------
    defaults = control.run_config_defaults() if hasattr(control, "run_config_defaults") else None
    StartRunRequest = start_request_model(defaults)  # noqa: N806 (a class)

    @runs.post("", summary="Start a run (flwr run)", status_code=202, response_model=StartedRun, tags=["flower"], responses=FLOWER_RESPONSES)
    def start_run(body: Annotated[StartRunRequest | None, Body()] = None) -> dict:
        """Submit the Flower app (FEDPREF_APP_DIR) to the SuperLink with these run-config
        overrides. The run appears in GET /api/runs once its ServerApp starts. Paths
        (history-dir, results-dir, run-store, checkpoint-dir, publish-dir, publish-key,
        store-dir) must resolve inside FEDPREF_RUN_CONFIG_ROOTS (403 otherwise); they are sent
        to Flower resolved. ``reproducible-noise=true`` (noise computable from the seed, for
        simulations) is refused (403)."""
        run_config = dict(body.run_config) if body is not None else {}
        problems = control.check_run_config(run_config)
        if problems:
            raise RequestValidationError([{"type": "value_error", "loc": ("body", "run_config", key), "msg": message, "input": run_config.get(key)}
                                          for key, message in problems])
        weakening = [f"{key}: a run started here is a real run, whose DP noise comes from the operating system; "
                     f"{key} = true is for reproducible simulations (fedpref simulate)"
                     for key in SIMULATION_ONLY if key in run_config and _switched_on(run_config[key])]
        if weakening:
            raise HTTPException(403, detail="; ".join(weakening))
        run_config, refused = paths.check(run_config)
        if refused:
            log.warning("refused to start a run with paths outside FEDPREF_RUN_CONFIG_ROOTS: %s", "; ".join(refused))
            raise HTTPException(403, detail="; ".join(refused))
        return _flower_call(control.start, run_config)

    @runs.post("/flower/{flower_run_id}/stop", summary="Stop a run (flwr stop)", response_model=StoppedRun, tags=["flower"], responses=FLOWER_RESPONSES)
    def stop_run(flower_run_id: FlowerRunId) -> dict:
        """Ask the SuperLink to stop a Flower run; the run-store runs of that Flower run that are
        still marked running are marked stopped."""
        answer = _flower_call(control.stop, flower_run_id)
        marked: list[int] = []

        def mark() -> None:
            with Session(store.engine) as session:  # Flower's ids are unsigned 64-bit: the store keeps them as text
                ids = session.scalars(select(Run.id).where(Run.flower_run_id == str(flower_run_id), Run.status == "running")).all()
            for run_id in ids:
                store.finish_run(run_id, "stopped", note="stopped through the operator API")
                marked.append(int(run_id))

        _store_call(mark)
        return {**answer, "store_runs_marked_stopped": marked}

    flower_routes = APIRouter(prefix="/api/flower", tags=["flower"], dependencies=operator, responses=API_RESPONSES)

    @flower_routes.get("/runs", summary="The SuperLink's runs (flwr ls)", response_model=list[FlowerRun], responses=FLOWER_RESPONSES)
    def flower_runs() -> list[dict]:
        return _flower_call(control.list)

    app.include_router(runs)
    app.include_router(flower_routes)

    # -- monitoring -----------------------------------------------------------------------------
    @app.get("/metrics", tags=["monitoring"], summary="Prometheus metrics", dependencies=operator, response_class=PlainTextResponse,
             responses={**API_RESPONSES, 200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format."}})
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(settings: OperatorSettings | None = None) -> None:
    """Serve the operator API with uvicorn on ``settings.host:settings.port`` (blocks)."""
    import uvicorn

    settings = settings or OperatorSettings()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, proxy_headers=True, log_level="info")
