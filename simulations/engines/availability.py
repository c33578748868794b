"""Availability patterns of simulated devices (run-config ``availability``).

Real devices train only when the app's eligibility policy allows it
(:mod:`fedpref.client.eligibility`); in a simulation each virtual device follows a pattern:

- ``always``: every device is available in every round;
- ``random:P``: each device is available in a round with probability P (a coin seeded by
  seed, device and round);
- ``diurnal``: each device lives in its own time zone (seeded) and is available at night,
  from 22:00 to 06:00 its local time, when phones charge on Wi-Fi; a round advances the
  simulated clock by one hour, so a third of the population is available at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedpref.models.config import availability_spec
from fedpref.models.wire import Stream, stream_rng


@dataclass(frozen=True)
class AvailabilityPattern:
    """A simulated device's availability by round (see the module's doc)."""

    kind: str = "always"
    probability: float = 1.0
    night: tuple[int, int] = field(default=(22, 6))

    @classmethod
    def parse(cls, spec: str) -> AvailabilityPattern:
        kind, probability = availability_spec(spec)
        return cls(kind, probability)

    def available(self, seed: int, device: int, server_round: int) -> bool:
        if self.kind == "always":
            return True
        if self.kind == "random":
            return bool(stream_rng(seed, device, server_round, Stream.AVAILABILITY).random() < self.probability)
        offset = int(stream_rng(seed, device, None, Stream.TIME_ZONE).integers(24))
        hour = (server_round + offset) % 24
        start, end = self.night
        return hour >= start or hour < end
