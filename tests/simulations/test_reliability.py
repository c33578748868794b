"""`fedpref reliability`: its parts' figures, and the page it writes from them."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from fedpref.simulations.cli import app
from fedpref.simulations.experiments.reliability import validation_part, write_page


def test_every_malformed_reply_of_the_record_is_rejected_and_no_honest_one():
    figures = validation_part(trials=4, honest_trials=50, seed=3)
    assert figures["honest-rejected"] == 0
    for row in figures["rows"]:
        assert row["rejected"] == row["trials"] == row["model-unchanged"] == 4, row


def test_the_command_writes_the_page_from_each_parts_figures(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    # A part already measured (its JSON) is shown beside the one run now.
    dropout = {"dataset": "synthetic:100x50", "devices": 100, "rounds": 3, "cohort": 10, "engine": "fast", "rows": [
        {"setting": "no fault", "test-hr": 0.5, "test-ndcg": 0.3, "test-full-hr": 0.1, "mean-replies": 10, "dropped": 0, "late": 0, "skipped-rounds": 0, "seconds-per-round": 0.1},
        {"setting": "30% drop out", "test-hr": 0.45, "test-ndcg": 0.25, "test-full-hr": 0.08, "mean-replies": 7, "dropped": 9, "late": 0, "skipped-rounds": 0, "seconds-per-round": 0.1},
    ]}
    (work / "dropout.json").write_text(json.dumps(dropout))
    page = tmp_path / "RELIABILITY.md"
    result = CliRunner().invoke(app, ["reliability", "--parts", "validation", "--validation-trials", "5", "--work", str(work), "--out", str(page)])
    assert result.exit_code == 0, result.output
    text = page.read_text()
    assert "| 30% drop out (100 devices, 10 a round) | 3 rounds | test HR@10 0.4500 against 0.5000 without; 9 dropped" in text
    assert "| malformed reply: a NaN or an Inf in an array | 5 | 5 rejected, model unchanged in 5 |" in text
    assert json.loads((work / "validation.json").read_text())["honest-rejected"] == 0
    bad = CliRunner().invoke(app, ["reliability", "--parts", "validation,weather", "--work", str(work), "--out", str(page)])
    assert bad.exit_code != 0 and "weather" in bad.output and "choose from" in bad.output


def test_the_page_names_a_part_that_crashed():
    from pathlib import Path
    import tempfile

    figures = {"secagg": {"devices": 40, "cohort": 20, "tolerance": 0.3, "engine": "inprocess", "rows": [
        {"dropout": 0.5, "crashed": True, "error": "RuntimeError: boom"}]}}
    with tempfile.TemporaryDirectory() as folder:
        text = write_page(figures, Path(folder) / "R.md", "fedpref reliability").read_text()
    assert "crashed: RuntimeError: boom" in text and "yes: RuntimeError: boom" in text
