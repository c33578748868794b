"""The run store: every run, round, aggregated metric, privacy spend, number of participating
devices and model version, through SQLAlchemy (a SQLite file by default, any SQLAlchemy URL
otherwise, e.g. ``postgresql+psycopg://...``).

Nothing per device is stored: a round holds aggregates (means over the devices that replied),
counts (how many replied, how many dropped) and the privacy spent so far.

The ServerApp writes it (run-config ``run-store``; by default ``<results-dir>/runs.sqlite``)
and the operator API reads it (``fedpref serve --run-store URL``).

A SQLite file is created readable by its owner only (0600, and its folder 0700 when the store
creates it); SQLite gives its ``-wal`` and ``-shm`` files the database's mode. An existing file
that other accounts may read is used as it is, with a warning that says how to close it.
"""

from __future__ import annotations

import math
import warnings
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, create_engine, event, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from fedpref.models.files import ensure_private_file, open_to_others, private_folder

SCHEMA_VERSION = 1


class Base(DeclarativeBase):
    pass


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    flower_run_id: Mapped[str | None] = mapped_column(String(32), nullable=True)  # Flower's run ids are unsigned 64-bit: too large for SQLite's INTEGER
    status: Mapped[str] = mapped_column(String(20))  # running | completed | failed | stopped
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    config: Mapped[dict] = mapped_column(JSON)
    devices: Mapped[int] = mapped_column(Integer)  # the population
    items: Mapped[int] = mapped_column(Integer)
    rounds_planned: Mapped[int] = mapped_column(Integer)
    dp: Mapped[bool] = mapped_column(Boolean)
    secure_aggregation: Mapped[bool] = mapped_column(Boolean)
    epsilon: Mapped[float | None] = mapped_column(Float, nullable=True)  # spent so far
    delta: Mapped[float | None] = mapped_column(Float, nullable=True)
    target_epsilon: Mapped[float | None] = mapped_column(Float, nullable=True)
    resumed_from_round: Mapped[int | None] = mapped_column(Integer, nullable=True)
    note: Mapped[str | None] = mapped_column(Text, nullable=True)

    rounds: Mapped[list[RoundRow]] = relationship(back_populates="run", order_by="RoundRow.round", cascade="all, delete-orphan")
    models: Mapped[list[ModelVersion]] = relationship(back_populates="run", order_by="ModelVersion.round", cascade="all, delete-orphan")

    def to_dict(self) -> dict:
        budget_left = None
        if self.target_epsilon and self.epsilon is not None:
            budget_left = max(0.0, self.target_epsilon - self.epsilon)
        return {
            "id": self.id,
            "name": self.name,
            "flower_run_id": self.flower_run_id,
            "status": self.status,
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "devices": self.devices,
            "items": self.items,
            "rounds_planned": self.rounds_planned,
            "dp": self.dp,
            "secure_aggregation": self.secure_aggregation,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "budget_left": budget_left,
            "resumed_from_round": self.resumed_from_round,
            "note": self.note,
        }


class RoundRow(Base):
    __tablename__ = "rounds"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    finished_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)  # since the run started
    participants: Mapped[int | None] = mapped_column(Integer, nullable=True)  # devices whose update was aggregated
    dropped: Mapped[int | None] = mapped_column(Integer, nullable=True)
    epsilon: Mapped[float | None] = mapped_column(Float, nullable=True)  # spent after this round
    metrics: Mapped[dict] = mapped_column(JSON)  # aggregated: train-loss, val-hr, ...
    model_version: Mapped[str | None] = mapped_column(String(100), nullable=True)

    run: Mapped[Run] = relationship(back_populates="rounds")

    def to_dict(self) -> dict:
        return {
            "round": self.round,
            "finished_at": self.finished_at.isoformat(),
            "seconds": self.seconds,
            "participants": self.participants,
            "dropped": self.dropped,
            "epsilon": self.epsilon,
            "metrics": self.metrics,
            "model_version": self.model_version,
        }


class ModelVersion(Base):
    __tablename__ = "model_versions"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    version: Mapped[str] = mapped_column(String(100), primary_key=True)
    round: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    sha256: Mapped[str] = mapped_column(String(64))
    signature: Mapped[str | None] = mapped_column(Text, nullable=True)
    size: Mapped[int] = mapped_column(Integer)

    run: Mapped[Run] = relationship(back_populates="models")

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "round": self.round,
            "created_at": self.created_at.isoformat(),
            "sha256": self.sha256,
            "signature": self.signature,
            "size": self.size,
        }


class StoreVersion(Base):
    __tablename__ = "schema_version"

    version: Mapped[int] = mapped_column(Integer, primary_key=True)


class RunStoreError(RuntimeError):
    """The run store cannot be opened or does not hold what was asked."""


def _now() -> datetime:
    return datetime.now(UTC)


def _clean(value):
    """JSON-safe metrics: NaN and infinities become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def default_url(results_dir: str) -> str:
    """``sqlite:///<results-dir>/runs.sqlite``."""
    return f"sqlite:///{Path(results_dir).resolve() / 'runs.sqlite'}"


class RunStore:
    """Read and write runs through SQLAlchemy. ``url``: any SQLAlchemy URL, or a file path."""

    def __init__(self, url: str) -> None:
        if "://" not in url:
            url = f"sqlite:///{Path(url).resolve()}"
        self.url = url
        try:
            self.engine: Engine = create_engine(url, future=True)
        except Exception as exc:  # a bad URL or a missing driver
            raise RunStoreError(f"cannot open the run store {url!r}: {exc}") from None
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
            path = self.engine.url.database
            if path and path != ":memory:" and not path.startswith("file:"):
                _private_sqlite_file(Path(path))
        try:
            Base.metadata.create_all(self.engine)
            with Session(self.engine) as session, session.begin():
                found = session.scalar(select(StoreVersion.version))
                if found is None:
                    session.add(StoreVersion(version=SCHEMA_VERSION))
                elif found > SCHEMA_VERSION:
                    raise RunStoreError(f"the run store {url} has schema version {found}, newer than this fedpref's {SCHEMA_VERSION}: upgrade fedpref")
        except RunStoreError:
            raise
        except Exception as exc:
            raise RunStoreError(f"cannot use the run store {url!r}: {exc}") from None

    # -- writing (the ServerApp) -----------------------------------------------------
    def start_run(self, *, name: str, config: dict, devices: int, items: int, rounds_planned: int, flower_run_id: int | str | None = None,
                  dp: bool = False, secure_aggregation: bool = False, delta: float | None = None, target_epsilon: float | None = None) -> int:
        with Session(self.engine) as session, session.begin():
            run = Run(
                name=name, flower_run_id=None if flower_run_id is None else str(flower_run_id), status="running", started_at=_now(), config=config, devices=devices, items=items,
                rounds_planned=rounds_planned, dp=dp, secure_aggregation=secure_aggregation, delta=delta, target_epsilon=target_epsilon,
            )
            session.add(run)
            session.flush()
            return int(run.id)

    def resume_run(self, run_id: int, from_round: int) -> None:
        """Mark a run running again after a restart; rounds after ``from_round`` are dropped
        (the resumed run computes them again)."""
        with Session(self.engine) as session, session.begin():
            run = self._get(session, run_id)
            run.status, run.finished_at, run.resumed_from_round = "running", None, from_round
            for row in list(run.rounds):
                if row.round > from_round:
                    session.delete(row)

    def record_round(self, run_id: int, server_round: int, *, metrics: dict, seconds: float | None = None, participants: int | None = None,
                     dropped: int | None = None, epsilon: float | None = None, model_version: str | None = None) -> None:
        """Add or update a round (training and evaluation arrive separately)."""
        clean = {k: _clean(v) for k, v in metrics.items()}
        with Session(self.engine) as session, session.begin():
            run = self._get(session, run_id)
            row = session.get(RoundRow, (run_id, server_round))
            if row is None:
                row = RoundRow(run_id=run_id, round=server_round, finished_at=_now(), metrics={})
                session.add(row)
            row.metrics = {**(row.metrics or {}), **clean}
            row.finished_at = _now()
            for key, value in (("seconds", seconds), ("participants", participants), ("dropped", dropped), ("epsilon", epsilon), ("model_version", model_version)):
                if value is not None:
                    setattr(row, key, value)
            if epsilon is not None:
                run.epsilon = epsilon

    def record_model(self, run_id: int, *, version: str, server_round: int, sha256: str, size: int, signature: str | None = None) -> None:
        with Session(self.engine) as session, session.begin():
            self._get(session, run_id)
            session.merge(ModelVersion(run_id=run_id, version=version, round=server_round, created_at=_now(), sha256=sha256, signature=signature, size=size))

    def finish_run(self, run_id: int, status: str = "completed", note: str | None = None) -> None:
        if status not in ("completed", "failed", "stopped"):
            raise ValueError(f"a run finishes as completed, failed or stopped, not {status!r}")
        with Session(self.engine) as session, session.begin():
            run = self._get(session, run_id)
            if run.status == "stopped" and status == "failed":
                return  # an operator stopped it: the ServerApp's failure that follows is that stop
            run.status, run.finished_at = status, _now()
            if note:
                run.note = note

    # -- reading (the operator API) ----------------------------------------------------
    def runs(self) -> list[dict]:
        with Session(self.engine) as session:
            return [r.to_dict() for r in session.scalars(select(Run).order_by(Run.id.desc()))]

    def run(self, run_id: int) -> dict:
        with Session(self.engine) as session:
            return self._get(session, run_id).to_dict()

    def run_config(self, run_id: int) -> dict:
        with Session(self.engine) as session:
            return dict(self._get(session, run_id).config)

    def rounds(self, run_id: int) -> list[dict]:
        with Session(self.engine) as session:
            return [r.to_dict() for r in self._get(session, run_id).rounds]

    def models(self, run_id: int) -> list[dict]:
        with Session(self.engine) as session:
            return [m.to_dict() for m in self._get(session, run_id).models]

    def latest_run(self, name: str) -> dict | None:
        with Session(self.engine) as session:
            run = session.scalar(select(Run).where(Run.name == name).order_by(Run.id.desc()).limit(1))
            return None if run is None else run.to_dict()

    @staticmethod
    def _get(session: Session, run_id: int) -> Run:
        run = session.get(Run, run_id)
        if run is None:
            raise RunStoreError(f"no run {run_id} in the run store")
        return run

    def close(self) -> None:
        self.engine.dispose()


def _private_sqlite_file(path: Path) -> None:
    """Create the store's file 0600 (in a folder created 0700) before SQLite does (0644); warn
    about an existing one that other accounts may read."""
    private_folder(path.parent)
    if not ensure_private_file(path) and open_to_others(path):
        warnings.warn(
            f"the run store {path} may be read by other accounts on this machine (it holds every run's config and "
            f"metrics): run chmod 600 {path} (and its -wal and -shm files)",
            stacklevel=3,
        )


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode = WAL")  # the API reads while the ServerApp writes
    cursor.execute("PRAGMA synchronous = NORMAL")  # in WAL mode: no sync per commit, still never corrupt (SQLite's advice)
    cursor.execute("PRAGMA busy_timeout = 10000")
    cursor.close()
