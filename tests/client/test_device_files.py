"""What the device writes about its person, as another user of the machine, an export reader
and someone who looks at the store after erasure would see it:

- every file is readable by its owner only (0600) and every folder the device creates is 0700,
  even under a umask that would let anyone read them, and an old store's modes are tightened;
- the export holds every column of every table and every setting of the store;
- after ``forget()`` nothing in the store tells how much there was, and the models it fetched
  are gone."""

import base64
import hashlib
import json
import os
import sqlite3
import stat
from pathlib import Path

import numpy as np
import pytest

from fedpref.client import Device, Retention
from fedpref.client.keys import fingerprint, write_device_key
from fedpref.client.model_fetch import ModelFetchError
from fedpref.models.config import FederatedConfig
from fedpref.models.preference import ModelSpec
from fedpref.server.publish import generate_signing_key

NOW = 1_700_000_000.0
DIM = 4


def model(n_items: int = 30) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"item_embedding.weight": rng.normal(size=(n_items, DIM)).astype(np.float32), "item_bias.weight": np.zeros((n_items, 1), np.float32)}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask():
    """A umask that lets everyone read and write what is created (restored afterwards)."""
    old = os.umask(0)
    yield
    os.umask(old)


def fill(device: Device, n_events: int, keys: Path | None = None) -> Device:
    """Something in every table and every setting the SDK writes."""
    device.set_consent("federated", kinds=["view", "purchase"])
    device.join_run(FederatedConfig.from_run_config({"dim": DIM, "seed": 3}), model(), version="run 7, round 2")
    device.install_popularity(np.arange(30, dtype=np.float64))
    for i in range(n_events):
        device.record(i % 30, "view" if i % 3 else "purchase", float(i) + 0.25, time=NOW - 1000 + i)
    device.personalize(epochs=1)
    device.log_sent({"time": NOW - 5, "server": "fl.example.com:9092", "message": "train", "round": 2, "arrays": [], "bytes": 0, "update": True, "clip_bound": 0.5})
    device.store.add_training("federated", n_events, 2)
    device.set_policy(device.policy)
    device.report_conditions(charging=True, unmetered=False, idle=True)
    device.device_key()
    # what update_model keeps of a model fetched from a server (its signed expiry)
    device.store.set_setting("model-expires", json.dumps({"version": "run 7, round 2", "expires": "2030-01-01T00:00:00+00:00"}))
    if keys is not None:
        device.remember_supernode_key((keys / "device.pub").read_text())
    return device


# -- modes ----------------------------------------------------------------------------------
def test_every_file_the_device_writes_is_owner_only_even_under_an_open_umask(tmp_path, open_umask, free_port):
    _, publisher_key = generate_signing_key(tmp_path / "publisher" / "models.key")
    home = tmp_path / "home"
    home.mkdir()
    write_device_key(home / "keys")
    device = fill(Device.open(home / "device.sqlite", clock=lambda: NOW), 20, home / "keys")
    device.export_json(home / "export.json")
    with pytest.raises(ModelFetchError):  # nothing answers there; the models folder is made first
        device.update_model(f"http://127.0.0.1:{free_port()}", publisher_key, timeout=5)

    written = {p.relative_to(home).as_posix(): mode(p) for p in home.rglob("*")}
    assert written == {
        "device.sqlite": 0o600, "device.sqlite-wal": 0o600, "device.sqlite-shm": 0o600,  # open: its companions are there
        "export.json": 0o600,
        "keys": 0o700, "keys/device": 0o600, "keys/device.pub": 0o600,
        "device.sqlite.models": 0o700,
    }
    device.close()


def test_an_existing_store_and_export_readable_by_others_are_made_owner_only(tmp_path):
    path = tmp_path / "device.sqlite"
    old = os.umask(0o022)
    try:
        Device.open(path).close()
        os.chmod(path, 0o644)  # as fedpref used to leave it
        writer = sqlite3.connect(path)  # keeps -wal and -shm, 0644 like the file, while it is open
        writer.execute("INSERT INTO settings VALUES ('note', 'x')")
        writer.commit()
        (tmp_path / "export.json").write_text("{}")
    finally:
        os.umask(old)
    assert {mode(p) for p in tmp_path.glob("*")} == {0o644}
    device = Device.open(path)
    device.export_json(tmp_path / "export.json")
    assert {p.name: mode(p) for p in tmp_path.glob("*")} == {
        "device.sqlite": 0o600, "device.sqlite-wal": 0o600, "device.sqlite-shm": 0o600, "export.json": 0o600,
    }
    writer.close()
    device.close()


# -- the export holds everything the store holds ---------------------------------------------
ROW_NUMBER = None  # an AUTOINCREMENT id: the export lists the rows in its order

# table -> column -> (the value in the export of the i-th row, the stored value as exported)
COLUMNS = {
    "events": {
        "id": ROW_NUMBER,
        "item": (lambda doc, i: doc["events"][i]["item"], None),
        "kind": (lambda doc, i: doc["events"][i]["kind"], None),
        "value": (lambda doc, i: doc["events"][i]["value"], None),
        "time": (lambda doc, i: doc["events"][i]["time"], None),
    },
    "consent": {
        "id": ROW_NUMBER,
        "time": (lambda doc, i: doc["consent_history"][i]["time"], None),
        "level": (lambda doc, i: doc["consent_history"][i]["level"], None),
        "kinds": (lambda doc, i: doc["consent_history"][i]["kinds"], json.loads),
        "source": (lambda doc, i: doc["consent_history"][i]["source"], None),
    },
    "sent": {
        "id": ROW_NUMBER,
        "time": (lambda doc, i: doc["record_of_what_left"][i]["time"], None),
        "entry": (lambda doc, i: doc["record_of_what_left"][i], json.loads),
    },
    "trainings": {
        "id": ROW_NUMBER,
        "time": (lambda doc, i: doc["trainings"][i]["time"], None),
        "purpose": (lambda doc, i: doc["trainings"][i]["purpose"], None),
        "events": (lambda doc, i: doc["trainings"][i]["events"], None),
        "round": (lambda doc, i: doc["trainings"][i]["round"], None),
    },
}
ORDER = {"events": "time, id"}  # the export's order of a table's rows (default: id)


def exported_array(doc: dict, scope: str, name: str) -> dict:
    return {"private": doc["private_model"], "global": doc["global_model"]["arrays"], "popularity": doc["popularity"]}[scope][name]


def array_column(column: str):
    """The arrays table: one entry per (scope, name) in its section of the export."""
    def exported(doc, row):
        entry = exported_array(doc, row["scope"], row["name"])
        return {"scope": row["scope"], "name": row["name"], "dtype": entry["dtype"], "shape": entry["shape"],
                "data": entry.get("values") or entry.get("sha256")}[column]

    def stored(value, row):
        if column == "shape":
            return json.loads(value)
        if column == "data":
            return np.frombuffer(value, dtype=row["dtype"]).tolist() if row["scope"] == "private" else hashlib.sha256(value).hexdigest()
        return value

    return exported, stored


ARRAY_COLUMNS = {column: array_column(column) for column in ("scope", "name", "dtype", "shape", "data")}

# setting -> (its value in the export, the stored text as exported)
SETTINGS = {
    "schema_version": (lambda doc: doc["store"]["schema_version"], int),
    "created": (lambda doc: doc["store"]["created"], float),
    "generation": (lambda doc: doc["store"]["changes"], int),
    "instance": (lambda doc: doc["store"]["instance"], str),
    "model": (lambda doc: doc["global_model"]["spec"], json.loads),
    "model-version": (lambda doc: doc["global_model"]["version"], str),
    "model-expires": (lambda doc: doc["global_model"]["fetched"], json.loads),
    "run-config": (lambda doc: doc["run_config"], json.loads),
    "policy": (lambda doc: doc["eligibility"]["policy"], json.loads),
    "conditions": (lambda doc: doc["eligibility"]["conditions"], json.loads),
    "device-key": (lambda doc: doc["device_key"]["index"], int),
    "supernode-key": (lambda doc: {"public_key": doc["device_key"]["supernode_public_key"], "fingerprint": doc["device_key"]["supernode_key_fingerprint"]}, json.loads),
}


def test_the_export_holds_every_column_of_every_table_and_every_setting_of_the_store(tmp_path):
    _, public = write_device_key(tmp_path / "keys")
    path = tmp_path / "device.sqlite"
    device = fill(Device.open(path, clock=lambda: NOW, retention=Retention(max_age_days=None, max_events=None)), 12, tmp_path / "keys")
    device.store.set_setting("setting-of-a-later-version", "kept")  # a setting the export does not know by name
    doc = json.loads(device.export_json(tmp_path / "export.json"))

    raw = sqlite3.connect(path)
    raw.row_factory = sqlite3.Row
    tables = [r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
    assert sorted(tables) == sorted([*COLUMNS, "arrays", "settings"]), "a new table: add it to Device.export and to this test"
    checked = 0
    for table in COLUMNS:
        columns = [r["name"] for r in raw.execute(f"PRAGMA table_info({table})")]
        missing = set(columns) - set(COLUMNS[table])
        assert not missing, f"{table} columns {sorted(missing)} are not in the export: add them to Device.export and to COLUMNS"
        rows = raw.execute(f"SELECT * FROM {table} ORDER BY {ORDER.get(table, 'id')}").fetchall()
        assert rows, f"fill() leaves {table} empty: the test would prove nothing"
        for i, row in enumerate(rows):
            for column in columns:
                if COLUMNS[table][column] is ROW_NUMBER:
                    continue
                exported, decode = COLUMNS[table][column]
                value = row[column] if decode is None or row[column] is None else decode(row[column])
                assert exported(doc, i) == value, f"{table}.{column} of row {i}"
                checked += 1
    columns = [r["name"] for r in raw.execute("PRAGMA table_info(arrays)")]
    assert set(columns) <= set(ARRAY_COLUMNS), f"arrays columns {sorted(set(columns) - set(ARRAY_COLUMNS))} are not in the export"
    rows = raw.execute("SELECT * FROM arrays").fetchall()
    assert {r["scope"] for r in rows} == {"private", "global", "popularity"}
    for row in rows:
        for column in columns:
            exported, stored = ARRAY_COLUMNS[column]
            assert exported(doc, row) == stored(row[column], row), f"arrays.{column} of {row['scope']}/{row['name']}"
            checked += 1
    settings = dict(raw.execute("SELECT key, value FROM settings").fetchall())
    assert set(SETTINGS) <= set(settings), f"fill() leaves settings {sorted(set(SETTINGS) - set(settings))} unset"
    for key, value in settings.items():
        if key in SETTINGS:
            exported, decode = SETTINGS[key]
            assert exported(doc) == decode(value), f"setting {key}"
        else:
            assert doc["other_settings"][key] == value, f"setting {key}"
        checked += 1
    assert checked > 90  # 12 events x 4 columns, and the rest
    raw.close()

    # What identifies the device to a server: its key and the SuperNode key's public half and fingerprint.
    line = (tmp_path / "keys" / "device.pub").read_text()
    assert doc["device_key"]["supernode_public_key"] == line.strip()
    assert doc["device_key"]["supernode_key_fingerprint"] == fingerprint(line)
    assert "not exported" in doc["device_key"]["supernode_private_key"]
    assert (tmp_path / "keys" / "device").read_text().split("\n")[1] not in json.dumps(doc)  # no line of the private key
    assert doc["global_model"]["version"] == "run 7, round 2" and doc["run_config"]["seed"] == 3
    device.close()


def test_the_fingerprint_is_the_one_ssh_keygen_shows(tmp_path):
    _, public = write_device_key(tmp_path / "keys")
    line = public.read_text()
    blob = base64.b64decode(line.split()[1])
    expected = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    assert fingerprint(line) == expected and len(expected) == len("SHA256:") + 43  # 32 bytes: 43 base64 characters unpadded


# -- erasure ----------------------------------------------------------------------------------
def test_after_forget_nothing_in_the_store_tells_how_much_there_was(tmp_path, free_port):
    _, publisher_key = generate_signing_key(tmp_path / "publisher" / "models.key")
    clock = [NOW]
    few, many = (Device.open(tmp_path / f"{name}.sqlite", clock=lambda: clock[0]) for name in ("few", "many"))
    fill(few, 2)
    fill(many, 300)
    for _ in range(50):
        many.set_consent("on-device")
    for device in (few, many):
        with pytest.raises(ModelFetchError):  # makes <store>.models, as a fetch does
            device.update_model(f"http://127.0.0.1:{free_port()}", publisher_key, timeout=5)
        assert device.models_folder().is_dir()
    assert many.store.generation() > few.store.generation() + 300  # the counter told how much there was

    clock[0] = NOW + 3600
    for device in (few, many):
        device.forget()
        device.close()

    after = {}
    for name in ("few", "many"):
        path = tmp_path / f"{name}.sqlite"
        assert not Path(f"{path}.models").exists()
        reopened = Device.open(path, clock=lambda: clock[0])
        doc = reopened.export()
        instance = doc["store"].pop("instance")
        assert doc["store"] == {"schema_version": 1, "created": NOW + 3600, "changes": 0}
        reopened.close()
        after[name] = (doc, path.read_bytes().replace(instance.encode(), b"-" * len(instance)))
    assert after["few"][0] == after["many"][0]  # the same export
    assert len(after["few"][1]) == len(after["many"][1])  # the same size
    assert after["few"][1] == after["many"][1]  # the same file, but for the random instance token
    for name in ("few", "many"):  # and the next rows are numbered from 1 again
        with Device.open(tmp_path / f"{name}.sqlite", clock=lambda: clock[0]) as reopened:
            reopened.set_consent("on-device")
            reopened.record(1)
        raw = sqlite3.connect(tmp_path / f"{name}.sqlite")
        assert [raw.execute(f"SELECT max(id) FROM {table}").fetchone()[0] for table in ("events", "consent")] == [1, 1]
        raw.close()


def test_a_reader_in_another_process_does_not_keep_what_was_erased(tmp_path):
    path = tmp_path / "device.sqlite"
    app, supernode = Device.open(path), Device.open(path)
    app.install_global(model(), ModelSpec(dim=DIM))
    app.set_consent("on-device")
    app.record(3)
    assert supernode.history_items().tolist() == [3]  # cached at this change count
    cached_at = app.store.generation()
    app.forget()
    app.set_consent("on-device")
    app.record(5)
    app.record(6)
    assert app.store.generation() == cached_at  # as many changes since the erasure as before it
    assert supernode.history_items().tolist() == [5, 6]


@pytest.fixture
def model_server(tmp_path):
    """A signed model published and served over HTTP on 127.0.0.1 (uvicorn in a thread): ``(url, public key)``."""
    import socket
    import threading
    import time

    import uvicorn
    from fastapi import FastAPI

    from fedpref.server.model_http import model_router
    from fedpref.server.publish import ModelPublisher

    private, public = generate_signing_key(tmp_path / "publisher" / "models.key")
    publisher = ModelPublisher(tmp_path / "publisher" / "published", private)
    publisher.publish(model(), version="run7-r0001", round=1, run="7", meta={"kind": "mf", "dim": DIM})
    app = FastAPI()
    app.include_router(model_router(publisher.folder))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", public
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.mark.slow
def test_a_fetched_model_is_kept_owner_only_and_forget_removes_it(tmp_path, model_server, open_umask):
    url, public = model_server
    home = tmp_path / "home"
    home.mkdir()
    device = Device.open(home / "device.sqlite")
    result = device.update_model(url, public)
    assert result.version == "run7-r0001" and device.export()["global_model"]["version"] == "run7-r0001"
    models = home / "device.sqlite.models"
    files = sorted(models.rglob("*"))
    assert files and {mode(p) for p in files if p.is_file()} == {0o600} and {mode(p) for p in [models, *files] if p.is_dir()} == {0o700}
    assert {mode(p) for p in home.glob("device.sqlite*") if p.is_file()} == {0o600}
    device.forget()
    assert not models.exists()
    assert device.export()["global_model"]["version"] is None  # the version the device had is erased with the rest
    device.close()
