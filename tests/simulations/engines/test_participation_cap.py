"""The participation cap in the engines that play devices: the fast engine's devices refuse the
(k+1)-th training round as the ClientApp's do, keep their counts in the devices' state (a
resumed run keeps them), and a capped run computes on the fast engine what it computes on the
in-process engine (the real ClientApp), noise and both epsilons included."""

from dataclasses import replace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedpref.client.app import DECLINED
from fedpref.models.config import FederatedConfig
from fedpref.simulations.engines.fast import FastGrid, run_fast
from fedpref.simulations.engines.inprocess import NODE_ID_BASE, run_inprocess

N_DEVICES, N_ITEMS = 12, 150


@pytest.fixture(scope="module")
def population(synthetic_population, tmp_path_factory):
    return synthetic_population(tmp_path_factory.mktemp("cap"), N_DEVICES, N_ITEMS, 20, 3)


def config_of(population, results, **values) -> FederatedConfig:
    return FederatedConfig.from_run_config({
        "history-dir": str(population), "dim": 8, "local-epochs": 1, "private-epochs": 1, "clip-norm": 0.3, "num-server-rounds": 4,
        "fraction-train": 0.5, "evaluate-every": 2, "dp-noise-multiplier": 0.8, "dp-max-participations": 3, "results-dir": str(results),
        "resume": False, **values,
    })


def train(grid: FastGrid, config: FederatedConfig, device: int, server_round: int) -> Message:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    shared = config.model_spec.build(1, N_ITEMS, seed=0).get_shared()
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in shared.items()}), "config": ConfigRecord({"server-round": server_round})})
    [reply] = grid.send_and_receive([Message(content, dst_node_id=NODE_ID_BASE + device, message_type=MessageType.TRAIN)])
    return reply


def test_a_fast_engine_device_refuses_the_round_past_its_cap_and_a_resumed_grid_remembers(population, tmp_path):
    config = config_of(population, tmp_path, **{"dp-max-participations": 2})
    grid = FastGrid(config, threads=1)
    assert [train(grid, config, 5, r).has_error() for r in (1, 2)] == [False, False]
    refused = train(grid, config, 5, 3)
    assert refused.has_error() and refused.error.code == DECLINED
    assert grid.joined.dtype == np.uint16 and grid.joined[5] == 2 and grid.last_joined[5] == 2 and grid.joined.sum() == 2
    resumed = FastGrid(config, threads=1)
    resumed.restore_device_states(grid.device_states())
    assert train(resumed, config, 5, 4).has_error() and not train(resumed, config, 6, 4).has_error()
    older = {k: v for k, v in grid.device_states().items() if k not in ("joined", "last-joined")}
    with pytest.raises(ValueError, match="no count of the devices' participations"):
        FastGrid(config, threads=1).restore_device_states(older)


@pytest.mark.filterwarnings("ignore:reproducible-noise=true")
def test_a_capped_run_agrees_between_the_fast_and_the_in_process_engines(population, tmp_path):
    # Both engines draw the same noise and cohorts only when the run asks for them from its seed.
    config = config_of(population, tmp_path / "inprocess", **{"reproducible-noise": True, "dropout": 0.2, "seed": 4})
    reference = run_inprocess(config, n_devices=N_DEVICES)
    grid = FastGrid(replace(config, results_dir=str(tmp_path / "fast")))
    fast = run_fast(replace(config, results_dir=str(tmp_path / "fast")), grid=grid)
    assert len(reference["rounds"]) == len(fast["rounds"]) == 4
    for key in ("epsilon", "epsilon-sampled", "epsilon-honest"):
        assert fast["privacy"][key] == reference["privacy"][key]
    for a, b in zip(reference["rounds"], fast["rounds"], strict=True):
        assert (a["epsilon-sampled"], a["epsilon-honest"], a["replies"]) == (b["epsilon-sampled"], b["epsilon-honest"], b["replies"])
    ref_model, fast_model = np.load(tmp_path / "inprocess" / "final_model.npz"), np.load(tmp_path / "fast" / "final_model.npz")
    for name in ref_model.files:
        assert np.linalg.norm(fast_model[name] - ref_model[name]) <= 1e-5 * np.linalg.norm(ref_model[name])
    # Four cohorts of 6 of 12 devices: some device reached its cap of 3, and none went past it.
    assert grid.joined.max() == 3
