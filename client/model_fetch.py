"""Fetching the latest published global model, and refusing any model the operator did not sign.

    result = fetch_latest("https://fl.example.com", "keys/models.key.pub", cache_dir="model-cache")
    device.install_global(result.arrays, version=result.version)

A device keeps the last verified model in ``cache_dir`` and asks for the latest with
``If-None-Match: "<its sha256>"``: while the model is unchanged the server answers 304 and
nothing is downloaded. A new model is used (and cached) only after two checks: the manifest's
Ed25519 signature verifies with the operator's public key, and the model file's size and
SHA-256 are the ones the manifest names. A model that fails either is refused with
:class:`ModelVerificationError` and the cached model stays as it was.

Standard library HTTP only (``urllib.request``): a device needs no HTTP client package.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
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

from fedpref.models.published import (
    HEADER_VERSION,
    MODEL_MEDIA_TYPE,
    MODELS_PATH,
    Manifest,
    PublishedFormatError,
    PublishedModel,
    check_version,
    key_id,
    parse_model,
    sha256_hex,
)

log = logging.getLogger(__name__)

CACHED_MODEL = "latest.model"  # in cache_dir: the last model that passed verify_model
CACHED_MANIFEST = "latest.json"  # and its manifest

PublicKey = Ed25519PublicKey | bytes | str | Path


class ModelVerificationError(Exception):
    """A model or its manifest failed a check; the model must not be used.

    ``check`` names the check: ``manifest`` (malformed), ``key`` (signed by a key this device
    does not trust), ``signature``, ``size``, ``sha256``, ``format`` (the model file itself is
    malformed), ``identity`` (the model file and its manifest name different versions) or
    ``rollback`` (an older round of the run whose newer model the device already has)."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(f"model refused, {check} check failed: {message}")
        self.check = check


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


def verify_model(model_bytes: bytes, manifest: Manifest | bytes | str, public_key: PublicKey) -> PublishedModel:
    """Check ``model_bytes`` against ``manifest`` and the manifest against ``public_key``, then parse it.

    In order: the manifest is well formed, names the trusted key, and its signature verifies;
    the model file has the manifest's size and SHA-256, parses, and names the manifest's
    version, round, run and creation time. Raises ModelVerificationError at the first failure."""
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
    if len(model_bytes) != manifest.size:
        raise ModelVerificationError("size", f"the model file of version {manifest.version!r} has {len(model_bytes)} bytes, its signed manifest says {manifest.size}: it was truncated or altered")
    actual = sha256_hex(model_bytes)
    if actual != manifest.sha256:
        raise ModelVerificationError("sha256", f"the model file of version {manifest.version!r} has SHA-256 {actual}, its signed manifest says {manifest.sha256}: it was altered")
    try:
        model = parse_model(model_bytes)
    except PublishedFormatError as exc:  # signed but unreadable: a publisher bug, still never used
        raise ModelVerificationError("format", str(exc)) from None
    differ = [f"{name} {getattr(model, name)!r} != {getattr(manifest, name)!r}" for name in ("version", "round", "run", "created") if getattr(model, name) != getattr(manifest, name)]
    if differ:
        raise ModelVerificationError("identity", f"the model file and its signed manifest disagree ({'; '.join(differ)})")
    return model


def cached_model(cache_dir: str | Path, public_key: PublicKey) -> PublishedModel | None:
    """The model last fetched into ``cache_dir``, verified again (None if there is none, or it no longer verifies).

    For a device that cannot fetch (offline, or the latest model was refused)."""
    found = _load_cache(Path(cache_dir), load_public_key(public_key))
    return found[0] if found else None


def _load_cache(cache_dir: Path, key: Ed25519PublicKey) -> tuple[PublishedModel, Manifest] | None:
    try:
        model_bytes, manifest_bytes = (cache_dir / CACHED_MODEL).read_bytes(), (cache_dir / CACHED_MANIFEST).read_bytes()
    except FileNotFoundError:
        return None
    try:
        manifest = _parse_manifest(manifest_bytes)
        return verify_model(model_bytes, manifest, key), manifest
    except ModelVerificationError as exc:  # a damaged cache or a changed key: fetch afresh
        log.warning("ignoring the cached model in %s: %s", cache_dir, exc)
        return None


def _replace(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically (a temporary file in the same folder, then os.replace)."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def _get(url: str, headers: dict[str, str], timeout: float) -> tuple[int, bytes, Message]:
    """GET ``url``: (status, body, headers) for any HTTP answer; ModelFetchError when there is none."""
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(), response.headers
    except urllib.error.HTTPError as exc:  # 304 and every error status arrive here
        with exc:
            return exc.code, exc.read(), exc.headers
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ModelFetchError(f"could not reach {url} ({reason}): check the server address and that the server is up") from exc


def _http_error(url: str, status: int, body: bytes) -> ModelFetchError:
    try:
        detail = json.loads(body)["detail"]
    except (ValueError, KeyError, TypeError):
        detail = body[:200].decode(errors="replace") or "no detail"
    return ModelFetchError(f"GET {url} answered {status}: {detail}")


def fetch_latest(base_url: str, public_key: PublicKey, *, cache_dir: str | Path, timeout: float = 30.0) -> FetchResult:
    """The latest published model from the server at ``base_url`` (e.g. ``http://host:8000``), verified.

    Sends the cached model's ETag; on 304 returns the cached model and downloads nothing. On a
    new model, fetches its manifest, verifies both (:func:`verify_model`) and only then
    replaces the cache. Raises ModelVerificationError for a model that fails a check (the cache
    is left as it was) and ModelFetchError when the server cannot give one."""
    key = load_public_key(public_key)
    if timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached = _load_cache(cache_dir, key)
    base = base_url.rstrip("/") + MODELS_PATH
    headers = {"Accept": MODEL_MEDIA_TYPE}
    if cached is not None:
        headers["If-None-Match"] = cached[1].etag
    url = f"{base}/latest"
    status, body, response_headers = _get(url, headers, timeout)
    if status == 304 and cached is not None:
        return FetchResult(model=cached[0], manifest=cached[1], downloaded_bytes=0, not_modified=True)
    if status != 200:
        raise _http_error(url, status, body)
    version = response_headers.get(HEADER_VERSION, "")
    try:
        check_version(version)
    except ValueError:
        raise ModelFetchError(f"GET {url} named no valid model version ({HEADER_VERSION}: {version!r}): is {base_url} a fedpref server?") from None
    manifest_url = f"{base}/{urllib.parse.quote(version)}/manifest"
    manifest_status, manifest_bytes, _ = _get(manifest_url, {"Accept": "application/json"}, timeout)
    if manifest_status != 200:
        raise _http_error(manifest_url, manifest_status, manifest_bytes)
    manifest = _parse_manifest(manifest_bytes)
    model = verify_model(body, manifest, key)  # raises before anything is cached
    if cached is not None and cached[1].run == manifest.run and manifest.round < cached[1].round:
        # A validly signed but older model of the same run, served as the latest: a rollback.
        raise ModelVerificationError(
            "rollback",
            f"the server offers {manifest.version} (round {manifest.round}) of run {manifest.run!r}, older than the "
            f"{cached[1].version} (round {cached[1].round}) this device already has",
        )
    _replace(cache_dir / CACHED_MODEL, body)  # model, then manifest: a crash between leaves a pair
    _replace(cache_dir / CACHED_MANIFEST, manifest_bytes)  # that fails verification and is fetched again
    return FetchResult(model=model, manifest=manifest, downloaded_bytes=len(body) + len(manifest_bytes), not_modified=False)
