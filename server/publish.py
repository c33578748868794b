"""Publishing global models: each version is written once, hashed and signed, so that a device
can tell the operator's model from anything else a network or a mirror might hand it.

    generate_signing_key("keys/models.key")          # once; keys/models.key.pub goes to the devices
    publisher = ModelPublisher("published", load_signing_key("keys/models.key"))
    manifest = publisher.publish(arrays, version="run7-r0012", round=12, run="7", meta={"kind": "mf", "dim": 64})

The folder then holds ``run7-r0012.model`` (the format of ``fedpref.models.published``),
``run7-r0012.json`` (its manifest: SHA-256, size, identity, Ed25519 signature) and
``latest.json`` (the newest manifest, replaced atomically). A published version never changes:
devices cache it by its hash. ``fedpref.server.model_http`` serves the folder.
"""

from __future__ import annotations

import base64
import datetime
import os
import stat
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedpref.models.published import (
    LATEST_MANIFEST,
    MANIFEST_SUFFIX,
    MODEL_SUFFIX,
    Manifest,
    check_version,
    key_id,
    serialize_model,
    sha256_hex,
)


def generate_signing_key(path: str | Path) -> tuple[Path, Path]:
    """Write a new Ed25519 private key to ``path`` (PEM, PKCS#8, mode 600) and its public key
    to ``path.pub`` (PEM, the file every device is given); refuses to overwrite either.

    The private key is not encrypted: keep it on the aggregation server only, readable by the
    account that runs it."""
    private = Path(path)
    public = private.with_name(private.name + ".pub")
    for p in (private, public):
        if p.exists():
            raise FileExistsError(f"{p} exists: a publisher keeps its key, since devices trust it (remove both files first to make a new one)")
    private.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others, not even briefly
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public.write_bytes(public_key_pem(key))
    return private, public


def load_signing_key(path: str | Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in the PEM file ``path`` (written by :func:`generate_signing_key`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no signing key at {path}: make one with fedpref.server.publish.generate_signing_key({str(path)!r})")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not an unencrypted PEM private key ({exc}); make one with generate_signing_key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 key: devices verify Ed25519 signatures only")
    if os.name == "posix" and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        warnings.warn(f"the model signing key {path} is readable by other accounts: anyone who reads it can sign models devices accept; run chmod 600 {path}", stacklevel=2)
    return key


def public_key_pem(key: Ed25519PrivateKey) -> bytes:
    """The PEM of ``key``'s public half: what a device needs to verify published models."""
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _write_new(path: Path, data: bytes) -> None:
    """Write ``path`` completely or not at all, and never over an existing file."""
    tmp = _temp_copy(path, data)
    try:
        os.link(tmp, path)  # atomic, and fails if path exists (a replace would overwrite it)
    except FileExistsError:
        raise FileExistsError(f"{path} exists: published versions never change, publish under a new version") from None
    finally:
        os.unlink(tmp)


def _write_replace(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically: a reader sees the old file or the new one, never a mix."""
    tmp = _temp_copy(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _temp_copy(path: Path, data: bytes) -> Path:
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(name, 0o644)  # published files are public; mkstemp makes them 600
    return Path(name)


class ModelPublisher:
    """Writes signed model versions to ``folder`` (see the module docstring for the layout)."""

    def __init__(self, folder: str | Path, signing_key: Ed25519PrivateKey | str | Path) -> None:
        if isinstance(signing_key, (str, Path)):
            signing_key = load_signing_key(signing_key)
        if not isinstance(signing_key, Ed25519PrivateKey):
            raise TypeError(f"signing_key must be an Ed25519PrivateKey or the path of its PEM file, got {type(signing_key).__name__}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._key = signing_key
        raw = signing_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.key_id = key_id(raw)

    def model_path(self, version: str) -> Path:
        return self.folder / f"{check_version(version)}{MODEL_SUFFIX}"

    def manifest_path(self, version: str) -> Path:
        return self.folder / f"{check_version(version)}{MANIFEST_SUFFIX}"

    def publish(
        self,
        arrays: Mapping[str, np.ndarray],
        *,
        version: str,
        round: int,
        run: str | int,
        meta: Mapping[str, Any] | None = None,
        created: str | None = None,
    ) -> Manifest:
        """Write ``arrays`` as ``version``, sign its manifest, and make it the latest.

        ``meta`` is free-form JSON kept in the model file (e.g. ``{"kind": "mf", "dim": 64}``,
        what a device needs to rebuild the model); ``created`` defaults to now (UTC). Refuses a
        version that is already published."""
        model_path, manifest_path = self.model_path(version), self.manifest_path(version)
        if model_path.exists() or manifest_path.exists():
            raise FileExistsError(
                f"version {version!r} is already published in {self.folder}: a published version never changes "
                f"(devices cache it by its hash); publish under a new version, e.g. with the round in its name"
            )
        created = created or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
        data = serialize_model(arrays, version=version, round=round, run=run, created=created, meta=meta)
        unsigned = Manifest(version=version, sha256=sha256_hex(data), size=len(data), created=created, round=round, run=str(run), key_id=self.key_id)
        manifest = replace(unsigned, signature=base64.b64encode(self._key.sign(unsigned.signed_bytes())).decode())
        # Model first, then its manifest, then latest: whoever sees a manifest finds its model.
        _write_new(model_path, data)
        _write_new(manifest_path, manifest.to_json())
        _write_replace(self.folder / LATEST_MANIFEST, manifest.to_json())
        return manifest

    def manifest(self, version: str) -> Manifest:
        """The manifest of a published ``version``."""
        path = self.manifest_path(version)
        if not path.is_file():
            raise KeyError(f"version {version!r} is not published in {self.folder} (published: {self.versions()})")
        return Manifest.from_json(path.read_bytes())

    def versions(self) -> list[str]:
        """Every published version, oldest first (by creation time, then round, then name)."""
        manifests = [
            Manifest.from_json(p.read_bytes())
            for p in self.folder.glob(f"*{MANIFEST_SUFFIX}")
            if p.name != LATEST_MANIFEST and not p.name.startswith(".")
        ]
        return [m.version for m in sorted(manifests, key=lambda m: (m.created, m.round, m.version))]

    def latest(self) -> Manifest | None:
        """The manifest of the latest published version, or None before the first."""
        path = self.folder / LATEST_MANIFEST
        return Manifest.from_json(path.read_bytes()) if path.is_file() else None
