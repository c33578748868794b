"""Crash trials: a device store killed with SIGKILL keeps every event it committed, and a
server killed at random moments resumes to the model of an uninterrupted run. And the
harness can fail: its checkers report a doctored store or model."""

import json
import shutil
import signal
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from fedpref.client.store import Event, EventStore, Retention
from fedpref.simulations.experiments.crashes import (
    batch_sizes,
    build_app,
    check_store,
    _not_private,
    compare_to_reference,
    planned_event,
    resume_kill_trials,
    store_kill_trials,
)

BASE_TIME = 1.7e9


def _write_batches(path, seed, n_batches, first=0):
    """Write planned batches ``first..n_batches-1`` of ``seed`` into the store at ``path``."""
    ends = np.concatenate([[0], np.cumsum(batch_sizes(seed))])
    store = EventStore(path, retention=Retention(max_age_days=None, max_events=None))
    try:
        for b in range(first, n_batches):
            store.add_events([Event(*planned_event(i, BASE_TIME)) for i in range(int(ends[b]), int(ends[b + 1]))])
    finally:
        store.close()
    return int(ends[n_batches])


def test_a_killed_store_keeps_every_committed_event(tmp_path):
    result = store_kill_trials(8, tmp_path, seed=0)
    assert result["trials"] == 8
    assert result["lost_events"] == 0 and result["unexpected_events"] == 0 and result["corrupt"] == 0
    assert result["partial_batches"] == 0 and result["generation_mismatches"] == 0
    assert result["kills_mid_write"] >= 1 and result["events_committed_total"] > 0 and result["children_not_killed"] == 0
    assert result["events_found_total"] >= result["events_committed_total"]
    assert result["failures"] == []


def test_the_store_checker_reports_lost_unexpected_and_torn_batches(tmp_path):
    path, seed = tmp_path / "device.sqlite", 3
    committed = _write_batches(path, seed, 3)
    ok = check_store(path, seed=seed, base_time=BASE_TIME, reported_batches=3, reported_events=committed)
    assert ok["ok"] and ok["found"] == committed and ok["lost"] == 0 and ok["integrity"] == ["ok"] and ok["generation_ok"]

    # One batch more than reported: committed, killed before the child said so (allowed).
    _write_batches(path, seed, 4, first=3)
    late = check_store(path, seed=seed, base_time=BASE_TIME, reported_batches=3, reported_events=committed)
    assert late["ok"] and late["unreported_batch"]
    # Two more than reported: the child never got that far.
    _write_batches(path, seed, 5, first=4)
    beyond = check_store(path, seed=seed, base_time=BASE_TIME, reported_batches=3, reported_events=committed)
    assert not beyond["ok"] and beyond["unexpected"] == int(batch_sizes(seed)[4])

    # An event the child reported is gone.
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM events WHERE item = 1")
    lost = check_store(path, seed=seed, base_time=BASE_TIME, reported_batches=5, reported_events=committed)
    assert not lost["ok"] and lost["lost"] == 1 and lost["lost_items"] == [1] and lost["partial_batch"]

    # An event nobody wrote.
    other = tmp_path / "other.sqlite"
    n = _write_batches(other, seed, 2)
    with sqlite3.connect(other) as conn:
        conn.execute("INSERT INTO events (item, kind, value, time) VALUES (0, 'view', NULL, 5.0)")
    stranger = check_store(other, seed=seed, base_time=BASE_TIME, reported_batches=2, reported_events=n)
    assert not stranger["ok"] and stranger["unexpected"] == 1 and stranger["lost"] == 0


def test_the_store_checker_reports_a_store_that_does_not_open(tmp_path):
    path = tmp_path / "device.sqlite"
    path.write_bytes(b"not a database, " * 512)
    result = check_store(path, seed=0, base_time=BASE_TIME, reported_batches=0, reported_events=0)
    assert not result["ok"] and not result["opened"] and "not a readable SQLite file" in result["error"]
    assert result["corrupt"] and "not a database" in result["integrity"][0]


DIE_WHILE_CREATING = """
import os, signal, sys
from sqlalchemy import event
from sqlalchemy.engine import Engine
from fedpref.simulations.experiments.crashes import _load_store_module

def die(conn, cursor, statement, *args):
    if statement.lstrip().upper().startswith("INSERT INTO SETTINGS"):
        os.kill(os.getpid(), signal.SIGKILL)  # the tables are made; their first rows not yet

event.listen(Engine, "before_cursor_execute", die)
store = _load_store_module()
store.EventStore(sys.argv[1])
"""


def test_a_store_killed_while_it_is_created_opens_again(tmp_path):
    path = tmp_path / "device.sqlite"
    child = subprocess.run([sys.executable, "-c", DIE_WHILE_CREATING, str(path)], capture_output=True, text=True, timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    result = check_store(path, seed=0, base_time=BASE_TIME, reported_batches=0, reported_events=0)
    assert result["ok"], result["error"]


def test_the_store_command_writes_its_report(tmp_path):
    out = tmp_path / "crashes-store.json"
    run = CliRunner().invoke(build_app(), ["store", "--trials", "2", "--out", str(out), "--seed", "5", "--no-progress"])
    report = json.loads(out.read_text())
    assert report["trials"] == 2 and report["failures"] == [] and run.exit_code == 0, run.output
    assert "2 trials" in run.output and "events lost" in run.output


@pytest.fixture(scope="module")
def resume_trials(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume")
    return folder, resume_kill_trials(1, folder, seed=2)  # (tests/server/test_run_store_and_resume.py kills at set points)


def test_a_server_killed_at_random_resumes_to_the_uninterrupted_model(resume_trials):
    _, result = resume_trials
    assert result["trials"] == 1 and result["matches"] == 1 and result["mismatches"] == 0, result["failures"]
    assert result["kills"] >= 1 and sum(result["kill_points"].values()) >= 1
    assert result["stale_running_runs"] == 0  # a kill before round 1's end resumes the same run (round 0's checkpoint)
    assert result["checkpoints_not_private"] == 0  # what a kill leaves is readable by its owner only
    for trial in result["trial_details"]:
        assert trial["final_returncode"] == 0 and trial["run_store"]["statuses"][0] == "completed"


def test_the_resume_comparer_reports_a_doctored_model_or_round(resume_trials, tmp_path):
    folder, _ = resume_trials
    reference = folder / "reference"
    assert compare_to_reference(reference, folder / "trial-000")["match"]

    doctored = tmp_path / "doctored"
    shutil.copytree(folder / "trial-000", doctored)
    with np.load(doctored / "final_model.npz") as saved:
        arrays = {name: saved[name] for name in saved.files}
    name = sorted(arrays)[0]
    flat = arrays[name].reshape(-1).copy()
    flat[0] = np.nextafter(flat[0], np.inf)  # one value, one ulp
    arrays[name] = flat.reshape(arrays[name].shape)
    np.savez_compressed(doctored / "final_model.npz", **arrays)
    verdict = compare_to_reference(reference, doctored)
    assert not verdict["match"] and verdict["differences"] == [f"final model array {name!r} differs (1 of {flat.size} values)"]

    shutil.copy(reference / "final_model.npz", doctored / "final_model.npz")
    summary = json.loads((doctored / "rounds.json").read_text())
    summary["privacy"]["epsilon"] *= 1 + 1e-12
    summary["rounds"][2]["train-loss" if "train-loss" in summary["rounds"][2] else "server-lr"] = 0.123
    (doctored / "rounds.json").write_text(json.dumps(summary))
    verdict = compare_to_reference(reference, doctored)
    assert not verdict["match"] and len(verdict["differences"]) == 2
    assert "rounds [3]" in verdict["differences"][0] and verdict["differences"][1].startswith("epsilon")

    (doctored / "rounds.json").unlink()
    (doctored / "runs.sqlite").unlink()
    verdict = compare_to_reference(reference, doctored)
    assert "no rounds.json" in verdict["differences"] and "no runs.sqlite" in verdict["differences"]


def test_a_store_left_half_created_by_an_older_fedpref_is_finished_on_opening(tmp_path):
    """Before its DDL was transactional, a kill during creation could leave tables and no row:
    such a store holds nothing, and opening it finishes its creation."""
    import sqlite3

    from fedpref.client.store import metadata

    path = tmp_path / "device.sqlite"
    from sqlalchemy import create_engine

    metadata.create_all(create_engine(f"sqlite:///{path}"))  # the tables, no settings rows
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM settings").fetchone() == (0,)
    store = EventStore(path, retention=Retention(max_age_days=None, max_events=None))
    try:
        assert store.schema_version >= 1 and store.count_events() == 0
        store.add_events([Event(*planned_event(0, BASE_TIME))])
        assert store.count_events() == 1
    finally:
        store.close()


def test_the_checkpoint_checker_reports_files_others_may_open(tmp_path):
    folder = tmp_path / "checkpoint"
    folder.mkdir(mode=0o700)
    folder.chmod(0o700)
    private = folder / "checkpoint.npz"
    private.write_bytes(b"x")
    private.chmod(0o600)
    assert _not_private(folder) == [] and _not_private(tmp_path / "missing") == []
    loose = folder / ".checkpoint.npz.1.2.tmp"
    loose.write_bytes(b"x")
    loose.chmod(0o644)
    folder.chmod(0o755)
    assert sorted(_not_private(folder)) == sorted([str(folder), str(loose)])
