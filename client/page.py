"""The person's privacy page: a local web page served by the SDK on 127.0.0.1.

It shows the consent in force and lets the person change it (level and event kinds), shows
the plain-language report and the record of what left the device, the current
recommendations, and has export and erase buttons. It loads nothing from the network.

    handle = device.serve_privacy_page()      # or: fedpref device page --store prefs.sqlite
    print(handle.url); ...; handle.stop()

It binds to 127.0.0.1 only, answers only requests whose Host is the loopback address (so that
a web page elsewhere cannot reach it through DNS rebinding), and every change needs the
page's own random token in a header (so that another site cannot post to it).
"""

# No "from __future__ import annotations": FastAPI reads the route functions' annotations as objects.

import html
import secrets
import socket
import threading
import time
from dataclasses import dataclass

from pydantic import BaseModel

from .consent import Level
from .device import Device, NoModelError

KNOWN_KINDS = ("view", "click", "purchase", "rating")


class ConsentChange(BaseModel):
    level: str
    kinds: list[str] | None = None


@dataclass
class PageHandle:
    url: str
    server: object
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


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
        "record": device.record_of_what_left()[-200:][::-1],
        "recommendations": recommendations,
        "recommendations_note": why,
        "events_stored": device.store.count_events(),
    }


def make_app(device: Device, token: str | None = None):
    """The FastAPI app of the page (``token`` guards every change)."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import HTMLResponse, JSONResponse

    token = token or secrets.token_urlsafe(24)
    app = FastAPI(title="fedpref: your data on this device", docs_url=None, redoc_url=None, openapi_url=None)
    lock = threading.Lock()

    @app.middleware("http")
    async def loopback_only(request: Request, call_next):
        host = (request.headers.get("host") or "").rsplit(":", 1)[0].strip("[]")
        if host not in ("127.0.0.1", "localhost", "::1"):
            return JSONResponse({"detail": "this page answers on 127.0.0.1 only"}, status_code=403)
        return await call_next(request)

    def check(request: Request) -> None:
        if not secrets.compare_digest(request.headers.get("x-fedpref-token", ""), token):
            raise HTTPException(403, "missing or wrong page token: reload the page")

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.replace("__TOKEN__", html.escape(token, quote=True))

    @app.get("/api/status")
    def status() -> dict:
        with lock:
            return _status(device)

    @app.post("/api/consent")
    def consent(change: ConsentChange, request: Request) -> dict:
        check(request)
        try:
            level = Level.parse(change.level)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        with lock:
            device.set_consent(level, change.kinds, source="privacy page")
            return _status(device)

    @app.get("/api/export")
    def export() -> JSONResponse:
        with lock:
            doc = device.export()
        return JSONResponse(doc, headers={"Content-Disposition": 'attachment; filename="fedpref-export.json"'})

    @app.post("/api/forget")
    def forget(request: Request) -> dict:
        check(request)
        with lock:
            device.forget()
            return _status(device)

    return app


def serve(device: Device, *, port: int = 0, token: str | None = None) -> PageHandle:
    """Serve the page on 127.0.0.1 (``port`` 0: a free one) in a background thread."""
    import uvicorn

    if port == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    config = uvicorn.Config(make_app(device, token), host="127.0.0.1", port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="fedpref-privacy-page", daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline and thread.is_alive():
        time.sleep(0.05)
    if not server.started:
        raise RuntimeError(f"the privacy page could not start on 127.0.0.1:{port} (is the port taken?)")
    return PageHandle(f"http://127.0.0.1:{port}/", server, thread)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Your data on this device</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem;color:#222}
h1{font-size:1.5rem} h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
.report{background:#f3f7f3;padding:.8rem 1rem;border-radius:6px}
table{border-collapse:collapse;width:100%;font-size:.85rem} td,th{border-bottom:1px solid #eee;padding:.25rem;text-align:left}
button{padding:.4rem .9rem;margin-right:.5rem} .danger{background:#b00020;color:#fff;border:0;border-radius:4px}
label{display:block;margin:.2rem 0} #message{color:#0a5;min-height:1.2rem}
</style></head>
<body data-token="__TOKEN__">
<h1>Your data on this device</h1>
<p class="report" id="report">Loading...</p>
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
<p><a id="export" href="/api/export" download="fedpref-export.json"><button type="button">Export everything (JSON)</button></a>
<button type="button" class="danger" id="forget">Erase everything</button></p>
<script>
const token = document.body.dataset.token;
function text(el, value){ el.textContent = value; }
function row(cells){ const tr=document.createElement('tr'); for(const c of cells){ const td=document.createElement('td'); td.textContent=c; tr.appendChild(td);} return tr; }
function render(s){
  text(document.getElementById('report'), s.report);
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
async function load(){ const r = await fetch('/api/status'); render(await r.json()); }
async function post(path, body){
  const r = await fetch(path, {method:'POST', headers:{'content-type':'application/json','x-fedpref-token':token}, body: JSON.stringify(body||{})});
  if (!r.ok) { text(document.getElementById('message'), 'Not saved: '+(await r.text())); return false; }
  render(await r.json());
  return true;
}
document.getElementById('consent-form').addEventListener('submit', async ev => {
  ev.preventDefault();
  const level = document.querySelector('input[name=level]:checked').value;
  const boxes = [...document.querySelectorAll('input[name=kind]')];
  const kinds = boxes.every(b => b.checked) ? null : boxes.filter(b => b.checked).map(b => b.value);
  if (await post('/api/consent', {level, kinds})) text(document.getElementById('message'), 'Saved.');
});
document.getElementById('forget').addEventListener('click', async () => {
  if (!confirm('Erase every event, your consent history, the record of what left and your private model from this device?')) return;
  if (await post('/api/forget')) text(document.getElementById('message'), 'Erased.');
});
load();
</script></body></html>
"""
