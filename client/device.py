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

import json
import math
import time as _time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from fedpref.models.contract import Params
from fedpref.models.federation import FederatedConfig
from fedpref.models.preference import ModelSpec
from fedpref.models.train import LocalData, local_update

from .cold_start import load_popularity, popular_items
from .consent import Consent, Level
from .eligibility import Conditions, EligibilityPolicy
from .ledger import PrivacyReport, privacy_report
from .store import IN_MEMORY, Event, EventStore, Retention

EXPORT_FORMAT = "fedpref-device-export/1"


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
        self._generation = -1
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
        generation = self.store.generation()
        if generation != self._generation:
            self._cache.clear()
            self._generation = generation
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    # -- events -------------------------------------------------------------------
    def record(self, item: int, kind: str = "view", value: float | None = None, time: float | None = None) -> bool:
        """Store one event. Returns False (and stores nothing) when the person's consent
        excludes this kind of event."""
        return self.record_many([(item, kind, value, time)]) == 1

    def record_many(self, events) -> int:
        """Store ``(item, kind, value, time)`` tuples (value and time may be None); returns how many were kept."""
        consent = self.consent
        now = self.clock()
        kept = []
        for item, kind, value, when in events:
            if not isinstance(item, int | np.integer) or item < 0:
                raise ValueError(f"item must be a catalogue index (an integer >= 0), got {item!r}")
            if not isinstance(kind, str) or not kind:
                raise ValueError(f"kind must be a non-empty string such as 'view' or 'purchase', got {kind!r}")
            if value is not None and not math.isfinite(float(value)):
                raise ValueError(f"value must be a finite number or None, got {value!r}")
            if consent.allows_kind(kind):
                kept.append(Event(int(item), kind, None if value is None else float(value), now if when is None else float(when)))
        return self.store.add_events(kept)

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
        that may be used (None for every kind)."""
        level = Level.parse(level)
        if kinds is not None:
            kinds = [str(k) for k in kinds]
        self.store.add_consent(level.value, kinds, source)
        return self.consent

    def consent_history(self) -> list[dict]:
        return self.store.consent_history()

    # -- eligibility ----------------------------------------------------------------
    @property
    def policy(self) -> EligibilityPolicy:
        return EligibilityPolicy.from_json(self.store.get_setting("policy"))

    def set_policy(self, policy: EligibilityPolicy) -> None:
        self.store.set_setting("policy", policy.to_json())

    def report_conditions(self, *, charging: bool, unmetered: bool, idle: bool) -> None:
        """What the app knows about the device now (the SuperNode reads it before training)."""
        self.store.set_setting("conditions", Conditions(charging, unmetered, idle, self.clock()).to_json())

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
        """Keep ``shared`` as the latest global model (for recommendations, also offline)."""
        spec = spec or self.model_spec or ModelSpec()
        expected = spec.build(1, 2, init=False).shared_names
        if set(shared) != set(expected):
            raise ValueError(f"a {spec.kind} global model has arrays {sorted(expected)}, got {sorted(shared)}")
        self.store.put_arrays("global", {k: np.asarray(v) for k, v in shared.items()})
        self.store.set_setting("model", json.dumps({"kind": spec.kind, "dim": spec.dim, "mlp_layers": list(spec.mlp_layers)}))
        self.store.set_setting("model-version", str(version) if version is not None else "")

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
        """The private arrays (created, seeded, the first time)."""
        def make():
            found = self.store.get_arrays("private")
            if found:
                return found
            return initial_private(self.model_spec or ModelSpec(), self.seed, self.user)

        return self._cached("private", make)

    def set_private(self, private: Params) -> None:
        self.store.put_arrays("private", private)

    def install_popularity(self, counts: np.ndarray) -> None:
        """Keep the published (DP) popularity histogram for cold-start recommendations."""
        counts = np.asarray(counts, dtype=np.float64)
        if counts.ndim != 1 or not np.isfinite(counts).all():
            raise ValueError("popularity must be one finite count per item")
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
            cache_dir = Path(self.store.path + ".models")
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

    # -- training -----------------------------------------------------------------
    def join_run(self, config: FederatedConfig, shared: Params, *, version: str | None = None) -> None:
        """Keep a federation's settings and the global model it sent (the ClientApp calls this)."""
        self.store.set_setting("run-config", json.dumps(config.to_run_config(), sort_keys=True))
        self.install_global(shared, config.model_spec, version=version)

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
        device, with no server. Returns the number of events used."""
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
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
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
        to the person only), ``link()`` (another one-time link) and ``stop()``."""
        from .page import serve

        return serve(self, port=port)

    def export(self) -> dict:
        """Everything stored about the person, as one JSON-ready document."""
        conditions = self.conditions
        return {
            "format": EXPORT_FORMAT,
            "exported_at": self.clock(),
            "store_schema_version": self.store.schema_version,
            "consent": self.consent.to_dict(),
            "consent_history": self.consent_history(),
            "events": [asdict(e) for e in self.store.events()],
            "record_of_what_left": self.record_of_what_left(),
            "trainings": self.store.trainings(),
            "private_model": {
                name: {"shape": list(a.shape), "dtype": str(a.dtype), "values": a.ravel().tolist()}
                for name, a in self.store.get_arrays("private").items()
            },
            "eligibility": {"policy": asdict(self.policy), "conditions": None if conditions is None else asdict(conditions)},
            "retention": asdict(self.store.retention),
        }

    def export_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.export(), indent=2)
        if path is not None:
            Path(path).write_text(text)
        return text

    def forget(self) -> None:
        """Erase everything stored about the person: events, consent history, the record of
        what left, the private model, conditions and policy. The device starts again with
        consent ``none``. The global model (not about the person) is kept."""
        self.store.erase()
        self._cache.clear()
        self._generation = -1
