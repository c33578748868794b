"""`fedpref device ...` on a store file: record, consent, conditions, report, export, forget;
bad input gets a clear error and changes nothing."""

import json

from typer.testing import CliRunner

from fedpref.client import Device
from fedpref.simulations.cli import app

runner = CliRunner()


class Result:
    def __init__(self, result):
        self.exit_code = result.exit_code
        self.output = " ".join(result.output.split())  # rich wraps long lines


def invoke(*args, **kwargs):
    return Result(runner.invoke(app, ["device", *map(str, args)], **kwargs))


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
