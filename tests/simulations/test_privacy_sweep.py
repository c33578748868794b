"""`fedpref privacy-sweep`: one run per (cohort, noise multiplier) plus each cohort's run
without DP; epsilon falls as the noise rises; CSV, plot and table written; bad input explained."""

import csv

from typer.testing import CliRunner

from fedpref.simulations.cli import app
from fedpref.simulations.experiments.privacy_sweep import sweep_runs


def test_every_cohort_gets_a_run_without_dp_first():
    assert sweep_runs([2.0, 0.5], [10, 50]) == [(10, 0.0), (10, 0.5), (10, 2.0), (50, 0.0), (50, 0.5), (50, 2.0)]


def test_the_sweep_writes_epsilon_and_test_hr_per_run(tmp_path):
    out = tmp_path / "sweep"
    result = CliRunner().invoke(
        app,
        ["privacy-sweep", "--dataset", "synthetic:60x300", "--noise", "1,4", "--cohorts", "10,30", "--rounds", "2", "--evaluate-every", "2",
         "--run-config", "dim=8 local-epochs=1", "--out", str(out), "--no-progress"],
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output
    with (out / "sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["cohort"]), float(r["noise_multiplier"])) for r in rows] == [(10, 0), (10, 1), (10, 4), (30, 0), (30, 1), (30, 4)]
    for cohort in ("10", "30"):
        eps = [float(r["epsilon"]) for r in rows if r["cohort"] == cohort]
        assert eps[0] == float("inf") and eps[1] > eps[2] > 0
    eps_at_z1 = {r["cohort"]: float(r["epsilon"]) for r in rows if r["noise_multiplier"] == "1.0"}
    assert eps_at_z1["10"] < eps_at_z1["30"]  # sampled less often: less spent
    assert all(0.0 <= float(r["test_hr"]) <= 1.0 for r in rows)
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "privacy-utility sweep" in result.output


def test_the_sweep_explains_bad_cohorts_and_noise(tmp_path):
    result = CliRunner().invoke(app, ["privacy-sweep", "--dataset", "synthetic:60x300", "--cohorts", "10,600", "--out", str(tmp_path), "--no-progress"])
    assert result.exit_code != 0 and "cohorts must lie in [2, 60]" in result.output
    result = CliRunner().invoke(app, ["privacy-sweep", "--dataset", "synthetic:60x300", "--noise", "one", "--out", str(tmp_path), "--no-progress"])
    assert result.exit_code != 0 and "--noise takes numbers" in result.output


def test_a_sweep_reuses_the_points_it_already_ran_and_adds_new_ones(tmp_path):
    out = tmp_path / "sweep"
    args = ["privacy-sweep", "--dataset", "synthetic:60x300", "--cohorts", "10", "--rounds", "2", "--evaluate-every", "2",
            "--run-config", "dim=8 local-epochs=1", "--out", str(out), "--no-progress"]
    assert CliRunner().invoke(app, [*args, "--noise", "1"]).exit_code == 0
    first = (out / "m10-z1" / "rounds.json").stat().st_mtime_ns
    result = CliRunner().invoke(app, [*args, "--noise", "1,2"])
    assert result.exit_code == 0, result.output
    assert (out / "m10-z1" / "rounds.json").stat().st_mtime_ns == first  # read, not run again
    with (out / "sweep.csv").open() as f:
        assert [float(r["noise_multiplier"]) for r in csv.DictReader(f)] == [0, 1, 2]
    CliRunner().invoke(app, [*args, "--noise", "1", "--rerun"])
    assert (out / "m10-z1" / "rounds.json").stat().st_mtime_ns != first


def test_a_sweep_runs_on_the_fast_engine_from_a_population_folder(tmp_path):
    assert CliRunner().invoke(app, ["population", "--dataset", "synthetic:60x300", "--out", str(tmp_path / "pop")]).exit_code == 0
    out = tmp_path / "sweep"
    result = CliRunner().invoke(
        app,
        ["privacy-sweep", "--population", str(tmp_path / "pop"), "--engine", "fast", "--noise", "1", "--cohorts", "20", "--rounds", "2",
         "--evaluate-every", "2", "--run-config", "dim=8 local-epochs=1", "--out", str(out), "--no-progress"],
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output
    with (out / "sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["cohort"]), float(r["noise_multiplier"])) for r in rows] == [(20, 0), (20, 1)]
    assert float(rows[1]["epsilon"]) > 0 and not (out / "population").exists()  # the folder given was used
    assert "popularity: test HR@10" in result.output
    missing = CliRunner().invoke(app, ["privacy-sweep", "--population", str(tmp_path / "none"), "--out", str(out), "--no-progress"])
    assert missing.exit_code != 0 and "fedpref population" in missing.output
