"""A hostile model server against a device: each test performs one attack through a small
HTTP server on 127.0.0.1 that answers as the attacker chooses, and fails if it succeeds.

- a model body far larger than its signed manifest says, and a manifest far larger than any
  manifest: the device stops reading near the limit (the bytes it reads are counted) and refuses;
- a validly signed model of an older run, offered after a newer one: refused as a rollback;
- the sequence number of the installed model on another model: refused as a replay;
- an expired model: refused; a server that answers 304 for ever: the device reports that its
  model has expired.
"""

import collections
import datetime
import http.server
import json
import os
import stat
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass

import numpy as np
import pytest

from fedpref.client import Device
from fedpref.client.model_fetch import (
    CACHED_MANIFEST,
    CACHED_MODEL,
    CHUNK_BYTES,
    HIGHEST,
    ModelExpiredError,
    ModelVerificationError,
    fetch_latest,
)
from fedpref.models.published import MAX_MANIFEST_BYTES, MODEL_MEDIA_TYPE, Manifest, sha256_hex
from fedpref.server.publish import ModelPublisher, generate_signing_key

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc).timestamp()  # when the tests' models are published
DAY = 86400
EXPIRY_DAYS = 30
FLOOD = 32 << 20  # what a hostile server offers to send: 32 MiB


def mf_arrays(seed: int) -> dict[str, np.ndarray]:
    """The shared arrays of an MF model of dim 8 over 40 items (what a device installs)."""
    rng = np.random.default_rng(seed)
    return {"item_embedding.weight": rng.normal(size=(40, 8)).astype(np.float32), "item_bias.weight": rng.normal(size=(40, 1)).astype(np.float32)}


@dataclass
class Published:
    manifest: Manifest
    manifest_bytes: bytes
    model_bytes: bytes


def publish(publisher: ModelPublisher, run: str, round_: int) -> Published:
    manifest = publisher.publish(mf_arrays(round_), version=f"{run}-r{round_:04d}", round=round_, run=run, meta={"kind": "mf", "dim": 8})
    return Published(manifest, publisher.manifest_path(manifest.version).read_bytes(), publisher.model_path(manifest.version).read_bytes())


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    flood: int = 0  # then this many more bytes of junk, in chunks, until the client hangs up
    content_length: int | None = None  # declared; None: the body ends when the connection closes
    headers: dict | None = None


class Mirror(http.server.ThreadingHTTPServer):
    """An HTTP/1.0 server on 127.0.0.1 answering each path as the test says (a hostile mirror)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.answers: dict[str, Answer] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, If-None-Match)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def offer(self, published: Published) -> None:
        """Serve ``published`` as the latest model, at every path a device may ask for it."""
        version = published.manifest.version
        model = Answer(body=published.model_bytes, content_length=len(published.model_bytes), headers={"X-Fedpref-Version": version, "Content-Type": MODEL_MEDIA_TYPE})
        manifest = Answer(body=published.manifest_bytes, content_length=len(published.manifest_bytes), headers={"Content-Type": "application/json"})
        self.answers.update({"/models/latest": model, f"/models/{version}": model, "/models/latest/manifest": manifest, f"/models/{version}/manifest": manifest})


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.server.requests.append((self.path, self.headers.get("If-None-Match")))
        answer = self.server.answers.get(self.path, Answer(status=404, body=b'{"detail": "not here"}'))
        self.send_response(answer.status)
        for name, value in (answer.headers or {}).items():
            self.send_header(name, value)
        if answer.content_length is not None:
            self.send_header("Content-Length", str(answer.content_length))
        self.end_headers()
        if answer.status == 304:
            return
        try:
            self.wfile.write(answer.body)
            junk = b"\x00" * CHUNK_BYTES
            for _ in range(answer.flood // len(junk)):
                self.wfile.write(junk)
        except (BrokenPipeError, ConnectionResetError):  # the device hung up: the attack is over
            pass

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def mirror():
    server = Mirror()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture
def keys(tmp_path):
    return generate_signing_key(tmp_path / "keys" / "models.key")


@pytest.fixture
def publisher(tmp_path, keys):
    """The operator's publisher, its clock fixed at T0."""
    return ModelPublisher(tmp_path / "published", keys[0], expiry_days=EXPIRY_DAYS, clock=lambda: T0)


@pytest.fixture
def bytes_read(monkeypatch):
    """The bytes the device reads from each response body, by URL path (a spy on urllib's responses)."""
    counts: collections.Counter = collections.Counter()
    real_urlopen = urllib.request.urlopen

    class Counted:
        def __init__(self, response) -> None:
            self._response = response

        def __getattr__(self, name):
            return getattr(self._response, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self._response.__exit__(*exc)

        def read(self, *args):
            data = self._response.read(*args)
            counts[urllib.parse.urlsplit(self._response.url).path] += len(data)
            return data

    monkeypatch.setattr(urllib.request, "urlopen", lambda *args, **kwargs: Counted(real_urlopen(*args, **kwargs)))
    return counts


def cache_files(cache) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(cache.iterdir())} if cache.exists() else {}


# --- unbounded downloads ---------------------------------------------------------------------


@pytest.mark.parametrize("declared", [None, FLOOD], ids=["close-delimited", "content-length"])
def test_a_model_body_far_larger_than_its_manifest_says_is_not_read_beyond_the_signed_size(publisher, keys, mirror, bytes_read, tmp_path, declared):
    # Prepare: a genuine, signed manifest; the model file's path streams 32 MiB instead.
    genuine = publish(publisher, "run", 1)
    mirror.offer(genuine)
    flood = Answer(body=genuine.model_bytes, flood=FLOOD, content_length=declared, headers={"X-Fedpref-Version": genuine.manifest.version})
    mirror.answers["/models/latest"] = mirror.answers[f"/models/{genuine.manifest.version}"] = flood
    cache = tmp_path / "cache"

    # Execute
    with pytest.raises(ModelVerificationError, match="size check failed") as refused:
        fetch_latest(mirror.url, keys[1], cache_dir=cache, timeout=10, now=T0)

    # Assert: at most one byte beyond the signed size was read (none when the size was declared), nothing cached.
    model_bytes_read = bytes_read["/models/latest"] + bytes_read[f"/models/{genuine.manifest.version}"]
    assert model_bytes_read <= (genuine.manifest.size + 1 if declared is None else 0)
    assert refused.value.check == "size"
    assert CACHED_MODEL not in cache_files(cache)


def test_a_manifest_far_larger_than_any_manifest_is_not_read_beyond_the_manifest_limit(publisher, keys, mirror, bytes_read, tmp_path):
    # Prepare: every manifest path streams 32 MiB that begin like a manifest.
    genuine = publish(publisher, "run", 1)
    mirror.offer(genuine)
    huge = Answer(body=b'{"version": "run-r0001", "padding": "', flood=FLOOD)
    mirror.answers["/models/latest/manifest"] = mirror.answers["/models/run-r0001/manifest"] = huge

    # Execute
    with pytest.raises(ModelVerificationError, match="manifest check failed") as refused:
        fetch_latest(mirror.url, keys[1], cache_dir=tmp_path / "cache", timeout=10, now=T0)

    # Assert: the device read at most one byte beyond a manifest's limit, and no model at all.
    assert bytes_read["/models/latest/manifest"] + bytes_read["/models/run-r0001/manifest"] <= MAX_MANIFEST_BYTES + 1
    assert bytes_read["/models/latest"] + bytes_read["/models/run-r0001"] == 0
    assert refused.value.check == "manifest"


# --- rollback and replay ---------------------------------------------------------------------


def test_an_older_runs_validly_signed_model_offered_after_a_newer_one_is_refused(publisher, keys, mirror, tmp_path):
    # Prepare: run "spring" then run "summer" publish into one folder; the device installs summer's round 1.
    spring = [publish(publisher, "spring", r) for r in (1, 2, 3)]
    summer = publish(publisher, "summer", 1)
    assert [p.manifest.sequence for p in spring] + [summer.manifest.sequence] == [1, 2, 3, 3 + 1]  # across runs
    cache = tmp_path / "cache"
    mirror.offer(summer)
    assert fetch_latest(mirror.url, keys[1], cache_dir=cache, timeout=10, now=T0).version == "summer-r0001"
    before = cache_files(cache)

    for old in spring:  # Execute: the attacker offers each of spring's rounds, a later round of another run included
        mirror.offer(old)
        with pytest.raises(ModelVerificationError, match=f"rollback check failed: the server offers {old.manifest.version} \\(sequence {old.manifest.sequence}\\), older than summer-r0001 \\(sequence 4\\)") as refused:
            fetch_latest(mirror.url, keys[1], cache_dir=cache, timeout=10, now=T0)

        # Assert
        assert refused.value.check == "rollback"
        assert cache_files(cache) == before


def test_the_installed_sequence_number_on_another_model_is_refused(publisher, keys, mirror, tmp_path):
    # Prepare: the device installs sequence 1; the same key then signs sequence 1 again, in another
    # folder, for another model (a copied key without the folder's .sequence, or a stolen key).
    installed = publish(publisher, "run", 1)
    cache = tmp_path / "cache"
    mirror.offer(installed)
    fetch_latest(mirror.url, keys[1], cache_dir=cache, timeout=10, now=T0)
    before = cache_files(cache)
    elsewhere = ModelPublisher(tmp_path / "elsewhere", keys[0], expiry_days=EXPIRY_DAYS, clock=lambda: T0)
    replayed = elsewhere.publish(mf_arrays(99), version="other-r0001", round=1, run="other", meta={"kind": "mf", "dim": 8})
    assert replayed.sequence == installed.manifest.sequence and replayed.sha256 != installed.manifest.sha256
    mirror.offer(Published(replayed, elsewhere.manifest_path("other-r0001").read_bytes(), elsewhere.model_path("other-r0001").read_bytes()))

    # Execute
    with pytest.raises(ModelVerificationError, match="replay check failed: the server offers other-r0001 with sequence 1, the sequence of run-r0001") as refused:
        fetch_latest(mirror.url, keys[1], cache_dir=cache, timeout=10, now=T0)

    # Assert
    assert refused.value.check == "replay"
    assert cache_files(cache) == before


def test_the_highest_sequence_survives_a_lost_cached_model(publisher, keys, mirror, tmp_path):
    # Prepare: the device installs sequence 2, then loses its cached model (not highest.json).
    old, new = publish(publisher, "run", 1), publish(publisher, "run", 2)
    cache = tmp_path / "cache"
    mirror.offer(new)
    fetch_latest(mirror.url, keys[1], cache_dir=cache, timeout=10, now=T0)
    (cache / CACHED_MODEL).unlink()
    mirror.offer(old)

    # Execute / Assert: sequence 1 is still older than what this device installed.
    with pytest.raises(ModelVerificationError, match="rollback check failed"):
        fetch_latest(mirror.url, keys[1], cache_dir=cache, timeout=10, now=T0)
    assert json.loads((cache / HIGHEST).read_bytes())[new.manifest.key_id]["sequence"] == 2


def test_the_cache_is_readable_by_its_owner_only(publisher, keys, mirror, tmp_path):
    mirror.offer(publish(publisher, "run", 1))
    cache = tmp_path / "device" / "cache"
    umask = os.umask(0)  # the most permissive: modes must not depend on it
    try:
        fetch_latest(mirror.url, keys[1], cache_dir=cache, timeout=10, now=T0)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert {name: stat.S_IMODE((cache / name).stat().st_mode) for name in (CACHED_MODEL, CACHED_MANIFEST, HIGHEST)} == dict.fromkeys((CACHED_MODEL, CACHED_MANIFEST, HIGHEST), 0o600)


# --- expiry ----------------------------------------------------------------------------------


def test_an_expired_model_is_refused_and_one_about_to_expire_is_not(publisher, keys, mirror, tmp_path):
    # Prepare: a model published at T0 that expires EXPIRY_DAYS later.
    published = publish(publisher, "run", 1)
    expires = T0 + EXPIRY_DAYS * DAY
    assert published.manifest.expires_at == expires
    mirror.offer(published)

    # Execute / Assert: at its expiry it is refused, and nothing is cached ...
    with pytest.raises(ModelExpiredError, match="expired check failed: the server offers run-r0001, which expired at 2026-01-31T00:00:00.000\\+00:00") as refused:
        fetch_latest(mirror.url, keys[1], cache_dir=tmp_path / "late", timeout=10, now=expires)
    assert (refused.value.check, refused.value.installed) == ("expired", False)
    assert cache_files(tmp_path / "late") == {}
    # ... one second before, it is installed.
    assert fetch_latest(mirror.url, keys[1], cache_dir=tmp_path / "in-time", timeout=10, now=expires - 1).version == "run-r0001"


def test_a_server_that_answers_304_for_ever_leaves_the_device_reporting_an_expired_model(publisher, keys, mirror, tmp_path):
    # Prepare: the device installs a model at T0; from then on the server answers "not modified" to everything.
    published = publish(publisher, "run", 1)
    mirror.offer(published)
    now = [T0]
    device = Device.open(tmp_path / "device.sqlite", clock=lambda: now[0])
    assert device.update_model(mirror.url, keys[1]).version == "run-r0001"
    for path in list(mirror.answers):
        mirror.answers[path] = Answer(status=304)

    # Execute / Assert: a day later the frozen model is still current ...
    now[0] = T0 + DAY
    assert device.update_model(mirror.url, keys[1]).not_modified
    assert not device.model_expired
    # ... at its expiry, the device says its model is stale, every time it asks.
    now[0] = T0 + EXPIRY_DAYS * DAY
    for _ in range(2):
        with pytest.raises(ModelExpiredError, match="this device's model run-r0001 expired at 2026-01-31T00:00:00.000\\+00:00 .* the server offers nothing newer") as stale:
            device.update_model(mirror.url, keys[1])
        assert (stale.value.check, stale.value.installed) == ("expired", True)
    assert device.model_expired
    assert mirror.requests[-1] == ("/models/latest/manifest", f'"{sha256_hex(published.manifest_bytes)}"')  # asked, conditionally
    # The model stays installed (recommendations keep working offline), marked as expired.
    np.testing.assert_array_equal(device.global_model()["item_bias.weight"], mf_arrays(1)["item_bias.weight"])
    device.close()
