"""`fedpref frontier`: calibrated points (epsilon within 1% below each target), one CSV row per
point with every column, finished points reused, bad arguments refused before anything runs,
the plot and the table written; popularity measured as `evaluate` measures it."""

import csv
import math

import pytest
from typer.testing import CliRunner

from fedpref.server.privacy import DpMechanism
from fedpref.simulations.cli import app
from fedpref.simulations.data.population import write_population
from fedpref.simulations.data.registry import load_dataset
from fedpref.simulations.data.split import leave_one_out
from fedpref.simulations.evaluate import evaluate, popularity_scorer
from fedpref.simulations.experiments.frontier import (
    add_shares,
    EVAL_DEVICES, FIELDS, METHODS, Budget, FrontierError, calibrate, default_delta, expected_participations, median_target,
    methods_named, plan_frontier, popularity_metrics_of_folder,
)

RUN = ["--rounds", "2", "--cohort", "20", "--threads", "1", "--run-config", "dim=8 local-epochs=1 evaluate-every=2"]


@pytest.fixture(scope="module")
def population(tmp_path_factory):
    """200 devices, 300 items (synthetic), written as a population folder; and its split."""
    split = leave_one_out(load_dataset("synthetic:200x300", seed=0), seed=0)
    return write_population(split, tmp_path_factory.mktemp("pop") / "pop"), split


def _rows(path):
    with path.open() as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def _epsilon(row):
    return float(row["epsilon_honest" if row["accounting"] == "honest" else "epsilon_sampled"])


@pytest.mark.parametrize("accounting, cap, tree", [("honest", 1, False), ("honest", 3, False), ("honest", 2, True), ("sampled", 4, True)])
@pytest.mark.parametrize("target", [0.5, 1.0, 4.0])
def test_calibration_lands_within_one_percent_below_the_target(accounting, cap, tree, target):
    budget = Budget(rounds=100, cohort=10_000, population=1_000_000, delta=1e-8, accounting=accounting, cap=cap, tree=tree)
    z = calibrate(target, budget)
    assert 0.99 * target <= budget.epsilon(z) <= target
    assert budget.epsilon(z * 0.98) > 0.99 * target  # less noise spends more: z is (nearly) the least that keeps the target


def test_calibration_of_the_sampled_account_matches_the_servers_accountant():
    budget = Budget(rounds=10, cohort=100, population=10_000, delta=1e-5, accounting="sampled")
    z = calibrate(2.0, budget)
    epsilon = DpMechanism(z, 10_000, 100).epsilon(10, 1e-5)  # what the run's ledger will say
    assert 0.99 * 2.0 <= epsilon <= 2.0


def test_the_small_helpers():
    assert default_delta(1_000_000) == 1e-8 and default_delta(10_000) == 1 / (10 * 10_000)
    assert expected_participations(100, 10_000, 1_000_000) == 1  # ceil(100 * 10,000 / 1,000,000)
    assert expected_participations(100, 5_000, 100_000) == 5
    assert expected_participations(3, 20, 1_000_000) == 1  # at least one
    assert median_target([4, 1, 2]) == 2 and median_target([1, 2, 4, 8]) == 2
    assert METHODS["tree"].reference_name == "fedavgm" and METHODS["dim16"].reference_name == "dim16"
    with pytest.raises(FrontierError, match="choose from fedavgm, adaptive, dim16, tree, fedadam"):
        methods_named(["fedavgm", "dpsgd"])


def test_a_large_population_evaluates_a_sample_of_its_devices(tmp_path, population):
    folder, _ = population
    plan = lambda f, **kw: plan_frontier(f, ["fedavgm"], [1.0], ["sampled"], rounds=2, cohort=20, out=tmp_path / "out", **kw)  # noqa: E731
    assert plan(folder).base["fraction-evaluate"] == 1.0  # 200 devices: every one
    big = tmp_path / "big"  # a population's meta.json and files; the plan reads no more
    big.mkdir()
    (big / "meta.json").write_text('{"n_users": 1000000, "n_items": 300, "name": "big"}')
    for name in ("train_indptr", "train_items", "val_item", "test_item", "negatives"):
        (big / f"{name}.npy").write_bytes(b"")
    assert plan(big).base["fraction-evaluate"] == EVAL_DEVICES / 1_000_000  # 20,000 of a million
    assert plan(big, overrides={"fraction-evaluate": 0.5}).base["fraction-evaluate"] == 0.5  # --run-config wins


def test_popularity_from_the_folder_is_what_evaluate_measures(population):
    folder, split = population
    expected = evaluate(popularity_scorer(split), split, target="test", seed=0)
    got = popularity_metrics_of_folder(folder, seed=0)
    assert got == {"test_hr": expected.hr, "test_ndcg": expected.ndcg, "test_full_hr": expected.full_hr, "test_full_ndcg": expected.full_ndcg}


@pytest.mark.parametrize("args, message", [
    (["--methods", "fedavgm,dpsgd"], "unknown method(s) ['dpsgd']; choose from fedavgm, adaptive"),
    (["--epsilons", "1,0"], "--epsilons takes positive numbers"),
    (["--epsilons", "one"], "--epsilons takes numbers"),
    (["--accounting", "amplified"], "unknown accounting(s) ['amplified']"),
    (["--cohort", "500"], "--cohort must lie in [2, 200]"),
    (["--goal", "90"], "--goal is a share"),
    (["--run-config", "dp-noise-multiplier=2"], "--run-config may not set dp-noise-multiplier"),
    (["--run-config", "strategy=sgd"], "--run-config: "),
    (["--methods", "adaptive", "--epsilons", "0.5", "--accounting", "honest"], "adaptive clipping with 20 devices a round allows"),
])
def test_bad_arguments_are_refused_before_anything_runs(population, tmp_path, args, message):
    folder, _ = population
    out = tmp_path / "frontier"
    result = CliRunner().invoke(app, ["frontier", "--population", str(folder), "--out", str(out), *RUN[:4], *args], terminal_width=300)
    assert result.exit_code != 0
    assert message in " ".join(result.output.split())
    assert not out.exists()


def test_a_folder_that_is_not_a_population_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["frontier", "--population", str(tmp_path / "empty"), "--out", str(tmp_path / "f")], terminal_width=300)
    assert result.exit_code != 0 and "fedpref population" in result.output and not (tmp_path / "f").exists()


def test_the_frontier_writes_a_calibrated_row_per_point_and_reuses_finished_ones(population, tmp_path):
    folder, _ = population
    out = tmp_path / "frontier"
    args = ["frontier", "--population", str(folder), "--out", str(out), "--methods", "fedavgm,tree", "--epsilons", "8",
            "--accounting", "sampled,honest", "--goal", "0.9", *RUN]
    result = CliRunner().invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    fields, rows = _rows(out / "frontier.csv")
    assert tuple(fields) == FIELDS
    points = [r for r in rows if r["role"] == "point"]
    # fedavgm: one point per accounting; the tree: one (its honest and sampled epsilon are one number)
    assert sorted((r["method"], r["accounting"]) for r in points) == [("fedavgm", "honest"), ("fedavgm", "sampled"), ("tree", "honest")]
    for r in points:
        assert 0.99 * 8 <= _epsilon(r) <= 8, r  # the run's own ledger, as rounds.json holds it
        assert float(r["epsilon_sampled"]) <= float(r["epsilon_honest"]) + 1e-9
        assert float(r["delta"]) == 1 / (10 * 200) and int(r["rounds"]) == 2 and int(r["cohort"]) == 20
    honest = [r for r in points if r["accounting"] == "honest"]
    assert all(float(r["epsilon_honest"]) <= 8 and int(r["max_participations"]) == math.ceil(2 * 20 / 200) for r in honest)
    assert next(r for r in points if r["accounting"] == "sampled")["max_participations"] == "0"
    # the tree's reference is FedAvgM's (they differ only under DP): one run, read twice
    references = [r for r in rows if r["role"] == "reference"]
    assert [r["folder"] for r in references] == ["fedavgm-C1-lr30-nodp"] * 2
    for r in rows:
        assert math.isclose(float(r["lift"]), float(r["test_hr"]) - float(r["pop_test_hr"]))
        if r["share"]:  # against the non-DP model: the reference with the best validation HR@10
            reference = max(references, key=lambda x: float(x["val_hr"]))
            assert math.isclose(float(r["share"]), float(r["lift"]) / float(reference["lift"]))
    extra = [r for r in rows if r["role"] == "personalize-0"]
    assert len(extra) == 2 and {r["personalize_epochs"] for r in extra} == {"0"} and extra[0]["accounting"] == ""
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    table = (out / "frontier.md").read_text()
    assert "| fedavgm | sampled | 8 |" in table and "| tree | honest = sampled | 8 |" in table and "personalize-epochs 0" in table

    stamps = {p.name: (p / "rounds.json").stat().st_mtime_ns for p in out.iterdir() if (p / "rounds.json").exists()}
    again = CliRunner().invoke(app, args, terminal_width=200)
    assert again.exit_code == 0, again.output
    assert {p.name: (p / "rounds.json").stat().st_mtime_ns for p in out.iterdir() if (p / "rounds.json").exists()} == stamps
    assert again.output.count("reused") == len(rows)
    assert _rows(out / "frontier.csv")[1] == rows  # the same figures, read back


def test_shares_are_against_the_reference_chosen_on_validation_whichever_method():
    def row(role, method, val, lift):
        return {"role": role, "method": method, "val_hr": val, "lift": lift, "share": None}

    rows = [row("reference", "fedavgm", 0.62, 0.10), row("reference", "dim16", 0.60, 0.12),  # dim16 is better on test, not on validation
            row("point", "dim16", 0.58, 0.06), row("tune", "fedavgm", 0.59, 0.05), row("point", "tree", None, None)]
    add_shares(rows)
    assert [r["share"] for r in rows] == [1.0, pytest.approx(1.2), pytest.approx(0.6), None, None]
    below = [row("reference", "fedavgm", 0.5, -0.01), row("point", "fedavgm", 0.49, -0.02)]
    add_shares(below)
    assert [r["share"] for r in below] == [None, None]  # a share of a negative lift means nothing
