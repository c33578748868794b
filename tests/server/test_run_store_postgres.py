"""The run store on a real PostgreSQL server: a temporary cluster (Debian's initdb and
postgres, installed by .ci/setup-system) on a free port of 127.0.0.1, stopped by its process
id. Skips where PostgreSQL or psycopg is missing, except under CI (CI=true), where that fails."""

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from fedpref.models.config import FederatedConfig
from fedpref.server.runstore import RunStore
from fedpref.simulations.engines.inprocess import run_inprocess


def _missing(why: str):
    if os.environ.get("CI"):
        pytest.fail(f"{why}: .ci/setup-system installs PostgreSQL, and pip install -e '.[dev]' psycopg")
    pytest.skip(why)


@pytest.fixture(scope="module")
def postgres_url():
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not bins:
        _missing("PostgreSQL is not installed")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _missing("psycopg is not installed")
    bin_dir = Path(bins[-1])
    # Its own folder under /tmp: pytest's folders are private to this user, and PostgreSQL runs as another.
    folder = Path(tempfile.mkdtemp(prefix="fedpref-postgres-"))
    data = folder / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: run it as its own user
        if shutil.which("runuser") is None:
            _missing("running as root without runuser to start PostgreSQL as the postgres user")
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(folder, "postgres")
        folder.chmod(0o700)
    subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "fedpref", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True, timeout=120)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(folder / "postgres.log", "w")
    proc = subprocess.Popen([*as_user, str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-c", "listen_addresses=127.0.0.1",
                             "-c", f"unix_socket_directories={folder}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.time() > deadline or proc.poll() is not None:
                pytest.fail(f"PostgreSQL did not start; see {folder / 'postgres.log'}")
            time.sleep(0.2)
        yield f"postgresql+psycopg://fedpref@127.0.0.1:{port}/postgres"
    finally:
        pid_file = data / "postmaster.pid"
        pid = int(pid_file.read_text().split()[0]) if pid_file.exists() else proc.pid
        os.kill(pid, signal.SIGINT)  # PostgreSQL's fast shutdown
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)
            proc.wait()
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


def test_a_run_writes_its_rounds_to_postgresql(postgres_url, tmp_path, synthetic_population):
    population = synthetic_population(tmp_path, 8, n_items=150, mean_events=12, seed=7)
    config = FederatedConfig.from_run_config({
        "history-dir": str(population), "results-dir": str(tmp_path / "run"), "run-store": postgres_url, "run-name": "on-postgres",
        "num-server-rounds": 3, "dim": 8, "local-epochs": 1, "private-epochs": 1, "evaluate-every": 3, "dp-noise-multiplier": 0.5,
    })
    result = run_inprocess(config, n_devices=8)
    store = RunStore(postgres_url)
    run = next(r for r in store.runs() if r["name"] == "on-postgres")
    assert run["status"] == "completed" and run["epsilon"] == pytest.approx(result["privacy"]["epsilon"])
    rows = store.rounds(run["id"])
    assert [r["round"] for r in rows] == [1, 2, 3] and rows[-1]["metrics"]["val-hr"] == pytest.approx(result["rounds"][-1]["val-hr"])
    assert int(run["flower_run_id"]) == 1
    assert not (tmp_path / "run" / "runs.sqlite").exists()  # the URL given, not the default file
