"""The operator's commands: ``fedpref serve``, ``fedpref dev-certs`` and ``fedpref signing-key``.

They import only what the server needs (no data sets, plots or compiled engines): an operator's
machine runs them without the research stack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

server_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                         help="The server's operator: the operator API, certificates and the signing key.")
console = Console()
err = Console(stderr=True)


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


@server_app.command("dev-certs")
def dev_certs(
    out: Annotated[Path, typer.Option(help="Folder for ca.pem, server.pem and server.key.")] = Path("certs"),
    host: Annotated[list[str], typer.Option(help="A host name or IP address the SuperLink is reached at (repeat the option).")] = ["127.0.0.1", "localhost"],
    days: int = 30,
) -> None:
    """A private CA and a SuperLink certificate, for tests and a first deployment (production:
    certificates from your own CA). Devices get ca.pem as --root-certificates."""
    from fedpref.server.tls import write_dev_certificates

    try:
        paths = write_dev_certificates(out, tuple(host), days)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    console.print(f"wrote {paths['ca']}, {paths['cert']} and {paths['key']} for {', '.join(host)}, valid {days} days")
    console.print(f"flower-superlink --ssl-ca-certfile {paths['ca']} --ssl-certfile {paths['cert']} --ssl-keyfile {paths['key']} --enable-supernode-auth ...")


@server_app.command()
def serve(
    run_store: Annotated[str | None, typer.Option(help="The run store's SQLAlchemy URL or file (default: FEDPREF_RUN_STORE, else sqlite:///runs.sqlite).")] = None,
    publish_dir: Annotated[Path | None, typer.Option(help="Serve the signed models published here at /models (default: FEDPREF_PUBLISH_DIR).")] = None,
    host: Annotated[str | None, typer.Option(help="Address to bind (default: FEDPREF_HOST, else 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: FEDPREF_PORT, else 8000).")] = None,
) -> None:
    """The operator API and dashboard (FastAPI, uvicorn) over a run store. Settings come from
    FEDPREF_* variables (docs/operations.md); outside development FEDPREF_API_KEYS must hold real keys."""
    from pydantic import ValidationError

    from fedpref.server.api import serve as serve_api
    from fedpref.server.settings import OperatorSettings

    overrides = {k: v for k, v in (("run_store", run_store), ("publish_dir", publish_dir), ("host", host), ("port", port)) if v is not None}
    try:
        settings = OperatorSettings(**overrides)
    except ValidationError as exc:
        _fail("the operator API's settings are not valid:\n" + "\n".join(f"  {'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()))
    serve_api(settings)


@server_app.command("signing-key")
def signing_key(out: Annotated[Path, typer.Option(help="The private key's file (PEM, mode 600); the public key goes to OUT.pub.")] = Path("signing.key")) -> None:
    """An Ed25519 key for signing published models (run-config publish-key); give devices OUT.pub."""
    from fedpref.server.publish import generate_signing_key

    try:
        private, public = generate_signing_key(out)
    except (FileExistsError, OSError) as exc:
        _fail(str(exc))
    console.print(f"wrote {private} (keep it on the server) and {public} (give it to devices)")
