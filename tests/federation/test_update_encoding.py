"""Updates encoded in float16 or 8 bits: unbiased stochastic rounding, within the clipping
bound after decoding, a fraction of the bytes, and a run that still learns."""

import numpy as np
import pytest
from flwr.app import Array

from fedpref.models.encoding import EncodingError, decode, encode, encode_within, norm
from fedpref.models.federation import FederatedConfig, RunConfigError
from fedpref.simulations.inprocess import run_inprocess


def update(seed=0):
    rng = np.random.default_rng(seed)
    return {"item_embedding.weight": rng.normal(0, 0.01, (300, 16)).astype(np.float32), "item_bias.weight": rng.normal(0, 0.01, (300, 1)).astype(np.float32)}


def test_int8_stochastic_rounding_is_unbiased_and_float16_is_close():
    u = update()
    names = list(u)
    mean = np.zeros_like(u["item_embedding.weight"], dtype=np.float64)
    trials = 400
    rng = np.random.default_rng(1)
    for _ in range(trials):
        mean += decode(encode(u, "int8", rng), names, "int8")["item_embedding.weight"]
    scale = np.abs(u["item_embedding.weight"]).max() / 127
    # Each decoded value is within one step of the true one, and their mean tends to it.
    assert np.abs(mean / trials - u["item_embedding.weight"]).max() < 4 * scale / np.sqrt(trials) * 2
    half = decode(encode(u, "float16", rng), names, "float16")
    assert np.allclose(half["item_embedding.weight"], u["item_embedding.weight"], rtol=1e-3, atol=1e-6)


def test_the_decoded_update_stays_within_the_bound_and_costs_fewer_bytes():
    u = update()
    bound = norm(u)  # exactly at the bound: rounding would push it over
    rng = np.random.default_rng(2)
    for encoding in ("float16", "int8"):
        sent = encode_within(u, encoding, bound, rng)
        assert norm(decode(sent, list(u), encoding)) <= bound
    raw = sum(len(Array(v).data) for v in u.values())
    assert sum(len(Array(v).data) for v in encode_within(u, "float16", bound, rng).values()) < 0.55 * raw
    assert sum(len(Array(v).data) for v in encode_within(u, "int8", bound, rng).values()) < 0.30 * raw


def test_malformed_encoded_updates_are_refused():
    u = update()
    sent = encode(u, "int8", np.random.default_rng(0))
    with pytest.raises(EncodingError, match="carries arrays"):
        decode({k: v for k, v in sent.items() if not k.endswith("#scale")}, list(u), "int8")
    sent["item_bias.weight#scale"] = np.array([np.nan], dtype=np.float32)
    with pytest.raises(EncodingError, match="positive finite scale"):
        decode(sent, list(u), "int8")
    with pytest.raises(RunConfigError, match="update-encoding"):
        FederatedConfig.from_run_config({"update-encoding": "int4"})
    with pytest.raises(RunConfigError, match="secure aggregation quantises"):
        FederatedConfig.from_run_config({"update-encoding": "int8", "secagg": True})


@pytest.mark.parametrize("encoding", ["float16", "int8"])
def test_a_run_with_encoded_updates_follows_the_float32_run(tmp_path, synthetic_population, encoding):
    population = synthetic_population(tmp_path, 20, n_items=150, mean_events=15, seed=8)
    base = {"history-dir": str(population), "num-server-rounds": 4, "dim": 8, "local-epochs": 1, "private-epochs": 1,
            "evaluate-every": 4, "clip-norm": 0.5}
    plain = run_inprocess(FederatedConfig.from_run_config({**base, "results-dir": str(tmp_path / "f32"), "checkpoint-dir": str(tmp_path / "c1")}), n_devices=20)
    coded = run_inprocess(FederatedConfig.from_run_config({**base, "results-dir": str(tmp_path / encoding), "checkpoint-dir": str(tmp_path / "c2"), "update-encoding": encoding}), n_devices=20)
    assert all(r["replies"] == 20 for r in coded["rounds"])
    a, b = np.load(tmp_path / "f32" / "final_model.npz"), np.load(tmp_path / encoding / "final_model.npz")
    diff = np.abs(a["item_embedding.weight"] - b["item_embedding.weight"]).max()
    assert diff < (0.05 if encoding == "int8" else 0.01)  # the same training, up to rounding
    assert abs(coded["rounds"][-1]["val-hr"] - plain["rounds"][-1]["val-hr"]) <= 0.15
