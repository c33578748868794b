"""The operator API's guard, attacked: a request without a right key, or with a body beyond the
limit, is answered before the server reads its body.

The in-process tests call the ASGI app directly with a ``receive`` that counts how often it is
awaited and how many body bytes it handed out: a refusal before reading means it was never
awaited; a streamed body beyond the limit stops being read one chunk past the limit. The slow
test sends the attack of a 64 MiB body to a real ``fedpref serve`` (uvicorn) on 127.0.0.1 and
reads the refusal before sending a byte of the body."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fedpref.server.api import FlowerControl, create_app
from fedpref.server.settings import OperatorSettings

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
KEY = "guard-operator-key-0123456789-abcdefgh"
READ_KEY = "guard-read-only-key-0123456789-abcdefgh"
LIMIT = 64 * 1024  # the default FEDPREF_MAX_BODY_BYTES
HUGE = 64 * 1024 * 1024  # what an attacker declares, or streams
CHUNK = 4096


def settings_for(monkeypatch, **values) -> OperatorSettings:
    for name in list(os.environ):
        if name.startswith("FEDPREF_"):
            monkeypatch.delenv(name)
    return OperatorSettings(_env_file=None, environment="production", api_keys=[KEY], read_api_keys=[READ_KEY], **values)


@pytest.fixture()
def app(monkeypatch, store, tmp_path):
    flwr = tmp_path / "flwr-must-not-run"  # any call to Flower would fail loudly
    return create_app(settings_for(monkeypatch), run_store=store, flower=FlowerControl(app_dir=ROOT, executable=str(flwr)))


class Body:
    """An attacker's body, handed out in CHUNK-sized ``http.request`` messages on demand
    (``total`` bytes, never held in memory at once); counts what was asked for."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.given = 0
        self.awaited = 0

    async def receive(self) -> dict:
        self.awaited += 1
        if self.given >= self.total:
            return {"type": "http.disconnect"}
        piece = min(CHUNK, self.total - self.given)
        self.given += piece
        return {"type": "http.request", "body": b"[" * piece, "more_body": self.given < self.total}


def request(app, method: str, path: str, headers: dict[str, str], body: Body) -> tuple[int, dict[str, str], bytes]:
    """Call the ASGI app once; returns (status, headers, body) of its answer."""
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()],
        "client": ("203.0.113.9", 40000), "server": ("127.0.0.1", 8000),
    }
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, body.receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    answer = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in start["headers"]}
    return start["status"], answer, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def protected_requests(app):
    """(method, concrete path) of every route that needs a key."""
    from fastapi.routing import iter_route_contexts

    public = {"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/", "/dashboard", "/dashboard/app.js",
              "/dashboard/app.css", "/dashboard/favicon.svg"}
    for route in iter_route_contexts(app.routes):
        if route.path in public or route.path.startswith("/models"):
            continue
        for method in sorted(route.methods or ()):
            yield method, route.path.replace("{run_id}", "1").replace("{flower_run_id}", "1")
    yield "POST", "/no/such/route"  # a path no route serves needs a key too


def test_a_huge_body_without_a_key_is_refused_unread_on_every_protected_route(app):
    answers = []
    for method, path in protected_requests(app):
        for headers in ({"content-type": "application/json", "content-length": str(HUGE)},
                        {"content-type": "application/json", "transfer-encoding": "chunked"},
                        {"content-length": str(HUGE), "x-api-key": KEY[:-1] + "?"}):
            body = Body(HUGE)
            answers.append((method, path, headers, body, *request(app, method, path, headers, body)))
    assert [(m, p, body.given) for m, p, _, body, *_ in answers if body.awaited] == [], "bodies read before the key was checked"
    assert len(answers) >= 3 * 8
    for method, path, headers, _, status, answer, content in answers:
        assert status == 401, (method, path, headers, status, content[:200])
        assert answer["www-authenticate"].startswith("Bearer") and answer["connection"] == "close"
        assert "X-API-Key" in json.loads(content)["detail"]


def test_a_declared_body_beyond_the_limit_is_refused_unread_even_with_a_key(app):
    for method, path, headers in (("POST", "/api/runs", {"x-api-key": KEY}), ("GET", "/api/runs", {"authorization": f"Bearer {READ_KEY}"}),
                                  ("GET", "/health", {}), ("POST", "/dashboard", {})):
        body = Body(LIMIT + 1)
        status, answer, content = request(app, method, path, {**headers, "content-type": "application/json", "content-length": str(LIMIT + 1)}, body)
        assert status == 413, (method, path, status, content[:200])
        assert body.awaited == 0, f"{method} {path}: {body.given} bytes were read of a body declared too large"
        assert answer["connection"] == "close" and "FEDPREF_MAX_BODY_BYTES" in json.loads(content)["detail"]
    body = Body(LIMIT)  # at the limit: read, and judged as JSON (a run of '[' is not)
    status, _, _ = request(app, "POST", "/api/runs", {"x-api-key": KEY, "content-type": "application/json", "content-length": str(LIMIT)}, body)
    assert status in (400, 422) and body.given == LIMIT


def test_a_streamed_body_stops_being_read_at_the_limit(app):
    body = Body(16 * LIMIT)  # chunked: no length declared, so it is counted as it arrives
    status, answer, content = request(app, "POST", "/api/runs", {"x-api-key": KEY, "content-type": "application/json", "transfer-encoding": "chunked"}, body)
    assert status == 413, (status, content[:200])
    assert body.given <= LIMIT + CHUNK, f"{body.given} bytes were read, the limit is {LIMIT}"
    assert answer["connection"] == "close"


def test_a_read_only_key_cannot_start_or_stop_a_run_and_its_body_is_not_read(app):
    for path in ("/api/runs", "/api/runs/flower/1/stop"):
        body = Body(1000)
        status, _, content = request(app, "POST", path, {"x-api-key": READ_KEY, "content-type": "application/json", "content-length": "1000"}, body)
        assert status == 403 and body.awaited == 0, (path, status, content[:200])
        assert "read-only" in json.loads(content)["detail"]


# -- a real server ---------------------------------------------------------------------------------

def read_answer(sock: socket.socket) -> tuple[int, str]:
    """The status and head of the HTTP answer on ``sock`` (reads until the blank line)."""
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            piece = sock.recv(65536)
        except TimeoutError:
            pytest.fail(f"no answer: the server is waiting for the body ({data[:200]!r})")
        if not piece:
            break
        data += piece
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    return int(head.split(" ", 2)[1]), head.lower()


def send_headers(port: int, lines: list[str], request_line: str = "POST /api/runs HTTP/1.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(60)  # a guard against a server that waits for the body for ever: the test then fails
    sock.sendall(("\r\n".join([request_line, "Host: 127.0.0.1", "Content-Type: application/json", *lines]) + "\r\n\r\n").encode())
    return sock


@pytest.mark.slow
def test_fedpref_serve_answers_a_huge_body_before_it_is_sent(tmp_path, free_port, stop_process_tree):
    port = free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("FEDPREF_")}
    env.update(FEDPREF_ENVIRONMENT="production", FEDPREF_API_KEYS=KEY, FEDPREF_RUN_STORE=f"sqlite:///{tmp_path / 'runs.sqlite'}",
               FEDPREF_APP_DIR=str(ROOT), FEDPREF_HOST="127.0.0.1", FEDPREF_PORT=str(port))
    with (tmp_path / "serve.log").open("w") as log:
        server = subprocess.Popen([str(BIN / "fedpref"), "serve"], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert server.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        warm = send_headers(port, [f"X-API-Key: {KEY}"], "GET /api/runs HTTP/1.1")  # a first keyed request: imports and caches settle
        assert read_answer(warm)[0] == 200
        warm.close()
        before = psutil.Process(server.pid).memory_info().rss

        # No key, 64 MiB announced: the refusal comes before a byte of the body is sent.
        sock = send_headers(port, [f"Content-Length: {HUGE}"])
        status, head = read_answer(sock)
        assert status == 401 and "connection: close" in head
        sent, piece = 0, b"[" * 65536
        try:  # the attacker sends the body anyway: the server has closed the connection
            while sent < HUGE:
                sock.sendall(piece)
                sent += len(piece)
        except OSError:  # broken pipe or reset
            pass
        sock.close()
        assert sent < HUGE, "the server went on receiving the whole body of a request it had refused"

        # With a key, 64 MiB announced: 413 before the body.
        sock = send_headers(port, [f"Content-Length: {HUGE}", f"X-API-Key: {KEY}"])
        assert read_answer(sock)[0] == 413
        sock.close()

        # With a key, chunked: a chunk that announces 64 MiB and sends LIMIT + 1 bytes of it is
        # refused once the limit is passed, without waiting for the rest.
        sock = send_headers(port, ["Transfer-Encoding: chunked", f"X-API-Key: {KEY}"])
        sock.sendall(f"{HUGE:x}\r\n".encode() + b"[" * (LIMIT + 1))
        assert read_answer(sock)[0] == 413
        sock.close()

        grown = psutil.Process(server.pid).memory_info().rss - before
        assert grown < HUGE // 4, f"the server grew by {grown} bytes"
    finally:
        stop_process_tree(server)
