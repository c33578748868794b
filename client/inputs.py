"""Checks on what an app, the command line or the privacy page gives the Device API.

Every value that reaches the device store passes one of these checks first, so bad input is
refused before anything is written, and the store keeps what it held. A refusal is an
:class:`InvalidInput` (a ``ValueError``) whose message names the field, says what it must be,
and shows what was given (shortened: a hostile value is not echoed whole).

The rules:

- an **item** is a catalogue index: an integer (not a bool, not a string) from 0 to
  ``2**63 - 1`` (SQLite's INTEGER, NumPy's int64);
- a **kind** names a kind of event (``view``, ``click``, ``purchase``, ``rating``, or any other
  word): 1 to 64 printable characters, no comma, no space at either end;
- a **value** is a real, finite number (not a bool, not a string), or None;
- a **time** is a Unix time in seconds: a real, finite number from 0 to the device's clock plus
  :data:`CLOCK_SKEW` seconds (a time further ahead would be kept past every retention limit), or
  None for now;
- **kinds** (a consent's event kinds) is None (every kind), one kind name, or a list of at most
  :data:`MAX_KINDS` kind names; a string is never split into letters.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import numpy as np

MAX_ITEM = 2**63 - 1
MAX_KIND_LENGTH = 64
MAX_KINDS = 256
MAX_TEXT_LENGTH = 200
CLOCK_SKEW = 300.0  # seconds an event's time may be ahead of the device's clock


class InvalidInput(ValueError):
    """Input the Device API refuses. ``field`` names what was wrong (``item``, ``kinds[2]``,
    ``events[7].time``, ``shared['item_bias.weight']`` ...); the message says how to fix it.
    Nothing was stored."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def shown(value, limit: int = 40) -> str:
    """``repr(value)``, shortened to about ``limit`` characters, with its type."""
    text = repr(value)
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text):,} characters)"
    return f"{text} ({type(value).__name__})"


def _is_integer(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def check_item(item, field: str = "item") -> int:
    if not _is_integer(item) or not 0 <= int(item) <= MAX_ITEM:
        raise InvalidInput(field, f"must be a catalogue index, an integer from 0 to {MAX_ITEM:,} (int64); got {shown(item)}")
    return int(item)


def kind_problem(kind) -> str | None:
    """Why ``kind`` is not a kind name, or None when it is one."""
    if not isinstance(kind, str):
        return "must be a string"
    if not kind:
        return "must not be empty"
    if len(kind) > MAX_KIND_LENGTH:
        return f"must be at most {MAX_KIND_LENGTH} characters"
    if not kind.isprintable():
        return "must hold printable characters only (no NUL, no control characters, no line breaks)"
    if "," in kind:
        return "must not hold a comma"
    if kind != kind.strip():
        return "must not start or end with a space"
    return None


def check_kind(kind, field: str = "kind") -> str:
    problem = kind_problem(kind)
    if problem is not None:
        raise InvalidInput(field, f"{problem}: a kind is a short name such as 'view' or 'purchase' (1 to {MAX_KIND_LENGTH} printable characters); got {shown(kind)}")
    return kind


def check_kinds(kinds, field: str = "kinds") -> list[str] | None:
    """None (every kind), or the sorted distinct kind names of ``kinds``: one kind name, or
    an iterable of them."""
    if kinds is None:
        return None
    if isinstance(kinds, str):
        if kind_problem(kinds) is not None:
            raise InvalidInput(field, f"give one kind name or a list of them, e.g. kinds=['view', 'click']; got {shown(kinds)}")
        return [kinds]
    if isinstance(kinds, bytes | bytearray) or not isinstance(kinds, Iterable):
        raise InvalidInput(field, f"give None (every kind), one kind name or a list of them, e.g. kinds=['view', 'click']; got {shown(kinds)}")
    out = set()
    for i, kind in enumerate(kinds):
        if i >= MAX_KINDS:
            raise InvalidInput(field, f"at most {MAX_KINDS} kinds may be named; give fewer")
        out.add(check_kind(kind, f"{field}[{i}]"))
    return sorted(out)


def check_value(value, field: str = "value") -> float | None:
    if value is None:
        return None
    try:
        number = float(value) if _is_real(value) else math.nan
    except OverflowError:
        number = math.nan
    if not math.isfinite(number):
        raise InvalidInput(field, f"must be a finite number (a rating, a price ...) or None; got {shown(value)}")
    return number


def check_time(when, now: float, field: str = "time") -> float:
    """``when`` as a float (``now`` when None): a finite Unix time, not ahead of ``now`` by more
    than :data:`CLOCK_SKEW` seconds."""
    if when is None:
        return float(now)
    try:
        number = float(when) if _is_real(when) else math.nan
    except OverflowError:
        number = math.nan
    rule = f"must be the event's Unix time in seconds, from 0 to at most {CLOCK_SKEW:g} s ahead of this device's clock, or None for now"
    if not math.isfinite(number) or number < 0:
        raise InvalidInput(field, f"{rule}; got {shown(when)}")
    if number > now + CLOCK_SKEW:
        raise InvalidInput(field, f"{rule}; got {number:.10g}, {number - now:.4g} s ahead of the clock ({now:.10g}): check the clock that gave it")
    return number


def check_text(text, field: str, limit: int = MAX_TEXT_LENGTH) -> str:
    if not isinstance(text, str) or not text or len(text) > limit or not text.isprintable():
        raise InvalidInput(field, f"must be a non-empty string of at most {limit} printable characters; got {shown(text)}")
    return text


def check_count(value, field: str, *, minimum: int, maximum: int | None = None) -> int:
    if not _is_integer(value) or value < minimum or (maximum is not None and value > maximum):
        allowed = f"from {minimum} to {maximum:,}" if maximum is not None else f"at least {minimum}"
        raise InvalidInput(field, f"must be an integer {allowed}; got {shown(value)}")
    return int(value)


def check_flag(value, field: str) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise InvalidInput(field, f"must be True or False; got {shown(value)}")
    return bool(value)


def check_arrays(arrays, expected: dict[str, tuple[tuple[int, ...], np.dtype]], field: str) -> dict[str, np.ndarray]:
    """``arrays`` as a model's own arrays: for each name of ``expected`` (its shape and dtype), a
    floating-point array of that shape with finite values, converted to that dtype."""
    out = {}
    for name, (shape, dtype) in expected.items():
        where = f"{field}[{name!r}]"
        try:
            a = np.asarray(arrays[name])
        except (TypeError, ValueError) as exc:
            raise InvalidInput(where, f"must be an array of {dtype} numbers of shape {shape} ({exc})") from None
        if a.dtype.kind != "f":
            raise InvalidInput(where, f"must hold floating-point numbers ({dtype}); got an array of {a.dtype}")
        if a.shape != shape:
            raise InvalidInput(where, f"must have the model's shape {shape}; got {a.shape}: is it the same model kind, dimension and catalogue?")
        with np.errstate(over="ignore"):
            a = a.astype(dtype, copy=True)
        if not np.isfinite(a).all():
            raise InvalidInput(where, f"must hold finite {dtype} numbers; it holds NaN or infinity (or values beyond {dtype}'s range)")
        out[name] = a
    return out
