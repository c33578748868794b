"""Fetching the latest published global model, and refusing any model the operator did not
sign, any model older than the one the device already installed, and any expired model.

    result = fetch_latest("https://fl.example.com", "keys/models.key.pub", cache_dir="model-cache")
    device.install_global(result.arrays, version=result.version)

A fetch goes in this order, and stops at the first check that fails:

1. ``GET /models/latest/manifest`` with ``If-None-Match`` naming the cached manifest; at most
   ``MAX_MANIFEST_BYTES`` are read, whatever the server sends. A 304 keeps the cached model.
2. The manifest is checked before anything else is downloaded: well formed, signed with
   Ed25519 by the operator's key, not expired, and its sequence number not below the highest
   this device installed (kept in ``cache_dir/highest.json``); a manifest with that same
   sequence must name that same model.
3. ``GET /models/<version>``: the model file is read in chunks and hashed as it streams; the
   device stops reading and refuses once the server has sent more than the manifest's ``size``,
   so it never holds more than that.
4. The file's size and SHA-256 are the manifest's, it parses, and it names the manifest's
   version, round, run and creation time. Only then are the highest sequence, the model and its
   manifest cached, each replaced atomically.

A model that fails a check is refused with :class:`ModelVerificationError` and the cache stays
as it was. When the server has nothing newer (304, or the same manifest) and the cached model
has expired, :class:`ModelExpiredError` says so: a server that stops publishing, or answers
"not modified" for ever, cannot keep a device on an old model without the device reporting it.

The cache folder holds the model, its manifest and the highest sequence installed; a device
that erases it (``Device.forget``) trusts the next validly signed model that has not expired,
so the expiry bounds how old a model it could then be given.

Standard library HTTP only (``urllib.request``): a device needs no HTTP client package.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedpref.models.files import private_folder, replace_private
from fedpref.models.published import (
    MAX_MANIFEST_BYTES,
    MODEL_MEDIA_TYPE,
    MODELS_PATH,
    Manifest,
    PublishedFormatError,
    PublishedModel,
    key_id,
    parse_model,
    sha256_hex,
)

log = logging.getLogger(__name__)

CACHED_MODEL = "latest.model"  # in cache_dir: the last model that passed verify_model
CACHED_MANIFEST = "latest.json"  # and its manifest
HIGHEST = "highest.json"  # in cache_dir: per signing key, the highest sequence installed and its model
CHUNK_BYTES = 1 << 16  # a model file is read this much at a time
MAX_ERROR_BYTES = 1 << 14  # of an error answer, only this much is read (for its detail)

PublicKey = Ed25519PublicKey | bytes | str | Path


class ModelVerificationError(Exception):
    """A model or its manifest failed a check; the model must not be used.

    ``check`` names the check: ``manifest`` (malformed, too large, or of format 1), ``key``
    (signed by a key this device does not trust), ``signature``, ``expired`` (see
    :class:`ModelExpiredError`), ``rollback`` (a lower sequence number than the model the device
    installed), ``replay`` (the sequence number of the installed model, on another model),
    ``size`` (the server sent more or fewer bytes than the manifest says), ``sha256``,
    ``format`` (the model file itself is malformed) or ``identity`` (the model file and its
    manifest name different versions)."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(f"model refused, {check} check failed: {message}")
        self.check = check


class ModelExpiredError(ModelVerificationError):
    """The model offered, or the newest the server has for this device, is past its signed expiry.

    ``version`` and ``expires`` (ISO 8601) name it; ``installed`` is True when it is the model
    the device already has (the server offered nothing newer: the device's model is stale)."""

    def __init__(self, manifest: Manifest, now: float, *, installed: bool) -> None:
        try:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        except (OverflowError, OSError, ValueError):  # a clock far outside the calendar
            stamp = f"{now:g} s since the epoch"
        if installed:
            message = (
                f"this device's model {manifest.version} expired at {manifest.expires} (now {stamp}) and the server offers "
                "nothing newer: the model is stale. The server may have stopped publishing, or be holding this device "
                "back; ask its operator, and check the device's clock"
            )
        else:
            message = (
                f"the server offers {manifest.version}, which expired at {manifest.expires} (now {stamp}): an old model "
                "replayed, or a server that stopped publishing; check the device's clock if this is unexpected"
            )
        super().__init__("expired", message)
        self.version, self.expires, self.installed = manifest.version, manifest.expires, installed


class ModelFetchError(Exception):
    """The latest model could not be fetched (server unreachable, nothing published, not a fedpref server)."""


@dataclass(frozen=True)
class FetchResult:
    """A verified model and how it was obtained."""

    model: PublishedModel
    manifest: Manifest
    downloaded_bytes: int  # response bodies read: model file + manifest; 0 when not modified
    not_modified: bool  # the server answered 304: the cached model is still the latest

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        return self.model.arrays

    @property
    def version(self) -> str:
        return self.manifest.version


def load_public_key(public_key: PublicKey) -> Ed25519PublicKey:
    """The publisher's Ed25519 public key from a key object, PEM bytes or text, or the path of a PEM file."""
    if isinstance(public_key, Ed25519PublicKey):
        return public_key
    if isinstance(public_key, bytes):
        pem = public_key
    elif isinstance(public_key, str) and public_key.lstrip().startswith("-----BEGIN"):
        pem = public_key.encode()
    elif isinstance(public_key, (str, Path)):
        path = Path(public_key)
        if not path.is_file():
            raise FileNotFoundError(f"no public key at {path}: give the device the publisher's .pub file (fedpref.server.publish.generate_signing_key writes it)")
        pem = path.read_bytes()
    else:
        raise TypeError(f"public_key must be PEM bytes or text, a path, or an Ed25519PublicKey, got {type(public_key).__name__}")
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise ValueError(f"the model publisher's public key is not a PEM public key ({exc}): use the .pub file next to the signing key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"the model publisher's public key is a {type(key).__name__}, not Ed25519: published models are signed with Ed25519")
    return key


def _parse_manifest(manifest: Manifest | bytes | str) -> Manifest:
    if isinstance(manifest, Manifest):
        return manifest
    try:
        return Manifest.from_json(manifest)
    except PublishedFormatError as exc:
        raise ModelVerificationError("manifest", str(exc)) from None


def verify_manifest(manifest: Manifest | bytes | str, public_key: PublicKey) -> Manifest:
    """Check that ``manifest`` is well formed, names the trusted key and verifies with it.

    What a device checks before it downloads the model file. Raises ModelVerificationError."""
    key = load_public_key(public_key)
    manifest = _parse_manifest(manifest)
    trusted = key_id(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
    if manifest.key_id != trusted:
        raise ModelVerificationError(
            "key", f"version {manifest.version!r} was signed with key {manifest.key_id}, but this device trusts key {trusted}: "
            "it comes from another publisher, or the operator changed keys (then give the device the new public key)"
        )
    try:
        key.verify(manifest.signature_bytes, manifest.signed_bytes())
    except InvalidSignature:
        raise ModelVerificationError(
            "signature", f"the manifest of version {manifest.version!r} does not match its Ed25519 signature by key {trusted}: "
            "it was altered after it was signed"
        ) from None
    return manifest


def verify_model(model_bytes: bytes, manifest: Manifest | bytes | str, public_key: PublicKey) -> PublishedModel:
    """Check ``model_bytes`` against ``manifest`` and the manifest against ``public_key``, then parse it.

    In order: the manifest is well formed, names the trusted key, and its signature verifies;
    the model file has the manifest's size and SHA-256, parses, and names the manifest's
    version, round, run and creation time. Raises ModelVerificationError at the first failure.
    Expiry and sequence are not checked here: they depend on the time and on what the device
    installed (:func:`fetch_latest` checks them)."""
    manifest = verify_manifest(manifest, public_key)
    return _check_model(model_bytes, sha256_hex(model_bytes), manifest)


def _check_model(model_bytes: bytes, sha256: str, manifest: Manifest) -> PublishedModel:
    """The checks of a model file against its verified manifest; ``sha256`` is the file's hash."""
    if len(model_bytes) != manifest.size:
        raise ModelVerificationError("size", f"the model file of version {manifest.version!r} has {len(model_bytes)} bytes, its signed manifest says {manifest.size}: it was truncated or altered")
    if sha256 != manifest.sha256:
        raise ModelVerificationError("sha256", f"the model file of version {manifest.version!r} has SHA-256 {sha256}, its signed manifest says {manifest.sha256}: it was altered")
    try:
        model = parse_model(model_bytes)
    except PublishedFormatError as exc:  # signed but unreadable: a publisher bug, still never used
        raise ModelVerificationError("format", str(exc)) from None
    differ = [f"{name} {getattr(model, name)!r} != {getattr(manifest, name)!r}" for name in ("version", "round", "run", "created") if getattr(model, name) != getattr(manifest, name)]
    if differ:
        raise ModelVerificationError("identity", f"the model file and its signed manifest disagree ({'; '.join(differ)})")
    return model


@dataclass(frozen=True)
class Installed:
    """The highest sequence number this device installed for one signing key, and its model."""

    sequence: int
    sha256: str
    version: str


def check_fresh(manifest: Manifest, highest: Installed | None, now: float) -> None:
    """Refuse a verified ``manifest`` that has expired at ``now``, or is older than ``highest``.

    Raises ModelExpiredError, or ModelVerificationError with check ``rollback`` (a lower
    sequence number) or ``replay`` (the installed sequence number on another model)."""
    if manifest.expired(now):
        raise ModelExpiredError(manifest, now, installed=False)
    if highest is None:
        return
    if manifest.sequence < highest.sequence:
        raise ModelVerificationError(
            "rollback",
            f"the server offers {manifest.version} (sequence {manifest.sequence}), older than {highest.version} "
            f"(sequence {highest.sequence}) which this device already installed: a validly signed but older model",
        )
    if manifest.sequence == highest.sequence and manifest.sha256 != highest.sha256:
        raise ModelVerificationError(
            "replay",
            f"the server offers {manifest.version} with sequence {manifest.sequence}, the sequence of {highest.version} "
            f"which this device installed, but another model file (SHA-256 {manifest.sha256}, not {highest.sha256}): "
            "a publisher signs each sequence number once",
        )


def cached_model(cache_dir: str | Path, public_key: PublicKey) -> PublishedModel | None:
    """The model last fetched into ``cache_dir``, verified again (None if there is none, or it no longer verifies).

    For a device that cannot fetch (offline, or the latest model was refused). Its expiry is
    not checked: :func:`fetch_latest` reports an expired model, and ``Device.model_expired``
    tells whether the installed one has expired."""
    found = _load_cache(Path(cache_dir), load_public_key(public_key))
    return found.model if found else None


@dataclass(frozen=True)
class _Cached:
    model: PublishedModel
    manifest: Manifest
    manifest_etag: str  # the cached manifest's own HTTP entity tag (the SHA-256 of its bytes)


def _load_cache(cache_dir: Path, key: Ed25519PublicKey) -> _Cached | None:
    try:
        model_bytes, manifest_bytes = (cache_dir / CACHED_MODEL).read_bytes(), (cache_dir / CACHED_MANIFEST).read_bytes()
    except FileNotFoundError:
        return None
    try:
        manifest = _parse_manifest(manifest_bytes)
        return _Cached(verify_model(model_bytes, manifest, key), manifest, f'"{sha256_hex(manifest_bytes)}"')
    except ModelVerificationError as exc:  # a damaged cache or a changed key: fetch afresh
        log.warning("ignoring the cached model in %s: %s", cache_dir, exc)
        return None


def _read_highest(cache_dir: Path) -> dict[str, dict]:
    """``highest.json``: {key id: {"sequence", "sha256", "version"}}; {} if missing or damaged."""
    try:
        raw = json.loads((cache_dir / HIGHEST).read_bytes())
    except FileNotFoundError:
        return {}
    except ValueError:
        raw = None
    if not isinstance(raw, dict):
        log.warning("ignoring the damaged %s in %s: the cached model's sequence is the highest installed", HIGHEST, cache_dir)
        return {}
    return raw


def _highest(cache_dir: Path, trusted: str, cached: _Cached | None) -> Installed | None:
    """The highest sequence this device installed for key ``trusted``: the recorded one, or the
    cached model's when that is higher (the record was lost or damaged)."""
    found = []
    entry = _read_highest(cache_dir).get(trusted)
    if entry is not None:
        try:
            installed = Installed(sequence=entry["sequence"], sha256=entry["sha256"], version=entry["version"])
            if isinstance(installed.sequence, bool) or not isinstance(installed.sequence, int):
                raise TypeError(installed.sequence)
            found.append(installed)
        except (TypeError, KeyError):
            log.warning("ignoring the damaged entry for key %s in %s", trusted, cache_dir / HIGHEST)
    if cached is not None and cached.manifest.key_id == trusted:
        found.append(Installed(sequence=cached.manifest.sequence, sha256=cached.manifest.sha256, version=cached.manifest.version))
    return max(found, key=lambda installed: installed.sequence, default=None)


def _record_highest(cache_dir: Path, manifest: Manifest) -> None:
    record = _read_highest(cache_dir)
    record[manifest.key_id] = {"sequence": manifest.sequence, "sha256": manifest.sha256, "version": manifest.version}
    replace_private(cache_dir / HIGHEST, json.dumps(record, sort_keys=True, indent=2).encode())


class _TooLarge(Exception):
    """A response body was larger than the caller allows; ``read`` bytes of it were read."""

    def __init__(self, limit: int, read: int, declared: int | None) -> None:
        super().__init__(f"more than {limit} bytes")
        self.limit, self.read, self.declared = limit, read, declared


@dataclass(frozen=True)
class _Response:
    status: int
    body: bytes
    headers: Message
    sha256: str  # of body, computed as it streamed in


def _read_capped(response, limit: int) -> tuple[bytes, str]:
    """Read ``response`` in chunks, hashing as it streams; _TooLarge as soon as it exceeds ``limit``.

    A declared Content-Length above ``limit`` is refused before anything is read; otherwise at
    most ``limit + 1`` bytes are read (the one byte that proves the body is too long)."""
    declared = response.headers.get("Content-Length")
    declared = int(declared) if declared is not None and declared.strip().isdigit() else None
    if declared is not None and declared > limit:
        raise _TooLarge(limit, 0, declared)
    body, digest = bytearray(), hashlib.sha256()
    while chunk := response.read(min(CHUNK_BYTES, limit + 1 - len(body))):
        body += chunk
        digest.update(chunk)
        if len(body) > limit:
            raise _TooLarge(limit, len(body), declared)
    return bytes(body), digest.hexdigest()


def _get(url: str, headers: dict[str, str], timeout: float, limit: int) -> _Response:
    """GET ``url``, reading at most ``limit`` bytes of a successful answer (_TooLarge beyond) and
    at most MAX_ERROR_BYTES of any other; ModelFetchError when there is no answer."""
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body, sha256 = _read_capped(response, limit)
            return _Response(response.status, body, response.headers, sha256)
    except urllib.error.HTTPError as exc:  # 304 and every error status arrive here
        with exc:
            body = exc.read(MAX_ERROR_BYTES)
            return _Response(exc.code, body, exc.headers, sha256_hex(body))
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ModelFetchError(f"could not reach {url} ({reason}): check the server address and that the server is up") from exc


def _http_error(url: str, status: int, body: bytes) -> ModelFetchError:
    try:
        detail = json.loads(body)["detail"]
    except (ValueError, KeyError, TypeError):
        detail = body[:200].decode(errors="replace") or "no detail"
    return ModelFetchError(f"GET {url} answered {status}: {str(detail)[:500]}")


def fetch_latest(
    base_url: str, public_key: PublicKey, *, cache_dir: str | Path, timeout: float = 30.0, now: float | None = None
) -> FetchResult:
    """The latest published model from the server at ``base_url`` (e.g. ``http://host:8000``), verified.

    Follows the steps of the module docstring: the manifest first (conditional, capped), its
    signature, expiry and sequence, then the model file streamed and capped at the manifest's
    size. ``now`` is the time in seconds since the epoch (default: the clock). Returns the
    cached model when the server has nothing newer (``not_modified``; nothing downloaded on a
    304). Raises ModelVerificationError for a model that fails a check (the cache is left as it
    was), ModelExpiredError (one of them) when the newest model available has expired, and
    ModelFetchError when the server cannot give one."""
    key = load_public_key(public_key)
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
    now = time.time() if now is None else now
    if isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now):
        raise ValueError(f"now must be a finite time in seconds since the epoch, got {now!r}")
    cache_dir = Path(cache_dir)
    private_folder(cache_dir)  # a new one 0700, whatever the umask: it says which model this device has
    trusted = key_id(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
    cached = _load_cache(cache_dir, key)
    base = base_url.rstrip("/") + MODELS_PATH

    # 1. The manifest, capped: nothing else is downloaded before it is checked.
    url = f"{base}/latest/manifest"
    headers = {"Accept": "application/json"}
    if cached is not None:
        headers["If-None-Match"] = cached.manifest_etag
    try:
        answer = _get(url, headers, timeout, MAX_MANIFEST_BYTES)
    except _TooLarge as exc:
        size = f"declared {exc.declared} bytes" if exc.declared is not None else f"sent more than {exc.limit} bytes"
        raise ModelVerificationError("manifest", f"GET {url} {size}; a manifest is under a kilobyte (at most {MAX_MANIFEST_BYTES} are read): not a fedpref server, or a hostile one") from None
    if answer.status == 304 and cached is not None:
        return _unchanged(cached, now, downloaded=0)
    if answer.status != 200:
        raise _http_error(url, answer.status, answer.body)

    # 2. Signed by the trusted key, not expired, not older than what this device installed.
    manifest = verify_manifest(answer.body, key)
    if cached is not None and manifest == cached.manifest:  # a server that ignores If-None-Match
        return _unchanged(cached, now, downloaded=len(answer.body))
    check_fresh(manifest, _highest(cache_dir, trusted, cached), now)

    # 3. The model file of that version, streamed and capped at the signed size.
    model_url = f"{base}/{urllib.parse.quote(manifest.version)}"
    try:
        model_answer = _get(model_url, {"Accept": MODEL_MEDIA_TYPE}, timeout, manifest.size)
    except _TooLarge as exc:
        size = f"declared {exc.declared} bytes" if exc.declared is not None and exc.read == 0 else f"sent more than {exc.limit} bytes (reading stopped there)"
        raise ModelVerificationError("size", f"GET {model_url} {size}, but the signed manifest of version {manifest.version!r} says {manifest.size}: refused") from None
    if model_answer.status != 200:
        raise _http_error(model_url, model_answer.status, model_answer.body)

    # 4. Size, hash, format and identity; then the cache, the highest sequence first.
    model = _check_model(model_answer.body, model_answer.sha256, manifest)
    _record_highest(cache_dir, manifest)
    replace_private(cache_dir / CACHED_MODEL, model_answer.body)  # model, then manifest: a crash between leaves a pair
    replace_private(cache_dir / CACHED_MANIFEST, answer.body)  # that fails verification and is fetched again
    return FetchResult(model=model, manifest=manifest, downloaded_bytes=len(model_answer.body) + len(answer.body), not_modified=False)


def _unchanged(cached: _Cached, now: float, *, downloaded: int) -> FetchResult:
    """The server has nothing newer than the cached model: keep it, unless it has expired."""
    if cached.manifest.expired(now):
        raise ModelExpiredError(cached.manifest, now, installed=True)
    return FetchResult(model=cached.model, manifest=cached.manifest, downloaded_bytes=downloaded, not_modified=True)
