"""Poisoning (fedpref.simulations.experiments.poison, `fedpref poison`): compromised devices send
well-formed updates within C that the server's validation accepts; with 10% of them and no
defence the target reaches honest users' top 10; they neither evaluate nor count in the
measure; the command line writes its table."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from fedpref.models.config import FederatedConfig
from fedpref.server.app import ServerHooks
from fedpref.server.validation import check_train_reply, examples_bound, train_metric_keys
from fedpref.simulations.cli import app
from fedpref.simulations.engines.fast import FastGrid, Population
from fedpref.simulations.experiments.poison import (
    NODE_ID_BASE,
    PoisonGrid,
    TargetBoost,
    choose_target,
    compromised_devices,
    item_counts,
    run_attack,
    target_exposure,
)

BASE = {"num-server-rounds": 8, "fraction-train": 0.2, "evaluate-every": 8, "dim": 8, "local-epochs": 1}


@pytest.fixture(scope="module")
def population(tmp_path_factory, synthetic_population):
    return synthetic_population(tmp_path_factory.mktemp("poison"), 200, 300, 30, 0)


def test_the_compromised_devices_are_nested_and_the_target_is_unpopular(population):
    at = {f: set(compromised_devices(200, f, seed=0).tolist()) for f in (0.0, 0.01, 0.05, 0.1)}
    assert [len(at[f]) for f in (0.0, 0.01, 0.05, 0.1)] == [0, 2, 10, 20]
    assert at[0.01] <= at[0.05] <= at[0.1]
    counts = item_counts(population)
    target = choose_target(population, seed=0)
    assert counts[target] >= 1 and np.sum(counts < counts[target]) < len(counts) / 2
    assert choose_target(population, seed=0) == target


def test_crafted_updates_pass_validation_within_c_and_the_attack_lifts_the_target(population, tmp_path):
    target = choose_target(population, seed=0)
    seen = []  # (reply, what the server sent) of every crafted reply the server received
    compromised = set(compromised_devices(200, 0.1, seed=0).tolist())

    def observe(messages, replies):
        sent = {m.metadata.dst_node_id: m for m in messages}
        for reply in replies:
            if reply.metadata.src_node_id - NODE_ID_BASE in compromised and not reply.has_error():
                seen.append((reply, sent[reply.metadata.src_node_id]))

    clean = run_attack(population, BASE, 0.0, "none", target, 0, tmp_path / "clean", silent_fraction=0.1)
    attacked = run_attack(population, BASE, 0.1, "none", target, 0, tmp_path / "attacked", hooks=ServerHooks(on_exchange=[observe]))
    assert attacked["crafted"] == len(seen) > 0 and attacked["attack-rounds"] >= 6
    assert attacked["rejected"] == 0 and clean["rejected"] == 0
    rows = json.loads((tmp_path / "attacked" / "rounds.json").read_text())["rounds"]
    assert all(r["replies"] == 40 and not r.get("rejected") for r in rows if "train-loss" in r)  # every one of the 40 a round aggregated
    for reply, msg in seen:
        arrays = msg.content["arrays"]
        shared = {name: arrays[name].numpy() for name in arrays}
        config = FederatedConfig.from_run_config({**BASE, "history-dir": str(population)})
        assert check_train_reply(reply, shared, bound=10.0, max_bytes=None, dp=False, metric_keys=train_metric_keys(config),
                                 max_examples=examples_bound(config, 300)[0]) is None
        got = reply.content["arrays"]
        update = {n: got[n].numpy().astype(np.float64) - shared[n].astype(np.float64) for n in shared}
        norm = float(np.sqrt(sum(np.sum(u * u) for u in update.values())))
        assert 9.99 <= norm <= 10.0  # the whole budget, and within C
        changed = np.flatnonzero(np.any(update["item_embedding.weight"] != 0, axis=1) | (update["item_bias.weight"][:, 0] != 0))
        assert changed.tolist() == [target]  # all of it on the target's row and bias
        assert got["item_embedding.weight"].dtype == "float32"
        metrics = reply.content["metrics"]
        assert metrics["num-examples"] == int(np.median(np.diff(np.load(population / "train_indptr.npy"))))
        assert set(metrics.keys()) == {"num-examples", "train-loss", "update-norm", "clipped"}
    assert clean["target-hr"] <= 0.05
    assert attacked["target-hr"] >= clean["target-hr"] + 0.2
    assert attacked["target-median-rank"] < clean["target-median-rank"] / 5


def test_a_robust_aggregation_gets_one_reply_per_device_and_accepts_the_crafted_ones(population, tmp_path):
    target = choose_target(population, seed=0)
    row = run_attack(population, {**BASE, "num-server-rounds": 3, "evaluate-every": 3}, 0.1, "trimmed-mean", target, 0, tmp_path / "t")
    assert row["crafted"] > 0 and row["rejected"] == 0 and row["test-hr"] is not None


def test_compromised_devices_neither_train_honestly_nor_evaluate_nor_count(population, tmp_path):
    target = choose_target(population, seed=0)
    values = {**BASE, "history-dir": str(population), "results-dir": str(tmp_path / "run"), "checkpoint-dir": "none"}
    config = FederatedConfig.from_run_config(values)
    compromised = compromised_devices(200, 0.1, seed=0)
    inner = FastGrid(config, threads=1)
    grid = PoisonGrid(inner, config, compromised, TargetBoost(config, target, 20, seed=0))
    evaluated = []
    original = inner._evaluate

    def spy(group):
        evaluated.extend(m.metadata.dst_node_id - NODE_ID_BASE for m in group)
        return original(group)

    inner._evaluate = spy
    from fedpref.simulations.engines.fast import run_fast

    result = run_fast(config, grid=grid)
    assert result["rounds"][-1]["round"] == 8 and sum(grid.crafted.values()) > 0
    assert not inner.private.ready[compromised].any()  # the engine never trained nor evaluated them
    assert evaluated and not set(evaluated) & set(compromised.tolist())
    final = dict(np.load(tmp_path / "run" / "final_model.npz"))
    pop = Population(str(population))
    eligible = [u for u in range(200) if target not in pop.train_items(u) and pop.val[u] != target and pop.test[u] != target]
    everyone = target_exposure(final, population, config, target, [], private=grid.private_vectors())
    honest = target_exposure(final, population, config, target, compromised, private=grid.private_vectors())
    assert everyone["users"] == len(eligible)
    assert honest["users"] == len(set(eligible) - set(compromised.tolist()))
    assert 0.0 <= honest["target-hr@10"] <= 1.0


def test_the_command_line_runs_the_sweep_and_writes_the_table(population, tmp_path):
    out = tmp_path / "sweep"
    result = CliRunner().invoke(
        app,
        ["poison", "--population", str(population), "--rounds", "3", "--fraction-train", "0.2", "--evaluate-every", "3",
         "--fractions", "0,0.1", "--defences", "none,norm-bound", "--run-config", "dim=8 local-epochs=1", "--out", str(out), "--no-progress"],
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "sweep.json").read_text())
    assert [(r["fraction"], r["defence"]) for r in report["rows"]] == [(0.0, "none"), (0.1, "none"), (0.0, "norm-bound"), (0.1, "norm-bound")]
    assert report["norm-bound"] == pytest.approx(report["honest-norms"]["q50"]) and report["norm-bound"] < 10.0
    assert all(r["rejected"] == 0 for r in report["rows"])
    assert "| 10% (20) | none |" in (out / "sweep.md").read_text()
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "poisoning: item" in result.output and "target HR@10" in result.output
    bad = CliRunner().invoke(app, ["poison", "--population", str(population), "--defences", "krum", "--out", str(out), "--no-progress"])
    assert bad.exit_code != 0 and "unknown defence" in bad.output


def test_the_in_process_engine_gives_the_fast_engines_figures(synthetic_population, tmp_path):
    """The real ClientApp (in-process engine) behind the same wrapper: the same target hit rate,
    test HR@10 and honest update norms as the fast engine."""
    population = synthetic_population(tmp_path, 60, 200, 20, 0)
    target = choose_target(population, seed=0)
    base = {"num-server-rounds": 3, "fraction-train": 0.3, "evaluate-every": 3, "dim": 8, "local-epochs": 1}
    rows = {engine: run_attack(population, base, 0.1, "none", target, 0, tmp_path / engine, engine=engine, record_norms=True)
            for engine in ("inprocess", "fast")}
    assert rows["inprocess"]["crafted"] == rows["fast"]["crafted"] > 0
    assert rows["inprocess"]["target-hr"] == pytest.approx(rows["fast"]["target-hr"])
    assert rows["inprocess"]["test-hr"] == pytest.approx(rows["fast"]["test-hr"], abs=0.02)
    assert rows["inprocess"]["honest-norms"]["q50"] == pytest.approx(rows["fast"]["honest-norms"]["q50"], rel=1e-5)
