"""The person's privacy page: a local web page served by the SDK on 127.0.0.1.

It shows the consent in force and lets the person change it (level and event kinds), shows
the plain-language report and the record of what left the device, the current
recommendations, and has export and erase buttons. It loads nothing from the network.

    handle = device.serve_privacy_page()      # or: fedpref device page --store prefs.sqlite
    print(handle.url); ...; handle.stop()

Who may use it. Any program on the device can connect to 127.0.0.1 (on a phone, any app), and
a browser sends a cookie for 127.0.0.1 to every port of it (cookies are not tied to a port), so
the page answers only the browser tab that opened its link:

- Every launch makes its own secrets from the operating system (:mod:`secrets`). ``handle.url``
  is a one-time link ``http://127.0.0.1:PORT/?s=SECRET``; the answer to it is the only answer
  that carries the page's token, in the page's own script, and a session cookie
  (``HttpOnly; SameSite=Strict; Path=/``). The script keeps the token in the tab's
  ``sessionStorage`` (which only pages of this origin, this port, can read) and takes the
  secret out of the address bar. ``handle.link()`` makes another one-time link.
- Every request to ``/api/...`` (reads too) and to any other path needs both the cookie and the
  token in the ``X-Fedpref-Token`` header, else 401 before anything is read or routed. A page on
  another origin cannot add that header (the page allows no CORS), and a process that was sent
  the cookie does not have the token. ``GET /`` with the cookie gives the page without the
  token: a reload works in the tab that holds it, a new tab needs a new link. Every secret is
  compared in constant time.
- Every change (any method but GET and HEAD) also needs an ``Origin`` equal to the page's own.
- It answers only requests whose Host is the loopback address (so that a web page elsewhere
  cannot reach it through DNS rebinding).
- Every response forbids framing (``X-Frame-Options: DENY``, ``frame-ancestors 'none'``) and
  caching (``Cache-Control: no-store``), and the page runs under a Content-Security-Policy that
  allows its own script and style only.
- Widening consent (a higher level, or kinds of events not allowed before) and erasing ask the
  person first: without ``"confirm": true`` the server answers 409 with the question to ask,
  and changes nothing. Narrowing consent needs no confirmation.
"""

# No "from __future__ import annotations": FastAPI reads the route functions' annotations as objects.

import hmac
import json
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StringConstraints

from .consent import Consent, Level
from .device import Device, NoModelError

KNOWN_KINDS = ("view", "click", "purchase", "rating")
TOKEN_HEADER = "x-fedpref-token"
SAFE_METHODS = frozenset({"GET", "HEAD"})
_LEVEL_ORDER = {Level.NONE: 0, Level.ON_DEVICE: 1, Level.FEDERATED: 2}
_SECURITY_HEADERS = (
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"),
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
)

Kind = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")]


class ConsentChange(BaseModel):
    """A change of consent from the page; ``confirm`` must be true when it widens consent."""

    model_config = ConfigDict(extra="forbid")
    level: Annotated[str, StringConstraints(max_length=32)]
    kinds: Annotated[list[Kind], Field(max_length=256)] | None = None
    confirm: StrictBool = False


class Confirmation(BaseModel):
    """The body of an erase: ``{"confirm": true}`` once the person has agreed."""

    model_config = ConfigDict(extra="forbid")
    confirm: StrictBool = False


def _same(given: str, expected: str) -> bool:
    """Constant-time comparison of a secret with what a request carried (any text: a hostile
    request may carry characters that are not ASCII)."""
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8"))


class PageSecrets:
    """The secrets of one launch of the page, all from :mod:`secrets` (the OS's randomness):
    the session (the cookie's value), the token every request but the page itself needs in a
    header (given out only in the answer to a one-time link), and the one-time link secrets
    not yet used."""

    def __init__(self) -> None:
        self.session = secrets.token_urlsafe(32)
        self.token = secrets.token_urlsafe(32)
        self._links: list[str] = []
        self._lock = threading.Lock()

    def new_link(self) -> str:
        """A new one-time link secret."""
        link = secrets.token_urlsafe(32)
        with self._lock:
            self._links.append(link)
        return link

    def redeem(self, candidate: str) -> bool:
        """Whether ``candidate`` is an unused link secret; if so, it is used up. Every pending
        secret is compared, in constant time, whichever matches."""
        with self._lock:
            found = None
            for link in self._links:
                if _same(candidate, link):
                    found = link
            if found is None:
                return False
            self._links.remove(found)
            return True

    def is_session(self, cookie: str | None) -> bool:
        return cookie is not None and _same(cookie, self.session)

    def is_token(self, header: str | None) -> bool:
        return header is not None and _same(header, self.token)


@dataclass
class PageHandle:
    """A running page: ``url`` is its first one-time link; ``link()`` makes another."""

    url: str
    server: object
    thread: threading.Thread
    app: object
    secrets: PageSecrets
    port: int

    def link(self) -> str:
        """Another one-time link to the page (for the person to open it again: in another tab
        or browser, or after the browser dropped its session)."""
        return f"http://127.0.0.1:{self.port}/?s={self.secrets.new_link()}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _refuse(status: int, detail: str):
    from starlette.responses import JSONResponse

    return JSONResponse({"detail": detail}, status_code=status)


def _page_csp(nonce: str) -> str:
    return (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    )


def _page(token: str):
    """The page, with ``token`` in its script (empty: the page as a reload gets it, whose script
    takes the token its tab was given by the link)."""
    from starlette.responses import HTMLResponse

    nonce = secrets.token_urlsafe(16)
    embedded = json.dumps(token).replace("<", "\\u003c")  # a JavaScript string that cannot end the script
    body = PAGE.replace('"__TOKEN__"', embedded).replace("__NONCE__", nonce)
    return HTMLResponse(body, headers={"content-security-policy": _page_csp(nonce)})


NEW_LINK = "ask for a new one-time link (press Enter where fedpref device page runs, or start it again)"


class PageGuard:
    """ASGI middleware in front of every route of the page: the loopback Host check, the
    one-time link, the session cookie and the page's token, and for changes the Origin; and the
    security headers on every response. Requests it refuses are answered before their body is
    read or any route is looked up, so a route added later is guarded as well."""

    def __init__(self, app, *, page_secrets: PageSecrets, port: int) -> None:
        self.app = app
        self.secrets = page_secrets
        self.cookie = f"fedpref-page-{port}"
        self.origins = frozenset({f"http://127.0.0.1:{port}", f"http://localhost:{port}"})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # the page has no WebSocket: refuse the handshake
            await send({"type": "websocket.close", "code": 1008})
            return

        async def send_guarded(message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [(name, value) for name, value in _SECURITY_HEADERS if name not in present]
                message = {**message, "headers": headers}
            await send(message)

        from starlette.requests import Request

        refusal = self.refusal(Request(scope))
        if refusal is None:
            await self.app(scope, receive, send_guarded)
        else:
            await refusal(scope, receive, send_guarded)

    def refusal(self, request):
        """The response that refuses (or answers) ``request`` here, or None to let it through.

        The cookie alone is never enough: the browser sends it to every port of 127.0.0.1, so
        whatever listens on another port gets it. Only ``GET /`` is let through with the
        cookie alone, and that page carries no token and nothing of the person's."""
        host = (request.headers.get("host") or "").rsplit(":", 1)[0].strip("[]")
        if host not in ("127.0.0.1", "localhost", "::1"):
            return _refuse(403, "this page answers on 127.0.0.1 only")
        has_cookie = self.secrets.is_session(request.cookies.get(self.cookie))
        has_token = self.secrets.is_token(request.headers.get(TOKEN_HEADER))
        if request.method == "GET" and request.url.path == "/" and "s" in request.query_params:
            if self.secrets.redeem(request.query_params["s"]):
                response = _page(self.secrets.token)
                response.set_cookie(self.cookie, self.secrets.session, httponly=True, samesite="strict", path="/")
                return response
            return _refuse(401, f"this link has been used already or is not the page's: each link opens the page once; {NEW_LINK}")
        if not has_cookie:
            return _refuse(401, f"this page opens only through the one-time link given when it started; {NEW_LINK}")
        if request.method == "GET" and request.url.path == "/":
            return None  # the page without its token
        if not has_token:
            return _refuse(401, f"missing or wrong page token (the {TOKEN_HEADER} header): only the page opened through "
                                f"its one-time link sends it; {NEW_LINK}")
        if request.method not in SAFE_METHODS and request.headers.get("origin") not in self.origins:
            return _refuse(403, "a change must come from the page itself (its Origin): use the page's buttons")
        return None


NO_ROUND = "This device has not taken part in any federated training round."


def _status(device: Device) -> dict:
    try:
        recommendations = device.recommend(10)
        why = None
    except NoModelError as exc:
        recommendations, why = [], str(exc)
    report = device.privacy_report()
    kinds = sorted(set(KNOWN_KINDS) | {e.kind for e in device.store.events()})
    return {
        "consent": device.consent.to_dict(),
        "consent_text": device.consent.describe(),
        "consent_history": device.consent_history(),
        "kinds": kinds,
        "report": report.text,
        "report_data": report.data,
        # what each run's guarantee means for this person (client/ledger.py: person_sentence)
        "guarantee": " ".join(g["sentence"] for g in report.data["guarantees"]) or NO_ROUND,
        "record": device.record_of_what_left()[-200:][::-1],
        "recommendations": recommendations,
        "recommendations_note": why,
        "events_stored": device.store.count_events(),
    }


def widening(current: Consent, level: Level, kinds: list[str] | None) -> list[str]:
    """What a change from ``current`` to ``level`` and ``kinds`` would allow that ``current``
    does not, in plain words (empty: the change widens nothing)."""
    wider = []
    if _LEVEL_ORDER[level] > _LEVEL_ORDER[current.level]:
        if current.level is Level.NONE:
            wider.append("your history will personalise recommendations on this device")
        if level is Level.FEDERATED:
            wider.append("this device will send size-limited model updates (never your events) to help improve the shared model")
    if current.kinds is not None:
        if kinds is None:
            wider.append("events of every kind will be recorded and may be used")
        elif added := sorted(set(kinds) - current.kinds):
            wider.append(f"events of these kinds will be recorded and may be used: {', '.join(added)}")
    return wider


def _needs_confirmation(question: str, how: str):
    from starlette.responses import JSONResponse

    return JSONResponse({"detail": f"{question} Nothing was changed; {how}", "question": question}, status_code=409)


def make_app(device: Device, *, port: int, page_secrets: PageSecrets | None = None):
    """The FastAPI app of the page on 127.0.0.1:``port``, behind :class:`PageGuard`."""
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import JSONResponse

    page_secrets = page_secrets or PageSecrets()
    app = FastAPI(title="fedpref: your data on this device", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(PageGuard, page_secrets=page_secrets, port=port)
    lock = threading.Lock()

    @app.get("/", include_in_schema=False)
    def page():
        return _page("")  # the token is only in the answer to a one-time link (PageGuard)

    @app.get("/api/status")
    def status() -> dict:
        with lock:
            return _status(device)

    @app.post("/api/consent")
    def consent(change: ConsentChange):
        try:
            level = Level.parse(change.level)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        with lock:
            wider = widening(device.consent, level, change.kinds)
            if wider and not change.confirm:
                question = "This widens how your data may be used: " + "; ".join(wider) + ". Do you agree?"
                return _needs_confirmation(question, 'send the change again with "confirm": true once the person has agreed.')
            try:
                device.set_consent(level, change.kinds, source="privacy page")
            except ValueError as exc:
                raise HTTPException(422, str(exc)) from None
            return _status(device)

    @app.get("/api/export")
    def export() -> JSONResponse:
        with lock:
            doc = device.export()
        return JSONResponse(doc, headers={"Content-Disposition": 'attachment; filename="fedpref-export.json"'})

    @app.post("/api/forget")
    def forget(confirmation: Confirmation | None = None):
        if confirmation is None or not confirmation.confirm:
            question = ("Erase every event, your consent history, the record of what left and your private model from "
                        "this device? This cannot be undone.")
            return _needs_confirmation(question, 'send {"confirm": true} once the person has agreed.')
        with lock:
            device.forget()
            return _status(device)

    return app


def serve(device: Device, *, port: int = 0) -> PageHandle:
    """Serve the page on 127.0.0.1 (``port`` 0: a free one) in a background thread; the
    handle's ``url`` is the first one-time link to it."""
    import uvicorn

    if port == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    page_secrets = PageSecrets()
    app = make_app(device, port=port, page_secrets=page_secrets)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                            proxy_headers=False, server_header=False, ws="none")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="fedpref-privacy-page", daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline and thread.is_alive():
        time.sleep(0.05)
    if not server.started:
        raise RuntimeError(f"the privacy page could not start on 127.0.0.1:{port} (is the port taken?)")
    handle = PageHandle("", server, thread, app, page_secrets, port)
    handle.url = handle.link()
    return handle


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Your data on this device</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style nonce="__NONCE__">
body{font-family:system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem;color:#222}
h1{font-size:1.5rem} h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
.report{background:#f3f7f3;padding:.8rem 1rem;border-radius:6px}
table{border-collapse:collapse;width:100%;font-size:.85rem} td,th{border-bottom:1px solid #eee;padding:.25rem;text-align:left}
button{padding:.4rem .9rem;margin-right:.5rem} .danger{background:#b00020;color:#fff;border:0;border-radius:4px}
label{display:block;margin:.2rem 0} #message{color:#0a5;min-height:1.2rem}
</style></head>
<body>
<h1>Your data on this device</h1>
<p class="report" id="report">Loading...</p>
<h2>What the privacy guarantee means for you</h2>
<p id="guarantee"></p>
<h2>How your history may be used</h2>
<form id="consent-form">
<label><input type="radio" name="level" value="none"> <b>Not at all</b>: recommendations from the shared model only</label>
<label><input type="radio" name="level" value="on-device"> <b>On this device</b>: personalise here, send nothing</label>
<label><input type="radio" name="level" value="federated"> <b>Help improve the shared model</b>: also send size-limited model updates (never your events)</label>
<p>Kinds of events that may be used:</p><div id="kinds"></div>
<button type="submit" id="save-consent">Save</button> <span id="message"></span>
</form>
<p id="consent-text"></p>
<h2>Recommended for you</h2><ol id="recommendations"></ol><p id="recommendations-note"></p>
<h2>What left this device</h2>
<table><thead><tr><th>when</th><th>to</th><th>what</th><th>round</th><th>arrays</th><th>bytes</th><th>norm / bound</th><th>noise</th></tr></thead>
<tbody id="record"></tbody></table>
<h2>Your data</h2>
<p><button type="button" id="export">Export everything (JSON)</button>
<button type="button" class="danger" id="forget">Erase everything</button></p>
<script nonce="__NONCE__">
// The token comes only with the answer to a one-time link. The tab keeps it in its
// sessionStorage, which pages of other origins (other ports too) cannot read, so that a reload
// works; and the link's secret leaves the address bar.
const linkToken = "__TOKEN__";
if (linkToken) { sessionStorage.setItem('fedpref-page-token', linkToken); history.replaceState(null, '', '/'); }
const token = linkToken || sessionStorage.getItem('fedpref-page-token') || '';
const withToken = {'x-fedpref-token': token};
function text(el, value){ el.textContent = value; }
function row(cells){ const tr=document.createElement('tr'); for(const c of cells){ const td=document.createElement('td'); td.textContent=c; tr.appendChild(td);} return tr; }
function render(s){
  text(document.getElementById('report'), s.report);
  text(document.getElementById('guarantee'), s.guarantee);
  text(document.getElementById('consent-text'), s.consent_text);
  for (const r of document.querySelectorAll('input[name=level]')) r.checked = (r.value === s.consent.level);
  const kinds = document.getElementById('kinds'); kinds.innerHTML='';
  for (const k of s.kinds){ const l=document.createElement('label'); const i=document.createElement('input');
    i.type='checkbox'; i.name='kind'; i.value=k; i.checked = s.consent.kinds === null || s.consent.kinds.includes(k);
    l.appendChild(i); l.appendChild(document.createTextNode(' '+k)); kinds.appendChild(l); }
  const recs = document.getElementById('recommendations'); recs.innerHTML='';
  for (const item of s.recommendations){ const li=document.createElement('li'); li.textContent='item '+item; recs.appendChild(li); }
  text(document.getElementById('recommendations-note'), s.recommendations_note || '');
  const body = document.getElementById('record'); body.innerHTML='';
  for (const e of s.record){
    const arrays = (e.arrays||[]).map(a => a.name+' '+a.shape.join('x')).join(', ');
    const norm = e.update ? (Number(e.update_norm).toFixed(3)+' / '+e.clip_bound) : '';
    const noise = e.noise ? e.noise.placement : '';
    body.appendChild(row([new Date(e.time*1000).toLocaleString(), e.server, e.message+(e.reason?' ('+e.reason+')':''), e.round ?? '', arrays, e.bytes, norm, noise]));
  }
}
const message = document.getElementById('message');
async function load(){
  const r = await fetch('/api/status', {headers: withToken});
  if (!r.ok) { text(document.getElementById('report'), 'This page is closed: '+(await r.json()).detail); return; }
  render(await r.json());
}
function send(path, body){
  return fetch(path, {method:'POST', headers:Object.assign({'content-type':'application/json'}, withToken), body: JSON.stringify(body)});
}
// A change that widens consent, and erasing, are asked first: the server answers 409 with the
// question, and takes the change only with "confirm": true.
async function post(path, body){
  let r = await send(path, body);
  if (r.status === 409) {
    const question = (await r.json()).question;
    if (!confirm(question)) { text(message, 'Nothing changed.'); return false; }
    r = await send(path, Object.assign({}, body, {confirm: true}));
  }
  if (!r.ok) { text(message, 'Not saved: '+(await r.text())); return false; }
  render(await r.json());
  return true;
}
document.getElementById('consent-form').addEventListener('submit', async ev => {
  ev.preventDefault();
  const level = document.querySelector('input[name=level]:checked').value;
  const boxes = [...document.querySelectorAll('input[name=kind]')];
  const kinds = boxes.every(b => b.checked) ? null : boxes.filter(b => b.checked).map(b => b.value);
  if (await post('/api/consent', {level, kinds})) text(message, 'Saved.');
});
// The export needs the token too, so the page fetches it and saves it from memory.
document.getElementById('export').addEventListener('click', async () => {
  const r = await fetch('/api/export', {headers: withToken});
  if (!r.ok) { text(message, 'Not exported: '+(await r.json()).detail); return; }
  const url = URL.createObjectURL(await r.blob());
  const a = document.createElement('a'); a.href = url; a.download = 'fedpref-export.json';
  document.body.appendChild(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
  text(message, 'Exported.');
});
document.getElementById('forget').addEventListener('click', async () => {
  if (await post('/api/forget', {})) text(message, 'Erased.');
});
load();
</script></body></html>
"""
