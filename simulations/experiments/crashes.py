"""Crash trials: kill the device store and the server with SIGKILL at random moments, and check
that nothing committed is lost and that a resumed run ends where an uninterrupted one does.

    fedpref crashes store  --trials 200 --out results/crashes-store.json
    fedpref crashes resume --trials 30  --out results/crashes-resume.json

(``python -m fedpref.simulations.experiments.crashes`` is the same; a store trial's child runs it.)

**Device store** (:func:`store_kill_trials`). Each trial starts a child process that opens a
fresh :class:`~fedpref.client.store.EventStore` file and writes events in batches of 1..20
(one ``add_events`` call, one commit, each), printing the batches and events committed so far
after each call returns. The parent kills it with SIGKILL after a random delay, opens the
store again (WAL and shared-memory files as the kill left them) and checks with
:func:`check_store`: it opens, ``PRAGMA integrity_check`` says ok, every event the child
reported is there, batches are whole (a commit is all or nothing), nothing is there that was
never written, and the store's generation counter agrees with the batches found. The events
the child writes follow a plan fixed by the trial's seed (event ``i`` has item ``i``, so each
is told apart), which the checker rebuilds.

The child keeps its imports light: it loads ``client/store.py`` by its file path, without the
``fedpref.client`` package (whose ``__init__`` imports the device and with it torch), so a
trial costs a fraction of a second.

**Server resume** (:func:`resume_kill_trials`). One small population, one uninterrupted
reference run (in-process engine: DP with reproducible noise, FedAdam, half the devices a
round) in a child process, then per trial the same run in a child with its own results folder, killed with SIGKILL at a
time drawn uniformly over the reference's duration (plus a tenth, so that some kills land
after the end), and run again to completion (``resume`` on, the default); in some trials the
second run is killed too. :func:`compare_to_reference` then checks that ``final_model.npz`` is
the reference's bit for bit, that ``rounds.json``'s per-round metrics and epsilon are the
reference's, and that the run store shows the run completed with every round. Whatever a kill
leaves in the checkpoint folder (the checkpoint, a half-written temporary file) must be readable
by its owner only (``checkpoints_not_private`` counts the files that are not).
"""


import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedpref.models.files import open_to_others

# -- device store ------------------------------------------------------------------------

KINDS = ("view", "click", "purchase", "rating")
MAX_BATCHES = 20_000  # a child that is never killed stops after this many commits
STORE_CHILD_TIMEOUT = 30.0  # ... or after this many seconds
MAX_KILL_DELAY = 0.5  # seconds after the child is ready (before it opens the store)


def batch_sizes(seed: int) -> np.ndarray:
    """The sizes of the batches a store child writes (1..20 each), fixed by ``seed``."""
    return np.random.default_rng(seed).integers(1, 21, size=MAX_BATCHES)


def planned_event(i: int, base_time: float) -> tuple:
    """Event number ``i`` of a trial: ``(item, kind, value, time)``; the item is ``i`` itself."""
    kind = KINDS[i % len(KINDS)]
    value = float(i % 5 + 1) if kind == "rating" else None
    return (i, kind, value, base_time + i * 1e-3)


def _load_store_module():
    """``client/store.py`` as a module of its own, without importing the ``fedpref.client``
    package (whose ``__init__`` imports torch): what a store child needs, and no more."""
    import importlib.util

    package = importlib.util.find_spec("fedpref.client")
    path = Path(package.submodule_search_locations[0]) / "store.py"
    spec = importlib.util.spec_from_file_location("_fedpref_crash_store", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _store_child(path: str, seed: int, base_time: float) -> None:
    """The child of a store trial: write planned batches until killed."""
    store_module = _load_store_module()
    print("READY", flush=True)
    store = store_module.EventStore(path, retention=store_module.Retention(max_age_days=None, max_events=None))
    sizes = batch_sizes(seed)
    written, deadline = 0, time.monotonic() + STORE_CHILD_TIMEOUT
    for batch, size in enumerate(sizes, start=1):
        events = [store_module.Event(*planned_event(i, base_time)) for i in range(written, written + int(size))]
        store.add_events(events)
        written += int(size)
        print(f"{batch} {written}", flush=True)
        if time.monotonic() > deadline:
            break
    store.close()


def check_store(path: str | Path, *, seed: int, base_time: float, reported_batches: int, reported_events: int) -> dict:
    """Check a store a killed child wrote (see the module's doc). ``reported_*``: what the child
    said it had committed before it died. Returns the findings; ``ok`` is the verdict."""
    from fedpref.client.store import EventStore, Retention

    path = Path(path)
    wal, shm = Path(f"{path}-wal"), Path(f"{path}-shm")
    result = {
        "existed": path.exists(),
        "wal_bytes": wal.stat().st_size if wal.exists() else None,  # as the kill left it
        "shm": shm.exists(),
        "reported_batches": reported_batches,
        "reported_events": reported_events,
        "opened": False,
        "integrity": None,
        "corrupt": None,
        "found": 0,
        "lost": 0,
        "unexpected": 0,
        "partial_batch": False,
        "unreported_batch": False,  # committed, killed before it said so (allowed)
        "generation": None,
        "generation_ok": None,
        "error": None,
    }
    try:
        store = EventStore(path, retention=Retention(max_age_days=None, max_events=None))
    except Exception as exc:  # noqa: BLE001 - the finding is that it does not open
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["ok"] = False
        result["integrity"] = _raw_integrity(path)  # is the file itself damaged, or does the store refuse it?
        result["corrupt"] = result["integrity"] != ["ok"]
        return result
    try:
        result["opened"] = True
        with store.engine.connect() as conn:
            result["integrity"] = [row[0] for row in conn.exec_driver_sql("PRAGMA integrity_check").all()]
        found = [(e.item, e.kind, e.value, e.time) for e in store.events()]
        result["generation"] = store.generation()
    except Exception as exc:  # noqa: BLE001
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["ok"] = False
        return result
    finally:
        store.close()

    ends = np.concatenate([[0], np.cumsum(batch_sizes(seed))])  # events after b batches: ends[b]
    result["found"] = len(found)
    seen: set[int] = set()
    unexpected = []
    for event in found:
        i = event[0]
        if not (0 <= i < ends[-1]) or event != planned_event(i, base_time) or i in seen:
            unexpected.append(event)
        else:
            seen.add(i)
    lost = [i for i in range(reported_events) if i not in seen]
    # At most one batch more than reported can be there: committed, then killed before the print.
    limit = int(ends[min(reported_batches + 1, MAX_BATCHES)])
    unexpected += [planned_event(i, base_time) for i in sorted(seen) if i >= limit]
    n = len(seen)
    whole = seen == set(range(n)) and n in set(ends.tolist())
    batches_found = int(np.searchsorted(ends, n)) if whole else None
    result["lost"] = len(lost)
    result["lost_items"] = lost[:20]
    result["unexpected"] = len(unexpected)
    result["unexpected_events"] = [list(e) for e in unexpected[:20]]
    result["partial_batch"] = not whole
    result["unreported_batch"] = bool(whole and batches_found == reported_batches + 1)
    result["generation_ok"] = batches_found is not None and result["generation"] == batches_found
    result["corrupt"] = result["integrity"] != ["ok"]
    result["ok"] = bool(not result["corrupt"] and not lost and not unexpected and whole and result["generation_ok"])
    return result


def _raw_integrity(path: Path) -> list[str]:
    """``PRAGMA integrity_check`` through sqlite3 itself (for a file the store will not open)."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            return [row[0] for row in conn.execute("PRAGMA integrity_check")]
    except sqlite3.Error as exc:
        return [f"{type(exc).__name__}: {exc}"]


class _Reader(threading.Thread):
    """Reads a child's stdout line by line, keeping the last line and the time of each mark."""

    def __init__(self, stream, marks: tuple[str, ...] = ()) -> None:
        super().__init__(daemon=True)
        self.stream, self.marks = stream, {m: threading.Event() for m in marks}
        self.lines: list[str] = []
        self.mark_time: dict[str, float] = {}

    def run(self) -> None:
        for line in self.stream:
            line = line.rstrip("\n")
            self.lines.append(line)
            if line in self.marks:
                self.mark_time[line] = time.monotonic()
                self.marks[line].set()
        self.stream.close()

    def wait_for(self, mark: str, timeout: float) -> bool:
        return self.marks[mark].wait(timeout)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL a child we started, by its own pid (if it still runs), and reap it."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def store_trial(path: Path, *, seed: int, delay: float, base_time: float) -> dict:
    """One store trial: a child writes to ``path``, is killed ``delay`` seconds after it is
    ready, and :func:`check_store` judges what is left."""
    cmd = [sys.executable, "-m", "fedpref.simulations.experiments.crashes", "_store-child", str(path), str(seed), repr(base_time)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env())
    reader = _Reader(proc.stdout, marks=("READY",))
    reader.start()
    killed = False
    try:
        if not reader.wait_for("READY", 60):
            raise RuntimeError(f"the store child did not start: {proc.stderr.read() if proc.poll() is not None else '(still running)'}")
        time.sleep(max(0.0, delay - (time.monotonic() - reader.mark_time["READY"])))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
        proc.wait()
    finally:
        _kill(proc)
        reader.join(10)
        stderr = proc.stderr.read() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
    counts = [line.split() for line in reader.lines if line != "READY"]
    reported_batches, reported_events = (int(counts[-1][0]), int(counts[-1][1])) if counts else (0, 0)
    result = check_store(path, seed=seed, base_time=base_time, reported_batches=reported_batches, reported_events=reported_events)
    result.update(seed=seed, delay=round(delay, 4), killed=killed, returncode=proc.returncode)
    if proc.returncode not in (-signal.SIGKILL, 0):
        result["ok"] = False
        result["error"] = result["error"] or f"the child failed (exit {proc.returncode}): {stderr[-2000:]}"
    return result


def store_kill_trials(trials: int, folder: Path, seed: int = 0, progress=None, *, keep: bool = False) -> dict:
    """Run ``trials`` store trials in ``folder`` (see the module's doc). ``progress(status)`` is
    called after each. The stores of trials that pass are removed unless ``keep``; those of
    failing trials stay for a look."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    summary = {
        "trials": trials, "seed": seed, "lost_events": 0, "unexpected_events": 0, "corrupt": 0, "open_errors": 0,
        "partial_batches": 0, "generation_mismatches": 0, "events_committed_total": 0, "events_found_total": 0,
        "batches_committed_total": 0, "committed_not_reported": 0, "kills_before_first_commit": 0, "kills_mid_write": 0,
        "children_not_killed": 0, "wal_left_by_kill": 0, "store_file_missing": 0, "failures": [],
    }
    delays = []
    for t in range(trials):
        trial_seed = int(rng.integers(2**31))
        # Mostly spread over the first half second of writing; one in ten within the first
        # 30 ms, while the store is created and its first batches written.
        delay = float(rng.uniform(0.0, 0.03) if rng.random() < 0.1 else rng.uniform(0.0, MAX_KILL_DELAY))
        delays.append(delay)
        path = folder / f"trial-{t:04d}.sqlite"
        for stale in (path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}-journal")):
            stale.unlink(missing_ok=True)
        result = store_trial(path, seed=trial_seed, delay=delay, base_time=time.time())
        result["trial"] = t
        summary["lost_events"] += result["lost"]
        summary["unexpected_events"] += result["unexpected"]
        summary["corrupt"] += int(bool(result.get("corrupt")))  # PRAGMA integrity_check is not ok
        summary["open_errors"] += int(not result["opened"])
        summary["partial_batches"] += int(result["partial_batch"])
        summary["generation_mismatches"] += int(result["generation_ok"] is False)
        summary["events_committed_total"] += result["reported_events"]
        summary["batches_committed_total"] += result["reported_batches"]
        summary["events_found_total"] += result["found"]
        summary["committed_not_reported"] += int(result["unreported_batch"])
        summary["kills_before_first_commit"] += int(result["killed"] and result["reported_batches"] == 0)
        summary["kills_mid_write"] += int(result["killed"] and result["reported_batches"] > 0)
        summary["children_not_killed"] += int(not result["killed"])
        summary["wal_left_by_kill"] += int(bool(result["wal_bytes"]))
        summary["store_file_missing"] += int(not result["existed"])
        if not result["ok"]:
            summary["failures"].append({"path": str(path), **result})
        elif not keep:
            for leftover in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
                leftover.unlink(missing_ok=True)
        if progress is not None:
            progress(f"{result['reported_events']} events, {len(summary['failures'])} failures")
    summary["kill_delay_seconds"] = {"min": round(min(delays), 4), "median": round(float(np.median(delays)), 4), "max": round(max(delays), 4)} if delays else {}
    summary["seconds"] = round(time.perf_counter() - started, 2)
    return summary


# -- server resume -----------------------------------------------------------------------

RESUME_DEVICES = 12
RESUME_ROUNDS = 6
SECOND_KILL_SHARE = 0.3  # the share of trials whose resumed run is killed too
AFTER_END = 0.1  # kills are drawn over the reference's duration and a tenth more

RUN_CHILD = """
import json, sys
from fedpref.models.config import FederatedConfig
from fedpref.server.app import ServerHooks
from fedpref.simulations.engines.inprocess import run_inprocess
# Imported here, so that the kill clock (from START) runs over the rounds, not over imports:
import fedpref.simulations.engines.device
import sqlalchemy.dialects.sqlite  # the run store's dialect, loaded on first use
import torch._dynamo  # torch.optim imports it when the first optimiser is made (over a second)

config = FederatedConfig.from_run_config(json.loads(sys.argv[1]))
hooks = ServerHooks(on_round=[lambda row: print(f"ROUND {row['round']} {row['event']}", flush=True)])
print("START", flush=True)
run_inprocess(config, n_devices=int(sys.argv[2]), hooks=hooks)
print("DONE", flush=True)
"""


def resume_run_config(population: Path, results: Path) -> dict:
    """The run of the resume trials (as tests/server/test_run_store_and_resume.py's)."""
    return {
        "history-dir": str(population), "results-dir": str(results), "num-server-rounds": RESUME_ROUNDS, "fraction-train": 0.5,
        "min-train-nodes": 2, "evaluate-every": 3, "dim": 8, "local-epochs": 1, "private-epochs": 1, "clip-norm": 0.5,
        "dp-noise-multiplier": 0.5, "strategy": "fedadam",
        # The noise and cohorts from the seed: a resumed run can then be compared bit for bit
        # (the noise of a real run comes from the OS, and a resumed one draws afresh).
        "reproducible-noise": True,
    }


def write_resume_population(folder: Path, n_devices: int = RESUME_DEVICES) -> Path:
    """A small synthetic population (as tests/conftest.py's), written where devices read it."""
    import warnings

    from fedpref.simulations.data.synthetic import SyntheticConfig, generate_synthetic
    from fedpref.simulations.data.population import write_population
    from fedpref.simulations.data.split import leave_one_out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small populations warn about sparse users
        interactions = generate_synthetic(SyntheticConfig(n_users=n_devices, n_items=150, mean_events=12, seed=5)).interactions
        split = leave_one_out(interactions, seed=0)
    return write_population(split, Path(folder) / "population")


@dataclass
class RunAttempt:
    """One child run: when it was killed (None: it ran to its end) and how it ended."""

    kill_after: float | None
    returncode: int | None = None
    seconds: float = 0.0  # from START to exit
    run_seconds: float | None = None  # from START to DONE (run_inprocess returned), if it got there
    last_event: str | None = None  # the last round event the child printed
    killed: bool = False
    stderr_tail: str = ""
    lines: list = field(default_factory=list)


def run_child(run_config: dict, n_devices: int, *, kill_after: float | None, log: Path, timeout: float = 600.0) -> RunAttempt:
    """Run the in-process engine in a child process; SIGKILL it ``kill_after`` seconds after it
    starts the run (None: let it finish). Its stderr goes to ``log``."""
    attempt = RunAttempt(kill_after)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-c", RUN_CHILD, json.dumps(run_config), str(n_devices)], stdout=subprocess.PIPE,
                                stderr=err, text=True, env=_child_env())
        reader = _Reader(proc.stdout, marks=("START", "DONE"))
        reader.start()
        try:
            if not reader.wait_for("START", timeout):
                raise RuntimeError(f"the run child did not start within {timeout} s (see {log})")
            begun = reader.mark_time["START"]
            if kill_after is not None:
                try:
                    proc.wait(timeout=max(0.0, kill_after - (time.monotonic() - begun)))
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    attempt.killed = True
            proc.wait(timeout=timeout)
            attempt.seconds = time.monotonic() - begun
            if "DONE" in reader.mark_time:
                attempt.run_seconds = reader.mark_time["DONE"] - begun
        finally:
            _kill(proc)
            reader.join(10)
    attempt.returncode = proc.returncode
    attempt.lines = list(reader.lines)
    events = [line for line in reader.lines if line.startswith("ROUND ")]
    attempt.last_event = events[-1][len("ROUND "):] if events else None
    if proc.returncode not in (0, -signal.SIGKILL):
        attempt.stderr_tail = log.read_text()[-3000:]
    return attempt


def _kill_point(results: Path, attempt: RunAttempt) -> dict:
    """Where a kill landed: the state the killed run left (checkpoint, files, run store)."""
    from fedpref.server import checkpoint

    point: dict = {"at_seconds": None if attempt.kill_after is None else round(attempt.kill_after, 3), "killed": attempt.killed,
                   "last_event": attempt.last_event}
    folder = results / "checkpoint"
    try:
        found = checkpoint.load(folder)
        point["checkpoint_round"] = None if found is None else found.completed_round
        point["checkpoint_finished"] = None if found is None else found.finished
    except checkpoint.CheckpointError as exc:  # a kill must never leave an unreadable checkpoint
        point["checkpoint_round"], point["checkpoint_error"] = None, str(exc)
    point["checkpoint_tmp_files"] = len(list(folder.glob(".*.tmp"))) if folder.exists() else 0
    point["checkpoint_files_not_private"] = _not_private(folder)
    point["rounds_json"] = (results / "rounds.json").exists()
    point["final_model"] = (results / "final_model.npz").exists()
    # The checkpoint of round k is written as round k + 1 starts: a kill that leaves it (and
    # not k + 1's) landed in round k + 1, or in the writing of k + 1's checkpoint.
    if not attempt.killed:
        point["phase"] = "after the end (the process had exited)"
    elif point.get("checkpoint_error"):
        point["phase"] = "unreadable checkpoint"
    elif point["checkpoint_round"] is None:
        point["phase"] = "round 1 (no checkpoint yet)"
    elif point["checkpoint_finished"]:
        point["phase"] = "after the final checkpoint (every round done)"
    else:
        point["phase"] = f"round {point['checkpoint_round'] + 1} (checkpoint of round {point['checkpoint_round']} on disk)"
    return point


def _not_private(folder: Path) -> list[str]:
    """The files in ``folder`` (and the folder) that accounts other than the owner may open."""
    if not folder.exists():
        return []
    return [str(p) for p in [folder, *folder.iterdir()] if open_to_others(p)]


def _run_store_state(results: Path) -> dict:
    from fedpref.server.runstore import RunStore

    path = results / "runs.sqlite"
    if not path.exists():
        return {"exists": False}
    store = RunStore(str(path))
    try:
        runs = store.runs()  # newest first
        latest = runs[0] if runs else None
        rounds = [r["round"] for r in store.rounds(latest["id"])] if latest else []
    finally:
        store.close()
    return {"exists": True, "runs": len(runs), "statuses": [r["status"] for r in runs], "latest": latest, "latest_rounds": rounds}


def compare_to_reference(reference: Path, results: Path, *, rounds: int = RESUME_ROUNDS) -> dict:
    """Compare a (resumed) run's results folder with the reference run's: the final model bit
    for bit, rounds.json's per-round rows (without their timings) and epsilon, and the run
    store (its latest run completed, with rounds 1..``rounds``). Returns ``{"match", "differences"}``."""
    differences: list[str] = []
    reference, results = Path(reference), Path(results)
    model = results / "final_model.npz"
    if not model.exists():
        differences.append("no final_model.npz")
    else:
        try:
            with np.load(reference / "final_model.npz") as a, np.load(model) as b:
                if sorted(a.files) != sorted(b.files):
                    differences.append(f"final model arrays {sorted(b.files)} != {sorted(a.files)}")
                for name in sorted(set(a.files) & set(b.files)):
                    x, y = a[name], b[name]
                    if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
                        changed = int(np.sum(x != y)) if x.shape == y.shape else None
                        differences.append(f"final model array {name!r} differs ({changed} of {x.size} values)")
        except Exception as exc:  # noqa: BLE001 - a torn file is a difference, not a crash of the harness
            differences.append(f"final_model.npz unreadable: {type(exc).__name__}: {exc}")
    summary = results / "rounds.json"
    if not summary.exists():
        differences.append("no rounds.json")
    else:
        try:
            ra, rb = json.loads((reference / "rounds.json").read_text()), json.loads(summary.read_text())
            strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
            if strip(ra["rounds"]) != strip(rb["rounds"]):
                differing = [r["round"] for r, s in zip(strip(ra["rounds"]), strip(rb["rounds"])) if r != s]
                differences.append(f"rounds.json rows differ (rounds {differing}; {len(rb['rounds'])} rows against {len(ra['rounds'])})")
            ea, eb = ra.get("privacy", {}).get("epsilon"), rb.get("privacy", {}).get("epsilon")
            if ea != eb:
                differences.append(f"epsilon {eb!r} != {ea!r}")
            if ra.get("chosen_round") != rb.get("chosen_round"):
                differences.append(f"chosen round {rb.get('chosen_round')} != {ra.get('chosen_round')}")
        except Exception as exc:  # noqa: BLE001
            differences.append(f"rounds.json unreadable: {type(exc).__name__}: {exc}")
    state = _run_store_state(results)
    if not state["exists"]:
        differences.append("no runs.sqlite")
    elif state["latest"] is None or state["latest"]["status"] != "completed":
        differences.append(f"the run store's latest run is not completed ({state['latest'] and state['latest']['status']})")
    elif state["latest_rounds"] != list(range(1, rounds + 1)):
        differences.append(f"the run store's latest run has rounds {state['latest_rounds']}")
    return {"match": not differences, "differences": differences, "run_store": {k: v for k, v in state.items() if k != "latest"}}


def resume_kill_trials(trials: int, folder: Path, seed: int = 0, progress=None, *, n_devices: int = RESUME_DEVICES) -> dict:
    """Run ``trials`` kill-and-resume trials in ``folder`` (see the module's doc)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    population = write_resume_population(folder, n_devices)

    reference = folder / "reference"
    ref = run_child(resume_run_config(population, reference), n_devices, kill_after=None, log=folder / "reference.stderr")
    if ref.returncode != 0:
        raise RuntimeError(f"the reference run failed (exit {ref.returncode}): {ref.stderr_tail}")
    duration = ref.run_seconds  # the run itself: the interpreter's exit after it takes seconds more (torch, flwr)
    summary: dict = {
        "trials": trials, "seed": seed, "devices": n_devices, "rounds": RESUME_ROUNDS, "reference_seconds": round(duration, 3),
        "reference_exit_seconds": round(ref.seconds, 3),
        "matches": 0, "mismatches": 0, "kills": 0, "second_kills": 0, "stale_running_runs": 0, "checkpoint_tmp_files_left": 0,
        "checkpoints_not_private": 0,
        "failures": [], "trial_details": [],
    }
    phases: Counter = Counter()
    for t in range(trials):
        results = folder / f"trial-{t:03d}"
        config = resume_run_config(population, results)
        detail: dict = {"trial": t, "kills": []}
        kill_times = [float(rng.uniform(0.0, duration * (1 + AFTER_END)))]
        if rng.random() < SECOND_KILL_SHARE:
            kill_times.append(float(rng.uniform(0.0, duration * (1 + AFTER_END))))
        for k, kill_after in enumerate(kill_times):
            attempt = run_child(config, n_devices, kill_after=kill_after, log=results.parent / f"{results.name}-run{k}.stderr")
            if attempt.returncode not in (0, -signal.SIGKILL):
                detail.setdefault("errors", []).append(f"run {k} failed (exit {attempt.returncode}): {attempt.stderr_tail}")
            point = _kill_point(results, attempt)
            summary["checkpoints_not_private"] += len(point["checkpoint_files_not_private"])
            detail["kills"].append(point)
            phases[point["phase"]] += 1
            summary["kills"] += int(attempt.killed)
            summary["second_kills"] += int(attempt.killed and k == 1)
        final = run_child(config, n_devices, kill_after=None, log=results.parent / f"{results.name}-final.stderr")
        detail["final_seconds"] = round(final.seconds, 3)
        detail["final_returncode"] = final.returncode
        resumed = "resuming from the checkpoint" in (results.parent / f"{results.name}-final.stderr").read_text()
        detail["final_resumed_from_checkpoint"] = resumed
        if final.returncode != 0:
            detail.setdefault("errors", []).append(f"the final run failed (exit {final.returncode}): {final.stderr_tail}")
        verdict = compare_to_reference(reference, results)
        detail.update(match=verdict["match"] and final.returncode == 0, differences=verdict["differences"], run_store=verdict["run_store"])
        summary["checkpoint_tmp_files_left"] += len(list((results / "checkpoint").glob(".*.tmp")))
        statuses = verdict["run_store"].get("statuses", [])
        summary["stale_running_runs"] += sum(1 for s in statuses[1:] if s == "running")  # older runs left "running"
        if detail["match"]:
            summary["matches"] += 1
        else:
            summary["mismatches"] += 1
            summary["failures"].append(detail)
        summary["trial_details"].append(detail)
        if progress is not None:
            progress(f"{summary['matches']} match, {summary['mismatches']} differ")
    summary["kill_points"] = dict(sorted(phases.items()))
    summary["seconds"] = round(time.perf_counter() - started, 2)
    return summary


# -- command line ------------------------------------------------------------------------


def build_app():
    """The ``store`` and ``resume`` commands (typer, imported only here: a store child must start fast)."""
    from typing import Annotated

    import typer
    from rich.console import Console

    from fedpref.simulations.progress import progress_bar

    app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                      help="Crash trials: SIGKILL the device store and the server at random moments.")
    console = Console()
    Trials = Annotated[int, typer.Option(min=1, help="How many trials.")]
    Seed = Annotated[int, typer.Option(help="Seed of the kill times and of what is written.")]
    Work = Annotated[Path | None, typer.Option(help="Folder for the trials' files (default: next to --out).")]
    Progress = Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")]

    def write(out: Path, payload: dict) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        console.print(f"wrote {out}")

    @app.command()
    def store(trials: Trials = 200, out: Annotated[Path, typer.Option()] = Path("results/crashes-store.json"), seed: Seed = 0,
              work: Work = None, keep: Annotated[bool, typer.Option(help="Keep the stores of passing trials.")] = False, progress: Progress = True) -> None:
        """Kill a device store's writer with SIGKILL; check that every committed event survives."""
        work = work or out.with_suffix("")
        with progress_bar(trials, "store kills", enabled=progress) as advance:
            result = store_kill_trials(trials, work, seed, progress=advance, keep=keep)
        write(out, result)
        console.print(
            f"{result['trials']} trials, {len(result['failures'])} failures: {result['lost_events']} events lost, {result['corrupt']} corrupt, "
            f"{result['open_errors']} refused to open, "
            f"{result['events_committed_total']} events committed, {result['kills_before_first_commit']} kills before the first commit, "
            f"{result['seconds']} s"
        )
        if result["failures"]:
            raise typer.Exit(code=1)

    @app.command()
    def resume(trials: Trials = 30, out: Annotated[Path, typer.Option()] = Path("results/crashes-resume.json"), seed: Seed = 0,
               work: Work = None, progress: Progress = True) -> None:
        """Kill a server run with SIGKILL, run it again; check it ends with the uninterrupted run's model."""
        work = work or out.with_suffix("")
        with progress_bar(trials, "resume kills", enabled=progress) as advance:
            result = resume_kill_trials(trials, work, seed, progress=advance)
        write(out, result)
        console.print(
            f"{result['trials']} trials: {result['matches']} match, {result['mismatches']} differ; {result['kills']} kills at "
            f"{result['kill_points']}; {result['seconds']} s"
        )
        if result["mismatches"]:
            raise typer.Exit(code=1)

    return app


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_store-child":  # the hidden entry point of a store trial's child
        _store_child(argv[1], int(argv[2]), float(argv[3]))
        return
    build_app()(argv, prog_name="python -m fedpref.simulations.experiments.crashes")


if __name__ == "__main__":
    main()
