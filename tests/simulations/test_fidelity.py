"""The fidelity comparison: its statistics are the textbook ones, and ``fedpref fidelity`` reports
them for every draw of a generator against real data (here a small table the test writes)."""

import json
import math
import warnings

import numpy as np
import pytest
from typer.testing import CliRunner

from fedpref.simulations.cli import app
from fedpref.simulations.data.interactions import Interactions
from fedpref.simulations.data.split import leave_one_out
from fedpref.simulations.experiments.fidelity import (
    TOLERANCE,
    FidelityError,
    history_lengths,
    item_counts,
    ks_statistic,
    position_popularity,
    run_fidelity,
    spearman,
)

SOURCE = "synthetic:80x300"


def samples():
    rng = np.random.default_rng(0)
    return [
        (rng.normal(size=50), rng.normal(0.3, 1, size=70)),
        (rng.integers(0, 5, size=40), rng.integers(1, 7, size=90)),  # many ties
        (rng.pareto(1.5, size=200), rng.pareto(2.0, size=31)),
        (np.array([1.0]), np.array([1.0, 2.0])),
    ]


def test_ks_is_scipys_two_sample_statistic():
    stats = pytest.importorskip("scipy.stats")
    for a, b in samples():
        assert ks_statistic(a, b) == pytest.approx(stats.ks_2samp(a, b).statistic, abs=1e-12)


def test_ks_of_a_sample_against_itself_is_0_and_of_disjoint_supports_1():
    a = np.random.default_rng(1).normal(size=100)
    assert ks_statistic(a, a) == 0.0
    assert ks_statistic(a, a[::-1].copy()) == 0.0
    assert ks_statistic(a, a + (a.max() - a.min() + 1)) == 1.0  # every b above every a
    # one sample 1, 2; the other 2, 3: the distribution functions part by 1/2 at 1 and at 2
    assert ks_statistic([1, 2], [2, 3]) == 0.5
    with pytest.raises(ValueError, match="non-empty"):
        ks_statistic([], [1.0])


def test_spearman_is_scipys_with_average_ranks_for_ties():
    stats = pytest.importorskip("scipy.stats")
    for a, b in samples()[:3]:
        n = min(len(a), len(b))
        assert spearman(a[:n], b[:n]) == pytest.approx(stats.spearmanr(a[:n], b[:n]).statistic, abs=1e-12)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def ordered_split(popular_first: bool):
    """Person u touches items 0..k_u (item 0 by everyone, so the most popular), in order of
    item id (popular first) or reversed."""
    rng = np.random.default_rng(2)
    users, items, times = [], [], []
    for u in range(60):
        k = int(rng.integers(3, 10))
        order = range(k) if popular_first else range(k - 1, -1, -1)
        for t, i in enumerate(order):
            users.append(u), items.append(i), times.append(t)
    table = Interactions(np.array(users), np.array(items), np.array(times), None, np.arange(60), np.arange(120), name="ordered")
    return leave_one_out(table, n_negatives=5)


def test_position_against_popularity_sees_when_popular_items_come():
    first, last = ordered_split(True), ordered_split(False)
    assert position_popularity(first) < -0.5
    assert position_popularity(last) == pytest.approx(-position_popularity(first))
    # whole histories are counted: training events plus the two held-out items
    assert history_lengths(first).sum() == item_counts(first).sum() == len(first.train_items) + 2 * first.n_users


@pytest.fixture(scope="module")
def real_csv(tmp_path_factory):
    """A small 'real' data set: 40 people, 300 items, popular items more likely."""
    rng = np.random.default_rng(3)
    weights = 1.0 / np.arange(1, 301)
    lines = ["user,item,timestamp"]
    for u in range(40):
        items = rng.choice(300, size=int(rng.integers(5, 60)), replace=False, p=weights / weights.sum())
        lines += [f"u{u},i{i},{1000 + t}" for t, i in enumerate(items)]
    path = tmp_path_factory.mktemp("real") / "ratings.csv"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_draws_are_compared_with_the_real_data(real_csv):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_fidelity(SOURCE, against=real_csv, draws=2, mf=False)
    p = result.payload
    assert p["seeds"] == [0, 1] and len(p["per_draw"]) == len(result.draws) == 2
    assert p["per_draw"][0]["popularity"] != p["per_draw"][1]["popularity"]  # two different draws
    assert p["real"]["users"] == 40 and p["real"]["mf"] is None
    for draw in p["per_draw"]:
        assert draw["users"] == 80 and draw["items"] == 300
        assert 0 < draw["ks_lengths"] <= 1 and 0 < draw["ks_item_popularity"] <= 1
        assert 0 <= draw["popularity"]["full_hr"] <= draw["popularity"]["hr"] <= 1
        assert -1 <= draw["position_popularity_spearman"] <= 1
    hr = [d["popularity"]["hr"] for d in p["per_draw"]]
    assert p["generated"]["popularity.hr"]["mean"] == pytest.approx(np.mean(hr))
    assert p["generated"]["popularity.hr"]["se"] == pytest.approx(abs(hr[0] - hr[1]) / 2)  # std (ddof 1) / sqrt 2
    goal = p["goals"]["popularity.hr"]
    assert goal["real"] == p["real"]["popularity"]["hr"] and goal["pass"] == (abs(goal["gap"]) <= TOLERANCE)
    assert set(p["goals"]) == {"popularity.hr"}  # no MF, no MF goal


def test_one_epoch_of_central_mf_is_reported_and_checked(real_csv):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = run_fidelity(SOURCE, against=real_csv, draws=1, mf=True, max_epochs=1, patience=1).payload
    assert p["per_draw"][0]["mf"]["epoch"] == 1 and 0 <= p["per_draw"][0]["mf"]["hr"] <= 1
    assert math.isnan(p["generated"]["mf.hr"]["se"])  # one draw: no standard error
    assert set(p["goals"]) == {"popularity.hr", "mf.hr"}


@pytest.mark.parametrize("source, draws, message", [
    ("synthetic:80x300:seed=3", 2, "fixes its seed"),
    ("movielens-small", 1, "not a generated population"),
    (SOURCE, 0, "draws must be"),
])
def test_a_comparison_that_cannot_mean_anything_is_refused(source, draws, message):
    with pytest.raises(FidelityError, match=message):
        run_fidelity(source, draws=draws, mf=False)


def test_fidelity_command_writes_the_json_and_the_figure(real_csv, tmp_path):
    out = tmp_path / "fidelity"
    result = CliRunner().invoke(app, ["fidelity", "--dataset", SOURCE, "--against", real_csv, "--draws", "2", "--no-mf", "--out", str(out)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "KS, history lengths" in result.output and "popularity HR@10" in result.output
    payload = json.loads((out / "fidelity.json").read_text())
    assert payload["source"] == SOURCE and payload["against"] == real_csv and payload["draws"] == 2
    assert (out / "fidelity.png").stat().st_size > 10_000
    bad = CliRunner().invoke(app, ["fidelity", "--dataset", "synthetic:80x300:seed=1", "--against", real_csv, "--no-mf"])
    assert bad.exit_code == 2 and "fixes its seed" in bad.output
