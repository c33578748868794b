"""The device store: one SQLite file per device (or one in memory, for simulations).

It holds everything the device knows about its person, and nothing leaves it except through
the update guard:

- ``events``: what the person did (catalogue item, kind such as view / click / purchase /
  rating, optional value, time), trimmed to a retention limit (maximum age, maximum count);
- ``consent``: every consent decision with its time (the latest one is in force);
- ``sent``: the record of what left the device (never the content of a message);
- ``trainings``: when the device trained, on how many events;
- ``arrays``: the private model and the latest global model;
- ``settings``: schema version, the eligibility policy, the conditions the app last reported.

The file is in WAL mode, so the app writing events and the SuperNode process reading them
share it safely. ``secure_delete`` is on, so that erased rows are overwritten rather than left
in free pages: :meth:`EventStore.erase` plus a checkpoint and ``VACUUM`` leaves no byte of
them in the file (a test reads the file to check), and it resets the change counter, the
creation time and the AUTOINCREMENT counters, which would tell how much there was.

The file, and its ``-wal`` and ``-shm`` companions, are readable and writable by their owner
only (mode 0600, whatever the umask): the store creates the file with that mode before SQLite
opens it (SQLite gives its companions the database file's mode), and tightens the mode of an
existing store and its companions when it opens one.

Built on SQLAlchemy Core (the project's database layer; the run store uses it too).
"""

from __future__ import annotations

import json
import secrets
import threading
import time as _time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
from sqlalchemy import (
    Column,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DatabaseError
from sqlalchemy.pool import StaticPool

from fedpref.models.files import ensure_private_file, make_private

SCHEMA_VERSION = 1
IN_MEMORY = ":memory:"

metadata = MetaData()
settings_table = Table("settings", metadata, Column("key", String, primary_key=True), Column("value", Text, nullable=False))
events_table = Table(
    "events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("item", Integer, nullable=False),
    Column("kind", String, nullable=False),
    Column("value", Float, nullable=True),
    Column("time", Float, nullable=False, index=True),
)
consent_table = Table(
    "consent",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("time", Float, nullable=False),
    Column("level", String, nullable=False),
    Column("kinds", Text, nullable=True),  # JSON list, or NULL for every kind
    Column("source", String, nullable=False),
)
sent_table = Table(
    "sent",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("time", Float, nullable=False),
    Column("entry", Text, nullable=False),  # JSON: see fedpref.client.ledger.SentRecord
)
trainings_table = Table(
    "trainings",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("time", Float, nullable=False),
    Column("purpose", String, nullable=False),  # federated | personalize
    Column("events", Integer, nullable=False),
    Column("round", Integer, nullable=True),
)
arrays_table = Table(
    "arrays",
    metadata,
    Column("scope", String, primary_key=True),  # private | global
    Column("name", String, primary_key=True),
    Column("dtype", String, nullable=False),
    Column("shape", String, nullable=False),
    Column("data", LargeBinary, nullable=False),
)
PERSONAL_TABLES = (events_table, consent_table, sent_table, trainings_table)
FRESH_SETTINGS = ("created", "generation", "instance")  # set when a store is created, and again when it is erased

# Migrations from version v to v + 1, applied in order when an older store is opened.
MIGRATIONS: Mapping[int, Sequence[str]] = MappingProxyType({})


class StoreError(RuntimeError):
    """The device store cannot be opened or used."""


@dataclass(frozen=True)
class Retention:
    """How long events are kept: at most ``max_age_days`` old and at most ``max_events``
    (the oldest go first). ``None`` for no limit."""

    max_age_days: float | None = 365.0
    max_events: int | None = 10_000

    def __post_init__(self) -> None:
        if self.max_age_days is not None and not self.max_age_days > 0:
            raise ValueError(f"max_age_days must be positive or None, got {self.max_age_days}")
        if self.max_events is not None and self.max_events < 1:
            raise ValueError(f"max_events must be at least 1 or None, got {self.max_events}")


@dataclass(frozen=True)
class Event:
    item: int
    kind: str
    value: float | None
    time: float


COMPANIONS = ("-wal", "-shm", "-journal")  # the files SQLite keeps next to a database


def _create_private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 if it does not exist (SQLite then makes a database of
    it, and gives its companions its mode); set the mode of an existing one and its companions
    (a store written by an older fedpref may be 0644)."""
    if not ensure_private_file(path):
        make_private(path)
    for suffix in COMPANIONS:
        make_private(f"{path}{suffix}")


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # Python's sqlite3 would run CREATE TABLE outside the transaction, committing each table on
    # its own: a device killed while its store is first created would leave tables without a
    # schema version. SQLAlchemy's recipe for pysqlite: no implicit transactions, and an
    # explicit BEGIN for each of SQLAlchemy's (_begin below), so DDL is transactional too.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout = 10000")
    cursor.execute("PRAGMA secure_delete = ON")
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.execute("PRAGMA synchronous = NORMAL")
    cursor.close()


def _holds_rows(conn, tables: set[str]) -> bool:
    return any(conn.execute(text(f'SELECT 1 FROM "{table}" LIMIT 1')).first() for table in tables)


def _begin(conn) -> None:
    if conn.get_execution_options().get("isolation_level") != "AUTOCOMMIT":  # VACUUM runs outside any transaction
        conn.exec_driver_sql("BEGIN")


class EventStore:
    """One device's SQLite store. ``EventStore(":memory:")`` keeps it in memory."""

    def __init__(self, path: str | Path = IN_MEMORY, *, retention: Retention | None = None, clock=_time.time) -> None:
        self.path = str(path)
        self.retention = retention or Retention()
        self.clock = clock
        self._lock = threading.RLock()
        self.engine = self._connect()
        self._check_schema()
        self.enforce_retention()

    # -- opening ------------------------------------------------------------------
    def _connect(self) -> Engine:
        if self.path == IN_MEMORY:
            engine = create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})
        else:
            file = Path(self.path)
            if file.is_dir():
                raise StoreError(f"{file} is a folder: give the path of the device's store file, e.g. {file / 'device.sqlite'}")
            if not file.parent.exists():
                raise StoreError(f"the folder of the store {file} does not exist: create {file.parent} first")
            try:
                _create_private_file(file)
            except OSError as exc:
                raise StoreError(f"cannot open the store {file}: {exc.strerror}") from None
            engine = create_engine(f"sqlite:///{file}", connect_args={"check_same_thread": False, "timeout": 10})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _begin)
        return engine

    def _check_schema(self) -> None:
        try:
            with self.engine.begin() as conn:
                tables = {row[0] for row in conn.execute(text("SELECT name FROM sqlite_master WHERE type='table'"))}
                if tables and "settings" not in tables:
                    raise StoreError(f"{self.path} is an SQLite file but not a fedpref device store (tables: {sorted(tables)})")
                if tables and not conn.execute(select(settings_table.c.key).limit(1)).first() and not _holds_rows(conn, tables):
                    # Tables and no row at all: a creation interrupted by a version of fedpref whose
                    # schema DDL was not transactional. Nothing was stored: finish creating it.
                    tables = set()
                if not tables:
                    metadata.create_all(conn)
                    conn.execute(insert(settings_table).values(key="schema_version", value=str(SCHEMA_VERSION)))
                    self._start_afresh(conn)
                    return
                found = conn.execute(select(settings_table.c.value).where(settings_table.c.key == "schema_version")).scalar()
                version = int(found) if found is not None else 0
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"{self.path} has store schema version {version}, newer than this fedpref's {SCHEMA_VERSION}: "
                        "upgrade fedpref to open it (nothing was changed)"
                    )
                for v in range(version, SCHEMA_VERSION):
                    if v not in MIGRATIONS:
                        raise StoreError(f"{self.path}: no migration from store schema version {v}; it was not written by fedpref")
                    for statement in MIGRATIONS[v]:
                        conn.execute(text(statement))
                    conn.execute(settings_table.update().where(settings_table.c.key == "schema_version").values(value=str(v + 1)))
        except DatabaseError as exc:
            raise StoreError(f"{self.path} is not a readable SQLite file: {exc.orig}") from None

    def _start_afresh(self, conn) -> None:
        """The settings of a new store: its creation time, the change counter at 0, and a new
        random instance token (so that a reader's cache of what was before cannot pass for
        current when the counter comes back to a value it had)."""
        conn.execute(delete(settings_table).where(settings_table.c.key.in_(FRESH_SETTINGS)))
        conn.execute(insert(settings_table), [
            {"key": "created", "value": repr(self.clock())},
            {"key": "generation", "value": "0"},
            {"key": "instance", "value": secrets.token_hex(16)},
        ])

    @staticmethod
    def _bump(conn) -> None:
        conn.execute(text("UPDATE settings SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'"))

    def generation(self) -> int:
        """A counter that every change of events, consent, arrays or settings moves (from any
        process), back to 0 when the store is erased."""
        return int(self.get_setting("generation", "0"))

    def change_marker(self) -> tuple[str, int]:
        """``(instance, generation)``, read at once: readers compare it to know whether what
        they cached is still current (the instance changes when the store is erased)."""
        with self.engine.connect() as conn:
            found = dict(conn.execute(select(settings_table.c.key, settings_table.c.value).where(settings_table.c.key.in_(["instance", "generation"]))).all())
        return found.get("instance", ""), int(found.get("generation", "0"))

    def settings(self) -> dict[str, str]:
        """Every setting, by key."""
        with self.engine.connect() as conn:
            return dict(conn.execute(select(settings_table.c.key, settings_table.c.value).order_by(settings_table.c.key)).all())

    @property
    def schema_version(self) -> int:
        return int(self.get_setting("schema_version"))

    # -- settings -----------------------------------------------------------------
    def get_setting(self, key: str, default: str | None = None) -> str | None:
        with self.engine.connect() as conn:
            value = conn.execute(select(settings_table.c.value).where(settings_table.c.key == key)).scalar()
        return default if value is None else value

    def set_setting(self, key: str, value: str) -> None:
        with self._lock, self.engine.begin() as conn:
            self._set_settings(conn, {key: value})
            self._bump(conn)

    @staticmethod
    def _set_settings(conn, values: dict[str, str]) -> None:
        if values:
            conn.execute(delete(settings_table).where(settings_table.c.key.in_(list(values))))
            conn.execute(insert(settings_table), [{"key": k, "value": v} for k, v in values.items()])

    # -- events -------------------------------------------------------------------
    def add_events(self, events: Iterable[Event]) -> int:
        rows = [{"item": int(e.item), "kind": e.kind, "value": e.value, "time": float(e.time)} for e in events]
        if not rows:
            return 0
        with self._lock, self.engine.begin() as conn:
            conn.execute(insert(events_table), rows)
            self._bump(conn)
        self.enforce_retention()
        return len(rows)

    def events(self, kinds: Iterable[str] | None = None) -> list[Event]:
        query = select(events_table.c.item, events_table.c.kind, events_table.c.value, events_table.c.time).order_by(
            events_table.c.time, events_table.c.id
        )
        if kinds is not None:
            query = query.where(events_table.c.kind.in_(list(kinds)))
        with self.engine.connect() as conn:
            return [Event(int(r.item), r.kind, r.value, float(r.time)) for r in conn.execute(query)]

    def items(self, kinds: Iterable[str] | None = None) -> np.ndarray:
        """The distinct items of the events (of ``kinds``), ordered by their first time."""
        query = select(events_table.c.item, func.min(events_table.c.time).label("first")).group_by(events_table.c.item)
        if kinds is not None:
            query = query.where(events_table.c.kind.in_(list(kinds)))
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by("first", events_table.c.item)).all()
        return np.array([r.item for r in rows], dtype=np.int64)

    def count_events(self, kinds: Iterable[str] | None = None) -> int:
        query = select(func.count()).select_from(events_table)
        if kinds is not None:
            query = query.where(events_table.c.kind.in_(list(kinds)))
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar())

    def enforce_retention(self) -> int:
        """Delete events older than the maximum age and beyond the maximum count (oldest first)."""
        removed = 0
        with self._lock, self.engine.begin() as conn:
            if self.retention.max_age_days is not None:
                cutoff = self.clock() - self.retention.max_age_days * 86400.0
                removed += conn.execute(delete(events_table).where(events_table.c.time < cutoff)).rowcount
            if self.retention.max_events is not None:
                keep = (
                    select(events_table.c.id)
                    .order_by(events_table.c.time.desc(), events_table.c.id.desc())
                    .limit(self.retention.max_events)
                )
                removed += conn.execute(delete(events_table).where(events_table.c.id.not_in(keep))).rowcount
            if removed:
                self._bump(conn)
        return removed

    # -- consent ------------------------------------------------------------------
    def add_consent(self, level: str, kinds: Sequence[str] | None, source: str) -> None:
        with self._lock, self.engine.begin() as conn:
            conn.execute(
                insert(consent_table).values(
                    time=self.clock(), level=level, kinds=None if kinds is None else json.dumps(sorted(kinds)), source=source
                )
            )
            self._bump(conn)

    def consent_history(self) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(consent_table).order_by(consent_table.c.id)).all()
        return [
            {"time": r.time, "level": r.level, "kinds": None if r.kinds is None else json.loads(r.kinds), "source": r.source}
            for r in rows
        ]

    def latest_consent(self) -> dict | None:
        with self.engine.connect() as conn:
            r = conn.execute(select(consent_table).order_by(consent_table.c.id.desc()).limit(1)).first()
        if r is None:
            return None
        return {"time": r.time, "level": r.level, "kinds": None if r.kinds is None else json.loads(r.kinds), "source": r.source}

    # -- the record of what left, and of training ---------------------------------
    def add_sent(self, entry: dict) -> None:
        with self._lock, self.engine.begin() as conn:
            conn.execute(insert(sent_table).values(time=float(entry["time"]), entry=json.dumps(entry, sort_keys=True)))

    def sent(self) -> list[dict]:
        with self.engine.connect() as conn:
            return [json.loads(r.entry) for r in conn.execute(select(sent_table.c.entry).order_by(sent_table.c.id))]

    def add_training(self, purpose: str, n_events: int, server_round: int | None) -> None:
        with self._lock, self.engine.begin() as conn:
            conn.execute(insert(trainings_table).values(time=self.clock(), purpose=purpose, events=int(n_events), round=server_round))

    def trainings(self) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(trainings_table).order_by(trainings_table.c.id)).all()
        return [{"time": r.time, "purpose": r.purpose, "events": r.events, "round": r.round} for r in rows]

    # -- arrays -------------------------------------------------------------------
    def put_arrays(self, scope: str, arrays: dict[str, np.ndarray], *, settings: dict[str, str] | None = None) -> None:
        """Replace the arrays of ``scope`` (and set ``settings``) in one transaction."""
        rows = [
            {"scope": scope, "name": name, "dtype": str(a.dtype), "shape": json.dumps(list(a.shape)), "data": np.ascontiguousarray(a).tobytes()}
            for name, a in arrays.items()
        ]
        with self._lock, self.engine.begin() as conn:
            conn.execute(delete(arrays_table).where(arrays_table.c.scope == scope))
            if rows:
                conn.execute(insert(arrays_table), rows)
            self._set_settings(conn, settings or {})
            self._bump(conn)

    def get_arrays(self, scope: str) -> dict[str, np.ndarray]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(arrays_table).where(arrays_table.c.scope == scope)).all()
        return {
            r.name: np.frombuffer(r.data, dtype=np.dtype(r.dtype)).reshape(json.loads(r.shape)).copy() for r in rows
        }

    # -- erasure ------------------------------------------------------------------
    def erase(self, *, keep_global: bool = True) -> None:
        """Delete every personal row (events, consent history, the record of what left,
        trainings, the private model, the reported conditions and policy, the last run's
        settings, the device key and its SuperNode key's public half, the installed model's
        version), start the store afresh (creation time now, change counter 0, a new instance
        token), then rewrite the file so that no byte of them is left in it, its WAL or its
        free pages. ``keep_global=False`` also deletes the global model and its specification."""
        with self._lock:
            with self.engine.begin() as conn:
                for table in PERSONAL_TABLES:
                    conn.execute(delete(table))
                scopes = ["private"] if keep_global else ["private", "global"]
                conn.execute(delete(arrays_table).where(arrays_table.c.scope.in_(scopes)))
                kept = ["schema_version", "model"] if keep_global else ["schema_version"]
                conn.execute(delete(settings_table).where(settings_table.c.key.not_in(kept)))
                # The change counter and the creation time would tell how much there was, and since when.
                self._start_afresh(conn)
                # So would the AUTOINCREMENT counters.
                if conn.execute(text("SELECT name FROM sqlite_master WHERE name='sqlite_sequence'")).first():
                    conn.execute(text("DELETE FROM sqlite_sequence"))
            if self.path != IN_MEMORY:
                with self.engine.connect() as conn:
                    conn = conn.execution_options(isolation_level="AUTOCOMMIT")
                    conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
                    conn.execute(text("VACUUM"))
                    conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))

    def close(self) -> None:
        self.engine.dispose()

