"""A device's SuperNode authentication key pair.

Flower 1.41 authenticates a SuperNode by an elliptic-curve key (NIST P-256/384/521; ed25519
and RSA are refused): the private key in OpenSSH format stays on the device
(``flower-supernode --auth-supernode-private-key``), and the operator registers the public key,
one OpenSSH line, with the SuperLink (``flwr supernode register KEY.pub``).

Both files are written readable by their owner only (mode 0600, whatever the umask), in a
folder created with mode 0700 (a folder that already exists keeps its mode)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedpref.models.files import create_private, private_folder


def write_device_key(folder: str | Path, name: str = "device") -> tuple[Path, Path]:
    """Write ``folder/name`` (the private key) and ``folder/name.pub``, both mode 0600;
    refuses to overwrite. A missing ``folder`` is created with mode 0700."""
    folder = private_folder(folder)
    private, public = folder / name, folder / f"{name}.pub"
    for path in (private, public):
        if path.exists():
            raise FileExistsError(f"{path} exists: a device keeps its key (remove it first to make a new one)")
    key = ec.generate_private_key(ec.SECP384R1())
    for path, data in ((private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())),
                       (public, key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + f" {name}\n".encode())):
        with os.fdopen(create_private(path), "wb") as f:  # (it must not exist)
            f.write(data)
    return private, public


def public_key_of(private_key: str | Path) -> str:
    """The OpenSSH public key line of the SuperNode private key in the file ``private_key``."""
    path = Path(private_key)
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise ValueError(f"cannot read the SuperNode key {path}: {exc.strerror}") from None
    except (ValueError, TypeError, binascii.Error, UnsupportedAlgorithm) as exc:
        raise ValueError(f"{path} is not an unencrypted OpenSSH private key ({exc}): make one with `fedpref device keys`") from None
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def fingerprint(public_key: str) -> str:
    """The SHA-256 fingerprint of an OpenSSH public key line, as ``ssh-keygen -l`` shows it
    (``SHA256:`` and the unpadded base64 of the SHA-256 of the key's blob)."""
    fields = public_key.split()
    if len(fields) < 2:
        raise ValueError("an OpenSSH public key line is 'TYPE BASE64 [COMMENT]'")
    try:
        serialization.load_ssh_public_key(" ".join(fields[:2]).encode())
        blob = base64.b64decode(fields[1], validate=True)
    except (ValueError, binascii.Error, UnsupportedAlgorithm) as exc:
        raise ValueError(f"not an OpenSSH public key ({exc})") from None
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
