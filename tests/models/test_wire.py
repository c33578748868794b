"""fedpref.models.wire: the named seed streams and what a reply carries."""

import numpy as np
from flwr.supercore.differential_privacy import KEY_NORM_BIT

from fedpref.models.config import FederatedConfig
from fedpref.models.wire import (
    PARTIAL_AGGREGATE,
    Stream,
    evaluation_metrics,
    partial_training_metrics,
    stream_rng,
    training_content,
    training_metrics,
)


def test_the_streams_keep_their_numbers_so_that_runs_repeat():
    assert [int(s) for s in (Stream.TRAIN, Stream.EVALUATE, Stream.DROPOUT, Stream.ROUNDING, Stream.POPULARITY, Stream.STRAGGLER)] == [1, 2, 3, 4, 5, 6]
    assert Stream.AVAILABILITY == 6 and Stream.TIME_ZONE == 7
    assert stream_rng(3, 17, 5, Stream.ROUNDING).random() == np.random.default_rng([3, 17, 5, 4]).random()
    assert stream_rng(3, 17, None, Stream.TIME_ZONE).integers(24) == np.random.default_rng([3, 17, 7]).integers(24)


def test_under_dp_a_training_reply_carries_the_equal_weight_and_at_most_the_norm_bit():
    plain = FederatedConfig.from_run_config({})
    dp = FederatedConfig.from_run_config({"dp-noise-multiplier": 1.0, "dp-clipping": "fixed"})
    adaptive = FederatedConfig.from_run_config({"dp-noise-multiplier": 1.0, "dp-clipping": "adaptive"})
    args = {"examples": 40, "loss": 2.5, "norm": 3.0, "clipped": True}
    assert training_metrics(plain, **args) == {"num-examples": 40, "train-loss": 2.5, "update-norm": 3.0, "clipped": 1.0}
    assert training_metrics(dp, **args) == {"num-examples": 1}
    assert training_metrics(adaptive, **args) == {"num-examples": 1, KEY_NORM_BIT: 0}
    assert training_metrics(adaptive, **{**args, "clipped": False}) == {"num-examples": 1, KEY_NORM_BIT: 1}


def test_a_partial_aggregate_sums_what_its_devices_would_have_sent():
    adaptive = FederatedConfig.from_run_config({"dp-noise-multiplier": 1.0, "dp-clipping": "adaptive"})
    clipped = np.array([True, False, False])
    metrics, partial = partial_training_metrics(adaptive, np.ones(3), np.array([5, 6, 7]), np.zeros(3), np.ones(3), clipped, dropped=1)
    assert metrics == {"num-examples": 3, KEY_NORM_BIT: 2 / 3}
    assert partial == {"devices": 3, "dropped": 1, "weight": 3.0, "norm-bits": 2}
    content = training_content({"a": np.zeros((2, 2), np.float32)}, metrics, partial)
    assert set(content.array_records) == {"arrays"} and PARTIAL_AGGREGATE in content.config_records


def test_evaluation_metrics_of_one_device_and_of_many():
    one = evaluation_metrics(np.array([[0, 3, 20, 50]]), k=10)
    assert one["num-examples"] == 1 and one["val-hr"] == 1.0 and one["test-hr"] == 0.0 and one["val-full-hr"] == 1.0
    assert one["val-ndcg"] == 1.0 and one["test-full-ndcg"] == 0.0
    many = evaluation_metrics(np.array([[0, 3, 20, 50], [20, 50, 0, 3]]), k=10)
    assert many["num-examples"] == 2 and many["val-hr"] == many["test-hr"] == 0.5
