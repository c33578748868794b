"""`fedpref serve` refuses settings that would expose the operator API, saying what to set; the
serve function itself is replaced by a stand-in that records whether it was called, so that a
refusal that fails to happen shows as a call, not as a server that never returns."""

import os

import pytest
from typer.testing import CliRunner

from fedpref.cli import app

KEY = "serve-operator-key-0123456789-abcdefgh"


@pytest.fixture()
def started(monkeypatch, tmp_path):
    """The settings `fedpref serve` would have started uvicorn with (a list, empty if refused)."""
    import fedpref.server.api

    monkeypatch.chdir(tmp_path)  # no .env from the repository
    for name in list(os.environ):
        if name.startswith("FEDPREF_"):
            monkeypatch.delenv(name)
    calls = []
    monkeypatch.setattr(fedpref.server.api, "serve", calls.append)
    return calls


def test_serve_refuses_production_without_real_keys(monkeypatch, tmp_path, started):
    monkeypatch.setenv("FEDPREF_ENVIRONMENT", "production")
    result = CliRunner().invoke(app, ["serve", "--run-store", str(tmp_path / "runs.sqlite")])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "FEDPREF_API_KEYS is empty" in text
    monkeypatch.setenv("FEDPREF_API_KEYS", "dev-key-change-me")
    result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 2 and "development key" in " ".join(result.output.split())
    assert started == []


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "fedpref.example.org", ""])
@pytest.mark.parametrize("keys", [None, "dev-key-change-me"], ids=["no keys", "the development key named"])
def test_serve_refuses_a_public_address_while_the_development_key_is_accepted(monkeypatch, started, host, keys):
    if keys is not None:
        monkeypatch.setenv("FEDPREF_API_KEYS", keys)
    result = CliRunner().invoke(app, ["serve", "--host", host])
    text = " ".join(result.output.split())
    assert started == [], f"fedpref serve started on {host!r} accepting the public development key"
    assert result.exit_code == 2, text
    assert "not a loopback address" in text and "dev-key-change-me" in text
    assert "secrets.token_urlsafe" in text and "FEDPREF_API_KEYS" in text and "TLS" in text  # how to make a real key, and what to put in front


def test_serve_starts_on_loopback_with_the_development_key_and_anywhere_with_a_real_one(monkeypatch, started):
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert CliRunner().invoke(app, ["serve", "--host", host]).exit_code == 0, host
    monkeypatch.setenv("FEDPREF_API_KEYS", KEY)
    assert CliRunner().invoke(app, ["serve", "--host", "0.0.0.0"]).exit_code == 0
    assert [s.host for s in started] == ["127.0.0.1", "localhost", "::1", "127.0.0.2", "0.0.0.0"]
    assert started[-1].key_values() == [KEY.encode()]


# -- fedpref dev-certs ------------------------------------------------------------------------------

def test_dev_certs_leave_no_private_key_readable_by_others(tmp_path):
    import stat

    out = tmp_path / "certs"
    out.mkdir()
    (out / "server.key").write_text("an older key")
    (out / "server.key").chmod(0o644)  # left readable by a previous tool
    result = CliRunner().invoke(app, ["dev-certs", "--out", str(out), "--host", "fl.example.org"])
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE((out / "server.key").stat().st_mode) == 0o600
    assert (out / "server.key").read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert sorted(p.name for p in out.iterdir()) == ["ca.pem", "server.key", "server.pem"]  # the CA's key is never written


def test_dev_certs_do_not_follow_a_link_planted_as_the_key_file(tmp_path):
    out, victim = tmp_path / "certs", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("someone else's file")
    (out / "server.key").symlink_to(victim)
    result = CliRunner().invoke(app, ["dev-certs", "--out", str(out)])
    assert result.exit_code == 2 and "error" in result.output
    assert victim.read_text() == "someone else's file"


@pytest.mark.parametrize("arguments, complaint", [(["--days", "0"], "1 to 3650 days"), (["--days", "100000000"], "1 to 3650 days"),
                                                 (["--host", " "], "none of them empty")])
def test_dev_certs_explain_bad_input(tmp_path, arguments, complaint):
    result = CliRunner().invoke(app, ["dev-certs", "--out", str(tmp_path / "certs"), *arguments])
    assert result.exit_code == 2 and complaint in " ".join(result.output.split()), result.output
