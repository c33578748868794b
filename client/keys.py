"""A device's SuperNode authentication key pair.

Flower 1.41 authenticates a SuperNode by an elliptic-curve key (NIST P-256/384/521; ed25519
and RSA are refused): the private key in OpenSSH format stays on the device
(``flower-supernode --auth-supernode-private-key``), and the operator registers the public key,
one OpenSSH line, with the SuperLink (``flwr supernode register KEY.pub``)."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


def write_device_key(folder: str | Path, name: str = "device") -> tuple[Path, Path]:
    """Write ``folder/name`` (private, mode 600) and ``folder/name.pub``; refuses to overwrite."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / name, folder / f"{name}.pub"
    for path in (private, public):
        if path.exists():
            raise FileExistsError(f"{path} exists: a device keeps its key (remove it first to make a new one)")
    key = ec.generate_private_key(ec.SECP384R1())
    private.touch(mode=0o600)
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + f" {name}\n".encode())
    return private, public
