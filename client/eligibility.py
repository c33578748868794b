"""Eligibility: when a device may train.

A policy the app supplies decides from the conditions the app last reported. The default is
modelled on production federated learning (Bonawitz et al., 2019, "Towards federated learning
at scale"): train only while charging, on an unmetered network and idle, and only on
conditions reported within the last 15 minutes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

__all__ = ["ALWAYS", "Conditions", "EligibilityPolicy"]


@dataclass(frozen=True)
class Conditions:
    """What the app reports about the device now."""

    charging: bool = False
    unmetered: bool = False
    idle: bool = False
    time: float | None = None  # when reported (seconds since the epoch)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | None) -> Conditions | None:
        return None if text is None else cls(**json.loads(text))


@dataclass(frozen=True)
class EligibilityPolicy:
    require_charging: bool = True
    require_unmetered: bool = True
    require_idle: bool = True
    max_report_age_s: float | None = 900.0  # conditions older than this are not trusted

    def check(self, conditions: Conditions | None, now: float) -> tuple[bool, list[str]]:
        """``(eligible, reasons it is not)``."""
        needed = self.require_charging or self.require_unmetered or self.require_idle
        if not needed:
            return True, []
        if conditions is None:
            return False, ["the app has not reported the device's conditions"]
        reasons = []
        if self.max_report_age_s is not None and (conditions.time is None or now - conditions.time > self.max_report_age_s):
            reasons.append(f"the conditions were reported more than {self.max_report_age_s:g} s ago")
        if self.require_charging and not conditions.charging:
            reasons.append("not charging")
        if self.require_unmetered and not conditions.unmetered:
            reasons.append("not on an unmetered network")
        if self.require_idle and not conditions.idle:
            reasons.append("not idle")
        return not reasons, reasons

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | None) -> EligibilityPolicy:
        return cls() if text is None else cls(**json.loads(text))


ALWAYS = EligibilityPolicy(require_charging=False, require_unmetered=False, require_idle=False, max_report_age_s=None)
