"""The record of what left the device, and the plain-language report built from it.

Every message the device sends is described here, never its content: when, to which server,
which run and round, what kind of message, which arrays (names, shapes, dtypes, bytes),
which metric names, and for a model update its L2 norm after clipping, the clipping bound and
the noise and DP parameters in force, and the privacy guarantee the server's request stated.
:func:`describe_message` builds the entry from the outgoing Flower message itself, so the
record cannot drift from what was actually sent.

The same record tells the device which training rounds of which run it joined
(:func:`rounds_joined`: the participation cap counts them), and so what a run's guarantee means
for its person (:func:`person_sentence`): the (epsilon, delta) that holds for anyone, whatever
rounds they joined, and how many of the run's rounds this device took part in.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np


@dataclass(frozen=True)
class PrivacyReport:
    """``text``: a short summary for the person; ``data``: the same, structured."""

    text: str
    data: dict

    def __str__(self) -> str:
        return self.text


def describe_arrays(arrays) -> list[dict]:
    """Names, shapes, dtypes and byte sizes of a Flower ``ArrayRecord`` (or a dict of arrays)."""
    out = []
    for name in arrays:
        a = arrays[name]
        if hasattr(a, "data") and isinstance(a.data, bytes | bytearray | memoryview):
            out.append({"name": name, "shape": list(a.shape), "dtype": str(a.dtype), "bytes": len(a.data)})
        else:
            v = np.asarray(a)
            out.append({"name": name, "shape": list(v.shape), "dtype": str(v.dtype), "bytes": int(v.nbytes)})
    return out


def describe_message(reply, *, time: float, server: str, details: dict | None) -> dict:
    """The record of one outgoing Flower message (a reply the device sends)."""
    meta = reply.metadata
    entry: dict = {
        "time": time,
        "server": server,
        "run": int(meta.run_id),
        "message": str(meta.message_type),
        "arrays": [],
        "metrics": [],
        "configs": [],
        "bytes": 0,
    }
    if reply.has_error():
        entry["message"] = "declined"
        entry["reason"] = reply.error.reason
    else:
        for key, record in reply.content.array_records.items():
            for a in describe_arrays(record):
                a["record"] = key
                entry["arrays"].append(a)
        for record in reply.content.metric_records.values():
            entry["metrics"].extend(sorted(record))
        config_bytes = 0
        for record in reply.content.config_records.values():
            entry["configs"].extend(sorted(record))
            config_bytes += sum(_value_bytes(v) for v in record.values())
        # SecAgg+ sends its masked vector and key shares as config entries (bytes and ints).
        entry["bytes"] = sum(a["bytes"] for a in entry["arrays"]) + 8 * len(entry["metrics"]) + config_bytes
    entry.update(details or {})
    return entry


def _value_bytes(value) -> int:
    if isinstance(value, bytes | bytearray):
        return len(value)
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value)
    return 8  # a number or a bool


def _is_training_update(entry: dict) -> bool:
    return bool(entry.get("update")) and entry.get("task", "training") == "training" and entry.get("message") != "declined"


def rounds_joined(sent: list[dict], run: int) -> list[int]:
    """The training rounds (1 and up) of run ``run`` this device sent an update in, in order."""
    return sorted({int(e["round"]) for e in sent if _is_training_update(e) and e.get("run") == run and isinstance(e.get("round"), int) and e["round"] >= 1})


def _number(value: float) -> str:
    """A number as a person reads it: 3 significant digits, and 1e-7 rather than 1e-07."""
    text = f"{value:.3g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}e{int(exponent)}"
    return text


def person_sentence(run: int, rounds: list[int], guarantee: dict | None) -> str:
    """What run ``run``'s guarantee means for this person, in one sentence: the bound that holds
    for anyone (the server's honest figure, from its training requests), and how many rounds
    this device took part in."""
    joined = len(rounds)
    if guarantee is None:
        return (f"Run {run} stated no differential-privacy guarantee (no noise was promised); "
                f"this device took part in {joined} of its round{'s' if joined != 1 else ''}.")
    cap = guarantee.get("max_participations") or 0
    capped = f", at most {cap} per device" if cap else ""
    return (f"Run {run} promises (ε = {_number(guarantee['epsilon'])}, δ = {_number(guarantee['delta'])}) for anyone, whatever rounds "
            f"they joined, assuming nothing about who was asked when (the server's figure in its training requests, for "
            f"{guarantee['rounds']} rounds with whole cohorts{capped}); this device took part in {joined} of {guarantee['rounds']} rounds.")


def person_guarantees(sent: list[dict]) -> list[dict]:
    """For each run this device sent a training update in (in order): the run, the rounds it
    joined, the guarantee its latest request stated (or None) and :func:`person_sentence`."""
    runs: dict[int, dict | None] = {}
    for entry in sent:
        if _is_training_update(entry) and isinstance(entry.get("run"), int):
            runs[entry["run"]] = entry.get("guarantee") or runs.get(entry["run"])
    out = []
    for run, guarantee in runs.items():
        rounds = rounds_joined(sent, run)
        out.append({"run": run, "rounds_joined": rounds, "guarantee": guarantee, "sentence": person_sentence(run, rounds, guarantee)})
    return out


def host_of(server: str) -> str:
    return urlsplit(f"//{server}").hostname or server


def privacy_report(*, trainings: list[dict], sent: list[dict], consent_text: str, n_events: int) -> PrivacyReport:
    """The summary: how much local training, how many updates to whom and how protected."""
    federated = [t for t in trainings if t["purpose"] == "federated"]
    personalised = [t for t in trainings if t["purpose"] == "personalize"]
    updates = [e for e in sent if e.get("update") and e.get("task", "training") == "training"]
    histograms = [e for e in sent if e.get("update") and e.get("task") == "popularity"]
    evaluations = [e for e in sent if e["message"].startswith("evaluate") and not e.get("update")]
    declined = [e for e in sent if e["message"] == "declined"]
    fetches = [e for e in sent if e["message"] == "model-fetch"]
    others = [e for e in sent if e not in updates and e not in histograms and e not in evaluations and e not in declined and e not in fetches]
    servers = sorted({host_of(e["server"]) for e in sent})
    bounds = sorted({e["clip_bound"] for e in updates if e.get("clip_bound") is not None})
    secure = sum(1 for e in updates if e.get("secure_aggregation"))
    device_noise = sum(1 for e in updates if e.get("noise", {}).get("placement") == "distributed")
    server_noise = sum(1 for e in updates if e.get("noise", {}).get("placement") == "central")
    trained_on = max((t["events"] for t in trainings), default=0)

    lines = []
    if trainings:
        parts = [f"{n} {what}{'s' if n != 1 else ''}" for n, what in ((len(federated), "federated round"), (len(personalised), "local personalisation")) if n]
        lines.append(f"Trained on {trained_on} events on this device ({', '.join(parts)}).")
    else:
        lines.append(f"Has not trained on your events yet ({n_events} stored on this device).")
    if updates:
        how = [f"each limited in size (norm at most {bounds[-1]:g})" if bounds else "each limited in size"]
        if device_noise:
            how.append("with noise added on this device")
        elif server_noise:
            how.append("with noise added by the server before use")
        if secure:
            how.append("masked so the server could only read the sum over many devices")
        lines.append(f"Sent {len(updates)} model update{'s' if len(updates) != 1 else ''} to {', '.join(servers)}, {', '.join(how)}.")
    if histograms:
        cap = int(round(max(e["clip_bound"] for e in histograms) ** 2))
        lines.append(
            f"Counted in {len(histograms)} item popularity histogram{'s' if len(histograms) != 1 else ''} "
            f"(at most {cap} of your items each, with noise, readable only as a sum over many devices)."
        )
    if evaluations:
        lines.append(f"Sent {len(evaluations)} evaluation result{'s' if len(evaluations) != 1 else ''} (a few numbers each).")
    if fetches:
        new = sum(1 for e in fetches if not e.get("not_modified"))
        lines.append(f"Asked for the latest shared model {len(fetches)} time{'s' if len(fetches) != 1 else ''} ({new} new, each checked against its signature).")
    if declined:
        lines.append(f"Declined {len(declined)} request{'s' if len(declined) != 1 else ''} (consent or conditions did not allow {'them' if len(declined) != 1 else 'it'}).")
    if not sent:
        lines.append("Nothing has left this device.")
    guarantees = person_guarantees(sent)
    if guarantees:
        lines.extend(g["sentence"] for g in guarantees)
    else:
        lines.append("This device has not taken part in any federated training round.")
    lines.append("Your events never left this device.")
    lines.append(consent_text)
    kinds = Counter(e["message"] for e in sent)
    data = {
        "events_stored": n_events,
        "trained_on_events": trained_on,
        "trainings": {"federated": len(federated), "personalize": len(personalised)},
        "messages_sent": len(sent),
        "messages_by_kind": dict(sorted(kinds.items())),
        "updates_sent": len(updates),
        "popularity_contributions": len(histograms),
        "evaluations_sent": len(evaluations),
        "declined": len(declined),
        "model_fetches": len(fetches),
        "other_messages": len(others),
        "servers": servers,
        "clip_bounds": bounds,
        "bytes_sent": int(sum(e.get("bytes", 0) for e in sent)),
        "secure_aggregation_updates": secure,
        "noised_on_device_updates": device_noise,
        "noised_by_server_updates": server_noise,
        "events_left_device": False,
        "guarantees": guarantees,  # per run: the rounds this device joined, and what the run promises anyone
    }
    return PrivacyReport(" ".join(lines), data)
