"""What a run's rounds produce, and who hears of them.

The strategy (:mod:`fedpref.server.strategy`) reports each round as a :class:`TrainReport` or
an :class:`EvaluateReport`. The :class:`RoundTable` turns the reports into the run's rows (one
per round, as ``rounds.json`` and the run store keep them), keeps the latest model and the one
chosen on validation NDCG@k, and hands each row to the run's listeners in turn: the
:class:`Publisher` (signs and publishes the round's model), the :class:`StoreRecorder` (the
run store) and the :class:`Progress` callbacks of a runner in this process. At the end the
server returns a :class:`RunResult`: its :meth:`RunResult.summary` is what ``rounds.json``
holds, and what the engines return.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from flwr.app import ArrayRecord

from fedpref.models.config import FederatedConfig


@dataclass
class TrainReport:
    """A training round's outcome, as the strategy saw it."""

    server_round: int
    train: dict  # the averaged training metrics (only the keys devices are expected to send)
    arrays: ArrayRecord | None  # the new global model (None: the round was skipped)
    server_lr: float
    replies: int  # the devices the average holds
    dropped: int
    late: int
    rejected: int
    skipped: str | None  # why the model stayed as it was
    clip_norm: float | None = None  # the clipping bound of this round (central DP)


@dataclass
class EvaluateReport:
    """An evaluation round's averaged metrics (with ``evaluate-rejected`` if any reply was)."""

    server_round: int
    evaluate: dict


class RoundListener(Protocol):
    """Hears each round's row once the table has written it (and may add to it)."""

    def trained(self, row: dict, report: TrainReport) -> None: ...

    def evaluated(self, row: dict, report: EvaluateReport) -> None: ...


@dataclass
class PrivacyAccount:
    """The run's DP accounting: the ledger (replaced by a resumed run's), and its record for
    ``rounds.json`` (``record``)."""

    ledger: object  # fedpref.server.privacy.PrivacyLedger
    mechanism: object  # fedpref.server.privacy.DpMechanism
    delta: float
    record: dict

    def spend(self, devices: int, server_round: int | None = None) -> float:
        return self.ledger.record_round(devices, server_round=server_round)


class RoundTable:
    """The run's rows, the latest global model and the one chosen on validation NDCG@k.
    ``account``: the DP accounting (None without DP); ``secure``: the secure aggregation grid
    (its own count of dropouts); ``listeners`` hear each row in turn."""

    def __init__(self, config: FederatedConfig, *, account: PrivacyAccount | None = None, secure=None,
                 listeners: Sequence[RoundListener] = ()) -> None:
        self.config = config
        self.account = account
        self.secure = secure
        self.listeners = list(listeners)
        self.rounds: dict[int, dict] = {}
        self.latest_round, self.latest_arrays = 0, None  # the latest aggregated global arrays
        self.best_round, self.best_arrays = 0, None  # the round chosen on validation NDCG@k, and its arrays
        self.started = time.perf_counter()

    def seconds(self) -> float:
        return round(time.perf_counter() - self.started, 3)

    def report(self, report: TrainReport | EvaluateReport) -> None:
        if isinstance(report, TrainReport):
            self.trained(report)
        else:
            self.evaluated(report)

    def trained(self, report: TrainReport) -> None:
        server_round = report.server_round
        row = self.rounds.setdefault(server_round, {"round": server_round})
        if report.arrays is not None:
            self.latest_round, self.latest_arrays = server_round, report.arrays
        row.update({f"train-{k}" if not k.startswith("train-") else k: v for k, v in report.train.items()})
        if self.config.strategy != "fedavg":
            row["server-lr"] = report.server_lr
        if self.account is not None and report.arrays is not None:
            # "epsilon" is the run's account (run-config dp-accounting); both are always written
            row["epsilon"] = self.account.spend(report.replies, server_round)
            row.update(self.account.ledger.epsilons())
        if report.arrays is not None:
            row["replies"] = report.replies
        if self.secure is not None and server_round in self.secure.rounds:
            done = self.secure.rounds[server_round]
            row["dropped"] = done["sampled"] - done["contributed"]
            row["secagg-skipped"] = done["skipped"]
        elif report.dropped:
            row["dropped"] = report.dropped
        if report.late:
            row["late"] = report.late
        if report.rejected:
            row["rejected"] = report.rejected
        if report.skipped:
            row["skipped"] = report.skipped
        if report.clip_norm is not None:
            row["clip-norm"] = report.clip_norm
        row["seconds"] = self.seconds()
        for listener in self.listeners:
            listener.trained(row, report)

    def evaluated(self, report: EvaluateReport) -> None:
        if not report.evaluate:  # empty in rounds without evaluation
            return
        server_round = report.server_round
        row = self.rounds.setdefault(server_round, {"round": server_round})
        row.update(report.evaluate)
        row["seconds"] = self.seconds()
        best_ndcg = self.rounds[self.best_round]["val-ndcg"] if self.best_round else -1.0
        if row.get("val-ndcg", -1.0) > best_ndcg:
            self.best_round = server_round
            self.best_arrays = self.latest_arrays if self.latest_round == server_round else None
        for listener in self.listeners:
            listener.evaluated(row, report)


class Publisher:
    """Signs and publishes each round's global model (:class:`fedpref.server.publish.ModelPublisher`)
    as ``<run>-r<round>``, and records it in the run store; a resumed run does not publish a
    round twice. Sets the row's ``model-version``. Under DP the model's signed metadata carries
    ``privacy``: what the run has spent up to this round (``epsilon-honest``, the bound that
    holds for anyone however cohorts were drawn, ``epsilon-sampled``, ``delta``, the rounds
    planned and the participation cap), so that a device can show its person a figure it checked."""

    def __init__(self, publisher, run_name: str, model_meta: dict, store=None, run_id: int | None = None, privacy: dict | None = None) -> None:
        self.publisher = publisher
        self.run_name = run_name
        self.model_meta = model_meta
        self.store = store
        self.run_id = run_id
        self.privacy = privacy  # the run's delta, rounds planned and cap (None without DP)

    def trained(self, row: dict, report: TrainReport) -> None:
        if report.arrays is None:
            return
        server_round = report.server_round
        version = f"{self.run_name}-r{server_round:04d}"
        if not self.publisher.model_path(version).exists():
            meta = dict(self.model_meta)
            if self.privacy is not None and "epsilon-honest" in row:
                meta["privacy"] = {**self.privacy, "round": server_round, "epsilon-honest": row["epsilon-honest"],
                                   "epsilon-sampled": row["epsilon-sampled"]}
            manifest = self.publisher.publish(numpy_arrays(report.arrays), version=version, round=server_round, run=self.run_name, meta=meta)
            if self.store is not None:
                self.store.record_model(self.run_id, version=version, server_round=server_round, sha256=manifest.sha256, size=manifest.size,
                                        signature=manifest.signature)
        row["model-version"] = version

    def evaluated(self, row: dict, report: EvaluateReport) -> None:
        pass


class StoreRecorder:
    """Records each round in the run store (:class:`fedpref.server.runstore.RunStore`)."""

    NOT_METRICS = ("round", "seconds", "replies", "dropped", "epsilon", "epsilon-sampled", "epsilon-honest", "model-version")

    def __init__(self, store, run_id: int) -> None:
        self.store = store
        self.run_id = run_id

    def trained(self, row: dict, report: TrainReport) -> None:
        self.store.record_round(
            self.run_id, report.server_round, metrics={k: v for k, v in row.items() if k not in self.NOT_METRICS},
            seconds=row["seconds"], participants=row.get("replies", 0), dropped=row.get("dropped", 0), epsilon=row.get("epsilon"),
            model_version=row.get("model-version"),
        )

    def evaluated(self, row: dict, report: EvaluateReport) -> None:
        self.store.record_round(self.run_id, report.server_round, metrics=dict(report.evaluate))


class Progress:
    """Calls each callback with ``{"event": "train" | "evaluate", **row}`` (a runner in this
    process shows its progress, or acts between rounds)."""

    def __init__(self, callbacks: Sequence[Callable[[dict], None]]) -> None:
        self.callbacks = list(callbacks)

    def trained(self, row: dict, report: TrainReport) -> None:
        for callback in self.callbacks:
            callback({"event": "train", **row})

    def evaluated(self, row: dict, report: EvaluateReport) -> None:
        for callback in self.callbacks:
            callback({"event": "evaluate", **row})


@dataclass
class RunResult:
    """A finished run: :meth:`summary` is what ``rounds.json`` holds."""

    config: dict  # the run config
    devices: int
    items: int
    chosen_round: int
    rounds: list[dict]
    seconds: float
    final: dict[str, np.ndarray]  # the last global model
    best: dict[str, np.ndarray] | None = None  # the chosen round's model, if it was kept
    privacy: dict | None = None
    popularity: dict | None = None
    secure_aggregation: dict | None = None
    stopped: str | None = None  # why the run ended before its last round (too few devices may still train), if it did

    @property
    def chosen(self) -> dict:
        return next((row for row in self.rounds if row["round"] == self.chosen_round), {})

    def summary(self) -> dict:
        """The run's record as ``rounds.json`` holds it (plain JSON values)."""
        summary = {
            "config": self.config, "devices": self.devices, "items": self.items, "chosen_round": self.chosen_round,
            "chosen": self.chosen, "rounds": self.rounds, "seconds": self.seconds,
        }
        if self.privacy is not None:
            summary["privacy"] = self.privacy
        if self.popularity is not None:
            summary["popularity"] = self.popularity
        if self.secure_aggregation is not None:
            summary["secure-aggregation"] = self.secure_aggregation
        if self.stopped is not None:
            summary["stopped-early"] = self.stopped
        return json.loads(json.dumps(summary))


def numpy_arrays(arrays: ArrayRecord | None) -> dict | None:
    return None if arrays is None else {k: arrays[k].numpy() for k in arrays}
