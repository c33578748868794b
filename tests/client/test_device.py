"""The device SDK on its own: store, consent, eligibility, recommendations, export and erasure."""

import json
import sqlite3
import struct

import numpy as np
import pytest

from fedpref.client import ALWAYS, Conditions, Device, EligibilityPolicy, EventStore, NoModelError, Retention, StoreError
from fedpref.client.store import SCHEMA_VERSION
from fedpref.models.preference import ModelSpec

DAY = 86400.0


class Clock:
    def __init__(self, now: float = 1_000_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def clustered_model(n_items: int = 40, dim: int = 4) -> dict[str, np.ndarray]:
    """Items 0..n/2-1 point one way, the rest another; no biases."""
    q = np.zeros((n_items, dim), dtype=np.float32)
    q[: n_items // 2, 0] = 1.0
    q[n_items // 2 :, 1] = 1.0
    q += np.random.default_rng(0).normal(0, 0.01, q.shape).astype(np.float32)
    return {"item_embedding.weight": q, "item_bias.weight": np.zeros((n_items, 1), dtype=np.float32)}


# -- the store --------------------------------------------------------------------------
def test_store_file_is_wal_versioned_and_shared_between_processes(tmp_path):
    path = tmp_path / "device.sqlite"
    app, supernode = Device.open(path), Device.open(path)  # the app and the SuperNode process
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert app.store.schema_version == SCHEMA_VERSION
    app.set_consent("federated")
    assert supernode.consent.federated  # read afresh: a change is in force at once
    app.record(3)
    assert supernode.history_items().tolist() == [3]
    app.record(5)
    assert supernode.history_items().tolist() == [3, 5]  # its cache follows the other writer


def test_store_refuses_a_newer_schema_and_foreign_files_without_changing_them(tmp_path):
    path = tmp_path / "device.sqlite"
    Device.open(path).close()
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE settings SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    before = path.read_bytes()
    with pytest.raises(StoreError, match="newer than this fedpref"):
        EventStore(path)
    assert path.read_bytes() == before
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as raw:
        raw.execute("CREATE TABLE notes (x)")
    with pytest.raises(StoreError, match="not a fedpref device store"):
        EventStore(other)
    (tmp_path / "junk.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError, match="not a readable SQLite file"):
        EventStore(tmp_path / "junk.sqlite")
    with pytest.raises(StoreError, match="does not exist"):
        EventStore(tmp_path / "missing-folder" / "device.sqlite")


def test_retention_keeps_at_most_the_newest_events_within_the_age_limit():
    clock = Clock()
    device = Device.in_memory(retention=Retention(max_age_days=30, max_events=5), clock=clock)
    device.set_consent("on-device")
    device.record(1, time=clock.now - 40 * DAY)  # too old already
    for item in range(10, 17):
        device.record(item, time=clock.now - (35 - item) * DAY)  # 25 days old down to 19
    assert [e.item for e in device.events()] == [12, 13, 14, 15, 16]
    clock.now += 8.5 * DAY  # 12 and 13 pass 30 days
    device.store.enforce_retention()
    assert [e.item for e in device.events()] == [14, 15, 16]
    with pytest.raises(ValueError, match="max_events"):
        Retention(max_events=0)


def test_events_are_validated():
    device = Device.in_memory()
    for bad in (-1, "movie-7", 2.5):
        with pytest.raises(ValueError, match="catalogue index"):
            device.record(bad)
    with pytest.raises(ValueError, match="kind"):
        device.record(1, kind="")
    with pytest.raises(ValueError, match="finite"):
        device.record(1, "rating", float("nan"))
    assert device.store.count_events() == 0


# -- consent ----------------------------------------------------------------------------
def test_consent_is_off_until_opt_in_and_every_change_is_kept():
    clock = Clock()
    device = Device.in_memory(clock=clock)
    assert device.consent.level.value == "none" and not device.consent.federated
    assert device.consent_history() == []
    device.record(1, "view")
    device.record(2, "purchase")
    assert device.history_items().tolist() == []  # 'none': the history is not used
    clock.now += 5
    device.set_consent("federated", kinds=["view"])
    assert device.history_items().tolist() == [1]  # purchases may not be used
    assert not device.record(3, "purchase")  # nor collected
    assert device.store.count_events() == 2
    clock.now += 5
    device.set_consent("on-device", source="settings page")
    history = device.consent_history()
    assert [(c["level"], c["kinds"], c["source"]) for c in history] == [("federated", ["view"], "app"), ("on-device", None, "settings page")]
    assert history[1]["time"] - history[0]["time"] == 5
    with pytest.raises(ValueError, match="unknown consent level"):
        device.set_consent("everything")


# -- eligibility ------------------------------------------------------------------------
def test_default_policy_needs_fresh_charging_unmetered_idle_conditions():
    clock = Clock()
    device = Device.in_memory(clock=clock)
    ok, why = device.eligible()
    assert not ok and "not reported" in why[0]
    device.report_conditions(charging=True, unmetered=False, idle=True)
    assert device.eligible() == (False, ["not on an unmetered network"])
    device.report_conditions(charging=True, unmetered=True, idle=True)
    assert device.eligible() == (True, [])
    clock.now += 3600
    ok, why = device.eligible()
    assert not ok and "reported more than 900 s ago" in why[0]
    device.set_policy(ALWAYS)
    assert device.eligible() == (True, [])
    assert EligibilityPolicy(require_idle=False).check(Conditions(True, True, False, clock.now), clock.now) == (True, [])


# -- recommendations --------------------------------------------------------------------
def test_recommend_personalises_on_device_and_leaves_seen_items_out():
    device = Device.in_memory()
    device.install_global(clustered_model(), ModelSpec(dim=4), version="r1")
    device.set_consent("on-device")
    for item in range(0, 10):  # the person likes the first cluster
        device.record(item)
    used = device.personalize(epochs=30)
    assert used == 10
    top = device.recommend(10)
    assert len(top) == 10 and not set(top) & set(range(10))
    assert sum(i < 20 for i in top) == 10  # the unseen items of the first cluster
    assert set(device.recommend(10, exclude_seen=False)) & set(range(10))
    with pytest.raises(ValueError, match="k: must be an integer at least 1"):
        device.recommend(0)


def test_recommend_without_consent_uses_the_global_model_alone():
    device = Device.in_memory()
    model = clustered_model()
    model["item_bias.weight"][:, 0] = np.arange(40)[::-1] / 40  # item 0 best, then 1, ...
    device.install_global(model, ModelSpec(dim=4))
    for item in range(5):
        device.record(item)
    assert device.recommend(3) == [0, 1, 2]  # 'none': history neither personalises nor is left out
    with pytest.raises(PermissionError, match="'none'"):
        device.personalize()


def test_cold_start_falls_back_to_published_popularity_then_to_the_global_model(tmp_path):
    counts = np.zeros(40)
    counts[[7, 3, 9]] = [30.0, 20.0, 10.0]
    (tmp_path / "popularity.json").write_text(json.dumps({"counts": counts.tolist()}))
    device = Device.in_memory(popularity=tmp_path / "popularity.json")
    device.set_consent("on-device")
    assert device.recommend(2) == [7, 3]  # no model, no history: popularity
    device.install_global(clustered_model(), ModelSpec(dim=4))
    assert device.recommend(2) == [7, 3]  # still no history
    device.record(7)
    device.personalize(epochs=5)
    assert 7 not in device.recommend(5)
    bare = Device.in_memory()
    with pytest.raises(NoModelError):
        bare.recommend(3)
    bare.install_global(clustered_model(), ModelSpec(dim=4))
    assert len(bare.recommend(3)) == 3  # no popularity published: the global model
    with pytest.raises(ValueError, match="global model has arrays"):
        bare.install_global({"item_embedding.weight": np.zeros((4, 4))})


# -- access and erasure -----------------------------------------------------------------
MARK_KIND = "purchase-zq9xv"
MARK_VALUE = 123456.789012
MARK_SERVER = "fl.marker-host-qq7.example:9092"


def filled_device(path) -> Device:
    device = Device.open(path)
    device.set_consent("federated", kinds=[MARK_KIND, "view"])
    device.install_global(clustered_model(), ModelSpec(dim=4))
    for item in range(12):
        device.record(item, MARK_KIND, MARK_VALUE + item)
    device.personalize(epochs=3)
    device.log_sent({"time": 1.0, "server": MARK_SERVER, "message": "train", "arrays": [], "bytes": 0, "update": True, "clip_bound": 0.5})
    device.report_conditions(charging=True, unmetered=True, idle=True)
    return device


def test_export_holds_everything_about_the_person_as_one_json_document(tmp_path):
    device = filled_device(tmp_path / "device.sqlite")
    doc = json.loads(device.export_json(tmp_path / "export.json"))
    assert doc["format"] == "fedpref-device-export/2"
    assert [e["kind"] for e in doc["events"]] == [MARK_KIND] * 12 and doc["events"][0]["value"] == MARK_VALUE
    assert doc["consent"]["level"] == "federated" and len(doc["consent_history"]) == 1
    assert doc["record_of_what_left"][0]["server"] == MARK_SERVER
    private = doc["private_model"]["user_embedding.weight"]
    assert private["shape"] == [1, 4]
    assert np.allclose(private["values"], device.private()["user_embedding.weight"].ravel())
    assert doc["trainings"][0]["purpose"] == "personalize"
    assert doc["eligibility"]["conditions"]["charging"] is True
    assert json.loads((tmp_path / "export.json").read_text()) == doc


def test_forget_leaves_no_byte_of_the_person_in_the_store_files(tmp_path):
    path = tmp_path / "device.sqlite"
    device = filled_device(path)
    private = device.private()["user_embedding.weight"].tobytes()
    markers = [MARK_KIND.encode(), struct.pack(">d", MARK_VALUE + 3), MARK_SERVER.encode(), private]

    def store_bytes() -> bytes:
        return b"".join(p.read_bytes() for p in tmp_path.glob("device.sqlite*"))

    assert all(m in store_bytes() for m in markers)  # the check can see them (SQLite keeps REALs big-endian)
    device.forget()
    after = store_bytes()
    assert not [m for m in markers if m in after]
    assert device.store.count_events() == 0 and device.record_of_what_left() == [] and device.consent_history() == []
    assert device.consent.level.value == "none"
    assert device.global_model()  # the published model is not about the person: it stays
    device.close()
    reopened = Device.open(path)
    assert reopened.export()["events"] == [] and reopened.export()["private_model"] == {}
