"""The update guard: what leaves a device is within the clipping bound."""

import numpy as np
import pytest

from fedpref.client.guard import clip_update, encode_update
from fedpref.models.contract import shared_norm


def test_a_small_update_passes_unchanged():
    # norm = sqrt(4 * 0.1**2) = 0.2 <= 1
    update = {"a": np.full(4, 0.1, np.float32)}
    out, norm, clipped = clip_update(update, 1.0)
    assert norm == pytest.approx(0.2) and not clipped
    np.testing.assert_array_equal(out["a"], update["a"])


def test_a_large_update_is_scaled_to_the_bound():
    # norm = sqrt(21 * 2**2) = 9.165...; scaled to 1
    update = {"a": np.full(20, 2.0, np.float32), "b": np.full(1, 2.0, np.float32)}
    out, norm, clipped = clip_update(update, 1.0)
    assert norm == pytest.approx(np.sqrt(21 * 4)) and clipped
    assert shared_norm(out) <= 1.0


def test_what_the_server_recovers_is_within_the_bound_despite_float32_rounding():
    rng = np.random.default_rng(0)
    shared = {"q": rng.normal(0, 3, (5000, 64)).astype(np.float32)}
    update = {"q": rng.normal(0, 1, (5000, 64)).astype(np.float32)}
    sent, _, _ = encode_update(shared, update, 0.01)
    recovered = sent["q"].astype(np.float64) - shared["q"].astype(np.float64)
    assert np.sqrt(np.sum(recovered**2)) <= 0.01
    assert sent["q"].dtype == np.float32


def test_a_non_positive_bound_is_refused():
    with pytest.raises(ValueError, match="clipping norm should be a positive"):
        clip_update({"a": np.ones(2)}, 0.0)
