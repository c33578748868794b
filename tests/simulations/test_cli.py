"""The fedpref command line: results written with their config and seed; bad input explained."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from fedpref.simulations.cli import app

runner = CliRunner()


@pytest.fixture()
def ratings_csv(tmp_path):
    rng = np.random.default_rng(0)
    lines = ["user,item,timestamp,rating"]
    for u in range(40):
        for t, i in enumerate(rng.choice(200, size=int(rng.integers(4, 20)), replace=False)):
            lines.append(f"u{u},i{i},{1000 + t},{rng.integers(1, 6)}")
    path = tmp_path / "ratings.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_central_writes_metrics_config_and_seed(ratings_csv, tmp_path):
    out = tmp_path / "central.json"
    result = runner.invoke(
        app,
        ["central", "--dataset", str(ratings_csv), "--max-epochs", "2", "--dim", "8", "--seed", "3", "--out", str(out), "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert payload["seed"] == 3
    assert payload["config"]["model"]["dim"] == 8
    assert payload["split"]["users"] == 40
    assert 0.0 <= payload["test"]["hr"] <= 1.0
    assert 1 <= payload["best_epoch"] <= 2
    assert len(payload["history"]) == 2


def test_local_only_runs(ratings_csv, tmp_path):
    out = tmp_path / "local.json"
    result = runner.invoke(app, ["local-only", "--dataset", str(ratings_csv), "--max-epochs", "1", "--dim", "8", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["command"] == "local-only"


def test_rating_threshold_drops_are_reported(ratings_csv, tmp_path):
    result = runner.invoke(app, ["data", "--dataset", str(ratings_csv), "--rating-threshold", "3"])
    assert result.exit_code == 0, result.output
    assert "rating below 3" in result.output


def test_a_missing_file_is_explained(tmp_path):
    result = runner.invoke(app, ["central", "--dataset", str(tmp_path / "nope.csv"), "--no-progress"])
    assert result.exit_code == 2
    output = result.output.replace("\n", "")  # rich folds a long path at the console's width
    assert "nope.csv" in output and "movielens-small" in output


def test_an_unknown_model_is_explained(ratings_csv):
    result = runner.invoke(app, ["central", "--dataset", str(ratings_csv), "--model", "gpt", "--no-progress"])
    assert result.exit_code == 2
    assert "unknown model 'gpt'" in result.output


def test_builtin_data_set_summary():
    result = runner.invoke(app, ["data", "--dataset", "movielens-small"])
    assert result.exit_code == 0, result.output
    assert "671 users" in result.output and "9,066 items" in result.output


def _fake_run(folder, val_hr, chosen):
    folder.mkdir(parents=True)
    rounds = [{"round": r, "seconds": r * 2.0, "val-hr": val_hr * r / 4, "val-ndcg": val_hr * r / 8} for r in (2, 4)]
    chosen_row = dict(rounds[-1], **{"test-hr": 0.5, "test-ndcg": 0.3, "test-full-hr": 0.04})
    result = {"rounds": rounds, "chosen_round": chosen, "chosen": chosen_row, "wall_seconds": 8.0, "references": {"popularity": {"hr": 0.3, "ndcg": 0.2}}}
    (folder / "rounds.json").write_text(json.dumps(result))
    return folder


def test_compare_plots_runs_side_by_side_and_tables_their_chosen_rounds(tmp_path):
    a = _fake_run(tmp_path / "a", 0.6, 4)
    b = _fake_run(tmp_path / "b", 0.8, 4)
    out = tmp_path / "cmp.png"
    result = runner.invoke(app, ["compare", f"first={a}", str(b), "--out", str(out), "--x", "seconds"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "first" in result.output and " b " in result.output and "0.6000" in result.output and "0.8000" in result.output


def test_compare_explains_a_folder_without_results(tmp_path):
    result = runner.invoke(app, ["compare", str(tmp_path)], env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert "no rounds.json" in result.output
