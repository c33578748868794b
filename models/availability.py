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

from .wire import Stream, stream_rng


@dataclass(frozen=True)
class AvailabilityPattern:
    """A simulated device's availability by round (see the module's doc)."""

    kind: str = "always"
    probability: float = 1.0
    night: tuple[int, int] = field(default=(22, 6))

    @classmethod
    def parse(cls, spec: str) -> AvailabilityPattern:
        spec = spec.strip()
        if spec == "always":
            return cls()
        if spec == "diurnal":
            return cls("diurnal")
        if spec.startswith("random:"):
            try:
                p = float(spec.split(":", 1)[1])
            except ValueError:
                p = -1.0
            if not 0.0 < p <= 1.0:
                raise ValueError(f"availability {spec!r}: the probability after 'random:' must lie in (0, 1], e.g. random:0.7")
            return cls("random", p)
        raise ValueError(f"unknown availability {spec!r}; choose always, diurnal or random:P (e.g. random:0.7)")

    def available(self, seed: int, device: int, server_round: int) -> bool:
        if self.kind == "always":
            return True
        if self.kind == "random":
            return bool(stream_rng(seed, device, server_round, Stream.AVAILABILITY).random() < self.probability)
        offset = int(stream_rng(seed, device, None, Stream.TIME_ZONE).integers(24))
        hour = (server_round + offset) % 24
        start, end = self.night
        return hour >= start or hour < end
