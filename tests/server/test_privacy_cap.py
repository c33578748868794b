"""The participation cap on the server's side: the one rule (models/participation.py), the cohort
sampler that never draws a device the rule stops, and a run that ends early, with its reason,
when too few devices may still train; both accounts in its record."""

import json
import random

import pytest

from fedpref.models.config import FederatedConfig
from fedpref.models.participation import may_train, refusal, window
from fedpref.server.grid import CohortSampler, CohortsExhausted
from fedpref.server.privacy import DpMechanism


def config(**values) -> FederatedConfig:
    return FederatedConfig.from_run_config({"catalogue-size": 50, "devices": 100, **values})


def test_the_rule_allows_k_rounds_in_all():
    capped = config(**{"dp-max-participations": 2, "num-server-rounds": 10})
    assert may_train(capped, 5, 0) and may_train(capped, 5, 1, 4)
    assert not may_train(capped, 5, 2, 3)
    assert "dp-max-participations = 2" in refusal(capped, 5, 2, 3)
    assert may_train(capped, 0, 7, 3)  # the popularity histogram (round 0) counts towards no cap
    assert may_train(capped, 3, 2, 3)  # a later stage of a round it has joined goes on
    assert may_train(config(**{"num-server-rounds": 10}), 9, 1000, 8)  # no cap


def test_under_the_tree_a_device_joins_at_most_one_round_of_each_window():
    tree = config(**{"dp-max-participations": 3, "num-server-rounds": 10, "dp-mechanism": "tree"})
    assert window(tree) == 4  # ceil(10 / 3): windows 1..4, 5..8, 9..12
    assert window(config(**{"dp-max-participations": 3, "num-server-rounds": 10})) == 0  # (gaussian: k in all)
    assert not may_train(tree, 4, 1, 1) and "window of 4 rounds (1..4)" in refusal(tree, 4, 1, 1)
    assert may_train(tree, 5, 1, 4) and not may_train(tree, 8, 2, 5) and may_train(tree, 9, 2, 8)
    assert not may_train(tree, 9, 3, 5)  # three rounds joined: the cap in all


class Nodes:
    def __init__(self, n: int) -> None:
        self.ids = list(range(1000, 1000 + n))

    def get_node_ids(self):
        return self.ids


def test_the_sampler_never_draws_a_capped_device_and_refuses_a_smaller_cohort():
    capped = config(**{"dp-max-participations": 2, "num-server-rounds": 10})
    sampler, grid = CohortSampler(random.Random(3), capped), Nodes(10)
    asked: dict[int, int] = {}
    rounds = 0
    with pytest.raises(CohortsExhausted, match=r"needs a cohort of 4 devices, but only [0-3] of 10 may still train"):
        for server_round in range(1, 11):
            cohort, every = sampler.sample(grid, 10, 4, training_round=server_round)
            assert len(cohort) == len(set(cohort)) == 4 and every == grid.ids
            for node in cohort:
                asked[node] = asked.get(node, 0) + 1
                assert asked[node] <= 2
            rounds = server_round
            # An evaluation cohort is drawn from every device and counts for nothing.
            assert len(sampler.sample(grid, 10, 10)[0]) == 10
    assert rounds == 5 or max(asked.values()) == 2  # 10 devices * 2 rounds hold at most 5 cohorts of 4
    assert all(sampler.rounds_joined(node) == (count, sampler.rounds_joined(node)[1]) for node, count in asked.items())
    # Its counts go into the checkpoint and come back.
    again = CohortSampler(random.Random(0), capped)
    again.restore_participation(sampler.participation_state())
    assert all(again.rounds_joined(n) == sampler.rounds_joined(n) for n in grid.ids)
    assert CohortSampler(random.Random(0), config()).participation_state() is None  # no cap: nothing to keep


def test_the_samplers_tree_cohorts_take_each_device_once_a_window():
    tree = config(**{"dp-max-participations": 2, "num-server-rounds": 6, "dp-mechanism": "tree"})
    sampler, grid = CohortSampler(random.Random(1), tree), Nodes(9)
    cohorts = [sampler.sample(grid, 9, 3, training_round=r)[0] for r in range(1, 7)]
    for first in (0, 3):  # windows of ceil(6 / 2) = 3 rounds
        drawn = [node for cohort in cohorts[first:first + 3] for node in cohort]
        assert len(drawn) == len(set(drawn)) == 9


def test_without_a_cap_the_draws_are_those_of_before():
    plain, capped = CohortSampler(random.Random(5), config()), CohortSampler(random.Random(5), config(**{"dp-max-participations": 9}))
    reference = random.Random(5)
    for r in range(1, 4):
        expected = reference.sample(Nodes(12).ids, 4)
        assert plain.sample(Nodes(12), 12, 4, training_round=r)[0] == expected == capped.sample(Nodes(12), 12, 4, training_round=r)[0]


def test_a_run_that_runs_out_of_devices_ends_early_with_its_reason(tmp_path, synthetic_population):
    from fedpref.models.published import MODEL_SUFFIX, parse_model
    from fedpref.server.app import ServerHooks
    from fedpref.server.publish import generate_signing_key
    from fedpref.simulations.engines.inprocess import run_inprocess

    population = synthetic_population(tmp_path, 6, 150, 10, 1)
    key, _ = generate_signing_key(tmp_path / "signing.key")
    run = FederatedConfig.from_run_config({
        "history-dir": str(population), "num-server-rounds": 4, "fraction-train": 0.5, "min-train-nodes": 3, "fraction-evaluate": 0.0,
        "dim": 4, "local-epochs": 1, "private-epochs": 1, "dp-noise-multiplier": 1.0, "dp-max-participations": 1,
        "results-dir": str(tmp_path / "results"), "resume": False, "publish-dir": str(tmp_path / "models"), "publish-key": str(key),
    })
    requests = []
    hooks = ServerHooks(on_exchange=[lambda sent, _: requests.extend(m.content["config"] for m in sent if m.metadata.message_type == "train")])
    result = run_inprocess(run, n_devices=6, hooks=hooks)
    # Six devices, each in one round, three a round: two rounds, then no whole cohort is left.
    assert [r["round"] for r in result["rounds"]] == [1, 2] and all(r["replies"] == 3 for r in result["rounds"])
    assert "round 3 needs a cohort of 3 devices, but only 0 of 6 may still train" in result["stopped-early"]
    privacy = result["privacy"]
    assert privacy["rounds-run"] == 2 and privacy["stopped-early"] == result["stopped-early"]
    assert privacy["accounting"] == "sampled" and privacy["max-participations"] == 1  # a simulation: sampled by default
    one = DpMechanism(1.0, 6, 3)
    assert privacy["epsilon-honest"] == pytest.approx(one.epsilon(1, privacy["delta"], accounting="honest"), rel=1e-9)
    assert privacy["epsilon-sampled"] <= privacy["epsilon-honest"] and privacy["epsilon"] == privacy["epsilon-sampled"]
    for row in result["rounds"]:
        assert row["epsilon"] == row["epsilon-sampled"] <= row["epsilon-honest"]
    assert json.loads((tmp_path / "results" / "rounds.json").read_text())["stopped-early"] == result["stopped-early"]
    # Every training request stated the plan's honest guarantee: one round a device, 4 rounds planned.
    assert len(requests) == 6 and all(
        (c["dp-epsilon"], c["dp-delta"], c["dp-rounds"], c["dp-max-participations"]) == (
            one.epsilon(1, privacy["delta"], accounting="honest"), privacy["delta"], 4, 1) for c in requests)
    # Each published model's signed metadata carries what the run had spent by its round.
    for row in result["rounds"]:
        model = parse_model((tmp_path / "models" / f"{row['model-version']}{MODEL_SUFFIX}").read_bytes())
        assert model.meta["privacy"] == {"round": row["round"], "epsilon-honest": row["epsilon-honest"], "epsilon-sampled": row["epsilon-sampled"],
                                         "delta": privacy["delta"], "rounds-planned": 4, "max-participations": 1}
