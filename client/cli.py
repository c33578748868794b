"""``fedpref device ...``: one device's store from the command line, its privacy page, and
joining a real federation as a Flower SuperNode."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .consent import Level
from .device import Device, NoModelError
from .eligibility import ALWAYS
from .inputs import InvalidInput
from .store import StoreError

device_app = typer.Typer(no_args_is_help=True, help="One device: its store, consent, privacy page, and joining a federation.")
console = Console()

StoreOption = Annotated[Path, typer.Option("--store", help="The device's store (an SQLite file; created if missing).")]


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {escape(message)}")  # the message may quote what was given: no markup in it
    raise typer.Exit(2)


@contextmanager
def _refused() -> Iterator[None]:
    """Bad input, a store that cannot be used, nothing to recommend from: the error's message
    and exit code 2, no traceback (nothing was stored)."""
    try:
        yield
    except (InvalidInput, StoreError, NoModelError) as exc:
        _fail(str(exc))


def _open(store: Path) -> Device:
    with _refused():
        return Device.open(store)


@device_app.command()
def record(
    store: StoreOption,
    item: Annotated[int, typer.Argument(help="The item's catalogue index (0 to 2**63 - 1).")],
    kind: Annotated[str, typer.Option(help="The kind of event: a short name such as view, click, purchase or rating.")] = "view",
    value: Annotated[float | None, typer.Option(help="A number that goes with it (a rating, a price).")] = None,
) -> None:
    """Record one event (what an app does when the person views, clicks or buys an item)."""
    with _open(store) as device, _refused():
        kept = device.record(item, kind, value)
        console.print("recorded" if kept else f"not recorded: consent excludes events of kind {escape(repr(kind))}")


@device_app.command()
def consent(
    store: StoreOption,
    level: Annotated[str, typer.Argument(help="none, on-device or federated")],
    kinds: Annotated[str, typer.Option(help="Comma-separated event kinds that may be used (default: every kind).")] = "",
) -> None:
    """Set the person's consent (it is in force at once, also for a running SuperNode)."""
    with _open(store) as device, _refused():
        now = device.set_consent(Level.parse(level), [k.strip() for k in kinds.split(",") if k.strip()] or None, source="command line")
        console.print(now.describe())


@device_app.command()
def conditions(
    store: StoreOption,
    charging: Annotated[bool, typer.Option("--charging/--on-battery")] = False,
    unmetered: Annotated[bool, typer.Option("--unmetered/--metered")] = False,
    idle: Annotated[bool, typer.Option("--idle/--busy")] = False,
    always: Annotated[bool, typer.Option(help="Replace the policy by one that always allows training (desktops, tests).")] = False,
) -> None:
    """Report the device's conditions (as an app would), or set a policy that needs none."""
    with _open(store) as device:
        if always:
            device.set_policy(ALWAYS)
        device.report_conditions(charging=charging, unmetered=unmetered, idle=idle)
        ok, why = device.eligible()
        console.print("eligible to train" if ok else "not eligible: " + "; ".join(why))


@device_app.command()
def report(store: StoreOption, as_json: Annotated[bool, typer.Option("--json", help="The structured form.")] = False) -> None:
    """What the device did with the person's data, in plain words (or as JSON)."""
    with _open(store) as device:
        result = device.privacy_report()
        if as_json:
            print(json.dumps(result.data, indent=2))
            return
        console.print(result.text)
        record = device.record_of_what_left()
        if record:
            table = Table("when", "to", "what", "round", "arrays", "bytes", "norm / bound", title="What left this device (latest 20)")
            for e in record[-20:]:
                arrays = ", ".join(f"{a['name']} {'x'.join(map(str, a['shape']))}" for a in e.get("arrays", []))
                norm = f"{e['update_norm']:.3f} / {e['clip_bound']:g}" if e.get("update") else ""
                table.add_row(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time"])), e["server"], e["message"], str(e.get("round", "")), arrays, str(e["bytes"]), norm)
            console.print(table)


@device_app.command()
def recommend(store: StoreOption, k: int = 10) -> None:
    """The device's current recommendations (offline, from the model it keeps)."""
    with _open(store) as device, _refused():
        console.print(" ".join(str(i) for i in device.recommend(k)))


@device_app.command()
def update(
    store: StoreOption,
    server: Annotated[str, typer.Option(help="The operator API serving published models, e.g. https://fl.example.com:8000.")],
    public_key: Annotated[Path, typer.Option(help="The publisher's Ed25519 public key (PEM): models signed by another key are refused.")],
) -> None:
    """Fetch the latest published global model, verify its hash and signature, and keep it."""
    from .model_fetch import ModelFetchError, ModelVerificationError

    with _open(store) as device:
        try:
            result = device.update_model(server, public_key)
        except (ModelFetchError, ModelVerificationError, ValueError, OSError) as exc:
            _fail(str(exc))
        if result.not_modified:
            console.print(f"model {result.version} is current (nothing downloaded)")
        else:
            console.print(f"installed model {result.version} ({result.downloaded_bytes:,} bytes, signature and hash verified)")


@device_app.command()
def export(store: StoreOption, out: Annotated[Path | None, typer.Option(help="Write the JSON document here (default: print it).")] = None) -> None:
    """Everything the device holds about the person, as one JSON document (a file written
    with --out is readable by you only)."""
    with _open(store) as device:
        try:
            text = device.export_json(out)
        except OSError as exc:
            _fail(f"cannot write {out}: {exc.strerror}")
    if out is None:
        print(text)
    else:
        console.print(f"wrote {out}")


@device_app.command()
def forget(store: StoreOption, yes: Annotated[bool, typer.Option("--yes", help="Erase without asking.")] = False) -> None:
    """Erase everything the device holds about the person (and the models it fetched)."""
    if not yes and not typer.confirm(f"Erase every event, consent decision, record, the private model and the fetched models of {store}?"):
        raise typer.Exit(1)
    with _open(store) as device:
        device.forget()
    console.print("erased")


@device_app.command()
def page(store: StoreOption, port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0: a free one).")] = 0) -> None:
    """Serve the person's privacy page on 127.0.0.1 until Ctrl-C, and print its one-time link;
    Enter prints another (for another tab or browser)."""
    device = _open(store)
    try:
        handle = device.serve_privacy_page(port=port)
    except RuntimeError as exc:
        device.close()
        _fail(str(exc))
    console.print(f"privacy page of {store} on 127.0.0.1:{handle.port} (Ctrl-C to stop; Enter prints another one-time link, "
                  "for another tab or browser). Open this link in a browser on this device; it works once, and whoever "
                  "opens it can see and change this data, so share it with no one:")
    print(handle.url, flush=True)  # alone on its line, never folded
    try:
        while handle.thread.is_alive():
            if not sys.stdin.readline():  # no terminal (or it closed): serve until Ctrl-C
                while handle.thread.is_alive():
                    time.sleep(0.5)
                break
            print(handle.link(), flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        handle.stop()
        device.close()


def supernode_command(
    *, superlink: str, store: Path, root_certificates: Path | None, auth_key: Path | None, insecure: bool, device_index: int, port: int | None
) -> list[str]:
    """The ``flower-supernode`` command line for one device with its store."""
    exe = shutil.which("flower-supernode", path=_path())
    if exe is None:
        raise FileNotFoundError("flower-supernode is not installed: pip install 'flwr[simulation]>=1.41,<1.42'")
    node_config = f"store='{store.resolve()}' superlink='{superlink}' device-index={device_index}"
    command = [exe, "--superlink", superlink, "--node-config", node_config]
    if insecure:
        command.append("--insecure")
    else:
        if root_certificates is not None:
            command += ["--root-certificates", str(root_certificates)]
        command += ["--auth-supernode-private-key", str(auth_key)]
    command += ["--host", "127.0.0.1"]  # the SuperNode's local Runtime API (Flower's ClientAppIo)
    if port is not None:
        command += ["--port", str(port)]
    return command


def _path() -> str:
    """PATH with this Python's scripts first: the SuperNode starts ``flower-superexec`` and
    ``flwr-clientapp`` by name."""
    return str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")


@device_app.command()
def keys(
    out: Annotated[Path, typer.Option(help="Folder for the key pair.")] = Path("keys"),
    name: Annotated[str, typer.Option(help="File name of the private key (the public one adds .pub).")] = "device",
) -> None:
    """Make this device's SuperNode authentication key pair (EC P-384, OpenSSH format)."""
    from .keys import write_device_key

    try:
        private, public = write_device_key(out, name)
    except FileExistsError as exc:
        _fail(str(exc))
    console.print(f"wrote {private} (stays on the device) and {public}")
    console.print(f"the operator registers it with: flwr supernode register {public} <superlink-connection>")


@device_app.command()
def join(
    superlink: Annotated[str, typer.Option(help="The SuperLink's address, HOST:PORT.")],
    store: StoreOption,
    root_certificates: Annotated[Path | None, typer.Option(help="PEM CA that signed the SuperLink's certificate (default: the system's).")] = None,
    auth_key: Annotated[Path | None, typer.Option(help="This device's SuperNode authentication private key (from `fedpref device keys`); its public key must be registered with the SuperLink.")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="No TLS and no SuperNode authentication: for a local test only.")] = False,
    device_index: Annotated[int | None, typer.Option(help="A stable key the server orders devices by (default: a random one kept in the store).")] = None,
    port: Annotated[int | None, typer.Option(help="Port of this SuperNode's local Runtime API on 127.0.0.1 (default: Flower's 9094; give each SuperNode on one machine its own).")] = None,
) -> None:
    """Run a Flower SuperNode for this device: fedpref's ClientApp trains on the store's
    consented events, declines when consent or the eligibility policy says no, and records
    every message it sends. TLS and SuperNode authentication are on unless --insecure."""
    if not insecure and auth_key is None:
        _fail("SuperNode authentication needs --auth-key (this device's private key, from `fedpref device keys`); use --insecure only for a local test")
    if auth_key is not None and not auth_key.exists():
        _fail(f"no key at {auth_key}: create one with `fedpref device keys --out DIR`")
    if root_certificates is not None and not root_certificates.exists():
        _fail(f"no CA certificate at {root_certificates}")
    if auth_key is not None:
        from .keys import public_key_of

        try:
            public_key = public_key_of(auth_key)
        except ValueError as exc:
            _fail(str(exc))
    with _open(store) as device, _refused():
        if device_index is None:
            device_index = device.device_key()
        if auth_key is not None:
            device.remember_supernode_key(public_key)  # so that the export shows what identifies the device
        level = device.consent.level.value
    try:
        command = supernode_command(superlink=superlink, store=store, root_certificates=root_certificates, auth_key=auth_key, insecure=insecure, device_index=device_index, port=port)
    except FileNotFoundError as exc:
        _fail(str(exc))
    console.print(f"joining {superlink} as device {device_index} (consent: {level}; change it any time with `fedpref device consent`)")
    proc = subprocess.Popen(command, env=dict(os.environ, PATH=_path()))

    def stop(signum, _frame):  # pass a stop on to the SuperNode, and wait for it
        proc.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        code = proc.wait()
    raise typer.Exit(code if code >= 0 else 0)
