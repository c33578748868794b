"""The format of a published global model, shared by the server that publishes it and the
devices that fetch it.

A published version is two documents:

- the **model file** (``<version>.model``): the global model's named arrays and the facts
  that identify it (version, round, run, creation time, model kind and size). Its bytes are a
  function of its content alone, so that one SHA-256 names one model::

      MAGIC (8 bytes) | header length (uint32, little-endian) | header (canonical JSON) | array data

  The header lists the arrays sorted by name, each with its dtype (little-endian), shape and
  byte range in the data; the data is the arrays' raw C-order bytes, back to back. No pickle,
  no zip timestamps: parsing reads numbers, never code.

- the **manifest** (``<version>.json``): version, SHA-256 and size of the model file, round,
  run, creation time, a sequence number, an expiry time, the signing key's id and an Ed25519
  signature (base64) over every other field. A device fetches the manifest first and checks
  its signature with the operator's public key, that it has not expired, and that its sequence
  is not lower than that of the model the device already installed; only then does it download
  the model file, at most ``size`` bytes, and check its hash (``fedpref.client.model_fetch``).

  The sequence increases with every version a publish folder signs, across runs: it is what
  lets a device refuse a validly signed but older model (a rollback). The expiry bounds how
  long a device accepts a model: a server that stops publishing, or answers "not modified" for
  ever, cannot keep a device on an old model without the device noticing.

This module holds only the format (no keys, no I/O): the server signs and the client verifies
with ``cryptography``; both build the bytes to sign with :meth:`Manifest.signed_bytes`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import datetime
import re
import struct
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np

MAGIC = b"FPMODEL1"  # the first 8 bytes of every model file; the digit is the format's version
MODEL_FORMAT = 1
MANIFEST_FORMAT = 2  # 2: with a sequence number and an expiry (format 1 had neither)
MODEL_SUFFIX = ".model"
MANIFEST_SUFFIX = ".json"
LATEST = "latest"  # <folder>/latest.json and GET /models/latest: reserved, never a version
LATEST_MANIFEST = LATEST + MANIFEST_SUFFIX
# Versions name files and URL path segments: letters, digits, ".", "_" and "-", nothing that
# could climb out of the folder ("..", "/") or need quoting.
VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_HEADER_BYTES = 1 << 20  # a header lists names and shapes: a megabyte is a malformed file
MAX_MANIFEST_BYTES = 1 << 16  # a manifest is under a kilobyte: 64 KiB is not a manifest, and is never read further
ALLOWED_DTYPE_KINDS = "biuf"  # bool, signed and unsigned integers, floats: plain numbers only
DEFAULT_EXPIRY_DAYS = 30.0  # how long after publication a device may use a model, unless the publisher says otherwise
MAX_EXPIRY_DAYS = 3650.0  # ten years: longer would make the expiry meaningless
SIGNATURE_CONTEXT = b"fedpref model manifest v2\n"  # a manifest signature cannot be replayed as anything else
SIGNATURE_BYTES = 64  # Ed25519

# HTTP: the routes a server serves (fedpref.server.model_http) and a device fetches.
MODELS_PATH = "/models"
HEADER_VERSION = "X-Fedpref-Version"
HEADER_KEY_ID = "X-Fedpref-Key-Id"
HEADER_SIGNATURE = "X-Fedpref-Signature"
MODEL_MEDIA_TYPE = "application/vnd.fedpref.model"

_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEY_ID = re.compile(r"[0-9a-f]{16}")


class PublishedFormatError(ValueError):
    """A model file or a manifest is not in the published format (truncated, altered, or not one at all)."""


def check_version(version: str) -> str:
    """Return ``version`` if it can name a published model, else raise ValueError saying why."""
    if not isinstance(version, str) or not VERSION_PATTERN.fullmatch(version) or version == LATEST or ".." in version:
        raise ValueError(
            f"{version!r} cannot name a model version: use 1 to 128 letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit, without '..', and not {LATEST!r} (e.g. 'run7-r0012')"
        )
    return version


def canonical_json(value: Any) -> bytes:
    """``value`` as JSON with sorted keys and no spaces: equal values give equal bytes."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metadata must be plain JSON (str, int, finite float, bool, None, lists, dicts with str keys): {exc}") from None


def parse_time(text: str) -> datetime.datetime:
    """An ISO 8601 time with its UTC offset (``2026-01-31T12:00:00.000+00:00``); ValueError otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"a time must be an ISO 8601 string, got {text!r}")
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO 8601 time (e.g. 2026-01-31T12:00:00+00:00)") from None
    if moment.utcoffset() is None:
        raise ValueError(f"{text!r} has no UTC offset: write it as e.g. 2026-01-31T12:00:00+00:00")
    return moment


def sha256_hex(data: bytes) -> str:
    """The SHA-256 of ``data`` as 64 lowercase hex digits (a model file's content hash and ETag)."""
    return hashlib.sha256(data).hexdigest()


def key_id(raw_public_key: bytes) -> str:
    """A short name for an Ed25519 public key (its 32 raw bytes): the first 16 hex digits of their SHA-256.

    It lets a device say *which* key signed a manifest it refuses; it proves nothing by itself
    (the signature does)."""
    if len(raw_public_key) != 32:
        raise ValueError(f"an Ed25519 public key has 32 raw bytes, got {len(raw_public_key)}")
    return hashlib.sha256(raw_public_key).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# The model file


@dataclass(frozen=True)
class PublishedModel:
    """A parsed model file: the arrays and the facts that identify them."""

    arrays: dict[str, np.ndarray]
    version: str
    round: int
    run: str
    created: str  # ISO 8601, UTC
    meta: dict[str, Any] = field(default_factory=dict)  # model kind, dim, ...: whatever the publisher added


def _little_endian(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype.kind not in ALLOWED_DTYPE_KINDS:
        raise ValueError(f"array {name!r} has dtype {array.dtype}: a published model holds only bool, integer or float arrays")
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))


def serialize_model(
    arrays: Mapping[str, np.ndarray], *, version: str, round: int, run: str | int, created: str, meta: Mapping[str, Any] | None = None
) -> bytes:
    """The model file of ``arrays`` and its identity: identical input gives identical bytes
    (arrays in name order, canonical JSON, little-endian data), whatever the dict's order or
    the arrays' memory layout and byte order."""
    check_version(version)
    if isinstance(round, bool) or not isinstance(round, int) or round < 0:
        raise ValueError(f"round must be a non-negative integer, got {round!r}")
    if not isinstance(created, str) or not created:
        raise ValueError(f"created must be an ISO 8601 time string, got {created!r}")
    if not arrays:
        raise ValueError("a published model needs at least one array")
    entries, chunks, offset = [], [], 0
    for name in sorted(arrays):
        if not isinstance(name, str) or not name:
            raise ValueError(f"array names must be non-empty strings, got {name!r}")
        data = _little_endian(np.asarray(arrays[name]), name)
        raw = data.tobytes(order="C")
        entries.append({"name": name, "dtype": data.dtype.str, "shape": list(data.shape), "offset": offset, "nbytes": len(raw)})
        chunks.append(raw)
        offset += len(raw)
    header = canonical_json({
        "format": MODEL_FORMAT,
        "version": version,
        "round": round,
        "run": str(run),
        "created": created,
        "meta": dict(meta or {}),
        "arrays": entries,
    })
    return MAGIC + struct.pack("<I", len(header)) + header + b"".join(chunks)


def _require(header: dict, key: str, kind: type | tuple[type, ...], where: str = "header") -> Any:
    value = header.get(key)
    if key not in header or not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise PublishedFormatError(f"model file {where} field {key!r} is missing or not a {getattr(kind, '__name__', kind)}: the file is damaged or not a fedpref model")
    return value


def parse_model(data: bytes) -> PublishedModel:
    """Parse a model file written by :func:`serialize_model`, checking every length and offset.

    Raises PublishedFormatError naming what is wrong. Parsing does not prove where the bytes
    came from: check the manifest's signature and hash first (``fedpref.client.model_fetch.verify_model``)."""
    data = bytes(data)
    prefix = len(MAGIC) + 4
    if len(data) < prefix or not data.startswith(MAGIC):
        what = "too short" if len(data) < prefix else f"starts with {data[:len(MAGIC)]!r}"
        raise PublishedFormatError(f"not a fedpref model file ({what}, expected {MAGIC!r}): fetch the .model file, not the manifest or an .npz")
    (header_len,) = struct.unpack("<I", data[len(MAGIC):prefix])
    if header_len > MAX_HEADER_BYTES or prefix + header_len > len(data):
        raise PublishedFormatError(f"model file header claims {header_len} bytes but the file has {len(data) - prefix} after the prefix: the file is truncated or damaged")
    try:
        header = json.loads(data[prefix:prefix + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PublishedFormatError(f"model file header is not valid JSON ({exc}): the file is damaged") from None
    if not isinstance(header, dict):
        raise PublishedFormatError("model file header is not a JSON object: the file is damaged")
    if header.get("format") != MODEL_FORMAT:
        raise PublishedFormatError(f"model file format {header.get('format')!r} is not {MODEL_FORMAT}: this fedpref reads format {MODEL_FORMAT} only (update the device, or republish)")
    version = _require(header, "version", str)
    try:
        check_version(version)
    except ValueError as exc:
        raise PublishedFormatError(f"model file header: {exc}") from None
    round_, run, created = _require(header, "round", int), _require(header, "run", str), _require(header, "created", str)
    meta, entries = _require(header, "meta", dict), _require(header, "arrays", list)
    body, offset, arrays, previous = data[prefix + header_len:], 0, {}, ""
    for i, entry in enumerate(entries):
        where = f"array #{i}"
        if not isinstance(entry, dict):
            raise PublishedFormatError(f"model file {where} is not a JSON object: the file is damaged")
        name = _require(entry, "name", str, where)
        dtype_str, shape = _require(entry, "dtype", str, where), _require(entry, "shape", list, where)
        start, nbytes = _require(entry, "offset", int, where), _require(entry, "nbytes", int, where)
        try:
            dtype = np.dtype(dtype_str)
        except (TypeError, ValueError):
            raise PublishedFormatError(f"model file array {name!r} has unknown dtype {dtype_str!r}") from None
        if dtype.kind not in ALLOWED_DTYPE_KINDS or dtype.str != dtype_str or dtype.newbyteorder("<").str != dtype_str:
            raise PublishedFormatError(f"model file array {name!r} has dtype {dtype_str!r}: only little-endian bool, integer or float arrays are allowed")
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
            raise PublishedFormatError(f"model file array {name!r} has shape {shape!r}: dimensions must be non-negative integers")
        if name <= previous:  # names are unique and sorted: "" sorts before every name
            raise PublishedFormatError(f"model file array {name!r} is empty, repeated or out of name order: the file was not written by fedpref")
        expected = math.prod(shape) * dtype.itemsize
        if start != offset or nbytes != expected or start + nbytes > len(body):
            raise PublishedFormatError(
                f"model file array {name!r} claims bytes {start}..{start + nbytes} ({dtype_str} {tuple(shape)} needs {expected}) "
                f"but the data has {len(body)} bytes and the next array starts at {offset}: the file is truncated or damaged"
            )
        arrays[name] = np.frombuffer(body, dtype=dtype, count=math.prod(shape), offset=start).reshape(shape).copy()
        offset, previous = offset + nbytes, name
    if not arrays:
        raise PublishedFormatError("model file lists no arrays: the file is damaged")
    if offset != len(body):
        raise PublishedFormatError(f"model file has {len(body) - offset} bytes after its last array: the file is damaged or has been appended to")
    return PublishedModel(arrays=arrays, version=version, round=round_, run=run, created=created, meta=meta)


# ---------------------------------------------------------------------------------------------
# The manifest


@dataclass(frozen=True)
class Manifest:
    """What a device checks before it uses a model: the model file's hash and size, its
    identity, and the publisher's Ed25519 signature over all of these."""

    version: str
    sha256: str  # of the model file's bytes, 64 lowercase hex digits; also the HTTP ETag
    size: int  # of the model file, in bytes
    created: str
    round: int
    run: str
    sequence: int  # >= 1, higher for every version the publish folder signs, across runs
    expires: str  # ISO 8601 with a UTC offset: a device refuses the model from then on
    key_id: str  # key_id() of the public key that verifies the signature
    signature: str = ""  # base64 of the 64-byte Ed25519 signature over signed_bytes()
    format: int = MANIFEST_FORMAT

    def signed_fields(self) -> dict[str, Any]:
        """Every field but the signature: what the signature covers."""
        fields = asdict(self)
        del fields["signature"]
        return fields

    def signed_bytes(self) -> bytes:
        """The exact bytes the publisher signs and a device verifies: a fixed context string and
        the canonical JSON of every field but the signature."""
        return SIGNATURE_CONTEXT + canonical_json(self.signed_fields())

    @property
    def signature_bytes(self) -> bytes:
        return base64.b64decode(self.signature, validate=True)

    @property
    def etag(self) -> str:
        """The model file's HTTP entity tag: its SHA-256, quoted."""
        return f'"{self.sha256}"'

    @property
    def expires_at(self) -> float:
        """The expiry in seconds since the epoch."""
        return parse_time(self.expires).timestamp()

    def expired(self, now: float) -> bool:
        """Whether the model may no longer be used at ``now`` (seconds since the epoch)."""
        return now >= self.expires_at

    def to_json(self) -> bytes:
        """The manifest as stored and served: indented canonical JSON with a final newline."""
        return json.dumps(asdict(self), sort_keys=True, indent=2).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes | str) -> Manifest:
        """Parse and check a manifest's shape (not its signature); raises PublishedFormatError saying what is wrong."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise PublishedFormatError(f"manifest has {len(data)} bytes, more than the {MAX_MANIFEST_BYTES} a manifest may have: it is not a fedpref manifest")
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PublishedFormatError(f"manifest is not valid JSON ({exc}): fetch the manifest (.json), not the model file") from None
        if not isinstance(raw, dict):
            raise PublishedFormatError("manifest is not a JSON object")
        if type(raw.get("format")) is int and raw["format"] == 1:
            raise PublishedFormatError(
                "manifest format 1 has no sequence number or expiry, so a device cannot tell it from an older model "
                f"replayed to it: it is refused; publish the model again with this fedpref (it signs format {MANIFEST_FORMAT})"
            )
        names = {f for f in cls.__dataclass_fields__}
        missing, unknown = names - set(raw), set(raw) - names
        if missing or unknown:
            raise PublishedFormatError(f"manifest fields do not match format {MANIFEST_FORMAT}: missing {sorted(missing)}, unknown {sorted(unknown)}")
        if raw["format"] != MANIFEST_FORMAT:
            raise PublishedFormatError(f"manifest format {raw['format']!r} is not {MANIFEST_FORMAT}: update the device, or republish")
        types = {"version": str, "sha256": str, "size": int, "created": str, "round": int, "run": str, "sequence": int, "expires": str, "key_id": str, "signature": str}
        for name, kind in types.items():
            if not isinstance(raw[name], kind) or isinstance(raw[name], bool):
                raise PublishedFormatError(f"manifest field {name!r} must be a {kind.__name__}, got {raw[name]!r}")
        try:
            check_version(raw["version"])
        except ValueError as exc:
            raise PublishedFormatError(f"manifest: {exc}") from None
        if not _HEX64.fullmatch(raw["sha256"]):
            raise PublishedFormatError(f"manifest sha256 {raw['sha256']!r} is not 64 lowercase hex digits")
        if not _KEY_ID.fullmatch(raw["key_id"]):
            raise PublishedFormatError(f"manifest key_id {raw['key_id']!r} is not 16 lowercase hex digits")
        if raw["size"] < 0 or raw["round"] < 0:
            raise PublishedFormatError(f"manifest size and round must be non-negative, got {raw['size']} and {raw['round']}")
        if raw["sequence"] < 1:
            raise PublishedFormatError(f"manifest sequence must be a positive integer, got {raw['sequence']}")
        try:
            parse_time(raw["expires"])
        except ValueError as exc:
            raise PublishedFormatError(f"manifest expires: {exc}") from None
        try:
            signature = base64.b64decode(raw["signature"], validate=True)
        except (binascii.Error, ValueError):
            raise PublishedFormatError("manifest signature is not base64") from None
        if len(signature) != SIGNATURE_BYTES:
            raise PublishedFormatError(f"manifest signature has {len(signature)} bytes, an Ed25519 signature has {SIGNATURE_BYTES}")
        return cls(**raw)
