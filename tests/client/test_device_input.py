"""Hostile input to the Device API: every bad value is refused with an InvalidInput naming the
field and the fix, and nothing stored changes (the whole export, the change counter included,
is the same before and after)."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from fedpref.client import ALWAYS, Device, EligibilityPolicy, InvalidInput, Retention
from fedpref.client.inputs import CLOCK_SKEW, MAX_ITEM, MAX_KIND_LENGTH
from fedpref.client.store import events_table
from fedpref.models.preference import ModelSpec

NOW = 1_700_000_000.0
N_ITEMS, DIM = 30, 4


def model(n_items: int = N_ITEMS, dim: int = DIM, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"item_embedding.weight": rng.normal(size=(n_items, dim)).astype(dtype), "item_bias.weight": np.zeros((n_items, 1), dtype)}


@pytest.fixture
def device():
    """A device with a model, consent, two events and a personalised vector (something to lose)."""
    device = Device.in_memory(clock=lambda: NOW, retention=Retention(max_age_days=None, max_events=None))
    device.install_global(model(), ModelSpec(dim=DIM), version="r1")
    device.set_consent("on-device")
    device.record(1, "view", time=NOW - 60)
    device.record(2, "purchase", 9.5, time=NOW - 30)
    device.personalize(epochs=2)
    yield device
    device.close()


def stored(device: Device) -> dict:
    doc = device.export()
    doc.pop("exported_at")
    return doc


def refused(device: Device, call, field: str, fix: str) -> InvalidInput:
    """Call ``call``: it must raise InvalidInput for ``field`` with ``fix`` in its message, and the
    store must hold exactly what it held before."""
    before = stored(device)
    with pytest.raises(InvalidInput) as caught:
        call()
    assert caught.value.field == field
    assert fix in str(caught.value)
    assert len(str(caught.value)) < 400  # a hostile value is not echoed whole
    assert stored(device) == before
    return caught.value


# -- events ---------------------------------------------------------------------------------
@pytest.mark.parametrize("item", [MAX_ITEM + 1, 2**70, -1, True, "7", 7.0, np.uint64(2**64 - 1), None])
def test_an_item_that_is_not_an_int64_catalogue_index_is_refused(device, item):
    refused(device, lambda: device.record(item), "item", "an integer from 0 to 9,223,372,036,854,775,807")


def test_the_largest_int64_item_is_kept():
    device = Device.in_memory()
    device.record(2**63 - 1)
    assert [e.item for e in device.store.events()] == [9_223_372_036_854_775_807]


@pytest.mark.parametrize("when", [math.nan, math.inf, -math.inf, -1.0, "1700000000", True, NOW + CLOCK_SKEW + 1, 1e300])
def test_a_time_that_is_not_a_finite_time_up_to_the_clock_is_refused(device, when):
    refused(device, lambda: device.record(3, time=when), "time", "from 0 to at most 300 s ahead of this device's clock")


def test_a_time_within_the_clock_skew_allowance_is_kept_and_expires_like_any_other():
    clock = [NOW]
    device = Device.in_memory(clock=lambda: clock[0], retention=Retention(max_age_days=1, max_events=None))
    device.record(3, time=NOW + CLOCK_SKEW)
    assert [e.time for e in device.store.events()] == [NOW + 300]
    clock[0] = NOW + CLOCK_SKEW + 86400 + 1  # one day and a second after the event's time
    device.store.enforce_retention()
    assert device.store.events() == []


@pytest.mark.parametrize("value", ["1e3", True, math.nan, math.inf, 10**400, [1.0]])
def test_a_value_that_is_not_a_finite_number_is_refused(device, value):
    refused(device, lambda: device.record(3, "rating", value), "value", "must be a finite number")


@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        ("x" * 100_000, f"at most {MAX_KIND_LENGTH} characters"),
        ("view\x00", "printable characters only"),
        ("view\n", "printable characters only"),
        ("\x1b[31mview", "printable characters only"),
        ("", "must not be empty"),
        ("view,click", "must not hold a comma"),
        (" view", "must not start or end with a space"),
        (7, "must be a string"),
        (b"view", "must be a string"),
    ],
)
def test_a_kind_that_is_not_a_short_printable_name_is_refused(device, kind, problem):
    error = refused(device, lambda: device.record(3, kind), "kind", problem)
    assert "such as 'view'" in str(error)


def test_one_bad_event_in_a_batch_stores_none_of_the_batch(device):
    batch = [(10, "view", None, NOW - 5), (11, "view", None, NOW - 4), (12, "view", None, math.nan)]
    refused(device, lambda: device.record_many(batch), "events[2].time", "Unix time")
    refused(device, lambda: device.record_many([(10, "view", None, None), (11, "view")]), "events[1]", "(item, kind, value, time)")


# -- consent --------------------------------------------------------------------------------
def test_kinds_given_as_one_string_is_that_kind_never_its_letters(device):
    consent = device.set_consent("on-device", kinds="view")
    assert consent.kinds == frozenset({"view"})
    assert device.record(4, "view") and not device.record(5, "v")  # "v" is not a kind the person allowed


@pytest.mark.parametrize(
    ("kinds", "field", "fix"),
    [
        ("view,click", "kinds", "kinds=['view', 'click']"),
        (["view", "x" * 100_000], "kinds[1]", "at most 64 characters"),
        (["view", "a\x00b"], "kinds[1]", "printable"),
        ([3], "kinds[0]", "must be a string"),
        (3, "kinds", "one kind name or a list of them"),
        (b"view", "kinds", "one kind name or a list of them"),
        ([f"k{i}" for i in range(257)], "kinds", "at most 256 kinds"),
    ],
)
def test_consent_kinds_that_are_not_kind_names_are_refused(device, kinds, field, fix):
    refused(device, lambda: device.set_consent("federated", kinds), field, fix)


def test_an_unknown_consent_level_or_source_is_refused(device):
    refused(device, lambda: device.set_consent("everything"), "level", "choose one of: none, on-device, federated")
    refused(device, lambda: device.set_consent("x" * 100_000), "level", "choose one of")
    refused(device, lambda: device.set_consent("federated", source="a\x00b"), "source", "printable")


# -- models ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "field", "fix"),
    [
        (lambda m: m.update({"item_embedding.weight": m["item_embedding.weight"][:, :3]}), "shared['item_embedding.weight']", "shape (30, 4)"),
        (lambda m: m.update({"item_bias.weight": np.zeros((N_ITEMS, 2), np.float32)}), "shared['item_bias.weight']", "shape (30, 1)"),
        (lambda m: m.update({"item_bias.weight": np.zeros((N_ITEMS + 1, 1), np.float32)}), "shared['item_bias.weight']", "shape (30, 1)"),
        (lambda m: m.update({"item_embedding.weight": np.zeros(N_ITEMS, np.float32)}), "shared['item_embedding.weight']", "shape (30, 4)"),
        (lambda m: m.update({"item_embedding.weight": np.zeros((1, DIM), np.float32)}), "shared['item_embedding.weight']", "one row per catalogue item"),
        (lambda m: m.update({"item_embedding.weight": np.ones((N_ITEMS, DIM), np.int64)}), "shared['item_embedding.weight']", "floating-point"),
        (lambda m: m.update({"item_bias.weight": np.full((N_ITEMS, 1), "x")}), "shared['item_bias.weight']", "floating-point"),
        (lambda m: m["item_bias.weight"].__setitem__((3, 0), np.nan), "shared['item_bias.weight']", "finite"),
        (lambda m: m.update({"item_bias.weight": np.full((N_ITEMS, 1), 1e300)}), "shared['item_bias.weight']", "finite"),
        (lambda m: m.pop("item_bias.weight"), "shared", "global model has arrays"),
        (lambda m: m.update({"extra": np.zeros(3, np.float32)}), "shared", "global model has arrays"),
    ],
)
def test_a_global_model_of_the_wrong_shape_or_dtype_is_refused_and_the_model_installed_stays(device, change, field, fix):
    bad = model()
    change(bad)
    refused(device, lambda: device.install_global(bad, ModelSpec(dim=DIM), version="r2"), field, fix)
    assert device.personalize(epochs=1) == 2  # the installed model still works
    assert len(device.recommend(5)) == 5


def test_a_float64_global_model_is_kept_as_the_models_float32():
    device = Device.in_memory()
    device.install_global(model(dtype=np.float64), ModelSpec(dim=DIM))
    assert {a.dtype for a in device.global_model().values()} == {np.dtype(np.float32)}
    device.set_consent("on-device")
    device.record(1)
    assert device.personalize(epochs=1) == 1


def test_a_model_of_another_dimension_starts_a_new_private_vector_rather_than_crash(device):
    assert device.private()["user_embedding.weight"].shape == (1, DIM)
    device.install_global(model(dim=DIM + 2), ModelSpec(dim=DIM + 2))
    assert device.personalize(epochs=1) == 2
    assert device.private()["user_embedding.weight"].shape == (1, DIM + 2)


def test_other_bad_arguments_are_refused(device):
    refused(device, lambda: device.install_global(model(), "mf"), "spec", "ModelSpec")
    refused(device, lambda: device.install_global(model(), ModelSpec(dim=DIM), version="r\x00"), "version", "printable")
    refused(device, lambda: device.install_popularity(["1", "2"]), "popularity", "one finite count per catalogue item")
    refused(device, lambda: device.install_popularity(np.array([1.0, np.inf])), "popularity", "finite count")
    for k in (0, True, "3", 2.5):
        refused(device, lambda: device.recommend(k), "k", "an integer at least 1")
    for epochs in (0, -1, True, 10**9):
        refused(device, lambda: device.personalize(epochs), "epochs", "an integer from 1 to 10,000")
    refused(device, lambda: device.report_conditions(charging="no", unmetered=True, idle=True), "charging", "True or False")
    refused(device, lambda: device.set_policy(EligibilityPolicy(require_charging="yes")), "policy.require_charging", "True or False")
    refused(device, lambda: device.set_policy(EligibilityPolicy(max_report_age_s=math.nan)), "policy.max_report_age_s", "positive number")
    refused(device, lambda: device.set_policy("always"), "policy", "EligibilityPolicy")
    refused(device, lambda: device.remember_supernode_key("not a key"), "public_key", "OpenSSH public key")
    device.set_policy(ALWAYS)  # a good one passes


# -- all of it at once ----------------------------------------------------------------------
anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=80),
    st.binary(max_size=8),
    st.just(NOW - 1.0),
    st.just(NOW + CLOCK_SKEW),
    st.sampled_from(["view", "purchase", "1e3", "nan", "view\x00"]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(item=anything, kind=anything, value=anything, when=anything)
def test_record_either_keeps_the_event_exactly_or_refuses_it_and_keeps_the_store_as_it_was(device, item, kind, value, when):
    before = stored(device)
    try:
        kept = device.record(item, kind, value, when)
    except InvalidInput as exc:
        assert exc.field in ("item", "kind", "value", "time")
        assert stored(device) == before
        return
    assert kept is True  # consent on-device allows every kind
    with device.store.engine.connect() as conn:
        last = conn.execute(select(events_table).order_by(events_table.c.id.desc()).limit(1)).one()
    assert (type(item) is int or isinstance(item, np.integer)) and not isinstance(item, bool) and 0 <= item <= MAX_ITEM
    assert isinstance(kind, str) and kind.isprintable() and 1 <= len(kind) <= MAX_KIND_LENGTH
    assert last.item == item and last.kind == kind
    assert last.value == (None if value is None else float(value)) and (last.value is None or math.isfinite(last.value))
    assert last.time == (NOW if when is None else float(when)) and 0 <= last.time <= NOW + CLOCK_SKEW
