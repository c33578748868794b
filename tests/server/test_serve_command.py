"""`fedpref serve` refuses settings that would expose the operator API, saying what to set."""

from typer.testing import CliRunner

from fedpref.simulations.cli import app


def test_serve_refuses_production_without_real_keys(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no .env from the repository
    monkeypatch.setenv("FEDPREF_ENVIRONMENT", "production")
    monkeypatch.delenv("FEDPREF_API_KEYS", raising=False)
    result = CliRunner().invoke(app, ["serve", "--run-store", str(tmp_path / "runs.sqlite")])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "FEDPREF_API_KEYS is empty" in text
    monkeypatch.setenv("FEDPREF_API_KEYS", "dev-key-change-me")
    result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 2 and "development key" in " ".join(result.output.split())
