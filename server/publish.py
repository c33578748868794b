"""Publishing global models: each version is written once, hashed and signed, so that a device
can tell the operator's model from anything else a network or a mirror might hand it.

    generate_signing_key("keys/models.key")          # once; keys/models.key.pub goes to the devices
    publisher = ModelPublisher("published", load_signing_key("keys/models.key"))
    manifest = publisher.publish(arrays, version="run7-r0012", round=12, run="7", meta={"kind": "mf", "dim": 64})

The folder then holds ``run7-r0012.model`` (the format of ``fedpref.models.published``),
``run7-r0012.json`` (its manifest: SHA-256, size, identity, sequence, expiry, Ed25519
signature) and ``latest.json`` (the newest manifest, replaced atomically). A published version
never changes: devices cache it by its hash. ``fedpref.server.model_http`` serves the folder.

Every version gets the next **sequence number** of the folder: ``.sequence`` (mode 600, replaced
atomically, never served) keeps the last one, so numbers keep increasing across runs and
restarts. Devices remember the highest sequence they installed and refuse lower ones, so the
folder and its signing key belong together: to publish with the same key from a new folder,
copy ``.sequence`` into it first (or devices refuse its models as older). Every version also
**expires** ``expiry_days`` after it is published (30 by default): a device refuses an expired
model, so publish at least that often (a run publishes after every round).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import math
import os
import stat
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedpref.models.files import replace_private
from fedpref.models.published import (
    DEFAULT_EXPIRY_DAYS,
    LATEST_MANIFEST,
    MANIFEST_SUFFIX,
    MAX_EXPIRY_DAYS,
    MAX_MANIFEST_BYTES,
    MODEL_SUFFIX,
    Manifest,
    PublishedFormatError,
    check_version,
    key_id,
    serialize_model,
    sha256_hex,
)

try:  # POSIX: one publisher at a time per folder, across processes
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

SEQUENCE_FILE = ".sequence"  # the folder's last sequence number; "." never starts a version, so it is never served
LOCK_FILE = ".publish.lock"


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
    """Replace ``path`` atomically, a public file (0644): a reader sees the old file or the new
    one, never a mix."""
    tmp = _temp_copy(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _temp_copy(path: Path, data: bytes) -> Path:
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 600
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(name, 0o644)  # published files are public
    return Path(name)


def check_expiry_days(expiry_days: float) -> float:
    """``expiry_days`` if it is a usable lifetime for published models, else ValueError saying why."""
    if isinstance(expiry_days, bool) or not isinstance(expiry_days, (int, float)) or not math.isfinite(expiry_days) or not 0 < expiry_days <= MAX_EXPIRY_DAYS:
        raise ValueError(
            f"expiry_days must be a number of days in (0, {MAX_EXPIRY_DAYS:g}], got {expiry_days!r}: devices refuse a model "
            f"once it expires, so choose longer than the time between two publications (default {DEFAULT_EXPIRY_DAYS:g})"
        )
    return float(expiry_days)


class ModelPublisher:
    """Writes signed model versions to ``folder`` (see the module docstring for the layout).

    ``expiry_days``: how long after publication a device may use a version. ``clock`` gives
    the time in seconds since the epoch (``time.time``; a test may fix it)."""

    def __init__(
        self,
        folder: str | Path,
        signing_key: Ed25519PrivateKey | str | Path,
        *,
        expiry_days: float = DEFAULT_EXPIRY_DAYS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(signing_key, (str, Path)):
            signing_key = load_signing_key(signing_key)
        if not isinstance(signing_key, Ed25519PrivateKey):
            raise TypeError(f"signing_key must be an Ed25519PrivateKey or the path of its PEM file, got {type(signing_key).__name__}")
        self.expiry_days = check_expiry_days(expiry_days)
        self.clock = clock
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
        what a device needs to rebuild the model); ``created`` defaults to now (UTC). The
        manifest gets the folder's next sequence number and expires ``expiry_days`` from now.
        Refuses a version that is already published."""
        model_path, manifest_path = self.model_path(version), self.manifest_path(version)
        with self._exclusive():
            if model_path.exists() or manifest_path.exists():
                raise FileExistsError(
                    f"version {version!r} is already published in {self.folder}: a published version never changes "
                    f"(devices cache it by its hash); publish under a new version, e.g. with the round in its name"
                )
            now = datetime.datetime.fromtimestamp(self.clock(), datetime.timezone.utc)
            created = created or now.isoformat(timespec="milliseconds")
            data = serialize_model(arrays, version=version, round=round, run=run, created=created, meta=meta)
            sequence = self.last_sequence() + 1
            unsigned = Manifest(
                version=version, sha256=sha256_hex(data), size=len(data), created=created, round=round, run=str(run),
                sequence=sequence, expires=(now + datetime.timedelta(days=self.expiry_days)).isoformat(timespec="milliseconds"), key_id=self.key_id,
            )
            manifest = replace(unsigned, signature=base64.b64encode(self._key.sign(unsigned.signed_bytes())).decode())
            # The sequence first: a crash after it leaves a gap, never one number on two models.
            replace_private(self.folder / SEQUENCE_FILE, json.dumps({"sequence": sequence, "key_id": self.key_id}).encode())
            # Model first, then its manifest, then latest: whoever sees a manifest finds its model.
            _write_new(model_path, data)
            _write_new(manifest_path, manifest.to_json())
            _write_replace(self.folder / LATEST_MANIFEST, manifest.to_json())
        return manifest

    def last_sequence(self) -> int:
        """The highest sequence number signed in this folder (0 before the first): the larger of
        ``.sequence`` and the latest manifest's, so a lost ``.sequence`` never restarts the count."""
        recorded = 0
        path = self.folder / SEQUENCE_FILE
        if path.is_file():
            try:
                recorded = json.loads(path.read_bytes())["sequence"]
                if isinstance(recorded, bool) or not isinstance(recorded, int) or recorded < 0:
                    raise ValueError(recorded)
            except (ValueError, KeyError, TypeError):
                raise ValueError(
                    f"the sequence file {path} is damaged: restore it from a backup, or remove it (the latest manifest's "
                    f"sequence is then used; devices refuse any version numbered at or below the highest they installed)"
                ) from None
        latest = self.folder / LATEST_MANIFEST
        try:
            raw = json.loads(latest.read_bytes()[:MAX_MANIFEST_BYTES]) if latest.is_file() else {}
        except ValueError:
            raw = {}
        in_latest = raw.get("sequence", 0) if isinstance(raw, dict) else 0
        return max(recorded, in_latest if isinstance(in_latest, int) and not isinstance(in_latest, bool) else 0)

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the folder's publish lock: two publishers (two runs) never take the same sequence number."""
        if fcntl is None:  # pragma: no cover - Windows: one publisher per folder
            yield
            return
        fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def manifest(self, version: str) -> Manifest:
        """The manifest of a published ``version``."""
        path = self.manifest_path(version)
        if not path.is_file():
            raise KeyError(f"version {version!r} is not published in {self.folder} (published: {self.versions()})")
        return Manifest.from_json(path.read_bytes())

    def versions(self) -> list[str]:
        """Every published version, oldest first (by sequence number, then creation time, round
        and name), including versions published in manifest format 1 (which devices now refuse;
        they have no sequence number and come first)."""
        listed = [
            _listing(p)
            for p in self.folder.glob(f"*{MANIFEST_SUFFIX}")
            if p.name != LATEST_MANIFEST and not p.name.startswith(".")
        ]
        return [listing[-1] for listing in sorted(listed)]

    def latest(self) -> Manifest | None:
        """The manifest of the latest published version, or None before the first."""
        path = self.folder / LATEST_MANIFEST
        return Manifest.from_json(path.read_bytes()) if path.is_file() else None


def _listing(path: Path) -> tuple[int, str, int, str]:
    """(sequence, created, round, version) of the manifest at ``path``; a format 1 manifest has sequence 0."""
    data = path.read_bytes()
    try:
        manifest = Manifest.from_json(data)
    except PublishedFormatError:
        try:
            raw = json.loads(data)
        except ValueError:
            raw = None
        if isinstance(raw, dict) and raw.get("format") == 1 and isinstance(raw.get("version"), str):
            created, round_ = raw.get("created"), raw.get("round")
            return 0, str(created), round_ if isinstance(round_, int) else 0, check_version(raw["version"])
        raise
    return manifest.sequence, manifest.created, manifest.round, manifest.version
