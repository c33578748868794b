"""The device SDK: what an app embeds.

    from fedpref.client import Device

    device = Device.open("prefs.sqlite")            # or Device.in_memory()
    device.record(item=42, kind="view")             # the app logs what the person does
    device.set_consent("on-device")                 # the person chooses; federated is opt-in
    device.install_global(shared_arrays)            # the latest published global model
    device.personalize()                            # fit the private vector here, offline
    device.recommend(10)                            # ten unseen items, best first
    print(device.privacy_report())                  # what left the device, in plain words
    device.export(); device.forget()                # access and erasure

A SuperNode joined with ``fedpref device join --store prefs.sqlite`` runs fedpref's ClientApp
on the same store: the app and the SuperNode share it (SQLite in WAL mode), and the ClientApp
reads consent and the device's conditions afresh for every message, so a change in the app
takes effect at once. See docs/device.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time as _time
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from fedpref.models.contract import Params
from fedpref.models.config import FederatedConfig
from fedpref.models.files import private_folder, replace_private
from fedpref.models.preference import ModelSpec
from fedpref.models.train import LocalData, local_update

from .cold_start import load_popularity, popular_items
from .consent import Consent, Level
from .eligibility import Conditions, EligibilityPolicy
from .inputs import (
    InvalidInput,
    check_arrays,
    check_count,
    check_flag,
    check_item,
    check_kind,
    check_kinds,
    check_text,
    check_time,
    check_value,
    shown,
)
from .ledger import PrivacyReport, privacy_report
from .store import IN_MEMORY, Event, EventStore, Retention

EXPORT_FORMAT = "fedpref-device-export/2"
MAX_EPOCHS = 10_000
# The settings the export shows in their own sections; any other is shown as it is stored.
EXPORTED_SETTINGS = frozenset({
    "schema_version", "created", "generation", "instance", "model", "model-version", "run-config", "policy",
    "conditions", "device-key", "supernode-key", "model-expires",
})
PRIVATE_KEY_NOTE = (
    "not exported: the private key of this device's SuperNode key is a credential that proves the device to the "
    "server, not data about you; it stays in the file given to `fedpref device join --auth-key`, readable by you only"
)


class NoModelError(RuntimeError):
    """The device has neither a global model nor a published popularity to recommend from."""


def local_round(config: FederatedConfig, shared: Params, private: Params, items: np.ndarray, n_items: int, rng: np.random.Generator, server_round: int) -> tuple[Params, Params, dict]:
    """One federated round of training on a device: refit the private vector to the current
    global items, then train shared and private together. Returns ``(update, private', metrics)``
    (the update unclipped: the guard clips it)."""
    torch.set_num_threads(1)
    data = LocalData.for_device(items, n_items)
    # Fit the private vector to the current global items first, so that the item update is
    # computed against a user vector that already fits (not a random or stale one).
    private = refit_private(config, shared, private, data, config.private_epochs, rng)
    return local_update(shared, private, data, config.train_config(server_round), rng)


def refit_private(config: FederatedConfig, shared: Params, private: Params, data: LocalData, epochs: int, rng: np.random.Generator) -> Params:
    """``epochs`` passes that train only the private arrays, the shared ones frozen."""
    if epochs < 1 or len(data) == 0:
        return private
    refit = replace(config.train_config(), epochs=epochs, freeze_shared=True)
    return local_update(shared, private, data, refit, rng)[1]


def _private_seed(seed: int, user: int) -> int:
    return int(np.random.SeedSequence([seed, user]).generate_state(1)[0] % (2**31))


def initial_private(spec: ModelSpec, seed: int, user: int) -> Params:
    """A device's first private arrays, seeded by (seed, device)."""
    return spec.build(1, 2, seed=_private_seed(seed, user)).get_private()


def initial_privates(spec: ModelSpec, seed: int, users: np.ndarray) -> np.ndarray:
    """The first private arrays of many devices, one row each: the values :func:`initial_private`
    gives, flattened and concatenated in the model's ``private_names`` order (for matrix
    factorisation, the user vector). Matrix factorisation's are drawn without building a model
    (the fast engine meets ten thousand new devices a round): the same draws from the same
    torch generator, the model's three embeddings' default N(0, 1) initialisation, then the user
    row's N(0, init_std). Other models build each device's model."""
    users = np.asarray(users).tolist()
    if spec.kind != "mf":
        return np.stack([np.concatenate([v.ravel() for v in initial_private(spec, seed, u).values()]) for u in users]) if users else np.empty((0, 0), np.float32)
    out = np.empty((len(users), spec.dim), dtype=np.float32)
    for k, user in enumerate(users):
        g = torch.Generator().manual_seed(_private_seed(seed, user))
        torch.empty(1, spec.dim).normal_(generator=g)  # user_embedding's default initialisation
        torch.empty(2, spec.dim).normal_(generator=g)  # item_embedding's
        torch.empty(2, 1).normal_(generator=g)  # item_bias's
        out[k] = torch.empty(spec.dim).normal_(0.0, spec.init_std, generator=g).numpy()
    return out


class Device:
    """One person's device: its store, consent, model and record of what left."""

    def __init__(
        self,
        store: EventStore | str | Path = IN_MEMORY,
        *,
        retention: Retention | None = None,
        popularity: str | Path | np.ndarray | None = None,
        clock=_time.time,
        seed: int = 0,
        user: int = 0,
    ) -> None:
        self.store = store if isinstance(store, EventStore) else EventStore(store, retention=retention, clock=clock)
        self.clock = clock
        self.seed = seed
        self.user = user  # seeds the first private vector (a simulation's device index)
        self._cache: dict = {}
        self._generation: tuple | None = None
        if popularity is not None:
            self.install_popularity(load_popularity(popularity) if isinstance(popularity, str | Path) else popularity)

    @classmethod
    def open(cls, path: str | Path, **kwargs) -> Device:
        """The device whose store is the SQLite file ``path`` (created if missing)."""
        return cls(str(path), **kwargs)

    @classmethod
    def in_memory(cls, **kwargs) -> Device:
        """A device whose store lives in memory only (simulations, tests)."""
        return cls(IN_MEMORY, **kwargs)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _cached(self, key: str, make):
        generation = self.store.change_marker()
        if generation != self._generation:
            self._cache.clear()
            self._generation = generation
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    # -- events -------------------------------------------------------------------
    def record(self, item: int, kind: str = "view", value: float | None = None, time: float | None = None) -> bool:
        """Store one event: ``item`` a catalogue index, ``kind`` a short name, ``value`` an
        optional finite number, ``time`` its Unix time (None: now; at most
        :data:`~fedpref.client.inputs.CLOCK_SKEW` seconds ahead of the device's clock).
        Returns False (and stores nothing) when the person's consent excludes this kind of
        event; raises :class:`~fedpref.client.inputs.InvalidInput` for bad input."""
        consent, now = self.consent, self.clock()
        event = self._checked_event(item, kind, value, time, now, "")
        return self.store.add_events([event] if consent.allows_kind(event.kind) else []) == 1

    def record_many(self, events) -> int:
        """Store ``(item, kind, value, time)`` tuples (value and time may be None); returns how
        many were kept. Every event is checked first: one bad event raises
        :class:`~fedpref.client.inputs.InvalidInput` naming it (``events[7].time``), and none is
        stored."""
        consent, now = self.consent, self.clock()
        kept = []
        for i, entry in enumerate(events):
            if not isinstance(entry, tuple | list) or len(entry) != 4:
                raise InvalidInput(f"events[{i}]", f"must be a tuple (item, kind, value, time); got {shown(entry)}")
            event = self._checked_event(*entry, now, f"events[{i}].")
            if consent.allows_kind(event.kind):
                kept.append(event)
        return self.store.add_events(kept)

    @staticmethod
    def _checked_event(item, kind, value, when, now: float, where: str) -> Event:
        return Event(
            check_item(item, f"{where}item"), check_kind(kind, f"{where}kind"), check_value(value, f"{where}value"), check_time(when, now, f"{where}time")
        )

    def events(self) -> list[Event]:
        """The stored events the person's consent allows to be used."""
        return self.store.events(self._kinds())

    def _kinds(self):
        kinds = self.consent.kinds
        return None if kinds is None else sorted(kinds)

    def history_items(self) -> np.ndarray:
        """The distinct items the device may learn from (empty when consent is ``none``)."""
        return self._cached("items", lambda: self.store.items(self._kinds()) if self.consent.uses_history else np.zeros(0, dtype=np.int64))

    # -- consent ------------------------------------------------------------------
    @property
    def consent(self) -> Consent:
        return Consent.from_row(self.store.latest_consent())

    def set_consent(self, level: str | Level, kinds=None, *, source: str = "app") -> Consent:
        """Record the person's decision; it is in force at once. ``kinds``: the event kinds
        that may be used: None for every kind, one kind name, or a list of them.
        ``source``: where the decision was made (app, privacy page, command line)."""
        level = Level.parse(level)
        kinds = check_kinds(kinds)
        self.store.add_consent(level.value, kinds, check_text(source, "source", 64))
        return self.consent

    def consent_history(self) -> list[dict]:
        return self.store.consent_history()

    # -- eligibility ----------------------------------------------------------------
    @property
    def policy(self) -> EligibilityPolicy:
        return EligibilityPolicy.from_json(self.store.get_setting("policy"))

    def set_policy(self, policy: EligibilityPolicy) -> None:
        if not isinstance(policy, EligibilityPolicy):
            raise InvalidInput("policy", f"must be an EligibilityPolicy (or ALWAYS); got {shown(policy)}")
        for name in ("require_charging", "require_unmetered", "require_idle"):
            check_flag(getattr(policy, name), f"policy.{name}")
        age = policy.max_report_age_s
        if age is not None and not (isinstance(age, int | float) and not isinstance(age, bool) and math.isfinite(age) and age > 0):
            raise InvalidInput("policy.max_report_age_s", f"must be a positive number of seconds, or None for no limit; got {shown(age)}")
        self.store.set_setting("policy", policy.to_json())

    def report_conditions(self, *, charging: bool, unmetered: bool, idle: bool) -> None:
        """What the app knows about the device now (the SuperNode reads it before training)."""
        flags = [check_flag(charging, "charging"), check_flag(unmetered, "unmetered"), check_flag(idle, "idle")]
        self.store.set_setting("conditions", Conditions(*flags, self.clock()).to_json())

    @property
    def conditions(self) -> Conditions | None:
        return Conditions.from_json(self.store.get_setting("conditions"))

    def eligible(self) -> tuple[bool, list[str]]:
        """Whether the policy allows training now, and why not."""
        return self.policy.check(self.conditions, self.clock())

    # -- models -------------------------------------------------------------------
    @property
    def model_spec(self) -> ModelSpec | None:
        text = self.store.get_setting("model")
        if text is None:
            return None
        spec = json.loads(text)
        return ModelSpec(kind=spec["kind"], dim=spec["dim"], mlp_layers=tuple(spec["mlp_layers"]))

    def install_global(self, shared: Params, spec: ModelSpec | None = None, *, version: str | None = None) -> None:
        """Keep ``shared`` as the latest global model (for recommendations, also offline).

        Each array must have the shape the model ``spec`` (default: the one installed, else
        ``ModelSpec()``) gives it for the catalogue (one row per item) and hold finite
        floating-point numbers; they are kept in the model's dtype (float32). Anything else
        raises :class:`~fedpref.client.inputs.InvalidInput` and the model installed stays."""
        if spec is not None and not isinstance(spec, ModelSpec):
            raise InvalidInput("spec", f"must be a ModelSpec (or None for the model installed); got {shown(spec)}")
        spec = spec or self.model_spec or ModelSpec()
        version = "" if version is None else check_text(version, "version")
        names = spec.build(1, 2, init=False).shared_names
        if not isinstance(shared, Mapping) or set(shared) != set(names):
            given = sorted(map(str, shared)) if isinstance(shared, Mapping) else shown(shared)
            raise InvalidInput("shared", f"a {spec.kind} global model has arrays {sorted(names)}, got {given}")
        try:
            first = np.shape(shared[names[0]])
        except (TypeError, ValueError):
            first = ()
        if len(first) < 1 or first[0] < 2:
            raise InvalidInput(f"shared[{names[0]!r}]", f"must have one row per catalogue item (at least 2); got shape {first}")
        model = spec.build(1, first[0], init=False)
        expected = {name: (tuple(p.shape), np.dtype(str(p.dtype).removeprefix("torch."))) for name, p in model.named_parameters() if name in names}
        arrays = check_arrays(shared, expected, "shared")
        model_setting = json.dumps({"kind": spec.kind, "dim": spec.dim, "mlp_layers": list(spec.mlp_layers)})
        self.store.put_arrays("global", arrays, settings={"model": model_setting, "model-version": version})

    def global_model(self) -> Params:
        return self._cached("global", lambda: self.store.get_arrays("global"))

    @property
    def n_items(self) -> int | None:
        shared = self.global_model()
        spec = self.model_spec
        if not shared or spec is None:
            return None
        first = spec.build(1, 2, init=False).shared_names[0]
        return int(shared[first].shape[0])

    def private(self) -> Params:
        """The private arrays (created, seeded, the first time, and again when the model
        installed is of another kind or dimension than the one they were fitted to)."""
        def make():
            spec = self.model_spec or ModelSpec()
            found = self.store.get_arrays("private")
            model = spec.build(1, 2, init=False)
            shapes = {name: tuple(p.shape) for name, p in model.named_parameters() if name in model.private_names}
            if found and {name: a.shape for name, a in found.items()} == shapes:
                return found
            return initial_private(spec, self.seed, self.user)

        return self._cached("private", make)

    def set_private(self, private: Params) -> None:
        self.store.put_arrays("private", private)

    def install_popularity(self, counts: np.ndarray) -> None:
        """Keep the published (DP) popularity histogram for cold-start recommendations."""
        try:
            given = np.asarray(counts)
        except (TypeError, ValueError):
            given = np.asarray(None)
        if given.dtype.kind not in "iuf" or given.ndim != 1 or not len(given) or not np.isfinite(given).all():
            raise InvalidInput("popularity", f"must be one finite count per catalogue item (a 1-D array of numbers); got {shown(counts)}")
        counts = given.astype(np.float64)
        self.store.put_arrays("popularity", {"counts": counts})

    def update_model(self, server: str, public_key, *, cache_dir: str | Path | None = None, timeout: float = 30.0):
        """Fetch the latest published global model from ``server`` (``http(s)://host:port``),
        verify its Ed25519 signature with ``public_key`` (PEM, or its path), its expiry, its
        sequence (never older than the model installed) and its SHA-256 before use, and install
        it. An unchanged model costs no download (ETag); a model that fails a check is refused
        and the device keeps the one it has. When the server has nothing newer than a model
        that has expired, this raises ``ModelExpiredError`` and the device keeps recommending
        from that model: :attr:`model_expired` says it is stale. The request is recorded in the
        record of what left (it carries no personal data).
        Returns :class:`fedpref.client.model_fetch.FetchResult`."""
        from .model_fetch import fetch_latest

        if cache_dir is None:
            if self.store.path == IN_MEMORY:
                raise ValueError("an in-memory device needs cache_dir= for the models it fetches")
            cache_dir = private_folder(self.models_folder(), tighten=True)
        # (a cache_dir given is created 0700 by fetch_latest if it does not exist)
        result = fetch_latest(server, public_key, cache_dir=cache_dir, timeout=timeout, now=self.clock())
        self.log_sent({
            "time": self.clock(), "server": server, "message": "model-fetch", "arrays": [], "metrics": [], "configs": [],
            "bytes": 0, "downloaded_bytes": result.downloaded_bytes, "model_version": result.version, "not_modified": result.not_modified,
        })
        if not result.not_modified or self.store.get_setting("model-version") != result.version:
            meta = result.model.meta
            spec = ModelSpec(kind=meta.get("kind", "mf"), dim=int(meta.get("dim", 64)), mlp_layers=tuple(meta.get("mlp_layers", (64, 32, 16))))
            self.install_global(result.arrays, spec, version=result.version)
        self.store.set_setting("model-expires", json.dumps({"version": result.version, "expires": result.manifest.expires}))
        return result

    @property
    def model_expired(self) -> bool:
        """Whether the installed global model came from :meth:`update_model` and is past its
        signed expiry (the server has published nothing newer that this device could fetch)."""
        from fedpref.models.published import parse_time

        text = self.store.get_setting("model-expires")
        if not text:
            return False
        fetched = json.loads(text)
        if fetched.get("version") != self.store.get_setting("model-version"):
            return False  # another model was installed since (a federation's, or install_global)
        return self.clock() >= parse_time(fetched["expires"]).timestamp()

    def models_folder(self) -> Path | None:
        """``<store>.models``: where :meth:`update_model` keeps the models it fetched (None in memory)."""
        return None if self.store.path == IN_MEMORY else Path(self.store.path + ".models")

    def popularity(self) -> np.ndarray | None:
        return self._cached("popularity", lambda: self.store.get_arrays("popularity").get("counts"))

    def run_config(self) -> FederatedConfig:
        """The training settings of the last federation this device joined (the defaults
        otherwise), for the model the device holds."""
        text = self.store.get_setting("run-config")
        config = FederatedConfig.from_run_config(json.loads(text) if text else {})
        spec = self.model_spec
        if spec is not None and (spec.kind, spec.dim) != (config.model, config.dim):
            config = replace(config, model=spec.kind, dim=spec.dim)
        return config

    # -- what identifies the device to a server ---------------------------------------
    def device_key(self) -> int:
        """The stable key this device gives a federation's server (its ``query`` reply; the
        server orders devices by it): a random number made the first time and kept in the
        store (``forget()`` erases it: the next one is new)."""
        found = self.store.get_setting("device-key")
        if found is None:
            found = str(int.from_bytes(os.urandom(4), "big") >> 1)
            self.store.set_setting("device-key", found)
        return int(found)

    def remember_supernode_key(self, public_key: str) -> dict:
        """Keep the public half of this device's SuperNode authentication key (one OpenSSH
        line, see :mod:`fedpref.client.keys`), the key the SuperLink knows the device by, so that
        the export can show it. Returns ``{"public_key", "fingerprint"}``."""
        from .keys import fingerprint

        try:
            found = {"public_key": public_key.strip(), "fingerprint": fingerprint(public_key)}
        except (AttributeError, ValueError) as exc:
            raise InvalidInput("public_key", f"must be an OpenSSH public key line, as in the .pub file `fedpref device keys` writes ({exc})") from None
        self.store.set_setting("supernode-key", json.dumps(found, sort_keys=True))
        return found

    # -- training -----------------------------------------------------------------
    def join_run(self, config: FederatedConfig, shared: Params, *, version: str | None = None) -> None:
        """Keep a federation's settings and the global model it sent (the ClientApp calls this).
        A model :meth:`install_global` refuses changes neither."""
        self.install_global(shared, config.model_spec, version=version)
        self.store.set_setting("run-config", json.dumps(config.to_run_config(), sort_keys=True))

    def train_federated(self, shared: Params, config: FederatedConfig, server_round: int, rng: np.random.Generator) -> tuple[Params, dict]:
        """A federated round on this device's history: returns the (unclipped) update.
        The caller (the ClientApp) checks consent first; this checks it again."""
        if not self.consent.federated:
            raise PermissionError("consent does not include federated training: this device sends no update")
        n_items = self._n_items_of(shared, config.model_spec)
        update, private, metrics = local_round(config, shared, self.private(), self._training_items(n_items), n_items, rng, server_round)
        self.set_private(private)
        self.store.add_training("federated", self._events_used(), server_round)
        return update, metrics

    def personalize(self, epochs: int | None = None) -> int:
        """Fit the private vector to the local history with the global model frozen, on the
        device, with no server. ``epochs``: passes over the history (None: the run's setting,
        at least 5). Returns the number of events used."""
        if epochs is not None:
            epochs = check_count(epochs, "epochs", minimum=1, maximum=MAX_EPOCHS)
        if not self.consent.uses_history:
            raise PermissionError("consent is 'none': the history may not be used; ask for 'on-device' first")
        shared = self.global_model()
        if not shared:
            raise NoModelError("no global model on this device yet: install_global() it, or join a federation")
        config = self.run_config()
        n_items = self._n_items_of(shared, self.model_spec)
        items = self._training_items(n_items)
        if not len(items):
            return 0
        rng = np.random.default_rng([self.seed, len(self.store.trainings())])
        torch.set_num_threads(1)
        private = refit_private(config, shared, self.private(), LocalData.for_device(items, n_items), epochs or max(config.personalize_epochs, 5), rng)
        self.set_private(private)
        used = self._events_used()
        self.store.add_training("personalize", used, None)
        return used

    def _n_items_of(self, shared: Params, spec: ModelSpec) -> int:
        return int(shared[spec.build(1, 2, init=False).shared_names[0]].shape[0])

    def _training_items(self, n_items: int) -> np.ndarray:
        items = self.history_items()
        return items[items < n_items]

    def _events_used(self) -> int:
        return self.store.count_events(self._kinds()) if self.consent.uses_history else 0

    # -- recommendations ------------------------------------------------------------
    def scores(self) -> np.ndarray:
        """The score of every catalogue item for this person (the global model alone when
        consent is ``none``)."""
        return self._cached("scores", self._score_all)

    def _score_all(self) -> np.ndarray:
        shared, spec = self.global_model(), self.model_spec
        private = self.private() if self.consent.uses_history else {k: np.zeros_like(v) for k, v in self.private().items()}
        if spec.kind == "mf":
            q, b = shared["item_embedding.weight"], shared["item_bias.weight"]
            p = private["user_embedding.weight"][0]
            return (q @ p + b[:, 0]).astype(np.float64)
        model = spec.build(1, self._n_items_of(shared, spec), init=False)
        model.set_shared(shared)
        model.set_private(private)
        model.eval()
        return model.score_all(torch.zeros(1, dtype=torch.long))[0].numpy().astype(np.float64)

    def recommend(self, k: int = 10, *, exclude_seen: bool = True) -> list[int]:
        """The ``k`` best items, best first, from the global model and the private vector;
        seen items left out by default. A device with consent but no history yet gets the
        published popularity (or the global model alone when there is none); with consent
        ``none`` the history is not used: the global model alone ranks."""
        k = check_count(k, "k", minimum=1)
        history = self.history_items()
        seen = history if exclude_seen else np.zeros(0, dtype=np.int64)
        has_model = bool(self.global_model())
        counts = self.popularity()
        cold = self.consent.uses_history and not len(history)
        if counts is not None and (cold or not has_model):
            return [int(i) for i in popular_items(counts, k, seen[seen < len(counts)])]
        if not has_model:
            raise NoModelError("nothing to recommend from yet: install_global() a model or install_popularity() a histogram")
        scores = self.scores()
        if len(seen):
            scores = scores.copy()
            scores[seen[seen < len(scores)]] = -np.inf
        k = min(k, int(np.isfinite(scores).sum()))
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        return [int(i) for i in top[np.argsort(-scores[top], kind="stable")]]

    # -- transparency -----------------------------------------------------------------
    def log_sent(self, entry: dict) -> None:
        """Add one message to the record of what left (the ClientApp calls this)."""
        self.store.add_sent(entry)

    def record_of_what_left(self) -> list[dict]:
        return self.store.sent()

    def privacy_report(self) -> PrivacyReport:
        return privacy_report(
            trainings=self.store.trainings(),
            sent=self.store.sent(),
            consent_text=self.consent.describe(),
            n_events=self.store.count_events(),
        )

    def serve_privacy_page(self, *, port: int = 0):
        """Serve the person's privacy page on 127.0.0.1 (see :mod:`fedpref.client.page`);
        returns a handle with ``url`` (a one-time link carrying the launch's secret: give it
        to the person only), ``link()`` (another one-time link, for another tab or browser:
        the page answers only the tab that opened a link) and ``stop()``."""
        from .page import serve

        return serve(self, port=port)

    def export(self) -> dict:
        """Everything the store holds about the person, as one JSON-ready document: every
        event, consent decision, record of what left, training and setting, the private
        model's values, the global model's version, specification and arrays (their shapes,
        dtypes and SHA-256: the values are the published model's), the last run's settings,
        and the keys that identify the device to a server. The SuperNode key's private half is
        not in it (:data:`PRIVATE_KEY_NOTE` says why)."""
        settings = self.store.settings()
        conditions = Conditions.from_json(settings.get("conditions"))
        supernode_key = json.loads(settings["supernode-key"]) if "supernode-key" in settings else {}
        return {
            "format": EXPORT_FORMAT,
            "exported_at": self.clock(),
            "store": {
                "schema_version": int(settings["schema_version"]),
                "created": float(settings["created"]) if "created" in settings else None,
                "changes": int(settings.get("generation", "0")),  # how many changes since it was created (or erased)
                "instance": settings.get("instance"),  # a random token, new when the store is erased
            },
            "consent": self.consent.to_dict(),
            "consent_history": self.consent_history(),
            "events": [asdict(e) for e in self.store.events()],
            "record_of_what_left": self.record_of_what_left(),
            "trainings": self.store.trainings(),
            "private_model": {
                name: {"shape": list(a.shape), "dtype": str(a.dtype), "values": a.ravel().tolist()}
                for name, a in self.store.get_arrays("private").items()
            },
            "global_model": {
                "version": settings.get("model-version") or None,
                "spec": json.loads(settings["model"]) if "model" in settings else None,
                "arrays": _described(self.store.get_arrays("global")),
                # the signed expiry of the model last fetched from a server (update_model)
                "fetched": json.loads(settings["model-expires"]) if settings.get("model-expires") else None,
            },
            "popularity": _described(self.store.get_arrays("popularity")),
            "run_config": json.loads(settings["run-config"]) if settings.get("run-config") else None,
            "eligibility": {"policy": asdict(EligibilityPolicy.from_json(settings.get("policy"))), "conditions": None if conditions is None else asdict(conditions)},
            "retention": asdict(self.store.retention),
            "device_key": {
                "index": int(settings["device-key"]) if "device-key" in settings else None,
                "supernode_public_key": supernode_key.get("public_key"),
                "supernode_key_fingerprint": supernode_key.get("fingerprint"),
                "supernode_private_key": PRIVATE_KEY_NOTE,
            },
            "other_settings": {key: value for key, value in settings.items() if key not in EXPORTED_SETTINGS},
        }

    def export_json(self, path: str | Path | None = None) -> str:
        """The export as JSON text; with ``path``, also written there, readable by its owner
        only (mode 0600; an existing file is replaced)."""
        text = json.dumps(self.export(), indent=2)
        if path is not None:
            replace_private(path, text.encode())
        return text

    def forget(self) -> None:
        """Erase everything stored about the person: events, consent history, the record of
        what left, the private model, conditions and policy, the last run's settings, the
        device key and the public half of its SuperNode key, the installed model's version;
        reset the store's change counter and creation time; and remove the ``<store>.models``
        folder of fetched models. The device starts again with consent ``none``. The global
        model's arrays (the published model, not about the person) are kept, so
        recommendations keep working."""
        self.store.erase()
        self._cache.clear()
        self._generation = None
        models = self.models_folder()
        if models is not None and models.is_dir() and not models.is_symlink():
            shutil.rmtree(models)


def _described(arrays: Params) -> dict:
    """Name, shape, dtype and SHA-256 of each array (for arrays that are published, not personal)."""
    return {
        name: {"shape": list(a.shape), "dtype": str(a.dtype), "sha256": hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()}
        for name, a in arrays.items()
    }
