"""The operator API: every route but the public ones refuses a request without a right key and
shows no operator data to it; with a key (X-API-Key or a bearer token) runs, rounds, privacy
spend and model versions come from the run store; a read-only key reads but never starts or
stops a run; settings refuse missing, short and default keys outside development; /metrics
speaks Prometheus; runs are started, stopped and listed by Flower's own CLI, whose failures
become 4xx/5xx answers carrying its message without local paths; paths in a run config are
refused outside the configured roots."""

import json
import logging
import os
import re
import socket
import stat
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from fedpref.models.config import FederatedConfig
from fedpref.server.api import FlowerControl, FlowerControlError, create_app, toml_value
from fedpref.server.runstore import RunStore
from fedpref.server.settings import DEV_API_KEY, OperatorSettings

ROOT = Path(__file__).resolve().parents[2]
KEY = "operator-key-0123456789-abcdefghij"
OTHER_KEY = "another-operator-key-9876543210-zyx"
READ_KEY = "read-only-key-0123456789-abcdefghijk"
# Strings only the run store holds: no answer to a request without a right key may contain them.
RUN_NAME = "confidential-run-7f3a"
CONFIG_MARK = "confidential-config-value-91c2"
NOTE_MARK = "confidential-note-44d0"
MODEL_SHA = "ab12" * 16
METRIC_MARK = "confidential-metric-3b7e"
MARKERS = (RUN_NAME, CONFIG_MARK, NOTE_MARK, MODEL_SHA, METRIC_MARK)
# Routes that answer without a key, and why: liveness, the API's own description, the
# dashboard's empty shell (its script asks for a key), and the signed public models.
PUBLIC = {"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/", "/dashboard", "/dashboard/app.js", "/dashboard/app.css",
          "/dashboard/favicon.svg"}
PUBLIC_PREFIXES = ("/models",)


def clean_settings(monkeypatch, **values) -> OperatorSettings:
    """Settings from ``values`` only: no FEDPREF_* variables and no .env file leak in."""
    for name in list(os.environ):
        if name.startswith("FEDPREF_"):
            monkeypatch.delenv(name)
    return OperatorSettings(_env_file=None, **values)


def fill(store: RunStore) -> dict:
    """A running DP run with three rounds and two model versions, and a finished run."""
    old = store.start_run(name="older-run", config={}, devices=5, items=10, rounds_planned=1)
    store.record_round(old, 1, metrics={"val-hr": 0.2, METRIC_MARK: 1.0}, participants=5, dropped=0)
    store.finish_run(old, "completed")
    run = store.start_run(name=RUN_NAME, config={"history-dir": CONFIG_MARK, "num-server-rounds": 5}, devices=100, items=300,
                          rounds_planned=5, flower_run_id=4242, dp=True, secure_aggregation=True, delta=1e-5, target_epsilon=4.0)
    for r, (loss, eps) in enumerate([(2.0, 0.5), (1.5, 0.9), (1.2, 1.25)], start=1):
        store.record_round(run, r, metrics={"train-loss": loss}, seconds=r * 2.0, participants=90 + r, dropped=10 - r, epsilon=eps,
                           model_version=f"{RUN_NAME}-r{r:04d}")
    store.record_round(run, 2, metrics={"val-hr": 0.31, "val-ndcg": 0.18})  # evaluation arrives separately
    for r in (1, 2):
        store.record_model(run, version=f"{RUN_NAME}-r{r:04d}", server_round=r, sha256=MODEL_SHA, size=1234 + r, signature="c2ln")
    store.resume_run(old, 1)  # (leaves it running again; finish it once more)
    store.finish_run(old, "completed", note=NOTE_MARK)
    return {"run": run, "old": old}


def fake_flwr(folder: Path, body: str) -> Path:
    """A stand-in for the ``flwr`` CLI (a Python script): records its arguments, FLWR_HOME and
    the first PATH entry in ``calls.jsonl``, then runs ``body`` (Python, with ``args``)."""
    script = folder / "flwr"
    script.write_text(
        f"#!{sys.executable} -IS\n"
        "import json, os, sys, time\n"
        "args = sys.argv[1:]\n"
        f"with open({str(folder / 'calls.jsonl')!r}, 'a') as f:\n"
        "    f.write(json.dumps({'args': args, 'home': os.environ.get('FLWR_HOME'), 'path0': os.environ['PATH'].split(os.pathsep)[0]}) + '\\n')\n"
        + body
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def calls(folder: Path) -> list[dict]:
    path = folder / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


ANSWERS = """
if args[0] == "run":
    print("Warning: some text before the answer")
    print(json.dumps({"success": True, "run-id": "4243", "federation-id": "", "fab-id": "fedpref/fedpref", "fab-version": "0.1.0", "fab-hash": "0123abcd"}))
elif args[0] == "stop":
    print(json.dumps({"success": True, "run-id": args[1]}, indent=2))
elif args[0] == "ls":
    print(json.dumps({"success": True, "runs": [{"run-id": "4242", "federation-id": "", "fab-id": "fedpref/fedpref", "fab-name": "fedpref",
                      "fab-version": "0.1.0", "status": "running", "elapsed": "00:01:02", "network-traffic": {"total-bytes": 10}}]}))
"""


def failure(message: str) -> str:
    return f"print(json.dumps({{'success': False, 'error-message': {message!r}}}, indent=2))\n"


@pytest.fixture()
def ids(store):
    return fill(store)


@pytest.fixture()
def flwr_dir(tmp_path):
    folder = tmp_path / "fake-flwr"
    folder.mkdir()
    fake_flwr(folder, ANSWERS)
    return folder


@pytest.fixture()
def roots(tmp_path):
    """A folder the run config may name (allowed/), one beside it it may not (outside/), and a
    symbolic link from the first into the second."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "link").symlink_to(outside, target_is_directory=True)
    return allowed, outside


@pytest.fixture()
def app(monkeypatch, tmp_path, store, ids, flwr_dir, roots):
    publish = tmp_path / "published"
    publish.mkdir()
    settings = clean_settings(monkeypatch, environment="production", api_keys=f"{KEY},{OTHER_KEY}", read_api_keys=READ_KEY, publish_dir=publish,
                              app_dir=ROOT, flwr_home=tmp_path / "flwr-home", run_config_roots=str(roots[0]), run_store=RUN_STORE)
    control = FlowerControl("fedpref", app_dir=ROOT, flwr_home=tmp_path / "flwr-home", executable=str(flwr_dir / "flwr"), timeout=20)
    return create_app(settings, run_store=store, flower=control)


@pytest.fixture()
def client(app):
    with TestClient(app) as client:
        yield client


AUTH = {"X-API-Key": KEY}
READ = {"X-API-Key": READ_KEY}
RUN_STORE = "postgresql+psycopg://fedpref:secret@db.internal/fedpref"  # the operator's own (FEDPREF_RUN_STORE)


# -- authentication ---------------------------------------------------------------------------

def all_routes(app) -> list:
    """Every route of the app, those of included routers too (FastAPI >= 0.13x keeps included
    routers as branches of ``app.routes``; ``iter_route_contexts`` walks them)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI copies included routes into app.routes
        return list(app.routes)
    return list(iter_route_contexts(app.routes))


def route_requests(app):
    """(method, concrete path, template) for every route of the app, path parameters set to 1."""
    for route in all_routes(app):
        for method in sorted(getattr(route, "methods", None) or ()):
            if method in ("HEAD", "OPTIONS"):
                continue
            yield method, re.sub(r"\{[^}]+\}", "1", route.path), route.path


def is_public(template: str) -> bool:
    return template in PUBLIC or template.startswith(PUBLIC_PREFIXES)


def test_every_route_but_the_public_ones_refuses_requests_without_a_right_key(client, app, flwr_dir):
    requests = list(route_requests(app))
    templates = {template for _, _, template in requests}
    assert {"/api/runs", "/api/runs/{run_id}", "/api/runs/{run_id}/rounds", "/api/runs/{run_id}/privacy", "/api/runs/{run_id}/models",
            "/api/runs/flower/{flower_run_id}/stop", "/api/flower/runs", "/metrics", "/dashboard", "/health", "/models/latest"} <= templates
    wrong = [{}, {"X-API-Key": "not-the-key"}, {"Authorization": "Bearer not-the-key"}, {"Authorization": f"Basic {KEY}"},
             {"X-API-Key": KEY[:-1]}, {"X-API-Key": KEY + "x"}, {"Authorization": f"Bearer {KEY[:-1]}"}, {"X-API-Key": ""}]
    protected = 0
    for method, path, template in requests:
        for headers in wrong:
            response = client.request(method, path, headers=headers, json={} if method == "POST" else None, follow_redirects=False)
            for marker in MARKERS:
                assert marker not in response.text, f"{method} {path} with {headers} answered operator data ({marker})"
            if is_public(template):
                assert response.status_code < 500, f"public {method} {path}: {response.status_code}"
            else:
                assert response.status_code == 401, f"{method} {path} with {headers}: {response.status_code} {response.text[:200]}"
                assert response.headers["www-authenticate"].startswith("Bearer"), f"{method} {path}: no WWW-Authenticate"
                assert "X-API-Key" in response.json()["detail"]
        protected += not is_public(template)
    assert protected >= 8
    assert calls(flwr_dir) == [], "a request without a right key reached the flwr CLI"


def test_the_openapi_spec_declares_both_credentials_on_every_operator_route(client):
    spec = client.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["ApiKey"] == {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": schemes["ApiKey"]["description"]}
    assert schemes["BearerToken"]["scheme"] == "bearer"
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if is_public(path):
                assert "security" not in operation, f"{method.upper()} {path} is public but declares security"
            else:
                assert operation["security"] == [{"ApiKey": []}, {"BearerToken": []}], f"{method.upper()} {path}"
                assert "401" in operation["responses"]
    assert spec["info"]["title"] == "fedpref operator API" and spec["info"]["version"]


def test_a_right_key_works_in_either_header_and_every_configured_key_works(client):
    for headers in ({"X-API-Key": KEY}, {"Authorization": f"Bearer {KEY}"}, {"authorization": f"bearer {OTHER_KEY}"},
                    {"X-API-Key": "wrong", "Authorization": f"Bearer {KEY}"}):
        response = client.get("/api/runs", headers=headers)
        assert response.status_code == 200, headers
    assert client.get("/health").json() == {"status": "ok"}


def test_a_read_only_key_reads_everything_and_can_neither_start_nor_stop_a_run(client, app, ids, flwr_dir):
    for path in ("/api/runs", f"/api/runs/{ids['run']}", f"/api/runs/{ids['run']}/rounds", f"/api/runs/{ids['run']}/privacy",
                 f"/api/runs/{ids['run']}/models"):
        assert client.get(path, headers=READ).status_code == 200, path
    assert client.get("/metrics", headers={"Authorization": f"Bearer {READ_KEY}"}).status_code == 200  # what a Prometheus scrape sends
    writes = [(method, path) for method, path, template in route_requests(app) if method not in ("GET", "HEAD") and not is_public(template)]
    assert ("POST", "/api/runs") in writes and ("POST", "/api/runs/flower/1/stop") in writes
    for method, path in writes:
        for headers in (READ, {"Authorization": f"Bearer {READ_KEY}"}):
            response = client.request(method, path, headers=headers, json={"run_config": {"run-name": "hijack"}})
            assert response.status_code == 403, (method, path, response.status_code, response.text[:200])
            assert "read-only" in response.json()["detail"] and "FEDPREF_API_KEYS" in response.json()["detail"]
    assert calls(flwr_dir) == [], "a read-only key reached the flwr CLI"
    assert client.post("/api/runs/flower/4242/stop", headers=AUTH).status_code == 200  # the operator key still may


def test_the_dashboard_page_is_an_empty_shell(client):
    page = client.get("/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"] and page.headers["x-frame-options"] == "DENY"
    assert 'id="api-key"' in page.text and "<script src=\"/dashboard/app.js\"></script>" in page.text
    script = client.get("/dashboard/app.js").text
    assert "X-API-Key" in script and "sessionStorage" in script and "innerHTML" not in script
    assert "http://" not in script.replace("http://www.w3.org/2000/svg", "") and "https://" not in page.text + script  # nothing from elsewhere


# -- content --------------------------------------------------------------------------------------

def test_runs_rounds_privacy_and_models_come_from_the_run_store(client, ids):
    runs = client.get("/api/runs", headers=AUTH).json()
    assert [r["name"] for r in runs] == [RUN_NAME, "older-run"]  # newest first
    run = runs[0]
    assert run["id"] == ids["run"] and run["status"] == "running" and run["flower_run_id"] == "4242"
    assert (run["devices"], run["items"], run["rounds_planned"], run["rounds_done"]) == (100, 300, 5, 3)
    assert run["secure_aggregation"] is True
    assert run["privacy"] == {"dp": True, "epsilon": 1.25, "delta": 1e-5, "target_epsilon": 4.0, "budget_left": 2.75, "budget_used": 0.3125}
    assert run["started_at"].endswith("Z")
    older = runs[1]
    assert older["status"] == "completed" and older["note"] == NOTE_MARK and older["resumed_from_round"] == 1
    assert older["privacy"] == {"dp": False, "epsilon": None, "delta": None, "target_epsilon": None, "budget_left": None, "budget_used": None}

    detail = client.get(f"/api/runs/{ids['run']}", headers=AUTH).json()
    assert detail["config"] == {"history-dir": CONFIG_MARK, "num-server-rounds": 5}
    assert detail["latest_model_version"] == f"{RUN_NAME}-r0002" and detail["privacy"]["budget_left"] == 2.75

    rounds = client.get(f"/api/runs/{ids['run']}/rounds", headers=AUTH).json()
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert [r["participants"] for r in rounds] == [91, 92, 93] and [r["dropped"] for r in rounds] == [9, 8, 7]
    assert [r["epsilon"] for r in rounds] == [0.5, 0.9, 1.25]
    assert rounds[1]["metrics"] == {"train-loss": 1.5, "val-hr": 0.31, "val-ndcg": 0.18}
    assert rounds[2]["seconds"] == 6.0 and rounds[0]["model_version"] == f"{RUN_NAME}-r0001"

    privacy = client.get(f"/api/runs/{ids['run']}/privacy", headers=AUTH).json()
    assert privacy["run_id"] == ids["run"] and privacy["epsilon"] == 1.25 and privacy["delta"] == 1e-5
    assert privacy["target_epsilon"] == 4.0 and privacy["budget_left"] == 2.75
    assert privacy["rounds"] == [{"round": 1, "epsilon": 0.5}, {"round": 2, "epsilon": 0.9}, {"round": 3, "epsilon": 1.25}]

    models = client.get(f"/api/runs/{ids['run']}/models", headers=AUTH).json()
    assert [(m["version"], m["round"], m["size"], m["sha256"]) for m in models] == [
        (f"{RUN_NAME}-r0001", 1, 1235, MODEL_SHA), (f"{RUN_NAME}-r0002", 2, 1236, MODEL_SHA)]
    assert models[0]["url"] == f"/models/{RUN_NAME}-r0001" and models[0]["signature"] == "c2ln"
    assert client.get(f"/api/runs/{ids['old']}/models", headers=AUTH).json() == []


def test_unknown_runs_are_404_and_bad_ids_422(client):
    for path in ("/api/runs/999", "/api/runs/999/rounds", "/api/runs/999/privacy", "/api/runs/999/models"):
        response = client.get(path, headers=AUTH)
        assert response.status_code == 404, path
        assert response.json()["detail"] == "no run 999 in the run store: GET /api/runs lists the runs"
    for path in ("/api/runs/0", "/api/runs/-3", "/api/runs/abc/rounds", f"/api/runs/{2**63}", "/api/runs/flower/-1/stop"):
        method = "POST" if path.endswith("stop") else "GET"
        assert client.request(method, path, headers=AUTH).status_code == 422, path


def test_a_run_store_that_cannot_be_read_is_a_503_not_a_crash(tmp_path, monkeypatch):
    settings = clean_settings(monkeypatch, api_keys=KEY)
    store = RunStore(str(tmp_path / "runs.sqlite"))
    with TestClient(create_app(settings, run_store=store, flower=FlowerControl(app_dir=ROOT))) as client:
        store.engine.dispose()
        (tmp_path / "runs.sqlite").unlink()
        (tmp_path / "runs.sqlite").mkdir()  # a folder where the database was: every query fails
        response = client.get("/api/runs", headers=AUTH)
        assert response.status_code == 503 and "FEDPREF_RUN_STORE" in response.json()["detail"]
        metrics = client.get("/metrics", headers=AUTH)
        assert metrics.status_code == 200 and "fedpref_run_store_up 0.0" in metrics.text


# -- settings ---------------------------------------------------------------------------------

def test_settings_refuse_missing_default_and_short_keys_outside_development(monkeypatch):
    with pytest.raises(ValidationError, match="FEDPREF_API_KEYS is empty"):
        clean_settings(monkeypatch, environment="production")
    with pytest.raises(ValidationError, match="development key"):
        clean_settings(monkeypatch, environment="production", api_keys=[KEY, DEV_API_KEY])
    with pytest.raises(ValidationError, match="key number 2 is shorter than 24 characters"):
        clean_settings(monkeypatch, environment="production", api_keys=f"{KEY},short-key")
    with pytest.raises(ValidationError, match="FEDPREF_READ_API_KEYS: key number 1 is shorter"):
        clean_settings(monkeypatch, environment="production", api_keys=KEY, read_api_keys="short-key")
    with pytest.raises(ValidationError, match="FEDPREF_READ_API_KEYS contains the development key"):
        clean_settings(monkeypatch, environment="production", api_keys=KEY, read_api_keys=DEV_API_KEY)
    with pytest.raises(ValidationError, match="in both FEDPREF_API_KEYS and FEDPREF_READ_API_KEYS"):
        clean_settings(monkeypatch, environment="production", api_keys=KEY, read_api_keys=KEY)
    with pytest.raises(ValidationError, match="environment"):
        clean_settings(monkeypatch, environment="staging", api_keys=KEY)
    with pytest.raises(ValidationError, match="FEDPREF_APP_DIR"):
        clean_settings(monkeypatch, api_keys=KEY, app_dir="/nonexistent/app")


def test_settings_come_from_fedpref_variables(monkeypatch, tmp_path):
    clean_settings(monkeypatch)  # (clears FEDPREF_*)
    monkeypatch.setenv("FEDPREF_ENVIRONMENT", "production")
    monkeypatch.setenv("FEDPREF_API_KEYS", f" {KEY} , {OTHER_KEY},")
    monkeypatch.setenv("FEDPREF_RUN_STORE", "postgresql+psycopg://fedpref@db/fedpref")
    monkeypatch.setenv("FEDPREF_SUPERLINK_CONNECTION", "prod")
    monkeypatch.setenv("FEDPREF_FLWR_HOME", str(tmp_path))
    monkeypatch.setenv("FEDPREF_PORT", "9000")
    monkeypatch.setenv("FEDPREF_READ_API_KEYS", READ_KEY)
    monkeypatch.setenv("FEDPREF_RUN_CONFIG_ROOTS", f"{tmp_path},{ROOT}")
    monkeypatch.setenv("FEDPREF_MAX_BODY_BYTES", "100000")
    settings = OperatorSettings(_env_file=None)
    assert settings.read_key_values() == [READ_KEY.encode()] and READ_KEY not in repr(settings)
    assert settings.run_config_roots == [tmp_path.resolve(), ROOT] and settings.max_body_bytes == 100000
    assert settings.environment == "production" and settings.key_values() == [KEY.encode(), OTHER_KEY.encode()]
    assert KEY not in repr(settings)  # keys are secrets: never in a log line
    assert (settings.run_store, settings.superlink_connection, settings.flwr_home, settings.port) == (
        "postgresql+psycopg://fedpref@db/fedpref", "prod", tmp_path, 9000)
    assert settings.app_dir == ROOT  # a checkout is the Flower app
    monkeypatch.setenv("FEDPREF_API_KEYS", json.dumps([KEY]))
    assert OperatorSettings(_env_file=None).key_values() == [KEY.encode()]
    env_file = tmp_path / ".env"
    env_file.write_text(f"FEDPREF_API_KEYS={OTHER_KEY}\n")
    monkeypatch.delenv("FEDPREF_API_KEYS")
    assert OperatorSettings(_env_file=env_file).key_values() == [OTHER_KEY.encode()]


def test_development_without_keys_uses_the_development_key_and_says_so(monkeypatch, caplog, tmp_path):
    with caplog.at_level(logging.WARNING, logger="fedpref.server.settings"):
        settings = clean_settings(monkeypatch)
    assert settings.environment == "development" and settings.key_values() == [DEV_API_KEY.encode()]
    assert "development key" in caplog.text
    with TestClient(create_app(settings, run_store=RunStore(str(tmp_path / "dev.sqlite")), flower=FlowerControl(app_dir=ROOT))) as client:
        assert client.get("/api/runs", headers={"X-API-Key": DEV_API_KEY}).status_code == 200


# -- Prometheus ---------------------------------------------------------------------------------

def test_metrics_count_requests_per_route_and_gauge_the_runs(client, ids):
    client.get("/api/runs", headers=AUTH)
    client.get(f"/api/runs/{ids['run']}/rounds", headers=AUTH)
    client.get("/api/runs/12345", headers=AUTH)
    client.get("/api/runs")
    assert client.get("/metrics").status_code == 401
    response = client.get("/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'fedpref_api_requests_total{method="GET",route="/api/runs",status="200"} 1.0' in text
    assert 'fedpref_api_requests_total{method="GET",route="/api/runs",status="401"} 1.0' in text
    assert 'fedpref_api_requests_total{method="GET",route="/api/runs/{run_id}",status="404"} 1.0' in text  # the template, not the id
    assert 'fedpref_api_requests_total{method="GET",route="/api/runs/{run_id}/rounds",status="200"} 1.0' in text
    assert 'fedpref_api_request_duration_seconds_bucket{le="0.005",method="GET",route="/api/runs"}' in text
    assert 'fedpref_runs{status="running"} 1.0' in text and 'fedpref_runs{status="completed"} 1.0' in text
    assert f'fedpref_run_epsilon{{name="{RUN_NAME}",run_id="{ids["run"]}"}} 1.25' in text
    assert f'fedpref_run_rounds_done{{name="{RUN_NAME}",run_id="{ids["run"]}"}} 3.0' in text


# -- Flower's control interface ------------------------------------------------------------------

def test_starting_stopping_and_listing_runs_call_the_flwr_cli(client, store, ids, flwr_dir, tmp_path):
    started = client.post("/api/runs", headers=AUTH, json={"run_config": {"num-server-rounds": 3, "run-name": "nightly", "dp-delta": 1e-5, "secagg": True}})
    assert started.status_code == 202, started.text
    assert started.json() == {"flower_run_id": "4243", "federation": None, "fab_id": "fedpref/fedpref", "fab_version": "0.1.0",
                              "fab_hash": "0123abcd", "note": None}
    assert client.post("/api/runs", headers=AUTH).status_code == 202  # no body: the app's defaults

    stopped = client.post("/api/runs/flower/4242/stop", headers=AUTH)
    assert stopped.status_code == 200, stopped.text
    assert stopped.json() == {"flower_run_id": "4242", "stopped": True, "store_runs_marked_stopped": [ids["run"]]}
    assert store.run(ids["run"])["status"] == "stopped" and store.run(ids["run"])["note"] == "stopped through the operator API"

    listed = client.get("/api/flower/runs", headers=AUTH)
    assert listed.status_code == 200
    assert listed.json()[0]["flower_run_id"] == "4242" and listed.json()[0]["status"] == "running" and listed.json()[0]["elapsed"] == "00:01:02"

    made = calls(flwr_dir)
    first = made[0]["args"]
    assert first[:5] == ["run", str(ROOT), "fedpref", "--format", "json"]
    assert first[5::2] == ["--run-config"] * 4
    assert sorted(first[6::2]) == ["dp-delta=1e-05", "num-server-rounds=3", 'run-name="nightly"', "secagg=true"]
    assert [c["args"] for c in made[1:]] == [
        ["run", str(ROOT), "fedpref", "--format", "json"],
        ["stop", "4242", "fedpref", "--format", "json"],
        ["ls", "fedpref", "--format", "json"],
    ]
    assert {c["home"] for c in made} == {str(tmp_path / "flwr-home")}
    assert {c["path0"] for c in made} == {str(Path(sys.executable).parent)}  # the flwr beside this Python comes first


def test_a_bad_run_config_is_422_and_never_reaches_flower(client, flwr_dir):
    for run_config, loc, complaint in (({"no-such-key": 1}, "no-such-key", "Extra inputs are not permitted"),
                                       ({"num-server-rounds": "3"}, "num-server-rounds", "valid integer"),
                                       ({"num-server-rounds": 2**70}, "num-server-rounds", "less than or equal to 9007199254740991"),
                                       ({"secagg": 1}, "secagg", "valid boolean"),
                                       ({"lr": [1]}, "lr", "valid number"),
                                       ({"bad key": 1}, "bad key", "Extra inputs")):
        response = client.post("/api/runs", headers=AUTH, json={"run_config": run_config})
        assert response.status_code == 422, run_config
        errors = response.json()["detail"]
        assert any(e["loc"][:3] == ["body", "run_config", loc] and complaint in e["msg"] for e in errors), errors
    assert client.post("/api/runs", headers=AUTH, json={"other": 1}).status_code == 422
    assert calls(flwr_dir) == []
    spec = client.get("/openapi.json").json()["components"]["schemas"]["RunConfig"]  # the spec says which keys and types
    assert spec["additionalProperties"] is False and spec["properties"]["num-server-rounds"]["type"] == "integer"


@pytest.mark.parametrize("app_dir", [ROOT, None], ids=["declared config", "any config"])
def test_bodies_json_cannot_echo_are_422_not_500(monkeypatch, store, flwr_dir, app_dir):
    """Python's JSON parser reads NaN, Infinity and 1e400; the 422 that echoes them must still be JSON."""
    settings = clean_settings(monkeypatch, api_keys=KEY)
    control = FlowerControl(app_dir=app_dir, executable=str(flwr_dir / "flwr"))
    with TestClient(create_app(settings, run_store=store, flower=control), raise_server_exceptions=False) as client:
        for body in ('{"run_config": {"lr": NaN}}', '{"run_config": {"lr": -Infinity}}', '{"run_config": {"lr": 1e400}}', "[NaN]", "NaN",
                     '{"run_config": ', b'{"run_config": {"run-name": "\xff"}}', r'{"run_config": {"run-name": "\ud800"}}'):
            response = client.post("/api/runs", headers={**AUTH, "content-type": "application/json"}, content=body)
            assert response.status_code in (400, 422), (body, response.status_code, response.text[:200])  # 400: not UTF-8
            assert response.json()["detail"]
    assert calls(flwr_dir) == []


def test_flower_control_checks_a_run_config_against_the_apps_declared_config(flwr_dir):
    control = FlowerControl(app_dir=ROOT, executable=str(flwr_dir / "flwr"))
    assert control.check_run_config({"num-server-rounds": 3, "lr": 1, "run-name": "x", "secagg": True}) == []
    problems = dict(control.check_run_config({"no-such-key": 1, "num-server-rounds": "3", "dim": 2**64, "secagg": 1, "bad key": 1}))
    assert "declares no run-config key 'no-such-key'" in problems["no-such-key"]
    assert problems["num-server-rounds"] == "'num-server-rounds' takes a int (its default is 50), not a str"
    assert "64-bit" in problems["dim"] and "takes a bool" in problems["secagg"] and "a run-config key is" in problems["bad key"]
    with pytest.raises(FlowerControlError) as refused:
        control.start({"no-such-key": 1})
    assert refused.value.status_code == 422 and calls(flwr_dir) == []
    assert "lr=1.0" in control.start_command({"lr": 1})  # an int for a float setting is sent as a float


def test_run_config_values_survive_flowers_own_parser():
    from flwr.common.config import parse_config_args

    values = {
        "run-name": 'a "double" and \'single\' quote, a \\ backslash\nnewline\ttab = sign # hash',
        "history-dir": "/data/épsilon ε 🙂 spaced path.toml",
        "results-dir": "",
        "num-server-rounds": -7,
        "lr": 0.1, "l2": 1e-300, "server-lr": 3.0, "secagg": False,
        "dim": 2**63 - 1,
    }
    command = FlowerControl(app_dir=ROOT, executable="sh").start_command(values)
    overrides = [command[i + 1] for i, arg in enumerate(command) if arg == "--run-config"]
    assert len(overrides) == len(values)
    parsed = {}
    for argument in overrides:
        parsed.update(parse_config_args([argument]))
    assert parsed == values
    for bad in (float("nan"), float("inf"), 2**64, "\ud800", None):
        with pytest.raises(ValueError):
            toml_value(bad)


# -- paths in a run config -----------------------------------------------------------------------

def test_the_guard_knows_every_path_valued_run_config_key():
    from fedpref.models.config import RUN_CONFIG_DEFAULTS
    from fedpref.server.api import PATH_KEYS

    looks_like_a_path = {key for key in RUN_CONFIG_DEFAULTS if key.endswith(("-dir", "-key", "-store", "-file", "-path", "-url", "-folder"))}
    assert looks_like_a_path <= set(PATH_KEYS), f"path-valued keys the API does not check: {sorted(looks_like_a_path - set(PATH_KEYS))}"
    assert set(PATH_KEYS) <= set(RUN_CONFIG_DEFAULTS)


PATH_VALUED = ("history-dir", "store-dir", "results-dir", "checkpoint-dir", "publish-dir", "publish-key", "run-store")


def test_paths_outside_the_roots_are_refused_and_never_reach_flower(client, flwr_dir, roots):
    allowed, outside = roots
    escapes = [
        "/etc",  # anywhere
        str(outside / "x"),  # beside the root
        f"{allowed}/../outside/x",  # up and out
        f"{allowed}/link/x",  # through a symbolic link
        str(allowed.parent),  # the root's parent
        "allowed/results",  # relative: to whichever folder the ServerApp runs in
        f"{allowed}\x00/x",
    ]
    for key in PATH_VALUED:
        for value in escapes:
            response = client.post("/api/runs", headers=AUTH, json={"run_config": {key: value}})
            assert response.status_code == 403, (key, value, response.status_code, response.text[:300])
            assert response.json()["detail"].startswith(f"{key}: ") and "FEDPREF_RUN_CONFIG_ROOTS" in response.json()["detail"]
            assert str(outside) not in response.json()["detail"].replace(value, ""), "the answer names where a link points"
    for url in ("postgresql+psycopg://attacker@203.0.113.7/loot", f"sqlite:///{outside}/runs.sqlite", f"sqlite:///{allowed}/link/runs.sqlite",
                f"sqlite:///{allowed}/../outside/runs.sqlite", f"sqlite:///{allowed}/runs.sqlite?uri=true", "sqlite://", "sqlite:///relative.sqlite",
                RUN_STORE.replace("db.internal", "db.attacker.example")):
        response = client.post("/api/runs", headers=AUTH, json={"run_config": {"run-store": url}})
        assert response.status_code == 403, (url, response.status_code, response.text[:300])
        assert "secret" not in response.text.replace(url, ""), "the answer shows the server's own run-store URL"
    response = client.post("/api/runs", headers=AUTH, json={"run_config": {"results-dir": "/etc", "publish-key": str(outside / "k.pem")}})
    assert response.status_code == 403 and response.json()["detail"].count("FEDPREF_RUN_CONFIG_ROOTS") == 2  # every refused key is named
    assert calls(flwr_dir) == [], "a refused path reached the flwr CLI"


def test_a_run_started_through_the_api_cannot_ask_for_noise_computable_from_its_seed(client, flwr_dir):
    response = client.post("/api/runs", headers=AUTH, json={"run_config": {"reproducible-noise": True, "dp-noise-multiplier": 1.0}})
    assert response.status_code == 403, response.text
    assert response.json()["detail"].startswith("reproducible-noise: ") and "simulations" in response.json()["detail"]
    assert calls(flwr_dir) == [], "a run with noise computable from its seed reached the flwr CLI"
    response = client.post("/api/runs", headers=AUTH, json={"run_config": {"reproducible-noise": False, "dp-noise-multiplier": 1.0}})
    assert response.status_code == 202, response.text


@pytest.mark.parametrize("value", ["true", "YES", "1", 1])
def test_reproducible_noise_is_refused_in_every_spelling_the_server_app_reads_as_on(monkeypatch, store, tmp_path, value):
    # An app folder whose pyproject declares no run config: the API cannot check types, so the
    # ServerApp's own reading of a value decides ("yes" is on for FederatedConfig).
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "pyproject.toml").write_text('[project]\nname = "bare"\n')
    assert FederatedConfig.from_run_config({"reproducible-noise": value}).reproducible_noise is True
    flwr = tmp_path / "fake-flwr"
    flwr.mkdir()
    fake_flwr(flwr, ANSWERS)
    settings = clean_settings(monkeypatch, environment="production", api_keys=KEY, app_dir=app_dir, flwr_home=tmp_path / "flwr-home")
    control = FlowerControl("fedpref", app_dir=app_dir, flwr_home=tmp_path / "flwr-home", executable=str(flwr / "flwr"), timeout=20)
    with TestClient(create_app(settings, run_store=store, flower=control)) as bare:
        response = bare.post("/api/runs", headers=AUTH, json={"run_config": {"reproducible-noise": value}})
    assert response.status_code == 403, response.text
    assert calls(flwr) == []


def test_paths_inside_the_roots_go_to_flower_resolved(client, flwr_dir, roots):
    allowed, _ = roots
    real = allowed.resolve()
    config = {"history-dir": f"{allowed}/population", "results-dir": f"{allowed}/sub/../results", "publish-dir": str(allowed),
              "publish-key": f"{allowed}/keys/signing.key", "store-dir": "", "checkpoint-dir": "none", "run-store": f"sqlite:///{allowed}/runs.sqlite"}
    response = client.post("/api/runs", headers=AUTH, json={"run_config": config})
    assert response.status_code == 202, response.text
    response = client.post("/api/runs", headers=AUTH, json={"run_config": {"run-store": RUN_STORE}})  # the server's own store, as configured
    assert response.status_code == 202, response.text
    first, second = (dict(arg.split("=", 1) for arg in call["args"][6::2]) for call in calls(flwr_dir))
    assert first == {"history-dir": f'"{real / "population"}"', "results-dir": f'"{real / "results"}"', "publish-dir": f'"{real}"',
                     "publish-key": f'"{real / "keys" / "signing.key"}"', "store-dir": '""', "checkpoint-dir": '"none"',
                     "run-store": f'"sqlite:///{real / "runs.sqlite"}"'}
    assert second == {"run-store": f'"{RUN_STORE}"'}


def test_without_roots_every_path_is_refused_and_the_servers_defaults_apply(monkeypatch, store, flwr_dir, tmp_path):
    settings = clean_settings(monkeypatch, api_keys=KEY, app_dir=ROOT)
    control = FlowerControl(app_dir=ROOT, executable=str(flwr_dir / "flwr"))
    with TestClient(create_app(settings, run_store=store, flower=control)) as client:
        for key in PATH_VALUED:
            response = client.post("/api/runs", headers=AUTH, json={"run_config": {key: str(tmp_path / "anything")}})
            assert response.status_code == 403 and "FEDPREF_RUN_CONFIG_ROOTS is not set" in response.json()["detail"], (key, response.text)
        assert calls(flwr_dir) == []
        assert client.post("/api/runs", headers=AUTH, json={"run_config": {"results-dir": "", "checkpoint-dir": "none", "run-name": "x"}}).status_code == 202


def test_settings_refuse_roots_that_are_not_folders(monkeypatch, tmp_path):
    with pytest.raises(ValidationError, match="not an absolute path"):
        clean_settings(monkeypatch, api_keys=KEY, run_config_roots="srv/fedpref")
    with pytest.raises(ValidationError, match="is not a folder"):
        clean_settings(monkeypatch, api_keys=KEY, run_config_roots=str(tmp_path / "missing"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert clean_settings(monkeypatch, api_keys=KEY, run_config_roots=f"{tmp_path / 'b'}").run_config_roots == [(tmp_path / "a").resolve()]


# -- error answers --------------------------------------------------------------------------------

SECRET_PATHS = ("/root/.flwr/config.toml", "/opt/fedpref-secret/site-packages/flwr/cli/run.py", "/opt/fedpref-secret")


@pytest.mark.parametrize("body", [
    failure("Using SuperLink: fedpref\n\nAn unexpected error occurred while reading the Flower configuration file (/root/.flwr/config.toml). "
            "SuperLink connection 'fedpref' not found"),
    "print('Traceback (most recent call last):\\n  File \"/opt/fedpref-secret/site-packages/flwr/cli/run.py\", line 1', file=sys.stderr); sys.exit(1)\n",
    failure("\n[code: 9] No permissions to read /opt/fedpref-secret/site-packages/flwr/cli/run.py"),
], ids=["config file", "traceback", "SuperLink message"])
def test_error_answers_name_no_local_paths_and_the_log_keeps_them(monkeypatch, tmp_path, store, caplog, body):
    control = flower_failing_with(tmp_path, body)
    settings = clean_settings(monkeypatch, api_keys=KEY)
    with caplog.at_level(logging.WARNING, logger="fedpref.server.api"), TestClient(create_app(settings, run_store=store, flower=control)) as client:
        answers = [client.post("/api/runs/flower/7/stop", headers=AUTH), client.get("/api/flower/runs", headers=AUTH)]
    for response in answers:
        assert response.status_code in (502, 503), response.text
        assert not [p for p in SECRET_PATHS + (str(tmp_path),) if p in response.text], response.text
        assert response.json()["detail"].startswith(("flwr stop", "flwr ls"))
    assert any(p in caplog.text for p in SECRET_PATHS), "the server's log lost the details"


def test_a_missing_flwr_is_named_without_its_folder(monkeypatch, store, tmp_path):
    missing = FlowerControl(executable=str(tmp_path / "secret-folder" / "flwr"), app_dir=ROOT)
    settings = clean_settings(monkeypatch, api_keys=KEY)
    with TestClient(create_app(settings, run_store=store, flower=missing)) as client:
        response = client.get("/api/flower/runs", headers=AUTH)
    assert response.status_code == 503 and "'flwr' is not on PATH" in response.json()["detail"]
    assert "secret-folder" not in response.text and str(tmp_path) not in response.text


def flower_failing_with(flwr_dir: Path, body: str, timeout: float = 20) -> FlowerControl:
    script = fake_flwr(flwr_dir, body)
    return FlowerControl("fedpref", app_dir=ROOT, executable=str(script), timeout=timeout, run_timeout=timeout)


@pytest.mark.parametrize("body, status, message", [
    (failure("Using SuperLink: fedpref (10.0.0.1:9093)\n Stopping run ID 7...\n\nConnection to the SuperLink is unavailable. Please check your network connection."),
     503, "flwr stop: Connection to the SuperLink is unavailable. Please check your network connection."),
    (failure("Using SuperLink: fedpref\n\n[code: 16] Run ID not found."), 404, "flwr stop: [code: 16] Run ID not found."),
    (failure("\n[code: 18] Cannot stop run 7; run is already finished."), 409, "already finished"),
    (failure("\n[code: 9] No permissions."), 502, "[code: 9] No permissions."),
    (failure("\nAn unexpected error occurred while reading the Flower configuration file (/x/config.toml). SuperLink connection 'fedpref' not found"),
     503, "reading the Flower configuration file"),
    ("print('Traceback (most recent call last): boom', file=sys.stderr); sys.exit(1)\n", 502,
     "flwr stop answered no JSON (exit status 1): its output is in the operator API's log"),
    ("time.sleep(10)\n", 504, "flwr stop did not answer within 0.5 s"),
])
def test_a_failing_flwr_cli_becomes_an_error_answer_with_its_message(monkeypatch, tmp_path, store, body, status, message):
    control = flower_failing_with(tmp_path, body, timeout=0.5 if "sleep" in body else 20)
    with pytest.raises(FlowerControlError) as failed:
        control.stop(7)
    assert failed.value.status_code == status and message in failed.value.message
    settings = clean_settings(monkeypatch, api_keys=KEY)
    with TestClient(create_app(settings, run_store=store, flower=control)) as client:
        response = client.post("/api/runs/flower/7/stop", headers=AUTH)
    assert response.status_code == status and message in response.json()["detail"]


def test_the_real_flwr_cli_reports_an_unreachable_superlink_as_503(monkeypatch, tmp_path, store):
    home = tmp_path / "flwr-home"
    home.mkdir()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (home / "config.toml").write_text(f'[superlink]\ndefault = "fedpref"\n\n[superlink.fedpref]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    settings = clean_settings(monkeypatch, api_keys=KEY, flwr_home=home, superlink_connection="fedpref")
    with TestClient(create_app(settings, run_store=store)) as client:
        response = client.get("/api/flower/runs", headers=AUTH)
    assert response.status_code == 503, response.text
    assert "Connection to the SuperLink is unavailable" in response.json()["detail"]


def test_a_missing_flwr_or_app_folder_is_a_503_that_says_what_to_install_or_set(monkeypatch, store):
    missing = FlowerControl(executable="flwr-not-installed-here", app_dir=ROOT)
    settings = clean_settings(monkeypatch, api_keys=KEY)
    with TestClient(create_app(settings, run_store=store, flower=missing)) as client:
        response = client.get("/api/flower/runs", headers=AUTH)
        assert response.status_code == 503 and "install flwr" in response.json()["detail"]
    without_app = FlowerControl(app_dir=None)
    with TestClient(create_app(settings, run_store=store, flower=without_app)) as client:
        response = client.post("/api/runs", headers=AUTH, json={})
        assert response.status_code == 503 and "FEDPREF_APP_DIR" in response.json()["detail"]
