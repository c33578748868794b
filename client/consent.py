"""Consent: what the person allows their history to be used for.

Three levels, and federated training is off until the person opts in:

- ``none``: the history is not used; recommendations come from the global model alone;
- ``on-device``: the history personalises the model on this device; nothing is sent;
- ``federated``: as ``on-device``, and the device also contributes clipped updates to the
  global model.

Per-kind minimisation: ``kinds`` names the event kinds that may be used at all (``None``: every
kind). Events of other kinds are neither recorded nor used. Every decision is kept with its
time in the device store; the latest is in force, and is read afresh for every message, so a
change takes effect at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .inputs import InvalidInput, shown


class Level(str, Enum):
    NONE = "none"
    ON_DEVICE = "on-device"
    FEDERATED = "federated"

    @classmethod
    def parse(cls, value: str | Level) -> Level:
        try:
            return cls(value)
        except ValueError:
            raise InvalidInput("level", f"unknown consent level {shown(value)}; choose one of: {', '.join(level.value for level in cls)}") from None


@dataclass(frozen=True)
class Consent:
    """The decision in force. ``kinds`` is ``None`` for every kind."""

    level: Level = Level.NONE
    kinds: frozenset[str] | None = None
    time: float | None = None  # when it was given; None: never asked (the default, ``none``)
    source: str = "default"

    @property
    def uses_history(self) -> bool:
        return self.level in (Level.ON_DEVICE, Level.FEDERATED)

    @property
    def federated(self) -> bool:
        return self.level is Level.FEDERATED

    def allows_kind(self, kind: str) -> bool:
        return self.kinds is None or kind in self.kinds

    def describe(self) -> str:
        what = {
            Level.NONE: "Your history is not used: recommendations come from the shared model alone.",
            Level.ON_DEVICE: "Your history personalises recommendations on this device only; nothing is sent.",
            Level.FEDERATED: "Your history personalises recommendations on this device, and this device helps improve "
            "the shared model by sending size-limited model updates (never your events).",
        }[self.level]
        if self.kinds is not None:
            what += f" Only these kinds of events are used: {', '.join(sorted(self.kinds)) or 'none'}."
        return what

    def to_dict(self) -> dict:
        return {"level": self.level.value, "kinds": None if self.kinds is None else sorted(self.kinds), "time": self.time, "source": self.source}

    @classmethod
    def from_row(cls, row: dict | None) -> Consent:
        if row is None:
            return cls()
        kinds = row.get("kinds")
        return cls(Level.parse(row["level"]), None if kinds is None else frozenset(kinds), row.get("time"), row.get("source", "app"))
