"""Settings of the operator API (``fedpref serve``), read by ``pydantic-settings``.

Every field comes from an environment variable named ``FEDPREF_<FIELD>`` (or a ``.env`` file
in the working directory), e.g.::

    FEDPREF_ENVIRONMENT=production
    FEDPREF_API_KEYS=<key1>,<key2>          # operator keys, comma-separated (a JSON list works too)
    FEDPREF_READ_API_KEYS=<key3>            # read-only keys: GET routes, /metrics, the dashboard
    FEDPREF_RUN_CONFIG_ROOTS=/srv/fedpref   # folders that paths in a run config sent to the API must lie in
    FEDPREF_RUN_STORE=postgresql+psycopg://fedpref@db/fedpref
    FEDPREF_PUBLISH_DIR=/srv/fedpref/models
    FEDPREF_FLWR_HOME=/srv/fedpref/flwr     # holds config.toml with the SuperLink connection
    FEDPREF_SUPERLINK_CONNECTION=fedpref
    FEDPREF_APP_DIR=/srv/fedpref/app        # the Flower app that `flwr run` submits

Outside development the settings refuse to load without real API keys: an operator API that
quietly accepts a key printed in the documentation is worse than one that does not start. In
development, without keys, the API accepts ``DEV_API_KEY`` and logs a warning saying so; on any
address but a loopback one the settings refuse it, in every environment.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

log = logging.getLogger(__name__)

DEV_API_KEY = "dev-key-change-me"
MIN_KEY_LENGTH = 24
KEY_HINT = "generate one with: python -c \"import secrets; print(secrets.token_urlsafe(32))\""
MAX_BODY_BYTES = 64 * 1024  # a start request's run config is a few KiB


def is_loopback(host: str) -> bool:
    """Whether ``host`` is an address only this machine reaches (``localhost``, ``127.x.y.z``, ``::1``)."""
    name = host.strip().strip("[]")
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to anything


def _split_list(value: object, variable: str) -> object:
    """``a,b`` or ``["a", "b"]`` from the environment; blanks are dropped."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{variable} looks like a JSON list but is not valid JSON ({exc}); use comma-separated values") from None
        else:
            value = text.split(",")
    if isinstance(value, (list, tuple)):
        return [k.strip() if isinstance(k, str) else k for k in value if not (isinstance(k, str) and not k.strip())]
    return value


def _default_app_dir() -> Path | None:
    """The source tree's root (the folder above ``server/``) when it is a Flower app, as in a
    checkout or an editable install; ``None`` for an installed wheel, which has no app folder."""
    root = Path(__file__).resolve().parents[1]
    try:
        project = tomllib.loads((root / "pyproject.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    return root if "app" in project.get("tool", {}).get("flwr", {}) else None


class OperatorSettings(BaseSettings):
    """What the operator API needs: who may call it, where the runs are, how to reach Flower."""

    model_config = SettingsConfigDict(env_prefix="FEDPREF_", env_file=".env", env_file_encoding="utf-8", extra="ignore")

    environment: Literal["development", "production"] = Field(
        "development", description="`production` refuses missing, short or default API keys.")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Operator keys (every route), accepted in `X-API-Key` or `Authorization: Bearer`; comma-separated in the environment.")
    read_api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Read-only keys: GET routes, `/metrics` and the dashboard, never a route that starts or stops a run.")
    run_config_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="Folders that the path-valued run-config keys of `POST /api/runs` must resolve inside (none: they are all refused).")
    max_body_bytes: int = Field(
        MAX_BODY_BYTES, ge=1024, le=16 * 1024 * 1024, description="Largest request body the API reads; a larger one is refused with 413 unread.")
    run_store: str = Field("sqlite:///runs.sqlite", description="SQLAlchemy URL (or file path) of the run store the ServerApp writes.")
    publish_dir: Path | None = Field(None, description="Folder of published models; when set, the public /models routes serve it.")
    flwr_home: Path | None = Field(None, description="FLWR_HOME for the `flwr` CLI (the folder holding config.toml).")
    superlink_connection: str = Field("fedpref", description="Name of the SuperLink connection in the flwr config.toml.")
    app_dir: Path | None = Field(default_factory=_default_app_dir, description="The Flower app folder `flwr run` submits.")
    host: str = Field("127.0.0.1", description="Address uvicorn binds.")
    port: int = Field(8000, ge=1, le=65535, description="Port uvicorn binds.")
    dashboard_refresh_seconds: float = Field(5.0, gt=0, le=3600, description="How often the dashboard reloads runs and rounds.")
    flwr_timeout_seconds: float = Field(60.0, gt=0, description="Time limit of `flwr ls` and `flwr stop`.")
    flwr_run_timeout_seconds: float = Field(300.0, gt=0, description="Time limit of `flwr run` (it builds and uploads the app).")

    @field_validator("api_keys", "read_api_keys", "run_config_roots", mode="before")
    @classmethod
    def _split(cls, value: object, info) -> object:
        return _split_list(value, f"FEDPREF_{info.field_name.upper()}")

    @field_validator("run_config_roots")
    @classmethod
    def _roots_are_folders(cls, value: list[Path]) -> list[Path]:
        roots = []
        for root in value:
            if not root.is_absolute():
                raise ValueError(f"FEDPREF_RUN_CONFIG_ROOTS: {str(root)!r} is not an absolute path: name folders from /")
            if not root.is_dir():
                raise ValueError(f"FEDPREF_RUN_CONFIG_ROOTS: {root} is not a folder: create it, or leave it out")
            roots.append(root.resolve())
        return roots

    @field_validator("app_dir")
    @classmethod
    def _app_dir_is_a_flower_app(cls, value: Path | None) -> Path | None:
        if value is not None and not (value / "pyproject.toml").is_file():
            raise ValueError(f"FEDPREF_APP_DIR={value} holds no pyproject.toml: point it at the Flower app folder that `flwr run` submits")
        return value

    @model_validator(mode="after")
    def _keys_fit_the_environment(self) -> OperatorSettings:
        keys = [k.get_secret_value() for k in self.api_keys]
        read = [k.get_secret_value() for k in self.read_api_keys]
        if set(keys) & set(read):
            raise ValueError("a key is in both FEDPREF_API_KEYS and FEDPREF_READ_API_KEYS: give the read-only key a value of its own "
                             f"({KEY_HINT})")
        if self.environment == "development":
            if not keys:
                log.warning("no FEDPREF_API_KEYS set: the operator API accepts the development key %r; never expose it beyond this machine", DEV_API_KEY)
                self.api_keys = [SecretStr(DEV_API_KEY)]
                keys = [DEV_API_KEY]
            if DEV_API_KEY in keys + read and not is_loopback(self.host):
                raise ValueError(
                    f"FEDPREF_HOST={self.host} is not a loopback address, and the operator API would accept the development key "
                    f"{DEV_API_KEY!r}, which is public: anyone who reaches port {self.port} could start and stop runs. "
                    f"Set FEDPREF_API_KEYS to a key of your own ({KEY_HINT}) and FEDPREF_ENVIRONMENT=production, and put TLS in front of "
                    "the API (a reverse proxy with a certificate for the host name: keys travel in headers); or bind 127.0.0.1")
            return self
        if not keys:
            raise ValueError(f"FEDPREF_API_KEYS is empty: outside development the operator API needs at least one key of {MIN_KEY_LENGTH}+ characters ({KEY_HINT})")
        for variable, values in (("FEDPREF_API_KEYS", keys), ("FEDPREF_READ_API_KEYS", read)):
            if DEV_API_KEY in values:
                raise ValueError(f"{variable} contains the development key {DEV_API_KEY!r}, which is public: replace it ({KEY_HINT})")
            short = [i + 1 for i, k in enumerate(values) if len(k) < MIN_KEY_LENGTH]
            if short:
                raise ValueError(f"{variable}: key number {', '.join(map(str, short))} is shorter than {MIN_KEY_LENGTH} characters ({KEY_HINT})")
        return self

    def key_values(self) -> list[bytes]:
        """The operator keys as bytes (what the API compares in constant time)."""
        return [k.get_secret_value().encode("utf-8") for k in self.api_keys]

    def read_key_values(self) -> list[bytes]:
        """The read-only keys as bytes."""
        return [k.get_secret_value().encode("utf-8") for k in self.read_api_keys]
