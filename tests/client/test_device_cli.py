"""`fedpref device ...` on a store file: record, consent, conditions, report, export, forget;
bad input gets a clear error and changes nothing."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from fedpref.client import Device
from fedpref.models.preference import ModelSpec
from fedpref.cli import app

runner = CliRunner()


class Result:
    def __init__(self, result):
        self.exit_code = result.exit_code
        self.output = " ".join(result.output.split())  # rich wraps long lines


def invoke(*args, **kwargs):
    return Result(runner.invoke(app, ["device", *map(str, args)], **kwargs))


def clustered_model(n_items: int = 40, dim: int = 4) -> dict[str, np.ndarray]:
    q = np.random.default_rng(0).normal(size=(n_items, dim)).astype(np.float32)
    return {"item_embedding.weight": q, "item_bias.weight": np.zeros((n_items, 1), dtype=np.float32)}


def test_device_commands_on_a_store(tmp_path):
    store = tmp_path / "prefs.sqlite"
    assert "helps improve the shared model" in invoke("consent", "--store", store, "federated", "--kinds", "view,click").output
    assert invoke("record", "--store", store, 7).output.strip() == "recorded"
    assert "not recorded" in invoke("record", "--store", store, 8, "--kind", "purchase").output
    result = invoke("conditions", "--store", store, "--charging", "--unmetered")
    assert "not eligible: not idle" in result.output
    assert "eligible to train" in invoke("conditions", "--store", store, "--always").output
    report = json.loads(runner.invoke(app, ["device", "report", "--store", str(store), "--json"]).output)
    assert report["events_stored"] == 1 and report["messages_sent"] == 0
    assert "Nothing has left this device" in invoke("report", "--store", store).output
    out = tmp_path / "export.json"
    invoke("export", "--store", store, "--out", out)
    assert [e["item"] for e in json.loads(out.read_text())["events"]] == [7]
    assert invoke("forget", "--store", store, "--yes").exit_code == 0
    with Device.open(store) as device:
        assert device.store.count_events() == 0 and device.consent.level.value == "none"


def test_bad_input_is_a_clear_error(tmp_path):
    store = tmp_path / "prefs.sqlite"
    result = invoke("consent", "--store", store, "all-of-it")
    assert result.exit_code == 2 and "unknown consent level 'all-of-it'" in result.output
    result = invoke("record", "--store", tmp_path / "missing" / "prefs.sqlite", 1)
    assert result.exit_code == 2 and "does not exist" in result.output
    result = invoke("recommend", "--store", store)
    assert result.exit_code == 2 and "nothing to recommend from yet" in result.output
    result = invoke("join", "--superlink", "127.0.0.1:9092", "--store", store)
    assert result.exit_code == 2 and "--auth-key" in result.output
    result = invoke("forget", "--store", store, input="n\n")
    assert result.exit_code == 1


def test_join_runs_a_supernode_over_tls_with_authentication_unless_told_otherwise(tmp_path):
    from fedpref.client.cli import supernode_command

    common = dict(superlink="fl.example.com:9092", store=tmp_path / "prefs.sqlite", device_index=4, port=9500)
    secure = supernode_command(root_certificates=tmp_path / "ca.pem", auth_key=tmp_path / "device", insecure=False, **common)
    assert "--insecure" not in secure
    assert secure[secure.index("--root-certificates") + 1] == str(tmp_path / "ca.pem")
    assert secure[secure.index("--auth-supernode-private-key") + 1] == str(tmp_path / "device")
    assert f"store='{(tmp_path / 'prefs.sqlite').resolve()}'" in secure[secure.index("--node-config") + 1]
    insecure = supernode_command(root_certificates=None, auth_key=None, insecure=True, **common)
    assert "--insecure" in insecure and "--auth-supernode-private-key" not in insecure


def stored(store) -> dict:
    with Device.open(store) as device:
        doc = device.export()
    doc.pop("exported_at")
    return doc


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["record", "--store", "{store}", str(2**63)], "item: must be a catalogue index, an integer from 0 to 9,223,372,036,854,775,807"),
        (["record", "--store", "{store}", "3", "--value", "nan"], "value: must be a finite number"),
        (["record", "--store", "{store}", "3", "--value", "inf"], "value: must be a finite number"),
        (["record", "--store", "{store}", "3", "--kind", "x" * 1000], "kind: must be at most 64 characters"),
        (["record", "--store", "{store}", "3", "--kind", "view\x1b[2J"], "kind: must hold printable characters only"),
        (["record", "--store", "{store}", "3", "--kind", "[/red],x"], "kind: must not hold a comma"),  # rich markup in it is shown, not run
        (["consent", "--store", "{store}", "federated", "--kinds", "view,x\x07"], "kinds[1]: must hold printable characters only"),
        (["consent", "--store", "{store}", "federated", "--kinds", ",".join(f"k{i}" for i in range(300))], "kinds: at most 256 kinds"),
        (["consent", "--store", "{store}", "everything"], "level: unknown consent level 'everything'"),
        (["recommend", "--store", "{store}", "--k", "0"], "k: must be an integer at least 1"),
        (["join", "--superlink", "127.0.0.1:9092", "--store", "{store}", "--auth-key", "{store}"], "is not an unencrypted OpenSSH private key"),
    ],
)
def test_bad_input_to_the_device_commands_is_a_clear_error_and_changes_nothing(tmp_path, args, says):
    store = tmp_path / "prefs.sqlite"
    with Device.open(store) as device:
        device.set_consent("on-device", ["view"])
        device.record(1)
        device.install_global(clustered_model(), ModelSpec(dim=4), version="r1")
    before = stored(store)
    result = runner.invoke(app, ["device", *(a.replace("{store}", str(store)) for a in args)])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # no traceback
    output = " ".join(result.output.split())
    assert output.startswith("error: ") and says in output
    assert len(output) < 400  # a hostile value is not echoed whole
    assert stored(store) == before


def test_join_keeps_the_public_half_of_the_devices_key_and_its_index_in_the_store(tmp_path, monkeypatch):
    from fedpref.client.keys import fingerprint, write_device_key

    started = []

    class FakeSuperNode:
        def __init__(self, command, env):
            started.append(command)

        def wait(self):
            return 0

    monkeypatch.setattr("fedpref.client.cli.subprocess.Popen", FakeSuperNode)
    monkeypatch.setattr("fedpref.client.cli.signal.signal", lambda *args: None)
    private, public = write_device_key(tmp_path / "keys")
    store = tmp_path / "prefs.sqlite"
    result = invoke("join", "--superlink", "127.0.0.1:9092", "--store", store, "--auth-key", private)
    assert result.exit_code == 0, result.output
    key = stored(store)["device_key"]
    assert key["supernode_public_key"].split() == public.read_text().split()[:2]  # type and key (the file adds a comment)
    assert key["supernode_key_fingerprint"] == fingerprint(public.read_text())
    assert f"device-index={key['index']}" in started[0][started[0].index("--node-config") + 1]
