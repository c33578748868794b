"""How a device's clipped update travels: as float32 weights (the default), or encoded as the
update itself in float16 or in 8 bits with stochastic rounding (run-config ``update-encoding``).

- ``float32``: the device sends ``global + update`` and Flower's strategy averages weights.
- ``float16``: the update, cast to half precision (2 bytes a value).
- ``int8``: per array, ``scale = max|u| / 127`` and ``q = floor(u / scale + U)`` with ``U``
  uniform on [0, 1), so that ``E[q * scale] = u`` (stochastic rounding, unbiased); 1 byte a
  value plus the scale, sent as a one-element float32 array named ``<name>#scale``.

The device checks that the update the server will decode is still within the clipping bound
(rounding can lengthen it) and shrinks it until it is; the server decodes each reply and adds
it to the global arrays it sent before the strategy aggregates. Both sides use this module.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

ENCODINGS = ("float32", "float16", "int8")
SCALE_SUFFIX = "#scale"


class EncodingError(ValueError):
    """An encoded update is malformed."""


def encode(update: Mapping[str, np.ndarray], encoding: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The arrays that carry ``update`` in ``encoding`` (not ``float32``: that one sends weights)."""
    if encoding == "float16":
        return {k: np.asarray(v, dtype=np.float32).astype(np.float16) for k, v in update.items()}  # float32 -> float16 is the fast cast
    if encoding == "int8":
        out: dict[str, np.ndarray] = {}
        for name, value in update.items():
            v = np.asarray(value, dtype=np.float32)
            top = float(np.max(np.abs(v))) if v.size else 0.0
            scale = np.float32(top / 127.0 if top > 0 else 1.0)
            q = np.floor(v / scale + rng.random(v.shape, dtype=np.float32))
            out[name] = np.clip(q, -127, 127).astype(np.int8)
            out[name + SCALE_SUFFIX] = np.array([scale], dtype=np.float32)  # decoded as q * scale in float32, as encoded
        return out
    raise EncodingError(f"unknown update encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")


def encoded_names(names: tuple[str, ...] | list[str], encoding: str) -> set[str]:
    """The names of the arrays an update of the shared arrays ``names`` travels as."""
    if encoding == "float16":
        return set(names)
    if encoding == "int8":
        return set(names) | {n + SCALE_SUFFIX for n in names}
    raise EncodingError(f"unknown update encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")


def decode(arrays: Mapping[str, np.ndarray], names: tuple[str, ...] | list[str], encoding: str, *,
           shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
    """The float32 update carried by ``arrays`` (names: the shared arrays expected). Anything
    else is an :class:`EncodingError`: other arrays than :func:`encoded_names`, values in
    another dtype than the encoding's (float16; int8 with a float32 scale), a scale that is not
    one positive finite number, and, when ``shapes`` (name -> shape: what the server sent) is
    given, an array of another shape."""
    expected = encoded_names(names, encoding)
    if set(arrays) != expected:
        raise EncodingError(f"an {encoding} update carries arrays {sorted(expected)}, got {sorted(arrays)[:len(expected) + 5]}")
    out = {}
    for n in names:
        values = np.asarray(arrays[n])
        if shapes is not None and values.shape != tuple(shapes[n]):
            raise EncodingError(f"array {n!r}: shape {values.shape}, expected {tuple(shapes[n])}")
        if encoding == "float16":
            if values.dtype != np.float16:
                raise EncodingError(f"array {n!r}: a float16 update carries float16 values, got {values.dtype}")
            out[n] = values.astype(np.float32)
        else:
            scale = np.asarray(arrays[n + SCALE_SUFFIX])
            if values.dtype != np.int8 or scale.dtype != np.float32 or scale.shape != (1,) or not np.isfinite(scale).all() or scale[0] <= 0:
                raise EncodingError(f"array {n!r}: an int8 update needs int8 values and one positive finite scale (float32)")
            out[n] = (values.astype(np.float32) * scale[0]).astype(np.float32)
    return out


def norm(update: Mapping[str, np.ndarray]) -> float:
    """L2 norm over every array, accumulated in float64."""
    total = 0.0
    for a in update.values():
        flat = np.asarray(a).ravel()
        total += float(np.dot(flat, flat)) if flat.dtype == np.float64 else float(np.dot(flat.astype(np.float64), flat.astype(np.float64)))
    return float(np.sqrt(total))


def encode_within(update: Mapping[str, np.ndarray], encoding: str, bound: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``encode(update)``, shrunk until the decoded update's norm is at most ``bound``."""
    names = list(update)
    current = {k: np.asarray(v, dtype=np.float32) for k, v in update.items()}
    for _ in range(50):
        sent = encode(current, encoding, rng)
        got = norm(decode(sent, names, encoding))
        if got <= bound:
            return sent
        current = {k: (v * np.float32(bound / got * (1.0 - 1e-3))).astype(np.float32) for k, v in current.items()}
    raise EncodingError(f"could not bring the {encoding} update within the clipping bound {bound}")
