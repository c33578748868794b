"""The operator API fuzzed by schemathesis from its own OpenAPI document: with a right key, no
generated request (valid or not) gets a 5xx, every answer matches the documented status codes,
content types and schemas, and schemathesis' own probes find no operation that ignores its
credentials.

The run store holds a small run; Flower's CLI is a stand-in that always succeeds (a
real SuperLink answers 503 when it is down, which is a correct answer but not the point here).
Deterministic (derandomize) and bounded (max_examples per operation)."""

import atexit
import shutil
import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from fedpref.server.api import FlowerControl, create_app
from fedpref.server.runstore import RunStore
from fedpref.server.settings import OperatorSettings

KEY = "fuzzing-operator-key-0123456789abcdef"


class FakeFlowerCli(FlowerControl):
    """FlowerControl with the command lines built for real but answered in process, the way
    ``flwr --format json`` answers when the SuperLink accepts (a subprocess per generated
    request would make the fuzzing slow)."""

    def _call(self, command: list[str], timeout: float) -> dict:
        assert command[0] == "flwr" and command[command.index("--format") + 1] == "json", command
        if command[1] == "run":
            return {"success": True, "run-id": "4243", "federation-id": "", "fab-id": "fedpref/fedpref", "fab-version": "0.1.0", "fab-hash": "0123abcd"}
        if command[1] == "stop":
            return {"success": True, "run-id": command[2]}
        return {"success": True, "runs": [{"run-id": "4242", "status": "running", "fab-id": "fedpref/fedpref", "fab-version": "0.1.0", "federation-id": ""}]}

    def resolve_executable(self) -> str:
        return "flwr"


def build() -> tuple:
    """The app over a small run store and the stand-in CLI, in a temporary folder. Built at
    import: schemathesis reads the spec when pytest collects the tests. (Its lazy
    ``from_fixture`` loader does not run under pytest 9.)"""
    folder = Path(tempfile.mkdtemp(prefix="fedpref-operator-fuzz-"))
    atexit.register(shutil.rmtree, folder, True)  # also when these tests are collected but not run
    store = RunStore(str(folder / "runs.sqlite"))
    run = store.start_run(name="fuzzed-run", config={"num-server-rounds": 3}, devices=20, items=50, rounds_planned=3, flower_run_id=1,
                          dp=True, delta=1e-5, target_epsilon=3.0)
    for r in (1, 2):
        store.record_round(run, r, metrics={"train-loss": 1.0 / r, "val-hr": 0.1 * r}, participants=18, dropped=2, epsilon=0.7 * r)
    store.record_model(run, version="fuzzed-run-r0001", server_round=1, sha256="0" * 64, size=10)
    published = folder / "published"
    published.mkdir()
    operator_settings = OperatorSettings(_env_file=None, environment="production", api_keys=[KEY], publish_dir=published,
                                         run_store=str(folder / "runs.sqlite"))
    control = FakeFlowerCli("fedpref", app_dir=operator_settings.app_dir)
    app = create_app(operator_settings, run_store=store, flower=control)
    return schemathesis.openapi.from_asgi("/openapi.json", app), store, folder


schema, STORE, _FOLDER = build()


@pytest.fixture(scope="module", autouse=True)
def close_the_store():
    yield
    STORE.close()


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)
def test_the_api_answers_every_generated_request_without_a_server_error(case):
    # Every default check: not_a_server_error (no 5xx), status codes, content types and bodies as
    # documented, negative data rejected, positive data accepted, ignored_auth (probes without
    # and with a wrong key must be refused), Allow on 405, ...
    case.call_and_validate(headers={"X-API-Key": KEY})


def test_the_fuzzed_spec_covers_every_operator_route():
    operations = {(op.method.upper(), op.path) for op in (result.ok() for result in schema.get_all_operations())}
    assert {("GET", "/api/runs"), ("POST", "/api/runs"), ("GET", "/api/runs/{run_id}"), ("GET", "/api/runs/{run_id}/rounds"),
            ("GET", "/api/runs/{run_id}/privacy"), ("GET", "/api/runs/{run_id}/models"), ("POST", "/api/runs/flower/{flower_run_id}/stop"),
            ("GET", "/api/flower/runs"), ("GET", "/metrics"), ("GET", "/health"), ("GET", "/dashboard")} <= operations
    assert set(schema.raw_schema["components"]["securitySchemes"]) == {"ApiKey", "BearerToken"}
