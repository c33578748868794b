"""`fedpref simulate` writes its config, per-round metrics (JSON, CSV) and the plot."""

import csv
import json

from typer.testing import CliRunner

from fedpref.simulations.cli import app

runner = CliRunner()


def test_simulate_writes_config_rounds_csv_and_plot(tmp_path):
    out = tmp_path / "sim"
    result = runner.invoke(
        app,
        ["simulate", "--dataset", "synthetic:30x300", "--rounds", "2", "--dim", "8", "--devices-per-round", "10",
         "--references", "none", "--out", str(out), "--no-progress", "--run-config", "batch-size=32"],
    )
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["run_config"]["batch-size"] == 32
    assert config["run_config"]["min-train-nodes"] == 10
    rounds = json.loads((out / "rounds.json").read_text())
    assert [r["round"] for r in rounds["rounds"]] == [1, 2]
    assert "popularity" in rounds["references"]
    with (out / "rounds.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and "val-hr" in rows[0]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_unknown_run_config_key_is_explained(tmp_path):
    result = runner.invoke(
        app, ["simulate", "--dataset", "synthetic:30x300", "--references", "none", "--out", str(tmp_path), "--no-progress", "--run-config", "clip-nrom=1"]
    )
    assert result.exit_code == 2
    assert "clip-nrom" in result.output and "clip-norm" in result.output


def test_population_writes_device_histories(tmp_path):
    result = runner.invoke(app, ["population", "--dataset", "synthetic:30x300", "--out", str(tmp_path / "pop")])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "pop" / "meta.json").read_text())
    assert meta["n_users"] == 30 and meta["n_items"] <= 300
    assert "history-dir=" in result.output


def test_simulate_with_dp_reports_epsilon_per_round_and_stops_at_the_target(tmp_path):
    out = tmp_path / "dp"
    result = runner.invoke(
        app,
        ["simulate", "--dataset", "synthetic:30x300", "--rounds", "5", "--dim", "8", "--devices-per-round", "10", "--engine", "inprocess",
         "--references", "none", "--out", str(out), "--no-progress", "--clip-norm", "0.5", "--dp-noise-multiplier", "2",
         "--dp-target-epsilon", "4.5", "--evaluate-every", "1"],
        env={"COLUMNS": "300"},
    )
    assert result.exit_code == 0, result.output
    rounds = json.loads((out / "rounds.json").read_text())
    privacy = rounds["privacy"]
    assert privacy["stopped-by-target"] and privacy["rounds-run"] == 3 and privacy["epsilon"] <= 4.5
    epsilons = [r["epsilon"] for r in rounds["rounds"]]
    assert len(epsilons) == privacy["rounds-run"] and epsilons == sorted(epsilons)
    assert "user-level DP: epsilon" in result.output and "stopped before round" in result.output
    with (out / "rounds.csv").open() as f:
        assert "epsilon" in next(csv.DictReader(f))


def test_simulate_refuses_a_target_epsilon_that_one_round_passes_before_training(tmp_path):
    result = runner.invoke(
        app,
        ["simulate", "--dataset", "synthetic:30x300", "--engine", "inprocess", "--references", "none", "--out", str(tmp_path / "x"),
         "--no-progress", "--dp-noise-multiplier", "1", "--dp-target-epsilon", "0.1"],
        env={"COLUMNS": "300"},
    )
    assert result.exit_code == 2
    assert "one round alone spends epsilon" in result.output and "raise dp-noise-multiplier" in result.output
    assert not (tmp_path / "x" / "rounds.json").exists()


def test_simulate_on_the_fast_engine_gives_the_in_process_engines_metrics(tmp_path):
    args = ["simulate", "--dataset", "synthetic:40x300", "--rounds", "2", "--dim", "8", "--devices-per-round", "20",
            "--references", "none", "--no-progress"]
    fast = runner.invoke(app, [*args, "--engine", "fast", "--threads", "2", "--private-dir", str(tmp_path / "private"), "--out", str(tmp_path / "fast")])
    assert fast.exit_code == 0, fast.output
    inprocess = runner.invoke(app, [*args, "--engine", "inprocess", "--out", str(tmp_path / "inprocess")])
    assert inprocess.exit_code == 0, inprocess.output
    a = json.loads((tmp_path / "fast" / "rounds.json").read_text())
    b = json.loads((tmp_path / "inprocess" / "rounds.json").read_text())
    assert json.loads((tmp_path / "fast" / "config.json").read_text())["engine"] == "fast"
    for x, y in zip(a["rounds"], b["rounds"], strict=True):
        assert x["replies"] == y["replies"] == 20 and x["train-loss"] == y["train-loss"] or abs(x["train-loss"] / y["train-loss"] - 1) < 1e-4
    assert abs(a["rounds"][-1]["val-hr"] - b["rounds"][-1]["val-hr"]) <= 0.005
    assert (tmp_path / "private" / "private.npy").exists()


def test_the_fast_engine_refuses_secure_aggregation_before_any_work(tmp_path):
    result = runner.invoke(app, ["simulate", "--dataset", "synthetic:30x300", "--engine", "fast", "--secagg", "--references", "none",
                                 "--out", str(tmp_path / "x"), "--no-progress", "--run-config", "secagg-min-cohort=2"])
    assert result.exit_code != 0 and "secure aggregation" in result.output and "--engine flower" in result.output
