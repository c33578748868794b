"""The leakage audit: a curious server that keeps each clipped update can tell a person's items
apart almost perfectly; one that holds only sums over many devices can hardly do better than
chance; the AUC and the popularity prior are computed right; the command writes its report."""

import json
import warnings

import numpy as np
import pytest
from typer.testing import CliRunner

from fedpref.simulations.experiments.audit import auc, item_scores, popularity_prior, run_audit
from fedpref.simulations.cli import app
from fedpref.simulations.data.synthetic import SyntheticConfig, generate_synthetic
from fedpref.simulations.data.population import write_population
from fedpref.simulations.data.split import leave_one_out


def test_auc_is_the_share_of_positive_negative_pairs_ranked_right_with_ties_as_halves():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=60).astype(float)  # many ties
    labels = rng.random(60) < 0.3
    pos, neg = scores[labels], scores[~labels]
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert auc(scores, labels) == pytest.approx(brute)
    assert auc(np.arange(4.0), np.array([0, 0, 1, 1], bool)) == 1.0
    with pytest.raises(ValueError, match="at least one positive"):
        auc(np.arange(3.0), np.zeros(3, bool))


def test_the_attack_scores_items_by_their_bias_update_or_else_by_how_far_their_rows_moved():
    update = {"item_embedding.weight": np.zeros((4, 2)), "item_bias.weight": np.array([[0.1], [-0.2], [0.0], [0.3]])}
    assert list(item_scores(update, 4)) == [0.1, -0.2, 0.0, 0.3]
    rows = {"item_gmf.weight": np.array([[3.0, 4.0], [0, 0], [1, 0], [0, 0]]), "mlp.0.weight": np.ones((2, 5))}
    assert list(item_scores(rows, 4)) == [5.0, 0.0, 1.0, 0.0]


def test_the_popularity_prior_does_not_count_the_person_themself():
    # Two people with disjoint items: counting themselves would rank their own items first.
    truth = {0: np.array([1, 1, 0, 0], bool), 1: np.array([0, 0, 1, 1], bool)}
    assert popularity_prior(truth) == 0.0


@pytest.fixture(scope="module")
def dense_population(tmp_path_factory):
    # 100 people on 250 items with about 80 each: every item is in about 30 histories, so a
    # sum over 100 devices holds each person's items among many others'.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = SyntheticConfig(n_users=100, n_items=250, mean_events=80, max_events_fraction=0.4, popularity_exponent=0.0, seed=0)
        split = leave_one_out(generate_synthetic(config).interactions, seed=0)
    return write_population(split, tmp_path_factory.mktemp("audit") / "population")


def test_plain_fedavg_gives_the_server_each_history_and_secure_sums_over_100_devices_do_not(dense_population, tmp_path):
    base = {"history-dir": str(dense_population), "num-server-rounds": 1, "evaluate-every": 1, "fraction-train": 1.0,
            "dim": 16, "clip-norm": 0.5, "secagg-min-cohort": 50}
    report = run_audit(base, 100, modes=["plain", "secagg"], out=tmp_path)
    plain, secure = report["modes"]
    assert plain["observations"] == 100 and plain["devices_per_observation"] == 1
    assert plain["auc"] > 0.9
    assert secure["devices_per_observation"] == 100 and secure["observations"] == 100
    assert secure["auc"] <= 0.6
    assert json.loads((tmp_path / "audit.json").read_text())["modes"][1]["mode"] == "secagg"
    assert (tmp_path / "audit.csv").read_text().count("\n") == 3


def test_the_audit_command_runs_the_modes_and_writes_report_table_and_plot(tmp_path):
    out = tmp_path / "audit"
    result = CliRunner().invoke(
        app,
        ["audit", "--dataset", "synthetic:40x300", "--rounds", "1", "--fraction-train", "0.5", "--modes", "plain,dp,secagg-dp",
         "--run-config", "dim=8 secagg-min-cohort=10", "--out", str(out), "--no-progress"],
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "audit.json").read_text())
    assert [m["mode"] for m in report["modes"]] == ["plain", "dp", "secagg-dp"]
    assert report["modes"][1]["epsilon"] > 0 and report["modes"][0]["epsilon"] is None
    assert "popularity prior" in result.output and "secagg-dp" in result.output
    assert (out / "audit.png").read_bytes()[:4] == b"\x89PNG"


def test_the_audit_command_explains_an_unknown_mode_and_a_cohort_too_small_for_secure_sums(tmp_path):
    bad = CliRunner().invoke(app, ["audit", "--dataset", "synthetic:40x300", "--modes", "plain,sekagg", "--out", str(tmp_path), "--no-progress"])
    assert bad.exit_code != 0 and "sekagg" in bad.output and "secagg-dp" in bad.output
    small = CliRunner().invoke(app, ["audit", "--dataset", "synthetic:40x300", "--fraction-train", "0.1", "--out", str(tmp_path), "--no-progress"])
    assert small.exit_code != 0 and "secagg-min-cohort" in small.output
