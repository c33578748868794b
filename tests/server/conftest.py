"""Fixtures the server tests share."""

import pytest

from fedpref.server.runstore import RunStore


@pytest.fixture()
def store(tmp_path):
    """An empty run store (SQLite) in the test's folder."""
    store = RunStore(str(tmp_path / "runs.sqlite"))
    yield store
    store.close()
