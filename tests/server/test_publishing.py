"""Signed model publishing: the server publishes each version with its SHA-256 and an Ed25519
signature; devices fetch the latest over HTTP with If-None-Match and refuse any model that
fails a check, keeping the model they had."""

import base64
import dataclasses
import datetime
import json
import os
import socket
import stat
import threading
import time

import numpy as np
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fedpref.client.model_fetch import (
    CACHED_MANIFEST,
    CACHED_MODEL,
    ModelFetchError,
    ModelVerificationError,
    cached_model,
    fetch_latest,
    verify_model,
)
from fedpref.models.published import MAGIC, Manifest, PublishedFormatError, parse_model, serialize_model, sha256_hex
from fedpref.server.model_http import model_router
from fedpref.server.publish import ModelPublisher, generate_signing_key, load_signing_key


def model_arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"item_embedding": rng.normal(size=(40, 8)).astype(np.float32), "item_bias": rng.normal(size=40).astype(np.float32)}


def assert_same_arrays(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
        assert got[name].dtype == expected[name].dtype


@pytest.fixture
def keys(tmp_path):
    """(private key path, public key path) of the operator's signing key."""
    return generate_signing_key(tmp_path / "keys" / "models.key")


@pytest.fixture
def publisher(tmp_path, keys):
    return ModelPublisher(tmp_path / "published", keys[0])


@pytest.fixture
def base_url(publisher):
    """The model routes over real HTTP: uvicorn on a free port of 127.0.0.1, in a thread."""
    app = FastAPI()
    app.include_router(model_router(publisher.folder))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound here and handed over: no race for the port
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started and thread.is_alive() and time.time() < deadline:
        time.sleep(0.01)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture
def fetch(base_url, keys, tmp_path):
    """fetch_latest from the test server with the trusted public key and one device cache."""
    cache = tmp_path / "device-cache"
    return lambda: fetch_latest(base_url, keys[1], cache_dir=cache, timeout=5)


def cache_files(tmp_path) -> tuple[bytes, bytes]:
    cache = tmp_path / "device-cache"
    return (cache / CACHED_MODEL).read_bytes(), (cache / CACHED_MANIFEST).read_bytes()


def publish(publisher: ModelPublisher, round_: int) -> Manifest:
    return publisher.publish(model_arrays(round_), version=f"run7-r{round_:04d}", round=round_, run="7", meta={"kind": "mf", "dim": 8})


# --- over HTTP -------------------------------------------------------------------------------


def test_a_device_downloads_a_model_once_and_again_only_when_a_new_version_is_published(publisher, fetch):
    v1 = publish(publisher, 1)
    v1_manifest_bytes = (publisher.folder / "run7-r0001.json").read_bytes()

    first = fetch()
    assert (first.version, first.not_modified) == ("run7-r0001", False)
    assert first.downloaded_bytes == v1.size + len(v1_manifest_bytes)  # model file + its manifest
    assert_same_arrays(first.arrays, model_arrays(1))
    assert first.model.meta == {"kind": "mf", "dim": 8}

    second = fetch()  # unchanged: If-None-Match matches, 304
    assert (second.version, second.not_modified, second.downloaded_bytes) == ("run7-r0001", True, 0)
    assert_same_arrays(second.arrays, model_arrays(1))

    v2 = publish(publisher, 2)
    third = fetch()
    assert (third.version, third.not_modified) == ("run7-r0002", False)
    assert third.downloaded_bytes == v2.size + len((publisher.folder / "run7-r0002.json").read_bytes())
    assert_same_arrays(third.arrays, model_arrays(2))
    assert fetch().downloaded_bytes == 0


def test_a_model_file_with_one_byte_flipped_is_refused_and_the_cached_model_stays(publisher, fetch, keys, tmp_path):
    publish(publisher, 1)
    fetch()
    before = cache_files(tmp_path)
    publish(publisher, 2)
    path = publisher.folder / "run7-r0002.model"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last array
    path.write_bytes(bytes(data))

    with pytest.raises(ModelVerificationError, match="sha256 check failed") as refused:
        fetch()

    assert refused.value.check == "sha256"
    assert cache_files(tmp_path) == before
    assert cached_model(tmp_path / "device-cache", keys[1]).version == "run7-r0001"


def test_an_older_round_served_as_the_latest_is_refused_as_a_rollback(publisher, fetch, keys, tmp_path):
    publish(publisher, 1)
    publish(publisher, 2)
    assert fetch().version == "run7-r0002"
    before = cache_files(tmp_path)
    # A mirror (or an attacker) serves round 1's validly signed manifest as the latest.
    (publisher.folder / "latest.json").write_bytes((publisher.folder / "run7-r0001.json").read_bytes())
    with pytest.raises(ModelVerificationError, match="rollback check failed") as refused:
        fetch()
    assert refused.value.check == "rollback"
    assert cache_files(tmp_path) == before


def test_a_model_signed_by_another_key_is_refused(publisher, fetch, tmp_path):
    publish(publisher, 1)
    fetch()
    before = cache_files(tmp_path)
    impostor = ModelPublisher(publisher.folder, Ed25519PrivateKey.generate())
    impostor.publish(model_arrays(2), version="run7-r0002", round=2, run="7")

    with pytest.raises(ModelVerificationError, match=f"signed with key {impostor.key_id}, but this device trusts key {publisher.key_id}") as refused:
        fetch()

    assert refused.value.check == "key"
    assert cache_files(tmp_path) == before


def test_a_manifest_that_names_the_trusted_key_but_was_signed_by_another_is_refused(publisher, keys):
    publish(publisher, 1)
    manifest = publisher.latest()
    model_bytes = (publisher.folder / "run7-r0001.model").read_bytes()
    other = Ed25519PrivateKey.generate()
    forged = dataclasses.replace(manifest, signature=base64.b64encode(other.sign(manifest.signed_bytes())).decode())

    assert verify_model(model_bytes, manifest, keys[1]).version == "run7-r0001"  # the genuine one passes
    with pytest.raises(ModelVerificationError, match="signature check failed") as refused:
        verify_model(model_bytes, forged, keys[1])
    assert refused.value.check == "signature"


def test_a_manifest_whose_hash_was_changed_to_match_an_altered_model_is_refused(publisher, fetch, tmp_path):
    publish(publisher, 1)
    fetch()
    before = cache_files(tmp_path)
    publish(publisher, 2)
    # A mirror swaps in other arrays and rewrites the hash and size in the manifest; the signature stays.
    altered = serialize_model(model_arrays(99), version="run7-r0002", round=2, run="7", created=publisher.latest().created, meta={"kind": "mf", "dim": 8})
    (publisher.folder / "run7-r0002.model").write_bytes(altered)
    raw = json.loads((publisher.folder / "run7-r0002.json").read_bytes())
    raw.update(sha256=sha256_hex(altered), size=len(altered))
    for name in ("run7-r0002.json", "latest.json"):
        (publisher.folder / name).write_text(json.dumps(raw))

    with pytest.raises(ModelVerificationError, match="does not match its Ed25519 signature") as refused:
        fetch()

    assert refused.value.check == "signature"
    assert cache_files(tmp_path) == before


def test_a_signed_manifest_of_another_version_does_not_vouch_for_this_model(publisher, keys):
    publish(publisher, 1)
    v1_bytes = (publisher.folder / "run7-r0001.model").read_bytes()
    signer = load_signing_key(keys[0])
    claim = dataclasses.replace(publisher.latest(), version="run7-r0009", round=9)  # v1's bytes, another name
    claim = dataclasses.replace(claim, signature=base64.b64encode(signer.sign(claim.signed_bytes())).decode())

    with pytest.raises(ModelVerificationError, match="version 'run7-r0001' != 'run7-r0009'; round 1 != 9") as refused:
        verify_model(v1_bytes, claim, keys[1])
    assert refused.value.check == "identity"


def test_fetching_before_anything_is_published_says_so(fetch):
    with pytest.raises(ModelFetchError, match="answered 404: no model has been published yet"):
        fetch()


def test_an_unreachable_server_is_a_fetch_error(keys, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(ModelFetchError, match="could not reach"):
        fetch_latest(f"http://127.0.0.1:{port}", keys[1], cache_dir=tmp_path / "cache", timeout=2)


# --- the routes ------------------------------------------------------------------------------


@pytest.fixture
def routes(publisher):
    app = FastAPI()
    app.include_router(model_router(publisher.folder))
    return TestClient(app)


def test_the_routes_serve_model_files_and_manifests_with_their_etag(publisher, routes):
    assert routes.get("/models/latest").status_code == 404
    assert routes.get("/models/latest/manifest").json()["detail"].startswith("no model has been published yet")
    v1, v2 = publish(publisher, 1), publish(publisher, 2)

    latest = routes.get("/models/latest")
    assert latest.status_code == 200
    assert latest.content == (publisher.folder / "run7-r0002.model").read_bytes()
    assert latest.headers["etag"] == f'"{v2.sha256}"'
    assert (latest.headers["x-fedpref-version"], latest.headers["x-fedpref-key-id"], latest.headers["x-fedpref-signature"]) == (v2.version, v2.key_id, v2.signature)
    assert latest.headers["cache-control"] == "no-cache"
    assert Manifest.from_json(routes.get("/models/latest/manifest").content) == v2
    assert Manifest.from_json(routes.get("/models/run7-r0001/manifest").content) == v1
    old = routes.get("/models/run7-r0001")
    assert sha256_hex(old.content) == v1.sha256 and "immutable" in old.headers["cache-control"]


@pytest.mark.parametrize("if_none_match", ['"{sha}"', 'W/"{sha}"', '"0000", "{sha}"', "*"])
def test_a_matching_if_none_match_gets_304_and_no_body(publisher, routes, if_none_match):
    manifest = publish(publisher, 1)
    response = routes.get("/models/latest", headers={"If-None-Match": if_none_match.format(sha=manifest.sha256)})
    assert (response.status_code, response.content, response.headers["etag"]) == (304, b"", manifest.etag)
    assert routes.get("/models/latest", headers={"If-None-Match": '"' + "0" * 64 + '"'}).status_code == 200


def test_a_manifest_answers_304_to_its_own_etag(publisher, routes):
    publish(publisher, 1)
    raw = (publisher.folder / "latest.json").read_bytes()
    etag = f'"{sha256_hex(raw)}"'

    first = routes.get("/models/latest/manifest")
    again = routes.get("/models/latest/manifest", headers={"If-None-Match": etag})
    by_version = routes.get("/models/run7-r0001/manifest", headers={"If-None-Match": etag})

    assert (first.status_code, first.content, first.headers["etag"]) == (200, raw, etag)
    assert (again.status_code, again.content) == (304, b"")
    assert (by_version.status_code, by_version.headers["cache-control"]) == (304, "public, max-age=31536000, immutable")
    publish(publisher, 2)
    assert routes.get("/models/latest/manifest", headers={"If-None-Match": etag}).status_code == 200


@pytest.mark.parametrize(
    "path, detail",
    [
        ("/models/run7-r0042", "model version 'run7-r0042' is not published"),
        ("/models/run7-r0042/manifest", "model version 'run7-r0042' is not published"),
        ("/models/.hidden", "cannot name a model version"),
        ("/models/..%2Fkeys%2Fmodels.key", "Not Found"),  # "/" in a version: no route matches
    ],
)
def test_unknown_or_invalid_versions_are_404(publisher, routes, path, detail):
    publish(publisher, 1)
    response = routes.get(path)
    assert response.status_code == 404
    assert detail in response.json()["detail"]


# --- the publisher and its key ---------------------------------------------------------------


def test_the_publisher_keeps_every_version_and_refuses_to_overwrite_one(publisher):
    assert publisher.latest() is None and publisher.versions() == []
    v1 = publisher.publish(model_arrays(1), version="run7-r0001", round=1, run=7, created="2026-01-01T00:00:00+00:00")
    v2 = publisher.publish(model_arrays(2), version="run7-r0002", round=2, run=7, created="2026-01-01T00:01:00+00:00")

    assert publisher.versions() == ["run7-r0001", "run7-r0002"]
    assert publisher.latest() == v2 and publisher.manifest("run7-r0001") == v1
    assert (publisher.folder / "latest.json").read_bytes() == (publisher.folder / "run7-r0002.json").read_bytes()
    assert v1.run == "7" and v1.size == (publisher.folder / "run7-r0001.model").stat().st_size
    assert sorted(p.name for p in publisher.folder.iterdir()) == [  # no temp files left
        ".publish.lock", ".sequence", "latest.json", "run7-r0001.json", "run7-r0001.model", "run7-r0002.json", "run7-r0002.model"
    ]
    with pytest.raises(FileExistsError, match="'run7-r0001' is already published"):
        publisher.publish(model_arrays(3), version="run7-r0001", round=3, run=7)
    assert publisher.manifest("run7-r0001") == v1
    for bad in ("latest", "../x", "a/b", "", "-r1"):
        with pytest.raises(ValueError, match="cannot name a model version"):
            publisher.publish(model_arrays(3), version=bad, round=3, run=7)


T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc).timestamp()


def test_the_sequence_increases_across_runs_restarts_and_a_lost_sequence_file(tmp_path, keys):
    folder = tmp_path / "published"
    first = ModelPublisher(folder, keys[0], clock=lambda: T0)
    a = [first.publish(model_arrays(r), version=f"a-r{r:04d}", round=r, run="a") for r in (1, 2)]
    restarted = ModelPublisher(folder, keys[0], clock=lambda: T0)  # another run, another process
    b = restarted.publish(model_arrays(1), version="b-r0001", round=1, run="b")
    assert [m.sequence for m in a + [b]] == [1, 2, 3]
    sequence_file = folder / ".sequence"
    assert json.loads(sequence_file.read_bytes()) == {"sequence": 3, "key_id": first.key_id}
    assert stat.S_IMODE(sequence_file.stat().st_mode) == 0o600

    sequence_file.unlink()  # lost: latest.json still holds the highest
    assert restarted.publish(model_arrays(2), version="b-r0002", round=2, run="b").sequence == 3 + 1

    sequence_file.write_text("{damaged")
    with pytest.raises(ValueError, match="sequence file .* is damaged: restore it from a backup, or remove it"):
        restarted.publish(model_arrays(3), version="b-r0003", round=3, run="b")
    assert restarted.versions() == ["a-r0001", "a-r0002", "b-r0001", "b-r0002"]  # nothing published


def test_a_version_expires_expiry_days_after_it_is_published(tmp_path, keys):
    publisher = ModelPublisher(tmp_path / "published", keys[0], expiry_days=7.5, clock=lambda: T0)
    manifest = publisher.publish(model_arrays(1), version="v1", round=1, run="7")
    assert manifest.created == "2026-01-01T00:00:00.000+00:00"
    assert manifest.expires == "2026-01-08T12:00:00.000+00:00"
    assert manifest.expires_at == T0 + 7.5 * 86400
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert ModelPublisher(tmp_path / "default", keys[0]).expiry_days == 30
    for bad in (0, -1, float("nan"), float("inf"), 3651, True, "30"):
        with pytest.raises(ValueError, match="expiry_days must be a number of days in \\(0, 3650\\]"):
            ModelPublisher(tmp_path / "bad", keys[0], expiry_days=bad)


def test_a_manifest_published_before_sequence_numbers_is_refused_with_the_reason(publisher, routes, keys):
    # A folder published by an earlier fedpref: format 1, no sequence, no expiry, signed as v1.
    manifest = publish(publisher, 1)
    legacy = {k: v for k, v in json.loads(manifest.to_json()).items() if k not in ("sequence", "expires")}
    legacy["format"] = 1
    for name in ("run7-r0001.json", "latest.json"):
        (publisher.folder / name).write_text(json.dumps(legacy))
    (publisher.folder / ".sequence").unlink()
    model_bytes = (publisher.folder / "run7-r0001.model").read_bytes()
    reason = "manifest format 1 has no sequence number or expiry, so a device cannot tell it from an older model replayed to it"

    with pytest.raises(ModelVerificationError, match=f"manifest check failed: {reason}"):
        verify_model(model_bytes, json.dumps(legacy), keys[1])
    answer = routes.get("/models/latest/manifest")
    assert answer.status_code == 500 and reason in answer.json()["detail"]
    # The publisher still knows the version (a new run may not reuse its name) and publishes on.
    assert publisher.versions() == ["run7-r0001"]
    assert publish(publisher, 2).sequence == 1
    assert Manifest.from_json(routes.get("/models/latest/manifest").content).version == "run7-r0002"


def test_the_signing_key_is_private_and_its_public_half_lies_next_to_it(keys, tmp_path):
    private, public = keys
    assert public == private.with_name("models.key.pub")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert isinstance(load_signing_key(private), Ed25519PrivateKey)
    with pytest.raises(FileExistsError, match="keeps its key"):
        generate_signing_key(private)
    with pytest.raises(FileNotFoundError, match="make one with"):
        load_signing_key(tmp_path / "missing.key")
    with pytest.raises(ValueError, match="not an unencrypted PEM private key"):
        load_signing_key(public)
    os.chmod(private, 0o644)
    with pytest.warns(UserWarning, match="chmod 600"):
        load_signing_key(private)


# --- the format ------------------------------------------------------------------------------


def test_identical_input_gives_identical_bytes():
    arrays = model_arrays(1)
    reordered = {name: arrays[name] for name in reversed(list(arrays))}
    big_endian = {name: a.astype(a.dtype.newbyteorder(">")) for name, a in arrays.items()}
    fortran = {name: np.asfortranarray(a) for name, a in arrays.items()}
    identity = dict(version="v1", round=3, run="7", created="2026-01-01T00:00:00+00:00", meta={"kind": "mf", "dim": 8})

    data = serialize_model(arrays, **identity)
    for same in (arrays, reordered, big_endian, fortran):
        assert serialize_model(same, **identity) == data
    assert serialize_model(arrays, **{**identity, "meta": {"dim": 8, "kind": "mf"}}) == data
    changed = {**arrays, "item_bias": arrays["item_bias"] + np.float32(1e-6)}
    assert sha256_hex(serialize_model(changed, **identity)) != sha256_hex(data)
    parsed = parse_model(data)
    assert_same_arrays(parsed.arrays, arrays)
    assert (parsed.version, parsed.round, parsed.run, parsed.created, parsed.meta) == ("v1", 3, "7", identity["created"], identity["meta"])


def _header(data: bytes) -> dict:
    n = int.from_bytes(data[8:12], "little")
    return json.loads(data[12:12 + n])


def _with_header(data: bytes, header: dict) -> bytes:
    old = int.from_bytes(data[8:12], "little")
    raw = json.dumps(header).encode()
    return MAGIC + len(raw).to_bytes(4, "little") + raw + data[12 + old:]


def _edit(data: bytes, change) -> bytes:
    header = _header(data)
    change(header)
    return _with_header(data, header)


GOOD = serialize_model({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, dtype=np.int64)}, version="v1", round=1, run="7", created="2026-01-01T00:00:00+00:00")


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "not a fedpref model file \\(too short"),
        (b"PK\x03\x04" + GOOD[4:], "not a fedpref model file \\(starts with b'PK"),
        (MAGIC + (10**6).to_bytes(4, "little") + b"{}", "header claims 1000000 bytes"),
        (MAGIC + (4).to_bytes(4, "little") + b"{no}", "header is not valid JSON"),
        (GOOD[:-1], "truncated or damaged"),
        (GOOD + b"\x00", "1 bytes after its last array"),
        (_edit(GOOD, lambda h: h.update(format=2)), "format 2 is not 1"),
        (_edit(GOOD, lambda h: h.pop("round")), "field 'round' is missing"),
        (_edit(GOOD, lambda h: h.update(version="../etc")), "cannot name a model version"),
        (_edit(GOOD, lambda h: h["arrays"][0].update(dtype="|O")), "only little-endian bool, integer or float"),
        (_edit(GOOD, lambda h: h["arrays"][0].update(dtype=">f4")), "only little-endian bool, integer or float"),
        (_edit(GOOD, lambda h: h["arrays"][0].update(shape=[3, 3])), "needs 36"),
        (_edit(GOOD, lambda h: h["arrays"][0].update(shape=[-2, -3])), "must be non-negative integers"),
        (_edit(GOOD, lambda h: h["arrays"].reverse()), "claims bytes|out of name order"),
        (_edit(GOOD, lambda h: h.update(arrays=[])), "lists no arrays"),
    ],
)
def test_malformed_model_files_are_refused_with_the_reason(data, reason):
    with pytest.raises(PublishedFormatError, match=reason):
        parse_model(data)


def test_arrays_that_are_not_plain_numbers_cannot_be_published():
    with pytest.raises(ValueError, match="array 'names' has dtype <U1: a published model holds only bool, integer or float arrays"):
        serialize_model({"names": np.array(["a", "b"])}, version="v1", round=1, run="7", created="2026")
    with pytest.raises(ValueError, match="metadata must be plain JSON"):
        serialize_model(model_arrays(1), version="v1", round=1, run="7", created="2026", meta={"lr": float("nan")})


def test_malformed_manifests_are_refused_with_the_reason(publisher, keys):
    good = json.loads(publish(publisher, 1).to_json())
    model_bytes = (publisher.folder / "run7-r0001.model").read_bytes()
    cases = [
        (b"\x00not json", "manifest is not valid JSON"),
        (json.dumps([good]), "not a JSON object"),
        (json.dumps({k: v for k, v in good.items() if k != "sha256"}), "missing \\['sha256'\\]"),
        (json.dumps({**good, "extra": 1}), "unknown \\['extra'\\]"),
        (json.dumps({**good, "sha256": "ABC"}), "not 64 lowercase hex digits"),
        (json.dumps({**good, "size": "12"}), "'size' must be a int"),
        (json.dumps({**good, "signature": "!!"}), "signature is not base64"),
        (json.dumps({**good, "signature": base64.b64encode(b"short").decode()}), "has 5 bytes, an Ed25519 signature has 64"),
        (json.dumps({**good, "format": 9}), "manifest format 9 is not 2"),
        (json.dumps({**good, "sequence": 0}), "sequence must be a positive integer, got 0"),
        (json.dumps({**good, "sequence": True}), "'sequence' must be a int"),
        (json.dumps({**good, "expires": "2026-02-01T00:00:00"}), "has no UTC offset"),
        (json.dumps({**good, "expires": "soon"}), "'soon' is not an ISO 8601 time"),
        (json.dumps({**good, "run": "x" * (64 << 10)}), "more than the 65536 a manifest may have"),
    ]
    for raw, reason in cases:
        with pytest.raises(PublishedFormatError, match=reason):
            Manifest.from_json(raw)
        with pytest.raises(ModelVerificationError, match="manifest check failed: .*" + reason):
            verify_model(model_bytes, raw, keys[1])
